//! The actor tree.
//!
//! ```text
//! ConsumerGroup ── ConsumerGroupActor ──┬── PartitionActor (topic, 0) ──┐
//!   (polling thread, rebalances)        ├── PartitionActor (topic, 1) ──┼──► DomainActor<H> (supervised)
//!                                       └── PartitionActor (topic, 2) ──┘
//! OutboxRelay (republishes PENDING event-log rows)
//! ```
//!
//! Partition and domain actors run on an [`ArbiterPool`]; every actor reports an
//! observable state, gathered by [`tree::ActorTree`] for the admin API and snapshot tests.

pub mod consumer_group;
pub mod domain;
pub mod partition;
pub mod retry;
pub mod tree;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::{Arbiter, ArbiterHandle};

/// A fixed set of arbiters (one thread each) that actors are spread over round-robin, so
/// partitions are processed in parallel.
pub struct ArbiterPool {
    handles: Vec<ArbiterHandle>,
    arbiters: Mutex<Vec<Arbiter>>,
    next: AtomicUsize,
}

impl ArbiterPool {
    /// Starts `threads` arbiters (at least one). Must be called inside an actix system.
    pub fn new(threads: usize) -> Self {
        let arbiters: Vec<Arbiter> = (0..threads.max(1)).map(|_| Arbiter::new()).collect();
        Self {
            handles: arbiters.iter().map(Arbiter::handle).collect(),
            arbiters: Mutex::new(arbiters),
            next: AtomicUsize::new(0),
        }
    }

    /// The arbiter for the next actor.
    pub fn next(&self) -> ArbiterHandle {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[index].clone()
    }

    /// Stops every arbiter and waits for their threads. Blocks: call from a blocking thread.
    pub fn stop_blocking(&self) {
        let arbiters: Vec<Arbiter> =
            std::mem::take(&mut *self.arbiters.lock().expect("arbiter lock poisoned"));
        for arbiter in &arbiters {
            arbiter.stop();
        }
        for arbiter in arbiters {
            let _ = arbiter.join();
        }
    }
}
