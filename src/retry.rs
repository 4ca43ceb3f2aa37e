//! The in-line retry policy of a partition: a fixed delay between a bounded number of
//! further attempts (the design document's `FixedBackOff(1000 ms, 3)`), built on `backon`'s
//! policy types.
//!
//! This path is for short, transient failures inside a domain actor (a dropped database
//! connection, a deadlock, a restart after a fatal error). It holds the partition while it
//! waits, which keeps the partition's order; long back-off for external systems belongs to
//! a scheduler that lets the partition move on.

use std::time::Duration;

use backon::{BackoffBuilder, ConstantBuilder, ExponentialBuilder};

use crate::config::{BackoffSettings, RetrySettings};

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

/// Exponential back-off between delivery attempts to an external system.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    /// Wait before the second attempt.
    pub base: Duration,
    pub factor: f32,
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// No wait grows past this.
    pub max_delay: Duration,
    /// Adds up to one more delay at random, so clients failing together do not retry
    /// together.
    pub jitter: bool,
}

impl BackoffPolicy {
    pub fn from_settings(settings: &BackoffSettings) -> Self {
        Self {
            base: Duration::from_millis(settings.base_ms),
            factor: settings.factor,
            attempts: settings.attempts.max(1),
            max_delay: Duration::from_millis(settings.max_delay_ms),
            jitter: settings.jitter,
        }
    }

    /// The wait after the `failed`-th failed attempt, or `None` when no attempt is left.
    pub fn delay_after(&self, failed: u32) -> Option<Duration> {
        if failed == 0 || failed >= self.attempts {
            return None;
        }
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.base)
            .with_factor(self.factor)
            .with_max_delay(self.max_delay)
            .with_max_times(self.attempts as usize - 1);
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder.build().nth(failed as usize - 1)
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

    fn backoff() -> BackoffPolicy {
        BackoffPolicy {
            base: Duration::from_secs(1),
            factor: 2.0,
            attempts: 5,
            max_delay: Duration::from_secs(60),
            jitter: false,
        }
    }

    #[test]
    fn back_off_doubles_from_one_second_until_attempts_run_out() {
        let policy = backoff();
        let delays: Vec<_> = (1..=5).map(|failed| policy.delay_after(failed)).collect();
        let seconds = |s| Some(Duration::from_secs(s));
        assert_eq!(
            delays,
            vec![seconds(1), seconds(2), seconds(4), seconds(8), None]
        );
        assert_eq!(policy.delay_after(0), None);
    }

    #[test]
    fn back_off_stops_growing_at_the_maximum() {
        let policy = BackoffPolicy {
            attempts: 20,
            max_delay: Duration::from_secs(10),
            ..backoff()
        };
        assert_eq!(policy.delay_after(10), Some(Duration::from_secs(10)));
    }

    #[test]
    fn jitter_stays_between_one_and_two_delays() {
        let policy = BackoffPolicy {
            jitter: true,
            ..backoff()
        };
        for _ in 0..100 {
            let delay = policy.delay_after(3).unwrap();
            assert!(
                delay >= Duration::from_secs(4) && delay <= Duration::from_secs(8),
                "{delay:?}"
            );
        }
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
