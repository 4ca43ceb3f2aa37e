//! The domain actor of `product-events`.
//!
//! Product events (created, price or stock changed) are not modelled yet; the topic carries
//! pipeline probes, which the [`DomainActor`](crate::actors::domain::DomainActor) wrapper
//! completes. Any other event type arriving here is refused as permanent and
//! dead-lettered.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::LocalBoxFuture;

use crate::actors::domain::{BatchOrigin, DomainHandler, EventOutcome, HandlerError};
use crate::events::EventEnvelope;

#[derive(Debug, Default)]
pub struct ProductEventProcessor;

impl DomainHandler for ProductEventProcessor {
    fn name(&self) -> &'static str {
        "ProductEventProcessor"
    }

    fn handle(
        &mut self,
        _origin: &BatchOrigin,
        events: Arc<[EventEnvelope]>,
    ) -> LocalBoxFuture<'static, Vec<EventOutcome>> {
        let outcomes = events
            .iter()
            .map(|event| {
                EventOutcome::Failed(HandlerError::permanent(format!(
                    "{} is not a product event",
                    event.event_type()
                )))
            })
            .collect();
        futures::future::ready(outcomes).boxed_local()
    }
}
