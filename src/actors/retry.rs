//! The in-place retry policy of a partition: a fixed delay between a bounded number of
//! further attempts (the design document's `FixedBackOff(1000 ms, 3)`), built on `backon`'s
//! policy types.
//!
//! This path is for short, transient failures inside a domain actor (a dropped database
//! connection, a deadlock, a restart after a fatal error). It holds the partition while it
//! waits, which keeps the partition's order; long back-off for external systems belongs to
//! a scheduler that lets the partition move on.

use std::time::Duration;

use backon::{BackoffBuilder, ConstantBuilder};

use crate::config::RetrySettings;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub delay: Duration,
    /// Further attempts after the first one.
    pub attempts: usize,
}

impl RetryPolicy {
    pub fn from_settings(settings: &RetrySettings) -> Self {
        Self {
            delay: Duration::from_millis(settings.delay_ms),
            attempts: settings.attempts,
        }
    }

    /// The waits before each further attempt, in order; exhausted when no attempt is left.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        ConstantBuilder::new()
            .with_delay(self.delay)
            .with_max_times(self.attempts)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_waits_one_second_three_times() {
        let policy = RetryPolicy::from_settings(&RetrySettings::default());
        let delays: Vec<_> = policy.delays().collect();
        assert_eq!(delays, vec![Duration::from_secs(1); 3]);
    }

    #[test]
    fn zero_attempts_means_no_retry() {
        let policy = RetryPolicy {
            delay: Duration::from_millis(5),
            attempts: 0,
        };
        assert_eq!(policy.delays().count(), 0);
    }
}
