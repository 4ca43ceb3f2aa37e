//! Coupon request intake with group commit.
//!
//! `POST /coupons/issue` hands its request to the intake and waits. Writer tasks take
//! whatever requests are waiting (up to `max_batch`), write all of their event-log rows
//! PENDING in one transaction, commit, publish the `CouponRequested` events, mark them
//! PUBLISHED, and answer every waiting request. Under load the batches grow by themselves;
//! one commit then serves hundreds of requests. A request is answered only once its row is
//! committed: if publishing fails afterwards, the outbox relay publishes it.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::warn;

use crate::error::{Classify, ErrorClass};
use crate::event_log::{EventLogError, OutboxEvent};
use crate::events::{CouponRequested, EventEnvelope, EventPayload};
use crate::ids::{CouponId, RequestId, UserId};
use crate::outbox::{Committed, Outbox};

#[derive(Debug, Clone, thiserror::Error)]
pub enum IntakeError {
    #[error("the request could not be recorded: {0}")]
    NotRecorded(String),
    #[error("the intake is shutting down")]
    Closed,
}

struct Pending {
    event: OutboxEvent,
    accepted: oneshot::Sender<Result<(), IntakeError>>,
}

/// The intake's handle; cheap to clone.
#[derive(Clone)]
pub struct CouponIntake {
    queue: mpsc::Sender<Pending>,
}

impl CouponIntake {
    /// Starts `writers` writer tasks on the current arbiter.
    pub fn start(outbox: Outbox, writers: usize, max_batch: usize) -> Self {
        let (queue, receiver) = mpsc::channel(max_batch.max(1) * writers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            actix_rt::spawn(write_batches(
                receiver.clone(),
                outbox.clone(),
                max_batch.max(1),
            ));
        }
        Self { queue }
    }

    /// Records the request and publishes it; returns its request id once its row is
    /// committed.
    pub async fn submit(&self, user: UserId, coupon: CouponId) -> Result<RequestId, IntakeError> {
        let envelope = EventEnvelope::new(
            user.partition_key(),
            EventPayload::CouponRequested(CouponRequested {
                user_id: user,
                coupon_id: coupon,
            }),
        );
        let request_id = RequestId::of_event(envelope.event_id);
        let (accepted, answer) = oneshot::channel();
        let pending = Pending {
            event: OutboxEvent::new(envelope),
            accepted,
        };
        self.queue
            .send(pending)
            .await
            .map_err(|_| IntakeError::Closed)?;
        answer.await.map_err(|_| IntakeError::Closed)??;
        Ok(request_id)
    }
}

async fn write_batches(
    receiver: Arc<Mutex<mpsc::Receiver<Pending>>>,
    outbox: Outbox,
    max_batch: usize,
) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            batch
        };
        let events: Vec<OutboxEvent> = batch.iter().map(|pending| pending.event.clone()).collect();
        match record(&outbox, events).await {
            Ok(committed) => {
                // Publishing waits for the broker's acknowledgement (linger included); the
                // writer goes on with the next batch meanwhile.
                actix_rt::spawn(async move {
                    committed.publish().await;
                    for pending in batch {
                        let _ = pending.accepted.send(Ok(()));
                    }
                });
            }
            Err(error) => {
                warn!(%error, requests = batch.len(), "coupon requests not recorded");
                let error = IntakeError::NotRecorded(error.to_string());
                for pending in batch {
                    let _ = pending.accepted.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Writes the rows in one transaction, trying again at once when the database reports a
/// transient failure (a deadlock victim, a dropped connection).
async fn record(outbox: &Outbox, events: Vec<OutboxEvent>) -> Result<Committed, EventLogError> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let written = async {
            let mut transaction = outbox.begin().await?;
            transaction.record(events.clone()).await?;
            transaction.commit().await
        }
        .await;
        match written {
            Err(error) if attempt < ATTEMPTS && error.class() == ErrorClass::Retryable => {
                warn!(%error, attempt, "recording coupon requests failed; trying again");
                attempt += 1;
            }
            written => return written,
        }
    }
}
