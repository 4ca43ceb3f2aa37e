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
//! looks at. Every change is a conditional
//! `UPDATE … WHERE status IN (allowed predecessors)`: a redelivered event finds its row
//! already moved on and changes nothing, which is how consumers deduplicate by event id.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{MySqlConnection, MySqlPool, Row};

use crate::error::{Classify, ErrorClass};
use crate::events::{DecodeError, EventEnvelope, EventId, EventType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventStatus {
    Pending,
    Published,
    InProgress,
    Completed,
    Failed,
    Notified,
    DeadLetter,
}

impl EventStatus {
    pub const ALL: [EventStatus; 7] = [
        EventStatus::Pending,
        EventStatus::Published,
        EventStatus::InProgress,
        EventStatus::Completed,
        EventStatus::Failed,
        EventStatus::Notified,
        EventStatus::DeadLetter,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            EventStatus::Pending => "PENDING",
            EventStatus::Published => "PUBLISHED",
            EventStatus::InProgress => "IN_PROGRESS",
            EventStatus::Completed => "COMPLETED",
            EventStatus::Failed => "FAILED",
            EventStatus::Notified => "NOTIFIED",
            EventStatus::DeadLetter => "DEAD_LETTER",
        }
    }

    /// The transition table. Everything not listed is refused.
    pub fn can_become(self, next: EventStatus) -> bool {
        use EventStatus::*;
        matches!(
            (self, next),
            (
                Pending,
                Published | InProgress | Completed | Failed | DeadLetter
            ) | (Published, InProgress | Completed | Failed | DeadLetter)
                | (InProgress, Completed | Failed | DeadLetter)
                | (Failed, InProgress | Completed | Notified | DeadLetter)
                | (Completed, Notified)
                | (DeadLetter, Pending | Failed)
        )
    }

    /// The states a row may be in for `self` to be reached.
    pub fn predecessors(self) -> Vec<EventStatus> {
        EventStatus::ALL
            .into_iter()
            .filter(|from| from.can_become(self))
            .collect()
    }
}

impl fmt::Display for EventStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventStatus {
    type Err = EventLogError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        EventStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == value)
            .ok_or_else(|| EventLogError::CorruptRow(format!("unknown status {value:?}")))
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

/// An event on its way out through the outbox.
#[derive(Clone, Debug)]
pub struct OutboxEvent {
    pub topic: String,
    pub envelope: EventEnvelope,
}

/// A row as read back.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    pub event_id: String,
    pub event_type: String,
    pub topic: String,
    pub key: String,
    pub payload: serde_json::Value,
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
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

/// Whether a conditional status change took place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Applied,
    /// The row is missing or already in a state the change may not start from (typically:
    /// a redelivered event whose row has moved on).
    Skipped,
}

/// A status change request.
#[derive(Clone, Debug)]
pub struct StatusChange<'a> {
    pub to: EventStatus,
    /// Recorded as `last_error` when set.
    pub error: Option<&'a str>,
    /// Counts one more delivery attempt in `retry_count`.
    pub count_attempt: bool,
    /// Starts counting attempts afresh (a replay).
    pub reset_attempts: bool,
    /// When the next attempt is due (FAILED) or the lease of an attempt in progress ends
    /// (IN_PROGRESS); any change without one clears it.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The partition and offset the event was read from.
    pub source: Option<(i32, i64)>,
}

impl<'a> StatusChange<'a> {
    pub fn to(status: EventStatus) -> Self {
        Self {
            to: status,
            error: None,
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
        self.source = Some((partition, offset));
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

    pub fn counting_attempt(mut self) -> Self {
        self.count_attempt = true;
        self
    }
}

/// The columns every read selects, as a literal so queries stay static strings.
macro_rules! select_event_columns {
    () => {
        "SELECT event_id, event_type, topic, event_key, CAST(payload AS CHAR) AS payload, \
         status, retry_count, last_error, CAST(result AS CHAR) AS result, occurred_at, \
         created_at, updated_at, published_at, next_attempt_at, source_partition, \
         source_offset, dead_lettered_at \
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

    /// Writes PENDING rows inside the caller's transaction (one multi-row INSERT).
    pub async fn insert_pending(
        connection: &mut MySqlConnection,
        events: &[OutboxEvent],
    ) -> Result<(), EventLogError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut insert = sqlx::QueryBuilder::new(
            "INSERT INTO event_log (event_id, event_type, topic, event_key, payload, status, occurred_at) ",
        );
        insert.push_values(events, |mut row, event| {
            let envelope = &event.envelope;
            row.push_bind(envelope.event_id.to_string())
                .push_bind(envelope.event_type().as_str())
                .push_bind(event.topic.as_str())
                .push_bind(envelope.key.as_str())
                .push_bind(envelope.payload_json().to_string())
                .push_bind(EventStatus::Pending.as_str())
                .push_bind(envelope.occurred_at);
        });
        insert.build().execute(connection).await?;
        Ok(())
    }

    /// Marks rows PUBLISHED after the broker acknowledged them; rows a consumer already moved
    /// on are left alone.
    pub async fn mark_published(&self, ids: &[EventId]) -> Result<u64, EventLogError> {
        let mut connection = self.pool.acquire().await?;
        Self::mark_published_in(&mut connection, ids).await
    }

    /// [`EventLog::mark_published`] on the caller's connection or transaction.
    pub async fn mark_published_in(
        connection: &mut MySqlConnection,
        ids: &[EventId],
    ) -> Result<u64, EventLogError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut update = sqlx::QueryBuilder::new(
            "UPDATE event_log SET status = 'PUBLISHED', published_at = NOW(6) \
             WHERE status = 'PENDING' AND event_id IN (",
        );
        let mut separated = update.separated(", ");
        for id in ids {
            separated.push_bind(id.to_string());
        }
        update.push(")");
        let result = update.build().execute(connection).await?;
        Ok(result.rows_affected())
    }

    /// Applies a conditional status change.
    pub async fn change_status(
        &self,
        id: EventId,
        change: StatusChange<'_>,
    ) -> Result<Transition, EventLogError> {
        let mut connection = self.pool.acquire().await?;
        Self::change_status_in(&mut connection, id, change).await
    }

    /// Applies a conditional status change on the caller's connection or transaction, so it
    /// can commit together with the effect it records.
    pub async fn change_status_in(
        connection: &mut MySqlConnection,
        id: EventId,
        change: StatusChange<'_>,
    ) -> Result<Transition, EventLogError> {
        let mut update = sqlx::QueryBuilder::new("UPDATE event_log SET status = ");
        update.push_bind(change.to.as_str());
        if let Some(error) = change.error {
            update.push(", last_error = ").push_bind(error);
        }
        if change.reset_attempts {
            update.push(", retry_count = 0");
        } else if change.count_attempt {
            update.push(", retry_count = retry_count + 1");
        }
        update
            .push(", next_attempt_at = ")
            .push_bind(change.next_attempt_at);
        if let Some((partition, offset)) = change.source {
            update.push(", source_partition = ").push_bind(partition);
            update.push(", source_offset = ").push_bind(offset);
        }
        push_published_at(&mut update, change.to);
        update.push(" WHERE event_id = ").push_bind(id.to_string());
        push_status_guard(&mut update, "status", change.to);
        let result = update.build().execute(connection).await?;
        Ok(if result.rows_affected() == 1 {
            Transition::Applied
        } else {
            Transition::Skipped
        })
    }

    /// Moves every row of `ids` that may become `to` there, in one statement, recording
    /// `result` with it when given; returns how many moved (the others had moved on).
    pub async fn change_status_of_many_in(
        connection: &mut MySqlConnection,
        ids: &[EventId],
        to: EventStatus,
        result: Option<&serde_json::Value>,
    ) -> Result<u64, EventLogError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut update = sqlx::QueryBuilder::new("UPDATE event_log SET status = ");
        update.push_bind(to.as_str());
        if let Some(result) = result {
            update.push(", result = ").push_bind(result.to_string());
        }
        update.push(", next_attempt_at = NULL");
        push_published_at(&mut update, to);
        update.push(" WHERE event_id IN (");
        let mut separated = update.separated(", ");
        for id in ids {
            separated.push_bind(id.to_string());
        }
        update.push(")");
        push_status_guard(&mut update, "status", to);
        Ok(update.build().execute(connection).await?.rows_affected())
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
            separated.push_bind(id.to_string());
        }
        select.push(") FOR UPDATE");
        let rows = select.build().fetch_all(connection).await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("event_id")?;
                let status: String = row.try_get("status")?;
                let id = id
                    .parse()
                    .map_err(|_| EventLogError::CorruptRow(format!("event id {id:?}")))?;
                Ok((id, status.parse()?))
            })
            .collect()
    }

    /// Takes up to `limit` events of `event_types` whose next attempt is due at `now` (FAILED)
    /// or whose attempt lease ran out (IN_PROGRESS, its instance gone): under row locks that
    /// other instances skip, they become IN_PROGRESS with a lease until `lease_until`, so
    /// one attempt runs at a time whatever the number of instances.
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
        let mut transaction = self.pool.begin().await?;
        let mut select = sqlx::QueryBuilder::new(select_event_columns!());
        select.push("WHERE next_attempt_at <= ").push_bind(now);
        select.push(" AND status IN ('FAILED', 'IN_PROGRESS') AND event_type IN (");
        let mut separated = select.separated(", ");
        for event_type in event_types {
            separated.push_bind(event_type.as_str());
        }
        select
            .push(") ORDER BY next_attempt_at LIMIT ")
            .push_bind(limit);
        select.push(" FOR UPDATE SKIP LOCKED");
        let rows = select.build().fetch_all(&mut *transaction).await?;
        let records: Vec<EventRecord> =
            rows.iter().map(record_from_row).collect::<Result<_, _>>()?;
        if !records.is_empty() {
            let mut claim = sqlx::QueryBuilder::new(
                "UPDATE event_log SET status = 'IN_PROGRESS', next_attempt_at = ",
            );
            claim.push_bind(lease_until).push(" WHERE event_id IN (");
            let mut separated = claim.separated(", ");
            for record in &records {
                separated.push_bind(&record.event_id);
            }
            claim.push(")");
            claim.build().execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(records)
    }

    /// Dead letters, oldest first, after the cursor (from the previous page's last row).
    pub async fn dead_letters(
        &self,
        after: Option<&DeadLetterCursor>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, EventLogError> {
        let mut select = sqlx::QueryBuilder::new(select_event_columns!());
        select.push("WHERE dead_lettered_at IS NOT NULL");
        if let Some(cursor) = after {
            select
                .push(" AND (dead_lettered_at, event_id) > (")
                .push_bind(cursor.dead_lettered_at)
                .push(", ")
                .push_bind(cursor.event_id.to_string())
                .push(")");
        }
        select
            .push(" ORDER BY dead_lettered_at, event_id LIMIT ")
            .push_bind(limit);
        let rows = select.build().fetch_all(&self.pool).await?;
        rows.iter().map(record_from_row).collect()
    }

    pub async fn find(&self, id: EventId) -> Result<Option<EventRecord>, EventLogError> {
        let row = sqlx::query(concat!(select_event_columns!(), "WHERE event_id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| record_from_row(&row)).transpose()
    }

    /// Locks up to `limit` rows that stayed PENDING for longer than `older_than`, skipping
    /// rows another relay instance holds. The caller publishes them and marks them
    /// PUBLISHED before committing.
    pub async fn lock_unpublished(
        connection: &mut MySqlConnection,
        older_than: Duration,
        limit: u32,
    ) -> Result<Vec<UnpublishedEvent>, EventLogError> {
        let rows = sqlx::query(concat!(
            select_event_columns!(),
            "WHERE published_at IS NULL AND status = 'PENDING' \
             AND created_at < NOW(6) - INTERVAL ? MICROSECOND \
             ORDER BY created_at LIMIT ? FOR UPDATE SKIP LOCKED"
        ))
        .bind(older_than.as_micros() as u64)
        .bind(limit)
        .fetch_all(connection)
        .await?;
        rows.iter()
            .map(|row| {
                let record = record_from_row(row)?;
                let event_id: EventId = record.event_id.parse().map_err(|_| {
                    EventLogError::CorruptRow(format!("event id {:?}", record.event_id))
                })?;
                let envelope = EventEnvelope::from_parts(
                    event_id,
                    &record.event_type,
                    record.key,
                    record.occurred_at,
                    &record.payload.to_string(),
                );
                Ok(UnpublishedEvent {
                    event_id,
                    topic: record.topic,
                    envelope,
                })
            })
            .collect()
    }
}

/// Where a page of dead letters ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterCursor {
    pub dead_lettered_at: DateTime<Utc>,
    pub event_id: EventId,
}

impl DeadLetterCursor {
    /// `{microseconds since the epoch}-{event id}`, opaque to clients.
    pub fn encode(&self) -> String {
        format!(
            "{}_{}",
            self.dead_lettered_at.timestamp_micros(),
            self.event_id
        )
    }

    pub fn decode(text: &str) -> Option<Self> {
        let (micros, id) = text.split_once('_')?;
        Some(Self {
            dead_lettered_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            event_id: id.parse().ok()?,
        })
    }
}

/// A PENDING row the relay found; `envelope` fails when the row no longer decodes (an event
/// type this version does not know).
#[derive(Debug)]
pub struct UnpublishedEvent {
    pub event_id: EventId,
    pub topic: String,
    pub envelope: Result<EventEnvelope, DecodeError>,
}

/// Appends the `published_at` and `dead_lettered_at` that go with moving to `to`:
/// `published_at` is cleared by a return to PENDING (a replay), otherwise set if it was not;
/// `dead_lettered_at` is set exactly while the row is DEAD_LETTER.
fn push_published_at(query: &mut sqlx::QueryBuilder<sqlx::MySql>, to: EventStatus) {
    query.push(if to == EventStatus::Pending {
        ", published_at = NULL"
    } else {
        ", published_at = COALESCE(published_at, NOW(6))"
    });
    query.push(if to == EventStatus::DeadLetter {
        ", dead_lettered_at = COALESCE(dead_lettered_at, NOW(6))"
    } else {
        ", dead_lettered_at = NULL"
    });
}

/// Appends ` AND <column> IN (<states that may become `to`>)`.
fn push_status_guard(query: &mut sqlx::QueryBuilder<sqlx::MySql>, column: &str, to: EventStatus) {
    query.push(format_args!(" AND {column} IN ("));
    let mut separated = query.separated(", ");
    for from in to.predecessors() {
        separated.push_bind(from.as_str());
    }
    query.push(")");
}

fn record_from_row(row: &sqlx::mysql::MySqlRow) -> Result<EventRecord, EventLogError> {
    let payload: String = row.try_get("payload")?;
    let status: String = row.try_get("status")?;
    let result: Option<String> = row.try_get("result")?;
    Ok(EventRecord {
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        topic: row.try_get("topic")?,
        key: row.try_get("event_key")?,
        payload: serde_json::from_str(&payload)
            .map_err(|error| EventLogError::CorruptRow(format!("payload: {error}")))?,
        status: status.parse()?,
        retry_count: row.try_get("retry_count")?,
        last_error: row.try_get("last_error")?,
        result: result
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|error| EventLogError::CorruptRow(format!("result: {error}")))?,
        occurred_at: row.try_get("occurred_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        published_at: row.try_get("published_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        source_partition: row.try_get("source_partition")?,
        source_offset: row.try_get("source_offset")?,
        dead_lettered_at: row.try_get("dead_lettered_at")?,
    })
}

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
    fn statuses_round_trip_through_their_column_text() {
        for status in EventStatus::ALL {
            assert_eq!(status.as_str().parse::<EventStatus>().unwrap(), status);
        }
        assert!("DONE".parse::<EventStatus>().is_err());
    }
}
