//! Scenario `webhooks`: PaymentCompleted events over a set of order keys, delivered by the
//! daemon binary (its own process) to a receiver in the bench's process that answers every
//! webhook after a fixed latency. For each ordering of `external-event-group`
//! (`partition`, `key`, `unordered`): deliveries/s (median and range of the runs), the
//! receiver's most concurrent requests, the per-key order checked against the offsets the
//! events were read from, and the costs per delivery.
//!
//! The events are written as PENDING event-log rows, 1,000 per transaction (payments record
//! theirs proven and publish them themselves; the relay is the bench's way to feed the
//! topic quickly), and published by the daemon's outbox relay, which the bench sets to
//! publish at once (`outbox.republish_after_ms = 0`, a 20 ms poll, 2,000 rows per pass).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use commerce_events::common::connections;
use commerce_events::common::ids::{OrderId, PaymentId, UserId};
use commerce_events::config::{RecordOrdering, Settings};
use commerce_events::event_log::{EventLog, OutboxEvent};
use commerce_events::events::{EventEnvelope, EventId, EventPayload, PaymentCompleted};
use secrecy::SecretString;
use sqlx::MySqlPool;
use testkit::receiver::{self, Receiver};

use crate::costs::{CostTable, Meters};
use crate::coupons::{drop_database, start_daemon};
use crate::progress;
use crate::report::{Cell, Column, Report, Table};

#[derive(clap::Args)]
pub struct Options {
    /// Events per run under `key` and `unordered` ordering.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// Events per run under `partition` ordering (one delivery at a time per partition:
    /// at 50 ms, 60 deliveries/s over 3 partitions).
    #[arg(long, default_value_t = 3_000)]
    pub partition_events: u64,
    /// Order keys the events are spread over (event i belongs to order i mod keys).
    #[arg(long, default_value_t = 1_000)]
    pub keys: u64,
    /// How long the receiver takes to answer each webhook.
    #[arg(long, default_value_t = 50)]
    pub latency_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The orderings compared, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "partition,key,unordered")]
    pub orderings: Vec<String>,
    /// `external.max_in_flight` (default: the daemon's).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
}

const JWT_SECRET: &str = "bench-secret-of-the-webhook-scenario";

/// One run's figures.
struct Run {
    events: u64,
    deliveries_per_second: f64,
    most_in_flight: u64,
    keys_out_of_order: u64,
    duplicates: u64,
    not_completed: u64,
}

pub async fn run(options: Options, report: &mut Report) -> anyhow::Result<()> {
    let orderings: Vec<RecordOrdering> = options
        .orderings
        .iter()
        .map(|name| {
            serde_json::from_value(serde_json::Value::String(name.clone()))
                .with_context(|| format!("unknown ordering {name:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let max_in_flight = options
        .max_in_flight
        .unwrap_or(Settings::default().external.max_in_flight);
    report.note(format!(
        "scenario webhooks: PaymentCompleted events over {} order keys, {} partitions, a receiver \
         answering in {} ms (in the bench's process), the daemon binary as its own process \
         (external.max_in_flight = {max_in_flight}), {} runs of each ordering",
        options.keys, options.partitions, options.latency_ms, options.runs
    ));
    let mut figures: Vec<(RecordOrdering, Vec<Run>)> = Vec::new();
    let mut costs = CostTable::new();
    for ordering in orderings {
        let mut runs = Vec::new();
        for run in 0..options.runs.max(1) {
            let events = match ordering {
                RecordOrdering::Partition => options.partition_events,
                _ => options.events,
            };
            let (figures, run_costs) = one_run(&options, ordering, events, run).await?;
            if run == 0 {
                costs.add(ordering.as_str(), "delivery", events, run_costs);
            }
            runs.push(figures);
        }
        figures.push((ordering, runs));
    }
    let mut table = Table::new(
        "webhook deliveries per ordering",
        vec![
            Column::left("ordering", "ordering"),
            Column::right("events per run", "events"),
            Column::right("deliveries/s (median)", "deliveries_per_second"),
            Column::left("range", "range"),
            Column::right("receiver's most concurrent", "most_in_flight"),
            Column::right("keys out of order", "keys_out_of_order"),
            Column::right("duplicate deliveries", "duplicates"),
            Column::right("not completed", "not_completed"),
        ],
    );
    let mut medians = HashMap::new();
    for (ordering, runs) in &figures {
        let mut rates: Vec<f64> = runs.iter().map(|run| run.deliveries_per_second).collect();
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        medians.insert(*ordering, median);
        let sum = |field: fn(&Run) -> u64| runs.iter().map(field).sum::<u64>();
        table.row(vec![
            Cell::text(ordering.as_str()),
            Cell::count(runs[0].events),
            Cell::number(median, 0),
            Cell::text(format!("{:.0}–{:.0}", rates[0], rates[rates.len() - 1])),
            Cell::count(runs.iter().map(|run| run.most_in_flight).max().unwrap_or(0)),
            Cell::count(sum(|run| run.keys_out_of_order)),
            Cell::count(sum(|run| run.duplicates)),
            Cell::count(sum(|run| run.not_completed)),
        ]);
    }
    report.table(table);
    if let (Some(key), Some(partition)) = (
        medians.get(&RecordOrdering::Key),
        medians.get(&RecordOrdering::Partition),
    ) {
        report.note(format!(
            "key ordering delivers {:.1}× as fast as partition ordering (medians of one run of \
             the bench); counts in the out-of-order, duplicate and not-completed columns are \
             summed over the runs",
            key / partition
        ));
    }
    report.table(costs.table("costs per delivery (first run of each ordering)"));
    for (_, runs) in &figures {
        if runs
            .iter()
            .any(|run| run.not_completed > 0 || run.duplicates > 0)
        {
            bail!("some events were not completed, or delivered twice: see the table");
        }
    }
    Ok(())
}

async fn one_run(
    options: &Options,
    ordering: RecordOrdering,
    events: u64,
    run: usize,
) -> anyhow::Result<(Run, crate::costs::Costs)> {
    let database = format!(
        "bench_webhooks_{}_{run}_{}",
        ordering.as_str(),
        std::process::id()
    );
    let database_url = format!("mysql://root@127.0.0.1:3306/{database}");
    drop_database(&database).await?;
    let receiver = Receiver::start_with(receiver::Options {
        latency: Duration::from_millis(options.latency_ms),
        ..receiver::Options::default()
    });
    let mut overrides = vec![
        ("APP_DATABASE__URL", database_url.clone()),
        ("APP_REDIS__KEY_PREFIX", format!("{database}:")),
        ("APP_INSTANCE__ID", "bench".to_string()),
        ("APP_AUTH__JWT_SECRET", JWT_SECRET.to_string()),
        ("APP_KAFKA__PARTITIONS", options.partitions.to_string()),
        ("APP_EXTERNAL__BASE_URL", receiver.address.clone()),
        ("APP_EXTERNAL__ORDERING", ordering.as_str().to_string()),
        ("APP_OUTBOX__REPUBLISH_AFTER_MS", "0".to_string()),
        ("APP_OUTBOX__POLL_INTERVAL_MS", "20".to_string()),
        ("APP_OUTBOX__BATCH_SIZE", "2000".to_string()),
    ];
    if let Some(max_in_flight) = options.max_in_flight {
        overrides.push(("APP_EXTERNAL__MAX_IN_FLIGHT", max_in_flight.to_string()));
    }
    let daemon = start_daemon(&overrides)?;
    daemon.wait_until_ready().await?;
    let mut settings = Settings::default();
    settings.database.url = SecretString::from(database_url.clone());
    let pool = connections::connect_mysql(&settings.database, 2).await?;
    let meters = Meters::of_daemon(pool.clone(), &settings, &daemon).await?;
    let before = meters.read().await?;
    record_payments(&pool, events, options.keys).await?;
    let bar = progress::counting(
        &format!("{} run {}: deliveries", ordering.as_str(), run + 1),
        events,
    );
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let distinct = receiver.distinct_webhooks() as u64;
        bar.set_position(distinct);
        if distinct >= events {
            break;
        }
        if Instant::now() > deadline {
            bail!("{distinct} of {events} events delivered in 900 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish();
    meters.wait_settled().await?;
    let after = meters.read().await?;
    let costs = before.until(&after);
    let elapsed = receiver
        .last_answer()
        .zip(receiver.first_arrival())
        .map(|(last, first)| last - first)
        .unwrap_or_default();
    let arrivals = receiver.webhook_ids();
    let (keys_out_of_order, not_completed) = check_order(&pool, &arrivals).await?;
    let figures = Run {
        events,
        deliveries_per_second: events as f64 / elapsed.as_secs_f64().max(1e-9),
        most_in_flight: receiver.most_in_flight(),
        keys_out_of_order,
        duplicates: arrivals.len() as u64 - events.min(arrivals.len() as u64),
        not_completed,
    };
    pool.close().await;
    daemon.stop().await?;
    receiver.stop().await;
    drop_database(&database).await?;
    Ok((figures, costs))
}

/// Writes the events' PENDING rows, 1,000 per transaction, for the relay to publish.
async fn record_payments(pool: &MySqlPool, events: u64, keys: u64) -> anyhow::Result<()> {
    let keys = keys.max(1);
    let all: Vec<OutboxEvent> = (0..events)
        .map(|n| {
            let order = n % keys + 1;
            OutboxEvent::new(EventEnvelope::new(
                format!("order:{order}"),
                EventPayload::PaymentCompleted(PaymentCompleted {
                    payment_id: PaymentId::from_u64(n + 1).expect("a positive id"),
                    order_id: OrderId::from_u64(order).expect("a positive id"),
                    user_id: UserId::from_u64(order).expect("a positive id"),
                    amount: 10_000,
                    timestamp: Utc::now(),
                }),
            ))
        })
        .collect();
    for chunk in all.chunks(1_000) {
        let mut transaction = pool.begin().await?;
        EventLog::insert_pending(&mut transaction, chunk).await?;
        transaction.commit().await?;
    }
    Ok(())
}

/// Keys whose events arrived in another order than their offsets, and events not COMPLETED.
async fn check_order(pool: &MySqlPool, arrivals: &[String]) -> anyhow::Result<(u64, u64)> {
    let rows: Vec<(EventId, String, Option<i64>, String)> = sqlx::query_as(
        "SELECT event_id, event_key, source_offset, status FROM event_log \
         WHERE event_type = 'PaymentCompleted'",
    )
    .fetch_all(pool)
    .await?;
    let not_completed = rows
        .iter()
        .filter(|(.., status)| status != "COMPLETED")
        .count() as u64;
    let mut first_arrival: HashMap<String, usize> = HashMap::new();
    for (position, id) in arrivals.iter().enumerate() {
        first_arrival.entry(id.clone()).or_insert(position);
    }
    let mut by_key: HashMap<&str, Vec<(i64, usize)>> = HashMap::new();
    for (id, key, offset, _) in &rows {
        let (Some(offset), Some(arrived)) = (offset, first_arrival.get(&id.to_string())) else {
            continue;
        };
        by_key.entry(key).or_default().push((*offset, *arrived));
    }
    let mut out_of_order = 0;
    for events in by_key.values_mut() {
        events.sort();
        if events.windows(2).any(|pair| pair[0].1 > pair[1].1) {
            out_of_order += 1;
        }
    }
    Ok((out_of_order, not_completed))
}
