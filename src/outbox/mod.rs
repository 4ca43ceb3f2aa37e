//! The transactional outbox: the one path by which an event leaves the process.
//!
//! A request that causes events opens an [`OutboxTransaction`] ([`Outbox::begin`]), does its
//! business writes on it, records its events in it ([`OutboxTransaction::record`]: event-log
//! rows, PENDING unless recorded proven, below), and commits ([`OutboxTransaction::commit`]). What the commit returns,
//! [`Committed`], is the only way to publish those events, so nothing is published before it
//! is committed. If the process dies between the commit and the broker's acknowledgement,
//! the rows stay PENDING and the [`relay`] republishes them once they are older than
//! `outbox.republish_after_ms`. An event can therefore reach Kafka twice; consumers
//! deduplicate by event id.
//!
//! Events whose consumers are shared groups that each keep their own progress (in the
//! event's row, or in the ranking's marks) are recorded *proven* instead: coupon requests,
//! orders completed, payments completed and product changes
//! ([`crate::events::EventType::recorded_proven`]; [`OutboxTransaction::record`] chooses by
//! type). They are PUBLISHED from the insert on, and never marked. Their publication is
//! proven by each consumer's progress: an event a consumer has not settled although the
//! consumer's group has read past where the topic ended after the event's commit was not in
//! the log, and the [reconciler] publishes it again. That saves the PUBLISHED mark, one row
//! write per event, on the paths that carry the most events; only probes, which check the
//! relay's path, are still recorded PENDING and marked.
//!
//! Coupon results go one step further: they have no row of their own. The issuer records
//! each decision, with the id of the result event that announces it, in the request's row
//! in the transaction that decides, and hands the results over with
//! [`OutboxTransaction::publish_proven`]. The notifier's progress is that row's NOTIFIED,
//! and the reconciler, through the notifier's settlement ([`settlement`]), rebuilds a result
//! from the row when its publication is not proven.

pub mod reconciler;
pub mod relay;
pub mod settlement;

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;
use sqlx::{MySql, MySqlConnection, Transaction};
use tracing::{info, warn};

use crate::event_log::{EventLog, EventLogError, Move, OutboxEvent, StatusChange};
use crate::events::EventId;
use crate::kafka::producer::EventPublisher;

#[derive(Clone)]
pub struct Outbox {
    event_log: EventLog,
    publisher: EventPublisher,
    /// The writer that marks published rows in batches; without one, each publication
    /// marks its own rows.
    marks: Option<PublishedMarks>,
}

/// The rows a [`PublishedMarks`] writer marks with one statement at most.
const MARKS_PER_STATEMENT: usize = 1_000;

/// Marks rows PUBLISHED in batches: one writer task takes whatever publications are
/// waiting (no timer: batches grow with load) and marks their rows with one statement, so
/// requests that each publish a few events cost one row-marking statement between them,
/// not one each; each publication is told when its rows are marked. A mark that fails, or
/// never runs because the process stops, leaves its rows PENDING: the relay publishes them
/// again (consumers deduplicate).
#[derive(Clone)]
pub struct PublishedMarks {
    queue: tokio::sync::mpsc::UnboundedSender<MarkRequest>,
}

/// Rows to mark, and who waits for the mark (told whether it was written).
struct MarkRequest {
    published: Vec<EventId>,
    marked: tokio::sync::oneshot::Sender<bool>,
}

impl PublishedMarks {
    /// Starts the writer on `arbiter`, marking rows through `event_log` (whose pool belongs
    /// to the threads of that arbiter's kind).
    pub fn start(arbiter: &actix::ArbiterHandle, event_log: EventLog) -> Self {
        let (queue, receiver) = tokio::sync::mpsc::unbounded_channel();
        arbiter.spawn(write_marks(receiver, event_log));
        Self { queue }
    }

    /// Has the writer mark the rows of published events and waits for it: whether they
    /// were marked; the rows back when the writer has stopped.
    async fn mark(&self, published: Vec<EventId>) -> Result<bool, Vec<EventId>> {
        let (marked, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send(MarkRequest { published, marked })
            .map_err(|unsent| unsent.0.published)?;
        Ok(answer.await.unwrap_or(false))
    }
}

/// Marks the rows of published events; whether they were marked. A failure leaves them
/// PENDING: the events are on Kafka, and the relay publishes them again.
async fn mark_published(event_log: &EventLog, published: &[EventId]) -> bool {
    match event_log.mark_published(published).await {
        Ok(_) => true,
        Err(error) => {
            warn!(%error, events = published.len(), "cannot mark events published");
            false
        }
    }
}

/// The writer of [`PublishedMarks`]: until every handle is dropped.
async fn write_marks(
    mut receiver: tokio::sync::mpsc::UnboundedReceiver<MarkRequest>,
    event_log: EventLog,
) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let mut rows = batch[0].published.len();
        while rows < MARKS_PER_STATEMENT {
            match receiver.try_recv() {
                Ok(more) => {
                    rows += more.published.len();
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        let ids: Vec<EventId> = batch
            .iter()
            .flat_map(|request| request.published.iter().copied())
            .collect();
        let marked = mark_published(&event_log, &ids).await;
        for request in batch {
            let _ = request.marked.send(marked);
        }
    }
}

/// The rows written and not yet published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxBacklog {
    pub pending: u64,
    /// How long the oldest one has waited.
    pub oldest_age_seconds: f64,
    /// When this was counted.
    pub counted_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The outbox backlog as last counted, shared with the dashboard.
#[derive(Clone, Default)]
pub struct OutboxBacklogView(std::sync::Arc<std::sync::Mutex<OutboxBacklog>>);

impl OutboxBacklogView {
    pub fn current(&self) -> OutboxBacklog {
        *self.0.lock().expect("outbox backlog")
    }

    /// Counts every `interval` (sets the `outbox_*` gauges) until the arbiter stops.
    pub async fn keep_counting(self, event_log: EventLog, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match event_log.unpublished_backlog().await {
                Ok((pending, oldest_age)) => {
                    crate::observability::metrics::outbox_backlog(pending, oldest_age);
                    *self.0.lock().expect("outbox backlog") = OutboxBacklog {
                        pending,
                        oldest_age_seconds: oldest_age.map_or(0.0, |age| age.as_secs_f64()),
                        counted_at: Some(chrono::Utc::now()),
                    };
                }
                Err(error) => warn!(%error, "cannot count the outbox backlog"),
            }
        }
    }
}

/// What one publication attempt achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Publication {
    pub published: u64,
    /// Left PENDING for the relay.
    pub failed: u64,
    /// Rows the relay could not turn back into events (an event type this version does
    /// not know); left PENDING for a version that does.
    pub undecodable: u64,
}

impl Outbox {
    pub fn new(event_log: EventLog, publisher: EventPublisher) -> Self {
        Self {
            event_log,
            publisher,
            marks: None,
        }
    }

    /// The same outbox, its publications marked PUBLISHED by `marks` in batches.
    pub fn with_marks(self, marks: PublishedMarks) -> Self {
        Self {
            marks: Some(marks),
            ..self
        }
    }

    pub fn event_log(&self) -> &EventLog {
        &self.event_log
    }

    /// Starts a business transaction whose recorded events are published after its commit.
    pub async fn begin(&self) -> Result<OutboxTransaction, EventLogError> {
        Ok(OutboxTransaction {
            transaction: self.event_log.pool().begin().await?,
            events: Vec::new(),
            proven: Vec::new(),
            outbox: self.clone(),
        })
    }

    /// Republishes rows left PENDING for longer than `older_than`: one batch, under row
    /// locks that other relay instances skip.
    pub async fn relay_once(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> Result<Publication, EventLogError> {
        let mut transaction = self.event_log.pool().begin().await?;
        let rows = EventLog::lock_unpublished(&mut transaction, older_than, limit).await?;
        if rows.is_empty() {
            return Ok(Publication::default());
        }
        let mut undecodable = 0;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            match row.0 {
                Ok(event) => events.push(event),
                Err(error) => {
                    undecodable += 1;
                    warn!(%error, "pending event cannot be rebuilt; left for a version that knows it");
                }
            }
        }
        let published = self.publish_all(&events).await;
        EventLog::change_status_of_many_in(
            &mut transaction,
            &published,
            StatusChange::new(Move::Publish),
        )
        .await?;
        transaction.commit().await?;
        crate::observability::metrics::outbox_republished(published.len() as u64);
        let publication = Publication {
            published: published.len() as u64,
            failed: (events.len() - published.len()) as u64,
            undecodable,
        };
        info!(
            republished = publication.published,
            failed = publication.failed,
            undecodable = publication.undecodable,
            "outbox relay republished pending events"
        );
        Ok(publication)
    }

    async fn publish_all(&self, events: &[OutboxEvent]) -> Vec<EventId> {
        let deliveries = join_all(events.iter().map(|event| async move {
            let result = self.publisher.publish(event.topic, &event.envelope).await;
            (event.envelope.event_id, result)
        }))
        .await;
        deliveries
            .into_iter()
            .filter_map(|(event_id, result)| match result {
                Ok(_) => Some(event_id),
                Err(error) => {
                    warn!(event_id = %event_id, %error, "publishing failed; the event stays recorded and is published again");
                    None
                }
            })
            .collect()
    }
}

/// A MySQL transaction that carries events: business statements run on it (it derefs to
/// the connection), events are recorded in it, and committing hands them over for
/// publication. Dropped without a commit, it rolls back, events included.
pub struct OutboxTransaction {
    transaction: Transaction<'static, MySql>,
    events: Vec<OutboxEvent>,
    /// Recorded proven: published, never marked.
    proven: Vec<OutboxEvent>,
    outbox: Outbox,
}

impl OutboxTransaction {
    /// Writes the events' rows now, in this transaction: PENDING, or PUBLISHED for the
    /// event types recorded proven ([`crate::events::EventType::recorded_proven`], see the module
    /// documentation).
    pub async fn record(&mut self, events: Vec<OutboxEvent>) -> Result<(), EventLogError> {
        let (proven, pending): (Vec<_>, Vec<_>) = events
            .into_iter()
            .partition(|event| event.envelope.event_type().recorded_proven());
        if !pending.is_empty() {
            EventLog::insert_pending(&mut self.transaction, &pending).await?;
            self.events.extend(pending);
        }
        if !proven.is_empty() {
            self.record_proven(proven).await?;
        }
        Ok(())
    }

    /// Writes the events' rows PUBLISHED now, in this transaction, for events whose
    /// consumer's progress proves their publication (see the module documentation): they
    /// are published after the commit and never marked.
    pub async fn record_proven(&mut self, events: Vec<OutboxEvent>) -> Result<(), EventLogError> {
        EventLog::insert_proven(&mut self.transaction, &events).await?;
        self.proven.extend(events);
        Ok(())
    }

    /// Writes the events' rows as [`Self::record_proven`] does, each holding a claim (see
    /// [`EventLog::insert_proven_claiming`]); those whose row got its claim are published
    /// after the commit. Answers which event holds each claim.
    pub async fn record_proven_claiming(
        &mut self,
        claimed: Vec<(OutboxEvent, String)>,
    ) -> Result<BTreeMap<String, EventId>, EventLogError> {
        let owners = EventLog::insert_proven_claiming(&mut self.transaction, &claimed).await?;
        self.proven.extend(
            claimed
                .into_iter()
                .filter(|(event, claim)| owners.get(claim) == Some(&event.envelope.event_id))
                .map(|(event, _)| event),
        );
        Ok(owners)
    }

    /// Publishes after the commit events that are recorded in another event's row (coupon
    /// results, in their requests' rows): never marked, their publication proven by their
    /// consumer's progress.
    pub fn publish_proven(&mut self, events: Vec<OutboxEvent>) {
        self.proven.extend(events);
    }

    /// Commits the business writes and the events' rows together.
    pub async fn commit(self) -> Result<Committed, EventLogError> {
        self.transaction.commit().await?;
        Ok(Committed {
            events: self.events,
            proven: self.proven,
            outbox: self.outbox,
        })
    }
}

impl Deref for OutboxTransaction {
    type Target = MySqlConnection;

    fn deref(&self) -> &MySqlConnection {
        &self.transaction
    }
}

impl DerefMut for OutboxTransaction {
    fn deref_mut(&mut self) -> &mut MySqlConnection {
        &mut self.transaction
    }
}

/// How long a request waits for the publication of the events it committed before it
/// answers anyway (see [`Committed::publish_within`]).
pub const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Events whose rows are committed, not yet published. Dropping it leaves them to the
/// relay.
#[must_use = "committed events are published by `publish`, or left to the relay"]
pub struct Committed {
    events: Vec<OutboxEvent>,
    proven: Vec<OutboxEvent>,
    outbox: Outbox,
}

impl Committed {
    /// The events committed, those recorded PENDING and those recorded proven.
    pub fn events(&self) -> impl Iterator<Item = &OutboxEvent> {
        self.events.iter().chain(&self.proven)
    }

    /// Publishes the events in the background and waits for that at most `wait`: a request
    /// answers once its events are committed, so a broker that does not answer slows it by
    /// `wait` at most (the publication goes on, or the relay takes the rows). `None` when
    /// the publication was still running at the end of the wait.
    pub async fn publish_within(self, wait: std::time::Duration) -> Option<Publication> {
        if self.events.is_empty() && self.proven.is_empty() {
            return Some(Publication::default());
        }
        let publishing = actix_rt::spawn(self.publish());
        // Dropping the handle at the deadline detaches the task; it is not cancelled.
        tokio::time::timeout(wait, publishing)
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Publishes the events, then marks those recorded PENDING as PUBLISHED. A failure is
    /// logged and left to the relay (or, for events recorded proven, to the reconciler); it
    /// is never the caller's problem.
    pub async fn publish(self) -> Publication {
        if self.events.is_empty() && self.proven.is_empty() {
            return Publication::default();
        }
        let (published, proven) = futures::join!(
            self.outbox.publish_all(&self.events),
            self.outbox.publish_all(&self.proven)
        );
        let mut publication = Publication {
            published: (published.len() + proven.len()) as u64,
            failed: (self.events.len() + self.proven.len() - published.len() - proven.len()) as u64,
            undecodable: 0,
        };
        if published.is_empty() {
            return publication;
        }
        let marking = published.len() as u64;
        let marked = match &self.outbox.marks {
            // Through the writer when there is one (and it runs), else here.
            Some(marks) => match marks.mark(published).await {
                Ok(marked) => marked,
                Err(unsent) => mark_published(&self.outbox.event_log, &unsent).await,
            },
            None => mark_published(&self.outbox.event_log, &published).await,
        };
        if !marked {
            // The events are on Kafka; their rows stay PENDING and will be published again.
            publication.failed += marking;
            publication.published -= marking;
        }
        publication
    }
}
