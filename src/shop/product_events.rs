//! The domain actor of `product-events`: keeps the Redis product cache
//! ([`ProductCache`]) that `GET /products/{id}` reads through.
//!
//! A batch of ProductChanged events is one compare-and-set script call: a change older than
//! (or as old as) the cached state is a duplicate. Then the events' rows become COMPLETED
//! (one statement), which is this consumer's progress. A Redis or MySQL outage pauses the
//! partition until the store answers (the cache is repaired from the events). Pipeline
//! probes are completed by the [`DomainActor`](crate::actors::domain::DomainActor) wrapper;
//! any other event type is refused as permanent and dead-lettered.

use crate::actors::domain::{
    AppliedInOneCall, Batch, DomainHandler, EventOutcome, HandlerError, Stats,
};
use crate::event_log::{EventLog, Move, StatusChange};
use crate::events::{EventId, EventPayload};
use crate::shop::cache::ProductCache;

pub struct ProductEventProcessor {
    cache: ProductCache,
    event_log: EventLog,
}

impl ProductEventProcessor {
    pub fn new(cache: ProductCache, event_log: EventLog) -> Self {
        Self { cache, event_log }
    }

    async fn complete(&self, ids: &[EventId]) -> Result<u64, crate::event_log::EventLogError> {
        let mut connection = self.event_log.pool().acquire().await?;
        EventLog::change_status_of_many_in(&mut connection, ids, StatusChange::new(Move::Complete))
            .await
    }
}

impl DomainHandler for ProductEventProcessor {
    /// Nothing beyond the wrapper's counters.
    type Stats = ();

    fn name(&self) -> &'static str {
        "ProductEventProcessor"
    }

    async fn handle(&self, batch: &Batch, _stats: &Stats<()>) -> Vec<EventOutcome> {
        let selected = AppliedInOneCall::select(&batch.events, "a product event", |event| {
            match &event.payload {
                EventPayload::ProductChanged(change) => Some(change),
                _ => None,
            }
        });
        let ids: Vec<EventId> = batch
            .events
            .iter()
            .filter(|event| matches!(event.payload, EventPayload::ProductChanged(_)))
            .map(|event| event.event_id)
            .collect();
        let applied = self.cache.apply(&selected.items).await;
        let outcomes = selected.settle(applied, "product cache not updated");
        if outcomes.iter().any(EventOutcome::is_transient) || ids.is_empty() {
            return outcomes;
        }
        match self.complete(&ids).await {
            Ok(_) => outcomes,
            Err(error) => {
                vec![EventOutcome::Failed(HandlerError::from_error(&error)); outcomes.len()]
            }
        }
    }
}
