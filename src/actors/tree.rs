//! The observable state of the whole actor tree, as served by `GET /admin/actors` and
//! snapshotted by tests. Collections are sorted, so equal states serialize equally.
//!
//! The runtime knows its own actors (consumer groups, partitions, domain actors); the
//! slices' background actors (the outbox relay, the retry scheduler) join the tree under a
//! name, each answering [`ObserveBackground`] with the JSON of its typed state.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use futures::future::join_all;
use serde::Serialize;

use crate::actors::consumer_group::{ConsumerGroup, ConsumerGroupState};
use crate::actors::domain::{DomainActorState, ObserveDomain};

/// Asks a background actor for its observable state, as JSON.
#[derive(Message)]
#[rtype(result = "serde_json::Value")]
pub struct ObserveBackground;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActorTreeState {
    pub consumer_groups: Vec<ConsumerGroupState>,
    pub domain_actors: Vec<DomainActorState>,
    /// By name: `outboxRelay`, `retryScheduler`, `pushSessions`.
    #[serde(flatten)]
    pub background: BTreeMap<&'static str, serde_json::Value>,
}

/// A view of shared state that is not an actor (the push sessions), by name.
pub type StateView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Handles on every long-lived actor.
#[derive(Clone, Default)]
pub struct ActorTree {
    pub consumer_groups: Vec<Arc<ConsumerGroup>>,
    pub domain_actors: Vec<Recipient<ObserveDomain>>,
    pub background: Vec<(&'static str, Recipient<ObserveBackground>)>,
    pub views: Vec<(&'static str, StateView)>,
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
        let mut background: BTreeMap<&'static str, serde_json::Value> =
            join_all(self.background.iter().map(|(name, actor)| async move {
                actor
                    .send(ObserveBackground)
                    .await
                    .ok()
                    .map(|state| (*name, state))
            }))
            .await
            .into_iter()
            .flatten()
            .collect();
        background.extend(self.views.iter().map(|(name, view)| (*name, view())));
        ActorTreeState {
            consumer_groups,
            domain_actors,
            background,
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
