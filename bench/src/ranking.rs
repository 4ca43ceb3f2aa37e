//! Scenario `ranking`: N OrderCompleted events of L lines each on an embedded cluster,
//! counted into Redis by the RankingUpdater through the partition actors. Prints ranking
//! updates (one per order line) per second next to raw pipelined ZINCRBY on the same Redis,
//! then replays every event and checks that nothing was counted twice.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use anyhow::bail;
use chrono::Utc;
use commerce_events::actors::ArbiterPool;
use commerce_events::actors::consumer_group::{ConsumerGroup, ConsumerGroupSpec};
use commerce_events::actors::domain::{
    DomainActor, DomainActorState, ObserveDomain, PipelineProbes,
};
use commerce_events::common::connections::RedisConnection;
use commerce_events::common::ids::{OrderId, ProductId, UserId};
use commerce_events::event_log::EventLog;
use commerce_events::events::topics;
use commerce_events::events::{EventEnvelope, EventPayload, OrderCompleted, OrderedProduct};
use commerce_events::kafka::producer::{EventPublisher, RawRecord};
use commerce_events::ranking::RankingStore;
use commerce_events::ranking::updater::RankingUpdater;
use secrecy::ExposeSecret;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

use crate::costs::{CostTable, Meters};
use crate::progress;
use crate::report::{Cell, Column, Report, Table};

const PARTITIONS: i32 = 3;
const PRODUCTS: u64 = 1_000;

#[derive(clap::Args)]
pub struct Options {
    /// Completed orders published.
    #[arg(long, default_value_t = 100_000)]
    orders: usize,
    /// Lines (products) per order.
    #[arg(long, default_value_t = 3)]
    lines: usize,
    #[command(flatten)]
    arbiters: crate::Arbiters,
}

pub async fn run(options: Options, report: &mut Report) -> anyhow::Result<()> {
    let (orders, lines, threads) = (options.orders, options.lines, options.arbiters.threads);
    let (mut settings, cluster, publisher) =
        crate::embedded_bench(topics::ORDER_COMPLETED, PARTITIONS, threads)?;
    settings.redis.key_prefix = format!("bench-ranking-{}:", uuid::Uuid::now_v7().simple());
    let bootstrap = cluster.bootstrap_servers().to_string();
    let redis = RedisConnection::new(&settings.redis)?;
    redis.connect().await;
    redis.ping().await?;

    let (records, expected) = order_events(orders, lines);
    produce(&publisher, &records, "producing orders").await?;
    let updates = orders * lines;
    report.note(format!(
        "scenario ranking: {orders} OrderCompleted events of {lines} lines ({updates} ranking \
         updates) over {PARTITIONS} partitions, {PRODUCTS} products, embedded cluster, \
         {threads} partition threads, Redis 127.0.0.1:6379"
    ));

    // The RankingUpdater never touches the database; this lazy pool is never opened.
    let pool = MySqlPoolOptions::new().connect_lazy_with(MySqlConnectOptions::from_str(
        settings.database.url.expose_secret(),
    )?);
    let event_log = EventLog::new(pool);
    let arbiters = Arc::new(ArbiterPool::new(threads));
    let ranking = RankingStore::new(redis.clone(), 1);
    let updater_ranking = ranking.clone();
    let updater = DomainActor::start(
        &arbiters.next(),
        PipelineProbes::new(event_log.clone()),
        move || RankingUpdater::new(updater_ranking.clone()),
    );
    let spec = ConsumerGroupSpec::from_settings(
        &settings,
        &bootstrap,
        "bench-ranking",
        BTreeMap::from([(
            topics::ORDER_COMPLETED.to_string(),
            updater.clone().recipient(),
        )]),
        publisher.clone(),
        event_log,
        Default::default(),
    );
    let meters = Meters::in_process(settings.redis.url.expose_secret()).await?;
    let mut costs = CostTable::new();
    let before = meters.read().await?;
    let group = ConsumerGroup::start(spec, arbiters.clone())?;
    let actors = wait_until(&updater, "counting orders", orders, |state| {
        state.processed as usize
    })
    .await?;
    let counted = meters.read().await?;
    costs.add(
        "partition actors → RankingUpdater",
        "order",
        orders as u64,
        before.until(&counted),
    );

    // Every event again, with the same ids: all duplicates, nothing counted twice. Timed
    // from the first record produced, since they are consumed while being produced.
    let replay_started = Instant::now();
    produce(&publisher, &records, "replaying orders").await?;
    wait_until(&updater, "replay duplicates", orders, |state| {
        state.duplicates as usize
    })
    .await?;
    let replay = replay_started.elapsed();
    costs.add(
        "replay (every event a duplicate), producing included",
        "order",
        orders as u64,
        counted.until(&meters.read().await?),
    );
    let state = updater.send(ObserveDomain).await?;
    let counted = totals(&redis, &ranking).await?;
    group.shutdown().await;
    if state.processed as usize != orders || counted != expected {
        bail!(
            "ranking wrong: {} orders counted (expected {orders}), totals {}",
            state.processed,
            if counted == expected {
                "equal"
            } else {
                "differ"
            }
        );
    }

    let raw = raw_zincrby(&redis, orders, lines).await?;
    let actors_rate = updates as f64 / actors.as_secs_f64();
    let raw_rate = updates as f64 / raw.as_secs_f64();
    let mut table = Table::new(
        "ranking paths",
        vec![
            Column::left("path", "path"),
            Column::right("ranking updates/s", "ranking_updates_per_second"),
            Column::right("orders/s", "orders_per_second"),
        ],
    );
    for (path, elapsed) in [
        (
            "partition actors → RankingUpdater (one idempotent Lua call per batch)".to_string(),
            actors,
        ),
        (
            format!(
                "raw pipelined ZINCRBY, {} commands per round trip, not idempotent",
                500 * lines
            ),
            raw,
        ),
        (
            format!("replay of all {orders} events, producing included (every one a duplicate)"),
            replay,
        ),
    ] {
        table.row(vec![
            Cell::text(path),
            Cell::number(updates as f64 / elapsed.as_secs_f64(), 0),
            Cell::number(orders as f64 / elapsed.as_secs_f64(), 0),
        ]);
    }
    report.table(table);
    report.table(costs.table("costs per order"));
    report.note(
        "costs: the consumers run in the bench process, so its CPU time (producing included) \
         is the daemon column; the RankingUpdater uses no MySQL",
    );
    report.note(format!(
        "ratio actors / raw ZINCRBY: {:.2}; after the replay the totals equal the true sums \
         ({} products)",
        actors_rate / raw_rate,
        expected.len()
    ));
    let mut connection = redis.connection()?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(redis.key("*"))
        .query_async(&mut connection)
        .await?;
    for chunk in keys.chunks(1_000) {
        redis::cmd("DEL")
            .arg(chunk)
            .query_async::<()>(&mut connection)
            .await?;
    }
    Ok(())
}

/// The events, encoded with their partition, and the true quantity per product.
type Records = Vec<(i32, String, Vec<u8>)>;

fn order_events(orders: usize, lines: usize) -> (Records, BTreeMap<u64, u64>) {
    let mut expected = BTreeMap::new();
    let records = (0..orders)
        .map(|n| {
            let products: Vec<OrderedProduct> = (0..lines)
                .map(|line| OrderedProduct {
                    id: ProductId::from_u64((n as u64 * 7 + line as u64 * 13) % PRODUCTS + 1)
                        .expect("positive"),
                    qty: (n % 3 + 1) as u32,
                })
                .collect();
            for line in &products {
                *expected.entry(line.id.get()).or_insert(0) += u64::from(line.qty);
            }
            let event = EventEnvelope::new(
                format!("order:{n}"),
                EventPayload::OrderCompleted(OrderCompleted {
                    order_id: OrderId::from_u64(n as u64 + 1).expect("positive"),
                    user_id: UserId::from_u64(n as u64 % 5_000 + 1).expect("positive"),
                    products,
                    total_amount: 10_000,
                }),
            );
            (n as i32 % PARTITIONS, event.key.clone(), event.encode())
        })
        .collect();
    (records, expected)
}

async fn produce(publisher: &EventPublisher, records: &Records, phase: &str) -> anyhow::Result<()> {
    let bar = progress::counting(phase, records.len() as u64);
    for chunk in records.chunks(5_000) {
        let sends = chunk.iter().map(|(partition, key, value)| {
            publisher.publish_raw(RawRecord {
                topic: topics::ORDER_COMPLETED,
                partition: Some(*partition),
                key: Some(key.as_bytes()),
                value: Some(value),
                headers: Vec::new(),
            })
        });
        for result in futures::future::join_all(sends).await {
            result?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Time from the first event handled until `count` of the actor's state reaches `target`,
/// shown as the bar of `phase`.
async fn wait_until<H: commerce_events::actors::domain::DomainHandler>(
    actor: &Addr<DomainActor<H>>,
    phase: &str,
    target: usize,
    count: impl Fn(&DomainActorState) -> usize,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let baseline = actor.send(ObserveDomain).await?;
    let mut started = None;
    let bar = progress::counting(phase, target as u64);
    loop {
        let state = actor.send(ObserveDomain).await?;
        if started.is_none()
            && (state.processed, state.duplicates) != (baseline.processed, baseline.duplicates)
        {
            started = Some(Instant::now());
        }
        let counted = count(&state);
        bar.set_position(counted.min(target) as u64);
        if counted >= target {
            bar.finish_and_clear();
            return Ok(started.unwrap_or_else(Instant::now).elapsed());
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            bail!("not done before the deadline: {state:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn totals(
    redis: &RedisConnection,
    ranking: &RankingStore,
) -> anyhow::Result<BTreeMap<u64, u64>> {
    let mut connection = redis.connection()?;
    let scores: Vec<(u64, f64)> = redis::cmd("ZRANGE")
        .arg(ranking.day_key(Utc::now().date_naive()))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut connection)
        .await?;
    Ok(scores
        .into_iter()
        .map(|(product, score)| (product, score as u64))
        .collect())
}

/// The same increments as plain ZINCRBY, pipelined per 500 orders.
async fn raw_zincrby(
    redis: &RedisConnection,
    orders: usize,
    lines: usize,
) -> anyhow::Result<Duration> {
    let mut connection = redis.connection()?;
    let key = redis.key("raw-zincrby");
    let started = Instant::now();
    for chunk_start in (0..orders).step_by(500) {
        let mut pipeline = redis::pipe();
        for n in chunk_start..(chunk_start + 500).min(orders) {
            for line in 0..lines {
                let product = (n as u64 * 7 + line as u64 * 13) % PRODUCTS + 1;
                pipeline
                    .cmd("ZINCRBY")
                    .arg(&key)
                    .arg(n % 3 + 1)
                    .arg(product)
                    .ignore();
            }
        }
        pipeline.query_async::<()>(&mut connection).await?;
    }
    Ok(started.elapsed())
}
