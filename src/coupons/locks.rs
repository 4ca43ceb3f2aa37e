//! Redis locks, as the design document takes them before issuing a coupon:
//! `SET key token NX PX ttl`, released by a compare-and-delete script so a holder never
//! releases a lock that expired and was taken by someone else.
//!
//! They are advisory here: correctness rests on MySQL (row locks, conditional updates,
//! unique keys). A lock that cannot be taken, or Redis being down, only means more work
//! reaches the database; both are counted.

use std::time::Duration;

use redis::Script;
use uuid::Uuid;

use crate::common::connections::{RedisConnection, RedisConnectionError};
use crate::common::ids::{CouponId, UserId};

const RELEASE_SCRIPT: &str = r"
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    released = released + 1
  end
end
return released
";

#[derive(Clone)]
pub struct RedisLocks {
    redis: RedisConnection,
    ttl: Duration,
    release: Script,
}

/// Locks taken together under one token.
#[derive(Debug, Default)]
pub struct HeldLocks {
    token: String,
    keys: Vec<String>,
    /// Keys another holder had.
    pub contended: usize,
}

impl RedisLocks {
    pub fn new(redis: RedisConnection, ttl: Duration) -> Self {
        Self {
            redis,
            ttl,
            release: Script::new(RELEASE_SCRIPT),
        }
    }

    /// The lock key of the design document, under this deployment's prefix.
    pub fn coupon_user_key(&self, coupon_id: CouponId, user_id: UserId) -> String {
        self.redis
            .key(&format!("coupon:{coupon_id}:user:{user_id}"))
    }

    /// Tries every key in one round trip; returns those taken and how many were held by
    /// someone else.
    pub async fn acquire(&self, keys: Vec<String>) -> Result<HeldLocks, RedisConnectionError> {
        let token = Uuid::new_v4().to_string();
        if keys.is_empty() {
            return Ok(HeldLocks::default());
        }
        let mut connection = self.redis.connection()?;
        let mut pipeline = redis::pipe();
        for key in &keys {
            pipeline
                .cmd("SET")
                .arg(key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.ttl.as_millis() as u64);
        }
        let answers: Vec<Option<String>> = pipeline.query_async(&mut connection).await?;
        let mut held = HeldLocks {
            token,
            keys: Vec::with_capacity(keys.len()),
            contended: 0,
        };
        for (key, answer) in keys.into_iter().zip(answers) {
            match answer {
                Some(_) => held.keys.push(key),
                None => held.contended += 1,
            }
        }
        Ok(held)
    }

    /// Releases what `held` took (never someone else's lock); returns how many were released.
    pub async fn release(&self, held: HeldLocks) -> Result<u64, RedisConnectionError> {
        if held.keys.is_empty() {
            return Ok(0);
        }
        let mut connection = self.redis.connection()?;
        let mut invocation = self.release.prepare_invoke();
        for key in &held.keys {
            invocation.key(key);
        }
        invocation.arg(&held.token);
        Ok(invocation.invoke_async(&mut connection).await?)
    }
}
