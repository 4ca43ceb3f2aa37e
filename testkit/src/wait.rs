//! Waiting for something to hold, with a deadline: a test never sleeps for a while and
//! hopes; it polls a condition and fails naming what it waited for and what it saw last.

use std::future::Future;
use std::time::Duration;

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_found(what, timeout, || {
        let holds = condition();
        async move { if holds.await { Ok(()) } else { Err(None) } }
    })
    .await
}

/// Polls `probe` every 20 ms until it finds what it looks for (`Ok`) and returns that;
/// after `timeout` panics naming `what` and, when the probe described it (`Err(Some(..))`),
/// what it saw last.
pub async fn eventually_found<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Option<String>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = match probe().await {
            Ok(found) => return found,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            match seen {
                Some(seen) => {
                    panic!("timed out after {timeout:?} waiting for: {what}; last seen: {seen}")
                }
                None => panic!("timed out after {timeout:?} waiting for: {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
