//! Dead-letter topics: where a record goes when it cannot be processed, with headers that
//! say where it came from and why. A record that is not an event keeps its key and value
//! byte for byte; an event that failed is written as its envelope, so it can be replayed.
//! A record larger than `kafka.consumer.max_record_bytes` is dead-lettered without its
//! value (its headers and key say where to find it).
//!
//! [`DeadLetters::send`] is the one dead-letter function: the partition actors use it for
//! records that fail, the retry scheduler for deliveries that ran out of attempts.

use tracing::error;

use crate::error::{Classify, ErrorClass};
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

/// Publishes dead letters and records them in the event log.
#[derive(Clone)]
pub struct DeadLetters {
    publisher: EventPublisher,
    event_log: EventLog,
    group_id: String,
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
        }
    }

    /// Publishes to `<topic>.DLT` (same partition number, so one key's letters stay in
    /// order) and, when the record was an event, marks it DEAD_LETTER. The caller must not
    /// commit the record's offset unless the publication succeeded.
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
        if let Some(event_id) = letter.event_id {
            let mut change = StatusChange::new(Move::DeadLetter).with_error(letter.error);
            if letter.count_attempt {
                change = change.counting_attempt();
            }
            if let Err(source) = self.event_log.change_status(event_id, change).await {
                return Err(DeadLetterError::NotRecorded { published, source });
            }
        }
        Ok(published)
    }
}
