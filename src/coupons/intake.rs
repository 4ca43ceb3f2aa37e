//! Coupon request intake with group commit.
//!
//! `POST /coupons/issue` hands its request to the intake and waits. Writer tasks take
//! whatever requests are waiting (up to `max_batch`) and, in one transaction:
//!
//! 1. refuse the requests of users that do not exist;
//! 2. write each request's event-log row (the outbox) with its claim of `(coupon, user)`
//!    (`coupon_claim`, a unique key): a user's repeated request for a coupon (in this batch
//!    or ever) meets the claim and is answered with the request holding it instead of
//!    recording a new event;
//! 3. write the answers of the requests sent with an `Idempotency-Key`;
//!
//! then commit, publish the `CouponRequested` events, and answer every waiting request.
//! Under load the batches grow by themselves; one commit then serves hundreds of requests.
//! A request is answered only once its row is committed.
//!
//! The queue of requests waiting for a writer is bounded (`coupons.intake_queue`): a request
//! that finds it full is refused at once ([`IntakeError::Full`], a 503 with `Retry-After`)
//! rather than waiting for room, so a crowd larger than the database can take in is answered
//! instead of piling up in the HTTP workers.
//!
//! The rows are written *proven* (see [`crate::outbox`]): PUBLISHED, and never marked.
//! The CouponIssuer records its progress in the same row (COMPLETED), so a request its group
//! has read past without deciding it was not in the log; the reconciler publishes it again.
//! One row write per accepted request: the row itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sqlx::{MySqlConnection, QueryBuilder};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::warn;

use crate::common::error::{Classify, Dependency, ErrorClass};
use crate::common::ids::{CouponId, RequestId, UserId};
use crate::event_log::{EventLogError, OutboxEvent};
use crate::events::{CouponRequested, EventEnvelope, EventId, EventPayload};
use crate::guards::idempotency::{self, IdempotencyKey, StoredAnswer};
use crate::outbox::{Committed, Outbox};

#[derive(Debug, Clone, thiserror::Error)]
pub enum IntakeError {
    #[error("the request could not be recorded: {message}")]
    NotRecorded { message: String, class: ErrorClass },
    #[error("the intake is shutting down")]
    Closed,
    #[error("too many coupon requests are waiting to be recorded")]
    Full,
}

impl Classify for IntakeError {
    fn class(&self) -> ErrorClass {
        match self {
            IntakeError::NotRecorded { class, .. } => *class,
            // The writers wait for MySQL: the queue fills when it falls behind.
            IntakeError::Closed | IntakeError::Full => ErrorClass::Unavailable(Dependency::Mysql),
        }
    }
}

/// What became of a submitted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intake {
    /// Recorded now.
    Accepted(RequestId),
    /// The user asked for this coupon before: that request.
    Existing(RequestId),
    /// No such user.
    UnknownUser,
}

/// Builds the answer an `Idempotency-Key` replays, from what became of the request.
pub type AnswerOf = fn(&Intake) -> StoredAnswer;

struct Pending {
    user: UserId,
    coupon: CouponId,
    event: OutboxEvent,
    idempotency: Option<(IdempotencyKey, AnswerOf)>,
    answer: oneshot::Sender<Result<Intake, IntakeError>>,
}

impl Pending {
    /// A new request of `user` for `coupon`, answered through `answer`.
    fn new(
        user: UserId,
        coupon: CouponId,
        idempotency: Option<(IdempotencyKey, AnswerOf)>,
        answer: oneshot::Sender<Result<Intake, IntakeError>>,
    ) -> Self {
        let envelope = EventEnvelope::new(
            user.partition_key(),
            EventPayload::CouponRequested(CouponRequested {
                user_id: user,
                coupon_id: coupon,
            }),
        );
        Self {
            user,
            coupon,
            event: OutboxEvent::new(envelope),
            idempotency,
            answer,
        }
    }

    fn request_id(&self) -> RequestId {
        RequestId::of_event(self.event.envelope.event_id)
    }
}

/// The intake's handle; cheap to clone.
#[derive(Clone)]
pub struct CouponIntake {
    queue: mpsc::Sender<Pending>,
}

impl CouponIntake {
    /// Starts `writers` writer tasks on the current arbiter, taking up to `max_batch`
    /// requests each from a queue of `capacity`.
    pub fn start(outbox: Outbox, writers: usize, max_batch: usize, capacity: usize) -> Self {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
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

    /// Records the request (unless the user has one for this coupon already) and publishes
    /// it; answers once its row is committed. With an idempotency key, the answer
    /// `answer_of` builds is stored with the request. Refused with [`IntakeError::Full`] at
    /// once when the queue is full.
    pub async fn submit(
        &self,
        user: UserId,
        coupon: CouponId,
        idempotency: Option<(IdempotencyKey, AnswerOf)>,
    ) -> Result<Intake, IntakeError> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending::new(user, coupon, idempotency, answer);
        self.queue.try_send(pending).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => IntakeError::Full,
            mpsc::error::TrySendError::Closed(_) => IntakeError::Closed,
        })?;
        answered.await.map_err(|_| IntakeError::Closed)?
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
        match record(&outbox, &batch).await {
            Ok((committed, intakes)) => {
                // Publishing waits for the broker's acknowledgement (linger included), for
                // ANSWER_WAIT at most: the rows are committed, so a broker that does not
                // answer delays the 202s by that much only. The writer goes on with the next
                // batch meanwhile.
                actix_rt::spawn(async move {
                    committed.publish_within(crate::outbox::ANSWER_WAIT).await;
                    for (pending, intake) in batch.into_iter().zip(intakes) {
                        let _ = pending.answer.send(Ok(intake));
                    }
                });
            }
            Err(error) => {
                warn!(%error, requests = batch.len(), "coupon requests not recorded");
                let error = IntakeError::NotRecorded {
                    message: error.to_string(),
                    class: error.class(),
                };
                for pending in batch {
                    let _ = pending.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Writes the batch in one transaction, trying again at once when the database reports a
/// transient failure (a deadlock victim).
async fn record(
    outbox: &Outbox,
    batch: &[Pending],
) -> Result<(Committed, Vec<Intake>), EventLogError> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let written = async {
            let mut transaction = outbox.begin().await?;
            let users = batch.iter().map(|pending| pending.user).collect();
            let known = known_users(&mut transaction, &users).await?;
            let claimed = batch
                .iter()
                .filter(|pending| known.contains(&pending.user))
                .map(|pending| {
                    (
                        pending.event.clone(),
                        claim_of(pending.coupon, pending.user),
                    )
                })
                .collect();
            let owners = transaction.record_proven_claiming(claimed).await?;
            let intakes = decide_intake(batch, &known, &owners);
            let answers: Vec<(&IdempotencyKey, StoredAnswer)> = batch
                .iter()
                .zip(&intakes)
                .filter_map(|(pending, intake)| {
                    let (key, answer_of) = pending.idempotency.as_ref()?;
                    Some((key, answer_of(intake)))
                })
                .collect();
            idempotency::store_keeping_first(&mut transaction, &answers).await?;
            Ok::<_, EventLogError>((transaction.commit().await?, intakes))
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

/// The users among `users` that exist (one statement).
pub(crate) async fn known_users(
    connection: &mut MySqlConnection,
    users: &BTreeSet<UserId>,
) -> Result<BTreeSet<UserId>, sqlx::Error> {
    let mut select = QueryBuilder::new("SELECT user_id FROM app_user WHERE user_id IN (");
    let mut separated = select.separated(", ");
    for user in users {
        separated.push_bind(*user);
    }
    select.push(")");
    Ok(select
        .build_query_as::<(UserId,)>()
        .fetch_all(&mut *connection)
        .await?
        .into_iter()
        .map(|(user,)| user)
        .collect())
}

/// What became of each request of the batch (see the module documentation), given the users
/// that exist and which request holds each `(coupon, user)` claim now.
fn decide_intake(
    batch: &[Pending],
    known: &BTreeSet<UserId>,
    owners: &BTreeMap<String, EventId>,
) -> Vec<Intake> {
    batch
        .iter()
        .map(|pending| {
            if !known.contains(&pending.user) {
                return Intake::UnknownUser;
            }
            match owners.get(&claim_of(pending.coupon, pending.user)) {
                Some(owner) if *owner == pending.event.envelope.event_id => {
                    Intake::Accepted(RequestId::of_event(*owner))
                }
                Some(owner) => Intake::Existing(RequestId::of_event(*owner)),
                // Not reachable: the claim was inserted or already there.
                None => Intake::Accepted(pending.request_id()),
            }
        })
        .collect()
}

/// The `coupon_claim` of a request: `{couponId}/{userId}`.
fn claim_of(coupon: CouponId, user: UserId) -> String {
    format!("{coupon}/{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(user: u64, coupon: u64) -> Pending {
        let (answer, _answered) = oneshot::channel();
        Pending::new(
            UserId::from_u64(user).unwrap(),
            CouponId::from_u64(coupon).unwrap(),
            None,
            answer,
        )
    }

    #[test]
    fn a_request_is_accepted_when_it_holds_its_claim_and_answered_with_the_holder_otherwise() {
        let first = request(1, 7);
        let repeated = request(1, 7);
        let other_coupon = request(1, 8);
        let stranger = request(2, 7);
        let known = BTreeSet::from([UserId::from_u64(1).unwrap()]);
        let owners = BTreeMap::from([
            ("7/1".to_string(), first.event.envelope.event_id),
            ("8/1".to_string(), other_coupon.event.envelope.event_id),
        ]);
        let batch = [first, repeated, other_coupon, stranger];
        let intakes = decide_intake(&batch, &known, &owners);
        assert_eq!(
            intakes,
            vec![
                Intake::Accepted(batch[0].request_id()),
                Intake::Existing(batch[0].request_id()),
                Intake::Accepted(batch[2].request_id()),
                Intake::UnknownUser,
            ]
        );
    }
}
