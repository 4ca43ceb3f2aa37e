//! Benchmarks: `cargo run --release --bin bench -- <scenario> [options]`. Each scenario prints
//! a table; BENCHMARKS.md records them with the machine.
//!
//! - `pipeline [--records N] [--runs R] [--threads T]`: the cost of the partition actors
//!   against raw rdkafka consumption.
//! - `coupons [--seconds S] [--backlog B] [--clients C] [--latency-rate R] [--latency-seconds L]`: the
//!   coupon flow end to end through a daemon started in this process.
//! - `ranking [--orders N] [--lines L] [--threads T]`: ranking updates through the
//!   RankingUpdater against raw pipelined ZINCRBY, and a replay that must count nothing.

mod coupons;
mod pipeline;
mod ranking;

use std::str::FromStr;

use anyhow::{Context, bail};
use commerce_events::config::Settings;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| "pipeline".into());
    let options: Vec<String> = args.collect();
    match scenario.as_str() {
        "pipeline" => actix_rt::System::new().block_on(pipeline::run(
            option(&options, "--records", 200_000)?,
            option(&options, "--runs", 5)?,
            option(
                &options,
                "--threads",
                Settings::default().kafka.consumer.partition_threads,
            )?,
        )),
        "coupons" => actix_rt::System::new().block_on(coupons::run(coupons::Options {
            seconds: option(&options, "--seconds", 60)?,
            backlog: option(&options, "--backlog", 150_000)?,
            clients: option(&options, "--clients", 1024)?,
            latency_rate: option(&options, "--latency-rate", 2_000)?,
            latency_seconds: option(&options, "--latency-seconds", 20)?,
            baseline_seconds: option(&options, "--baseline-seconds", 10)?,
        })),
        "ranking" => actix_rt::System::new().block_on(ranking::run(
            option(&options, "--orders", 100_000)?,
            option(&options, "--lines", 3)?,
            option(
                &options,
                "--threads",
                Settings::default().kafka.consumer.partition_threads,
            )?,
        )),
        other => bail!("unknown scenario {other:?}; known: pipeline, coupons, ranking"),
    }
}

fn option<T: FromStr>(options: &[String], name: &str, default: T) -> anyhow::Result<T> {
    match options.iter().position(|option| option == name) {
        None => Ok(default),
        Some(index) => {
            let value = options
                .get(index + 1)
                .with_context(|| format!("{name} needs a value"))?;
            value
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}: cannot parse {value:?}"))
        }
    }
}
