//! Scenario `pipeline`: N records on one embedded cluster, consumed (a) by a raw rdkafka
//! consumer and (b) through the partition actors (on T arbiter threads) by a domain actor
//! that does nothing. Prints records/s of each and the ratios. Every run must see exactly
//! N records, or the scenario fails.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use commerce_events::actors::ArbiterPool;
use commerce_events::actors::consumer_group::{ConsumerGroup, ConsumerGroupSpec};
use commerce_events::actors::domain::{
    Batch, DomainActor, DomainHandler, EventOutcome, PipelineProbes, Stats,
};
use commerce_events::common::ids::{CouponId, UserId};
use commerce_events::config::Settings;
use commerce_events::event_log::EventLog;
use commerce_events::events::{CouponRequested, EventEnvelope, EventPayload};

use commerce_events::kafka::consumer::consumer_config;
use commerce_events::kafka::producer::{EventPublisher, RawRecord};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use secrecy::ExposeSecret;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

use crate::progress;
use crate::report::{Cell, Column, Report, Table};

const TOPIC: &str = "bench-events";
const PARTITIONS: i32 = 3;

/// Counts what reaches it and answers at once.
#[derive(Clone)]
struct NoOpHandler {
    seen: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
    first_at: Arc<Mutex<Option<Instant>>>,
}

impl DomainHandler for NoOpHandler {
    type Stats = ();

    fn name(&self) -> &'static str {
        "NoOpHandler"
    }

    async fn handle(&self, batch: &Batch, _stats: &Stats<()>) -> Vec<EventOutcome> {
        self.first_at
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
        self.seen.fetch_add(batch.events.len(), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        vec![EventOutcome::Done; batch.events.len()]
    }
}

struct Measurement {
    records: usize,
    elapsed: Duration,
    batches: Option<usize>,
}

impl Measurement {
    fn per_second(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
}

#[derive(clap::Args)]
pub struct Options {
    /// Records consumed per run.
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Runs of each consumer.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[command(flatten)]
    arbiters: crate::Arbiters,
}

pub async fn run(options: Options, report: &mut Report) -> anyhow::Result<()> {
    let (records, runs, threads) = (options.records, options.runs, options.arbiters.threads);
    let (settings, cluster, publisher) = crate::embedded_bench(TOPIC, PARTITIONS, threads)?;
    let bootstrap = cluster.bootstrap_servers().to_string();

    let record_bytes = produce(&publisher, records).await?;
    report.note(format!(
        "scenario pipeline: {records} records of {record_bytes} B over {PARTITIONS} partitions, \
         embedded cluster (1 broker), {threads} partition threads, {runs} runs each"
    ));

    // The no-op domain actor never touches the database; this lazy pool is never opened.
    let pool = MySqlPoolOptions::new().connect_lazy_with(MySqlConnectOptions::from_str(
        settings.database.url.expose_secret(),
    )?);
    let event_log = EventLog::new(pool);
    let arbiters = Arc::new(ArbiterPool::new(threads));

    let mut raw = Vec::new();
    let mut raw_decoding = Vec::new();
    let mut actors = Vec::new();
    let bar = progress::counting("consumer runs", 3 * runs as u64);
    for run in 0..runs {
        bar.set_message(format!("run {}: raw poll", run + 1));
        raw.push(
            raw_consumer(
                &bootstrap,
                &settings,
                &format!("bench-raw-{run}"),
                records,
                false,
            )
            .await?,
        );
        bar.inc(1);
        bar.set_message(format!("run {}: raw poll + decode", run + 1));
        let group = format!("bench-raw-decoding-{run}");
        raw_decoding.push(raw_consumer(&bootstrap, &settings, &group, records, true).await?);
        bar.inc(1);
        bar.set_message(format!("run {}: partition actors", run + 1));
        let group = format!("bench-actors-{run}");
        actors.push(
            partition_actors(
                &bootstrap, &settings, &group, records, &publisher, &event_log, &arbiters,
            )
            .await?,
        );
        bar.inc(1);
    }
    bar.finish_and_clear();
    let batches: Vec<usize> = actors.iter().filter_map(|run| run.batches).collect();
    let mut table = Table::new(
        "consumers",
        vec![
            Column::left("consumer", "consumer"),
            Column::right("best records/s", "best_records_per_second"),
            Column::right("median records/s", "median_records_per_second"),
        ],
    );
    for (consumer, measurements) in [
        (
            "raw rdkafka `BaseConsumer::poll`, offset stored per record",
            &raw,
        ),
        (
            "raw rdkafka `BaseConsumer::poll` + envelope decode, offset stored per record",
            &raw_decoding,
        ),
        (
            "partition actors → no-op domain actor (decode, send, store per batch, commit ≤ 10/s)",
            &actors,
        ),
    ] {
        table.row(vec![
            Cell::text(consumer),
            Cell::number(best(measurements), 0),
            Cell::number(median(measurements), 0),
        ]);
    }
    report.table(table);
    report.note(format!(
        "pipeline / raw with decode (the overhead of the actors): median {:.2} (goal ≥ 0.80)",
        median(&actors) / median(&raw_decoding)
    ));
    report.note(format!(
        "pipeline / bare raw poll: median {:.2}; batches per pipeline run: {batches:?}",
        median(&actors) / median(&raw)
    ));
    let arbiters_to_stop = arbiters.clone();
    tokio::task::spawn_blocking(move || arbiters_to_stop.stop_blocking()).await?;
    Ok(())
}

fn best(measurements: &[Measurement]) -> f64 {
    measurements
        .iter()
        .map(Measurement::per_second)
        .fold(0.0, f64::max)
}

fn median(measurements: &[Measurement]) -> f64 {
    let mut rates: Vec<f64> = measurements.iter().map(Measurement::per_second).collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Publishes `records` coupon requests round-robin over the partitions; returns the size
/// of one record value.
async fn produce(publisher: &EventPublisher, records: usize) -> anyhow::Result<usize> {
    let mut value_size = 0;
    let bar = progress::counting("producing records", records as u64);
    for chunk_start in (0..records).step_by(5_000) {
        let chunk_end = (chunk_start + 5_000).min(records);
        let events: Vec<(i32, EventEnvelope, Vec<u8>)> = (chunk_start..chunk_end)
            .map(|n| {
                let event = EventEnvelope::new(
                    format!("user:{n}"),
                    EventPayload::CouponRequested(CouponRequested {
                        user_id: UserId::from_u64(n as u64 + 1).expect("positive"),
                        coupon_id: CouponId::from_u64(1).expect("positive"),
                    }),
                );
                let value = event.encode();
                (n as i32 % PARTITIONS, event, value)
            })
            .collect();
        value_size = events.last().map_or(0, |(_, _, value)| value.len());
        let sends = events.iter().map(|(partition, event, value)| {
            publisher.publish_raw(RawRecord {
                topic: TOPIC,
                partition: Some(*partition),
                key: Some(event.key.as_bytes()),
                value: Some(value),
                headers: Vec::new(),
            })
        });
        for result in futures::future::join_all(sends).await {
            result?;
        }
        bar.set_position(chunk_end as u64);
    }
    bar.finish_and_clear();
    Ok(value_size)
}

/// A plain consumer polling on its own thread; timed from its first record to its last.
async fn raw_consumer(
    bootstrap: &str,
    settings: &Settings,
    group: &str,
    records: usize,
    decode: bool,
) -> anyhow::Result<Measurement> {
    let max_record_bytes = settings.kafka.consumer.max_record_bytes;
    let mut config = consumer_config(bootstrap, &settings.kafka, group);
    config.set("enable.auto.commit", "true");
    tokio::task::spawn_blocking(move || -> anyhow::Result<Measurement> {
        let consumer: BaseConsumer = config.create()?;
        consumer.subscribe(&[TOPIC])?;
        let mut seen = 0;
        let mut first_at = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen < records {
            if Instant::now() > deadline {
                bail!("raw consumer saw {seen} of {records} records");
            }
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message?;
                first_at.get_or_insert_with(Instant::now);
                if decode {
                    std::hint::black_box(EventEnvelope::decode(
                        message.payload(),
                        max_record_bytes,
                    ))?;
                } else {
                    std::hint::black_box(message.payload());
                }
                consumer.store_offset_from_message(&message)?;
                seen += 1;
            }
        }
        let elapsed = first_at.expect("records were seen").elapsed();
        Ok(Measurement {
            records,
            elapsed,
            batches: None,
        })
    })
    .await?
}

/// The consumer group with partition actors and a no-op domain actor; timed from the first
/// batch to the last event handled.
async fn partition_actors(
    bootstrap: &str,
    settings: &Settings,
    group: &str,
    records: usize,
    publisher: &EventPublisher,
    event_log: &EventLog,
    arbiters: &Arc<ArbiterPool>,
) -> anyhow::Result<Measurement> {
    let handler = NoOpHandler {
        seen: Arc::new(AtomicUsize::new(0)),
        batches: Arc::new(AtomicUsize::new(0)),
        first_at: Arc::new(Mutex::new(None)),
    };
    let factory_handler = handler.clone();
    let domain = DomainActor::start(
        &arbiters.next(),
        PipelineProbes::new(event_log.clone()),
        move || factory_handler.clone(),
    );
    let spec = ConsumerGroupSpec::from_settings(
        settings,
        bootstrap,
        group,
        BTreeMap::from([(TOPIC.to_string(), domain.recipient())]),
        publisher.clone(),
        event_log.clone(),
        Default::default(),
    );
    let consumer_group = ConsumerGroup::start(spec, arbiters.clone())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while handler.seen.load(Ordering::Relaxed) < records {
        if Instant::now() > deadline {
            bail!(
                "partition actors saw {} of {records} records",
                handler.seen.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = handler
        .first_at
        .lock()
        .unwrap()
        .expect("records were seen")
        .elapsed();
    consumer_group.shutdown().await;
    let seen = handler.seen.load(Ordering::Relaxed);
    if seen != records {
        bail!("partition actors saw {seen} records, expected exactly {records}");
    }
    Ok(Measurement {
        records,
        elapsed,
        batches: Some(handler.batches.load(Ordering::Relaxed)),
    })
}
