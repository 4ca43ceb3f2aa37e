//! The actor runtime: it knows topics, partitions and outcomes, never coupons or orders.
//!
//! ```text
//! ConsumerGroup ── ConsumerGroupActor ──┬── PartitionActor (topic, 0) ──┐
//!   (polling thread, rebalances)        ├── PartitionActor (topic, 1) ──┼──► DomainActor<H> (supervised)
//!                                       └── PartitionActor (topic, 2) ──┘     └─ H: a slice's handler
//! ```
//!
//! - [`consumer_group`]: one actor per consumer group, starting and draining partition
//!   actors on rebalances.
//! - [`partition`]: one actor per assigned partition; [`retry`]: its in-place retry policy.
//! - [`domain`]: the domain-actor wrapper (supervision, probes, counters) and the
//!   [`domain::DomainHandler`] contract the slices implement.
//! - [`tree`]: every actor's observable state; the slices' background actors (outbox relay,
//!   retry scheduler) join it by name.
//!
//! Partition and domain actors run on an [`ArbiterPool`]; every actor reports an
//! observable state, gathered by [`tree::ActorTree`] for the admin API and snapshot tests.

pub mod consumer_group;
pub mod domain;
pub mod lag;
pub mod partition;
pub mod progress;
pub mod retry;
pub mod tree;

use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::prelude::*;
use actix::{Arbiter, ArbiterHandle};
use futures::FutureExt;
use tracing::error;

use crate::common::error::panic_message;

/// Whether a periodic background actor (the outbox relay, the retry scheduler, the
/// reconciler) may start a pass: one at a time, and none once it was told to stop.
#[derive(Debug, Default)]
pub struct PassGate {
    running: bool,
    stopping: bool,
}

impl PassGate {
    /// Starts a pass unless one runs or the actor stops: `true` when the caller runs it.
    pub fn begin(&mut self) -> bool {
        if self.running || self.stopping {
            return false;
        }
        self.running = true;
        true
    }

    /// The pass ended (or panicked and the actor restarts).
    pub fn end(&mut self) {
        self.running = false;
    }

    /// No pass starts from now on (not `ctx.stop()`: the supervisor would restart the actor).
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    pub fn running(&self) -> bool {
        self.running
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }
}

/// Runs one pass of a periodic background actor (the outbox relay, the retry scheduler) in
/// its context and hands its output to `done`. A pass that panics stops the actor instead,
/// and its `Supervisor` restarts it ([`Supervised::restarting`] resets what the pass left).
pub fn spawn_supervised_pass<A, F>(
    ctx: &mut Context<A>,
    name: &'static str,
    pass: F,
    done: impl FnOnce(&mut A, F::Output) + 'static,
) where
    A: Actor<Context = Context<A>> + Supervised,
    F: Future + 'static,
{
    let guarded = AssertUnwindSafe(pass).catch_unwind();
    ctx.spawn(
        actix::fut::wrap_future(guarded).map(move |ran, actor: &mut A, ctx: &mut Context<A>| {
            match ran {
                Ok(output) => done(actor, output),
                Err(panic) => {
                    error!(actor = name, error = %panic_message(name, &panic), "pass panicked; restarting");
                    ctx.stop();
                }
            }
        }),
    );
}

/// A fixed set of arbiters (one thread each) that actors are spread over round-robin, so
/// partitions are processed in parallel.
pub struct ArbiterPool {
    handles: Vec<ArbiterHandle>,
    arbiters: Mutex<Vec<Arbiter>>,
    next: AtomicUsize,
}

/// Stops a pool's arbiters from anywhere, at once and without waiting: for a host that
/// abandons a daemon without its ordered shutdown (a test that ends), so that the actors,
/// and the connections they hold, go away with their threads.
#[derive(Clone)]
pub struct ArbiterStopper {
    handles: Vec<ArbiterHandle>,
}

impl ArbiterStopper {
    pub fn stop(&self) {
        for handle in &self.handles {
            handle.stop();
        }
    }
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

    /// Handles that stop every arbiter without waiting (see [`ArbiterStopper`]).
    pub fn stopper(&self) -> ArbiterStopper {
        ArbiterStopper {
            handles: self.handles.clone(),
        }
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
