//! How one consumer's progress is read, and its unsettled events driven again.
//!
//! Every consumer records its progress somewhere ([`crate::event_log::progress`]): most in the
//! event's own row, some elsewhere (a coupon result in its request's row, the ranking in its
//! marks in Redis). A [`Settlement`] is that knowledge for one consumer: which rows hold its
//! progress, which of them it has settled, since when an unsettled one waits, how to drive
//! one again, and how to show where it stands. The reconciler and the admin API ask it and
//! nothing else, so they know no slice; a slice whose consumer records its progress outside
//! the event's row implements its own ([`RowSettlement`] serves the others).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::LocalBoxFuture;

use crate::common::error::{Classify, ErrorClass};
use crate::event_log::EventRecord;
use crate::event_log::progress::{ConsumerProgress, ConsumerSpec, row_settled};
use crate::events::{EventEnvelope, EventId, EventType};
use crate::kafka::dead_letter::DeadLetterRow;
use crate::kafka::producer::{EventPublisher, PublishError};

/// Why a settlement could not answer or act, with its class (a dependency that does not
/// answer is an outage); the reconciler logs it and tries again at its next pass.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SettlementError {
    class: ErrorClass,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl SettlementError {
    pub fn new<E>(error: E) -> Self
    where
        E: Classify + std::error::Error + Send + Sync + 'static,
    {
        Self {
            class: error.class(),
            error: Box::new(error),
        }
    }
}

impl Classify for SettlementError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

/// One consumer's progress, as the reconciler and the admin API read it.
pub trait Settlement: Send + Sync {
    /// The consumer: its name, group and topic.
    fn consumer(&self) -> &ConsumerSpec;

    /// The business event types whose rows hold the consumer's progress: those published to
    /// its topic, unless its events are recorded in other events' rows.
    fn event_types(&self) -> Vec<EventType> {
        let topic = self.consumer().topic;
        EventType::ALL
            .iter()
            .copied()
            .filter(|event_type| event_type.topic() == Some(topic))
            .collect()
    }

    /// Work before a pass (repairing derived data the progress lives in).
    fn prepare(&self) -> LocalBoxFuture<'_, Result<(), SettlementError>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the consumer has settled each event of `page`.
    fn settled<'a>(
        &'a self,
        page: &'a [EventRecord],
    ) -> LocalBoxFuture<'a, Result<Vec<bool>, SettlementError>>;

    /// Since when the consumer's event waits for it (`None`: nothing to drive yet): the
    /// event's publication, unless the consumer's event comes later than its row.
    fn waiting_since(&self, record: &EventRecord) -> Option<DateTime<Utc>> {
        record.published_at
    }

    /// Whether the events of `page` the consumer has not settled wait for another
    /// consumer's work first (so the walk stops there: nothing further can be stranded).
    fn waits_for_earlier_work(&self, _page: &[EventRecord]) -> bool {
        false
    }

    /// Hands the event to the consumer once more (idempotent on the consumer's side).
    fn drive_again<'a>(
        &'a self,
        record: &'a EventRecord,
    ) -> LocalBoxFuture<'a, Result<(), SettlementError>>;

    /// Where the consumer stands with `record`, given the event's dead letters.
    fn progress<'a>(
        &'a self,
        record: &'a EventRecord,
        dead_letters: &'a [DeadLetterRow],
    ) -> LocalBoxFuture<'a, Result<ConsumerProgress, SettlementError>>;

    /// Figures of its own to show beside the reconciler's (name, count).
    fn figures(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// The consumers of this instance, as they were started, each with its settlement.
#[derive(Clone, Default)]
pub struct Consumers(Arc<Vec<Arc<dyn Settlement>>>);

impl Consumers {
    pub fn new(settlements: Vec<Arc<dyn Settlement>>) -> Self {
        Self(Arc::new(settlements))
    }

    pub fn all(&self) -> &[Arc<dyn Settlement>] {
        &self.0
    }

    /// The consumers whose progress a row of `record`'s type records (for a probe: the
    /// consumers of its topic).
    pub fn of(&self, record: &EventRecord) -> Vec<&Arc<dyn Settlement>> {
        if record.event_type.topic().is_none() {
            return self
                .0
                .iter()
                .filter(|settlement| settlement.consumer().topic == record.topic)
                .collect();
        }
        self.0
            .iter()
            .filter(|settlement| settlement.event_types().contains(&record.event_type))
            .collect()
    }
}

/// Publishing an event again failed.
#[derive(Debug, thiserror::Error)]
#[error("driving {event_id} again failed: {source}")]
pub struct RedriveError {
    pub event_id: EventId,
    pub source: PublishError,
}

impl Classify for RedriveError {
    fn class(&self) -> ErrorClass {
        self.source.class()
    }
}

/// Publishes `event` to `topic` once more, for a settlement's [`Settlement::drive_again`].
pub async fn publish_again(
    publisher: &EventPublisher,
    topic: &str,
    event: &EventEnvelope,
) -> Result<(), SettlementError> {
    publisher
        .publish(topic, event)
        .await
        .map(|_| ())
        .map_err(|source| {
            SettlementError::new(RedriveError {
                event_id: event.event_id,
                source,
            })
        })
}

/// A consumer that records its progress in the event's own row: done, dead-lettered, or
/// owned by the retry scheduler is settled; driving it again publishes it again.
pub struct RowSettlement {
    consumer: ConsumerSpec,
    publisher: EventPublisher,
}

impl RowSettlement {
    pub fn new(consumer: ConsumerSpec, publisher: EventPublisher) -> Self {
        Self {
            consumer,
            publisher,
        }
    }
}

/// [`Settlement::settled`] for a consumer whose progress each row shows by itself: every
/// record judged on its own by `settled`, with nothing to read.
pub fn settled_each<'a>(
    page: &'a [EventRecord],
    settled: impl Fn(&EventRecord) -> bool,
) -> LocalBoxFuture<'a, Result<Vec<bool>, SettlementError>> {
    let settled = page.iter().map(settled).collect();
    Box::pin(async move { Ok(settled) })
}

impl Settlement for RowSettlement {
    fn consumer(&self) -> &ConsumerSpec {
        &self.consumer
    }

    fn settled<'a>(
        &'a self,
        page: &'a [EventRecord],
    ) -> LocalBoxFuture<'a, Result<Vec<bool>, SettlementError>> {
        settled_each(page, |record| {
            row_settled(record.status, record.next_attempt_at)
        })
    }

    fn drive_again<'a>(
        &'a self,
        record: &'a EventRecord,
    ) -> LocalBoxFuture<'a, Result<(), SettlementError>> {
        Box::pin(
            async move { publish_again(&self.publisher, &record.topic, &record.envelope()).await },
        )
    }

    fn progress<'a>(
        &'a self,
        record: &'a EventRecord,
        _dead_letters: &'a [DeadLetterRow],
    ) -> LocalBoxFuture<'a, Result<ConsumerProgress, SettlementError>> {
        let progress = ConsumerProgress::from_row(&self.consumer, record);
        Box::pin(async move { Ok(progress) })
    }
}
