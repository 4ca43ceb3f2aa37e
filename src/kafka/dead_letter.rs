//! Dead-letter topics: where a record goes when it cannot be processed, with headers that
//! say where it came from and why. A record that is not an event keeps its key and value
//! byte for byte; an event that failed is written as its envelope, so it can be replayed.
//! A record larger than `kafka.consumer.max_record_bytes` is dead-lettered without its
//! value (its headers and key say where to find it).
//!
//! [`DeadLetters::send`] is the one dead-letter function: the partition actors use it for
//! records that fail, the retry scheduler for deliveries that ran out of attempts. Every
//! dead letter is also a `dead_letter` row, whoever sent it, which is what
//! `GET /admin/dead-letters` lists and `POST /admin/events/{id}/replay` replays.
//!
//! Only failures that belong to one record come here: a record that is not an event, an
//! event its handler refuses (a business row that cannot be read, a delivery rejected with
//! a 4xx), an event whose in-place retries or delivery attempts ran out. An outage of a
//! dependency never does: the partition waits for it (see [`crate::common::error`]).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::MySqlPool;
use tracing::error;

use crate::common::error::{Classify, ErrorClass};
use crate::event_log::{EventLog, EventLogError, Move, StatusChange};
use crate::events::EventId;
use crate::events::topics::dead_letter_topic;
use crate::kafka::TopicPartition;
use crate::kafka::producer::{Delivered, EventPublisher, PublishError, RawRecord};

pub const ORIGINAL_TOPIC_HEADER: &str = "dlt-original-topic";
pub const ORIGINAL_PARTITION_HEADER: &str = "dlt-original-partition";
pub const ORIGINAL_OFFSET_HEADER: &str = "dlt-original-offset";
pub const CONSUMER_GROUP_HEADER: &str = "dlt-consumer-group";
pub const ERROR_KIND_HEADER: &str = "dlt-error-kind";
pub const ERROR_HEADER: &str = "dlt-error";

/// One record to dead-letter.
#[derive(Clone, Copy, Debug)]
pub struct DeadLetter<'a> {
    pub source: &'a TopicPartition,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Set when the record was an event (or its id could be salvaged): its event-log row
    /// is marked DEAD_LETTER.
    pub event_id: Option<EventId>,
    /// Whether the event's last delivery attempt is counted with it (`retry_count`).
    pub count_attempt: bool,
    /// A short stable name: `invalid-json`, `permanent`, `retries-exhausted`, ...
    pub error_kind: &'a str,
    pub error: &'a str,
}

/// Why a dead letter did not go all the way.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Nothing was written; the record must not be passed over.
    #[error("dead letter not published: {0}")]
    Publish(#[from] PublishError),
    /// On the dead-letter topic, but its event-log row still says otherwise.
    #[error("dead letter published at offset {} but not recorded: {source}", published.offset)]
    NotRecorded {
        published: Delivered,
        source: EventLogError,
    },
}

impl Classify for DeadLetterError {
    fn class(&self) -> ErrorClass {
        match self {
            DeadLetterError::Publish(error) => error.class(),
            DeadLetterError::NotRecorded { source, .. } => source.class(),
        }
    }
}

/// Publishes dead letters and records them: a `dead_letter` row for every record (what the
/// admin API lists and replays) and, for the consumer whose progress is the event-log row,
/// the row's move to DEAD_LETTER.
#[derive(Clone)]
pub struct DeadLetters {
    publisher: EventPublisher,
    event_log: EventLog,
    group_id: String,
    /// Whether this group's progress is the event-log row's status (see
    /// [`crate::event_log::progress`]); a consumer that records its progress elsewhere (the ranking)
    /// leaves the row to the event type's owner.
    owns_event_rows: bool,
}

impl DeadLetters {
    pub fn new(
        publisher: EventPublisher,
        event_log: EventLog,
        group_id: impl Into<String>,
    ) -> Self {
        Self {
            publisher,
            event_log,
            group_id: group_id.into(),
            owns_event_rows: true,
        }
    }

    /// For a consumer that keeps its progress outside the event-log row.
    pub fn leaving_event_rows(mut self) -> Self {
        self.owns_event_rows = false;
        self
    }

    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// Publishes to `<topic>.DLT` (same partition number, so one key's letters stay in
    /// order), then records it ([`DeadLetters::record`]). The caller must not commit the
    /// record's offset unless both succeeded; after [`DeadLetterError::NotRecorded`] it
    /// retries [`DeadLetters::record`] alone.
    pub async fn send(&self, letter: DeadLetter<'_>) -> Result<Delivered, DeadLetterError> {
        let topic = dead_letter_topic(&letter.source.topic);
        let published = self
            .publisher
            .publish_raw(RawRecord {
                topic: &topic,
                partition: Some(letter.source.partition),
                key: letter.key,
                value: letter.value,
                headers: vec![
                    (ORIGINAL_TOPIC_HEADER, letter.source.topic.clone()),
                    (
                        ORIGINAL_PARTITION_HEADER,
                        letter.source.partition.to_string(),
                    ),
                    (ORIGINAL_OFFSET_HEADER, letter.offset.to_string()),
                    (CONSUMER_GROUP_HEADER, self.group_id.clone()),
                    (ERROR_KIND_HEADER, letter.error_kind.to_string()),
                    (ERROR_HEADER, letter.error.to_string()),
                ],
            })
            .await?;
        crate::observability::metrics::dead_lettered(&letter.source.topic);
        error!(
            group = %self.group_id,
            topic = %letter.source.topic,
            partition = letter.source.partition,
            offset = letter.offset,
            event_id = ?letter.event_id.map(|id| id.to_string()),
            error_kind = letter.error_kind,
            error = letter.error,
            dead_letter_offset = published.offset,
            "record dead-lettered"
        );
        match self.record(&letter, published).await {
            Ok(()) => Ok(published),
            Err(source) => Err(DeadLetterError::NotRecorded { published, source }),
        }
    }

    /// Records a published dead letter in one transaction: its `dead_letter` row and, when
    /// this group owns the event's row, the row's move to DEAD_LETTER.
    pub async fn record(
        &self,
        letter: &DeadLetter<'_>,
        published: Delivered,
    ) -> Result<(), EventLogError> {
        let mut transaction = self.event_log.pool().begin().await?;
        sqlx::query!(
            "INSERT INTO dead_letter (consumer_group, topic, source_partition, source_offset, \
               event_id, error_kind, error, dead_letter_partition, dead_letter_offset) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            self.group_id,
            letter.source.topic,
            letter.source.partition,
            letter.offset,
            letter.event_id,
            letter.error_kind,
            letter.error,
            published.partition,
            published.offset,
        )
        .execute(&mut *transaction)
        .await?;
        if self.owns_event_rows
            && let Some(event_id) = letter.event_id
        {
            let mut change = StatusChange::new(Move::DeadLetter).with_error(letter.error);
            if letter.count_attempt {
                change = change.counting_attempt();
            }
            EventLog::change_status_in(&mut transaction, event_id, change).await?;
        }
        transaction.commit().await?;
        Ok(())
    }
}

/// A `dead_letter` row: one record sent to a dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterRow {
    pub dead_letter_id: u64,
    pub consumer_group: String,
    pub topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub event_id: Option<EventId>,
    pub error_kind: String,
    pub error: String,
    pub dead_letter_partition: i32,
    pub dead_letter_offset: i64,
    pub created_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
}

/// Reads `dead_letter` rows into [`DeadLetterRow`] with the checked `query_as!`: every
/// column, typed, then `$rest` (the conditions) with its arguments.
macro_rules! select_dead_letters {
    ($rest:literal $(, $argument:expr)* $(,)?) => {
        sqlx::query_as!(
            DeadLetterRow,
            r#"SELECT dead_letter_id, consumer_group, topic, source_partition, source_offset,
                      event_id AS "event_id: EventId", error_kind, error,
                      dead_letter_partition, dead_letter_offset,
                      created_at AS "created_at: DateTime<Utc>",
                      replayed_at AS "replayed_at: DateTime<Utc>"
               FROM dead_letter "# + $rest
            $(, $argument)*
        )
    };
}

/// Reads and replays what [`DeadLetters::record`] wrote.
#[derive(Clone, Debug)]
pub struct DeadLetterLog {
    pool: MySqlPool,
}

impl DeadLetterLog {
    pub fn new(pool: MySqlPool) -> Self {
        Self { pool }
    }

    /// Dead letters not replayed yet, oldest first, after `after` (a `deadLetterId`).
    pub async fn open(&self, after: u64, limit: u32) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
        select_dead_letters!(
            "WHERE replayed_at IS NULL AND dead_letter_id > ? ORDER BY dead_letter_id LIMIT ?",
            after,
            limit,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// The dead letters of one event, every group's, replayed or not, oldest first.
    pub async fn of_event(&self, event_id: EventId) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
        select_dead_letters!("WHERE event_id = ? ORDER BY dead_letter_id", event_id)
            .fetch_all(&self.pool)
            .await
    }

    /// Which of `events` `group` has dead-lettered and nobody replayed.
    pub async fn open_among(
        &self,
        group: &str,
        events: &[EventId],
    ) -> Result<BTreeSet<EventId>, sqlx::Error> {
        if events.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut select = sqlx::QueryBuilder::new(
            "SELECT event_id FROM dead_letter WHERE replayed_at IS NULL AND consumer_group = ",
        );
        select.push_bind(group).push(" AND event_id IN (");
        let mut separated = select.separated(", ");
        for id in events {
            separated.push_bind(*id);
        }
        select.push(")");
        let rows: Vec<(EventId,)> = select.build_query_as().fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Marks the open dead letters of `event_id` replayed (by `group`, or every group's);
    /// returns how many.
    pub async fn mark_replayed(
        &self,
        event_id: EventId,
        group: Option<&str>,
    ) -> Result<u64, sqlx::Error> {
        let marked = sqlx::query!(
            "UPDATE dead_letter SET replayed_at = NOW(6) \
             WHERE event_id = ? AND replayed_at IS NULL AND (? IS NULL OR consumer_group = ?)",
            event_id,
            group,
            group,
        )
        .execute(&self.pool)
        .await?;
        Ok(marked.rows_affected())
    }
}
