//! The real-time best-seller ranking in Redis.
//!
//! Each day (UTC, the day the order completed) has a sorted set
//! `ranking:products:{yyyymmdd}` of product id → quantity sold, kept `retention_days`. An
//! order is counted by one Lua script that first records its event id
//! (`ranking:applied:{eventId}`, SET NX with the same expiry) and only then increments, so
//! a redelivered event is never counted twice, and a batch of events is one round trip.
//! The ranking over the last N days is the union of their sets.
//!
//! The ranking is derived data: [`rebuild`] recomputes it exactly from the completed
//! orders in MySQL. While a rebuild runs (`ranking:rebuilding` is set) the script counts
//! nothing and answers "busy": the updater's partitions wait, and count what the rebuild
//! did not include once it is done.
//!
//! The script builds its keys from its arguments: it needs a single Redis (not a cluster).

pub mod rebuild;
pub mod settlement;
pub mod updater;

use chrono::{Duration, NaiveDate};
use redis::Script;

use crate::common::connections::{RedisConnection, RedisConnectionError};
use crate::common::error::{Classify, Dependency, ErrorClass};
use crate::common::ids::ProductId;
use crate::events::{EventId, OrderedProduct};

#[derive(Debug, thiserror::Error)]
pub enum RankingError {
    #[error(transparent)]
    Redis(#[from] RedisConnectionError),
    /// A rebuild is replacing the day sets; counting waits for it.
    #[error("the ranking is being rebuilt")]
    Rebuilding,
}

impl Classify for RankingError {
    fn class(&self) -> ErrorClass {
        match self {
            RankingError::Redis(error) => error.class(),
            RankingError::Rebuilding => ErrorClass::Unavailable(Dependency::RankingRebuild),
        }
    }
}

const APPLY_SCRIPT: &str = r#"
local applied_ttl = tonumber(ARGV[1])
local day_ttl = tonumber(ARGV[2])
local prefix = ARGV[3]
if redis.call('EXISTS', prefix .. 'ranking:rebuilding') == 1 then
  return {-1}
end
local flags = {}
local i = 4
while i <= #ARGV do
  local id, day, lines = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  if redis.call('SET', prefix .. 'ranking:applied:' .. id, '1', 'NX', 'EX', applied_ttl) then
    local key = prefix .. 'ranking:products:' .. day
    for j = 0, lines - 1 do
      redis.call('ZINCRBY', key, ARGV[i + 2 * j + 1], ARGV[i + 2 * j])
    end
    redis.call('EXPIRE', key, day_ttl)
    flags[#flags + 1] = 1
  else
    flags[#flags + 1] = 0
  end
  i = i + 2 * lines
end
return flags
"#;

/// One completed order to count.
#[derive(Clone, Debug)]
pub struct RankedOrder<'a> {
    pub event_id: EventId,
    pub day: NaiveDate,
    pub products: &'a [OrderedProduct],
}

/// A place in the ranking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranked {
    pub product_id: ProductId,
    pub quantity: u64,
}

#[derive(Clone)]
pub struct RankingStore {
    redis: RedisConnection,
    script: Script,
    retention_days: u32,
}

impl RankingStore {
    pub fn new(redis: RedisConnection, retention_days: u32) -> Self {
        Self {
            redis,
            script: Script::new(APPLY_SCRIPT),
            retention_days: retention_days.max(1),
        }
    }

    pub fn day_key(&self, day: NaiveDate) -> String {
        self.redis
            .key(&format!("ranking:products:{}", day.format("%Y%m%d")))
    }

    /// Counts the orders not counted before; `true` for each one counted now.
    pub async fn apply(&self, orders: &[RankedOrder<'_>]) -> Result<Vec<bool>, RankingError> {
        if orders.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = u64::from(self.retention_days) * 86_400;
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(ttl).arg(ttl).arg(self.redis.key(""));
        for order in orders {
            invocation
                .arg(order.event_id.to_string())
                .arg(order.day.format("%Y%m%d").to_string())
                .arg(order.products.len());
            for line in order.products {
                invocation.arg(line.id.get()).arg(line.qty);
            }
        }
        let mut connection = self.redis.connection()?;
        let flags: Vec<i64> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(RedisConnectionError::from)?;
        if flags.first() == Some(&-1) {
            return Err(RankingError::Rebuilding);
        }
        Ok(flags.into_iter().map(|flag| flag == 1).collect())
    }

    pub(crate) fn redis(&self) -> &RedisConnection {
        &self.redis
    }

    pub(crate) fn retention_days(&self) -> u32 {
        self.retention_days
    }

    /// Whether each event has been counted (its applied mark is there): the ranking's
    /// progress, which the reconciler and `GET /admin/events/{id}` read.
    pub async fn counted(&self, events: &[EventId]) -> Result<Vec<bool>, RedisConnectionError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = events
            .iter()
            .map(|id| self.redis.key(&format!("ranking:applied:{id}")))
            .collect();
        let mut connection = self.redis.connection()?;
        let marks: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut connection)
            .await?;
        Ok(marks.iter().map(Option::is_some).collect())
    }

    /// The best sellers of the `days` days up to `today`, most sold first (ties: lower id).
    pub async fn top(
        &self,
        today: NaiveDate,
        days: u32,
        limit: usize,
    ) -> Result<Vec<Ranked>, RedisConnectionError> {
        let keys: Vec<String> = (0..days.max(1))
            .map(|back| self.day_key(today - Duration::days(i64::from(back))))
            .collect();
        let mut connection = self.redis.connection()?;
        let scores: Vec<(String, f64)> = redis::cmd("ZUNION")
            .arg(keys.len())
            .arg(&keys)
            .arg("WITHSCORES")
            .query_async(&mut connection)
            .await?;
        Ok(rank(scores, limit))
    }
}

/// Orders members by score (descending), then id; drops what is not a product id.
fn rank(scores: Vec<(String, f64)>, limit: usize) -> Vec<Ranked> {
    let mut ranked: Vec<Ranked> = scores
        .into_iter()
        .filter_map(|(member, score)| {
            Some(Ranked {
                product_id: member.parse().ok()?,
                quantity: score.max(0.0) as u64,
            })
        })
        .collect();
    ranked.sort_by(|left, right| {
        right
            .quantity
            .cmp(&left.quantity)
            .then(left.product_id.cmp(&right.product_id))
    });
    ranked.truncate(limit);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_sold_come_first_and_ties_go_to_the_lower_id() {
        let scores = vec![
            ("7".to_string(), 3.0),
            ("2".to_string(), 5.0),
            ("9".to_string(), 5.0),
            ("junk".to_string(), 99.0),
            ("1".to_string(), 1.0),
        ];
        let ranked = rank(scores, 3);
        let ids: Vec<u64> = ranked.iter().map(|place| place.product_id.get()).collect();
        assert_eq!(ids, vec![2, 9, 7]);
        assert_eq!(ranked[0].quantity, 5);
    }
}
