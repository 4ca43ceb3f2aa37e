//! A consumer group: its librdkafka member ([`GroupMember`]) and the actor that manages
//! its partition actors ([`ConsumerGroupActor`]).
//!
//! The group's polling thread calls into the actor on every rebalance and waits for the
//! answer: on assignment the actor starts one [`PartitionActor`] per partition queue,
//! spread over the partition arbiters; on revocation it drains the affected partition
//! actors (within the drain deadline) and hands back their offsets, which the polling
//! thread commits before the partitions move to another member.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use serde::Serialize;
use tracing::{error, warn};

use crate::actors::ArbiterPool;
use crate::actors::domain::ProcessBatch;
use crate::actors::partition::{
    Drain, DrainReport, ObservePartition, PartitionActor, PartitionActorState, PartitionPolicy,
    PartitionWiring,
};
use crate::actors::progress::GroupProgress;
use crate::actors::retry::{OutagePolicy, RetryPolicy};
use crate::config::Settings;
use crate::event_log::EventLog;
use crate::kafka::TopicPartition;
use crate::kafka::consumer::{
    GroupHealth, GroupMember, OffsetCommitter, PartitionRecords, RebalanceListener, consumer_config,
};
use crate::kafka::consumer::{LocalPositions, UncommittedStart};
use crate::kafka::dead_letter::DeadLetters;
use crate::kafka::producer::EventPublisher;
use crate::observability::outages::Outages;

/// Partitions were assigned; start their actors.
#[derive(Message)]
#[rtype(result = "()")]
struct PartitionsAssigned {
    partitions: Vec<(TopicPartition, PartitionRecords)>,
    offsets: OffsetCommitter,
}

/// Partitions are being revoked; drain their actors and report the offsets to commit.
#[derive(Message)]
#[rtype(result = "Vec<(TopicPartition, i64)>")]
struct PartitionsRevoking {
    partitions: Vec<TopicPartition>,
}

/// Asks for the observable state of the group's partition actors.
#[derive(Message)]
#[rtype(result = "Vec<PartitionActorState>")]
struct ObservePartitions;

/// The group has left Kafka; stop the actor.
#[derive(Message)]
#[rtype(result = "()")]
struct StopGroup;

/// Manages the partition actors of one consumer group.
pub struct ConsumerGroupActor {
    group_id: String,
    /// The domain actor that owns each consumed topic.
    routes: BTreeMap<String, Recipient<ProcessBatch>>,
    policy: PartitionPolicy,
    drain_timeout: Duration,
    arbiters: Arc<ArbiterPool>,
    partitions: BTreeMap<TopicPartition, Addr<PartitionActor>>,
    progress: GroupProgress,
}

impl Actor for ConsumerGroupActor {
    type Context = Context<Self>;
}

impl Handler<PartitionsAssigned> for ConsumerGroupActor {
    type Result = ();

    fn handle(&mut self, message: PartitionsAssigned, _ctx: &mut Self::Context) {
        for (source, records) in message.partitions {
            let Some(domain) = self.routes.get(&source.topic).cloned() else {
                error!(group = %self.group_id, %source, "assigned a partition of a topic without a domain actor");
                continue;
            };
            let wiring = PartitionWiring {
                domain,
                policy: self.policy.clone(),
                group_id: self.group_id.as_str().into(),
                progress: self.progress.assigned(&source),
            };
            let offsets = message.offsets.clone();
            let actor_source = source.clone();
            let address = PartitionActor::start_in_arbiter(&self.arbiters.next(), move |_| {
                PartitionActor::new(actor_source, records, offsets, wiring)
            });
            if let Some(previous) = self.partitions.insert(source.clone(), address) {
                // Never expected: a partition is revoked (and its actor drained) before it
                // can be assigned again.
                warn!(group = %self.group_id, %source, "partition assigned twice; draining the older actor");
                previous.do_send(Drain);
            }
        }
    }
}

impl Handler<PartitionsRevoking> for ConsumerGroupActor {
    type Result = ResponseFuture<Vec<(TopicPartition, i64)>>;

    fn handle(&mut self, message: PartitionsRevoking, _ctx: &mut Self::Context) -> Self::Result {
        let draining: Vec<_> = message
            .partitions
            .iter()
            .filter_map(|partition| {
                self.progress.revoked(partition);
                self.partitions
                    .remove(partition)
                    .map(|actor| (partition.clone(), actor))
            })
            .collect();
        let deadline = self.drain_timeout;
        let group_id = self.group_id.clone();
        Box::pin(async move {
            let reports = join_all(draining.into_iter().map(|(source, actor)| {
                let group_id = group_id.clone();
                async move {
                    match tokio::time::timeout(deadline, actor.send(Drain)).await {
                        Ok(Ok(DrainReport { next_offset, .. })) => next_offset.map(|offset| (source, offset)),
                        Ok(Err(error)) => {
                            warn!(group = %group_id, %source, %error, "partition actor gone before draining");
                            None
                        }
                        Err(_) => {
                            warn!(group = %group_id, %source, ?deadline, "partition did not drain in time; its last batch will be redelivered");
                            None
                        }
                    }
                }
            }))
            .await;
            reports.into_iter().flatten().collect()
        })
    }
}

impl Handler<ObservePartitions> for ConsumerGroupActor {
    type Result = ResponseFuture<Vec<PartitionActorState>>;

    fn handle(&mut self, _: ObservePartitions, _ctx: &mut Self::Context) -> Self::Result {
        let actors: Vec<_> = self.partitions.values().cloned().collect();
        Box::pin(async move {
            let states = join_all(actors.iter().map(|actor| actor.send(ObservePartition))).await;
            // Already sorted: the map is ordered by topic and partition.
            states.into_iter().filter_map(Result::ok).collect()
        })
    }
}

impl Handler<StopGroup> for ConsumerGroupActor {
    type Result = ();

    fn handle(&mut self, _: StopGroup, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Bridges the group's polling thread to its actor.
struct GroupListener {
    actor: Addr<ConsumerGroupActor>,
    group_id: String,
}

impl RebalanceListener for GroupListener {
    fn assigned(
        &self,
        partitions: Vec<(TopicPartition, PartitionRecords)>,
        offsets: OffsetCommitter,
    ) {
        let sent = futures::executor::block_on(self.actor.send(PartitionsAssigned {
            partitions,
            offsets,
        }));
        if let Err(error) = sent {
            error!(group = %self.group_id, %error, "consumer group actor unavailable on assignment");
        }
    }

    fn revoking(&self, partitions: Vec<TopicPartition>) -> Vec<(TopicPartition, i64)> {
        futures::executor::block_on(self.actor.send(PartitionsRevoking { partitions })).unwrap_or_else(|error| {
            error!(group = %self.group_id, %error, "consumer group actor unavailable on revocation");
            Vec::new()
        })
    }
}

/// What it takes to run a consumer group.
pub struct ConsumerGroupSpec {
    /// The full group id (prefix included).
    pub group_id: String,
    /// Consumed topics and the domain actor that owns each.
    pub routes: BTreeMap<String, Recipient<ProcessBatch>>,
    pub client_config: ClientConfig,
    /// How its partitions retry, dead-letter and batch.
    pub partitions: PartitionPolicy,
    pub drain_timeout: Duration,
    /// Where partitions without a committed offset start.
    pub uncommitted_start: UncommittedStart,
}

impl ConsumerGroupSpec {
    /// A group named `group` (the configured prefix is added) consuming `routes`, with
    /// the configured consumer, retry and drain settings, reporting outages to `outages`.
    pub fn from_settings(
        settings: &Settings,
        bootstrap_servers: &str,
        group: &str,
        routes: BTreeMap<String, Recipient<ProcessBatch>>,
        publisher: EventPublisher,
        event_log: EventLog,
        outages: Outages,
    ) -> Self {
        let group_id = settings.kafka.group_id(group);
        let consumer = &settings.kafka.consumer;
        let mut client_config = consumer_config(bootstrap_servers, &settings.kafka, &group_id);
        if consumer.static_membership && !consumer.extra.contains_key("group.instance.id") {
            client_config.set("group.instance.id", &settings.instance.id);
        }
        Self {
            client_config,
            partitions: PartitionPolicy {
                dead_letters: DeadLetters::new(publisher, event_log, group_id.clone()),
                retry: RetryPolicy::from_settings(&settings.retry),
                outage: OutagePolicy::from_settings(&settings.retry),
                outages,
                max_batch_records: consumer.max_batch_records,
                max_record_bytes: consumer.max_record_bytes,
                commit_interval: consumer.commit_interval(),
                on_assigned: None,
            },
            group_id,
            routes,
            drain_timeout: consumer.drain_timeout(),
            uncommitted_start: UncommittedStart::Configured,
        }
    }
}

/// The observable state of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupState {
    pub group_id: String,
    pub topics: Vec<String>,
    /// Whether the group has been given an assignment.
    pub joined: bool,
    /// Fetching stopped by an operator.
    pub paused: bool,
    pub commits_failed: u64,
    /// Records that arrived on the group queue instead of their partition's; each partition
    /// was sought back to them.
    pub records_on_group_queue: u64,
    /// Partitions split off after their assignment, because their records arrived on the
    /// group queue.
    pub late_splits: u64,
    /// Times a partition's queue could not be split even then.
    pub unsplittable: u64,
    pub partitions: Vec<PartitionActorState>,
}

/// A running consumer group.
pub struct ConsumerGroup {
    group_id: String,
    topics: Vec<String>,
    actor: Addr<ConsumerGroupActor>,
    health: Arc<GroupHealth>,
    progress: GroupProgress,
    starts_at_end: bool,
    positions: LocalPositions,
    consumer: std::sync::Mutex<Option<GroupMember>>,
}

impl ConsumerGroup {
    /// Starts the group's actor (on the current arbiter) and its member.
    pub fn start(spec: ConsumerGroupSpec, arbiters: Arc<ArbiterPool>) -> Result<Self, KafkaError> {
        let topics: Vec<String> = spec.routes.keys().cloned().collect();
        let progress = GroupProgress::default();
        let actor = ConsumerGroupActor {
            group_id: spec.group_id.clone(),
            routes: spec.routes,
            policy: spec.partitions,
            drain_timeout: spec.drain_timeout,
            arbiters,
            partitions: BTreeMap::new(),
            progress: progress.clone(),
        }
        .start();
        let listener = Arc::new(GroupListener {
            actor: actor.clone(),
            group_id: spec.group_id.clone(),
        });
        let topic_names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let consumer = GroupMember::start(
            &spec.client_config,
            &spec.group_id,
            &topic_names,
            spec.uncommitted_start,
            listener,
        )?;
        Ok(Self {
            group_id: spec.group_id,
            topics,
            actor,
            health: consumer.health(),
            progress,
            starts_at_end: spec.uncommitted_start == UncommittedStart::End,
            positions: consumer.local_positions(),
            consumer: std::sync::Mutex::new(Some(consumer)),
        })
    }

    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    pub fn health(&self) -> &GroupHealth {
        &self.health
    }

    /// Where this instance's partition actors of the group stand.
    pub fn progress(&self) -> &GroupProgress {
        &self.progress
    }

    /// Whether a partition without a committed offset starts at its end.
    pub fn starts_at_end(&self) -> bool {
        self.starts_at_end
    }

    /// For a group that keeps no offsets (it starts at the end): the next offset of each
    /// partition of `topic` as this member stands, from where it started; `None` for a group
    /// that commits (its committed offsets say it).
    pub fn local_positions(&self, topic: &str) -> Option<BTreeMap<i32, i64>> {
        if !self.starts_at_end {
            return None;
        }
        let positions = self.positions.lock().expect("positions lock");
        Some(
            positions
                .iter()
                .filter(|(partition, _)| partition.topic == topic)
                .map(|(partition, next)| (partition.partition, *next))
                .collect(),
        )
    }

    pub async fn observe(&self) -> ConsumerGroupState {
        let partitions = self.actor.send(ObservePartitions).await.unwrap_or_default();
        ConsumerGroupState {
            group_id: self.group_id.clone(),
            topics: self.topics.clone(),
            joined: self.health.joined(),
            paused: self.health.paused(),
            commits_failed: self.health.commits_failed(),
            records_on_group_queue: self.health.records_on_group_queue(),
            late_splits: self.health.late_splits(),
            unsplittable: self.health.unsplittable(),
            partitions,
        }
    }

    /// Stops or resumes fetching (the partitions stay assigned; what was fetched is still
    /// processed); returns once the polling thread applied it, or `false` after `timeout`.
    pub async fn set_paused(&self, paused: bool, timeout: Duration) -> bool {
        match self
            .consumer
            .lock()
            .expect("consumer lock poisoned")
            .as_ref()
        {
            Some(consumer) => consumer.set_paused(paused),
            None => return false,
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.health.pause_in_effect() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Leaves the group: every partition is drained and its offset committed. Safe to call
    /// more than once.
    pub async fn shutdown(&self) {
        let consumer = self.consumer.lock().expect("consumer lock poisoned").take();
        if let Some(consumer) = consumer {
            let closing = tokio::task::spawn_blocking(move || consumer.shutdown_blocking());
            if let Err(error) = closing.await {
                error!(group = %self.group_id, %error, "closing the consumer failed");
            }
            let _ = self.actor.send(StopGroup).await;
        }
    }
}
