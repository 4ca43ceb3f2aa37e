//! Exponential back-off between delivery attempts to an external system, built on
//! `backon`'s policy types: a small pure function of the number of failed attempts.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::BackoffSettings;

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
}
