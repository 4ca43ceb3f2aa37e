//! Domain actors: the supervised actors that own a topic's business logic.
//!
//! Every domain actor is a [`DomainActor`] around a [`DomainHandler`] (CouponIssuer,
//! RankingUpdater, ExternalForwarder, ...). The wrapper supplies what all of them share:
//! supervision (a fatal error or a panic stops the actor and actix's `Supervisor` restarts
//! it; the batch is answered with a fatal outcome first, so the partition actor retries it),
//! counters for the admin view, and pipeline probes, which it completes itself for every
//! topic.
//!
//! Batches from different partitions are handled concurrently; each partition actor keeps
//! at most one batch in flight, so the order within a partition holds.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::prelude::*;
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::Serialize;
use tracing::{error, warn};

use crate::error::{Classify, ErrorClass};
use crate::event_log::{EventLog, EventStatus, StatusChange, Transition};
use crate::events::{EventEnvelope, EventPayload};
use crate::kafka::TopicPartition;

/// A batch of decoded events from one partition, in offset order.
#[derive(Message)]
#[rtype(result = "Vec<EventOutcome>")]
pub struct ProcessBatch {
    pub origin: BatchOrigin,
    pub events: Arc<[EventEnvelope]>,
}

/// Where a batch's events were read from: the partition, and each event's offset (in the
/// events' order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchOrigin {
    pub source: TopicPartition,
    pub offsets: Arc<[i64]>,
}

impl BatchOrigin {
    /// The origin of the events at `positions` of this batch.
    fn select(&self, positions: &[usize]) -> Self {
        Self {
            source: self.source.clone(),
            offsets: positions
                .iter()
                .map(|position| self.offsets[*position])
                .collect(),
        }
    }
}

/// Asks a domain actor for its observable state.
#[derive(Message)]
#[rtype(result = "DomainActorState")]
pub struct ObserveDomain;

/// The result of one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum EventOutcome {
    /// The effect was applied.
    Done,
    /// The event had been processed before (redelivery); nothing changed.
    Duplicate,
    Failed(HandlerError),
}

impl EventOutcome {
    /// Whether the event may succeed if tried again.
    pub fn is_transient(&self) -> bool {
        matches!(self, EventOutcome::Failed(error) if error.class != ErrorClass::Permanent)
    }
}

/// The events of a batch a handler applies in one call that answers, per event, whether it
/// changed anything (an idempotent write): the others are refused as permanent.
pub struct AppliedInOneCall<T> {
    /// What the handler applies, in event order.
    pub items: Vec<T>,
    positions: Vec<usize>,
    outcomes: Vec<Option<EventOutcome>>,
}

impl<T> AppliedInOneCall<T> {
    /// Keeps the events `pick` understands; any other is refused as not being `kind`.
    pub fn select<'a>(
        events: &'a [EventEnvelope],
        kind: &str,
        pick: impl Fn(&'a EventEnvelope) -> Option<T>,
    ) -> Self {
        let mut selected = Self {
            items: Vec::new(),
            positions: Vec::new(),
            outcomes: vec![None; events.len()],
        };
        for (position, event) in events.iter().enumerate() {
            match pick(event) {
                Some(item) => {
                    selected.items.push(item);
                    selected.positions.push(position);
                }
                None => {
                    selected.outcomes[position] = Some(EventOutcome::Failed(
                        HandlerError::permanent(format!("{} is not {kind}", event.event_type())),
                    ))
                }
            }
        }
        selected
    }

    /// The outcomes in event order: an item that changed something is done, one that did not
    /// a duplicate; if the call failed, every item is retryable.
    pub fn settle(
        self,
        applied: Result<Vec<bool>, impl std::fmt::Display>,
        failure: &str,
    ) -> Vec<EventOutcome> {
        let mut outcomes = self.outcomes;
        for (index, position) in self.positions.into_iter().enumerate() {
            outcomes[position] = Some(match &applied {
                Ok(flags) if flags[index] => EventOutcome::Done,
                Ok(_) => EventOutcome::Duplicate,
                Err(error) => {
                    EventOutcome::Failed(HandlerError::retryable(format!("{failure}: {error}")))
                }
            });
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every event has an outcome"))
            .collect()
    }
}

/// Why a domain actor could not process an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{class:?}: {message}")]
pub struct HandlerError {
    pub class: ErrorClass,
    pub message: String,
}

impl HandlerError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Retryable, message)
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, message)
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Fatal, message)
    }

    /// Keeps the class the error carries.
    pub fn from_error<E: Classify + std::fmt::Display>(error: &E) -> Self {
        Self::new(error.class(), error.to_string())
    }
}

/// The business logic of one domain.
pub trait DomainHandler: Unpin + 'static {
    /// The actor's name in the admin view.
    fn name(&self) -> &'static str;

    /// Processes one partition's events, in order, and returns one outcome per event in
    /// the same order. After a retryable or fatal failure the handler may stop early and
    /// report the remaining events as failed too: they are retried from the first transient
    /// failure on, and everything must be idempotent by event id.
    fn handle(
        &mut self,
        origin: &BatchOrigin,
        events: Arc<[EventEnvelope]>,
    ) -> LocalBoxFuture<'static, Vec<EventOutcome>>;

    /// Called when the actor is restarted after a fatal error, to rebuild state.
    fn restarted(&mut self) {}

    /// The handler's own counters for the admin view (serializable, deterministic order).
    fn details(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Counters of a domain actor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainActorState {
    pub name: &'static str,
    pub processed: u64,
    pub duplicates: u64,
    pub failed: u64,
    pub restarts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// A supervised domain actor; start it with [`DomainActor::start_supervised`].
pub struct DomainActor<H: DomainHandler> {
    handler: H,
    event_log: EventLog,
    state: DomainActorState,
}

impl<H: DomainHandler> DomainActor<H> {
    pub fn new(handler: H, event_log: EventLog) -> Self {
        let state = DomainActorState {
            name: handler.name(),
            ..DomainActorState::default()
        };
        Self {
            handler,
            event_log,
            state,
        }
    }

    /// Starts the actor under a `Supervisor` on the given arbiter.
    pub fn start_supervised(self, arbiter: &actix::ArbiterHandle) -> Addr<Self>
    where
        H: Send,
    {
        Supervisor::start_in_arbiter(arbiter, move |_| self)
    }

    fn record(&mut self, outcomes: &[EventOutcome]) {
        for outcome in outcomes {
            match outcome {
                EventOutcome::Done => self.state.processed += 1,
                EventOutcome::Duplicate => self.state.duplicates += 1,
                EventOutcome::Failed(_) => self.state.failed += 1,
            }
        }
    }

    /// Runs the handler for the non-probe events and completes the probes, keeping the
    /// outcomes in event order.
    fn dispatch(
        &mut self,
        origin: &BatchOrigin,
        events: Arc<[EventEnvelope]>,
    ) -> LocalBoxFuture<'static, Vec<EventOutcome>> {
        let is_probe =
            |event: &EventEnvelope| matches!(event.payload, EventPayload::PipelineProbe(_));
        if !events.iter().any(is_probe) {
            return self.guarded_handle(origin, events);
        }
        let (probes, domain): (Vec<_>, Vec<_>) = events
            .iter()
            .cloned()
            .enumerate()
            .partition(|(_, event)| is_probe(event));
        let domain_positions: Vec<usize> = domain.iter().map(|(position, _)| *position).collect();
        let domain_events: Arc<[EventEnvelope]> =
            domain.into_iter().map(|(_, event)| event).collect();
        let domain_outcomes = if domain_events.is_empty() {
            FutureExt::boxed_local(futures::future::ready(Vec::new()))
        } else {
            self.guarded_handle(&origin.select(&domain_positions), domain_events)
        };
        let event_log = self.event_log.clone();
        let total = events.len();
        async move {
            let mut outcomes = vec![EventOutcome::Done; total];
            for (position, probe) in probes {
                outcomes[position] = complete_probe(&event_log, &probe).await;
            }
            for (position, outcome) in domain_positions.into_iter().zip(domain_outcomes.await) {
                outcomes[position] = outcome;
            }
            outcomes
        }
        .boxed_local()
    }

    /// Calls the handler, turning a panic (now or while its future runs) and a wrong
    /// number of outcomes into fatal failures.
    fn guarded_handle(
        &mut self,
        origin: &BatchOrigin,
        events: Arc<[EventEnvelope]>,
    ) -> LocalBoxFuture<'static, Vec<EventOutcome>> {
        let count = events.len();
        let name = self.handler.name();
        let started =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.handle(origin, events)));
        let future = match started {
            Ok(future) => future,
            Err(panic) => {
                return FutureExt::boxed_local(futures::future::ready(all_fatal(
                    count,
                    &panic_message(name, &panic),
                )));
            }
        };
        AssertUnwindSafe(future)
            .catch_unwind()
            .map(move |result| match result {
                Ok(outcomes) if outcomes.len() == count => outcomes,
                Ok(outcomes) => all_fatal(
                    count,
                    &format!(
                        "{name} returned {} outcomes for {count} events",
                        outcomes.len()
                    ),
                ),
                Err(panic) => all_fatal(count, &panic_message(name, &panic)),
            })
            .boxed_local()
    }
}

fn all_fatal(count: usize, message: &str) -> Vec<EventOutcome> {
    error!(message, "domain handler failed fatally");
    vec![EventOutcome::Failed(HandlerError::fatal(message)); count]
}

fn panic_message(name: &str, panic: &Box<dyn Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic".into());
    format!("{name} panicked: {text}")
}

/// A probe is done when its event-log row reaches COMPLETED; a second delivery finds it
/// there already and is a duplicate.
async fn complete_probe(event_log: &EventLog, probe: &EventEnvelope) -> EventOutcome {
    match event_log
        .change_status(probe.event_id, StatusChange::to(EventStatus::Completed))
        .await
    {
        Ok(Transition::Applied) => EventOutcome::Done,
        Ok(Transition::Skipped) => EventOutcome::Duplicate,
        Err(error) => EventOutcome::Failed(HandlerError::from_error(&error)),
    }
}

impl<H: DomainHandler> Actor for DomainActor<H> {
    type Context = Context<Self>;
}

impl<H: DomainHandler> Supervised for DomainActor<H> {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.state.restarts += 1;
        warn!(
            actor = self.state.name,
            restarts = self.state.restarts,
            "domain actor restarting"
        );
        self.handler.restarted();
    }
}

impl<H: DomainHandler> Handler<ProcessBatch> for DomainActor<H> {
    type Result = ResponseActFuture<Self, Vec<EventOutcome>>;

    fn handle(&mut self, batch: ProcessBatch, _ctx: &mut Self::Context) -> Self::Result {
        let work = self.dispatch(&batch.origin, batch.events);
        Box::pin(actix::fut::wrap_future(work).map(move |outcomes: Vec<EventOutcome>, actor: &mut Self, ctx| {
            actor.record(&outcomes);
            let fatal = outcomes.iter().any(|outcome| {
                matches!(outcome, EventOutcome::Failed(error) if error.class == ErrorClass::Fatal)
            });
            if fatal {
                warn!(actor = actor.state.name, source = %batch.origin.source, "fatal failure: stopping for restart");
                ctx.stop();
            }
            outcomes
        }))
    }
}

impl<H: DomainHandler> Handler<ObserveDomain> for DomainActor<H> {
    type Result = MessageResult<ObserveDomain>;

    fn handle(&mut self, _: ObserveDomain, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(DomainActorState {
            details: self.handler.details(),
            ..self.state.clone()
        })
    }
}
