//! Rebuilding the ranking from MySQL: the day sets recomputed exactly from the completed
//! orders (`OrderCompleted` rows of the event log, written in each payment's transaction),
//! without counting any order twice against the live updates.
//!
//! 1. `ranking:rebuilding` is set (only one rebuild at a time) and `ranking:built` removed.
//!    From here the updater's script counts nothing: its partitions wait.
//! 2. The completed orders of the retained days are read, summed per day into temporary
//!    sets, and every one of them gets its applied mark.
//! 3. One script swaps the temporary sets in, sets `ranking:built` and removes the flag.
//!
//! An order applied live before step 1 was committed before, so step 2 reads it. An order
//! committed before step 2 read its page is counted by the rebuild and marked, so the
//! updater finds it counted when it resumes. One committed later is neither: the updater
//! counts it. Should a rebuild stop half-way, the flag expires, `ranking:built` is still
//! missing, and the reconciler starts another one (it checks at every pass, so a Redis that
//! lost its data is rebuilt too).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use redis::Script;
use redis::aio::ConnectionManager;
use serde::Serialize;
use tracing::{info, warn};

use crate::common::connections::{RedisConnection, RedisConnectionError};
use crate::common::error::{Classify, ErrorClass};
use crate::event_log::{EventLog, EventLogError, EventRecord};
use crate::events::{EventId, EventPayload, EventType};
use crate::ranking::RankingStore;

/// How long the rebuilding flag lives unless renewed (a rebuild that died releases the
/// updater after this).
const FLAG_TTL: Duration = Duration::from_secs(60);
/// Rows read from MySQL per query.
const PAGE: u32 = 5_000;
/// Members or marks per Redis command.
const CHUNK: usize = 1_000;

const SWAP_SCRIPT: &str = r#"
local prefix = ARGV[1]
local ttl = tonumber(ARGV[2])
local token = ARGV[3]
if redis.call('GET', prefix .. 'ranking:rebuilding') ~= token then
  return 0
end
for i = 4, #ARGV do
  local day = ARGV[i]
  local staged = prefix .. 'ranking:rebuild:' .. day
  local live = prefix .. 'ranking:products:' .. day
  if redis.call('EXISTS', staged) == 1 then
    redis.call('RENAME', staged, live)
    redis.call('EXPIRE', live, ttl)
  else
    redis.call('DEL', live)
  end
end
redis.call('SET', prefix .. 'ranking:built', token)
redis.call('DEL', prefix .. 'ranking:rebuilding')
return 1
"#;

/// What a rebuild of the ranking counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    /// Completed orders counted.
    pub orders: u64,
    /// Days of the window, and how many had sales.
    pub days: u32,
    pub days_with_sales: u32,
    /// Units summed over every product and day.
    pub quantity: u64,
    pub took_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("another rebuild of the ranking is running")]
    AlreadyRunning,
    #[error("the rebuild lost its flag (it ran longer than its lease): nothing was swapped in")]
    Superseded,
    #[error(transparent)]
    Redis(#[from] RedisConnectionError),
    #[error(transparent)]
    EventLog(#[from] EventLogError),
}

impl From<redis::RedisError> for RebuildError {
    fn from(error: redis::RedisError) -> Self {
        RebuildError::Redis(error.into())
    }
}

impl Classify for RebuildError {
    fn class(&self) -> ErrorClass {
        match self {
            RebuildError::AlreadyRunning | RebuildError::Superseded => ErrorClass::Retryable,
            RebuildError::Redis(error) => error.class(),
            RebuildError::EventLog(error) => error.class(),
        }
    }
}

/// Whether the ranking was built (by a rebuild) since Redis last lost its data.
pub async fn is_built(ranking: &RankingStore) -> Result<bool, RedisConnectionError> {
    let redis = ranking.redis();
    let mut connection = redis.connection()?;
    let exists: bool = redis::cmd("EXISTS")
        .arg(redis.key("ranking:built"))
        .query_async(&mut connection)
        .await?;
    Ok(exists)
}

/// Rebuilds unless the ranking is built; `None` when it was.
pub async fn rebuild_if_missing(
    ranking: &RankingStore,
    event_log: &EventLog,
    today: NaiveDate,
) -> Result<Option<RebuildReport>, RebuildError> {
    if is_built(ranking).await? {
        return Ok(None);
    }
    info!("ranking not built (a new Redis, or one that lost its data): rebuilding from MySQL");
    rebuild(ranking, event_log, today).await.map(Some)
}

/// Recomputes the day sets of the retained days up to `today` from MySQL.
pub async fn rebuild(
    ranking: &RankingStore,
    event_log: &EventLog,
    today: NaiveDate,
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let redis = ranking.redis();
    let token = EventId::generate().to_string();
    let mut connection = redis.connection()?;
    let flag = Flag {
        redis,
        token: &token,
    };
    if !flag.take(&mut connection).await? {
        return Err(RebuildError::AlreadyRunning);
    }
    let built = async {
        redis::cmd("DEL")
            .arg(redis.key("ranking:built"))
            .query_async::<()>(&mut connection)
            .await?;
        let report = stage(ranking, event_log, today, &flag).await?;
        let days = window(today, ranking.retention_days());
        let ttl = retention_secs(ranking);
        let script = Script::new(SWAP_SCRIPT);
        let mut swap = script.prepare_invoke();
        swap.arg(redis.key("")).arg(ttl).arg(&token);
        for day in &days {
            swap.arg(day.format("%Y%m%d").to_string());
        }
        let swapped: i64 = swap.invoke_async(&mut connection).await?;
        if swapped != 1 {
            return Err(RebuildError::Superseded);
        }
        Ok(report)
    }
    .await;
    match built {
        Ok(mut report) => {
            report.took_ms = started.elapsed().as_millis() as u64;
            info!(
                orders = report.orders,
                days = report.days,
                took_ms = report.took_ms,
                "ranking rebuilt from MySQL"
            );
            Ok(report)
        }
        Err(error) => {
            // Let the updater go on; `ranking:built` stays missing, so it is tried again.
            release(ranking, &token).await;
            warn!(%error, "ranking rebuild failed");
            Err(error)
        }
    }
}

/// The days a rebuild covers: `retention_days` up to `today`, oldest first.
fn window(today: NaiveDate, retention_days: u32) -> Vec<NaiveDate> {
    (0..retention_days.max(1))
        .rev()
        .map(|back| today - chrono::Duration::days(i64::from(back)))
        .collect()
}

/// A rebuild's hold on the `ranking:rebuilding` flag: its value is the rebuild's token.
struct Flag<'a> {
    redis: &'a RedisConnection,
    token: &'a str,
}

impl Flag<'_> {
    /// Takes the flag for [`FLAG_TTL`] if nobody holds it; whether it was taken.
    async fn take(&self, connection: &mut ConnectionManager) -> Result<bool, redis::RedisError> {
        self.set(connection, "NX").await
    }

    /// Renews the flag for another [`FLAG_TTL`] if it is still set; whether it was.
    async fn renew(&self, connection: &mut ConnectionManager) -> Result<bool, redis::RedisError> {
        self.set(connection, "XX").await
    }

    /// `SET flag token <condition> PX <ttl>`; whether it was set.
    async fn set(
        &self,
        connection: &mut ConnectionManager,
        condition: &str,
    ) -> Result<bool, redis::RedisError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.redis.key("ranking:rebuilding"))
            .arg(self.token)
            .arg(condition)
            .arg("PX")
            .arg(FLAG_TTL.as_millis() as u64)
            .query_async(connection)
            .await?;
        Ok(set.is_some())
    }
}

/// How long the ranking's day sets and applied marks live, in seconds.
fn retention_secs(ranking: &RankingStore) -> u64 {
    u64::from(ranking.retention_days()) * 86_400
}

/// Reads the completed orders, writes the temporary day sets and the applied marks.
async fn stage(
    ranking: &RankingStore,
    event_log: &EventLog,
    today: NaiveDate,
    flag: &Flag<'_>,
) -> Result<RebuildReport, RebuildError> {
    let redis = ranking.redis();
    let days = window(today, ranking.retention_days());
    let mut connection = redis.connection()?;
    let counted = count_completed_orders(event_log, &days, today, flag, &mut connection).await?;
    let days_with_sales = write_day_sets(&mut connection, redis, &days, &counted.sums).await?;
    write_applied_marks(
        &mut connection,
        redis,
        &counted.orders,
        retention_secs(ranking),
    )
    .await?;
    Ok(RebuildReport {
        orders: counted.orders.len() as u64,
        days: days.len() as u32,
        days_with_sales,
        quantity: counted.quantity,
        took_ms: 0,
    })
}

/// What the completed orders of a rebuild's window add up to.
#[derive(Default)]
struct Counted {
    /// Units sold, by product id, by day.
    sums: BTreeMap<NaiveDate, BTreeMap<u64, u64>>,
    /// The orders counted, to mark applied.
    orders: Vec<EventId>,
    /// Units summed over every product and day.
    quantity: u64,
}

impl Counted {
    /// Adds the completed orders of `page` that occurred from `first_day` to `today`.
    fn add(&mut self, page: &[EventRecord], first_day: NaiveDate, today: NaiveDate) {
        for record in page {
            let day = record.occurred_at.date_naive();
            let EventPayload::OrderCompleted(order) = &record.payload else {
                continue;
            };
            if day < first_day || day > today {
                continue;
            }
            let products = self.sums.entry(day).or_default();
            for line in &order.products {
                *products.entry(line.id.get()).or_default() += u64::from(line.qty);
                self.quantity += u64::from(line.qty);
            }
            self.orders.push(record.event_id);
        }
    }
}

/// Reads the completed orders of `days` (oldest first, up to `today`) page by page and sums
/// them, renewing the flag after each page: a rebuild that lost it stops, superseded.
async fn count_completed_orders(
    event_log: &EventLog,
    days: &[NaiveDate],
    today: NaiveDate,
    flag: &Flag<'_>,
    connection: &mut ConnectionManager,
) -> Result<Counted, RebuildError> {
    let first_day = days[0];
    let since = first_day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let mut after = Some(EventId::first_at(since - chrono::Duration::seconds(1)));
    let before = EventId::first_at(Utc::now() + chrono::Duration::minutes(1));
    let mut counted = Counted::default();
    loop {
        let page = event_log
            .of_types_between(&[EventType::OrderCompleted], after, before, PAGE)
            .await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.event_id);
        counted.add(&page, first_day, today);
        // Still ours, for another lease.
        if !flag.renew(connection).await? {
            return Err(RebuildError::Superseded);
        }
        if page.len() < PAGE as usize {
            break;
        }
    }
    Ok(counted)
}

/// Writes each day's sums to its temporary set `ranking:rebuild:<day>` (emptied first);
/// returns how many days had sales.
async fn write_day_sets(
    connection: &mut ConnectionManager,
    redis: &RedisConnection,
    days: &[NaiveDate],
    sums: &BTreeMap<NaiveDate, BTreeMap<u64, u64>>,
) -> Result<u32, RebuildError> {
    let mut days_with_sales = 0;
    for day in days {
        let staged = redis.key(&format!("ranking:rebuild:{}", day.format("%Y%m%d")));
        redis::cmd("DEL")
            .arg(&staged)
            .query_async::<()>(&mut *connection)
            .await?;
        let Some(products) = sums.get(day) else {
            continue;
        };
        days_with_sales += 1;
        let members: Vec<(u64, u64)> = products.iter().map(|(id, qty)| (*qty, *id)).collect();
        for chunk in members.chunks(CHUNK) {
            redis::cmd("ZADD")
                .arg(&staged)
                .arg(chunk)
                .query_async::<()>(&mut *connection)
                .await?;
        }
    }
    Ok(days_with_sales)
}

/// Marks every counted order applied (`ranking:applied:<id>`, for `ttl_secs`), so the
/// updater does not count it again when it resumes.
async fn write_applied_marks(
    connection: &mut ConnectionManager,
    redis: &RedisConnection,
    orders: &[EventId],
    ttl_secs: u64,
) -> Result<(), RebuildError> {
    for chunk in orders.chunks(CHUNK) {
        let mut marks = redis::pipe();
        for id in chunk {
            marks
                .cmd("SET")
                .arg(redis.key(&format!("ranking:applied:{id}")))
                .arg("1")
                .arg("EX")
                .arg(ttl_secs)
                .ignore();
        }
        marks.query_async::<()>(&mut *connection).await?;
    }
    Ok(())
}

/// Removes the rebuilding flag if it is still `token`'s.
async fn release(ranking: &RankingStore, token: &str) {
    const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;
    let redis = ranking.redis();
    let Ok(mut connection) = redis.connection() else {
        return;
    };
    let released: Result<i64, _> = Script::new(RELEASE)
        .key(redis.key("ranking:rebuilding"))
        .arg(token)
        .invoke_async(&mut connection)
        .await;
    if let Err(error) = released {
        warn!(%error, "rebuilding flag not released; it expires on its own");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_retained_days_up_to_today() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
        let days = window(today, 3);
        assert_eq!(
            days,
            vec![
                NaiveDate::from_ymd_opt(2026, 11, 29).unwrap(),
                NaiveDate::from_ymd_opt(2026, 11, 30).unwrap(),
                today
            ]
        );
        assert_eq!(window(today, 0), vec![today]);
    }
}
