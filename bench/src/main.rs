//! Benchmarks: `cargo build --release --workspace`, then `target/release/bench <scenario>
//! [options]` (`--help` lists them). Each scenario prints a table; docs/benchmarks/ records
//! them with the machine.
//! `--json` prints one JSON document instead (see [`report`]); long phases show progress
//! bars on stderr (see [`progress`]).

mod chart;
mod costs;
mod coupons;
mod faults;
mod load;
mod payments;
mod pipeline;
mod progress;
mod push_sessions;
mod ranking;
mod report;
mod scale;
mod webhooks;

use clap::{Parser, Subcommand};
use commerce_events::config::Settings;
use commerce_events::events::topics::dead_letter_topic;
use commerce_events::kafka::cluster::EmbeddedCluster;
use commerce_events::kafka::producer::EventPublisher;
use report::Report;

#[derive(Parser)]
#[command(about = "Benchmarks of commerce-events; docs/benchmarks/ records their figures")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print one JSON document on stdout (notes and tables, numbers as numbers) instead of
    /// Markdown.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// The cost of the partition actors against raw rdkafka consumption.
    Pipeline(pipeline::Options),
    /// The coupon flow end to end through the daemon binary, run as its own process.
    Coupons(coupons::Options),
    /// Ranking updates through the RankingUpdater against raw pipelined ZINCRBY, and a
    /// replay that must count nothing.
    Ranking(ranking::Options),
    /// Orders and payments through the daemon binary, by shape (products spread, one hot
    /// product, coupons, Idempotency-Key): payments/s, latencies, ranking lag, costs.
    Payments(payments::Options),
    /// Webhook deliveries per ordering of `external-event-group`, through the daemon binary.
    Webhooks(webhooks::Options),
    /// The fault-injection scenarios at a larger scale.
    Faults(faults::Options),
    /// The coupon flow through 1, 2 and 3 daemon processes in one consumer group on one
    /// separate broker process.
    Scale(scale::Options),
    /// Many idle WebSocket sessions on the daemon binary: memory per session, `/healthz`
    /// while they are open, one message to all, memory returned once they close.
    PushSessions(push_sessions::Options),
}

/// Settings for a scenario on the embedded cluster, that cluster (with `topic` and its
/// dead-letter topic) and a producer. Throughput on the embedded cluster: no minimum fetch
/// size to wait for.
fn embedded_bench(
    topic: &str,
    partitions: i32,
    threads: usize,
) -> anyhow::Result<(Settings, EmbeddedCluster, EventPublisher)> {
    let mut settings = Settings::default();
    settings.kafka.consumer.fetch_min_bytes = 1;
    settings.kafka.consumer.fetch_wait_max_ms = 10;
    settings.kafka.consumer.partition_threads = threads;
    let cluster = EmbeddedCluster::start(1)?;
    cluster.create_topic(topic, partitions)?;
    cluster.create_topic(&dead_letter_topic(topic), partitions)?;
    let publisher = EventPublisher::new(
        cluster.bootstrap_servers(),
        &settings.kafka,
        &settings.instance.id,
    )?;
    Ok((settings, cluster, publisher))
}

/// The partition arbiters a scenario runs on (the daemon's default).
#[derive(clap::Args)]
struct Arbiters {
    #[arg(long, default_value_t = Settings::default().kafka.consumer.partition_threads)]
    threads: usize,
}

impl Scenario {
    /// The scenario's name, as on the command line.
    fn name(&self) -> &'static str {
        match self {
            Scenario::Pipeline(_) => "pipeline",
            Scenario::Coupons(_) => "coupons",
            Scenario::Ranking(_) => "ranking",
            Scenario::Payments(_) => "payments",
            Scenario::Webhooks(_) => "webhooks",
            Scenario::Faults(_) => "faults",
            Scenario::Scale(_) => "scale",
            Scenario::PushSessions(_) => "push-sessions",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let system = actix_rt::System::new();
    let cli = Cli::parse();
    let mut report = Report::new(cli.scenario.name(), cli.json);
    let result = match cli.scenario {
        Scenario::Pipeline(options) => system.block_on(pipeline::run(options, &mut report)),
        Scenario::Coupons(options) => system.block_on(coupons::run(options, &mut report)),
        Scenario::Ranking(options) => system.block_on(ranking::run(options, &mut report)),
        Scenario::Payments(options) => system.block_on(payments::run(options, &mut report)),
        Scenario::Webhooks(options) => system.block_on(webhooks::run(options, &mut report)),
        Scenario::Faults(options) => system.block_on(faults::run(options, &mut report)),
        Scenario::Scale(options) => system.block_on(scale::run(options, &mut report)),
        Scenario::PushSessions(options) => {
            system.block_on(push_sessions::run(options, &mut report))
        }
    };
    // What was measured before a failure is reported too.
    report.finish();
    result
}
