//! Group commit of small writes that many tasks make at once: each caller hands its item to
//! one writer task and waits; the writer takes every item queued by then (up to
//! [`GroupWrite::MAX_ITEMS`]), writes them together (one statement, one `fsync`) and answers
//! each. Nothing waits for a timer, so an idle system pays no latency and a busy one batches
//! naturally (items queue while the previous write runs).
//!
//! The writer starts on first use, on the arbiter of the first caller, and lives as long as
//! that arbiter. A caller whose writer is gone (its arbiter stopped) or dropped its item gets
//! `None` and writes alone.

use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};

/// What a group writer writes.
pub trait GroupWrite: Clone + 'static {
    type Item: 'static;
    type Answer: 'static;

    /// The most items one write takes.
    const MAX_ITEMS: usize;

    /// Writes `items` together: one answer per item, in order.
    fn write(&self, items: Vec<Self::Item>) -> impl Future<Output = Vec<Self::Answer>>;
}

type Queued<W> = (
    <W as GroupWrite>::Item,
    oneshot::Sender<<W as GroupWrite>::Answer>,
);

/// The handle of a group writer (see the module documentation).
pub struct Grouped<W: GroupWrite> {
    write: W,
    queue: OnceLock<mpsc::UnboundedSender<Queued<W>>>,
}

impl<W: GroupWrite> Grouped<W> {
    pub fn new(write: W) -> Self {
        Self {
            write,
            queue: OnceLock::new(),
        }
    }

    /// What the writer writes with (for a caller that writes alone).
    pub fn write(&self) -> &W {
        &self.write
    }

    /// Writes `item` with whatever else is waiting: its answer, or `None` when the writer
    /// is gone.
    pub async fn submit(&self, item: W::Item) -> Option<W::Answer> {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            actix_rt::spawn(run(self.write.clone(), receiver));
            sender
        });
        let (answer, answered) = oneshot::channel();
        queue.send((item, answer)).ok()?;
        answered.await.ok()
    }
}

async fn run<W: GroupWrite>(write: W, mut queued: mpsc::UnboundedReceiver<Queued<W>>) {
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < W::MAX_ITEMS {
            match queued.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (items, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let written = write.write(items).await;
        for (answer, written) in answers.into_iter().zip(written) {
            let _ = answer.send(written);
        }
    }
}
