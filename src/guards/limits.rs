//! Abuse limits: rate limits by the generic cell rate algorithm (GCRA), kept in Redis so
//! that every instance shares them.
//!
//! A limit of `per_second` with a `burst` lets `burst` requests through at once and then one
//! every `1 / per_second` seconds. Redis keeps one key per subject: its theoretical arrival
//! time (TAT), in microseconds of Redis's own clock, so instances need not agree on time. A
//! request is let through when `TAT - now ≤ (burst - 1) × interval`, and moves the TAT on by
//! one interval; otherwise the answer is how long to wait.
//!
//! When Redis does not answer, requests are let through (counted and logged): the limits
//! protect against scripts, and an outage of Redis must not stop every user.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::Script;
use tracing::warn;

use crate::common::connections::RedisConnection;
use crate::config::RateLimit;

/// How long a request waits for Redis to count it: past that, it goes through unchecked
/// (counted in [`RateLimiter::unchecked`]), so a slow Redis never slows every request.
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

const GCRA_SCRIPT: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
if tat - now > tolerance then
  return tat - now - tolerance
end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil((tat + interval - now) / 1000) + 1)
return 0
";

/// What a limit decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Over the limit: try again after this long.
    Limited {
        retry_after: Duration,
    },
}

/// The limiter shared by the HTTP workers.
#[derive(Clone)]
pub struct RateLimiter {
    redis: RedisConnection,
    script: Script,
    /// Requests let through because Redis did not answer.
    unchecked: Arc<AtomicU64>,
}

impl RateLimiter {
    pub fn new(redis: RedisConnection) -> Self {
        Self {
            redis,
            script: Script::new(GCRA_SCRIPT),
            unchecked: Arc::default(),
        }
    }

    /// Counts one request of `subject` (for example `coupon-issue:user:42`) against `limit`.
    pub async fn check(&self, subject: &str, limit: RateLimit) -> Decision {
        let (interval, tolerance) = gcra_parameters(limit);
        let attempt = async {
            let mut connection = self.redis.connection()?;
            let wait_micros: i64 = self
                .script
                .key(self.redis.key(&format!("ratelimit:{subject}")))
                .arg(interval)
                .arg(tolerance)
                .invoke_async(&mut connection)
                .await?;
            Ok::<_, crate::common::connections::RedisConnectionError>(wait_micros)
        };
        match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
            Ok(Ok(0)) => Decision::Allowed,
            Ok(Ok(wait_micros)) => Decision::Limited {
                retry_after: Duration::from_micros(wait_micros.max(1) as u64),
            },
            Ok(Err(error)) => {
                self.unchecked.fetch_add(1, Ordering::Relaxed);
                warn!(%error, subject, "rate limit not checked: Redis unavailable");
                Decision::Allowed
            }
            Err(_) => {
                self.unchecked.fetch_add(1, Ordering::Relaxed);
                warn!(
                    subject,
                    "rate limit not checked: Redis did not answer in time"
                );
                Decision::Allowed
            }
        }
    }

    /// Requests let through unchecked while Redis did not answer.
    pub fn unchecked(&self) -> u64 {
        self.unchecked.load(Ordering::Relaxed)
    }
}

/// The emission interval and the burst tolerance, in microseconds.
fn gcra_parameters(limit: RateLimit) -> (u64, u64) {
    let interval = (1_000_000.0 / limit.per_second.max(0.001)).ceil() as u64;
    let tolerance = interval * u64::from(limit.burst.max(1) - 1);
    (interval, tolerance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_ten_at_five_per_second_tolerates_nine_intervals() {
        let (interval, tolerance) = gcra_parameters(RateLimit {
            per_second: 5.0,
            burst: 10,
        });
        assert_eq!(interval, 200_000);
        assert_eq!(tolerance, 1_800_000);
        let (_, none) = gcra_parameters(RateLimit {
            per_second: 1.0,
            burst: 1,
        });
        assert_eq!(none, 0);
    }
}
