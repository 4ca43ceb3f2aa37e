//! The ExternalForwarder: the domain actor of `external-events`.
//!
//! For each event it takes the event (PENDING or PUBLISHED → IN_PROGRESS, with a lease and
//! the partition and offset it was read from), makes the first delivery attempt, and on
//! success marks it COMPLETED. A failed attempt goes to the RetryScheduler, which schedules
//! the next one or dead-letters the event; either way the event is settled for this
//! partition, whose offset moves on — a failing receiver never holds the partition. An event
//! already taken (a redelivery) is a duplicate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use futures::future::LocalBoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Serialize;

use crate::actors::domain::{BatchOrigin, DomainHandler, EventOutcome, HandlerError};
use crate::clock::SharedClock;
use crate::delivery::scheduler::{AttemptFailed, RetryScheduler};
use crate::delivery::webhook::{DeliveryOutcome, WebhookDeliverer};
use crate::event_log::{EventLog, EventStatus, StatusChange, Transition};
use crate::events::EventEnvelope;

/// Deliveries one batch makes at once; outcomes keep the events' order.
const CONCURRENT_DELIVERIES: usize = 16;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwarderStats {
    /// Delivered at the first attempt.
    pub delivered: u64,
    /// Handed to the RetryScheduler after a failed first attempt.
    pub handed_to_scheduler: u64,
}

pub struct ExternalForwarder {
    name: &'static str,
    attempt: FirstAttempt,
}

impl ExternalForwarder {
    /// A forwarder called `name` in the actor tree.
    pub fn new(
        name: &'static str,
        deliverer: WebhookDeliverer,
        event_log: EventLog,
        scheduler: Addr<RetryScheduler>,
        clock: SharedClock,
        lease: Duration,
    ) -> Self {
        Self {
            name,
            attempt: FirstAttempt {
                deliverer,
                event_log,
                scheduler,
                clock,
                lease,
                stats: Arc::default(),
            },
        }
    }
}

/// One event's first attempt, detached from the actor.
#[derive(Clone)]
struct FirstAttempt {
    deliverer: WebhookDeliverer,
    event_log: EventLog,
    scheduler: Addr<RetryScheduler>,
    clock: SharedClock,
    lease: Duration,
    stats: Arc<Mutex<ForwarderStats>>,
}

impl FirstAttempt {
    async fn run(self, event: EventEnvelope, partition: i32, offset: i64) -> EventOutcome {
        if !self.deliverer.routes(event.event_type()) {
            return EventOutcome::Failed(HandlerError::permanent(format!(
                "no webhook route for {}",
                event.event_type()
            )));
        }
        let now = self.clock.now();
        let lease_until =
            now + chrono::Duration::from_std(self.lease).expect("a representable lease");
        let take = StatusChange::to(EventStatus::InProgress)
            .due_at(lease_until)
            .read_from(partition, offset);
        match self.event_log.change_status(event.event_id, take).await {
            Ok(Transition::Applied) => {}
            Ok(Transition::Skipped) => {
                return match self.event_log.find(event.event_id).await {
                    Ok(Some(_)) => EventOutcome::Duplicate,
                    Ok(None) => EventOutcome::Failed(HandlerError::permanent(
                        "the event has no event-log row: it was not published through the outbox",
                    )),
                    Err(error) => EventOutcome::Failed(HandlerError::from_error(&error)),
                };
            }
            Err(error) => return EventOutcome::Failed(HandlerError::from_error(&error)),
        }
        match self.deliverer.deliver(&event, now).await {
            DeliveryOutcome::Delivered => {
                let completed = self
                    .event_log
                    .change_status(event.event_id, StatusChange::to(EventStatus::Completed))
                    .await;
                match completed {
                    Ok(_) => {
                        self.stats.lock().expect("stats lock").delivered += 1;
                        EventOutcome::Done
                    }
                    // The receiver has it; the lease expires and a second delivery comes
                    // with the same webhook-id, which receivers deduplicate.
                    Err(error) => EventOutcome::Failed(HandlerError::from_error(&error)),
                }
            }
            failed => self.hand_over(event, failed).await,
        }
    }

    async fn hand_over(self, event: EventEnvelope, outcome: DeliveryOutcome) -> EventOutcome {
        let record = match self.event_log.find(event.event_id).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                return EventOutcome::Failed(HandlerError::permanent("the event-log row vanished"));
            }
            Err(error) => return EventOutcome::Failed(HandlerError::from_error(&error)),
        };
        match self.scheduler.send(AttemptFailed { record, outcome }).await {
            Ok(Ok(_next)) => {
                self.stats.lock().expect("stats lock").handed_to_scheduler += 1;
                EventOutcome::Done
            }
            Ok(Err(error)) => EventOutcome::Failed(HandlerError::from_error(&error)),
            Err(mailbox) => EventOutcome::Failed(HandlerError::retryable(format!(
                "retry scheduler unavailable: {mailbox}"
            ))),
        }
    }
}

impl DomainHandler for ExternalForwarder {
    fn name(&self) -> &'static str {
        self.name
    }

    fn handle(
        &mut self,
        origin: &BatchOrigin,
        events: Arc<[EventEnvelope]>,
    ) -> LocalBoxFuture<'static, Vec<EventOutcome>> {
        let attempt = self.attempt.clone();
        let partition = origin.source.partition;
        let offsets = origin.offsets.clone();
        async move {
            futures::stream::iter(
                events
                    .iter()
                    .cloned()
                    .zip(offsets.iter().copied())
                    .collect::<Vec<_>>(),
            )
            .map(|(event, offset)| attempt.clone().run(event, partition, offset))
            .buffered(CONCURRENT_DELIVERIES)
            .collect()
            .await
        }
        .boxed_local()
    }

    fn details(&self) -> Option<serde_json::Value> {
        let stats = self.attempt.stats.lock().expect("stats lock").clone();
        Some(serde_json::to_value(stats).expect("stats serialize"))
    }
}
