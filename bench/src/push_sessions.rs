//! Scenario `push-sessions`: many idle WebSocket sessions on one daemon binary, started as its
//! own process (its own database, the embedded Kafka cluster), opened from this process.
//!
//! 1. `sessions` WebSockets (`GET /ws`), `concurrency` being opened at a time, spread round
//!    robin over `users` users; the daemon's resident set size (RSS, from `/proc`) before and
//!    once its push-session view counts every one gives the memory per session.
//! 2. While they are open: `probes` requests to `/healthz`, one after another; their p99.
//! 3. One message to every session: each user asks once for a coupon (stock for all), and
//!    every session of the user receives the result; the time from the first request to the
//!    last session's message.
//! 4. Every session closed: the RSS once the daemon counts none, and 5 s later; the share of
//!    the sessions' memory that came back.
//!
//! A process may hold at most `ulimit -n` descriptors: this process holds one per session,
//! and so does the daemon, beside its own (about 100).

use std::cell::Cell as Counter;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use awc::ws::Frame;
use chrono::Utc;
use commerce_events::common::connections;
use commerce_events::config::Settings;
use commerce_events::guards::tokens::Authenticator;
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::{Value, json};
use testkit::process::Daemon;

use crate::chart::nearest_rank;
use crate::coupons::{drop_database, start_daemon};
use crate::load::{self, refusal};
use crate::progress;
use crate::report::{Cell, Column, Report, Table};

const JWT_SECRET: &str = "bench-secret-of-the-push-session-scenario";
/// How long after the last session closed the RSS is read again.
const RETURN_WINDOW: Duration = Duration::from_secs(5);
/// Descriptors this process and the daemon need beside one per session (the daemon holds
/// about 250 of its own: database, Redis and broker connections, its threads' event loops).
const OTHER_DESCRIPTORS: u64 = 300;

#[derive(clap::Args)]
pub struct Options {
    /// Idle WebSocket sessions to open.
    #[arg(long, default_value_t = 20_000)]
    pub sessions: u64,
    /// Users the sessions belong to, round robin.
    #[arg(long, default_value_t = 100)]
    pub users: u64,
    /// Sessions being opened at a time.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// `/healthz` requests while the sessions are open.
    #[arg(long, default_value_t = 2_000)]
    pub probes: usize,
}

/// The daemon's RSS and push-session count at one moment.
struct Reading {
    rss_bytes: u64,
    sessions: u64,
}

pub async fn run(options: Options, report: &mut Report) -> anyhow::Result<()> {
    check_descriptors(options.sessions)?;
    if options.users == 0 || options.users > options.sessions {
        bail!("--users must be 1 to --sessions");
    }
    let database = format!("bench_push_sessions_{}", std::process::id());
    let database_url = format!("mysql://root@127.0.0.1:3306/{database}");
    let mut settings = Settings::load()?;
    settings.database.url = SecretString::from(database_url.clone());
    settings.auth.jwt_secret = SecretString::from(JWT_SECRET);
    let unlimited = "1000000".to_string();
    let overrides = [
        ("APP_DATABASE__URL", database_url.clone()),
        ("APP_REDIS__KEY_PREFIX", format!("{database}:")),
        ("APP_INSTANCE__ID", "bench".to_string()),
        ("APP_AUTH__JWT_SECRET", JWT_SECRET.to_string()),
        ("APP_LIMITS__ANONYMOUS__PER_SECOND", unlimited.clone()),
        ("APP_LIMITS__ANONYMOUS__BURST", unlimited),
    ];
    report.note(format!(
        "scenario push-sessions: {} idle WebSocket sessions of {} users, opened {} at a time; \
         {} /healthz requests while they are open",
        options.sessions, options.users, options.concurrency, options.probes
    ));
    let auth = Authenticator::from_settings(&settings.auth, &settings.kafka)?;
    let daemon = start_daemon(&overrides)?;
    daemon.wait_until_ready().await?;
    let outcome = measure(&options, &settings, &auth, &daemon, report).await;
    daemon.stop().await?;
    drop_database(&database).await?;
    outcome
}

async fn measure(
    options: &Options,
    settings: &Settings,
    auth: &Authenticator,
    daemon: &Daemon,
    report: &mut Report,
) -> anyhow::Result<()> {
    let pool = connections::connect_mysql(&settings.database, 2).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT IGNORE INTO app_user (user_id, name) SELECT seq, 'bench' FROM seq_1_to_{}",
        options.users
    )))
    .execute(&pool)
    .await?;
    let client = awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .timeout(Duration::from_secs(60))
        .max_http_version(awc::http::Version::HTTP_11)
        .finish();
    let daemon_view = DaemonView {
        client: client.clone(),
        address: daemon.address.clone(),
        admin: load::token(auth, 1, true),
        pid: daemon.pid().context("the daemon runs")?,
    };
    let coupon = create_coupon(&daemon_view, options.users).await?;
    let before = daemon_view.reading().await?;

    let received = Rc::new(Counter::new(0_u64));
    let opening = Instant::now();
    let readers = open_sessions(options, auth, &daemon.address, &received).await?;
    let opened_in = opening.elapsed();
    let open = daemon_view
        .when(
            |reading| reading.sessions == options.sessions,
            "every session counted",
        )
        .await?;
    let per_session =
        open.rss_bytes.saturating_sub(before.rss_bytes) as f64 / options.sessions as f64;

    let healthz = healthz_latencies(&daemon_view, options.probes).await?;
    let pushed_in = push_to_all(options, auth, &daemon_view, coupon, &received).await?;

    for reader in &readers {
        reader.abort();
    }
    drop(readers);
    let closed = daemon_view
        .when(|reading| reading.sessions == 0, "every session gone")
        .await?;
    let closed_at = Instant::now();
    actix_rt::time::sleep_until((closed_at + RETURN_WINDOW).into()).await;
    let later = daemon_view.reading().await?;
    let sessions_memory = open.rss_bytes.saturating_sub(before.rss_bytes) as f64;
    let returned = open.rss_bytes.saturating_sub(later.rss_bytes) as f64 / sessions_memory;

    let mib = |bytes: u64| Cell::number(bytes as f64 / (1024.0 * 1024.0), 1);
    let mut table = Table::new(
        "Idle push sessions",
        vec![
            Column::right("sessions", "sessions"),
            Column::right("opened in (s)", "openedSeconds"),
            Column::right("RSS before (MiB)", "rssBeforeMiB"),
            Column::right("RSS open (MiB)", "rssOpenMiB"),
            Column::right("per session (KiB)", "perSessionKiB"),
            Column::right("/healthz p50 (ms)", "healthzP50Ms"),
            Column::right("/healthz p99 (ms)", "healthzP99Ms"),
            Column::right("one message to all (ms)", "pushAllMs"),
            Column::right("RSS closed (MiB)", "rssClosedMiB"),
            Column::right("RSS 5 s later (MiB)", "rssLaterMiB"),
            Column::right("returned", "returnedShare"),
        ],
    );
    table.row(vec![
        Cell::count(options.sessions),
        Cell::number(opened_in.as_secs_f64(), 1),
        mib(before.rss_bytes),
        mib(open.rss_bytes),
        Cell::number(per_session / 1024.0, 2),
        Cell::number(nearest_rank(&healthz, 50.0), 2),
        Cell::number(nearest_rank(&healthz, 99.0), 2),
        Cell::number(pushed_in.as_secs_f64() * 1000.0, 0),
        mib(closed.rss_bytes),
        mib(later.rss_bytes),
        Cell::new(format!("{:.0} %", returned * 100.0), returned),
    ]);
    report.table(table);
    Ok(())
}

/// Refuses a count of sessions the descriptor limit cannot hold (here and in the daemon,
/// which inherits it).
fn check_descriptors(sessions: u64) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft_limit = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<u64>().ok());
    if let Some(limit) = soft_limit
        && sessions + OTHER_DESCRIPTORS > limit
    {
        bail!(
            "{sessions} sessions need about {} descriptors in this process and in the daemon; \
             the limit is {limit} (`ulimit -n`): raise it or ask for at most {} sessions",
            sessions + OTHER_DESCRIPTORS,
            limit - OTHER_DESCRIPTORS
        );
    }
    Ok(())
}

/// Opens the sessions; each reader counts the messages its session receives in `received`
/// and runs until aborted (which closes its socket).
async fn open_sessions(
    options: &Options,
    auth: &Authenticator,
    address: &str,
    received: &Rc<Counter<u64>>,
) -> anyhow::Result<Vec<actix_rt::task::JoinHandle<()>>> {
    let ws_address = address.replacen("http", "ws", 1);
    let client = awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .timeout(Duration::from_secs(60))
        .finish();
    let tokens: Vec<String> = (1..=options.users)
        .map(|user| load::token(auth, user, false))
        .collect();
    let bar = progress::counting("opening sessions", options.sessions);
    let sockets = futures::stream::iter(0..options.sessions)
        .map(|session| {
            let user = 1 + session % options.users;
            let request = client
                .ws(format!("{ws_address}/ws?userId={user}"))
                .bearer_auth(&tokens[(user - 1) as usize]);
            async move { request.connect().await }
        })
        .buffer_unordered(options.concurrency.max(1));
    futures::pin_mut!(sockets);
    let mut readers = Vec::with_capacity(options.sessions as usize);
    while let Some(connected) = sockets.next().await {
        let (_, mut socket) = connected.map_err(|error| anyhow::anyhow!("websocket: {error}"))?;
        let received = received.clone();
        readers.push(actix_rt::spawn(async move {
            while let Some(Ok(frame)) = socket.next().await {
                if let Frame::Text(_) = frame {
                    received.set(received.get() + 1);
                }
            }
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(readers)
}

/// `/healthz`, `probes` times one after another; each latency in milliseconds, sorted.
async fn healthz_latencies(daemon: &DaemonView, probes: usize) -> anyhow::Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(probes);
    for _ in 0..probes {
        let started = Instant::now();
        let mut response = daemon
            .client
            .get(format!("{}/healthz", daemon.address))
            .send()
            .await
            .map_err(|error| anyhow::anyhow!("healthz: {error}"))?;
        if !response.status().is_success() {
            bail!("healthz: {}", refusal(&mut response).await);
        }
        let _ = response.body().await;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// Every user asks once for `coupon`; how long until every session has its user's result.
async fn push_to_all(
    options: &Options,
    auth: &Authenticator,
    daemon: &DaemonView,
    coupon: u64,
    received: &Rc<Counter<u64>>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let asked = futures::stream::iter(1..=options.users)
        .map(|user| {
            let request = daemon
                .client
                .post(format!("{}/coupons/issue", daemon.address))
                .bearer_auth(load::token(auth, user, false));
            async move {
                let mut response = request
                    .send_json(&json!({"userId": user, "couponId": coupon}))
                    .await
                    .map_err(|error| anyhow::anyhow!("issue: {error}"))?;
                if response.status().as_u16() != 202 {
                    bail!("issue: {}", refusal(&mut response).await);
                }
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<anyhow::Result<()>>>()
        .await;
    asked.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let deadline = started + Duration::from_secs(120);
    while received.get() < options.sessions {
        if Instant::now() > deadline {
            bail!(
                "{} of {} sessions received their result in 120 s",
                received.get(),
                options.sessions
            );
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

async fn create_coupon(daemon: &DaemonView, stock: u64) -> anyhow::Result<u64> {
    let now = Utc::now();
    let mut response = daemon
        .client
        .post(format!("{}/coupons", daemon.address))
        .bearer_auth(&daemon.admin)
        .send_json(&json!({
            "name": "push sessions",
            "discountAmount": 1000,
            "totalQuantity": stock,
            "validFrom": now - chrono::Duration::hours(1),
            "validUntil": now + chrono::Duration::days(1),
        }))
        .await
        .map_err(|error| anyhow::anyhow!("create coupon: {error}"))?;
    if response.status().as_u16() != 201 {
        bail!("create coupon: {}", refusal(&mut response).await);
    }
    let created: Value = response.json().await?;
    created["couponId"].as_u64().context("a coupon id")
}

/// The daemon as this scenario watches it: its RSS and its push-session count.
struct DaemonView {
    client: awc::Client,
    address: String,
    admin: String,
    pid: u32,
}

impl DaemonView {
    async fn reading(&self) -> anyhow::Result<Reading> {
        let mut response = self
            .client
            .get(format!("{}/admin/actors", self.address))
            .bearer_auth(&self.admin)
            .send()
            .await
            .map_err(|error| anyhow::anyhow!("actors: {error}"))?;
        let tree: Value = response.json().limit(1 << 20).await?;
        let sessions = tree["pushSessions"]["sessions"]
            .as_u64()
            .context("the actor tree counts push sessions")?;
        Ok(Reading {
            rss_bytes: resident_bytes(self.pid)?,
            sessions,
        })
    }

    /// The first reading (every 50 ms, a minute at most) for which `done` holds.
    async fn when(&self, done: impl Fn(&Reading) -> bool, what: &str) -> anyhow::Result<Reading> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reading = self.reading().await?;
            if done(&reading) {
                return Ok(reading);
            }
            if Instant::now() > deadline {
                bail!(
                    "{what}: not within a minute ({} sessions)",
                    reading.sessions
                );
            }
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A process's resident set size, from `/proc/{pid}/status`.
fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("VmRSS in /proc/{pid}/status")?;
    Ok(kib * 1024)
}
