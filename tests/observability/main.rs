//! Observability, a test binary of its own: the Prometheus recorder is one per process,
//! so counters here move only by the work of the test that holds [`exclusive`].

#[path = "../support/mod.rs"]
mod support;

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

mod browser;
mod metrics;
mod schemathesis;
mod trace;

use tokio::sync::{Mutex, MutexGuard};

/// One test at a time in this binary: each asserts counters moved by exactly its work.
pub async fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}
