//! The retry policies of a partition, built on `backon`'s policy types.
//!
//! - [`RetryPolicy`]: a fixed delay between a bounded number of further attempts (the
//!   design document's `FixedBackOff(1000 ms, 3)`), for short, transient failures of one
//!   batch (a deadlock, a restart after a fatal error). Exhausted, the event is
//!   dead-lettered.
//! - [`OutagePolicy`]: a doubling, capped delay without end, while a dependency every record
//!   needs is down. Nothing is dead-lettered for an outage: the partition waits.
//!
//! Both hold the partition while they wait, which keeps the partition's order; long
//! back-off for one event's external delivery belongs to the retry scheduler, which lets
//! the partition move on.

use std::time::Duration;

use backon::{BackoffBuilder, ConstantBuilder, ExponentialBuilder};

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

/// The waits while a dependency is down: from `initial`, doubling, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutagePolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl OutagePolicy {
    pub fn from_settings(settings: &RetrySettings) -> Self {
        Self {
            initial: Duration::from_millis(settings.outage_initial_delay_ms.max(1)),
            max: Duration::from_millis(
                settings
                    .outage_max_delay_ms
                    .max(settings.outage_initial_delay_ms.max(1)),
            ),
        }
    }

    /// The waits before each further attempt; never exhausted.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        ExponentialBuilder::new()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_waits_doubling_up_to_its_cap_and_never_gives_up() {
        let policy = OutagePolicy::from_settings(&RetrySettings::default());
        let delays: Vec<_> = policy.delays().take(8).collect();
        let seconds: Vec<u64> = delays.iter().map(Duration::as_secs).collect();
        assert_eq!(seconds, vec![1, 2, 4, 8, 10, 10, 10, 10]);
        assert_eq!(policy.delays().take(1_000).count(), 1_000);
    }

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
