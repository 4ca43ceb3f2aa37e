//! The forwarders: the domain actors of `external-events` (ExternalForwarder) and of
//! `order-completed` in `order-analytics-group` (OrderAnalytics).
//!
//! For each event a forwarder takes the event (PENDING, PUBLISHED or FAILED → IN_PROGRESS,
//! with a lease and the partition and offset it was read from) and makes the first
//! attempt ([`Deliveries::attempt`]): delivered, it is COMPLETED; failed, the retry
//! schedule or the dead-letter topic takes it. Either way the event is settled for this
//! partition, whose offset moves on — a failing receiver never holds the partition. An
//! event already taken (a redelivery) is a duplicate.

use futures::StreamExt;

use crate::actors::domain::{Batch, DomainHandler, EventOutcome, HandlerError, Stats};
use crate::delivery::{Attempt, Deliveries, Held};
use crate::event_log::{Move, StatusChange, Transition};
use crate::events::EventEnvelope;

/// Deliveries one batch makes at once; outcomes keep the events' order.
const CONCURRENT_DELIVERIES: usize = 16;

pub struct Forwarder {
    name: &'static str,
    deliveries: Deliveries,
}

impl Forwarder {
    /// A forwarder called `name` in the actor tree.
    pub fn new(name: &'static str, deliveries: Deliveries) -> Self {
        Self { name, deliveries }
    }

    async fn first_attempt(
        &self,
        event: &EventEnvelope,
        partition: i32,
        offset: i64,
    ) -> EventOutcome {
        let deliveries = &self.deliveries;
        if !deliveries.deliverer().routes(event.event_type()) {
            return EventOutcome::Failed(HandlerError::permanent(format!(
                "no webhook route for {}",
                event.event_type()
            )));
        }
        let take = StatusChange::new(Move::Take)
            .due_at(deliveries.lease_until())
            .read_from(partition, offset);
        match deliveries
            .event_log()
            .change_status(event.event_id, take)
            .await
        {
            Ok(Transition::Applied) => {}
            Ok(Transition::Skipped) => {
                return match deliveries.event_log().find(event.event_id).await {
                    Ok(Some(_)) => EventOutcome::Duplicate,
                    Ok(None) => EventOutcome::Failed(HandlerError::permanent(
                        "the event has no event-log row: it was not published through the outbox",
                    )),
                    Err(error) => EventOutcome::Failed(HandlerError::from_error(&error)),
                };
            }
            Err(error) => return EventOutcome::Failed(HandlerError::from_error(&error)),
        }
        let held = Held {
            envelope: event,
            record: None,
        };
        match deliveries.attempt(held, Attempt::First).await {
            Ok(_) => EventOutcome::Done,
            Err(error) => EventOutcome::Failed(HandlerError::from_error(&error)),
        }
    }
}

impl DomainHandler for Forwarder {
    /// The counters are the deliveries' own, shown under the retry scheduler.
    type Stats = ();

    fn name(&self) -> &'static str {
        self.name
    }

    async fn handle(&self, batch: &Batch, _stats: &Stats<()>) -> Vec<EventOutcome> {
        let partition = batch.origin.source.partition;
        futures::stream::iter(batch.with_offsets())
            .map(|(event, offset)| self.first_attempt(event, partition, offset))
            .buffered(CONCURRENT_DELIVERIES)
            .collect()
            .await
    }
}
