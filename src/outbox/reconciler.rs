//! The reconciler: finds events a consumer has not settled and drives them again.
//!
//! Every `reconcile.interval_ms`, for each consumer of this instance ([`Consumers`]), it
//! walks the consumer's events in id order (ids are time-ordered) from its checkpoint and
//! asks the consumer's [`Settlement`] whether it has settled each of them. The checkpoint
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
//! Driving again is the settlement's: publishing the event to its topic once more (every
//! consumer of the topic deduplicates it by event id), or, for a consumer whose progress
//! lives elsewhere, handing it over there (idempotently). Rows still PENDING are the outbox
//! relay's. Events recorded proven (see [`crate::outbox`]) have no PENDING state: the
//! reconciler is what publishes them again when their publication failed, after
//! `reconcile.proven_after_ms` (5 s, at most `after_ms`). A consumer whose events are
//! recorded in other events' rows walks those rows, and its settlement says since when each
//! waits.
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

use crate::actors::tree::ObserveBackground;
use crate::actors::{PassGate, spawn_supervised_pass};
use crate::config::ReconcileSettings;
use crate::event_log::{EventLog, EventLogError, EventRecord};
use crate::events::EventId;
use crate::kafka::offsets::{GroupOffsets, PartitionPosition};
use crate::outbox::settlement::{Consumers, Settlement, SettlementError};

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
    pub consumers: BTreeMap<&'static str, ConsumerReconciliation>,
    /// The settlements' own figures (for example the ranking's rebuilds), by name.
    #[serde(flatten)]
    pub figures: BTreeMap<&'static str, u64>,
}

/// What the reconciler is made of.
pub struct ReconcilerWiring {
    /// Every consumer of this instance, with its settlement.
    pub consumers: Consumers,
    pub event_log: EventLog,
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
    #[error("checkpoint unreadable: {0}")]
    Checkpoint(#[from] sqlx::Error),
    #[error("group offsets unreadable: {0}")]
    Offsets(String),
    #[error(transparent)]
    Settlement(#[from] SettlementError),
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
    gate: PassGate,
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
            gate: PassGate::default(),
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
        if self.gate.running() {
            return;
        }
        if self.gate.stopping() || !self.inner.wiring.settings.enabled {
            for waiter in self.queued.drain(..) {
                let _ = waiter.send(());
            }
            return;
        }
        if !(self.inner.wiring.groups_ready)() {
            return;
        }
        self.gate.begin();
        self.running = std::mem::take(&mut self.queued);
        let inner = self.inner.clone();
        let pass = async move { inner.pass().await };
        spawn_supervised_pass(ctx, "Reconciler", pass, |reconciler: &mut Self, ()| {
            reconciler.gate.end();
            for waiter in reconciler.running.drain(..) {
                let _ = waiter.send(());
            }
        });
    }
}

impl Inner {
    async fn pass(&self) {
        for settlement in self.wiring.consumers.all() {
            let name = settlement.consumer().name;
            if let Err(error) = self.reconcile(settlement.as_ref()).await {
                warn!(consumer = name, %error, "reconciliation pass failed");
                let mut memory = self.memory.borrow_mut();
                memory.state.errors += 1;
                memory.state.last_error = Some(format!("{name}: {error}"));
            }
        }
        let mut memory = self.memory.borrow_mut();
        memory.state.passes += 1;
        let fresh_pending = self.wiring.fresh_cluster_since.is_some()
            && memory.fresh_done.len() < self.wiring.consumers.all().len();
        memory.state.fresh_cluster_pending = fresh_pending;
    }

    /// Whether this pass is the first on a freshly started embedded cluster for `name`.
    fn fresh_for(&self, name: &'static str) -> Option<DateTime<Utc>> {
        self.wiring
            .fresh_cluster_since
            .filter(|_| !self.memory.borrow().fresh_done.contains(name))
    }

    /// Until when an unsettled event of `consumer` counts as stranded (`None`: its group
    /// lags, nothing is).
    async fn stranded_before(
        &self,
        settlement: &dyn Settlement,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, ReconcileError> {
        let consumer = settlement.consumer();
        if let Some(since) = self.fresh_for(consumer.name) {
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
        Ok(read_past(&positions, &previous.ends, local.as_ref()).then_some(previous.at))
    }

    async fn reconcile(&self, settlement: &dyn Settlement) -> Result<(), ReconcileError> {
        let consumer = settlement.consumer();
        let event_types = settlement.event_types();
        if event_types.is_empty() {
            return Ok(());
        }
        settlement.prepare().await?;
        let mut transaction = self.wiring.event_log.pool().begin().await?;
        let Some(checkpoint) = lock_checkpoint(&mut transaction, consumer.name).await? else {
            // Another instance is reconciling this consumer right now.
            return Ok(());
        };
        let now = Utc::now();
        let stranded_before = self.stranded_before(settlement, now).await?;
        let fresh = stranded_before.is_some() && self.fresh_for(consumer.name).is_some();
        let walk = Walk {
            settlement,
            event_types: &event_types,
            stranded_before,
            fresh,
            now,
        };
        let walked = self.walk(&walk, checkpoint.parse().ok()).await?;
        if let Some(moved_to) = walked.checkpoint_moved_to {
            sqlx::query!(
                "UPDATE reconcile_checkpoint SET event_id = ? WHERE consumer = ?",
                moved_to,
                consumer.name
            )
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        if walked.redriven > 0 {
            info!(
                consumer = consumer.name,
                redriven = walked.redriven,
                fresh_cluster = fresh,
                "stranded events driven again"
            );
        }
        self.record(consumer.name, &walked, fresh, stranded_before.is_none());
        Ok(())
    }

    /// Walks the consumer's events from `after` page by page: the settled prefix moves the
    /// checkpoint, stranded events are driven again.
    async fn walk(
        &self,
        walk: &Walk<'_>,
        mut after: Option<EventId>,
    ) -> Result<Walked, ReconcileError> {
        let settings = &self.wiring.settings;
        let consumer = walk.settlement.consumer();
        let walk_before = if walk.fresh {
            EventId::first_at(walk.now)
        } else {
            let shortest_after = walk
                .event_types
                .iter()
                .map(|event_type| settings.after(event_type.as_str(), event_type.recorded_proven()))
                .min()
                .unwrap_or_default();
            EventId::first_at(walk.now - to_chrono(shortest_after))
        };
        let page_size = settings.batch_size.max(1);
        let mut walked = Walked::default();
        let mut prefix_settled = true;
        for _ in 0..PAGES_PER_PASS {
            let page = self
                .wiring
                .event_log
                .of_types_between(walk.event_types, after, walk_before, page_size)
                .await?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.event_id);
            let settled = walk.settlement.settled(&page).await?;
            for (record, settled) in page.iter().zip(settled) {
                if settled {
                    self.memory
                        .borrow_mut()
                        .redriven
                        .remove(&(consumer.name, record.event_id));
                    if prefix_settled {
                        walked.checkpoint_moved_to = Some(record.event_id);
                        walked.settled += 1;
                    }
                    continue;
                }
                prefix_settled = false;
                walked.unsettled += 1;
                if self.is_stranded(walk, record) {
                    walk.settlement.drive_again(record).await?;
                    self.memory
                        .borrow_mut()
                        .redriven
                        .insert((consumer.name, record.event_id), Instant::now());
                    walked.redriven += 1;
                }
            }
            // A group that lags strands nothing, and the checkpoint cannot pass the first
            // unsettled event: walking on would read a backlog page after page, each pass,
            // for nothing. Likewise behind events that wait for another consumer's work.
            let nothing_more = (walk.stranded_before.is_none()
                || walk.settlement.waits_for_earlier_work(&page))
                && !prefix_settled;
            if nothing_more || page.len() < page_size as usize {
                break;
            }
        }
        Ok(walked)
    }

    fn is_stranded(&self, walk: &Walk<'_>, record: &EventRecord) -> bool {
        let after = self.wiring.settings.after(
            record.event_type.as_str(),
            record.event_type.recorded_proven(),
        );
        let last_driven = self
            .memory
            .borrow()
            .redriven
            .get(&(walk.settlement.consumer().name, record.event_id))
            .map(Instant::elapsed);
        is_stranded(
            walk.settlement.waiting_since(record),
            walk.stranded_before,
            StrandedRule {
                after,
                fresh: walk.fresh,
                now: walk.now,
            },
            last_driven,
        )
    }

    /// Adds one consumer's pass to the observable state.
    fn record(&self, name: &'static str, walked: &Walked, fresh: bool, lagging: bool) {
        let mut memory = self.memory.borrow_mut();
        if fresh {
            memory.fresh_done.insert(name);
        }
        let entry = memory.state.consumers.entry(name).or_default();
        entry.settled += walked.settled;
        entry.redriven += walked.redriven;
        entry.unsettled = walked.unsettled;
        entry.lagging += u64::from(lagging);
        if walked.checkpoint_moved_to.is_some() {
            entry.checkpoint = walked.checkpoint_moved_to;
        }
    }

    /// The state, with the settlements' own figures.
    fn observe(&self) -> ReconcilerState {
        let mut state = self.memory.borrow().state.clone();
        for settlement in self.wiring.consumers.all() {
            state.figures.extend(settlement.figures());
        }
        state
    }
}

/// One consumer's walk at one pass.
struct Walk<'a> {
    settlement: &'a dyn Settlement,
    event_types: &'a [crate::events::EventType],
    stranded_before: Option<DateTime<Utc>>,
    fresh: bool,
    now: DateTime<Utc>,
}

/// What one consumer's walk found.
#[derive(Default)]
struct Walked {
    checkpoint_moved_to: Option<EventId>,
    settled: u64,
    redriven: u64,
    unsettled: u64,
}

/// The consumer's checkpoint, its row locked for this pass; `None` while another instance
/// holds it.
async fn lock_checkpoint(
    transaction: &mut sqlx::MySqlConnection,
    consumer: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query!(
        "INSERT IGNORE INTO reconcile_checkpoint (consumer, event_id) VALUES (?, '')",
        consumer
    )
    .execute(&mut *transaction)
    .await?;
    sqlx::query_scalar!(
        "SELECT event_id FROM reconcile_checkpoint WHERE consumer = ? FOR UPDATE SKIP LOCKED",
        consumer
    )
    .fetch_optional(&mut *transaction)
    .await
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or_default()
}

/// Whether a group has read past the ends its partitions had at the previous pass
/// (`previous_ends`): on every partition, its next offset is at or beyond that end. The
/// next offset is the group's committed one, or, for a group that commits nothing, its
/// member's own position in this process (`local`; a partition the member has not been
/// given is not read past).
pub fn read_past(
    positions: &[PartitionPosition],
    previous_ends: &BTreeMap<i32, i64>,
    local: Option<&BTreeMap<i32, i64>>,
) -> bool {
    positions.iter().all(|position| {
        let end = previous_ends.get(&position.partition).copied().unwrap_or(0);
        let next = match local {
            Some(local) => local.get(&position.partition).copied().unwrap_or(-1),
            None => position.committed.unwrap_or(0),
        };
        next >= end
    })
}

/// The settings of one pass that the stranded rule reads.
#[derive(Clone, Copy, Debug)]
pub struct StrandedRule {
    /// How long an event must have waited (`reconcile.after_ms`, or its type's).
    pub after: Duration,
    /// The first pass on a fresh embedded cluster: no wait.
    pub fresh: bool,
    pub now: DateTime<Utc>,
}

/// Whether an unsettled event is stranded: it waits (`waiting_since`) from before the time
/// up to which its group has read past (`stranded_before`; `None`: the group lags), for at
/// least `after` (unless the cluster is fresh), and was not driven again within `after`
/// (`last_driven`: how long ago it was).
pub fn is_stranded(
    waiting_since: Option<DateTime<Utc>>,
    stranded_before: Option<DateTime<Utc>>,
    rule: StrandedRule,
    last_driven: Option<Duration>,
) -> bool {
    let (Some(before), Some(since)) = (stranded_before, waiting_since) else {
        return false;
    };
    if since >= before {
        return false;
    }
    if !rule.fresh && rule.now - since < to_chrono(rule.after) {
        return false;
    }
    // Driven again already, recently: give that record the same time.
    last_driven.is_none_or(|ago| ago >= rule.after)
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
        self.gate.end();
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
        let state = self.inner.observe();
        MessageResult(serde_json::to_value(state).expect("reconciler state serializes"))
    }
}

impl Handler<StopReconciler> for Reconciler {
    type Result = ();

    fn handle(&mut self, _: StopReconciler, _ctx: &mut Self::Context) {
        self.gate.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(partition: i32, committed: Option<i64>, end: i64) -> PartitionPosition {
        PartitionPosition {
            partition,
            committed,
            end,
            start: 0,
        }
    }

    #[test]
    fn a_group_has_read_past_when_every_partition_is_beyond_the_previous_end() {
        let previous_ends = BTreeMap::from([(0, 10), (1, 5)]);
        let caught_up = [position(0, Some(10), 12), position(1, Some(7), 9)];
        assert!(read_past(&caught_up, &previous_ends, None));
        let one_behind = [position(0, Some(10), 12), position(1, Some(4), 9)];
        assert!(!read_past(&one_behind, &previous_ends, None));
        // Nothing committed counts as offset 0: behind any record.
        let never_committed = [position(0, None, 12), position(1, Some(7), 9)];
        assert!(!read_past(&never_committed, &previous_ends, None));
        // A partition new since the previous pass had no end then.
        let new_partition = [position(2, None, 3)];
        assert!(read_past(&new_partition, &previous_ends, None));
    }

    #[test]
    fn a_group_that_commits_nothing_is_judged_by_its_members_own_positions() {
        let previous_ends = BTreeMap::from([(0, 10), (1, 5)]);
        let positions = [position(0, None, 12), position(1, None, 9)];
        let local = BTreeMap::from([(0, 11), (1, 5)]);
        assert!(read_past(&positions, &previous_ends, Some(&local)));
        // A partition this member has not been given is not read past.
        let only_one = BTreeMap::from([(0, 11)]);
        assert!(!read_past(&positions, &previous_ends, Some(&only_one)));
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn rule(now: i64, fresh: bool) -> StrandedRule {
        StrandedRule {
            after: Duration::from_secs(30),
            fresh,
            now: at(now),
        }
    }

    #[test]
    fn an_event_is_stranded_once_its_group_read_past_it_and_it_waited_long_enough() {
        let published = Some(at(0));
        // The group read past the ends of a pass 40 s after the event; it waited 60 s.
        assert!(is_stranded(published, Some(at(40)), rule(60, false), None));
        // Its group lags: nothing is stranded.
        assert!(!is_stranded(published, None, rule(60, false), None));
        // The group read past a pass from before the event: the record may still come.
        assert!(!is_stranded(published, Some(at(0)), rule(60, false), None));
        // Not waited `after` yet.
        assert!(!is_stranded(published, Some(at(10)), rule(20, false), None));
        // Nothing to drive yet (not published, or its result not decided).
        assert!(!is_stranded(None, Some(at(40)), rule(60, false), None));
    }

    #[test]
    fn on_a_fresh_cluster_the_wait_is_waived_but_not_the_order() {
        let published = Some(at(0));
        assert!(is_stranded(published, Some(at(5)), rule(10, true), None));
        assert!(!is_stranded(published, Some(at(0)), rule(10, true), None));
    }

    #[test]
    fn an_event_driven_again_gets_the_same_wait_before_the_next_time() {
        let published = Some(at(0));
        let stranded_before = Some(at(40));
        let recently = Some(Duration::from_secs(5));
        let long_ago = Some(Duration::from_secs(31));
        assert!(!is_stranded(
            published,
            stranded_before,
            rule(60, false),
            recently
        ));
        assert!(is_stranded(
            published,
            stranded_before,
            rule(60, false),
            long_ago
        ));
    }
}
