//! Consumer groups at the librdkafka level.
//!
//! One [`GroupMember`] per consumer group owns a `BaseConsumer` and a dedicated thread
//! that keeps polling its main queue: group membership, heartbeats' results, rebalance and
//! commit callbacks are only served while that queue is polled (rust-rdkafka issue 738).
//!
//! When partitions are assigned, the rebalance callback (on that thread) splits each
//! partition off into its own queue, then assigns them, and hands the queues to a
//! [`RebalanceListener`] (the consumer-group actor), which starts one partition actor per
//! queue. Splitting there is deliberate: splitting before `subscribe` made group joins stall
//! for many seconds on the mock cluster. Splitting before the assignment is too: an
//! application-level split is never undone by librdkafka's own fetch start, whereas a split
//! after it races the partition's first fetch, whose records would land on the group queue
//! (they did, under load: the first record of a partition handed back in a rolling restart
//! was skipped there, and its user's later requests were decided before it).
//!
//! A record that still lands on the group queue (a partition whose queue could not be split
//! at its assignment) is never dropped: the polling thread splits its partition then, hands
//! the queue over, and seeks the partition back to the first such record, so the partition
//! actor reads it in offset order (see [`GroupContext::rescue`]).
//!
//! When partitions are revoked (a rebalance, or closing the consumer on shutdown) the
//! callback asks the listener to drain them and commits the offsets it reports,
//! synchronously, before librdkafka hands the partitions to another member. The thread is
//! not an actix arbiter, so blocking here stalls nothing else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::config::{GroupProtocol, KafkaSettings};
use crate::events::{DecodeError, EventEnvelope};
use crate::kafka::{TopicPartition, client_config};

/// Routes librdkafka's own log lines and errors into `tracing`.
pub struct TracingContext {
    client: &'static str,
}

impl TracingContext {
    pub fn new(client: &'static str) -> Self {
        Self { client }
    }
}

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(self.client, level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(client = self.client, %error, reason, "librdkafka error");
    }
}

/// A consumer that never joins its group (it reads the group's offsets) needs nothing
/// beyond the defaults.
impl ConsumerContext for TracingContext {}

fn log_librdkafka(client: &str, level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => error!(client, facility, message, "librdkafka"),
        RDKafkaLogLevel::Warning => warn!(client, facility, message, "librdkafka"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            info!(client, facility, message, "librdkafka")
        }
        RDKafkaLogLevel::Debug => debug!(client, facility, message, "librdkafka"),
    }
}

/// What a consumer group does when librdkafka changes its assignment. Both methods run on
/// the group's polling thread and may block.
pub trait RebalanceListener: Send + Sync + 'static {
    /// Newly assigned partitions, each with its own queue, and the handle that stores and
    /// commits their offsets.
    fn assigned(
        &self,
        partitions: Vec<(TopicPartition, PartitionRecords)>,
        offsets: OffsetCommitter,
    );

    /// Partitions about to be taken away: stop them, let in-flight work finish within the
    /// drain deadline, and return the next offset to commit for each one that made
    /// progress.
    fn revoking(&self, partitions: Vec<TopicPartition>) -> Vec<(TopicPartition, i64)>;
}

/// Counters of one group's client, shared with readiness and the admin view.
#[derive(Debug, Default)]
pub struct GroupHealth {
    assignments: AtomicU64,
    commits_failed: AtomicU64,
    records_on_main_queue: AtomicU64,
    /// Partitions split off after their assignment, their records on the group queue.
    late_splits: AtomicU64,
    /// Partitions whose queue could not be split even then.
    unsplittable: AtomicU64,
    /// Whether fetching is meant to be paused (an operator's request).
    paused: AtomicBool,
    /// Whether the polling thread has applied `paused` to the assignment.
    pause_applied: AtomicBool,
}

impl GroupHealth {
    /// Whether the group has been given an assignment (possibly empty, when there are more
    /// members than partitions).
    pub fn joined(&self) -> bool {
        self.assignments.load(Ordering::Acquire) > 0
    }

    pub fn commits_failed(&self) -> u64 {
        self.commits_failed.load(Ordering::Relaxed)
    }

    pub fn records_on_group_queue(&self) -> u64 {
        self.records_on_main_queue.load(Ordering::Relaxed)
    }

    pub fn late_splits(&self) -> u64 {
        self.late_splits.load(Ordering::Relaxed)
    }

    pub fn unsplittable(&self) -> u64 {
        self.unsplittable.load(Ordering::Relaxed)
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Whether the requested pause (or resume) is in effect.
    pub fn pause_in_effect(&self) -> bool {
        self.pause_applied.load(Ordering::Acquire) == self.paused()
    }
}

/// The librdkafka context of a group consumer.
pub struct GroupContext {
    group_id: String,
    consumer: OnceLock<Weak<BaseConsumer<GroupContext>>>,
    listener: Arc<dyn RebalanceListener>,
    health: Arc<GroupHealth>,
    uncommitted_start: UncommittedStart,
    /// For a group that keeps no offsets: the next offset of each partition this process
    /// has processed, so a partition handed back after a rebalance goes on from there.
    positions: LocalPositions,
    /// The assigned partitions whose queue is split off (each has a partition actor).
    split: std::sync::Mutex<std::collections::HashSet<TopicPartition>>,
}

/// For a group that keeps no offsets (see [`UncommittedStart::End`]): the next offset of
/// each partition, as far as this process is concerned. A partition enters at the end it
/// started from (everything before was not this member's to read) and moves with every
/// processed record. It is what the reconciler reads instead of committed offsets.
pub type LocalPositions = Arc<std::sync::Mutex<std::collections::HashMap<TopicPartition, i64>>>;

/// Where a partition with no committed offset starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UncommittedStart {
    /// As `auto.offset.reset` says (earliest, by default).
    #[default]
    Configured,
    /// At the end, fixed in the assignment itself, and no offset is ever committed: a group
    /// that only serves live sessions (one instance's own group) starts here when its
    /// process starts and leaves nothing behind when its instance goes away for good. Within
    /// the process a partition assigned again goes on from where it was processed to.
    /// `auto.offset.reset=latest` would resolve the end only after the group reports itself
    /// joined, and records produced in between would be skipped.
    End,
}

impl UncommittedStart {
    /// Whether the group commits its offsets.
    pub fn keeps_offsets(self) -> bool {
        self == UncommittedStart::Configured
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(&self.group_id, level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(group = %self.group_id, %error, reason, "librdkafka consumer error");
    }
}

impl GroupContext {
    /// Sets, in `assignment`, the end offset of each partition that has no committed
    /// offset. Blocks (broker requests); runs on the polling thread.
    fn start_uncommitted_at_end(
        &self,
        consumer: &BaseConsumer<Self>,
        assignment: &mut TopicPartitionList,
    ) {
        const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
        if !self.uncommitted_start.keeps_offsets() {
            // Read under the lock, which partition actors take on their arbiters; the
            // watermark requests below block, so they run without it.
            let known: Vec<(String, i32, Option<i64>)> = {
                let positions = self.positions.lock().expect("positions lock");
                assignment
                    .elements()
                    .iter()
                    .map(|element| {
                        let partition = TopicPartition::new(element.topic(), element.partition());
                        let next = positions.get(&partition).copied();
                        (partition.topic, partition.partition, next)
                    })
                    .collect()
            };
            for (topic, partition, known) in known {
                let topic = topic.as_str();
                let positioned = match known {
                    Some(next) => {
                        assignment.set_partition_offset(topic, partition, Offset::Offset(next))
                    }
                    None => consumer
                        .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                        .and_then(|(_, high)| {
                            // Where it starts is where it stands: what came before is not
                            // this member's to read.
                            self.positions
                                .lock()
                                .expect("positions lock")
                                .entry(TopicPartition::new(topic, partition))
                                .or_insert(high);
                            assignment.set_partition_offset(topic, partition, Offset::Offset(high))
                        }),
                };
                if let Err(error) = positioned {
                    warn!(group = %self.group_id, topic, partition, %error, "cannot start at the end; starting as configured");
                }
            }
            return;
        }
        let committed = match consumer.committed_offsets(assignment.clone(), REQUEST_TIMEOUT) {
            Ok(committed) => committed,
            Err(error) => {
                warn!(group = %self.group_id, %error, "cannot read committed offsets; starting as configured");
                return;
            }
        };
        for element in committed.elements() {
            if element.offset() != Offset::Invalid {
                continue;
            }
            let (topic, partition) = (element.topic(), element.partition());
            let positioned = consumer
                .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                .and_then(|(_, high)| {
                    assignment.set_partition_offset(topic, partition, Offset::Offset(high))
                });
            if let Err(error) = positioned {
                warn!(group = %self.group_id, topic, partition, %error, "cannot start at the end; starting as configured");
            }
        }
    }

    /// Splits each partition of `list` off into its own queue. Done before the partitions
    /// are assigned: librdkafka's fetch start leaves a queue the application forwarded
    /// alone, so every record of the assignment reaches its partition's queue.
    fn split_queues(&self, list: &TopicPartitionList) -> Vec<(TopicPartition, PartitionRecords)> {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            error!(group = %self.group_id, "assignment after the consumer was dropped");
            return Vec::new();
        };
        partitions_of(list)
            .into_iter()
            .filter_map(|partition| {
                let queue = consumer.split_partition_queue(&partition.topic, partition.partition);
                if queue.is_none() {
                    // Its records land on the group queue, where `rescue` splits it later.
                    warn!(group = %self.group_id, %partition, "cannot split partition queue at assignment");
                    return None;
                }
                self.split.lock().expect("split lock").insert(partition.clone());
                queue.map(|queue| (partition, PartitionRecords::new(queue)))
            })
            .collect()
    }

    /// Records that arrived on the group queue instead of their partition's (`first`, and
    /// whatever else is waiting there): for each partition still assigned, splits its queue
    /// off now if it was not, hands the queue to the listener, and seeks the partition back
    /// to the first such record, so that its partition actor reads it, and what follows, in
    /// offset order (a seek also discards what was fetched after it). A partition whose
    /// queue still cannot be split is counted and logged; the reconciler brings back what
    /// its records carried.
    fn rescue(&self, consumer: &BaseConsumer<Self>, first: (TopicPartition, i64)) {
        let mut earliest = std::collections::BTreeMap::from([(first.0, first.1)]);
        while let Some(Ok(message)) = consumer.poll(Duration::ZERO) {
            let partition = TopicPartition::new(message.topic(), message.partition());
            self.health
                .records_on_main_queue
                .fetch_add(1, Ordering::Relaxed);
            let offset = earliest.entry(partition).or_insert(message.offset());
            *offset = (*offset).min(message.offset());
        }
        let assigned = consumer
            .assignment()
            .map(|list| partitions_of(&list))
            .unwrap_or_default();
        for (partition, offset) in earliest {
            if !assigned.contains(&partition) {
                continue;
            }
            let was_split = self.split.lock().expect("split lock").contains(&partition);
            let mut late = None;
            if !was_split {
                let Some(owner) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let Some(queue) =
                    owner.split_partition_queue(&partition.topic, partition.partition)
                else {
                    self.health.unsplittable.fetch_add(1, Ordering::Relaxed);
                    error!(group = %self.group_id, %partition, offset, "cannot split partition queue; its records stay on the group queue");
                    continue;
                };
                self.split
                    .lock()
                    .expect("split lock")
                    .insert(partition.clone());
                self.health.late_splits.fetch_add(1, Ordering::Relaxed);
                late = Some((queue, owner));
            }
            // Sought back before its queue is handed over: what was fetched after the first
            // record and already reached the new queue is discarded by the seek, never read
            // ahead of the records before it.
            match consumer.seek(
                &partition.topic,
                partition.partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            ) {
                Ok(()) => {
                    warn!(group = %self.group_id, %partition, offset, split_now = !was_split, "records arrived on the group queue; partition sought back to the first")
                }
                Err(error) => {
                    error!(group = %self.group_id, %partition, offset, %error, "cannot seek back to a record that arrived on the group queue")
                }
            }
            if let Some((queue, owner)) = late {
                self.listener.assigned(
                    vec![(partition.clone(), PartitionRecords::new(queue))],
                    OffsetCommitter { consumer: owner },
                );
            }
        }
    }

    /// Gives the newly assigned partitions' queues to the listener (paused first when the
    /// group is paused).
    fn hand_over(
        &self,
        consumer: &BaseConsumer<Self>,
        list: &TopicPartitionList,
        queues: Vec<(TopicPartition, PartitionRecords)>,
    ) {
        info!(group = %self.group_id, partitions = %names(&partitions_of(list)), "partitions assigned");
        let Some(owner) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        if self.health.paused()
            && let Err(error) = consumer.pause(list)
        {
            warn!(group = %self.group_id, %error, "cannot keep newly assigned partitions paused");
        }
        self.listener
            .assigned(queues, OffsetCommitter { consumer: owner });
        self.health.assignments.fetch_add(1, Ordering::AcqRel);
    }
}

impl ConsumerContext for GroupContext {
    /// librdkafka's default (assign or unassign, eager or cooperative) with the start of
    /// uncommitted partitions fixed first when the group asks for it.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let applied = match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if self.uncommitted_start == UncommittedStart::End {
                    self.start_uncommitted_at_end(consumer, list);
                }
                // Split before assigning: once assigned, a partition's first fetch may
                // complete at any moment, and what it brings before the split would land on
                // the group queue (where `rescue` has to bring it back).
                let queues = if split_at_assignment(&self.group_id) {
                    self.split_queues(list)
                } else {
                    Vec::new()
                };
                let assigned = if cooperative {
                    consumer.incremental_assign(list)
                } else {
                    consumer.assign(list)
                };
                self.hand_over(consumer, list, queues);
                assigned
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(list));
                let mut split = self.split.lock().expect("split lock");
                for partition in partitions_of(list) {
                    split.remove(&partition);
                }
                drop(split);
                let unassigned = if cooperative {
                    consumer.incremental_unassign(list)
                } else {
                    consumer.unassign()
                };
                self.post_rebalance(consumer, &Rebalance::Revoke(list));
                unassigned
            }
            other => {
                let error = KafkaError::Rebalance(other.into());
                self.post_rebalance(consumer, &Rebalance::Error(error.clone()));
                Err(error)
            }
        };
        if let Err(error) = applied {
            warn!(group = %self.group_id, %error, "applying the rebalance failed");
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions = partitions_of(list);
        info!(group = %self.group_id, partitions = %names(&partitions), "partitions revoked: draining");
        let offsets = self.listener.revoking(partitions);
        if !self.uncommitted_start.keeps_offsets() {
            let mut positions = self.positions.lock().expect("positions lock");
            positions.extend(offsets.iter().cloned());
        }
        if offsets.is_empty()
            || consumer.assignment_lost()
            || !self.uncommitted_start.keeps_offsets()
        {
            return;
        }
        let mut commit = TopicPartitionList::new();
        for (partition, next_offset) in &offsets {
            if let Err(error) = commit.add_partition_offset(
                &partition.topic,
                partition.partition,
                Offset::Offset(*next_offset),
            ) {
                warn!(group = %self.group_id, %partition, %error, "cannot list offset to commit");
            }
        }
        match consumer.commit(&commit, CommitMode::Sync) {
            Ok(()) => {
                info!(group = %self.group_id, offsets = ?offsets, "offsets committed on revoke")
            }
            Err(error) => {
                self.health.commits_failed.fetch_add(1, Ordering::Relaxed);
                warn!(group = %self.group_id, %error, "commit on revoke failed; the next owner may see records again");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Error(error) = rebalance {
            warn!(group = %self.group_id, %error, "rebalance error");
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(error) = result {
            self.health.commits_failed.fetch_add(1, Ordering::Relaxed);
            warn!(group = %self.group_id, %error, offsets = ?partitions_of(offsets), "offset commit failed");
        }
    }
}

/// `topic[0], topic[1]`, for the log (the fault drills read it).
fn names(partitions: &[TopicPartition]) -> String {
    partitions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    let mut partitions: Vec<_> = list
        .elements()
        .iter()
        .map(|element| TopicPartition::new(element.topic(), element.partition()))
        .collect();
    partitions.sort();
    partitions
}

/// The librdkafka settings of a group consumer, from the design document's values. With
/// the `consumer` group protocol (KIP-848) the session timeout, heartbeat interval and
/// assignment belong to the broker, and librdkafka refuses them on the client.
pub fn consumer_config(
    bootstrap_servers: &str,
    settings: &KafkaSettings,
    group_id: &str,
) -> ClientConfig {
    let consumer = &settings.consumer;
    let mut properties = vec![
        ("bootstrap.servers", bootstrap_servers.to_string()),
        ("group.id", group_id.to_string()),
        ("client.id", settings.client_id.clone()),
        ("enable.auto.commit", "false".into()),
        ("enable.auto.offset.store", "false".into()),
        ("enable.partition.eof", "false".into()),
        ("auto.offset.reset", consumer.auto_offset_reset.clone()),
        ("fetch.min.bytes", consumer.fetch_min_bytes.to_string()),
        (
            "fetch.wait.max.ms",
            settings.fetch_wait_max_ms().to_string(),
        ),
        ("group.protocol", consumer.group_protocol.as_str().into()),
    ];
    if consumer.group_protocol == GroupProtocol::Classic {
        properties.extend([
            (
                "session.timeout.ms",
                consumer.session_timeout_ms.to_string(),
            ),
            (
                "heartbeat.interval.ms",
                consumer.heartbeat_interval_ms.to_string(),
            ),
            (
                "partition.assignment.strategy",
                consumer.assignment.strategy().into(),
            ),
        ]);
    }
    client_config(properties, &consumer.extra)
}

/// A running consumer group member and its polling thread.
pub struct GroupMember {
    group_id: String,
    health: Arc<GroupHealth>,
    positions: LocalPositions,
    stop: Arc<AtomicBool>,
    poller: Option<JoinHandle<()>>,
}

impl GroupMember {
    /// Creates the consumer, subscribes and starts polling.
    pub fn start(
        config: &ClientConfig,
        group_id: &str,
        topics: &[&str],
        uncommitted_start: UncommittedStart,
        listener: Arc<dyn RebalanceListener>,
    ) -> Result<Self, KafkaError> {
        let health = Arc::new(GroupHealth::default());
        let positions = LocalPositions::default();
        let context = GroupContext {
            group_id: group_id.to_string(),
            consumer: OnceLock::new(),
            listener,
            health: health.clone(),
            uncommitted_start,
            positions: positions.clone(),
            split: Default::default(),
        };
        let consumer: Arc<BaseConsumer<GroupContext>> =
            Arc::new(config.create_with_context(context)?);
        consumer
            .context()
            .consumer
            .set(Arc::downgrade(&consumer))
            .expect("the consumer handle is set once, right after creation");
        consumer.subscribe(topics)?;

        let stop = Arc::new(AtomicBool::new(false));
        let poller = std::thread::Builder::new()
            .name(format!("kafka-{group_id}"))
            .spawn({
                let stop = stop.clone();
                let health = health.clone();
                let group_id = group_id.to_string();
                move || poll_until_stopped(&group_id, consumer, &stop, &health)
            })
            .map_err(|error| {
                KafkaError::ClientCreation(format!("cannot start poller thread: {error}"))
            })?;
        Ok(Self {
            group_id: group_id.to_string(),
            health,
            positions,
            stop,
            poller: Some(poller),
        })
    }

    pub fn health(&self) -> Arc<GroupHealth> {
        self.health.clone()
    }

    /// The member's own positions (meaningful for a group that keeps no offsets).
    pub fn local_positions(&self) -> LocalPositions {
        self.positions.clone()
    }

    /// Stops (`true`) or resumes (`false`) fetching for every assigned partition, and for
    /// partitions assigned later; the polling thread applies it within one poll
    /// ([`GroupHealth::pause_in_effect`]). Records already fetched are still processed.
    pub fn set_paused(&self, paused: bool) {
        self.health.paused.store(paused, Ordering::Release);
    }

    /// Leaves the group: the consumer is closed on its own thread, which revokes (drains and
    /// commits) every assigned partition through the listener. Blocks until done.
    pub fn shutdown_blocking(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(poller) = self.poller.take()
            && poller.join().is_err()
        {
            error!(group = %self.group_id, "consumer poller thread panicked");
        }
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Whether partitions are split off at their assignment: always, but for the groups a test
/// made split late ([`split_late`]).
fn split_at_assignment(group_id: &str) -> bool {
    #[cfg(feature = "test-util")]
    if SPLIT_LATE
        .lock()
        .expect("split-late lock")
        .iter()
        .any(|prefix| group_id.starts_with(prefix.as_str()))
    {
        return false;
    }
    let _ = group_id;
    true
}

#[cfg(feature = "test-util")]
static SPLIT_LATE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Test hook: the groups whose id starts with `group_prefix` no longer split their
/// partitions' queues at assignment, so their first records land on the group queue.
#[cfg(feature = "test-util")]
pub fn split_late(group_prefix: &str) {
    SPLIT_LATE
        .lock()
        .expect("split-late lock")
        .push(group_prefix.to_string());
}

fn poll_until_stopped(
    group_id: &str,
    consumer: Arc<BaseConsumer<GroupContext>>,
    stop: &AtomicBool,
    health: &GroupHealth,
) {
    let mut pause_applied = false;
    while !stop.load(Ordering::Acquire) {
        let pause_wanted = health.paused();
        if pause_wanted != pause_applied {
            apply_pause(group_id, &consumer, pause_wanted);
            pause_applied = pause_wanted;
            health.pause_applied.store(pause_applied, Ordering::Release);
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                // Every assigned partition is split off in the assignment callback, before
                // its first fetch can complete, so this is not expected to happen. Should it,
                // it is counted (`recordsOnGroupQueue` in the admin view) and the partition
                // is sought back to it, never processed out of order here nor skipped.
                health.records_on_main_queue.fetch_add(1, Ordering::Relaxed);
                let first = (
                    TopicPartition::new(message.topic(), message.partition()),
                    message.offset(),
                );
                drop(message);
                consumer.context().rescue(&consumer, first);
            }
            Some(Err(error)) => warn!(group = group_id, %error, "consumer error"),
        }
    }
    info!(group = group_id, "leaving consumer group");
    // Unsubscribing revokes the assignment through the rebalance callback (drain, commit)
    // on this thread; the partition actors then stop and release their queues.
    consumer.unsubscribe();
    let deadline = Instant::now() + REVOKE_TIMEOUT;
    while Instant::now() < deadline
        && (Arc::strong_count(&consumer) > 1
            || consumer
                .assignment()
                .is_ok_and(|assignment| assignment.count() > 0))
    {
        consumer.poll(Duration::from_millis(20));
    }
    if Arc::strong_count(&consumer) > 1 {
        warn!(
            group = group_id,
            "partition queues still held after revoke; closing anyway"
        );
    }
    // Dropping the last handle closes the consumer and leaves the group; it blocks, which is
    // why it happens here and not on an arbiter.
    drop(consumer);
    info!(group = group_id, "consumer closed");
}

fn apply_pause(group_id: &str, consumer: &BaseConsumer<GroupContext>, paused: bool) {
    let applied = consumer.assignment().and_then(|assignment| {
        if paused {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        }
    });
    match applied {
        Ok(()) => info!(group = group_id, paused, "consumer group fetching changed"),
        Err(error) => {
            warn!(group = group_id, paused, %error, "cannot change consumer group fetching")
        }
    }
}

/// How long leaving the group may wait for the revoke to complete.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(8);

/// Stores and commits the offsets of one group's partitions.
#[derive(Clone)]
pub struct OffsetCommitter {
    consumer: Arc<BaseConsumer<GroupContext>>,
}

impl OffsetCommitter {
    fn keeps_offsets(&self) -> bool {
        self.consumer.context().uncommitted_start.keeps_offsets()
    }

    /// Records that everything before `next_offset` is processed (local, cheap). A
    /// rebalance or shutdown commits stored offsets; [`OffsetCommitter::commit`] does it
    /// sooner.
    pub fn store(&self, partition: &TopicPartition, next_offset: i64) -> Result<(), KafkaError> {
        if !self.keeps_offsets() {
            let context = self.consumer.context();
            let mut positions = context.positions.lock().expect("positions lock");
            positions.insert(partition.clone(), next_offset);
            return Ok(());
        }
        self.consumer
            .store_offsets(&offset_list(partition, next_offset)?)
    }

    /// Stops fetching `partition` (a local operation; never blocks): its partition actor
    /// waits for a dependency and should not pile up records meanwhile.
    pub fn pause_fetching(&self, partition: &TopicPartition) -> Result<(), KafkaError> {
        self.consumer.pause(&partition_list(partition)?)
    }

    /// Fetches `partition` again, unless an operator paused the whole group.
    pub fn resume_fetching(&self, partition: &TopicPartition) -> Result<(), KafkaError> {
        if self.consumer.context().health.paused() {
            return Ok(());
        }
        self.consumer.resume(&partition_list(partition)?)
    }

    /// Commits `next_offset` asynchronously: never blocks; failures are reported by the
    /// commit callback.
    pub fn commit(&self, partition: &TopicPartition, next_offset: i64) -> Result<(), KafkaError> {
        if !self.keeps_offsets() {
            return Ok(());
        }
        self.consumer
            .commit(&offset_list(partition, next_offset)?, CommitMode::Async)
    }
}

fn partition_list(partition: &TopicPartition) -> Result<TopicPartitionList, KafkaError> {
    let mut list = TopicPartitionList::with_capacity(1);
    list.add_partition(&partition.topic, partition.partition);
    Ok(list)
}

fn offset_list(
    partition: &TopicPartition,
    next_offset: i64,
) -> Result<TopicPartitionList, KafkaError> {
    let mut list = TopicPartitionList::with_capacity(1);
    list.add_partition_offset(
        &partition.topic,
        partition.partition,
        Offset::Offset(next_offset),
    )?;
    Ok(list)
}

/// A consumed record, decoded or not.
#[derive(Debug)]
pub struct ConsumedRecord {
    pub offset: i64,
    /// When the record was written (its Kafka timestamp), in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The W3C trace context it was produced in (its `traceparent` header).
    pub traceparent: Option<String>,
    pub decoded: Result<EventEnvelope, Undecodable>,
}

/// A record that is not an event: its original bytes, kept for the dead-letter topic.
#[derive(Debug)]
pub struct Undecodable {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub error: DecodeError,
}

impl ConsumedRecord {
    fn decode<M: Message>(message: &M, max_record_bytes: usize) -> Self {
        let traceparent = crate::observability::trace::traceparent_header(message.headers());
        let decoded = EventEnvelope::decode(message.payload(), max_record_bytes)
            .map(|mut envelope| {
                envelope.traceparent = traceparent.clone();
                envelope
            })
            .map_err(|error| {
                Undecodable {
                    key: message.key().map(<[u8]>::to_vec),
                    // An oversized value is not copied; its metadata is enough to find it.
                    value: match error {
                        DecodeError::Oversized { .. } => None,
                        _ => message.payload().map(<[u8]>::to_vec),
                    },
                    error,
                }
            });
        Self {
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            traceparent,
            decoded,
        }
    }
}

/// One partition's own queue, read asynchronously.
pub struct PartitionRecords {
    /// Always `Some` until dropped (see the `Drop` implementation).
    queue: Option<PartitionQueue<GroupContext>>,
    ready: Arc<Notify>,
}

/// A partition queue holds a handle on its consumer, and the last handle's drop closes the
/// consumer, which blocks (it revokes the assignment and waits for librdkafka). The polling
/// thread normally drops the last one; a queue that outlives it (a partition actor whose batch
/// had not ended when the consumer was closed) is dropped on a thread of its own, never on the
/// arbiter it was used on, so the arbiter (and a daemon stopping) never waits for the close.
impl Drop for PartitionRecords {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            let spawned = std::thread::Builder::new()
                .name("kafka-queue-drop".into())
                .spawn(move || drop(queue));
            if let Err(error) = spawned {
                warn!(%error, "cannot drop a partition queue on a thread of its own");
            }
        }
    }
}

/// Upper bound on how long a partition waits without re-checking its queue. librdkafka
/// signals only the empty → non-empty edge, so this guards against a missed edge.
const QUEUE_RECHECK: Duration = Duration::from_millis(100);

impl PartitionRecords {
    fn new(mut queue: PartitionQueue<GroupContext>) -> Self {
        let ready = Arc::new(Notify::new());
        let signal = ready.clone();
        queue.set_nonempty_callback(move || signal.notify_one());
        Self {
            queue: Some(queue),
            ready,
        }
    }

    /// Waits until at least one record is there, then takes up to `max_records` of those
    /// already fetched. Cancel-safe: records are only taken in the final, synchronous poll.
    pub async fn next_batch(
        &self,
        max_records: usize,
        max_record_bytes: usize,
    ) -> Vec<ConsumedRecord> {
        loop {
            let batch = self.take_ready(max_records, max_record_bytes);
            if !batch.is_empty() {
                return batch;
            }
            let _ = tokio::time::timeout(QUEUE_RECHECK, self.ready.notified()).await;
        }
    }

    fn take_ready(&self, max_records: usize, max_record_bytes: usize) -> Vec<ConsumedRecord> {
        let mut batch = Vec::new();
        while batch.len() < max_records {
            let Some(queue) = &self.queue else { break };
            match queue.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => batch.push(ConsumedRecord::decode(&message, max_record_bytes)),
                Some(Err(error)) => {
                    warn!(%error, "partition queue error");
                    break;
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PartitionAssignment;

    #[test]
    fn the_classic_protocol_brings_its_session_and_assignment_and_the_consumer_protocol_does_not() {
        let mut settings = KafkaSettings::default();
        let classic = consumer_config("127.0.0.1:9092", &settings, "group");
        assert_eq!(classic.get("group.protocol"), Some("classic"));
        assert_eq!(classic.get("partition.assignment.strategy"), Some("range"));
        assert_eq!(classic.get("session.timeout.ms"), Some("10000"));

        settings.consumer.assignment = PartitionAssignment::Cooperative;
        let cooperative = consumer_config("127.0.0.1:9092", &settings, "group");
        assert_eq!(
            cooperative.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );

        settings.consumer.group_protocol = GroupProtocol::Consumer;
        let consumer = consumer_config("127.0.0.1:9092", &settings, "group");
        assert_eq!(consumer.get("group.protocol"), Some("consumer"));
        for refused in [
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "partition.assignment.strategy",
        ] {
            assert_eq!(consumer.get(refused), None, "{refused}");
        }
        // librdkafka accepts the configuration.
        consumer
            .create::<BaseConsumer>()
            .expect("a consumer on the consumer protocol");
    }
}
