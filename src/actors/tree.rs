//! The observable state of the whole actor tree, as served by `GET /admin/actors` and
//! snapshotted by tests. Collections are sorted, so equal states serialize equally.

use std::sync::Arc;

use actix::prelude::*;
use futures::future::join_all;
use serde::Serialize;

use crate::actors::consumer_group::{ConsumerGroup, ConsumerGroupState};
use crate::actors::domain::{DomainActorState, ObserveDomain};
use crate::actors::outbox_relay::{ObserveRelay, OutboxRelay, OutboxRelayState};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActorTreeState {
    pub consumer_groups: Vec<ConsumerGroupState>,
    pub domain_actors: Vec<DomainActorState>,
    pub outbox_relay: Option<OutboxRelayState>,
}

/// Handles on every long-lived actor.
#[derive(Clone, Default)]
pub struct ActorTree {
    pub consumer_groups: Vec<Arc<ConsumerGroup>>,
    pub domain_actors: Vec<Recipient<ObserveDomain>>,
    pub outbox_relay: Option<Addr<OutboxRelay>>,
}

impl ActorTree {
    pub async fn observe(&self) -> ActorTreeState {
        let mut consumer_groups =
            join_all(self.consumer_groups.iter().map(|group| group.observe())).await;
        consumer_groups.sort_by(|left, right| left.group_id.cmp(&right.group_id));
        let mut domain_actors: Vec<DomainActorState> = join_all(
            self.domain_actors
                .iter()
                .map(|actor| actor.send(ObserveDomain)),
        )
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
        domain_actors.sort_by_key(|state| state.name);
        let outbox_relay = match &self.outbox_relay {
            Some(relay) => relay.send(ObserveRelay).await.ok(),
            None => None,
        };
        ActorTreeState {
            consumer_groups,
            domain_actors,
            outbox_relay,
        }
    }

    /// Topics some consumer group of this process consumes.
    pub fn consumed_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .consumer_groups
            .iter()
            .flat_map(|group| group.topics().iter().cloned())
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }
}
