//! Dead-letter topics: where a record goes when it cannot be processed, with headers that
//! say where it came from and why. A record that is not an event keeps its key and value
//! byte for byte; an event that failed is written as its envelope, so it can be replayed.

use tracing::{error, warn};

use crate::event_log::{EventLog, EventStatus, StatusChange};
use crate::events::EventId;
use crate::kafka::TopicPartition;
use crate::kafka::producer::{Delivered, EventPublisher, PublishError, RawRecord};
use crate::kafka::topics::dead_letter_topic;

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
    /// A short stable name: `invalid-json`, `permanent`, `retries-exhausted`, ...
    pub error_kind: &'a str,
    pub error: &'a str,
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
    /// commit the record's offset unless this succeeded.
    pub async fn send(&self, letter: DeadLetter<'_>) -> Result<Delivered, PublishError> {
        let delivered = self.publish(letter).await?;
        if let Some(event_id) = letter.event_id {
            let change = StatusChange::to(EventStatus::DeadLetter).with_error(letter.error);
            if let Err(error) = self.event_log.change_status(event_id, change).await {
                warn!(event_id = %event_id, %error, "cannot mark dead-lettered event in the event log");
            }
        }
        Ok(delivered)
    }

    /// Publishes to `<topic>.DLT` only; the caller records the event's state.
    pub async fn publish(&self, letter: DeadLetter<'_>) -> Result<Delivered, PublishError> {
        let topic = dead_letter_topic(&letter.source.topic);
        let delivered = self
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
            dead_letter_offset = delivered.offset,
            "record dead-lettered"
        );
        Ok(delivered)
    }
}
