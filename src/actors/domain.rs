//! Domain actors: the supervised actors that own a topic's business logic.
//!
//! A domain's logic is a [`DomainHandler`]: plain async code on `&self` that gets one
//! partition's batch and answers one [`EventOutcome`] per event. Its actor, a
//! [`DomainActor`], runs on one arbiter; the handler is built there by a factory, so it may
//! hold `Rc` and other single-thread dependencies, and keeps its statistics in a typed
//! struct the wrapper lends it ([`Stats`]).
//!
//! The wrapper supplies what every domain shares:
//! - **Pipeline probes** go to their own handler ([`PipelineProbes`]), which completes their
//!   event-log rows; the domain handler sees only its own events.
//! - **Independent batches**: each batch runs as its own task holding its own handle on the
//!   handler, so batches of different partitions proceed concurrently, and a restart
//!   never cancels another partition's batch in flight. Each partition actor keeps at most
//!   one batch in flight, so the order within a partition holds.
//! - **Supervision**: a fatal outcome or a panic (caught, answered as fatal, so the
//!   partition actor retries the batch) stops the actor; actix's `Supervisor` restarts it
//!   and [`Supervised::restarting`] rebuilds the handler from its factory. Restarts are
//!   counted; statistics survive them.
//! - **Counters** for the admin view ([`DomainActorState`]).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;

use actix::prelude::*;
use futures::FutureExt;
use serde::Serialize;
use tracing::{error, warn};

use crate::common::error::{Classify, Dependency, ErrorClass, panic_message};
use crate::event_log::{EventLog, Move, StatusChange};
use crate::events::{EventEnvelope, EventId, EventPayload};
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
    /// Which assignment of the partition read it: a number this process gives each partition
    /// actor it starts, increasing. A handler that fences stale owners takes a new owner
    /// epoch for a newer assignment and refuses batches of an older one.
    pub assignment: u64,
}

impl BatchOrigin {
    /// The origin of the events at `positions` of this batch.
    fn select(&self, positions: &[usize]) -> Self {
        Self {
            source: self.source.clone(),
            assignment: self.assignment,
            offsets: positions
                .iter()
                .map(|position| self.offsets[*position])
                .collect(),
        }
    }
}

/// What a handler gets: the events of one partition, in offset order, with their origin.
#[derive(Clone, Debug)]
pub struct Batch {
    pub origin: BatchOrigin,
    pub events: Arc<[EventEnvelope]>,
}

impl Batch {
    /// Each event with the offset it was read from.
    pub fn with_offsets(&self) -> impl Iterator<Item = (&EventEnvelope, i64)> {
        self.events.iter().zip(self.origin.offsets.iter().copied())
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
    /// The batch came from an owner that lost its partition (its owner epoch is no longer
    /// the partition's): nothing was decided, and it is no failure of the event. The
    /// partition actor waits until it is stopped (or, should it still own the partition,
    /// tries again); the new owner reads the event again.
    Fenced,
}

impl EventOutcome {
    /// Whether the event may succeed if tried again.
    pub fn is_transient(&self) -> bool {
        matches!(self, EventOutcome::Failed(error) if error.class != ErrorClass::Permanent)
    }

    /// The dependency whose outage made the event fail, if that is why.
    pub fn outage(&self) -> Option<Dependency> {
        match self {
            EventOutcome::Failed(error) => error.class.outage(),
            _ => None,
        }
    }

    pub fn is_failure(&self) -> bool {
        matches!(self, EventOutcome::Failed(_))
    }

    fn is_fatal(&self) -> bool {
        matches!(self, EventOutcome::Failed(error) if error.class == ErrorClass::Fatal)
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
                        HandlerError::not_for_this_handler(event, kind),
                    ))
                }
            }
        }
        selected
    }

    /// The outcomes in event order: an item that changed something is done, one that did not
    /// a duplicate; if the call failed, every item fails with the call's error class (an
    /// outage of the store pauses the partition; anything else is retried in place).
    pub fn settle<E: Classify + std::fmt::Display>(
        self,
        applied: Result<Vec<bool>, E>,
        failure: &str,
    ) -> Vec<EventOutcome> {
        let mut outcomes = self.outcomes;
        for (index, position) in self.positions.into_iter().enumerate() {
            outcomes[position] = Some(match &applied {
                Ok(flags) if flags[index] => EventOutcome::Done,
                Ok(_) => EventOutcome::Duplicate,
                Err(error) => EventOutcome::Failed(HandlerError::new(
                    match error.class() {
                        ErrorClass::Permanent => ErrorClass::Retryable,
                        class => class,
                    },
                    format!("{failure}: {error}"),
                )),
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

    /// An event of a type this handler does not process (a record on the wrong topic).
    pub fn not_for_this_handler(event: &EventEnvelope, kind: &str) -> Self {
        Self::permanent(format!("{} is not {kind}", event.event_type()))
    }
}

/// The business logic of one domain. Built on the actor's arbiter by a factory (see
/// [`DomainActor::start`]); called with one partition's batch at a time per partition, and
/// with batches of several partitions concurrently.
pub trait DomainHandler: 'static {
    /// The handler's own counters, shown in the admin view; they survive restarts.
    type Stats: Serialize + Default + 'static;

    /// The actor's name in the admin view.
    fn name(&self) -> &'static str;

    /// Processes one partition's events, in order, and returns one outcome per event in
    /// the same order. After a retryable or fatal failure the handler may stop early and
    /// report the remaining events as failed too: they are retried from the first transient
    /// failure on, and everything must be idempotent by event id.
    fn handle(
        &self,
        batch: &Batch,
        stats: &Stats<Self::Stats>,
    ) -> impl Future<Output = Vec<EventOutcome>>;
}

/// What every domain actor shares beside its handler. It completes pipeline probes,
/// whatever the topic: a probe is done when its event-log row reaches COMPLETED; a second
/// delivery finds it there already and is a duplicate. And it exports a consumer span per
/// traced event of a batch (see [`crate::observability::otlp`]; none unless spans are exported).
#[derive(Clone)]
pub struct PipelineProbes {
    event_log: EventLog,
    spans: crate::observability::otlp::Spans,
}

impl PipelineProbes {
    pub fn new(event_log: EventLog) -> Self {
        Self {
            event_log,
            spans: Default::default(),
        }
    }

    /// The same, exporting the batches' consumer spans to `spans`.
    pub fn with_spans(self, spans: crate::observability::otlp::Spans) -> Self {
        Self { spans, ..self }
    }

    async fn complete(&self, probe: EventId) -> EventOutcome {
        match self
            .event_log
            .change_status(probe, StatusChange::new(Move::Complete))
            .await
        {
            Ok(crate::event_log::Transition::Applied) => EventOutcome::Done,
            Ok(crate::event_log::Transition::Skipped) => EventOutcome::Duplicate,
            Err(error) => EventOutcome::Failed(HandlerError::from_error(&error)),
        }
    }
}

/// A handler's statistics, shared by its batches in flight and by tasks they leave
/// running (one thread; a borrow never outlives [`Stats::update`]).
pub struct Stats<S>(Rc<RefCell<S>>);

impl<S> Clone for Stats<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S: Default> Default for Stats<S> {
    fn default() -> Self {
        Self(Rc::default())
    }
}

impl<S> Stats<S> {
    pub fn update(&self, change: impl FnOnce(&mut S)) {
        change(&mut self.0.borrow_mut());
    }

    fn view(&self) -> serde_json::Value
    where
        S: Serialize,
    {
        serde_json::to_value(&*self.0.borrow()).expect("handler statistics serialize")
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
    /// The handler's own statistics (its `Stats`), as shown in the admin view.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

/// The wrapper's own counters, shared with the batches in flight.
#[derive(Default)]
struct Counters {
    processed: Cell<u64>,
    duplicates: Cell<u64>,
    failed: Cell<u64>,
}

impl Counters {
    fn record(&self, outcomes: &[EventOutcome]) {
        for outcome in outcomes {
            let counter = match outcome {
                EventOutcome::Done => &self.processed,
                EventOutcome::Duplicate => &self.duplicates,
                EventOutcome::Failed(_) => &self.failed,
                EventOutcome::Fenced => continue,
            };
            counter.set(counter.get() + 1);
        }
    }
}

/// Stops the actor for a restart, unless a restart already replaced the handler that
/// failed.
#[derive(Message)]
#[rtype(result = "()")]
struct RestartAfterFatal {
    generation: u64,
}

/// A supervised domain actor; start it with [`DomainActor::start`].
pub struct DomainActor<H: DomainHandler> {
    factory: Box<dyn Fn() -> H>,
    handler: Rc<H>,
    /// Counts handlers built; a fatal batch names the one it ran on.
    generation: u64,
    probes: PipelineProbes,
    stats: Stats<H::Stats>,
    counters: Rc<Counters>,
    name: &'static str,
    restarts: u64,
}

impl<H: DomainHandler> DomainActor<H> {
    /// Starts the actor under a `Supervisor` on `arbiter`; `factory` builds the handler
    /// there, and again at every restart.
    pub fn start(
        arbiter: &ArbiterHandle,
        probes: PipelineProbes,
        factory: impl Fn() -> H + Send + 'static,
    ) -> Addr<Self> {
        Supervisor::start_in_arbiter(arbiter, move |_| {
            let handler = factory();
            Self {
                name: handler.name(),
                handler: Rc::new(handler),
                factory: Box::new(factory),
                generation: 0,
                probes,
                stats: Stats::default(),
                counters: Rc::default(),
                restarts: 0,
            }
        })
    }
}

impl<H: DomainHandler> Actor for DomainActor<H> {
    type Context = Context<Self>;
}

impl<H: DomainHandler> Supervised for DomainActor<H> {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts += 1;
        crate::observability::metrics::actor_restarted(self.name);
        warn!(
            actor = self.name,
            restarts = self.restarts,
            "domain actor restarting"
        );
        self.handler = Rc::new((self.factory)());
        self.generation += 1;
    }
}

impl<H: DomainHandler> Handler<ProcessBatch> for DomainActor<H> {
    type Result = ResponseFuture<Vec<EventOutcome>>;

    fn handle(&mut self, batch: ProcessBatch, ctx: &mut Self::Context) -> Self::Result {
        let run = BatchRun {
            handler: self.handler.clone(),
            probes: self.probes.clone(),
            stats: self.stats.clone(),
            name: self.name,
        };
        let counters = self.counters.clone();
        let actor = ctx.address();
        let generation = self.generation;
        let source = batch.origin.source.clone();
        let name = self.name;
        let traced = TracedBatch::of(&self.probes.spans, &batch);
        // The batch's work logs under the traces of its events.
        let span = tracing::info_span!(
            "batch",
            actor = name,
            source = %source,
            trace_ids = %crate::observability::trace::trace_ids(
                batch.events.iter().filter_map(|event| event.traceparent.as_deref())
            ),
        );
        // Not tied to the actor's context: a restart for another batch's fatal error
        // cancels nothing here.
        Box::pin(tracing::Instrument::instrument(
            async move {
                let events = batch.events.len();
                let outcomes = run.run(batch).await;
                tracing::debug!(events, "batch handled");
                if let Some(traced) = traced {
                    traced.finish(name, &outcomes);
                }
                counters.record(&outcomes);
                if outcomes.iter().any(EventOutcome::is_fatal) {
                    warn!(actor = name, %source, "fatal failure: stopping for restart");
                    actor.do_send(RestartAfterFatal { generation });
                }
                outcomes
            },
            span,
        ))
    }
}

/// The traced events of a batch being handled, for their consumer spans.
struct TracedBatch {
    spans: crate::observability::otlp::Spans,
    started: std::time::SystemTime,
    source: crate::kafka::TopicPartition,
    /// Each traced event's position in the batch, context, id and type.
    events: Vec<(
        usize,
        crate::observability::trace::TraceParent,
        EventId,
        &'static str,
        i64,
    )>,
}

impl TracedBatch {
    /// `None` unless spans are exported: the hot path then copies and reads nothing.
    fn of(spans: &crate::observability::otlp::Spans, batch: &ProcessBatch) -> Option<Self> {
        if !spans.enabled() {
            return None;
        }
        let events = batch
            .events
            .iter()
            .enumerate()
            .filter_map(|(position, event)| {
                let context = event
                    .traceparent
                    .as_deref()
                    .and_then(crate::observability::trace::TraceParent::parse)?;
                let offset = batch.origin.offsets.get(position).copied().unwrap_or(-1);
                Some((
                    position,
                    context,
                    event.event_id,
                    event.event_type().as_str(),
                    offset,
                ))
            })
            .collect();
        Some(Self {
            spans: spans.clone(),
            started: std::time::SystemTime::now(),
            source: batch.origin.source.clone(),
            events,
        })
    }

    /// One consumer span per traced event, a child of the span that produced it.
    fn finish(self, actor: &'static str, outcomes: &[EventOutcome]) {
        use crate::observability::otlp::{SpanKind, SpanRecord};
        for (position, context, event_id, event_type, offset) in &self.events {
            let outcome = outcomes.get(*position);
            self.spans.record(context, || {
                SpanRecord::of(
                    SpanKind::Consumer,
                    format!("process {}", self.source.topic),
                    &context.child(),
                    Some(&context.parent_id),
                    self.started,
                )
                .attribute("messaging.system", "kafka")
                .attribute("messaging.operation.type", "process")
                .attribute("messaging.destination.name", self.source.topic.as_str())
                .attribute(
                    "messaging.destination.partition.id",
                    self.source.partition.to_string(),
                )
                .attribute("messaging.kafka.offset", *offset)
                .attribute("messaging.message.id", event_id.to_string())
                .attribute("commerce.actor", actor)
                .attribute("commerce.event_type", *event_type)
                .attribute(
                    "commerce.outcome",
                    match outcome {
                        Some(EventOutcome::Done) => "done",
                        Some(EventOutcome::Duplicate) => "duplicate",
                        Some(EventOutcome::Failed(_)) => "failed",
                        Some(EventOutcome::Fenced) => "fenced",
                        None => "unknown",
                    },
                )
                .failed(match outcome {
                    Some(EventOutcome::Failed(error)) => Some(error.message.clone()),
                    _ => None,
                })
            });
        }
    }
}

impl<H: DomainHandler> Handler<RestartAfterFatal> for DomainActor<H> {
    type Result = ();

    fn handle(&mut self, restart: RestartAfterFatal, ctx: &mut Self::Context) {
        if restart.generation == self.generation {
            ctx.stop();
        }
    }
}

impl<H: DomainHandler> Handler<ObserveDomain> for DomainActor<H> {
    type Result = MessageResult<ObserveDomain>;

    fn handle(&mut self, _: ObserveDomain, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(DomainActorState {
            name: self.name,
            processed: self.counters.processed.get(),
            duplicates: self.counters.duplicates.get(),
            failed: self.counters.failed.get(),
            restarts: self.restarts,
            details: self.stats.view(),
        })
    }
}

/// One batch's run, holding its own handles.
struct BatchRun<H: DomainHandler> {
    handler: Rc<H>,
    probes: PipelineProbes,
    stats: Stats<H::Stats>,
    name: &'static str,
}

impl<H: DomainHandler> BatchRun<H> {
    /// Hands the domain events to the handler and the probes to the probe handler, keeping
    /// the outcomes in event order.
    async fn run(self, batch: ProcessBatch) -> Vec<EventOutcome> {
        let is_probe =
            |event: &EventEnvelope| matches!(event.payload, EventPayload::PipelineProbe(_));
        if !batch.events.iter().any(is_probe) {
            return self
                .guarded(Batch {
                    origin: batch.origin,
                    events: batch.events,
                })
                .await;
        }
        let mut outcomes = vec![EventOutcome::Done; batch.events.len()];
        let mut domain_positions = Vec::new();
        for (position, event) in batch.events.iter().enumerate() {
            if is_probe(event) {
                outcomes[position] = self.probes.complete(event.event_id).await;
            } else {
                domain_positions.push(position);
            }
        }
        if domain_positions.is_empty() {
            return outcomes;
        }
        let domain = Batch {
            origin: batch.origin.select(&domain_positions),
            events: domain_positions
                .iter()
                .map(|position| batch.events[*position].clone())
                .collect(),
        };
        for (position, outcome) in domain_positions.into_iter().zip(self.guarded(domain).await) {
            outcomes[position] = outcome;
        }
        outcomes
    }

    /// Calls the handler, turning a panic and a wrong number of outcomes into fatal
    /// failures.
    async fn guarded(&self, batch: Batch) -> Vec<EventOutcome> {
        let count = batch.events.len();
        // Inside the async block, a panic while building the handler's future is caught too.
        let handled = AssertUnwindSafe(async { self.handler.handle(&batch, &self.stats).await })
            .catch_unwind()
            .await;
        match handled {
            Ok(outcomes) if outcomes.len() == count => outcomes,
            Ok(outcomes) => all_fatal(
                count,
                &format!(
                    "{} returned {} outcomes for {count} events",
                    self.name,
                    outcomes.len()
                ),
            ),
            Err(panic) => all_fatal(count, &panic_message(self.name, &panic)),
        }
    }
}

fn all_fatal(count: usize, message: &str) -> Vec<EventOutcome> {
    error!(message, "domain handler failed fatally");
    vec![EventOutcome::Failed(HandlerError::fatal(message)); count]
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::common::ids::{CouponId, UserId};
    use crate::events::CouponRequested;

    fn event(key: &str) -> EventEnvelope {
        EventEnvelope::new(
            key,
            EventPayload::CouponRequested(CouponRequested {
                user_id: UserId::from_u64(1).unwrap(),
                coupon_id: CouponId::from_u64(1).unwrap(),
            }),
        )
    }

    fn batch(keys: &[&str]) -> ProcessBatch {
        ProcessBatch {
            origin: BatchOrigin {
                source: TopicPartition::new("test-events", 0),
                offsets: (0..keys.len() as i64).collect(),
                assignment: 1,
            },
            events: keys.iter().map(|key| event(key)).collect(),
        }
    }

    /// Done, unless an event's key says otherwise: `bad` fails it for its own reason,
    /// `panic` panics, `short` answers one outcome too few.
    struct KeyedHandler;

    impl DomainHandler for KeyedHandler {
        type Stats = ();

        fn name(&self) -> &'static str {
            "KeyedHandler"
        }

        async fn handle(&self, batch: &Batch, _stats: &Stats<()>) -> Vec<EventOutcome> {
            let keys: Vec<&str> = batch
                .events
                .iter()
                .map(|event| event.key.as_str())
                .collect();
            assert!(!keys.contains(&"panic"), "a panic in the handler");
            let mut outcomes: Vec<EventOutcome> = keys
                .iter()
                .map(|key| match *key {
                    "bad" => EventOutcome::Failed(HandlerError::permanent("a bad event")),
                    _ => EventOutcome::Done,
                })
                .collect();
            if keys.contains(&"short") {
                outcomes.pop();
            }
            outcomes
        }
    }

    /// A domain actor on this arbiter; its probes' pool never connects (no probe is sent).
    fn start(built: Arc<AtomicUsize>) -> Addr<DomainActor<KeyedHandler>> {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .connect_lazy("mysql://root@127.0.0.1:1/unused")
            .expect("a lazy pool");
        DomainActor::start(
            &Arbiter::current(),
            PipelineProbes::new(EventLog::new(pool)),
            move || {
                built.fetch_add(1, Ordering::SeqCst);
                KeyedHandler
            },
        )
    }

    fn fatal(outcome: &EventOutcome) -> bool {
        matches!(outcome, EventOutcome::Failed(error) if error.class == ErrorClass::Fatal)
    }

    #[actix_rt::test]
    async fn outcomes_come_back_in_event_order_and_are_counted() {
        let actor = start(Arc::default());
        let outcomes = actor.send(batch(&["a", "bad", "c"])).await.unwrap();
        assert_eq!(outcomes[0], EventOutcome::Done);
        assert!(outcomes[1].is_failure() && !outcomes[1].is_transient());
        assert_eq!(outcomes[2], EventOutcome::Done);
        let state = actor.send(ObserveDomain).await.unwrap();
        assert_eq!((state.processed, state.failed, state.restarts), (2, 1, 0));
    }

    #[actix_rt::test]
    async fn a_panic_fails_its_batch_fatally_and_the_actor_restarts_with_a_new_handler() {
        let built = Arc::new(AtomicUsize::new(0));
        let actor = start(built.clone());
        let outcomes = actor.send(batch(&["a", "panic"])).await.unwrap();
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes.iter().all(fatal), "{outcomes:?}");
        // The restart was asked for before this batch was sent: the new handler takes it.
        let outcomes = actor.send(batch(&["a", "b"])).await.unwrap();
        assert_eq!(outcomes, vec![EventOutcome::Done, EventOutcome::Done]);
        let state = actor.send(ObserveDomain).await.unwrap();
        assert_eq!(state.restarts, 1);
        assert_eq!(built.load(Ordering::SeqCst), 2);
        // Counters survive the restart.
        assert_eq!((state.processed, state.failed), (2, 2));
    }

    #[actix_rt::test]
    async fn a_handler_answering_the_wrong_number_of_outcomes_fails_the_batch_fatally() {
        let actor = start(Arc::default());
        let outcomes = actor.send(batch(&["a", "short", "c"])).await.unwrap();
        assert_eq!(outcomes.len(), 3);
        assert!(outcomes.iter().all(fatal), "{outcomes:?}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{0:?}")]
    struct StoreFailure(ErrorClass);

    impl Classify for StoreFailure {
        fn class(&self) -> ErrorClass {
            self.0
        }
    }

    #[test]
    fn applied_in_one_call_marks_changes_done_repeats_duplicate_and_refuses_foreign_events() {
        let events = [event("one"), event("foreign"), event("two")];
        let selected = AppliedInOneCall::select(&events, "a test event", |event| {
            (event.key != "foreign").then(|| event.key.clone())
        });
        assert_eq!(selected.items, vec!["one".to_string(), "two".to_string()]);
        let outcomes = selected.settle(Ok::<_, StoreFailure>(vec![true, false]), "applying");
        assert_eq!(outcomes[0], EventOutcome::Done);
        assert!(outcomes[1].is_failure() && !outcomes[1].is_transient());
        assert_eq!(outcomes[2], EventOutcome::Duplicate);
    }

    #[test]
    fn a_failed_call_fails_every_event_retryable_or_as_an_outage_of_its_store() {
        let events = [event("one"), event("two")];
        let pick = |event: &EventEnvelope| Some(event.key.clone());
        let refused = AppliedInOneCall::select(&events, "a test event", pick).settle(
            Err::<Vec<bool>, _>(StoreFailure(ErrorClass::Permanent)),
            "applying",
        );
        assert!(
            refused
                .iter()
                .all(|outcome| outcome.is_transient() && outcome.outage().is_none()),
            "a permanent store error is retried in place: {refused:?}"
        );
        let down = AppliedInOneCall::select(&events, "a test event", pick).settle(
            Err::<Vec<bool>, _>(StoreFailure(ErrorClass::Unavailable(Dependency::Redis))),
            "applying",
        );
        assert!(
            down.iter()
                .all(|outcome| outcome.outage() == Some(Dependency::Redis))
        );
    }
}
