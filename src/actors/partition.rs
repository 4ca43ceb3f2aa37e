//! The partition actor: one per assigned partition.
//!
//! Its loop: wait for records on the partition's own queue, take what is ready (up to
//! `max_batch_records`), dead-letter the records that are not events, hand the events to
//! the topic's domain actor with `send().await` and wait for its answer, settle the
//! outcomes, then store the offset after the batch and commit it (at most once per
//! `commit_interval`; a revoke commits the last stored offset in any case). One batch is in
//! flight at a time, so a slow domain actor holds back only this partition, and records are
//! settled in offset order.
//!
//! How a failed outcome is settled depends on its class ([`crate::common::error`]):
//! - **an outage** of a dependency (MySQL, Redis, Kafka, a delivery target): the partition
//!   stops fetching, reports the outage ([`Outages`]), and sends the batch again after a
//!   doubling, capped delay ([`OutagePolicy`]) until the dependency answers. Nothing is
//!   dead-lettered for an outage, however long it lasts.
//! - **retryable or fatal**: sent again after the fixed delay of [`RetryPolicy`] (1 s × 3);
//!   still failing, dead-lettered ("retries-exhausted").
//! - **permanent**: dead-lettered.
//!
//! **Batch isolation**: when every event of a batch of several fails without an outage (a
//! handler that applies the batch in one transaction fails it whole for one bad event),
//! the batch is split in two and each half is sent on its own, recursively, so an event
//! that fails for its own reason fails alone and the others are decided normally.
//!
//! [`Drain`] stops the loop: the batch in flight finishes (or is abandoned, uncommitted, if
//! it is waiting out a retry), the actor reports the next offset to commit and stops.
//!
//! Partition actors are not supervised, deliberately: their state is their queue (split off
//! the consumer once per assignment) and their stored offset, which a restart could not
//! rebuild without a new assignment. Their own code only passes messages: a domain failure
//! arrives as an outcome, and a panic in a domain handler is caught by its domain actor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::{BoxFuture, OptionFuture};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::actors::domain::{BatchOrigin, EventOutcome, HandlerError, ProcessBatch};
use crate::actors::progress::PartitionProgress;
use crate::actors::retry::{OutagePolicy, RetryPolicy};
use crate::common::error::Dependency;
use crate::events::EventEnvelope;
use crate::kafka::TopicPartition;
use crate::kafka::consumer::{ConsumedRecord, OffsetCommitter, PartitionRecords};
use crate::kafka::dead_letter::{DeadLetter, DeadLetterError, DeadLetters};
use crate::kafka::producer::Delivered;
use crate::observability::metrics::{self, BatchOutcomes};
use crate::observability::outages::Outages;

/// Stop taking records, finish the batch in flight, report and stop.
#[derive(Message)]
#[rtype(result = "DrainReport")]
pub struct Drain;

/// Asks for the observable state.
#[derive(Message)]
#[rtype(result = "PartitionActorState")]
pub struct ObservePartition;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainReport {
    pub source: TopicPartition,
    /// The offset to commit (the next record to consume), if this actor made progress.
    pub next_offset: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PartitionPhase {
    Running,
    Draining,
}

/// What the admin view shows of a partition actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionActorState {
    pub topic: String,
    pub partition: i32,
    pub phase: PartitionPhase,
    /// The offset stored for commit: the next record to consume (Kafka's convention).
    pub last_stored_offset: Option<i64>,
    /// Records of the batch being processed.
    pub in_flight: usize,
    pub processed: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    /// Further attempts made for transient failures.
    pub retries: u64,
    /// The dependency the partition is waiting for (its fetching paused), if any.
    pub waiting_for: Option<Dependency>,
    /// Attempts made while a dependency was down.
    pub outage_retries: u64,
    /// Batches split in two to isolate the events that failed.
    pub splits: u64,
}

/// Called when a partition is assigned, before its first batch is taken: a domain that
/// fences stale owners (the CouponIssuer) takes the assignment's owner epoch here. A
/// failure is an outage: the partition waits and calls again.
pub trait AssignmentHook: Send + Sync + 'static {
    fn assigned(
        &self,
        source: TopicPartition,
        assignment: u64,
    ) -> BoxFuture<'static, Result<(), HandlerError>>;
}

/// How a partition retries, dead-letters and batches; shared by all partitions of a group.
#[derive(Clone)]
pub struct PartitionPolicy {
    pub dead_letters: DeadLetters,
    pub retry: RetryPolicy,
    pub outage: OutagePolicy,
    pub outages: Outages,
    pub max_batch_records: usize,
    pub max_record_bytes: usize,
    pub commit_interval: Duration,
    /// What the group's partitions do when assigned, if anything.
    pub on_assigned: Option<Arc<dyn AssignmentHook>>,
}

/// What a partition actor needs besides its queue.
#[derive(Clone)]
pub struct PartitionWiring {
    pub domain: Recipient<ProcessBatch>,
    pub policy: PartitionPolicy,
    /// The group id, for the metrics.
    pub group_id: Arc<str>,
    /// Where the partition reports its position to the lag monitor.
    pub progress: Arc<PartitionProgress>,
}

/// What a batch in flight shows while it runs (it runs detached from the actor).
#[derive(Debug, Default)]
struct LiveState {
    waiting_for: Mutex<Option<Dependency>>,
    outage_retries: AtomicU64,
    splits: AtomicU64,
}

/// Numbers the partition actors this process starts (see [`BatchOrigin::assignment`]).
static ASSIGNMENTS: AtomicU64 = AtomicU64::new(0);

/// How long a fenced batch waits before it is sent again (its actor is normally stopped
/// first, by the revocation that made it stale).
const FENCED_RETRY: Duration = Duration::from_secs(1);

pub struct PartitionActor {
    source: TopicPartition,
    /// This assignment's number (see [`BatchOrigin::assignment`]).
    assignment: u64,
    records: Arc<PartitionRecords>,
    offsets: OffsetCommitter,
    wiring: PartitionWiring,
    stop: CancellationToken,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// When the offset was last committed, and whether a later commit is scheduled.
    last_commit: Option<Instant>,
    commit_scheduled: bool,
    live: Arc<LiveState>,
    /// When the batch in flight was taken.
    batch_started: Option<Instant>,
    state: PartitionActorState,
}

impl PartitionActor {
    pub fn new(
        source: TopicPartition,
        records: PartitionRecords,
        offsets: OffsetCommitter,
        wiring: PartitionWiring,
    ) -> Self {
        let state = PartitionActorState {
            topic: source.topic.clone(),
            partition: source.partition,
            phase: PartitionPhase::Running,
            last_stored_offset: None,
            in_flight: 0,
            processed: 0,
            duplicates: 0,
            dead_lettered: 0,
            retries: 0,
            waiting_for: None,
            outage_retries: 0,
            splits: 0,
        };
        Self {
            source,
            assignment: ASSIGNMENTS.fetch_add(1, Ordering::Relaxed) + 1,
            records: Arc::new(records),
            offsets,
            wiring,
            stop: CancellationToken::new(),
            drain_waiters: Vec::new(),
            last_commit: None,
            commit_scheduled: false,
            live: Arc::default(),
            batch_started: None,
            state,
        }
    }

    /// One turn of the loop: fetch a batch, process it, apply the result, go again.
    fn run_next_batch(&mut self, ctx: &mut Context<Self>) {
        if self.state.phase == PartitionPhase::Draining {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
            return;
        }
        let records = self.records.clone();
        let stop = self.stop.clone();
        let max_records = self.wiring.policy.max_batch_records;
        let max_bytes = self.wiring.policy.max_record_bytes;
        let fetch = async move {
            tokio::select! {
                biased;
                _ = stop.cancelled() => None,
                batch = records.next_batch(max_records, max_bytes) => Some(batch),
            }
        };
        let turn = actix::fut::wrap_future::<_, Self>(fetch)
            .then(|batch, actor, _ctx| {
                // `None` when the partition is stopping: nothing was taken.
                let work = batch.map(|batch| actor.start_batch(batch));
                actix::fut::wrap_future(OptionFuture::from(work))
            })
            .map(|report, actor: &mut Self, ctx| {
                if let Some(report) = report {
                    actor.apply(report, ctx);
                }
                actor.run_next_batch(ctx);
            });
        ctx.spawn(turn);
    }

    fn start_batch(
        &mut self,
        batch: Vec<ConsumedRecord>,
    ) -> impl Future<Output = BatchReport> + use<> {
        debug!(source = %self.source, records = batch.len(), "batch taken");
        self.state.in_flight = batch.len();
        self.batch_started = Some(Instant::now());
        self.wiring
            .progress
            .batch_started(batch.first().and_then(|record| record.timestamp_ms));
        let job = BatchJob {
            waiter: self.source.to_string(),
            source: self.source.clone(),
            assignment: self.assignment,
            wiring: self.wiring.clone(),
            offsets: self.offsets.clone(),
            live: self.live.clone(),
            stop: self.stop.clone(),
        };
        job.run(batch)
    }

    fn apply(&mut self, report: BatchReport, ctx: &mut Context<Self>) {
        debug!(source = %self.source, ?report, "batch settled");
        self.state.in_flight = 0;
        self.state.processed += report.processed;
        self.state.duplicates += report.duplicates;
        self.state.dead_lettered += report.dead_lettered;
        self.state.retries += report.retries;
        self.wiring.progress.batch_settled(report.next_offset);
        metrics::batch_settled(
            &self.wiring.group_id,
            &self.source.topic,
            &BatchOutcomes {
                processed: report.processed,
                duplicates: report.duplicates,
                dead_lettered: report.dead_lettered,
                retries: report.retries,
            },
            self.batch_started
                .take()
                .map(|at| at.elapsed())
                .unwrap_or_default(),
        );
        let Some(next_offset) = report.next_offset else {
            return;
        };
        match self.offsets.store(&self.source, next_offset) {
            Ok(()) => {
                self.state.last_stored_offset = Some(next_offset);
                self.commit_soon(ctx);
            }
            // After a revoke the partition is no longer ours; the next owner starts from
            // the last commit and deduplicates.
            Err(error) => warn!(source = %self.source, next_offset, %error, "cannot store offset"),
        }
    }

    /// Commits the stored offset now, or once `commit_interval` has passed since the last
    /// commit, so a busy partition does not send a commit per batch.
    fn commit_soon(&mut self, ctx: &mut Context<Self>) {
        if self.commit_scheduled {
            return;
        }
        let wait = self
            .last_commit
            .map(|at| {
                self.wiring
                    .policy
                    .commit_interval
                    .saturating_sub(at.elapsed())
            })
            .unwrap_or_default();
        if wait.is_zero() {
            self.commit_stored();
        } else {
            self.commit_scheduled = true;
            ctx.run_later(wait, |actor, _ctx| {
                actor.commit_scheduled = false;
                actor.commit_stored();
            });
        }
    }

    fn commit_stored(&mut self) {
        let Some(next_offset) = self.state.last_stored_offset else {
            return;
        };
        self.last_commit = Some(Instant::now());
        if let Err(error) = self.offsets.commit(&self.source, next_offset) {
            warn!(source = %self.source, next_offset, %error, "cannot commit offset");
        }
    }
}

impl Actor for PartitionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        debug!(source = %self.source, "partition actor started");
        let Some(hook) = self.wiring.policy.on_assigned.clone() else {
            self.run_next_batch(ctx);
            return;
        };
        let (source, assignment) = (self.source.clone(), self.assignment);
        let (stop, outage) = (self.stop.clone(), self.wiring.policy.outage);
        let assigned = async move {
            let mut delays = outage.delays();
            loop {
                let error = match hook.assigned(source.clone(), assignment).await {
                    Ok(()) => return,
                    Err(error) => error,
                };
                let delay = delays.next().unwrap_or(outage.max);
                warn!(%source, %error, ?delay, "cannot take the partition's assignment; trying again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        };
        ctx.spawn(
            actix::fut::wrap_future::<_, Self>(assigned)
                .map(|(), actor, ctx| actor.run_next_batch(ctx)),
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        debug!(source = %self.source, "partition actor stopped");
    }
}

impl Handler<Drain> for PartitionActor {
    type Result = ResponseActFuture<Self, DrainReport>;

    fn handle(&mut self, _: Drain, _ctx: &mut Self::Context) -> Self::Result {
        self.state.phase = PartitionPhase::Draining;
        self.stop.cancel();
        let (idle_sender, idle) = oneshot::channel();
        self.drain_waiters.push(idle_sender);
        Box::pin(
            actix::fut::wrap_future(idle).map(|_, actor: &mut Self, ctx| {
                ctx.stop();
                DrainReport {
                    source: actor.source.clone(),
                    next_offset: actor.state.last_stored_offset,
                }
            }),
        )
    }
}

impl Handler<ObservePartition> for PartitionActor {
    type Result = MessageResult<ObservePartition>;

    fn handle(&mut self, _: ObservePartition, _ctx: &mut Self::Context) -> Self::Result {
        let mut state = self.state.clone();
        state.waiting_for = *self.live.waiting_for.lock().expect("live state");
        state.outage_retries = self.live.outage_retries.load(Ordering::Relaxed);
        state.splits = self.live.splits.load(Ordering::Relaxed);
        MessageResult(state)
    }
}

/// The result of one batch.
#[derive(Debug, Default)]
struct BatchReport {
    /// Set when every record of the batch is settled (processed or dead-lettered).
    next_offset: Option<i64>,
    processed: u64,
    duplicates: u64,
    dead_lettered: u64,
    retries: u64,
}

/// Everything one batch needs, detached from the actor so it can run as a future.
struct BatchJob {
    /// How this partition names itself to [`Outages`].
    waiter: String,
    source: TopicPartition,
    assignment: u64,
    wiring: PartitionWiring,
    offsets: OffsetCommitter,
    live: Arc<LiveState>,
    stop: CancellationToken,
}

/// The batch could not be settled because the partition is stopping; it is left
/// uncommitted for the next owner.
struct Abandoned;

/// The outage a batch is waiting out, and its back-off.
struct Waiting {
    dependency: Dependency,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl BatchJob {
    async fn run(self, records: Vec<ConsumedRecord>) -> BatchReport {
        let mut report = BatchReport::default();
        let Some(last_offset) = records.last().map(|record| record.offset) else {
            return report;
        };
        match self.settle(records, &mut report).await {
            Ok(()) => report.next_offset = Some(last_offset + 1),
            Err(Abandoned) => {
                warn!(source = %self.source, last_offset, "batch abandoned while stopping; it will be redelivered");
            }
        }
        report
    }

    async fn settle(
        &self,
        records: Vec<ConsumedRecord>,
        report: &mut BatchReport,
    ) -> Result<(), Abandoned> {
        let mut events = Vec::with_capacity(records.len());
        let mut event_offsets = Vec::with_capacity(records.len());
        for record in records {
            match record.decoded {
                Ok(envelope) => {
                    events.push(envelope);
                    event_offsets.push(record.offset);
                }
                Err(undecodable) => {
                    let error = undecodable.error.to_string();
                    self.dead_letter(DeadLetter {
                        source: &self.source,
                        offset: record.offset,
                        key: undecodable.key.as_deref(),
                        value: undecodable.value.as_deref(),
                        event_id: EventEnvelope::salvage_event_id(undecodable.value.as_deref()),
                        count_attempt: false,
                        error_kind: undecodable.error.kind(),
                        error: &error,
                    })
                    .await?;
                    report.dead_lettered += 1;
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        self.process_events(events.into(), event_offsets.into(), report)
            .await
    }

    /// Sends the events to the domain actor and settles the outcomes in order, then does
    /// what [`next_step`] says: done; split in two; or the rest again, after the outage
    /// back-off while a dependency is down (without end), otherwise after the fixed delay
    /// until the attempts run out.
    async fn process_events(
        &self,
        mut events: Arc<[EventEnvelope]>,
        mut offsets: Arc<[i64]>,
        report: &mut BatchReport,
    ) -> Result<(), Abandoned> {
        let mut delays = self.wiring.policy.retry.delays().peekable();
        let mut waiting: Option<Waiting> = None;
        loop {
            let outcomes = self.send_to_domain(events.clone(), &offsets).await;
            let step = next_step(&outcomes, delays.peek().is_some());
            if !matches!(step, NextStep::WaitOutOutage { .. }) {
                self.end_waiting(&mut waiting);
            }
            if step == NextStep::Split {
                return self.split(events, offsets, report).await;
            }
            let settled_until = step.settled_until().unwrap_or(outcomes.len());
            for position in 0..settled_until {
                self.settle_outcome(
                    &events[position],
                    offsets[position],
                    &outcomes[position],
                    false,
                    report,
                )
                .await?;
            }
            let delay = match step {
                NextStep::Settle | NextStep::Split => return Ok(()),
                NextStep::SplitRest { .. } => {
                    return self
                        .split(
                            events[settled_until..].into(),
                            offsets[settled_until..].into(),
                            report,
                        )
                        .await;
                }
                NextStep::GiveUpRest { .. } => {
                    for position in settled_until..outcomes.len() {
                        self.settle_outcome(
                            &events[position],
                            offsets[position],
                            &outcomes[position],
                            true,
                            report,
                        )
                        .await?;
                    }
                    return Ok(());
                }
                NextStep::WaitOutOutage { dependency, .. } => {
                    let message = failure_message(&outcomes[settled_until]);
                    let delay = self.wait_for(&mut waiting, dependency, &message);
                    self.live.outage_retries.fetch_add(1, Ordering::Relaxed);
                    delay
                }
                NextStep::Fenced { .. } => {
                    debug!(source = %self.source, "batch fenced: this owner lost the partition");
                    FENCED_RETRY
                }
                NextStep::RetryRest { .. } => {
                    report.retries += 1;
                    delays.next().expect("an attempt is left")
                }
            };
            if let Err(abandoned) = pause_unless_stopped(&self.stop, delay).await {
                self.end_waiting(&mut waiting);
                return Err(abandoned);
            }
            events = events[settled_until..].into();
            offsets = offsets[settled_until..].into();
        }
    }

    /// Sends each half of the events on its own (and so on, down to single events).
    async fn split(
        &self,
        events: Arc<[EventEnvelope]>,
        offsets: Arc<[i64]>,
        report: &mut BatchReport,
    ) -> Result<(), Abandoned> {
        self.live.splits.fetch_add(1, Ordering::Relaxed);
        let middle = events.len() / 2;
        debug!(source = %self.source, events = events.len(), "every event failed: splitting the batch");
        Box::pin(self.process_events(events[..middle].into(), offsets[..middle].into(), report))
            .await?;
        Box::pin(self.process_events(events[middle..].into(), offsets[middle..].into(), report))
            .await
    }

    /// Reports the outage, stops fetching when it begins, and returns the next wait.
    fn wait_for(
        &self,
        waiting: &mut Option<Waiting>,
        dependency: Dependency,
        error: &str,
    ) -> Duration {
        if waiting
            .as_ref()
            .is_some_and(|waiting| waiting.dependency != dependency)
        {
            self.end_waiting(waiting);
        }
        self.wiring
            .policy
            .outages
            .report(dependency, &self.waiter, error);
        let current = waiting.get_or_insert_with(|| {
            warn!(source = %self.source, %dependency, error, "dependency down: partition paused until it answers");
            *self.live.waiting_for.lock().expect("live state") = Some(dependency);
            if let Err(error) = self.offsets.pause_fetching(&self.source) {
                warn!(source = %self.source, %error, "cannot pause fetching");
            }
            Waiting {
                dependency,
                delays: Box::new(self.wiring.policy.outage.delays()),
            }
        });
        current
            .delays
            .next()
            .unwrap_or(self.wiring.policy.outage.max)
    }

    fn end_waiting(&self, waiting: &mut Option<Waiting>) {
        let Some(ended) = waiting.take() else {
            return;
        };
        self.wiring
            .policy
            .outages
            .recovered(ended.dependency, &self.waiter);
        *self.live.waiting_for.lock().expect("live state") = None;
        if let Err(error) = self.offsets.resume_fetching(&self.source) {
            warn!(source = %self.source, %error, "cannot resume fetching");
        }
        debug!(source = %self.source, dependency = %ended.dependency, "dependency answers again: partition resumed");
    }

    async fn send_to_domain(
        &self,
        events: Arc<[EventEnvelope]>,
        offsets: &[i64],
    ) -> Vec<EventOutcome> {
        let count = events.len();
        let batch = ProcessBatch {
            origin: BatchOrigin {
                source: self.source.clone(),
                offsets: offsets.into(),
                assignment: self.assignment,
            },
            events,
        };
        match self.wiring.domain.send(batch).await {
            Ok(outcomes) => outcomes,
            // The domain actor is restarting or gone: nothing was acknowledged.
            Err(mailbox_error) => {
                vec![
                    EventOutcome::Failed(HandlerError::fatal(format!(
                        "domain actor unavailable: {mailbox_error}"
                    )));
                    count
                ]
            }
        }
    }

    async fn settle_outcome(
        &self,
        event: &EventEnvelope,
        offset: i64,
        outcome: &EventOutcome,
        attempts_exhausted: bool,
        report: &mut BatchReport,
    ) -> Result<(), Abandoned> {
        match outcome {
            EventOutcome::Done => report.processed += 1,
            EventOutcome::Duplicate => report.duplicates += 1,
            EventOutcome::Failed(error) => {
                let (error_kind, message) = if attempts_exhausted && outcome.is_transient() {
                    (
                        "retries-exhausted",
                        format!(
                            "{} (after {} further attempts)",
                            error.message, self.wiring.policy.retry.attempts
                        ),
                    )
                } else {
                    (error.class.as_str(), error.message.clone())
                };
                let value = event.encode();
                self.dead_letter(DeadLetter {
                    source: &self.source,
                    offset,
                    key: Some(event.key.as_bytes()),
                    value: Some(&value),
                    event_id: Some(event.event_id),
                    count_attempt: false,
                    error_kind,
                    error: &message,
                })
                .await?;
                report.dead_lettered += 1;
            }
            // Never settled: `next_step` stops at a fenced outcome.
            EventOutcome::Fenced => {}
        }
        Ok(())
    }

    /// A dead letter must be published and recorded before the offset moves past the
    /// record: while Kafka or MySQL is down, both are retried (as an outage: reported, with
    /// the outage back-off) until they succeed or the partition stops.
    async fn dead_letter(&self, letter: DeadLetter<'_>) -> Result<(), Abandoned> {
        let dead_letters = &self.wiring.policy.dead_letters;
        let mut waiting: Option<Waiting> = None;
        let mut published: Option<Delivered> = None;
        loop {
            let attempt = match published {
                None => dead_letters.send(letter).await.map(|_| ()),
                Some(delivered) => {
                    dead_letters
                        .record(&letter, delivered)
                        .await
                        .map_err(|source| DeadLetterError::NotRecorded {
                            published: delivered,
                            source,
                        })
                }
            };
            let error = match attempt {
                Ok(()) => {
                    self.end_waiting(&mut waiting);
                    return Ok(());
                }
                Err(error) => error,
            };
            if let DeadLetterError::NotRecorded {
                published: delivered,
                ..
            } = &error
            {
                published = Some(*delivered);
            }
            let dependency = match &error {
                DeadLetterError::Publish(_) => Dependency::Kafka,
                DeadLetterError::NotRecorded { .. } => Dependency::Mysql,
            };
            warn!(source = %self.source, offset = letter.offset, %error, "dead letter not done; retrying");
            let delay = self.wait_for(&mut waiting, dependency, &error.to_string());
            if let Err(abandoned) = pause_unless_stopped(&self.stop, delay).await {
                self.end_waiting(&mut waiting);
                return Err(abandoned);
            }
        }
    }
}

/// What a batch does once the domain actor answered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NextStep {
    /// Settle every outcome: the batch is done.
    Settle,
    /// Settle the outcomes before `settled_until`; the batch came from an owner that lost
    /// the partition: send the rest again after a pause, unless the partition stops first.
    Fenced { settled_until: usize },
    /// Every event of several failed for its own reason: send each half on its own, so an
    /// event that fails alone fails alone (batch isolation).
    Split,
    /// Settle the outcomes before `settled_until`; the event there found a dependency down:
    /// wait the outage out and send it and the rest again, without end.
    WaitOutOutage {
        settled_until: usize,
        dependency: Dependency,
    },
    /// Settle the outcomes before `settled_until`; the event there may succeed if tried
    /// again: send it and the rest again after the in-place retry's delay.
    RetryRest { settled_until: usize },
    /// The in-place attempts are spent, and every event from `settled_until` on failed, more
    /// than one: settle those before, split the rest.
    SplitRest { settled_until: usize },
    /// The in-place attempts are spent: settle those before `settled_until` as they are and
    /// the rest as having run out of attempts (dead letters for the failures).
    GiveUpRest { settled_until: usize },
}

impl NextStep {
    /// Where the outcomes settled as they are end, when not all of them are.
    fn settled_until(self) -> Option<usize> {
        match self {
            NextStep::Settle | NextStep::Split => None,
            NextStep::WaitOutOutage { settled_until, .. }
            | NextStep::Fenced { settled_until }
            | NextStep::RetryRest { settled_until }
            | NextStep::SplitRest { settled_until }
            | NextStep::GiveUpRest { settled_until } => Some(settled_until),
        }
    }
}

/// The next step of a batch whose events answered `outcomes`, while in-place attempts are
/// left (`attempts_left`) or not. Outcomes are settled in order up to the first transient
/// failure; an outage never spends an attempt.
fn next_step(outcomes: &[EventOutcome], attempts_left: bool) -> NextStep {
    if let Some(settled_until) = outcomes
        .iter()
        .position(|outcome| *outcome == EventOutcome::Fenced)
    {
        return NextStep::Fenced { settled_until };
    }
    let Some(first_transient) = outcomes.iter().position(EventOutcome::is_transient) else {
        if outcomes.len() > 1 && outcomes.iter().all(EventOutcome::is_failure) {
            return NextStep::Split;
        }
        return NextStep::Settle;
    };
    if let Some(dependency) = outcomes[first_transient].outage() {
        return NextStep::WaitOutOutage {
            settled_until: first_transient,
            dependency,
        };
    }
    if attempts_left {
        return NextStep::RetryRest {
            settled_until: first_transient,
        };
    }
    let rest = &outcomes[first_transient..];
    if rest.len() > 1 && rest.iter().all(EventOutcome::is_failure) {
        NextStep::SplitRest {
            settled_until: first_transient,
        }
    } else {
        NextStep::GiveUpRest {
            settled_until: first_transient,
        }
    }
}

/// Waits `delay`, or returns early when the partition stops.
async fn pause_unless_stopped(stop: &CancellationToken, delay: Duration) -> Result<(), Abandoned> {
    tokio::select! {
        biased;
        _ = stop.cancelled() => Err(Abandoned),
        _ = tokio::time::sleep(delay) => Ok(()),
    }
}

fn failure_message(outcome: &EventOutcome) -> String {
    match outcome {
        EventOutcome::Failed(error) => error.message.clone(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::error::ErrorClass;

    fn done() -> EventOutcome {
        EventOutcome::Done
    }

    fn permanent() -> EventOutcome {
        EventOutcome::Failed(HandlerError::permanent("bad event"))
    }

    fn retryable() -> EventOutcome {
        EventOutcome::Failed(HandlerError::retryable("deadlock"))
    }

    fn outage(dependency: Dependency) -> EventOutcome {
        EventOutcome::Failed(HandlerError::new(
            ErrorClass::Unavailable(dependency),
            "connection refused",
        ))
    }

    #[test]
    fn a_batch_whose_every_event_failed_for_its_own_reason_is_split() {
        assert_eq!(
            next_step(&[permanent(), permanent()], true),
            NextStep::Split
        );
        assert_eq!(
            next_step(&[permanent(), permanent()], false),
            NextStep::Split
        );
        // Alone, an event's own failure is settled: it becomes a dead letter.
        assert_eq!(next_step(&[permanent()], true), NextStep::Settle);
        // One event decided is enough to settle the batch as it is.
        assert_eq!(next_step(&[permanent(), done()], true), NextStep::Settle);
    }

    #[test]
    fn isolation_leaves_each_failing_event_alone_and_decides_the_others() {
        // A handler that applies a batch in one transaction fails all of it for one bad
        // event; splitting the batch as next_step says ends with each bad event alone.
        let bad = [2usize, 5];
        let handle = |events: &[usize]| -> Vec<EventOutcome> {
            if events.iter().any(|event| bad.contains(event)) {
                vec![permanent(); events.len()]
            } else {
                vec![done(); events.len()]
            }
        };
        let mut batches = vec![(0..8).collect::<Vec<usize>>()];
        let mut settled: Vec<(usize, EventOutcome)> = Vec::new();
        let mut splits = 0;
        while let Some(batch) = batches.pop() {
            let outcomes = handle(&batch);
            match next_step(&outcomes, true) {
                NextStep::Split => {
                    splits += 1;
                    let (first, second) = batch.split_at(batch.len() / 2);
                    batches.push(second.to_vec());
                    batches.push(first.to_vec());
                }
                NextStep::Settle => settled.extend(batch.into_iter().zip(outcomes)),
                other => panic!("unexpected step {other:?}"),
            }
        }
        settled.sort_by_key(|(event, _)| *event);
        let failed: Vec<usize> = settled
            .iter()
            .filter(|(_, outcome)| outcome.is_failure())
            .map(|(event, _)| *event)
            .collect();
        assert_eq!(failed, bad);
        assert_eq!(settled.len(), 8, "every event settled once");
        assert_eq!(splits, 5);
    }

    #[test]
    fn an_outage_waits_without_spending_an_attempt_after_settling_what_came_before() {
        let outcomes = [done(), outage(Dependency::Mysql), permanent()];
        for attempts_left in [true, false] {
            assert_eq!(
                next_step(&outcomes, attempts_left),
                NextStep::WaitOutOutage {
                    settled_until: 1,
                    dependency: Dependency::Mysql
                }
            );
        }
    }

    #[test]
    fn a_fenced_batch_is_neither_settled_nor_failed_and_waits_whatever_the_attempts() {
        let fenced = [EventOutcome::Fenced, EventOutcome::Fenced];
        for attempts_left in [true, false] {
            assert_eq!(
                next_step(&fenced, attempts_left),
                NextStep::Fenced { settled_until: 0 }
            );
        }
        assert!(!EventOutcome::Fenced.is_failure());
        assert!(!EventOutcome::Fenced.is_transient());
    }

    #[test]
    fn a_transient_failure_is_tried_again_then_given_up_or_isolated() {
        let outcomes = [done(), retryable(), done()];
        assert_eq!(
            next_step(&outcomes, true),
            NextStep::RetryRest { settled_until: 1 }
        );
        assert_eq!(
            next_step(&outcomes, false),
            NextStep::GiveUpRest { settled_until: 1 }
        );
        let rest_failed = [done(), retryable(), permanent()];
        assert_eq!(
            next_step(&rest_failed, false),
            NextStep::SplitRest { settled_until: 1 }
        );
        assert_eq!(
            next_step(&[retryable()], false),
            NextStep::GiveUpRest { settled_until: 0 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_lasts_its_delay_unless_the_partition_stops() {
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(
            pause_unless_stopped(&stop, Duration::from_secs(10))
                .await
                .is_ok()
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        let pausing = tokio::spawn({
            let stop = stop.clone();
            async move { pause_unless_stopped(&stop, Duration::from_secs(3_600)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        assert!(pausing.await.unwrap().is_err(), "abandoned when stopping");
        assert!(started.elapsed() < Duration::from_secs(12));
    }
}
