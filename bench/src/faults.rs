//! Scenario `faults`: the fault-injection suite's
//! scenarios at a larger scale, one table. Each scenario has its own database; coupon load
//! runs through the fault, every request counted, then the shared checker
//! (`commerce_events::faults`) reports what MySQL holds against what the clients were told.
//!
//! - `SIGKILL` / `SIGTERM`: the built binary (`commerce-events` beside this one) under load
//!   with a backlog (the issuer's group paused), killed, restarted on the same database with
//!   a fresh embedded cluster, or (SIGKILL) with a separate broker process (tansu) that
//!   outlives it; recovery is from the restart to every request settled.
//! - broker down, MySQL cut, Redis cut (through a TCP proxy): a daemon in this process;
//!   recovery is from the end of the outage until every request recorded before it settled.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use commerce_events::config::{RateLimit, Settings};
use commerce_events::kafka::cluster::KafkaCluster;
use commerce_events::startup::{Application, COUPON_REQUEST_GROUP};
use testkit::faults::{Checker, Clients, Report, coupon_body, user_rows};
use testkit::process::{Daemon, TansuBroker};
use testkit::proxy::TcpProxy;
use testkit::wait::eventually;

use crate::coupons::drop_database;
use crate::progress;
use crate::report::{Cell, Column, Table};
use secrecy::SecretString;
use serde_json::{Value, json};

const JWT_SECRET: &str = "bench-secret-of-the-fault-drills";

#[derive(clap::Args)]
pub struct Options {
    /// Users per scenario (one coupon request each).
    #[arg(long, default_value_t = 6_000)]
    pub users: u64,
    /// Requests per second of the background load.
    #[arg(long, default_value_t = 150)]
    pub rate: u64,
    /// How long each outage lasts.
    #[arg(long, default_value_t = 30)]
    pub outage_seconds: u64,
    /// Runs of every scenario (the table gives the median recovery and its range; the
    /// counts are summed over the runs).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

struct Row {
    scenario: String,
    report: Report,
    ok: u64,
    failed: u64,
    unknown: u64,
    recovery: Duration,
}

pub async fn run(options: Options, report: &mut crate::report::Report) -> anyhow::Result<()> {
    let binary = testkit::process::binary_beside_this_executable()?;
    report.note(format!(
        "scenario faults: {} users per scenario, background load {} req/s, outages of {} s, \
         {} runs of each",
        options.users, options.rate, options.outage_seconds, options.runs
    ));
    let mut runs: Vec<Vec<Row>> = Vec::new();
    for run in 0..options.runs.max(1) {
        let mut rows = Vec::new();
        for (signal, separate_broker) in [("-KILL", false), ("-KILL", true), ("-TERM", false)] {
            rows.push(crash(&binary, signal, separate_broker, run, &options).await?);
        }
        for outage in [Outage::Broker, Outage::Mysql, Outage::Redis] {
            rows.push(outage_under_load(outage, run, &options).await?);
        }
        rows.push(member_joins_and_leaves(run, &options).await?);
        runs.push(rows);
    }
    let mut table = Table::new(
        "fault scenarios",
        vec![
            Column::left("scenario", "scenario"),
            Column::right("runs", "runs"),
            Column::right("accepted", "accepted"),
            Column::left("ok / failed / unknown answers", "answers"),
            Column::right("lost", "lost"),
            Column::right("stranded", "stranded"),
            Column::right("applied twice", "applied_twice"),
            Column::right("dead-lettered", "dead_lettered"),
            Column::right("pushes lost", "pushes_lost"),
            Column::right("users out of order", "out_of_order"),
            Column::right("recovery s, median (range)", "recovery_seconds"),
        ],
    );
    for scenario in 0..runs[0].len() {
        let rows: Vec<&Row> = runs.iter().map(|rows| &rows[scenario]).collect();
        let sum = |count: fn(&Row) -> u64| rows.iter().map(|row| count(row)).sum::<u64>();
        let (ok, failed, unknown) = (
            sum(|row| row.ok),
            sum(|row| row.failed),
            sum(|row| row.unknown),
        );
        let mut recoveries: Vec<f64> = rows.iter().map(|row| row.recovery.as_secs_f64()).collect();
        recoveries.sort_by(f64::total_cmp);
        let median = recoveries[recoveries.len() / 2];
        let (low, high) = (recoveries[0], recoveries[recoveries.len() - 1]);
        table.row(vec![
            Cell::text(rows[0].scenario.clone()),
            Cell::count(rows.len() as u64),
            Cell::count(sum(|row| row.report.accepted)),
            Cell::new(
                format!("{ok} / {failed} / {unknown}"),
                json!({"ok": ok, "failed": failed, "unknown": unknown}),
            ),
            Cell::count(sum(|row| row.report.lost)),
            Cell::count(sum(|row| row.report.stranded)),
            Cell::count(sum(|row| {
                let checked = &row.report;
                checked.applied_twice
                    + checked.held_twice
                    + checked.over_issued
                    + checked.told_success_not_issued
            })),
            Cell::count(sum(|row| row.report.dead_lettered)),
            Cell::count(sum(|row| row.report.pushes_lost)),
            Cell::count(sum(|row| row.report.out_of_order)),
            Cell::new(
                format!("{median:.1} ({low:.1}–{high:.1})"),
                json!({"median": median, "min": low, "max": high, "runs": recoveries}),
            ),
        ]);
    }
    report.table(table);
    Ok(())
}

fn database(tag: &str, run: usize) -> (String, String) {
    let name = format!("bench_faults_{tag}_{run}_{}", std::process::id());
    let url = format!("mysql://root@127.0.0.1:3306/{name}");
    (name, url)
}

fn settings_for(name: &str, url: &str) -> Settings {
    let mut settings = Settings::default();
    settings.http.port = 0;
    settings.database.url = SecretString::from(url.to_string());
    settings.redis.key_prefix = format!("{name}:");
    settings.instance.id = "bench".into();
    settings.kafka.embedded_brokers = 1;
    settings.auth.jwt_secret = SecretString::from(JWT_SECRET);
    settings.limits.coupon_issue = RateLimit {
        per_second: 100_000.0,
        burst: 100_000,
    };
    settings.reconcile.after_ms = 3_000;
    settings.reconcile.interval_ms = 1_000;
    settings.log.filter = "error".into();
    settings
}

/// Once the daemon is ready: `users` users, and a coupon for a quarter of them.
async fn users_and_a_coupon(clients: &Clients, url: &str, users: u64) -> anyhow::Result<u64> {
    clients.wait_ready().await;
    user_rows(url, users).await;
    let (_, coupon) = clients
        .admin("/coupons", coupon_body((users / 4) as u32))
        .await;
    coupon["couponId"].as_u64().context("a coupon")
}

async fn crash(
    binary: &Path,
    signal: &str,
    separate_broker: bool,
    run: usize,
    options: &Options,
) -> anyhow::Result<Row> {
    let (scenario, tag) = if separate_broker {
        (
            format!(
                "{} under load with a backlog, separate broker (tansu)",
                &signal[1..]
            ),
            format!("{}_tansu", signal[1..].to_lowercase()),
        )
    } else {
        (
            format!("{} under load with a backlog", &signal[1..]),
            signal[1..].to_lowercase(),
        )
    };
    let (name, url) = database(&tag, run);
    let settings = settings_for(&name, &url);
    // The separate broker outlives the daemon; the embedded cluster dies with it.
    let broker = if separate_broker {
        Some(TansuBroker::start().await)
    } else {
        None
    };
    let brokers = broker.as_ref().map(|broker| broker.address.as_str());
    let start = || Daemon::start(binary, &url, &format!("{name}:"), JWT_SECRET, brokers);
    let first = start();
    let clients = Clients::new(&first.address, &settings);
    let users = options.users;
    let coupon = users_and_a_coupon(&clients, &url, users).await?;
    let bar = answers(&clients, &format!("{tag}: first load"), users / 6);
    clients.load(1..=users / 6, coupon, 16).await;
    bar.finish();
    let group = settings.kafka.group_id(COUPON_REQUEST_GROUP);
    clients
        .admin(
            &format!("/admin/consumer-groups/{group}/pause"),
            Value::Null,
        )
        .await;
    let bar = answers(&clients, &format!("{tag}: backlog"), users / 2 - users / 6);
    clients.load(users / 6 + 1..=users / 2, coupon, 16).await;
    bar.finish();
    let bar = answers(&clients, &format!("{tag}: load, crash"), users - users / 2);
    let load = clients.load_in_background(users / 2 + 1..=users, coupon, options.rate);
    let before = clients.accepted();
    eventually("load under way", Duration::from_secs(120), || async {
        clients.accepted() >= before + options.rate
    })
    .await;
    first.signal(signal);
    bar.set_message("signalled, restarting");
    first.exited().await;
    let restarted = Instant::now();
    let second = start();
    clients.point_at(&second.address);
    clients.wait_ready().await;
    bar.set_message("restarted");
    load.await?;
    bar.finish();
    clients.ask_again_unknown().await;
    let checker = Checker::connect(&url).await;
    let bar = settling(&format!("{tag}: settling"));
    let (report, _) = checker.settle(&clients, &[coupon]).await;
    bar.finish();
    let recovery = restarted.elapsed();
    let row = row(scenario, report, &clients, recovery);
    second.signal("-TERM");
    second.exited().await;
    drop_database(&name).await?;
    Ok(row)
}

/// Every answer the clients got so far (ok, failed, no answer).
fn answered(clients: &Clients) -> u64 {
    let ledger = clients.ledger.lock().unwrap();
    ledger.ok + ledger.failed + ledger.unknown
}

/// A bar of `phase` counting the clients' answers to its `requests`.
fn answers(clients: &Clients, phase: &str, requests: u64) -> progress::Ticking {
    let clients = clients.clone();
    let before = answered(&clients);
    progress::follow(progress::counting(phase, requests), move |bar| {
        bar.set_position(answered(&clients).saturating_sub(before).min(requests));
    })
}

/// A spinner while the checker waits for every request to settle.
fn settling(phase: &str) -> progress::Ticking {
    progress::waiting(phase, || {
        "until every request is decided and pushed".to_string()
    })
}

fn row(scenario: String, report: Report, clients: &Clients, recovery: Duration) -> Row {
    let ledger = clients.ledger.lock().unwrap();
    Row {
        scenario,
        report,
        ok: ledger.ok,
        failed: ledger.failed,
        unknown: ledger.unknown,
        recovery,
    }
}

#[derive(Clone, Copy)]
enum Outage {
    Broker,
    Mysql,
    Redis,
}

async fn outage_under_load(outage: Outage, run: usize, options: &Options) -> anyhow::Result<Row> {
    let (tag, scenario) = match outage {
        Outage::Broker => ("broker", "broker down"),
        Outage::Mysql => ("mysql", "MySQL cut (TCP proxy)"),
        Outage::Redis => ("redis", "Redis cut (TCP proxy)"),
    };
    let scenario = format!("{scenario} {} s under load", options.outage_seconds);
    let (name, url) = database(tag, run);
    let mut settings = settings_for(&name, &url);
    let proxy = match outage {
        Outage::Broker => None,
        Outage::Mysql => {
            let proxy = TcpProxy::start("127.0.0.1:3306".parse()?);
            settings.database.url =
                SecretString::from(format!("mysql://root@127.0.0.1:{}/{name}", proxy.port));
            Some(proxy)
        }
        Outage::Redis => {
            let proxy = TcpProxy::start("127.0.0.1:6379".parse()?);
            settings.redis.url = SecretString::from(format!("redis://127.0.0.1:{}", proxy.port));
            Some(proxy)
        }
    };
    let daemon = InProcess::start(settings.clone())?;
    let clients = Clients::new(&daemon.address, &settings);
    let users = options.users;
    let coupon = users_and_a_coupon(&clients, &url, users).await?;
    let bar = answers(&clients, &format!("{tag}: first load"), users / 10);
    clients.load(1..=users / 10, coupon, 16).await;
    bar.finish();
    let bar = answers(
        &clients,
        &format!("{tag}: load, outage"),
        users - users / 10,
    );
    let load = clients.load_in_background(users / 10 + 1..=users, coupon, options.rate);
    let checker = Checker::connect(&url).await;
    let set = |down: bool| match (outage, &proxy) {
        (Outage::Broker, _) => {
            let KafkaCluster::Embedded { cluster, .. } = &*daemon.kafka else {
                unreachable!("the bench runs the embedded cluster")
            };
            cluster
                .set_broker_up(1, !down)
                .expect("the mock broker changes state");
        }
        (_, Some(proxy)) if down => proxy.cut(),
        (_, Some(proxy)) => proxy.restore(),
        (_, None) => unreachable!("a proxy for MySQL and Redis"),
    };
    set(true);
    bar.set_message("outage");
    actix_rt::time::sleep(Duration::from_secs(options.outage_seconds)).await;
    set(false);
    bar.set_message("recovering");
    let recovery = checker.recovery().await;
    bar.set_message("recovered");
    load.await?;
    bar.finish();
    clients.ask_again_unknown().await;
    let settle = settling(&format!("{tag}: settling"));
    let (report, _) = checker.settle(&clients, &[coupon]).await;
    settle.finish();
    let row = row(scenario, report, &clients, recovery);
    daemon.stop().await?;
    drop_database(&name).await?;
    Ok(row)
}

/// Coupon load (every user asking for three coupons, one after the other) while a second
/// member joins the group and, a third of the way later, leaves it with a clean stop;
/// recovery is from its stop until every request recorded before it settled.
async fn member_joins_and_leaves(run: usize, options: &Options) -> anyhow::Result<Row> {
    let scenario = "a second member joins and leaves under load".to_string();
    let (name, url) = database("members", run);
    let settings = settings_for(&name, &url);
    let first = InProcess::start(settings.clone())?;
    let clients = Clients::new(&first.address, &settings);
    clients.wait_ready().await;
    let users = options.users / 3;
    user_rows(&url, users).await;
    let mut coupons = Vec::new();
    for _ in 0..3 {
        let (_, coupon) = clients.admin("/coupons", coupon_body(users as u32)).await;
        coupons.push(coupon["couponId"].as_u64().context("a coupon")?);
    }
    let bar = answers(&clients, "members: load", users * 3);
    // Users start at a third of the rate: each sends three requests.
    let load = clients.load_in_order_in_background(1..=users, coupons.clone(), options.rate / 3);
    let third = users;
    eventually("load under way", Duration::from_secs(120), || async {
        clients.accepted() >= third
    })
    .await;
    let mut second_settings = settings.clone();
    second_settings.instance.id = "bench-second".into();
    second_settings.kafka.brokers = first.kafka.bootstrap_servers().to_string();
    let second = InProcess::start(second_settings)?;
    bar.set_message("two members");
    eventually(
        "load while both members share the group",
        Duration::from_secs(300),
        || async { clients.accepted() >= 2 * third },
    )
    .await;
    second.stop().await?;
    bar.set_message("second member gone");
    let checker = Checker::connect(&url).await;
    let recovery = checker.recovery().await;
    load.await?;
    bar.finish();
    clients.ask_again_unknown().await;
    let settle = settling("members: settling");
    let (report, _) = checker.settle(&clients, &coupons).await;
    settle.finish();
    let row = row(scenario, report, &clients, recovery);
    first.stop().await?;
    drop_database(&name).await?;
    Ok(row)
}

/// A daemon in this process, on its own thread and actix system.
struct InProcess {
    address: String,
    kafka: Arc<KafkaCluster>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    fn start(settings: Settings) -> anyhow::Result<Self> {
        let (started_sender, started) = std::sync::mpsc::channel();
        let (shutdown, shutdown_signal) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("daemon".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let application = Application::build(settings).await?;
                    started_sender.send((application.port(), application.kafka()))?;
                    application
                        .run_until_stopped(async move {
                            let _ = shutdown_signal.await;
                        })
                        .await
                })
            })?;
        let (port, kafka) = started
            .recv_timeout(Duration::from_secs(120))
            .context("the daemon did not start")?;
        Ok(Self {
            address: format!("http://127.0.0.1:{port}"),
            kafka,
            shutdown,
            thread,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        drop(self.kafka);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the daemon thread panicked"))?
    }
}
