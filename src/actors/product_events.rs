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

use crate::actors::domain::{BatchOrigin, DomainHandler, EventOutcome, HandlerError};
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
            let mut outcomes: Vec<Option<EventOutcome>> = vec![None; events.len()];
            let mut changes = Vec::new();
            let mut positions = Vec::new();
            for (position, event) in events.iter().enumerate() {
                match &event.payload {
                    EventPayload::ProductChanged(change) => {
                        changes.push(change);
                        positions.push(position);
                    }
                    _ => {
                        outcomes[position] = Some(EventOutcome::Failed(HandlerError::permanent(
                            format!("{} is not a product event", event.event_type()),
                        )))
                    }
                }
            }
            let applied = cache.apply(&changes).await;
            for (index, position) in positions.into_iter().enumerate() {
                outcomes[position] = Some(match &applied {
                    Ok(flags) if flags[index] => EventOutcome::Done,
                    Ok(_) => EventOutcome::Duplicate,
                    Err(error) => EventOutcome::Failed(HandlerError::retryable(format!(
                        "product cache not updated: {error}"
                    ))),
                });
            }
            outcomes
                .into_iter()
                .map(|outcome| outcome.expect("every event has an outcome"))
                .collect()
        }
        .boxed_local()
    }
}
