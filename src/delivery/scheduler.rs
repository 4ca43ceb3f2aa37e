//! The RetryScheduler: owns back-off and dead-lettering of deliveries to external systems.
//!
//! A failed attempt is reported to it ([`AttemptFailed`]); it decides, with the pure
//! [`BackoffPolicy`], when the next attempt is due and writes that time into the event's
//! event-log row (FAILED, `next_attempt_at`), or dead-letters the event when no attempt is
//! left or the receiver refused it. The schedule lives in MySQL, so it survives restarts.
//!
//! Every `poll_interval_ms` it claims due events ([`EventLog::claim_due`]: row locks other
//! instances skip, and a lease while the attempt runs, so an attempt never runs twice at
//! once) and makes the next attempt. Dead-lettering publishes the event to
//! `<topic>.DLT` with its provenance, marks it DEAD_LETTER and raises an administrator alert:
//! an error-level log line with `alert = true`, a counter, and a POST to `alert_url` when
//! configured. [`Replay`] puts a dead letter back on the schedule.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use tracing::{error, info, warn};

use crate::clock::SharedClock;
use crate::delivery::backoff::BackoffPolicy;
use crate::delivery::webhook::{DeliveryOutcome, WebhookDeliverer};
use crate::event_log::{
    EventLog, EventLogError, EventRecord, EventStatus, StatusChange, Transition,
};
use crate::events::{EventEnvelope, EventId, EventType};
use crate::kafka::TopicPartition;
use crate::kafka::dead_letter::{DeadLetter, DeadLetters};

/// How many attempts one pass runs at once.
const CONCURRENT_ATTEMPTS: usize = 16;

/// An attempt failed; decide what comes next.
#[derive(Message)]
#[rtype(result = "Result<NextStep, EventLogError>")]
pub struct AttemptFailed {
    pub record: EventRecord,
    pub outcome: DeliveryOutcome,
}

/// What the scheduler did with a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "camelCase")]
pub enum NextStep {
    Scheduled { at: chrono::DateTime<chrono::Utc> },
    DeadLettered { alert: Alert },
}

/// How the administrator was alerted of a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Alert {
    /// The error-level log line and the counter only (no `alert_url`).
    Logged,
    /// Also posted to `alert_url`.
    Posted,
    /// Posting to `alert_url` failed (logged too).
    PostFailed,
}

/// Puts a dead letter back on the schedule, due now, with its attempts counted afresh.
#[derive(Message)]
#[rtype(result = "Result<Replayed, EventLogError>")]
pub struct Replay {
    pub event_id: EventId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "replay", rename_all = "camelCase")]
pub enum Replayed {
    Scheduled { at: chrono::DateTime<chrono::Utc> },
    NotFound,
    NotDeadLettered { status: EventStatus },
}

/// Asks for the observable state.
#[derive(Message)]
#[rtype(result = "RetrySchedulerState")]
pub struct ObserveScheduler;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetrySchedulerState {
    /// Failed attempts given a next attempt.
    pub scheduled: u64,
    /// Attempts this scheduler made (first attempts are the forwarder's).
    pub attempts: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub replayed: u64,
    /// Alerts raised (one per dead letter) and alert posts that failed.
    pub alerts: u64,
    pub alerts_failed: u64,
}

/// What the scheduler is made of.
pub struct RetrySchedulerWiring {
    pub event_log: EventLog,
    pub deliverer: WebhookDeliverer,
    /// Dead letters of each topic's events (named after its consumer group).
    pub dead_letters: BTreeMap<String, DeadLetters>,
    pub policy: BackoffPolicy,
    pub clock: SharedClock,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub claim_batch: u32,
    pub alert_url: Option<String>,
    /// The event types it delivers.
    pub event_types: Vec<EventType>,
}

/// Stops claiming attempts and waits (up to `timeout`) for the running ones to be recorded.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopScheduler {
    pub timeout: Duration,
}

pub struct RetryScheduler {
    wiring: RetrySchedulerWiring,
    busy: bool,
    stopping: bool,
    /// `true` while no pass runs.
    idle: tokio::sync::watch::Sender<bool>,
    state: RetrySchedulerState,
}

impl RetryScheduler {
    pub fn new(wiring: RetrySchedulerWiring) -> Self {
        Self {
            wiring,
            busy: false,
            stopping: false,
            idle: tokio::sync::watch::Sender::new(true),
            state: RetrySchedulerState::default(),
        }
    }

    /// Claims the due events and attempts each.
    fn run_due(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.stopping {
            return;
        }
        self.busy = true;
        self.idle.send_replace(false);
        let now = self.wiring.clock.now();
        let lease_until =
            now + chrono::Duration::from_std(self.wiring.lease).expect("a representable lease");
        let event_log = self.wiring.event_log.clone();
        let event_types = self.wiring.event_types.clone();
        let limit = self.wiring.claim_batch;
        let claim = async move {
            event_log
                .claim_due(&event_types, now, lease_until, limit)
                .await
        };
        ctx.spawn(actix::fut::wrap_future(claim).then(|claimed, scheduler: &mut Self, _ctx| {
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(error) => {
                    warn!(%error, "cannot claim due attempts");
                    Vec::new()
                }
            };
            scheduler.state.attempts += claimed.len() as u64;
            let deliverer = scheduler.wiring.deliverer.clone();
            let clock = scheduler.wiring.clock.clone();
            let attempts = futures::stream::iter(claimed)
                .map(move |record| {
                    let deliverer = deliverer.clone();
                    let now = clock.now();
                    async move {
                        let outcome = match envelope_of(&record) {
                            Ok(envelope) => deliverer.deliver(&envelope, now).await,
                            Err(error) => DeliveryOutcome::Rejected { error },
                        };
                        (record, outcome)
                    }
                })
                .buffer_unordered(CONCURRENT_ATTEMPTS)
                .collect::<Vec<_>>();
            actix::fut::wrap_future(attempts)
        })
        .then(|attempted, scheduler: &mut Self, _ctx| {
            let settled: Vec<_> = attempted
                .into_iter()
                .map(|(record, outcome)| scheduler.settle(record, outcome))
                .collect();
            actix::fut::wrap_future(futures::future::join_all(settled))
        })
        .map(|settled, scheduler: &mut Self, _ctx| {
            scheduler.busy = false;
            scheduler.idle.send_replace(true);
            for step in settled {
                match step {
                    Ok(Settled::Delivered) => scheduler.state.delivered += 1,
                    Ok(Settled::Next(next)) => scheduler.count(next),
                    Err(error) => warn!(%error, "recording an attempt failed; its lease will expire and it will run again"),
                }
            }
        }));
    }

    fn count(&mut self, next: NextStep) {
        match next {
            NextStep::Scheduled { .. } => self.state.scheduled += 1,
            NextStep::DeadLettered { alert } => {
                self.state.dead_lettered += 1;
                self.state.alerts += 1;
                if alert == Alert::PostFailed {
                    self.state.alerts_failed += 1;
                }
            }
        }
    }

    /// Records the outcome of an attempt this scheduler made.
    fn settle(
        &self,
        record: EventRecord,
        outcome: DeliveryOutcome,
    ) -> impl Future<Output = Result<Settled, EventLogError>> + use<> {
        let steps = self.steps();
        async move {
            match outcome {
                DeliveryOutcome::Delivered => {
                    let id = parse_id(&record)?;
                    steps
                        .event_log
                        .change_status(id, StatusChange::to(EventStatus::Completed))
                        .await?;
                    Ok(Settled::Delivered)
                }
                failed => steps.after_failure(record, failed).await.map(Settled::Next),
            }
        }
    }

    fn steps(&self) -> Steps {
        Steps {
            event_log: self.wiring.event_log.clone(),
            dead_letters: self.wiring.dead_letters.clone(),
            policy: self.wiring.policy,
            clock: self.wiring.clock.clone(),
            alert_url: self.wiring.alert_url.clone(),
        }
    }
}

enum Settled {
    Delivered,
    Next(NextStep),
}

/// What deciding after a failure needs, detached from the actor.
struct Steps {
    event_log: EventLog,
    dead_letters: BTreeMap<String, DeadLetters>,
    policy: BackoffPolicy,
    clock: SharedClock,
    alert_url: Option<String>,
}

impl Steps {
    /// The next attempt's time, or the dead letter.
    async fn after_failure(
        &self,
        record: EventRecord,
        outcome: DeliveryOutcome,
    ) -> Result<NextStep, EventLogError> {
        let id = parse_id(&record)?;
        let failed_attempts = record.retry_count.max(0) as u32 + 1;
        let (error, delay, kind) = match outcome {
            DeliveryOutcome::Delivered => unreachable!("a delivered attempt is not a failure"),
            DeliveryOutcome::Rejected { error } => (error, None, "rejected"),
            DeliveryOutcome::Retry { error, after } => {
                let delay = self
                    .policy
                    .delay_after(failed_attempts)
                    .map(|delay| after.map_or(delay, |asked| asked.max(delay)));
                (error, delay, "retries-exhausted")
            }
        };
        match delay {
            Some(delay) => {
                let at = self.clock.now()
                    + chrono::Duration::from_std(delay).expect("a representable delay");
                let change = StatusChange::to(EventStatus::Failed)
                    .with_error(&error)
                    .counting_attempt()
                    .due_at(at);
                self.event_log.change_status(id, change).await?;
                info!(event_id = %id, attempt = failed_attempts, %error, next_attempt_at = %at, "delivery failed; retry scheduled");
                Ok(NextStep::Scheduled { at })
            }
            None => {
                let alert = self
                    .dead_letter(&record, id, failed_attempts, kind, &error)
                    .await?;
                Ok(NextStep::DeadLettered { alert })
            }
        }
    }

    async fn dead_letter(
        &self,
        record: &EventRecord,
        id: EventId,
        attempts: u32,
        kind: &str,
        error: &str,
    ) -> Result<Alert, EventLogError> {
        let message = format!("{error} (after {attempts} attempts)");
        // The partition and offset were recorded when the event was first read.
        let source = TopicPartition::new(&record.topic, record.source_partition.unwrap_or(0));
        let value = envelope_of(record).map(|envelope| envelope.encode()).ok();
        let letter = DeadLetter {
            source: &source,
            offset: record.source_offset.unwrap_or(-1),
            key: Some(record.key.as_bytes()),
            value: value.as_deref(),
            event_id: Some(id),
            error_kind: kind,
            error: &message,
        };
        let Some(dead_letters) = self.dead_letters.get(&record.topic) else {
            return Err(EventLogError::CorruptRow(format!(
                "no dead-letter topic for events of {}",
                record.topic
            )));
        };
        if let Err(publish_error) = dead_letters.publish(letter).await {
            // The event stays where it is; its lease expires and the attempt runs again.
            return Err(EventLogError::CorruptRow(format!(
                "dead letter not published: {publish_error}"
            )));
        }
        let change = StatusChange::to(EventStatus::DeadLetter)
            .with_error(&message)
            .counting_attempt();
        self.event_log.change_status(id, change).await?;
        error!(
            alert = true,
            event_id = %id,
            event_type = %record.event_type,
            attempts,
            error = %message,
            "event dead-lettered: an administrator must look at it (POST /admin/events/{{id}}/replay to retry)"
        );
        let Some(url) = &self.alert_url else {
            return Ok(Alert::Logged);
        };
        {
            let alert = json!({
                "alert": "EVENT_DEAD_LETTERED",
                "eventId": id,
                "eventType": record.event_type,
                "topic": record.topic,
                "attempts": attempts,
                "lastError": message,
            });
            match WebhookDeliverer::post_alert(url, &alert, Duration::from_secs(5)).await {
                Ok(()) => Ok(Alert::Posted),
                Err(alert_error) => {
                    warn!(event_id = %id, error = %alert_error, "administrator alert not delivered");
                    Ok(Alert::PostFailed)
                }
            }
        }
    }
}

fn parse_id(record: &EventRecord) -> Result<EventId, EventLogError> {
    record
        .event_id
        .parse()
        .map_err(|_| EventLogError::CorruptRow(format!("event id {:?}", record.event_id)))
}

fn envelope_of(record: &EventRecord) -> Result<EventEnvelope, String> {
    let id = record
        .event_id
        .parse()
        .map_err(|_| format!("event id {:?}", record.event_id))?;
    EventEnvelope::from_parts(
        id,
        &record.event_type,
        record.key.clone(),
        record.occurred_at,
        &record.payload.to_string(),
    )
    .map_err(|error| error.to_string())
}

impl Actor for RetryScheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.wiring.poll_interval, |scheduler, ctx| {
            scheduler.run_due(ctx)
        });
    }
}

impl Handler<AttemptFailed> for RetryScheduler {
    type Result = ResponseActFuture<Self, Result<NextStep, EventLogError>>;

    fn handle(&mut self, failed: AttemptFailed, _ctx: &mut Self::Context) -> Self::Result {
        let steps = self.steps();
        let next = async move { steps.after_failure(failed.record, failed.outcome).await };
        Box::pin(
            actix::fut::wrap_future(next).map(|next, scheduler: &mut Self, _ctx| {
                if let Ok(next) = &next {
                    scheduler.count(*next);
                }
                next
            }),
        )
    }
}

impl Handler<Replay> for RetryScheduler {
    type Result = ResponseActFuture<Self, Result<Replayed, EventLogError>>;

    fn handle(&mut self, replay: Replay, _ctx: &mut Self::Context) -> Self::Result {
        let event_log = self.wiring.event_log.clone();
        let now = self.wiring.clock.now();
        let work = async move {
            let Some(record) = event_log.find(replay.event_id).await? else {
                return Ok(Replayed::NotFound);
            };
            if record.status != EventStatus::DeadLetter {
                return Ok(Replayed::NotDeadLettered {
                    status: record.status,
                });
            }
            let change = StatusChange::to(EventStatus::Failed)
                .resetting_attempts()
                .due_at(now);
            match event_log.change_status(replay.event_id, change).await? {
                Transition::Applied => Ok(Replayed::Scheduled { at: now }),
                // Moved on meanwhile (another replay).
                Transition::Skipped => Ok(match event_log.find(replay.event_id).await? {
                    Some(record) => Replayed::NotDeadLettered {
                        status: record.status,
                    },
                    None => Replayed::NotFound,
                }),
            }
        };
        Box::pin(
            actix::fut::wrap_future(work).map(|replayed, scheduler: &mut Self, _ctx| {
                if let Ok(Replayed::Scheduled { .. }) = &replayed {
                    scheduler.state.replayed += 1;
                }
                replayed
            }),
        )
    }
}

impl Handler<StopScheduler> for RetryScheduler {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, stop: StopScheduler, _ctx: &mut Self::Context) -> Self::Result {
        self.stopping = true;
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

impl Handler<ObserveScheduler> for RetryScheduler {
    type Result = MessageResult<ObserveScheduler>;

    fn handle(&mut self, _: ObserveScheduler, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.clone())
    }
}
