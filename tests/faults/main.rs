//! The fault-injection suite, a test binary of its own: its scenarios load the machine for
//! minutes each, so they run after the other binaries rather than beside them.
//!
//! Each drill runs one or more daemon processes, a broker and a load, and its progress
//! deadlines assume a machine it shares with at most as many drills as it has cores (the
//! default `--test-threads`). A drill therefore takes a [`drill_slot`] first: with
//! `--test-threads=8` on two cores, eight drills at once would starve one another (every
//! load's pace drops to a crawl and the drills fail on their progress deadlines, not on an
//! invariant), so the rest wait for a slot instead.

#[path = "../support/mod.rs"]
mod support;

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

mod checker;
mod members;
mod scenarios;

/// A drill's turn: held for the whole drill (see the module documentation).
pub(crate) struct DrillSlot;

static SLOTS_TAKEN: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static SLOT_FREED: std::sync::Condvar = std::sync::Condvar::new();

/// Waits until fewer drills than the machine has cores are running, and takes a slot.
/// Called first thing in a drill, before its runtime has anything to do.
pub(crate) fn drill_slot() -> DrillSlot {
    let slots = std::thread::available_parallelism().map_or(2, usize::from);
    let mut taken = SLOTS_TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    while *taken >= slots {
        taken = SLOT_FREED
            .wait(taken)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    *taken += 1;
    DrillSlot
}

impl Drop for DrillSlot {
    fn drop(&mut self) {
        let mut taken = SLOTS_TAKEN
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *taken -= 1;
        SLOT_FREED.notify_one();
    }
}

/// Waits until `clients` have had `target` requests accepted in all; after `timeout`
/// panics naming `what` and how many were accepted.
async fn accepted_reach(
    clients: &commerce_events::faults::Clients,
    target: u64,
    what: &str,
    timeout: std::time::Duration,
) {
    support::eventually_found(what, timeout, || async {
        let accepted = clients.accepted();
        if accepted >= target {
            Ok(())
        } else {
            Err(Some(format!("{accepted} of {target} requests accepted")))
        }
    })
    .await
}
