//! The transactional outbox.
//!
//! A request writes its events PENDING into the event log inside its own business
//! transaction ([`Outbox::record`]), commits, and then publishes them
//! ([`Outbox::publish_committed`]). If the process dies between the commit and the broker's
//! acknowledgement, the rows stay PENDING and the outbox relay republishes them
//! ([`Outbox::relay_once`]) once they are older than `outbox.republish_after_ms`. An event
//! can therefore reach Kafka twice; consumers deduplicate by event id.

pub mod relay;

use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;
use sqlx::MySqlConnection;
use tracing::{info, warn};

use crate::event_log::{EventLog, EventLogError, OutboxEvent};
use crate::events::EventId;
use crate::kafka::producer::EventPublisher;

#[derive(Clone)]
pub struct Outbox {
    event_log: EventLog,
    publisher: EventPublisher,
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
        }
    }

    pub fn event_log(&self) -> &EventLog {
        &self.event_log
    }

    /// Writes the events PENDING in the caller's transaction.
    pub async fn record(
        transaction: &mut MySqlConnection,
        events: &[OutboxEvent],
    ) -> Result<(), EventLogError> {
        EventLog::insert_pending(transaction, events).await
    }

    /// Publishes events whose rows are committed, then marks them PUBLISHED. A failure is
    /// logged and left to the relay; it is never the caller's problem.
    pub async fn publish_committed(&self, events: &[OutboxEvent]) -> Publication {
        let published = self.publish_all(events).await;
        let mut publication = Publication {
            published: published.len() as u64,
            failed: (events.len() - published.len()) as u64,
            undecodable: 0,
        };
        if let Err(error) = self.event_log.mark_published(&published).await {
            // The events are on Kafka; their rows stay PENDING and will be published again.
            warn!(%error, events = published.len(), "cannot mark events published");
            publication.failed += publication.published;
            publication.published = 0;
        }
        publication
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
            match row.envelope {
                Ok(envelope) => events.push(OutboxEvent {
                    topic: row.topic,
                    envelope,
                }),
                Err(error) => {
                    undecodable += 1;
                    warn!(event_id = %row.event_id, %error, "pending event cannot be rebuilt; left for a version that knows it");
                }
            }
        }
        let published = self.publish_all(&events).await;
        EventLog::mark_published_in(&mut transaction, &published).await?;
        transaction.commit().await?;
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
            let result = self.publisher.publish(&event.topic, &event.envelope).await;
            (event.envelope.event_id, result)
        }))
        .await;
        deliveries
            .into_iter()
            .filter_map(|(event_id, result)| match result {
                Ok(_) => Some(event_id),
                Err(error) => {
                    warn!(event_id = %event_id, %error, "publishing failed; the outbox relay will retry");
                    None
                }
            })
            .collect()
    }
}
