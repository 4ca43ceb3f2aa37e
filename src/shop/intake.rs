//! Group commit for orders and payments: handlers submit a request and wait for its answer;
//! writer tasks take whatever requests are waiting (up to `max_batch`; no timer, so batches
//! grow with load) and write each batch in one transaction ([`GroupCommit`]). A request whose
//! `Idempotency-Key` an earlier request of its batch carries waits for the batch and then runs
//! alone (it replays); a batch that fails on a transient error is tried again, and one that
//! fails otherwise runs again one request per transaction, so a request that cannot be
//! written fails alone. Answers go out once the batch is committed and its events published
//! (or `ANSWER_WAIT` has passed).

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::warn;

use crate::common::error::{Classify, ErrorClass};
use crate::guards::idempotency::IdempotencyKey;
use crate::outbox::{ANSWER_WAIT, Committed, Outbox, OutboxTransaction};
use crate::shop::store::ShopError;

/// How often a batch is tried again after a transient failure before its requests run alone.
const BATCH_ATTEMPTS: usize = 3;

/// What a group-committed writer does: a batch in one transaction, or one request alone.
pub trait GroupCommit: Clone + 'static {
    type Request: Clone + 'static;
    type Answer: 'static;

    /// What a request is, for the log (`payment`, `order`).
    const WHAT: &'static str;

    /// The outbox the batches' transactions are opened on.
    fn outbox(&self) -> &Outbox;

    fn key(request: &Self::Request) -> Option<&IdempotencyKey>;

    /// Decides and writes a batch in `transaction`: an answer per request, in order.
    fn write_in(
        &self,
        transaction: &mut OutboxTransaction,
        batch: &[Self::Request],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, ShopError>>;

    /// One request in a transaction of its own (a failed batch's requests, and those that
    /// repeat a key of their batch).
    fn alone(&self, request: Self::Request) -> impl Future<Output = Self::Answer>;
}

/// A submitted request and where its answer goes.
pub struct Waiting<R, A> {
    pub request: R,
    pub answer: oneshot::Sender<A>,
}

impl<R, A> Waiting<R, A> {
    /// Answers the request (its submitter may have gone: nothing to do then).
    pub fn answer(self, answer: A) {
        let _ = self.answer.send(answer);
    }
}

/// The handle of a group-committed intake; cheap to clone.
pub struct Intake<R, A> {
    queue: mpsc::Sender<Waiting<R, A>>,
}

impl<R, A> Clone for Intake<R, A> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<R: 'static, T: 'static> Intake<R, Result<T, ShopError>> {
    /// Starts `writers` tasks of `group` on the current arbiter, each writing the batches it
    /// takes, one at a time.
    pub fn start<G>(group: G, writers: usize, max_batch: usize) -> Self
    where
        G: GroupCommit<Request = R, Answer = Result<T, ShopError>>,
    {
        let (writers, max_batch) = (writers.max(1), max_batch.max(1));
        let (queue, receiver) = mpsc::channel(max_batch * writers * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers {
            let (receiver, group) = (receiver.clone(), group.clone());
            actix_rt::spawn(async move {
                while let Some(batch) = take_batch(&receiver, max_batch).await {
                    write_batch(&group, batch).await;
                }
            });
        }
        Self { queue }
    }

    /// Submits `request` and waits for its answer (see the module documentation).
    pub async fn submit(&self, request: R) -> Result<T, ShopError> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Waiting { request, answer })
            .await
            .map_err(|_| ShopError::Closed)?;
        answered.await.map_err(|_| ShopError::Closed)?
    }
}

/// Writes a batch (see the module documentation).
async fn write_batch<G: GroupCommit>(group: &G, batch: Batch<G::Request, G::Answer>) {
    let (batch, repeated_keys) = split_repeated_keys(batch, G::key);
    let requests: Vec<G::Request> = batch
        .iter()
        .map(|waiting| waiting.request.clone())
        .collect();
    match in_one_transaction(group, &requests).await {
        Ok((committed, answers)) => {
            actix_rt::spawn(async move {
                committed.publish_within(ANSWER_WAIT).await;
                for (waiting, answer) in batch.into_iter().zip(answers) {
                    waiting.answer(answer);
                }
            });
            for waiting in repeated_keys {
                actix_rt::spawn(alone(group.clone(), waiting));
            }
        }
        Err(error) => {
            warn!(%error, requests = batch.len(), "{} batch failed; writing one by one", G::WHAT);
            for waiting in batch.into_iter().chain(repeated_keys) {
                actix_rt::spawn(alone(group.clone(), waiting));
            }
        }
    }
}

async fn alone<G: GroupCommit>(group: G, waiting: Waiting<G::Request, G::Answer>) {
    let answer = group.alone(waiting.request.clone()).await;
    waiting.answer(answer);
}

/// Writes the batch in one transaction, trying again at once after a transient failure.
async fn in_one_transaction<G: GroupCommit>(
    group: &G,
    requests: &[G::Request],
) -> Result<(Committed, Vec<G::Answer>), ShopError> {
    let mut attempt = 1;
    loop {
        let written = async {
            let mut transaction = group.outbox().begin().await?;
            let answers = group.write_in(&mut transaction, requests).await?;
            Ok::<_, ShopError>((transaction.commit().await?, answers))
        }
        .await;
        match written {
            Err(error) if attempt < BATCH_ATTEMPTS && error.class() == ErrorClass::Retryable => {
                warn!(%error, attempt, "{} batch failed; trying again", G::WHAT);
                attempt += 1;
            }
            written => return written,
        }
    }
}

/// Waits for a request, then takes the others waiting, up to `max_batch` in all; `None` when
/// every handle is gone.
async fn take_batch<R, A>(
    receiver: &Mutex<mpsc::Receiver<Waiting<R, A>>>,
    max_batch: usize,
) -> Option<Vec<Waiting<R, A>>> {
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match receiver.try_recv() {
            Ok(waiting) => batch.push(waiting),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// A batch of waiting requests.
pub type Batch<R, A> = Vec<Waiting<R, A>>;

/// Splits off the requests whose `Idempotency-Key` an earlier request of the batch carries:
/// they run alone once the batch is committed, and replay its answer.
pub fn split_repeated_keys<R, A>(
    batch: Batch<R, A>,
    key_of: impl Fn(&R) -> Option<&IdempotencyKey>,
) -> (Batch<R, A>, Batch<R, A>) {
    let mut seen = std::collections::BTreeSet::new();
    batch
        .into_iter()
        .partition(|waiting| match key_of(&waiting.request) {
            None => true,
            Some(key) => seen.insert((key.user, key.route, key.key.clone())),
        })
}
