//! The reconciler: finds events a consumer has not settled and drives them again.
//!
//! Every `reconcile.interval_ms`, for each consumer of this instance ([`Consumers`]), it
//! walks the consumer's events in id order (ids are time-ordered) from its checkpoint and
//! asks, for each, whether the consumer has settled it ([`crate::event_log::progress`]). The checkpoint
//! moves past the settled prefix, so each event is looked at until it is settled, and then
//! never again. An unsettled event is **stranded**, and driven again, when
//! - it was published at least `reconcile.after_ms` ago (per event type:
//!   `reconcile.after_ms_by_event_type`), and
//! - the consumer's group has committed, on every partition, past the end the partition had
//!   at the previous pass, which was after the event was published: had the record been in
//!   the log, the group would have settled it. A group that commits nothing (an instance's
//!   notifier, which starts at the end) is judged by its member's own positions in this
//!   process instead: where it started on each partition, moved by every record it
//!   processed. A group that lags behind (a backlog, a
//!   pause, a dependency outage) is left alone, so a backlog is never published twice.
//!
//! On a freshly started embedded cluster (memory only: it starts empty with the process)
//! whatever was published before the start is gone, and the first pass drives it again at
//! once, without either condition.
//!
//! Driving again means publishing the event to its topic once more (every consumer of the
//! topic deduplicates it by event id), or, for the ranking, counting it directly (its
//! applied mark makes that idempotent). Rows still PENDING are the outbox relay's. Events
//! recorded proven (coupon requests, see [`crate::outbox`]) have no PENDING
//! state: the reconciler is what publishes them again when their publication failed, after
//! `reconcile.proven_after_ms` (5 s, at most `after_ms`). Coupon results have no row: the
//! notifier's walk is over the requests' rows, a request COMPLETED (decided, not NOTIFIED)
//! waits since its decision (`updated_at`), and driving it again publishes its result
//! rebuilt from the row, with the result's own event id.
//!
//! One instance reconciles a consumer at a time: its pass holds the consumer's checkpoint
//! row under a lock the other instances skip. Supervised like the relay.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, warn};

use crate::actors::spawn_supervised_pass;
use crate::actors::tree::ObserveBackground;
use crate::common::connections::RedisStoreError;
use crate::config::ReconcileSettings;
use crate::coupons::results::result_event;
use crate::event_log::progress::{
    ConsumerSpec, Consumers, RecordedIn, result_settled, row_settled,
};
use crate::event_log::{EventLog, EventLogError, EventRecord, EventStatus};
use crate::events::{EventId, EventPayload};
use crate::kafka::dead_letter::DeadLetterLog;
use crate::kafka::offsets::{GroupOffsets, PartitionPosition};
use crate::kafka::producer::{EventPublisher, PublishError};
use crate::ranking::rebuild::{RebuildError, rebuild_if_missing};
use crate::ranking::{RankedOrder, RankingError, RankingStore};

/// Pages of `reconcile.batch_size` rows one consumer's pass reads at most.
const PAGES_PER_PASS: usize = 20;

/// Stops the reconciler (shutdown): no pass starts after this one.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopReconciler;

/// Runs a pass now (tests, and `POST /admin/reconcile`); answers when it is done.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReconcileNow;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerReconciliation {
    /// Events found settled and passed by the checkpoint.
    pub settled: u64,
    /// Events driven again.
    pub redriven: u64,
    /// Passes that left the consumer alone because its group had not read past the end of
    /// the previous pass (it lags, or is paused or waiting for a dependency).
    pub lagging: u64,
    /// Unsettled events seen at the last pass (waiting for their group, or driven again);
    /// while the group lags, those of the first page that holds one (the pass stops there).
    pub unsettled: u64,
    /// The last event passed by the checkpoint.
    pub checkpoint: Option<EventId>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcilerState {
    pub passes: u64,
    pub errors: u64,
    pub restarts: u64,
    pub last_error: Option<String>,
    /// Whether the first pass after a fresh embedded cluster is still to run.
    pub fresh_cluster_pending: bool,
    /// Rebuilds of the ranking it started because `ranking:built` was missing.
    pub ranking_rebuilds: u64,
    pub consumers: BTreeMap<&'static str, ConsumerReconciliation>,
}

/// What the reconciler is made of.
pub struct ReconcilerWiring {
    pub consumers: Consumers,
    pub event_log: EventLog,
    pub dead_letters: DeadLetterLog,
    pub publisher: EventPublisher,
    pub ranking: RankingStore,
    pub offsets: Arc<GroupOffsets>,
    pub settings: ReconcileSettings,
    /// When this process started an embedded cluster: what was published before is gone.
    pub fresh_cluster_since: Option<DateTime<Utc>>,
    /// Whether every consumer group of this instance has its partitions (the first pass
    /// waits for it, so what it publishes is read by groups that start at the end).
    pub groups_ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// For a group of this instance that keeps no offsets (it starts at the end: the
    /// notifier's), its member's position on each partition of a topic (group id, topic):
    /// such a group has no committed offsets to read.
    pub local_positions: LocalPositionsOf,
}

/// A group's member's own position on each partition of a topic (group id, topic), for a
/// group that commits nothing; `None` for the others.
pub type LocalPositionsOf = Arc<dyn Fn(&str, &str) -> Option<BTreeMap<i32, i64>> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error("dead letters unreadable: {0}")]
    DeadLetters(#[from] sqlx::Error),
    #[error("ranking marks unreadable: {0}")]
    Ranking(#[from] RedisStoreError),
    #[error("counting an order again failed: {0}")]
    Count(#[from] RankingError),
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    #[error("group offsets unreadable: {0}")]
    Offsets(String),
    #[error("driving {event_id} again failed: {source}")]
    Publish {
        event_id: EventId,
        source: PublishError,
    },
}

/// The end of each partition at one pass.
#[derive(Clone, Debug)]
struct Snapshot {
    at: DateTime<Utc>,
    ends: BTreeMap<i32, i64>,
}

/// What passes share (one thread: the reconciler's arbiter).
#[derive(Default)]
struct Memory {
    snapshots: HashMap<&'static str, Snapshot>,
    /// When each unsettled event was last driven again.
    redriven: HashMap<(&'static str, EventId), Instant>,
    /// Consumers whose first pass on a fresh cluster has run.
    fresh_done: std::collections::HashSet<&'static str>,
    state: ReconcilerState,
}

struct Inner {
    wiring: ReconcilerWiring,
    memory: RefCell<Memory>,
}

pub struct Reconciler {
    inner: Rc<Inner>,
    busy: bool,
    stopping: bool,
    /// Callers of [`ReconcileNow`] waiting for a pass that has not started yet, and for the
    /// pass in flight.
    queued: Vec<tokio::sync::oneshot::Sender<()>>,
    running: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Reconciler {
    pub fn new(wiring: ReconcilerWiring) -> Self {
        let memory = Memory {
            state: ReconcilerState {
                fresh_cluster_pending: wiring.fresh_cluster_since.is_some(),
                ..ReconcilerState::default()
            },
            ..Memory::default()
        };
        Self {
            inner: Rc::new(Inner {
                wiring,
                memory: RefCell::new(memory),
            }),
            busy: false,
            stopping: false,
            queued: Vec::new(),
            running: Vec::new(),
        }
    }

    /// Starts the reconciler under a `Supervisor` on `arbiter`; the wiring is built there.
    pub fn start_supervised(
        arbiter: &ArbiterHandle,
        wiring: impl FnOnce() -> ReconcilerWiring + Send + 'static,
    ) -> Addr<Self> {
        Supervisor::start_in_arbiter(arbiter, move |_| Reconciler::new(wiring()))
    }

    fn run_pass(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        if self.stopping || !self.inner.wiring.settings.enabled {
            for waiter in self.queued.drain(..) {
                let _ = waiter.send(());
            }
            return;
        }
        if !(self.inner.wiring.groups_ready)() {
            return;
        }
        self.busy = true;
        self.running = std::mem::take(&mut self.queued);
        let inner = self.inner.clone();
        let pass = async move { inner.pass().await };
        spawn_supervised_pass(ctx, "Reconciler", pass, |reconciler: &mut Self, ()| {
            reconciler.busy = false;
            for waiter in reconciler.running.drain(..) {
                let _ = waiter.send(());
            }
        });
    }
}

impl Inner {
    async fn pass(&self) {
        for consumer in self.wiring.consumers.all() {
            if let Err(error) = self.reconcile(consumer).await {
                warn!(consumer = consumer.name, %error, "reconciliation pass failed");
                let mut memory = self.memory.borrow_mut();
                memory.state.errors += 1;
                memory.state.last_error = Some(format!("{}: {error}", consumer.name));
            }
        }
        let mut memory = self.memory.borrow_mut();
        memory.state.passes += 1;
        let fresh_pending = self.wiring.fresh_cluster_since.is_some()
            && memory.fresh_done.len() < self.wiring.consumers.all().len();
        memory.state.fresh_cluster_pending = fresh_pending;
    }

    /// Until when an unsettled event of `consumer` counts as stranded (`None`: its group
    /// lags, nothing is).
    async fn stranded_before(
        &self,
        consumer: &ConsumerSpec,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, ReconcileError> {
        if let Some(since) = self.wiring.fresh_cluster_since
            && !self.memory.borrow().fresh_done.contains(consumer.name)
        {
            return Ok(Some(since));
        }
        let offsets = self.wiring.offsets.clone();
        let (group, topic) = (consumer.group_id.clone(), consumer.topic);
        let positions: Vec<PartitionPosition> =
            tokio::task::spawn_blocking(move || offsets.positions_blocking(&group, topic))
                .await
                .map_err(|error| ReconcileError::Offsets(error.to_string()))?
                .map_err(|error| ReconcileError::Offsets(error.to_string()))?;
        let snapshot = Snapshot {
            at: now,
            ends: positions
                .iter()
                .map(|position| (position.partition, position.end))
                .collect(),
        };
        let previous = self
            .memory
            .borrow_mut()
            .snapshots
            .insert(consumer.name, snapshot);
        let Some(previous) = previous else {
            return Ok(None);
        };
        let local = (self.wiring.local_positions)(&consumer.group_id, consumer.topic);
        let read_past = positions.iter().all(|position| {
            let end = previous.ends.get(&position.partition).copied().unwrap_or(0);
            let next = match &local {
                // A partition this member has not been given is not read past.
                Some(local) => local.get(&position.partition).copied().unwrap_or(-1),
                None => position.committed.unwrap_or(0),
            };
            next >= end
        });
        Ok(read_past.then_some(previous.at))
    }

    async fn reconcile(&self, consumer: &ConsumerSpec) -> Result<(), ReconcileError> {
        let event_types = consumer.event_types();
        if event_types.is_empty() {
            return Ok(());
        }
        if consumer.recorded_in == RecordedIn::RankingMarks {
            // A Redis that lost its data lost the ranking with the marks: recompute it
            // rather than count every order of the window again one by one.
            let rebuilt = rebuild_if_missing(
                &self.wiring.ranking,
                &self.wiring.event_log,
                Utc::now().date_naive(),
            )
            .await;
            match rebuilt {
                Ok(Some(_)) => self.memory.borrow_mut().state.ranking_rebuilds += 1,
                Ok(None) | Err(RebuildError::AlreadyRunning) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let settings = &self.wiring.settings;
        let now = Utc::now();
        let shortest_after = event_types
            .iter()
            .map(|event_type| settings.after(event_type.as_str(), event_type.recorded_proven()))
            .min()
            .unwrap_or_default();
        let mut transaction = self.wiring.event_log.pool().begin().await?;
        sqlx::query!(
            "INSERT IGNORE INTO reconcile_checkpoint (consumer, event_id) VALUES (?, '')",
            consumer.name
        )
        .execute(&mut *transaction)
        .await?;
        let checkpoint: Option<String> = sqlx::query_scalar!(
            "SELECT event_id FROM reconcile_checkpoint WHERE consumer = ? FOR UPDATE SKIP LOCKED",
            consumer.name
        )
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(checkpoint) = checkpoint else {
            // Another instance is reconciling this consumer right now.
            return Ok(());
        };
        let mut after: Option<EventId> = checkpoint.parse().ok();
        let stranded_before = self.stranded_before(consumer, now).await?;
        let fresh = stranded_before.is_some()
            && self.wiring.fresh_cluster_since.is_some()
            && !self.memory.borrow().fresh_done.contains(consumer.name);
        let walk_before = if fresh {
            EventId::first_at(now)
        } else {
            EventId::first_at(now - chrono::Duration::from_std(shortest_after).unwrap_or_default())
        };

        let mut checkpoint_moved_to: Option<EventId> = None;
        let mut prefix_settled = true;
        let (mut settled_count, mut redriven_count, mut unsettled_count) = (0u64, 0u64, 0u64);
        for _ in 0..PAGES_PER_PASS {
            let page = self
                .wiring
                .event_log
                .of_types_between(&event_types, after, walk_before, settings.batch_size.max(1))
                .await?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.event_id);
            let settled = self.settled(consumer, &page).await?;
            for (record, settled) in page.iter().zip(settled) {
                if settled {
                    self.memory
                        .borrow_mut()
                        .redriven
                        .remove(&(consumer.name, record.event_id));
                    if prefix_settled {
                        checkpoint_moved_to = Some(record.event_id);
                        settled_count += 1;
                    }
                    continue;
                }
                prefix_settled = false;
                unsettled_count += 1;
                if self.is_stranded(consumer, record, stranded_before, fresh, now) {
                    self.drive_again(consumer, record).await?;
                    redriven_count += 1;
                }
            }
            // A group that lags strands nothing, and the checkpoint cannot pass the first
            // unsettled event: walking on would read a backlog page after page, each pass,
            // for nothing.
            // Likewise the notifier behind requests the issuer has not decided yet (a
            // backlog of the issuer's): their results do not exist yet.
            let undecided_ahead = consumer.recorded_in == RecordedIn::RequestRow
                && page.iter().any(|record| {
                    !matches!(
                        record.status,
                        EventStatus::Completed | EventStatus::Notified | EventStatus::DeadLetter
                    )
                });
            let nothing_more = (stranded_before.is_none() || undecided_ahead) && !prefix_settled;
            if nothing_more || page.len() < settings.batch_size.max(1) as usize {
                break;
            }
        }
        if let Some(moved_to) = checkpoint_moved_to {
            sqlx::query!(
                "UPDATE reconcile_checkpoint SET event_id = ? WHERE consumer = ?",
                moved_to,
                consumer.name
            )
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        if redriven_count > 0 {
            info!(
                consumer = consumer.name,
                redriven = redriven_count,
                fresh_cluster = fresh,
                "stranded events driven again"
            );
        }
        let mut memory = self.memory.borrow_mut();
        if fresh {
            memory.fresh_done.insert(consumer.name);
        }
        let entry = memory.state.consumers.entry(consumer.name).or_default();
        entry.settled += settled_count;
        entry.redriven += redriven_count;
        entry.unsettled = unsettled_count;
        entry.lagging += u64::from(stranded_before.is_none());
        if checkpoint_moved_to.is_some() {
            entry.checkpoint = checkpoint_moved_to;
        }
        Ok(())
    }

    /// Whether each event of `page` is settled by `consumer`.
    async fn settled(
        &self,
        consumer: &ConsumerSpec,
        page: &[EventRecord],
    ) -> Result<Vec<bool>, ReconcileError> {
        match consumer.recorded_in {
            RecordedIn::EventLog => Ok(page
                .iter()
                .map(|record| row_settled(record.status, record.next_attempt_at))
                .collect()),
            RecordedIn::RequestRow => Ok(page
                .iter()
                .map(|record| {
                    // A request decided before results were recorded in their requests'
                    // rows has a result row of its own, which the relay publishes.
                    let legacy =
                        record.status == EventStatus::Completed && result_event(record).is_none();
                    result_settled(record.status) || legacy
                })
                .collect()),
            RecordedIn::RankingMarks => {
                let ids: Vec<EventId> = page.iter().map(|record| record.event_id).collect();
                let counted = self.wiring.ranking.counted(&ids).await?;
                let uncounted: Vec<EventId> = ids
                    .iter()
                    .zip(&counted)
                    .filter(|(_, counted)| !**counted)
                    .map(|(id, _)| *id)
                    .collect();
                let dead = self
                    .wiring
                    .dead_letters
                    .open_among(&consumer.group_id, &uncounted)
                    .await?;
                Ok(ids
                    .iter()
                    .zip(counted)
                    .map(|(id, counted)| counted || dead.contains(id))
                    .collect())
            }
        }
    }

    fn is_stranded(
        &self,
        consumer: &ConsumerSpec,
        record: &EventRecord,
        stranded_before: Option<DateTime<Utc>>,
        fresh: bool,
        now: DateTime<Utc>,
    ) -> bool {
        // What the consumer's event waits since: the event's publication, or for a result
        // recorded in its request's row, the decision (a request not decided yet has no
        // result to drive).
        let since = match consumer.recorded_in {
            RecordedIn::RequestRow => {
                (record.status == EventStatus::Completed).then_some(record.updated_at)
            }
            _ => record.published_at,
        };
        let (Some(before), Some(published_at)) = (stranded_before, since) else {
            return false;
        };
        if published_at >= before {
            return false;
        }
        let after = self.wiring.settings.after(
            record.event_type.as_str(),
            record.event_type.recorded_proven(),
        );
        if !fresh && now - published_at < chrono::Duration::from_std(after).unwrap_or_default() {
            return false;
        }
        // Driven again already, recently: give that record the same time.
        let memory = self.memory.borrow();
        memory
            .redriven
            .get(&(consumer.name, record.event_id))
            .is_none_or(|at| at.elapsed() >= after)
    }

    async fn drive_again(
        &self,
        consumer: &ConsumerSpec,
        record: &EventRecord,
    ) -> Result<(), ReconcileError> {
        match (&record.payload, consumer.recorded_in) {
            (_, RecordedIn::RequestRow) => {
                let Some(result) = result_event(record) else {
                    return Ok(());
                };
                self.wiring
                    .publisher
                    .publish(consumer.topic, &result)
                    .await
                    .map_err(|source| ReconcileError::Publish {
                        event_id: result.event_id,
                        source,
                    })?;
            }
            (EventPayload::OrderCompleted(order), RecordedIn::RankingMarks) => {
                let ranked = RankedOrder {
                    event_id: record.event_id,
                    day: record.occurred_at.date_naive(),
                    products: &order.products,
                };
                self.wiring.ranking.apply(&[ranked]).await?;
            }
            _ => {
                self.wiring
                    .publisher
                    .publish(&record.topic, &record.envelope())
                    .await
                    .map_err(|source| ReconcileError::Publish {
                        event_id: record.event_id,
                        source,
                    })?;
            }
        }
        self.memory
            .borrow_mut()
            .redriven
            .insert((consumer.name, record.event_id), Instant::now());
        Ok(())
    }
}

impl Actor for Reconciler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let interval = Duration::from_millis(self.inner.wiring.settings.interval_ms.max(10));
        // The first pass runs as soon as the groups have their partitions; a pass asked
        // for while one runs follows it.
        ctx.run_interval(
            Duration::from_millis(100).min(interval),
            |reconciler, ctx| {
                if reconciler.inner.memory.borrow().state.passes == 0
                    || !reconciler.queued.is_empty()
                {
                    reconciler.run_pass(ctx);
                }
            },
        );
        ctx.run_interval(interval, |reconciler, ctx| reconciler.run_pass(ctx));
    }
}

impl Supervised for Reconciler {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.busy = false;
        self.running.clear();
        let mut memory = self.inner.memory.borrow_mut();
        memory.state.restarts += 1;
        warn!(restarts = memory.state.restarts, "reconciler restarting");
    }
}

impl Handler<ReconcileNow> for Reconciler {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: ReconcileNow, ctx: &mut Self::Context) -> Self::Result {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.queued.push(sender);
        self.run_pass(ctx);
        Box::pin(async move {
            let _ = receiver.await;
        })
    }
}

impl Handler<ObserveBackground> for Reconciler {
    type Result = MessageResult<ObserveBackground>;

    fn handle(&mut self, _: ObserveBackground, _ctx: &mut Self::Context) -> Self::Result {
        let state = self.inner.memory.borrow().state.clone();
        MessageResult(serde_json::to_value(state).expect("reconciler state serializes"))
    }
}

impl Handler<StopReconciler> for Reconciler {
    type Result = ();

    fn handle(&mut self, _: StopReconciler, _ctx: &mut Self::Context) {
        self.stopping = true;
    }
}
