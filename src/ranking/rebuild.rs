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
use serde::Serialize;
use tracing::{info, warn};

use crate::common::connections::RedisStoreError;
use crate::common::error::{Classify, ErrorClass};
use crate::event_log::{EventLog, EventLogError};
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
    Redis(#[from] RedisStoreError),
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
pub async fn is_built(ranking: &RankingStore) -> Result<bool, RedisStoreError> {
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
    let flag = redis.key("ranking:rebuilding");
    let mut connection = redis.connection()?;
    let taken: Option<String> = redis::cmd("SET")
        .arg(&flag)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(FLAG_TTL.as_millis() as u64)
        .query_async(&mut connection)
        .await?;
    if taken.is_none() {
        return Err(RebuildError::AlreadyRunning);
    }
    let built = async {
        redis::cmd("DEL")
            .arg(redis.key("ranking:built"))
            .query_async::<()>(&mut connection)
            .await?;
        let report = stage(ranking, event_log, today, &token).await?;
        let days = window(today, ranking.retention_days());
        let ttl = u64::from(ranking.retention_days()) * 86_400;
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

/// Reads the completed orders, writes the temporary day sets and the applied marks.
async fn stage(
    ranking: &RankingStore,
    event_log: &EventLog,
    today: NaiveDate,
    token: &str,
) -> Result<RebuildReport, RebuildError> {
    let redis = ranking.redis();
    let days = window(today, ranking.retention_days());
    let first_day = days[0];
    let since = first_day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let mut after = Some(EventId::first_at(since - chrono::Duration::seconds(1)));
    let before = EventId::first_at(Utc::now() + chrono::Duration::minutes(1));
    let mut sums: BTreeMap<NaiveDate, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut counted: Vec<EventId> = Vec::new();
    let mut report = RebuildReport {
        days: days.len() as u32,
        ..RebuildReport::default()
    };
    let ttl = u64::from(ranking.retention_days()) * 86_400;
    let mut connection = redis.connection()?;
    loop {
        let page = event_log
            .of_types_between(&[EventType::OrderCompleted], after, before, PAGE)
            .await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.event_id);
        for record in &page {
            let day = record.occurred_at.date_naive();
            let EventPayload::OrderCompleted(order) = &record.payload else {
                continue;
            };
            if day < first_day || day > today {
                continue;
            }
            let products = sums.entry(day).or_default();
            for line in &order.products {
                *products.entry(line.id.get()).or_default() += u64::from(line.qty);
                report.quantity += u64::from(line.qty);
            }
            counted.push(record.event_id);
            report.orders += 1;
        }
        // Still ours, for another lease.
        let renewed: Option<String> = redis::cmd("SET")
            .arg(redis.key("ranking:rebuilding"))
            .arg(token)
            .arg("XX")
            .arg("PX")
            .arg(FLAG_TTL.as_millis() as u64)
            .query_async(&mut connection)
            .await?;
        if renewed.is_none() {
            return Err(RebuildError::Superseded);
        }
        if page.len() < PAGE as usize {
            break;
        }
    }
    for day in &days {
        let staged = redis.key(&format!("ranking:rebuild:{}", day.format("%Y%m%d")));
        redis::cmd("DEL")
            .arg(&staged)
            .query_async::<()>(&mut connection)
            .await?;
        let Some(products) = sums.get(day) else {
            continue;
        };
        report.days_with_sales += 1;
        let members: Vec<(u64, u64)> = products.iter().map(|(id, qty)| (*qty, *id)).collect();
        for chunk in members.chunks(CHUNK) {
            redis::cmd("ZADD")
                .arg(&staged)
                .arg(chunk)
                .query_async::<()>(&mut connection)
                .await?;
        }
    }
    for chunk in counted.chunks(CHUNK) {
        let mut marks = redis::pipe();
        for id in chunk {
            marks
                .cmd("SET")
                .arg(redis.key(&format!("ranking:applied:{id}")))
                .arg("1")
                .arg("EX")
                .arg(ttl)
                .ignore();
        }
        marks.query_async::<()>(&mut connection).await?;
    }
    Ok(report)
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
