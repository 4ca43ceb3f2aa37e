//! Observability, a test binary of its own: the Prometheus recorder is one per process,
//! so counters here move only by the work of the test that holds [`exclusive`].

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

/// Runs an outside tool (the browser, schemathesis) to its end on a blocking thread (the
/// daemon runs on the test thread's runtime) and returns whether it succeeded with
/// everything it printed.
pub async fn run_tool(mut command: std::process::Command, tool: &str) -> (bool, String) {
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap_or_else(|error| panic!("{tool} ran: {error}"))
        .unwrap_or_else(|error| panic!("{tool} starts: {error}"));
    let printed = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}
