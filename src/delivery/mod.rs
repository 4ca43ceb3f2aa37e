//! Delivering events to external systems: webhooks (and the analytics file), the first
//! attempt inside the partition's batch ([`forwarder`]), later attempts on a back-off
//! schedule kept in MySQL ([`scheduler`]), dead letters and their replay.
//!
//! Every attempt, first or later, goes through [`Deliveries::attempt`]: deliver, class the
//! answer ([`webhook::classify`]), settle the event-log row (COMPLETED; FAILED with the next
//! attempt's time; or dead-lettered with an alert), counted in one [`DeliveryCounters`].
//!
//! A target whose latest attempts failed for `external.target_down_after_failures`
//! different events, with none delivered since, is down ([`TargetCircuits`]): that is the
//! target's outage, not the events' fault. While it is down a failed attempt spends none of the event's attempts and
//! never dead-letters it; the event waits (1 s → 30 s) and the first delivery that goes
//! through brings the target back. One event that keeps failing while the target delivers
//! others exhausts its own attempts and is dead-lettered.

pub mod backoff;
pub mod forwarder;
pub mod moves;
pub mod ordering;
pub mod scheduler;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tracing::{error, info, warn};

use crate::common::clock::SharedClock;
use crate::common::error::{Classify, Dependency, ErrorClass};
use crate::config::{AnalyticsSettings, ExternalSettings};
use crate::event_log::{EventLog, EventLogError, EventRecord, Move, StatusChange};
use crate::events::{EventEnvelope, EventId, EventType};
use crate::kafka::TopicPartition;
use crate::kafka::dead_letter::{DeadLetter, DeadLetterError, DeadLetters};
use crate::observability::outages::Outages;
use crate::observability::{alerts, metrics};
use backoff::BackoffPolicy;
use webhook::{DeliveryOutcome, Target, WebhookDeliverer};

/// Why an attempt could not be settled; the event keeps its lease, which expires, and the
/// attempt runs again.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error("no dead-letter topic for events of {0}")]
    NoDeadLetterTopic(String),
    #[error("the event-log row of {0} vanished")]
    Vanished(EventId),
}

impl Classify for DeliveryError {
    fn class(&self) -> ErrorClass {
        match self {
            DeliveryError::EventLog(error) => error.class(),
            DeliveryError::DeadLetter(error) => error.class(),
            DeliveryError::NoDeadLetterTopic(_) | DeliveryError::Vanished(_) => {
                ErrorClass::Permanent
            }
        }
    }
}

/// Which attempt this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The forwarder's, inside the partition's batch.
    First,
    /// The retry scheduler's.
    Later,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "camelCase")]
pub enum Settled {
    Delivered,
    Scheduled {
        at: DateTime<Utc>,
    },
    /// The target is down: the event waits for it without spending an attempt.
    Waiting {
        at: DateTime<Utc>,
    },
    DeadLettered {
        alert: Alert,
    },
}

/// Whether each delivery target answers, from the attempts' outcomes in a row.
pub struct TargetCircuits {
    down_after: u32,
    outages: Outages,
    targets: std::sync::Mutex<BTreeMap<String, Circuit>>,
}

#[derive(Default)]
struct Circuit {
    /// The events whose latest attempt failed since the target last delivered one (at most
    /// `down_after` of them are kept).
    failing: std::collections::BTreeSet<EventId>,
    /// Failed attempts since the target went down.
    failures_while_down: u32,
    down: bool,
}

/// How long an event of a target that is down waits before the next try.
const TARGET_DOWN_INITIAL_DELAY: Duration = Duration::from_secs(1);
const TARGET_DOWN_MAX_DELAY: Duration = Duration::from_secs(30);

impl TargetCircuits {
    pub fn new(down_after: u32, outages: Outages) -> Self {
        Self {
            down_after: down_after.max(1),
            outages,
            targets: std::sync::Mutex::default(),
        }
    }

    /// A delivery to `target` went through.
    pub fn delivered(&self, target: &str) {
        let mut targets = self.targets.lock().expect("target circuits");
        let circuit = targets.entry(target.to_string()).or_default();
        circuit.failing.clear();
        circuit.failures_while_down = 0;
        if std::mem::take(&mut circuit.down) {
            info!(target, "delivery target answers again");
            self.outages.recovered(Dependency::DeliveryTarget, target);
        }
    }

    /// An attempt at delivering `event` to `target` failed in a way worth retrying. While
    /// the target is down (the latest attempts of `down_after` different events failed,
    /// none delivered since), how long the event should wait; `None`: the target is up and
    /// the event's own back-off applies.
    pub fn failed(&self, target: &str, event: EventId, error: &str) -> Option<Duration> {
        let mut targets = self.targets.lock().expect("target circuits");
        let circuit = targets.entry(target.to_string()).or_default();
        if !circuit.down {
            if circuit.failing.len() < self.down_after as usize {
                circuit.failing.insert(event);
            }
            if circuit.failing.len() < self.down_after as usize {
                return None;
            }
            circuit.down = true;
            warn!(
                target,
                events = circuit.failing.len(),
                "delivery target down: its events wait without spending attempts"
            );
        }
        self.outages
            .report(Dependency::DeliveryTarget, target, error);
        let doublings = circuit.failures_while_down.min(16);
        circuit.failures_while_down = circuit.failures_while_down.saturating_add(1);
        Some(
            TARGET_DOWN_INITIAL_DELAY
                .saturating_mul(1 << doublings)
                .min(TARGET_DOWN_MAX_DELAY),
        )
    }

    /// The targets down now.
    pub fn down(&self) -> Vec<String> {
        let targets = self.targets.lock().expect("target circuits");
        targets
            .iter()
            .filter(|(_, circuit)| circuit.down)
            .map(|(target, _)| target.clone())
            .collect()
    }
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

/// The counters of every attempt, whoever made it.
#[derive(Debug, Default)]
pub struct DeliveryCounters {
    first_attempts: AtomicU64,
    attempts: AtomicU64,
    delivered: AtomicU64,
    scheduled: AtomicU64,
    waiting_for_target: AtomicU64,
    parked: AtomicU64,
    dead_lettered: AtomicU64,
    replayed: AtomicU64,
    alerts: AtomicU64,
    alerts_failed: AtomicU64,
}

/// What the admin view shows of deliveries (under the retry scheduler).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryState {
    /// First attempts (the forwarders').
    pub first_attempts: u64,
    /// Later attempts (the retry scheduler's).
    pub attempts: u64,
    pub delivered: u64,
    /// Failed attempts given a next attempt.
    pub scheduled: u64,
    /// Failed attempts at a target that was down: the event waited, spending no attempt.
    pub waiting_for_target: u64,
    /// Records parked behind an earlier record of their key that waits for a retry (`key`
    /// ordering), counted each time one is parked.
    pub parked: u64,
    /// Targets down now.
    pub targets_down: Vec<String>,
    pub dead_lettered: u64,
    pub replayed: u64,
    /// Alerts raised (one per dead letter) and alert posts that failed.
    pub alerts: u64,
    pub alerts_failed: u64,
}

impl DeliveryCounters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn state(&self) -> DeliveryState {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DeliveryState {
            first_attempts: read(&self.first_attempts),
            attempts: read(&self.attempts),
            delivered: read(&self.delivered),
            scheduled: read(&self.scheduled),
            waiting_for_target: read(&self.waiting_for_target),
            parked: read(&self.parked),
            targets_down: Vec::new(),
            dead_lettered: read(&self.dead_lettered),
            replayed: read(&self.replayed),
            alerts: read(&self.alerts),
            alerts_failed: read(&self.alerts_failed),
        }
    }
}

/// The targets deliveries go to: `external.*` (none when `external.base_url` is empty) and
/// the analytics platform (its URL, or a JSON-lines file), for completed orders.
pub fn targets(
    external: &ExternalSettings,
    analytics: &AnalyticsSettings,
) -> anyhow::Result<BTreeMap<EventType, Target>> {
    let mut targets = WebhookDeliverer::external_targets(external)?;
    targets.insert(
        EventType::OrderCompleted,
        if analytics.url.is_empty() {
            Target::File(PathBuf::from(&analytics.file))
        } else {
            Target::Http(analytics.url.clone())
        },
    );
    Ok(targets)
}

/// Everything an attempt needs; cheap to clone, shared by the forwarders and the retry
/// scheduler.
#[derive(Clone)]
pub struct Deliveries {
    inner: Arc<DeliveriesInner>,
}

struct DeliveriesInner {
    deliverer: WebhookDeliverer,
    event_log: EventLog,
    /// Dead letters of each delivered topic (named after its consumer group).
    dead_letters: BTreeMap<String, DeadLetters>,
    policy: BackoffPolicy,
    clock: SharedClock,
    lease: Duration,
    alert_url: Option<String>,
    counters: DeliveryCounters,
    circuits: TargetCircuits,
    completions: moves::Completions,
    takes: moves::Takes,
}

/// What [`Deliveries`] is made of.
pub struct DeliveriesWiring {
    pub deliverer: WebhookDeliverer,
    pub event_log: EventLog,
    pub dead_letters: BTreeMap<String, DeadLetters>,
    pub policy: BackoffPolicy,
    pub clock: SharedClock,
    pub lease: Duration,
    pub alert_url: Option<String>,
    /// Failed attempts in a row after which a target is down.
    pub target_down_after_failures: u32,
    pub outages: Outages,
}

/// Until when an attempt starting now (on `clock`) holds its event for `lease`.
fn lease_until(clock: &SharedClock, lease: Duration) -> DateTime<Utc> {
    clock.now() + chrono::Duration::from_std(lease).expect("a representable lease")
}

/// An event this instance holds for an attempt (IN_PROGRESS, under its lease).
pub struct Held<'a> {
    pub envelope: &'a EventEnvelope,
    /// Its row, when the caller has read it (the scheduler claims rows; the forwarder reads
    /// the row only when the first attempt fails).
    pub record: Option<&'a EventRecord>,
}

impl Deliveries {
    pub fn new(wiring: DeliveriesWiring) -> Self {
        Self {
            inner: Arc::new(DeliveriesInner {
                deliverer: wiring.deliverer,
                completions: moves::Completions::new(wiring.event_log.clone()),
                takes: moves::Takes::new(
                    wiring.event_log.clone(),
                    wiring.clock.clone(),
                    wiring.lease,
                ),
                event_log: wiring.event_log,
                dead_letters: wiring.dead_letters,
                policy: wiring.policy,
                clock: wiring.clock,
                lease: wiring.lease,
                alert_url: wiring.alert_url,
                counters: DeliveryCounters::default(),
                circuits: TargetCircuits::new(wiring.target_down_after_failures, wiring.outages),
            }),
        }
    }

    pub fn event_log(&self) -> &EventLog {
        &self.inner.event_log
    }

    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    pub fn deliverer(&self) -> &WebhookDeliverer {
        &self.inner.deliverer
    }

    pub fn counters(&self) -> &DeliveryCounters {
        &self.inner.counters
    }

    /// The counters, and the targets down now.
    pub fn state(&self) -> DeliveryState {
        DeliveryState {
            targets_down: self.inner.circuits.down(),
            ..self.inner.counters.state()
        }
    }

    /// A record was parked behind an earlier record of its key.
    pub fn count_parked(&self) {
        DeliveryCounters::add(&self.inner.counters.parked);
    }

    /// Takes the event read at `source` for its first attempt (with the others taken now).
    pub async fn take(
        &self,
        id: EventId,
        source: crate::event_log::Provenance,
    ) -> Result<crate::event_log::Transition, EventLogError> {
        self.inner.takes.take(id, source).await
    }

    /// Until when an attempt starting now holds its event.
    pub fn lease_until(&self) -> DateTime<Utc> {
        lease_until(&self.inner.clock, self.inner.lease)
    }

    /// One attempt at a held event: deliver, class the answer, settle the row.
    pub async fn attempt(
        &self,
        held: Held<'_>,
        attempt: Attempt,
    ) -> Result<Settled, DeliveryError> {
        let counters = &self.inner.counters;
        DeliveryCounters::add(match attempt {
            Attempt::First => &counters.first_attempts,
            Attempt::Later => &counters.attempts,
        });
        let now = self.inner.clock.now();
        let outcome = self.inner.deliverer.deliver(held.envelope, now).await;
        let event_id = held.envelope.event_id;
        let target = self.inner.deliverer.target_name(held.envelope.event_type());
        if outcome == DeliveryOutcome::Delivered {
            self.inner.circuits.delivered(&target);
            // Should recording fail, the receiver has it anyway: the lease expires and a
            // second delivery comes with the same webhook-id, which receivers deduplicate.
            self.inner.completions.complete(event_id).await?;
            DeliveryCounters::add(&counters.delivered);
            metrics::webhook_delivered(
                held.envelope.event_type().as_str(),
                held.envelope.occurred_at,
            );
            metrics::delivery_attempt(attempt == Attempt::Later, "delivered");
            return Ok(Settled::Delivered);
        }
        let loaded;
        let record = match held.record {
            Some(record) => record,
            None => {
                loaded = self
                    .inner
                    .event_log
                    .find(event_id)
                    .await?
                    .ok_or(DeliveryError::Vanished(event_id))?;
                &loaded
            }
        };
        metrics::delivery_attempt(
            attempt == Attempt::Later,
            match outcome {
                DeliveryOutcome::Rejected { .. } => "rejected",
                _ => "failed",
            },
        );
        self.after_failure(record, &target, outcome).await
    }

    /// The next attempt's time, or the dead letter.
    async fn after_failure(
        &self,
        record: &EventRecord,
        target: &str,
        outcome: DeliveryOutcome,
    ) -> Result<Settled, DeliveryError> {
        if let DeliveryOutcome::Retry { error, after } = &outcome
            && let Some(wait) = self.inner.circuits.failed(target, record.event_id, error)
        {
            let wait = after.map_or(wait, |asked| asked.max(wait));
            let at = self.inner.clock.now()
                + chrono::Duration::from_std(wait).expect("a representable delay");
            let error = format!("{error} (target down)");
            let change = StatusChange::new(Move::Fail).with_error(&error).due_at(at);
            self.inner
                .event_log
                .change_status(record.event_id, change)
                .await?;
            DeliveryCounters::add(&self.inner.counters.waiting_for_target);
            return Ok(Settled::Waiting { at });
        }
        let failed_attempts = record.retry_count.max(0) as u32 + 1;
        let (error, delay, kind) = match outcome {
            DeliveryOutcome::Delivered => unreachable!("a delivered attempt is not a failure"),
            DeliveryOutcome::Rejected { error } => (error, None, "rejected"),
            DeliveryOutcome::Retry { error, after } => {
                let delay = self
                    .inner
                    .policy
                    .delay_after(failed_attempts)
                    .map(|delay| after.map_or(delay, |asked| asked.max(delay)));
                (error, delay, "retries-exhausted")
            }
        };
        let Some(delay) = delay else {
            let alert = self
                .dead_letter(record, failed_attempts, kind, &error)
                .await?;
            return Ok(Settled::DeadLettered { alert });
        };
        let at = self.inner.clock.now()
            + chrono::Duration::from_std(delay).expect("a representable delay");
        let change = StatusChange::new(Move::Fail)
            .with_error(&error)
            .counting_attempt()
            .due_at(at);
        self.inner
            .event_log
            .change_status(record.event_id, change)
            .await?;
        DeliveryCounters::add(&self.inner.counters.scheduled);
        metrics::retry_scheduled();
        info!(event_id = %record.event_id, attempt = failed_attempts, %error, next_attempt_at = %at, "delivery failed; retry scheduled");
        Ok(Settled::Scheduled { at })
    }

    async fn dead_letter(
        &self,
        record: &EventRecord,
        attempts: u32,
        kind: &str,
        error: &str,
    ) -> Result<Alert, DeliveryError> {
        let message = format!("{error} (after {attempts} attempts)");
        let dead_letters = self
            .inner
            .dead_letters
            .get(&record.topic)
            .ok_or_else(|| DeliveryError::NoDeadLetterTopic(record.topic.clone()))?;
        // The partition and offset were recorded when the event was first read.
        let provenance = record.source;
        let source = TopicPartition::new(
            &record.topic,
            provenance.map_or(0, |provenance| provenance.partition),
        );
        let value = record.envelope().encode();
        dead_letters
            .send(DeadLetter {
                source: &source,
                offset: provenance.map_or(-1, |provenance| provenance.offset),
                key: Some(record.key.as_bytes()),
                value: Some(&value),
                event_id: Some(record.event_id),
                count_attempt: true,
                error_kind: kind,
                error: &message,
            })
            .await?;
        let counters = &self.inner.counters;
        DeliveryCounters::add(&counters.dead_lettered);
        DeliveryCounters::add(&counters.alerts);
        metrics::alert_raised("delivery_dead_lettered");
        error!(
            alert = true,
            event_id = %record.event_id,
            event_type = %record.event_type,
            attempts,
            error = %message,
            "event dead-lettered: an administrator must look at it (POST /admin/events/{{id}}/replay to retry)"
        );
        let Some(url) = &self.inner.alert_url else {
            return Ok(Alert::Logged);
        };
        let alert = json!({
            "alert": "EVENT_DEAD_LETTERED",
            "eventId": record.event_id,
            "eventType": record.event_type,
            "topic": record.topic,
            "attempts": attempts,
            "lastError": message,
        });
        match alerts::post(url, &alert).await {
            Ok(()) => Ok(Alert::Posted),
            Err(alert_error) => {
                DeliveryCounters::add(&counters.alerts_failed);
                warn!(event_id = %record.event_id, error = %alert_error, "administrator alert not delivered");
                Ok(Alert::PostFailed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_down_after_failures_of_different_events_and_up_after_one_delivery() {
        let outages = Outages::default();
        let circuits = TargetCircuits::new(3, outages.clone());
        let target = "http://receiver/webhooks";
        let (first, second, third) = (
            EventId::generate(),
            EventId::generate(),
            EventId::generate(),
        );

        // One event failing again and again is that event's trouble.
        for _ in 0..10 {
            assert_eq!(circuits.failed(target, first, "HTTP 500"), None);
        }
        assert_eq!(circuits.failed(target, second, "HTTP 500"), None);
        assert_eq!(
            circuits.failed(target, third, "HTTP 500"),
            Some(Duration::from_secs(1)),
            "the third event failing makes the target down"
        );
        assert!(outages.is_down(Dependency::DeliveryTarget));
        assert_eq!(circuits.down(), vec![target.to_string()]);
        let waits: Vec<_> = (0..7)
            .map(|_| {
                circuits
                    .failed(target, first, "HTTP 500")
                    .unwrap()
                    .as_secs()
            })
            .collect();
        assert_eq!(
            waits,
            vec![2, 4, 8, 16, 30, 30, 30],
            "capped back-off while down"
        );

        circuits.delivered(target);
        assert!(!outages.is_down(Dependency::DeliveryTarget));
        assert!(circuits.down().is_empty());
        assert_eq!(circuits.failed(target, first, "HTTP 500"), None, "up again");
    }
}
