//! The event log: the state of every business event, and the only module that changes it.
//!
//! ```text
//!             ┌──────────────► DEAD_LETTER ◄──────────────┐
//!             │                    │ (replay)              │
//!  PENDING ──►PUBLISHED ──► IN_PROGRESS ──► COMPLETED ──► NOTIFIED
//!     │  ▲          │            ▲    │                     ▲
//!     │  └──────────┼────────────┼────┴──► FAILED ──────────┘
//!     └─────────────┴────────────┘          │  ▲
//!                                           └──┘ (retry: FAILED ► IN_PROGRESS)
//! ```
//!
//! A row is written PENDING inside the business transaction that causes the event (the
//! outbox). A consumer may see the event before its publisher marks it PUBLISHED, so every
//! consumer-side state is also reachable from PENDING; any state but PENDING sets
//! `published_at` (a consumer saw the event, so it was published), which is what the relay
//! looks at.
//!
//! Every change is one of the named [`Move`]s of the transition table, applied as a
//! conditional `UPDATE … WHERE status IN (the move's starting states)`: a redelivered event
//! finds its row already moved on and changes nothing, which is how consumers deduplicate by
//! event id. The statuses in SQL are always bound from the table, never written as literals.

pub mod progress;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{MySqlConnection, MySqlPool};

use crate::common::columns::{UnknownName, named_enum};
use crate::common::error::{Classify, ErrorClass};
use crate::events::{DecodeError, EventEnvelope, EventId, EventPayload, EventType, topics};

named_enum! {
    pub enum EventStatus ("event status") {
        Pending = "PENDING", Published = "PUBLISHED", InProgress = "IN_PROGRESS",
        Completed = "COMPLETED", Failed = "FAILED", Notified = "NOTIFIED",
        DeadLetter = "DEAD_LETTER",
    }
}

impl EventStatus {
    /// Whether some move of the transition table takes a row from `self` to `next`.
    pub fn can_become(self, next: EventStatus) -> bool {
        Move::ALL
            .iter()
            .any(|step| step.to() == next && step.from().contains(&self))
    }

    /// The states a row may be in for `self` to be reached.
    pub fn predecessors(self) -> Vec<EventStatus> {
        EventStatus::ALL
            .iter()
            .copied()
            .filter(|from| from.can_become(self))
            .collect()
    }
}

/// The transition table: every change of a row's status is one of these moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Move {
    /// The broker acknowledged the event (its publisher, or the relay).
    Publish,
    /// A consumer takes the event for a delivery attempt (the forwarder's first attempt).
    /// Never from FAILED: a redelivered record of an event whose retry is scheduled (or
    /// parked) leaves it to the retry scheduler, which makes the attempt when it is due.
    Take,
    /// The retry scheduler claims a due retry, or an attempt whose lease ran out (its
    /// instance is gone): IN_PROGRESS → IN_PROGRESS takes the lease over.
    Claim,
    /// The consumer's effect is done.
    Complete,
    /// A delivery attempt failed and its next attempt is scheduled (`next_attempt_at`). A
    /// refused coupon request is not a failure: it is COMPLETED with its reason in `result`.
    Fail,
    /// A coupon request's result was pushed to its user.
    Notify,
    /// Sent to the dead-letter topic.
    DeadLetter,
    /// A dead letter back on the retry scheduler's schedule.
    ReplayToSchedule,
    /// A dead letter back to PENDING, for the relay to publish again.
    ReplayToRelay,
}

impl Move {
    pub const ALL: [Move; 9] = [
        Move::Publish,
        Move::Take,
        Move::Claim,
        Move::Complete,
        Move::Fail,
        Move::Notify,
        Move::DeadLetter,
        Move::ReplayToSchedule,
        Move::ReplayToRelay,
    ];

    /// The states a row may be in for the move to apply.
    pub fn from(self) -> &'static [EventStatus] {
        use EventStatus::*;
        match self {
            Move::Publish => &[Pending],
            Move::Take => &[Pending, Published],
            Move::Claim => &[Failed, InProgress],
            Move::Complete => &[Pending, Published, InProgress, Failed],
            Move::Fail => &[Pending, Published, InProgress],
            Move::Notify => &[Completed, Failed],
            Move::DeadLetter => &[Pending, Published, InProgress, Failed],
            Move::ReplayToSchedule | Move::ReplayToRelay => &[DeadLetter],
        }
    }

    /// The state the move reaches.
    pub fn to(self) -> EventStatus {
        match self {
            Move::Publish => EventStatus::Published,
            Move::Take | Move::Claim => EventStatus::InProgress,
            Move::Complete => EventStatus::Completed,
            Move::Fail | Move::ReplayToSchedule => EventStatus::Failed,
            Move::Notify => EventStatus::Notified,
            Move::DeadLetter => EventStatus::DeadLetter,
            Move::ReplayToRelay => EventStatus::Pending,
        }
    }

    /// The starting states as one `FIND_IN_SET` list.
    fn starting_states(self) -> String {
        let names: Vec<&str> = self.from().iter().map(EventStatus::as_str).collect();
        names.join(",")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("event log query failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event log row is corrupt: {0}")]
    CorruptRow(String),
}

impl Classify for EventLogError {
    fn class(&self) -> ErrorClass {
        match self {
            EventLogError::Database(error) => error.class(),
            EventLogError::CorruptRow(_) => ErrorClass::Permanent,
        }
    }
}

/// A row of [`EventLog::unfinished_of_keys`]: id, key, offset, status, due.
type UnfinishedRow = (EventId, String, Option<i64>, EventStatus, DateTime<Utc>);

/// An event of a key that has not finished: a retry is scheduled (FAILED) or running
/// (IN_PROGRESS) until `due`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unfinished {
    pub event_id: EventId,
    pub key: String,
    /// The offset it was read from.
    pub offset: i64,
    pub status: EventStatus,
    /// When its next attempt is due, or its running attempt's lease ends.
    pub due: DateTime<Utc>,
}

/// An event on its way out through the outbox: the envelope and its topic.
#[derive(Clone, Debug)]
pub struct OutboxEvent {
    pub topic: &'static str,
    pub envelope: EventEnvelope,
}

impl OutboxEvent {
    /// An event for the topic its type is published to.
    ///
    /// # Panics
    /// For a pipeline probe, which names its topic: use [`OutboxEvent::probe`].
    pub fn new(envelope: EventEnvelope) -> Self {
        let topic = envelope
            .event_type()
            .topic()
            .expect("only probes have no topic of their own; they go through OutboxEvent::probe");
        Self { topic, envelope }
    }

    /// A probe of `topic`'s pipeline.
    pub fn probe(topic: &'static str, envelope: EventEnvelope) -> Self {
        Self { topic, envelope }
    }
}

/// Where an event was read from (the partition and offset of its record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    // Not required in the schema: it is flattened into rows that may have none.
    #[serde(rename = "sourcePartition")]
    #[schema(required = false)]
    pub partition: i32,
    #[serde(rename = "sourceOffset")]
    #[schema(required = false)]
    pub offset: i64,
}

/// A row as read back: ids, event type, payload and provenance typed.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    pub event_id: EventId,
    pub event_type: EventType,
    pub topic: String,
    pub key: String,
    /// The payload of its `eventType`.
    pub payload: EventPayload,
    pub status: EventStatus,
    pub retry_count: i32,
    pub last_error: Option<String>,
    /// What the consumer decided, when it records more than a status.
    pub result: Option<serde_json::Value>,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(flatten)]
    pub source: Option<Provenance>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// The trace context the event was produced in (not shown: it is the trace's, not the
    /// event's).
    #[serde(skip)]
    pub traceparent: Option<String>,
}

impl EventRecord {
    /// The event as it travels (for republishing, delivering, dead-lettering).
    pub fn envelope(&self) -> EventEnvelope {
        EventEnvelope {
            event_id: self.event_id,
            key: self.key.clone(),
            occurred_at: self.occurred_at,
            payload: self.payload.clone(),
            traceparent: self.traceparent.clone(),
        }
    }
}

/// The columns as stored; [`EventRecord::try_from`] types them.
#[derive(sqlx::FromRow)]
struct StoredEvent {
    event_id: EventId,
    event_type: String,
    topic: String,
    event_key: String,
    payload: String,
    status: EventStatus,
    retry_count: i32,
    last_error: Option<String>,
    result: Option<String>,
    occurred_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
    next_attempt_at: Option<DateTime<Utc>>,
    source_partition: Option<i32>,
    source_offset: Option<i64>,
    dead_lettered_at: Option<DateTime<Utc>>,
    traceparent: Option<String>,
}

/// A row that does not decode: an event type or payload this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("event {event_id}: {error}")]
pub struct UndecodableRow {
    pub event_id: EventId,
    pub error: DecodeError,
}

impl TryFrom<StoredEvent> for EventRecord {
    type Error = UndecodableRow;

    fn try_from(row: StoredEvent) -> Result<Self, Self::Error> {
        let undecodable = |error| UndecodableRow {
            event_id: row.event_id,
            error,
        };
        let event_type: EventType = row
            .event_type
            .parse()
            .map_err(|unknown: UnknownName| undecodable(unknown.into()))?;
        let payload = EventPayload::decode_json(event_type, &row.payload).map_err(undecodable)?;
        let result = row
            .result
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|error| undecodable(DecodeError::InvalidJson(error.to_string())))?;
        Ok(EventRecord {
            event_id: row.event_id,
            event_type,
            topic: row.topic,
            key: row.event_key,
            payload,
            status: row.status,
            retry_count: row.retry_count,
            last_error: row.last_error,
            result,
            occurred_at: row.occurred_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
            published_at: row.published_at,
            next_attempt_at: row.next_attempt_at,
            source: row
                .source_partition
                .zip(row.source_offset)
                .map(|(partition, offset)| Provenance { partition, offset }),
            dead_lettered_at: row.dead_lettered_at,
            traceparent: row.traceparent,
        })
    }
}

fn typed(row: StoredEvent) -> Result<EventRecord, EventLogError> {
    EventRecord::try_from(row).map_err(|error| EventLogError::CorruptRow(error.to_string()))
}

/// Whether a conditional status change took place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Applied,
    /// The row is missing or already in a state the move may not start from (typically:
    /// a redelivered event whose row has moved on).
    Skipped,
}

/// A move and what it records besides the status.
#[derive(Clone, Debug)]
pub struct StatusChange<'a> {
    pub step: Move,
    /// Recorded as `last_error` when set.
    pub error: Option<&'a str>,
    /// What the consumer decided (for a refused coupon request: its reason).
    pub result: Option<&'a serde_json::Value>,
    /// Counts one more delivery attempt in `retry_count`.
    pub count_attempt: bool,
    /// Starts counting attempts afresh (a replay).
    pub reset_attempts: bool,
    /// When the next attempt is due (FAILED) or the lease of an attempt in progress ends
    /// (IN_PROGRESS); any change without one clears it.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The partition and offset the event was read from.
    pub source: Option<Provenance>,
}

impl<'a> StatusChange<'a> {
    pub fn new(step: Move) -> Self {
        Self {
            step,
            error: None,
            result: None,
            count_attempt: false,
            reset_attempts: false,
            next_attempt_at: None,
            source: None,
        }
    }

    pub fn due_at(mut self, at: DateTime<Utc>) -> Self {
        self.next_attempt_at = Some(at);
        self
    }

    pub fn read_from(mut self, partition: i32, offset: i64) -> Self {
        self.source = Some(Provenance { partition, offset });
        self
    }

    pub fn resetting_attempts(mut self) -> Self {
        self.reset_attempts = true;
        self
    }

    pub fn with_error(mut self, error: &'a str) -> Self {
        self.error = Some(error);
        self
    }

    pub fn with_result(mut self, result: &'a serde_json::Value) -> Self {
        self.result = Some(result);
        self
    }

    pub fn counting_attempt(mut self) -> Self {
        self.count_attempt = true;
        self
    }
}

/// How a row enters the event log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Not published yet: the publisher marks it PUBLISHED, or the relay publishes it.
    Pending,
    /// PUBLISHED from its insert on, `published_at` the insert's time: its consumer's
    /// progress proves the publication (the reconciler drives an event its consumer has not
    /// settled although the group read past it), so no row write marks it.
    Proven,
}

impl Entry {
    pub fn status(self) -> EventStatus {
        match self {
            Entry::Pending => EventStatus::Pending,
            Entry::Proven => EventStatus::Published,
        }
    }
}

/// Reads event rows into [`StoredEvent`] with the checked `query_as!`: every column, typed,
/// from `$from` (`"event_log"`, or with an index hint), then `$rest` (the conditions), with
/// its arguments.
macro_rules! select_events {
    ($from:literal, $rest:literal $(, $argument:expr)* $(,)?) => {
        sqlx::query_as!(
            StoredEvent,
            r#"SELECT event_id AS "event_id: EventId", event_type, topic, event_key,
                      CAST(payload AS CHAR) AS "payload!", status AS "status: EventStatus",
                      retry_count, last_error, CAST(result AS CHAR) AS "result?",
                      occurred_at AS "occurred_at: DateTime<Utc>",
                      created_at AS "created_at: DateTime<Utc>",
                      updated_at AS "updated_at: DateTime<Utc>",
                      published_at AS "published_at: DateTime<Utc>",
                      next_attempt_at AS "next_attempt_at: DateTime<Utc>",
                      source_partition, source_offset,
                      dead_lettered_at AS "dead_lettered_at: DateTime<Utc>", traceparent
               FROM "# + $from + " " + $rest
            $(, $argument)*
        )
    };
}

/// The same columns as a plain literal, for the statement that has to be built at run time
/// (an IN-list, in [`EventLog::lock_unpublished`]) and is read through `FromRow`.
macro_rules! select_event_columns {
    () => {
        "SELECT event_id, event_type, topic, event_key, CAST(payload AS CHAR) AS payload, \
         status, retry_count, last_error, CAST(result AS CHAR) AS result, occurred_at, \
         created_at, updated_at, published_at, next_attempt_at, source_partition, \
         source_offset, dead_lettered_at, traceparent \
         FROM event_log "
    };
}

/// Handle on the `event_log` table.
#[derive(Clone, Debug)]
pub struct EventLog {
    pool: MySqlPool,
}

impl EventLog {
    pub fn new(pool: MySqlPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Writes PENDING rows inside the caller's transaction (one multi-row INSERT), for the
    /// outbox relay to publish. The outbox calls this; so does `bench webhooks`, to record
    /// its events as the payments would.
    pub async fn insert_pending(
        connection: &mut MySqlConnection,
        events: &[OutboxEvent],
    ) -> Result<(), EventLogError> {
        Self::insert(connection, events, Entry::Pending).await
    }

    /// Writes rows PUBLISHED, `published_at` the insert's time, inside the caller's
    /// transaction: for events whose publication their consumer's progress proves, so that
    /// no row write marks it (see the outbox's `OutboxTransaction::record_proven`).
    pub async fn insert_proven(
        connection: &mut MySqlConnection,
        events: &[OutboxEvent],
    ) -> Result<(), EventLogError> {
        Self::insert(connection, events, Entry::Proven).await
    }

    /// Writes rows as [`Self::insert_proven`] does, each holding a claim (`coupon_claim`, a
    /// unique key: one row holds a claim): a row whose claim is already held, by an earlier
    /// row or one before it in `claimed`, is not written. Answers which event holds each
    /// claim now.
    pub async fn insert_proven_claiming(
        connection: &mut MySqlConnection,
        claimed: &[(OutboxEvent, String)],
    ) -> Result<BTreeMap<String, EventId>, EventLogError> {
        if claimed.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut insert = sqlx::QueryBuilder::new(
            "INSERT IGNORE INTO event_log (event_id, event_type, topic, event_key, coupon_claim, \
             payload, status, occurred_at, traceparent, published_at) ",
        );
        insert.push_values(claimed, |mut row, (event, claim)| {
            let envelope = &event.envelope;
            row.push_bind(envelope.event_id)
                .push_bind(envelope.event_type().as_str())
                .push_bind(event.topic)
                .push_bind(envelope.key.as_str())
                .push_bind(claim.as_str())
                .push_bind(envelope.payload_json().to_string())
                .push_bind(Entry::Proven.status())
                .push_bind(envelope.occurred_at)
                .push_bind(envelope.traceparent.as_deref())
                .push("NOW(6)");
        });
        insert.build().execute(&mut *connection).await?;
        let mut select = sqlx::QueryBuilder::new(
            "SELECT coupon_claim, event_id FROM event_log WHERE coupon_claim IN (",
        );
        let mut separated = select.separated(", ");
        for (_, claim) in claimed {
            separated.push_bind(claim.as_str());
        }
        select.push(")");
        Ok(select
            .build_query_as::<(String, EventId)>()
            .fetch_all(&mut *connection)
            .await?
            .into_iter()
            .collect())
    }

    async fn insert(
        connection: &mut MySqlConnection,
        events: &[OutboxEvent],
        entry: Entry,
    ) -> Result<(), EventLogError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut insert = sqlx::QueryBuilder::new(
            "INSERT INTO event_log (event_id, event_type, topic, event_key, payload, status, occurred_at, traceparent, published_at) ",
        );
        insert.push_values(events, |mut row, event| {
            let envelope = &event.envelope;
            row.push_bind(envelope.event_id)
                .push_bind(envelope.event_type().as_str())
                .push_bind(event.topic)
                .push_bind(envelope.key.as_str())
                .push_bind(envelope.payload_json().to_string())
                .push_bind(entry.status())
                .push_bind(envelope.occurred_at)
                .push_bind(envelope.traceparent.as_deref());
            match entry {
                Entry::Pending => row.push("NULL"),
                Entry::Proven => row.push("NOW(6)"),
            };
        });
        insert.build().execute(connection).await?;
        Ok(())
    }

    /// Marks rows PUBLISHED after the broker acknowledged them; rows a consumer already moved
    /// on are left alone.
    pub async fn mark_published(&self, ids: &[EventId]) -> Result<u64, EventLogError> {
        let mut connection = self.pool.acquire().await?;
        Self::change_status_of_many_in(&mut connection, ids, StatusChange::new(Move::Publish)).await
    }

    /// Applies a move.
    pub async fn change_status(
        &self,
        id: EventId,
        change: StatusChange<'_>,
    ) -> Result<Transition, EventLogError> {
        let mut connection = self.pool.acquire().await?;
        Self::change_status_in(&mut connection, id, change).await
    }

    /// Applies a move on the caller's connection or transaction, so it can commit together
    /// with the effect it records. `published_at` is cleared by a return to PENDING (a
    /// replay) and otherwise set if it was not; `dead_lettered_at` is set exactly while the
    /// row is DEAD_LETTER.
    pub async fn change_status_in(
        connection: &mut MySqlConnection,
        id: EventId,
        change: StatusChange<'_>,
    ) -> Result<Transition, EventLogError> {
        let to = change.step.to();
        let result = change.result.map(serde_json::Value::to_string);
        let (partition, offset) = change
            .source
            .map(|source| (source.partition, source.offset))
            .unzip();
        let updated = sqlx::query!(
            "UPDATE event_log SET status = ?, \
               last_error = COALESCE(?, last_error), \
               result = COALESCE(?, result), \
               retry_count = IF(?, 0, retry_count + ?), \
               next_attempt_at = ?, \
               source_partition = COALESCE(?, source_partition), \
               source_offset = COALESCE(?, source_offset), \
               published_at = IF(?, NULL, COALESCE(published_at, NOW(6))), \
               dead_lettered_at = IF(?, COALESCE(dead_lettered_at, NOW(6)), NULL) \
             WHERE event_id = ? AND FIND_IN_SET(status, ?)",
            to,
            change.error,
            result,
            change.reset_attempts,
            i32::from(change.count_attempt),
            change.next_attempt_at,
            partition,
            offset,
            to == EventStatus::Pending,
            to == EventStatus::DeadLetter,
            id,
            change.step.starting_states(),
        )
        .execute(connection)
        .await?;
        Ok(if updated.rows_affected() == 1 {
            Transition::Applied
        } else {
            Transition::Skipped
        })
    }

    /// Applies one move to every row of `ids` it may apply to, in one statement; returns
    /// how many moved (the others had moved on). Leases and schedules are cleared.
    pub async fn change_status_of_many_in(
        connection: &mut MySqlConnection,
        ids: &[EventId],
        change: StatusChange<'_>,
    ) -> Result<u64, EventLogError> {
        Self::change_many_in(connection, ids, None, change).await
    }

    /// As [`Self::change_status_of_many_in`], writing each row's own `result` (`results`:
    /// one per id, in the same statement).
    pub async fn change_status_of_many_with_results_in(
        connection: &mut MySqlConnection,
        results: &[(EventId, serde_json::Value)],
        change: StatusChange<'_>,
    ) -> Result<u64, EventLogError> {
        let ids: Vec<EventId> = results.iter().map(|(id, _)| *id).collect();
        Self::change_many_in(connection, &ids, Some(results), change).await
    }

    async fn change_many_in(
        connection: &mut MySqlConnection,
        ids: &[EventId],
        results: Option<&[(EventId, serde_json::Value)]>,
        change: StatusChange<'_>,
    ) -> Result<u64, EventLogError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let to = change.step.to();
        let mut update = sqlx::QueryBuilder::new("UPDATE event_log SET status = ");
        update.push_bind(to);
        if let Some(results) = results {
            update.push(", result = CASE event_id");
            for (id, result) in results {
                update.push(" WHEN ").push_bind(*id);
                update.push(" THEN ").push_bind(result.to_string());
            }
            update.push(" END");
        } else if let Some(result) = change.result {
            update.push(", result = ").push_bind(result.to_string());
        }
        update.push(", next_attempt_at = NULL");
        update.push(", published_at = IF(");
        update.push_bind(to == EventStatus::Pending);
        update.push(", NULL, COALESCE(published_at, NOW(6)))");
        update.push(", dead_lettered_at = IF(");
        update.push_bind(to == EventStatus::DeadLetter);
        update.push(", COALESCE(dead_lettered_at, NOW(6)), NULL)");
        update.push(" WHERE event_id IN (");
        let mut separated = update.separated(", ");
        for id in ids {
            separated.push_bind(*id);
        }
        update.push(") AND FIND_IN_SET(status, ");
        update.push_bind(change.step.starting_states());
        update.push(")");
        Ok(update.build().execute(connection).await?.rows_affected())
    }

    /// [`Move::Take`] of many events at once, each read from its own `Provenance`, all
    /// leased until `lease_until`: one transaction that locks the rows, then moves those
    /// that can be taken with one statement. The ids taken (the others are
    /// [`Transition::Skipped`]: taken before, or settled). An id given twice is moved once,
    /// as read by its first take (`CASE` takes the first match).
    pub async fn take_many(
        &self,
        takes: &[(EventId, Provenance)],
        lease_until: DateTime<Utc>,
    ) -> Result<BTreeSet<EventId>, EventLogError> {
        if takes.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut transaction = self.pool.begin().await?;
        let ids: Vec<EventId> = takes.iter().map(|(id, _)| *id).collect();
        let statuses = Self::lock_statuses_in(&mut transaction, &ids).await?;
        let takeable: Vec<&(EventId, Provenance)> = takes
            .iter()
            .filter(|(id, _)| {
                statuses
                    .get(id)
                    .is_some_and(|status| Move::Take.from().contains(status))
            })
            .collect();
        if !takeable.is_empty() {
            let mut take = sqlx::QueryBuilder::new("UPDATE event_log SET status = ");
            take.push_bind(Move::Take.to());
            take.push(", next_attempt_at = ").push_bind(lease_until);
            take.push(", published_at = COALESCE(published_at, NOW(6))");
            take.push(", source_partition = CASE event_id");
            for (id, source) in &takeable {
                take.push(" WHEN ").push_bind(*id);
                take.push(" THEN ").push_bind(source.partition);
            }
            take.push(" END, source_offset = CASE event_id");
            for (id, source) in &takeable {
                take.push(" WHEN ").push_bind(*id);
                take.push(" THEN ").push_bind(source.offset);
            }
            take.push(" END WHERE event_id IN (");
            let mut separated = take.separated(", ");
            for (id, _) in &takeable {
                separated.push_bind(*id);
            }
            take.push(")");
            // The rows are locked: every one of them moves.
            take.build().execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(takeable.into_iter().map(|(id, _)| *id).collect())
    }

    /// The events of `event_type` under any of `keys` whose rows are in one of `statuses`,
    /// as (key, event id), in the order the database accepted them (`accepted_seq`,
    /// assigned when the row was inserted: a row committed before another was inserted has
    /// the smaller number), read in the caller's transaction without locks. On the key index
    /// (named: with a long list of keys the optimizer would otherwise scan the table).
    pub async fn keyed_in_acceptance_order_in(
        connection: &mut MySqlConnection,
        event_type: EventType,
        keys: &BTreeSet<String>,
        statuses: &[EventStatus],
    ) -> Result<Vec<(String, EventId)>, EventLogError> {
        if keys.is_empty() || statuses.is_empty() {
            return Ok(Vec::new());
        }
        let mut select = sqlx::QueryBuilder::new(
            "SELECT event_key, event_id FROM event_log FORCE INDEX (event_log_by_key) \
             WHERE event_key IN (",
        );
        let mut separated = select.separated(", ");
        for key in keys {
            separated.push_bind(key);
        }
        select
            .push(") AND event_type = ")
            .push_bind(event_type.as_str());
        select.push(" AND status IN (");
        let mut separated = select.separated(", ");
        for status in statuses {
            separated.push_bind(*status);
        }
        select.push(") ORDER BY accepted_seq");
        Ok(select.build_query_as().fetch_all(connection).await?)
    }

    /// The rows of `ids` (missing ones absent), read in the caller's transaction without
    /// locks. A row that does not decode is left out (logged): its own record dead-letters
    /// it.
    pub async fn records_in(
        connection: &mut MySqlConnection,
        ids: &[EventId],
    ) -> Result<Vec<EventRecord>, EventLogError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut select = sqlx::QueryBuilder::new(select_event_columns!());
        select.push("WHERE event_id IN (");
        let mut separated = select.separated(", ");
        for id in ids {
            separated.push_bind(*id);
        }
        select.push(")");
        let rows: Vec<StoredEvent> = select.build_query_as().fetch_all(connection).await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| match EventRecord::try_from(row) {
                Ok(record) => Some(record),
                Err(error) => {
                    tracing::warn!(%error, "an undecodable row is left to its own record");
                    None
                }
            })
            .collect())
    }

    /// Locks the rows of `ids` for the caller's transaction and returns their statuses
    /// (missing rows are absent). A consumer decides which events are new with this, in
    /// the same transaction as their effects.
    pub async fn lock_statuses_in(
        connection: &mut MySqlConnection,
        ids: &[EventId],
    ) -> Result<BTreeMap<EventId, EventStatus>, EventLogError> {
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut select =
            sqlx::QueryBuilder::new("SELECT event_id, status FROM event_log WHERE event_id IN (");
        let mut separated = select.separated(", ");
        for id in ids {
            separated.push_bind(*id);
        }
        select.push(") FOR UPDATE");
        let rows: Vec<(EventId, EventStatus)> =
            select.build_query_as().fetch_all(connection).await?;
        Ok(rows.into_iter().collect())
    }

    /// Takes up to `limit` events of `event_types` whose next attempt is due at `now` (FAILED)
    /// or whose attempt lease ran out (IN_PROGRESS, its instance gone): under row locks that
    /// other instances skip, they become IN_PROGRESS with a lease until `lease_until`
    /// ([`Move::Claim`]), so one attempt runs at a time whatever the number of instances.
    pub async fn claim_due(
        &self,
        event_types: &[EventType],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, EventLogError> {
        if event_types.is_empty() {
            return Ok(Vec::new());
        }
        let types: Vec<&str> = event_types.iter().map(EventType::as_str).collect();
        let mut transaction = self.pool.begin().await?;
        let rows = select_events!(
            "event_log",
            "WHERE next_attempt_at <= ? AND FIND_IN_SET(status, ?) \
             AND FIND_IN_SET(event_type, ?) \
             ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED",
            now,
            Move::Claim.starting_states(),
            types.join(","),
            limit,
        )
        .fetch_all(&mut *transaction)
        .await?;
        let records: Vec<EventRecord> = rows.into_iter().map(typed).collect::<Result<_, _>>()?;
        let ids: Vec<EventId> = records.iter().map(|record| record.event_id).collect();
        if !ids.is_empty() {
            let mut claim = sqlx::QueryBuilder::new("UPDATE event_log SET status = ");
            claim.push_bind(Move::Claim.to());
            claim.push(", next_attempt_at = ").push_bind(lease_until);
            claim.push(" WHERE event_id IN (");
            let mut separated = claim.separated(", ");
            for id in &ids {
                separated.push_bind(*id);
            }
            claim.push(")");
            claim.build().execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(records)
    }

    /// The unfinished events (FAILED with a retry scheduled, or IN_PROGRESS under a lease)
    /// of `keys` that were read from `partition` of `topic`: what later events of those
    /// keys wait behind under `key` ordering. Unfinished rows are exactly those with a
    /// `next_attempt_at` (every other move clears it). One statement, on the key index: its
    /// cost grows with the history of the keys asked for, not with the table.
    pub async fn unfinished_of_keys(
        &self,
        topic: &str,
        partition: i32,
        keys: &[&str],
    ) -> Result<Vec<Unfinished>, EventLogError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sqlx::QueryBuilder::new(
            "SELECT event_id, event_key, source_offset, status, next_attempt_at \
             FROM event_log WHERE next_attempt_at IS NOT NULL AND topic = ",
        );
        query.push_bind(topic);
        query.push(" AND source_partition = ").push_bind(partition);
        query.push(" AND event_key IN (");
        let mut separated = query.separated(", ");
        for key in keys {
            separated.push_bind(*key);
        }
        query.push(")");
        let rows: Vec<UnfinishedRow> = query.build_query_as().fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(event_id, key, offset, status, due)| {
                Some(Unfinished {
                    event_id,
                    key,
                    offset: offset?,
                    status,
                    due,
                })
            })
            .collect())
    }

    pub async fn find(&self, id: EventId) -> Result<Option<EventRecord>, EventLogError> {
        let row = select_events!("event_log", "WHERE event_id = ?", id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(typed).transpose()
    }

    /// Events of `event_types` whose ids lie strictly between `after` (when given) and
    /// `before`, in id order (creation order: ids are time-ordered): a consumer's events as
    /// the reconciler walks them.
    pub async fn of_types_between(
        &self,
        event_types: &[EventType],
        after: Option<EventId>,
        before: EventId,
        limit: u32,
    ) -> Result<Vec<EventRecord>, EventLogError> {
        // One query per type, so each reads its index range in order and stops at the
        // limit; the first `limit` of all types are among the first `limit` of each.
        // The index is named: left to itself, MariaDB sometimes reads `event_log_by_type`
        // on `event_type` alone and filters `event_id` entry by entry (index-condition
        // checks), from the type's first event on, which grows with history.
        let after = after.map_or_else(String::new, |id| id.to_string());
        let mut rows: Vec<StoredEvent> = Vec::new();
        for event_type in event_types {
            let page = select_events!(
                "event_log FORCE INDEX (event_log_by_type)",
                "WHERE event_type = ? AND event_id > ? AND event_id < ? ORDER BY event_id LIMIT ?",
                event_type.as_str(),
                after,
                before,
                limit,
            )
            .fetch_all(&self.pool)
            .await?;
            rows.extend(page);
        }
        rows.sort_by_key(|row| row.event_id);
        rows.truncate(limit as usize);
        rows.into_iter().map(typed).collect()
    }

    /// Events of `event_type` with the key `key`, after `after` (an event id of theirs) and
    /// created since `since`, oldest first: what a user's reconnecting push channel missed.
    pub async fn of_key_after(
        &self,
        key: &str,
        event_type: EventType,
        after: Option<EventId>,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, EventLogError> {
        let rows = select_events!(
            "event_log",
            "WHERE event_key = ? AND event_id > ? AND event_type = ? AND created_at >= ? \
             ORDER BY event_id LIMIT ?",
            key,
            after.map_or_else(String::new, |id| id.to_string()),
            event_type,
            since,
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(typed).collect()
    }

    /// How many rows are PENDING (written, not published), and how long the oldest has
    /// waited. Reads the `event_log_unpublished` index's range of unpublished rows only.
    pub async fn unpublished_backlog(&self) -> Result<(u64, Option<Duration>), EventLogError> {
        let backlog = sqlx::query!(
            r#"SELECT COUNT(*) AS "pending!: i64",
                      TIMESTAMPDIFF(MICROSECOND, MIN(created_at), NOW(6)) AS "oldest_age_us?: i64"
               FROM event_log WHERE published_at IS NULL AND status = ?"#,
            EventStatus::Pending,
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((
            u64::try_from(backlog.pending).unwrap_or(0),
            backlog
                .oldest_age_us
                .map(|micros| Duration::from_micros(u64::try_from(micros).unwrap_or(0))),
        ))
    }

    /// Locks up to `limit` rows that stayed PENDING for longer than `older_than`, skipping
    /// rows another relay instance holds. The caller publishes them and marks them
    /// PUBLISHED before committing.
    ///
    /// The search itself does not lock: a locking range scan in InnoDB also locks the first
    /// index entry past the range, here the oldest row still younger than `older_than`,
    /// which is usually a request's own row. That lock would last the whole relay
    /// transaction (publishing included): the request's own PUBLISHED mark would wait for
    /// it, and another relay would skip the row. So the candidates are found by a plain
    /// read and only they are locked, by primary key.
    pub async fn lock_unpublished(
        connection: &mut MySqlConnection,
        older_than: Duration,
        limit: u32,
    ) -> Result<Vec<UnpublishedEvent>, EventLogError> {
        let candidates = sqlx::query_scalar!(
            r#"SELECT event_id AS "event_id: EventId" FROM event_log
               WHERE published_at IS NULL AND status = ?
                 AND created_at < NOW(6) - INTERVAL ? MICROSECOND
               ORDER BY created_at LIMIT ?"#,
            EventStatus::Pending,
            older_than.as_micros() as u64,
            limit,
        )
        .fetch_all(&mut *connection)
        .await?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut select = sqlx::QueryBuilder::new(concat!(
            select_event_columns!(),
            "WHERE published_at IS NULL AND status = "
        ));
        select.push_bind(EventStatus::Pending);
        select.push(" AND event_id IN (");
        let mut separated = select.separated(", ");
        for id in &candidates {
            separated.push_bind(*id);
        }
        select.push(") ORDER BY created_at FOR UPDATE SKIP LOCKED");
        let rows: Vec<StoredEvent> = select.build_query_as().fetch_all(connection).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let topic = topics::named(&row.topic);
                let event = EventRecord::try_from(row).and_then(|record| {
                    let envelope = record.envelope();
                    let event_id = record.event_id;
                    topic
                        .map(|topic| OutboxEvent { topic, envelope })
                        .ok_or_else(|| UndecodableRow {
                            event_id,
                            error: DecodeError::InvalidEnvelope(format!(
                                "unknown topic {:?}",
                                record.topic
                            )),
                        })
                });
                UnpublishedEvent(event)
            })
            .collect())
    }
}

/// A PENDING row the relay found, or why it cannot be rebuilt into an event (an event type
/// or topic this version does not know).
#[derive(Debug)]
pub struct UnpublishedEvent(pub Result<OutboxEvent, UndecodableRow>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivered_event_cannot_move_a_finished_row_back() {
        use EventStatus::*;
        for finished in [Completed, Notified, DeadLetter] {
            assert!(!finished.can_become(InProgress), "{finished} → IN_PROGRESS");
        }
        assert!(!Notified.can_become(Completed));
        assert!(!Completed.can_become(Completed));
    }

    #[test]
    fn a_consumer_may_finish_an_event_before_it_is_marked_published() {
        assert!(EventStatus::Pending.can_become(EventStatus::Completed));
        assert!(!EventStatus::Completed.can_become(EventStatus::Published));
    }

    #[test]
    fn predecessors_follow_the_transition_table() {
        use EventStatus::*;
        assert_eq!(Published.predecessors(), vec![Pending]);
        assert_eq!(Notified.predecessors(), vec![Completed, Failed]);
        assert_eq!(
            Completed.predecessors(),
            vec![Pending, Published, InProgress, Failed]
        );
    }

    #[test]
    fn a_first_attempt_never_takes_an_event_another_attempt_holds() {
        assert!(!Move::Take.from().contains(&EventStatus::InProgress));
        // Nor a scheduled retry ahead of its time, when the partition redelivers its record.
        assert!(!Move::Take.from().contains(&EventStatus::Failed));
        // Only the scheduler's claim takes over a lease, and only once it ran out.
        assert!(Move::Claim.from().contains(&EventStatus::InProgress));
    }

    #[test]
    fn statuses_round_trip_through_their_column_text() {
        for &status in EventStatus::ALL {
            assert_eq!(status.as_str().parse::<EventStatus>().unwrap(), status);
        }
        assert!("DONE".parse::<EventStatus>().is_err());
    }
}
