//! The observable state of the whole actor tree, as served by `GET /admin/actors` and
//! snapshotted by tests. Collections are sorted, so equal states serialize equally.

use std::sync::Arc;

use actix::prelude::*;
use futures::future::join_all;
use serde::Serialize;

use crate::actors::consumer_group::{ConsumerGroup, ConsumerGroupState};
use crate::actors::domain::{DomainActorState, ObserveDomain};
use crate::delivery::scheduler::{ObserveScheduler, RetryScheduler, RetrySchedulerState};
use crate::outbox::relay::{ObserveRelay, OutboxRelay, OutboxRelayState};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActorTreeState {
    pub consumer_groups: Vec<ConsumerGroupState>,
    pub domain_actors: Vec<DomainActorState>,
    pub outbox_relay: Option<OutboxRelayState>,
    /// Present when deliveries to an external system are configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_scheduler: Option<RetrySchedulerState>,
}

/// Handles on every long-lived actor.
#[derive(Clone, Default)]
pub struct ActorTree {
    pub consumer_groups: Vec<Arc<ConsumerGroup>>,
    pub domain_actors: Vec<Recipient<ObserveDomain>>,
    pub outbox_relay: Option<Addr<OutboxRelay>>,
    pub retry_scheduler: Option<Addr<RetryScheduler>>,
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
        let retry_scheduler = match &self.retry_scheduler {
            Some(scheduler) => scheduler.send(ObserveScheduler).await.ok(),
            None => None,
        };
        ActorTreeState {
            consumer_groups,
            domain_actors,
            outbox_relay,
            retry_scheduler,
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
