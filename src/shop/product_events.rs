//! The domain actor of `product-events`: keeps the Redis product cache
//! ([`ProductCache`]) that `GET /products/{id}` reads through.
//!
//! A batch of ProductChanged events is one compare-and-set script call: a change older than
//! (or as old as) the cached state is a duplicate. Redis failures are retryable. Pipeline
//! probes are completed by the [`DomainActor`](crate::actors::domain::DomainActor) wrapper;
//! any other event type is refused as permanent and dead-lettered.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::LocalBoxFuture;

use crate::actors::domain::{AppliedInOneCall, BatchOrigin, DomainHandler, EventOutcome};
use crate::events::{EventEnvelope, EventPayload};
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
    fn name(&self) -> &'static str {
        "ProductEventProcessor"
    }

    fn handle(
        &mut self,
        _origin: &BatchOrigin,
        events: Arc<[EventEnvelope]>,
    ) -> LocalBoxFuture<'static, Vec<EventOutcome>> {
        let cache = self.cache.clone();
        async move {
            let selected =
                AppliedInOneCall::select(&events, "a product event", |event| {
                    match &event.payload {
                        EventPayload::ProductChanged(change) => Some(change),
                        _ => None,
                    }
                });
            let applied = cache.apply(&selected.items).await;
            selected.settle(applied, "product cache not updated")
        }
        .boxed_local()
    }
}
