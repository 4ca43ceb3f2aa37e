//! The queue in front of a group commit: handlers submit a request and wait for its answer;
//! writer tasks take whatever requests are waiting (up to `max_batch`; no timer, so batches
//! grow with load) and write each batch as one.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::guards::idempotency::IdempotencyKey;

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

impl<R: 'static, A: 'static> Intake<R, A> {
    /// Starts `writers` tasks on the current arbiter, each handing the batches it takes to
    /// `write`, one batch at a time.
    pub fn start<W, F>(writers: usize, max_batch: usize, write: W) -> Self
    where
        W: Fn(Vec<Waiting<R, A>>) -> F + Clone + 'static,
        F: Future<Output = ()> + 'static,
    {
        let (writers, max_batch) = (writers.max(1), max_batch.max(1));
        let (queue, receiver) = mpsc::channel(max_batch * writers * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers {
            let (receiver, write) = (receiver.clone(), write.clone());
            actix_rt::spawn(async move {
                while let Some(batch) = take_batch(&receiver, max_batch).await {
                    write(batch).await;
                }
            });
        }
        Self { queue }
    }

    /// Submits `request` and waits for its answer; `None` once the writers have stopped.
    pub async fn submit(&self, request: R) -> Option<A> {
        let (answer, answered) = oneshot::channel();
        self.queue.send(Waiting { request, answer }).await.ok()?;
        answered.await.ok()
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
