//! Group commit of deliveries' COMPLETED moves.
//!
//! A delivered event's row must be COMPLETED before its attempt reports it delivered (the
//! key's next record goes out after that). Hundreds of deliveries finish at once under `key`
//! and `unordered` ordering; one autocommit `UPDATE` each would cost a statement and a log
//! flush per delivery. Instead each attempt hands its event id to one writer task and waits:
//! the writer takes every id queued by then, moves them in one statement, and answers each.
//! Nothing waits for a timer, so an idle system pays no latency and a busy one batches
//! naturally (the ids queue while the previous statement runs). Should the shared statement
//! fail, each attempt runs its own, and gets its own error (an outage is classed as usual).

use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::event_log::{EventLog, EventLogError, Move, StatusChange};
use crate::events::EventId;

/// The most ids one statement moves.
const MAX_IDS_PER_STATEMENT: usize = 1_000;

type Queued = (EventId, oneshot::Sender<bool>);

pub struct Completions {
    event_log: EventLog,
    /// Started on first use, on the runtime of the first attempt that completes.
    writer: OnceLock<mpsc::UnboundedSender<Queued>>,
}

impl Completions {
    pub fn new(event_log: EventLog) -> Self {
        Self {
            event_log,
            writer: OnceLock::new(),
        }
    }

    /// Moves the event's row to COMPLETED (in a statement shared with the others completing
    /// now).
    pub async fn complete(&self, id: EventId) -> Result<(), EventLogError> {
        let writer = self.writer.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            actix_rt::spawn(write(self.event_log.clone(), receiver));
            sender
        });
        let (answer, answered) = oneshot::channel();
        if writer.send((id, answer)).is_ok() && answered.await == Ok(true) {
            return Ok(());
        }
        self.event_log
            .change_status(id, StatusChange::new(Move::Complete))
            .await
            .map(|_| ())
    }
}

async fn write(event_log: EventLog, mut queued: mpsc::UnboundedReceiver<Queued>) {
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_IDS_PER_STATEMENT {
            match queued.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let ids: Vec<EventId> = batch.iter().map(|(id, _)| *id).collect();
        let moved = match event_log.pool().acquire().await {
            Ok(mut connection) => EventLog::change_status_of_many_in(
                &mut connection,
                &ids,
                StatusChange::new(Move::Complete),
            )
            .await
            .is_ok(),
            Err(_) => false,
        };
        debug!(
            events = ids.len(),
            moved, "deliveries completed in one statement"
        );
        for (_, answer) in batch {
            let _ = answer.send(moved);
        }
    }
}
