//! The RetryScheduler: makes every delivery attempt after the first, and replays dead
//! letters.
//!
//! The schedule is the event-log row: a failed attempt leaves it FAILED with
//! `next_attempt_at` ([`Deliveries::attempt`] decides when, with the pure back-off policy),
//! so it survives restarts with nothing to reload. Every `poll_interval_ms` the scheduler
//! claims due events ([`crate::event_log::EventLog::claim_due`]: row locks other instances skip, and a lease
//! while the attempt runs, so an attempt never runs twice at once) and makes the next
//! attempt through the same path as the first.
//!
//! Under `key` ordering ([`super::ordering`]) the claimed records of one key run one after
//! the other, in offset order, and a record whose key has an earlier unfinished record is
//! parked again behind it instead of attempted.
//!
//! [`Replay`] puts a dead letter back on its way: a delivered event back on the schedule
//! (due now, attempts counted afresh), any other event back to PENDING for the relay.
//!
//! Supervised: a pass that panics stops the actor, and the `Supervisor` restarts it
//! (counted); the events of that pass keep their leases, which expire, and run again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::StreamExt;
use serde::Serialize;
use tracing::warn;

use crate::actors::tree::ObserveBackground;
use crate::actors::{PassGate, spawn_supervised_pass};
use crate::delivery::ordering::{self, WaitingBehind};
use crate::delivery::{Attempt, Deliveries, DeliveryCounters, DeliveryState, Held, Settled};
use crate::event_log::{EventLogError, EventRecord, EventStatus, Move, StatusChange, Transition};
use crate::events::{EventId, EventType};

/// How many attempts one pass runs at once.
const CONCURRENT_ATTEMPTS: usize = 16;

/// Puts a dead letter back on its way, with its attempts counted afresh.
#[derive(Message)]
#[rtype(result = "Result<Replayed, EventLogError>")]
pub struct Replay {
    pub event_id: EventId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "replay", rename_all = "camelCase")]
pub enum Replayed {
    /// A delivered event, due again at `at`.
    Scheduled {
        at: chrono::DateTime<chrono::Utc>,
    },
    /// Back to PENDING: the outbox relay publishes it again.
    Republishing,
    NotFound,
    NotDeadLettered {
        status: EventStatus,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetrySchedulerState {
    #[serde(flatten)]
    pub deliveries: DeliveryState,
    /// Passes that panicked and restarted the scheduler.
    pub restarts: u64,
}

/// Stops claiming attempts and waits (up to `timeout`) for the running ones to be recorded.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopScheduler {
    pub timeout: Duration,
}

pub struct RetryScheduler {
    deliveries: Deliveries,
    /// The event types it delivers.
    event_types: Vec<EventType>,
    poll_interval: Duration,
    claim_batch: u32,
    key_ordered: Arc<HashSet<String>>,
    gate: PassGate,
    /// `true` while no pass runs.
    idle: tokio::sync::watch::Sender<bool>,
    restarts: u64,
}

impl RetryScheduler {
    /// A scheduler of `deliveries`' events; the records of `key_ordered` topics keep their
    /// key's order across retries.
    pub fn new(
        deliveries: Deliveries,
        poll_interval: Duration,
        claim_batch: u32,
        key_ordered: HashSet<String>,
    ) -> Self {
        Self {
            event_types: deliveries.deliverer().event_types(),
            deliveries,
            poll_interval,
            claim_batch: claim_batch.max(1),
            key_ordered: Arc::new(key_ordered),
            gate: PassGate::default(),
            idle: tokio::sync::watch::Sender::new(true),
            restarts: 0,
        }
    }

    /// Claims the due events and attempts each.
    fn run_due(&mut self, ctx: &mut Context<Self>) {
        if !self.gate.begin() {
            return;
        }
        self.idle.send_replace(false);
        let pass = Pass {
            deliveries: self.deliveries.clone(),
            event_types: self.event_types.clone(),
            claim_batch: self.claim_batch,
            key_ordered: self.key_ordered.clone(),
        };
        spawn_supervised_pass(
            ctx,
            "RetryScheduler",
            pass.run(),
            |scheduler: &mut Self, ()| {
                scheduler.gate.end();
                scheduler.idle.send_replace(true);
            },
        );
    }
}

/// One pass, detached from the actor.
struct Pass {
    deliveries: Deliveries,
    event_types: Vec<EventType>,
    claim_batch: u32,
    /// The topics whose records keep their key's order.
    key_ordered: Arc<HashSet<String>>,
}

/// Claimed records that run one after the other: one key's (of one partition, in offset
/// order) under `key` ordering, else a single record.
struct Lane {
    /// The topic, partition and key, under `key` ordering.
    key: Option<(String, i32, String)>,
    records: Vec<EventRecord>,
}

impl Pass {
    async fn run(self) {
        let now = self.deliveries.clock().now();
        let claimed = self
            .deliveries
            .event_log()
            .claim_due(
                &self.event_types,
                now,
                self.deliveries.lease_until(),
                self.claim_batch,
            )
            .await;
        let claimed = match claimed {
            Ok(claimed) => claimed,
            Err(error) => {
                warn!(%error, "cannot claim due attempts");
                return;
            }
        };
        let handled: HashSet<EventId> = claimed.iter().map(|record| record.event_id).collect();
        let lanes = self.lanes(claimed);
        let mut behind = match self.earlier_unfinished(&lanes, &handled).await {
            Ok(behind) => behind,
            Err(error) => {
                // The claims' leases expire and the records run again.
                warn!(%error, "cannot read what the claimed records' keys wait behind");
                return;
            }
        };
        let runs: Vec<_> = lanes
            .into_iter()
            .map(|lane| {
                let waiting = lane.key.as_ref().and_then(|key| behind.remove(key));
                self.run_lane(lane, waiting)
            })
            .collect();
        futures::stream::iter(runs)
            .for_each_concurrent(CONCURRENT_ATTEMPTS, |run| run)
            .await;
    }

    fn lanes(&self, claimed: Vec<EventRecord>) -> Vec<Lane> {
        let mut lanes: Vec<Lane> = Vec::new();
        let mut lane_of: HashMap<(String, i32, String), usize> = HashMap::new();
        for record in claimed {
            let key = record
                .source
                .filter(|_| self.key_ordered.contains(&record.topic))
                .map(|source| (record.topic.clone(), source.partition, record.key.clone()));
            match key.as_ref().and_then(|key| lane_of.get(key)) {
                Some(&lane) => lanes[lane].records.push(record),
                None => {
                    if let Some(key) = &key {
                        lane_of.insert(key.clone(), lanes.len());
                    }
                    lanes.push(Lane {
                        key,
                        records: vec![record],
                    });
                }
            }
        }
        for lane in &mut lanes {
            lane.records
                .sort_by_key(|record| record.source.map(|source| source.offset));
        }
        lanes
    }

    /// What each key-ordered lane waits behind: its key's earliest unfinished record that
    /// this pass did not claim. One statement per partition.
    async fn earlier_unfinished(
        &self,
        lanes: &[Lane],
        handled: &HashSet<EventId>,
    ) -> Result<HashMap<(String, i32, String), WaitingBehind>, EventLogError> {
        let mut keys_of: BTreeMap<(&str, i32), Vec<&str>> = BTreeMap::new();
        for (topic, partition, key) in lanes.iter().filter_map(|lane| lane.key.as_ref()) {
            keys_of
                .entry((topic.as_str(), *partition))
                .or_default()
                .push(key.as_str());
        }
        let mut behind = HashMap::new();
        for ((topic, partition), keys) in keys_of {
            let unfinished = self
                .deliveries
                .event_log()
                .unfinished_of_keys(topic, partition, &keys)
                .await?;
            for (key, waiting) in ordering::waiting_behind(unfinished, handled) {
                behind.insert((topic.to_string(), partition, key), waiting);
            }
        }
        Ok(behind)
    }

    /// A lane's records in order; one waiting behind an unfinished earlier record of its
    /// key is parked again instead of attempted.
    async fn run_lane(&self, lane: Lane, mut behind: Option<WaitingBehind>) {
        let deliveries = &self.deliveries;
        for record in &lane.records {
            let offset = record.source.map(|source| source.offset);
            if let (Some(waiting), Some(offset)) = (&behind, offset)
                && waiting.holds(offset)
            {
                let reason = waiting.reason(&record.key);
                let park = StatusChange::new(Move::Fail)
                    .with_error(&reason)
                    .due_at(waiting.recheck_at(deliveries.clock().now()));
                match deliveries
                    .event_log()
                    .change_status(record.event_id, park)
                    .await
                {
                    Ok(_) => deliveries.count_parked(),
                    Err(error) => {
                        warn!(event_id = %record.event_id, %error, "cannot park a record behind its key; its lease will expire and it will be looked at again");
                    }
                }
                continue;
            }
            let envelope = record.envelope();
            let held = Held {
                envelope: &envelope,
                record: Some(record),
            };
            match deliveries.attempt(held, Attempt::Later).await {
                Ok(Settled::Scheduled { at } | Settled::Waiting { at }) => {
                    if lane.key.is_some()
                        && let Some(offset) = offset
                    {
                        behind.get_or_insert(WaitingBehind::scheduled(record.event_id, offset, at));
                    }
                }
                Ok(Settled::Delivered | Settled::DeadLettered { .. }) => {}
                Err(error) => {
                    warn!(event_id = %record.event_id, %error, "recording an attempt failed; its lease will expire and it will run again");
                    if lane.key.is_some()
                        && let Some(offset) = offset
                    {
                        behind.get_or_insert(WaitingBehind {
                            event_id: record.event_id,
                            offset,
                            status: EventStatus::InProgress,
                            due: deliveries.lease_until(),
                        });
                    }
                }
            }
        }
    }
}

impl Actor for RetryScheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.poll_interval, |scheduler, ctx| scheduler.run_due(ctx));
    }
}

impl Supervised for RetryScheduler {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts += 1;
        self.gate.end();
        self.idle.send_replace(true);
        warn!(restarts = self.restarts, "retry scheduler restarting");
    }
}

impl Handler<Replay> for RetryScheduler {
    type Result = ResponseFuture<Result<Replayed, EventLogError>>;

    fn handle(&mut self, replay: Replay, _ctx: &mut Self::Context) -> Self::Result {
        let deliveries = self.deliveries.clone();
        Box::pin(async move {
            let replayed = replay_dead_letter(&deliveries, replay.event_id).await?;
            if matches!(
                replayed,
                Replayed::Scheduled { .. } | Replayed::Republishing
            ) {
                DeliveryCounters::add(&deliveries.counters().replayed);
            }
            Ok(replayed)
        })
    }
}

/// A dead letter back to the schedule (events with a delivery target) or to the relay.
async fn replay_dead_letter(
    deliveries: &Deliveries,
    event_id: EventId,
) -> Result<Replayed, EventLogError> {
    let event_log = deliveries.event_log();
    let Some(record) = event_log.find(event_id).await? else {
        return Ok(Replayed::NotFound);
    };
    if record.status != EventStatus::DeadLetter {
        return Ok(Replayed::NotDeadLettered {
            status: record.status,
        });
    }
    let now = deliveries.clock().now();
    let (change, replayed) = if deliveries.deliverer().routes(record.event_type) {
        (
            StatusChange::new(Move::ReplayToSchedule).due_at(now),
            Replayed::Scheduled { at: now },
        )
    } else {
        (
            StatusChange::new(Move::ReplayToRelay),
            Replayed::Republishing,
        )
    };
    match event_log
        .change_status(event_id, change.resetting_attempts())
        .await?
    {
        Transition::Applied => Ok(replayed),
        // Moved on meanwhile (another replay).
        Transition::Skipped => Ok(match event_log.find(event_id).await? {
            Some(record) => Replayed::NotDeadLettered {
                status: record.status,
            },
            None => Replayed::NotFound,
        }),
    }
}

impl Handler<StopScheduler> for RetryScheduler {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, stop: StopScheduler, _ctx: &mut Self::Context) -> Self::Result {
        self.gate.stop();
        let mut idle = self.idle.subscribe();
        Box::pin(async move {
            let waited = tokio::time::timeout(stop.timeout, idle.wait_for(|idle| *idle)).await;
            if waited.is_err() {
                warn!(
                    "retry scheduler stopped with attempts running; their leases will expire and they run again"
                );
            }
        })
    }
}

impl Handler<ObserveBackground> for RetryScheduler {
    type Result = MessageResult<ObserveBackground>;

    fn handle(&mut self, _: ObserveBackground, _ctx: &mut Self::Context) -> Self::Result {
        let state = RetrySchedulerState {
            deliveries: self.deliveries.state(),
            restarts: self.restarts,
        };
        MessageResult(serde_json::to_value(state).expect("scheduler state serializes"))
    }
}
