//! The domain actor of `product-events`: keeps the Redis product cache
//! ([`ProductCache`]) that `GET /products/{id}` reads through.
//!
//! A batch of ProductChanged events is one compare-and-set script call: a change older than
//! (or as old as) the cached state is a duplicate. Redis failures are retryable. Pipeline
//! probes are completed by the [`DomainActor`](crate::actors::domain::DomainActor) wrapper;
//! any other event type is refused as permanent and dead-lettered.

use crate::actors::domain::{AppliedInOneCall, Batch, DomainHandler, EventOutcome, Stats};
use crate::events::EventPayload;
use crate::shop::cache::ProductCache;

pub struct ProductEventProcessor {
    cache: ProductCache,
}

impl ProductEventProcessor {
    pub fn new(cache: ProductCache) -> Self {
        Self { cache }
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
        let applied = self.cache.apply(&selected.items).await;
        selected.settle(applied, "product cache not updated")
    }
}
