//! Scenario `coupons`: the coupon flow end to end through the daemon binary, started as its
//! own process (its own database, the embedded Kafka cluster), driven over HTTP and
//! WebSocket from this process like a client would.
//!
//! 1. The hot-row limit: one connection updating one row with a conditional decrement in
//!    autocommit, as fast as it can.
//! 2. Intake: `clients` concurrent clients send issue requests for one hot coupon (distinct
//!    users, ample stock) for `seconds`, everything running; accepted requests/s is counted
//!    by the clients, and the run waits until every accepted request holds its coupon.
//! 3. Issuance: with the CouponIssuer's consumer group paused, `backlog` requests for another
//!    hot coupon are accepted; then the group is resumed and issued coupons/s is the backlog
//!    over the time until the last one is issued.
//! 4. Push latency: `latency-rate` requests/s for `latency-seconds` from 200 users with an
//!    open WebSocket (the per-user issue limit lifted; each round of users asks for a
//!    coupon of its own); the time from sending a request to receiving its result.
//! 5. Invariants: no coupon over-issued, no user holding one coupon twice, every request
//!    decided.
//!
//! Phases 2–4 also report their costs per unit of work as counts (see [`crate::costs`]).
//!
//! From the intake on, a sampler records the requests accepted and the coupons issued every
//! 500 ms; with the push latencies they make the chart written to `--chart` (see
//! [`crate::chart`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use commerce_events::common::connections;
use commerce_events::config::Settings;
use commerce_events::events::EventId;
use commerce_events::guards::tokens::Authenticator;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::MySqlPool;
use testkit::process::{Daemon, DaemonCommand};

use crate::chart::{self, Chart, Push, Sample, Sampler, Timeline};
use crate::costs::{CostTable, Meters};
use crate::load;
use crate::progress;
use crate::report::{self, Cell, Column, Report, Table};

#[derive(clap::Args)]
pub struct Options {
    /// How long the intake phase sends requests.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Requests written while the issuer is paused, then issued from the backlog.
    #[arg(long, default_value_t = 150_000)]
    pub backlog: u64,
    /// Coupons the backlog asks for, round robin (1: one hot coupon).
    #[arg(long, default_value_t = 1)]
    pub backlog_coupons: u64,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 1024)]
    pub clients: usize,
    /// Requests per second of the push-latency phase.
    #[arg(long, default_value_t = 2_000)]
    pub latency_rate: u64,
    /// How long the push-latency phase runs.
    #[arg(long, default_value_t = 20)]
    pub latency_seconds: u64,
    /// How long the `/healthz` baseline runs.
    #[arg(long, default_value_t = 10)]
    pub baseline_seconds: u64,
    /// Earlier requests written to the database before the phases (decided and notified,
    /// with their coupon histories), to show a request's cost does not grow with them.
    #[arg(long, default_value_t = 0)]
    pub history: u64,
    /// Where the chart of the run is written (a PNG; its directories are created).
    #[arg(long, default_value = "target/bench/coupons.png")]
    pub chart: PathBuf,
}

pub async fn run(options: Options, report: &mut Report) -> anyhow::Result<()> {
    let database = format!("bench_coupons_{}", std::process::id());
    let database_url = format!("mysql://root@127.0.0.1:3306/{database}");
    // The daemon's own configuration (defaults, file, APP_ variables), with a bench database
    // and key prefix, and tokens the bench signs; the push-latency phase's users send many
    // requests each, so no per-user limit.
    let mut settings = Settings::load()?;
    settings.database.url = SecretString::from(database_url.clone());
    settings.redis.key_prefix = format!("{database}:");
    settings.auth.jwt_secret = SecretString::from(JWT_SECRET);
    let overrides = [
        ("APP_DATABASE__URL", database_url.clone()),
        ("APP_REDIS__KEY_PREFIX", settings.redis.key_prefix.clone()),
        ("APP_INSTANCE__ID", "bench".to_string()),
        ("APP_AUTH__JWT_SECRET", JWT_SECRET.to_string()),
        (
            "APP_LIMITS__COUPON_ISSUE__PER_SECOND",
            "1000000".to_string(),
        ),
        ("APP_LIMITS__COUPON_ISSUE__BURST", "1000000".to_string()),
    ];
    if report.json() {
        // Stdout carries the JSON document alone.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _already_installed = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }

    let auth = Authenticator::from_settings(&settings.auth, &settings.kafka)?;
    let daemon = start_daemon(&overrides)?;
    let api = Api::new(&daemon.address, 64, auth.clone());
    daemon.wait_until_ready().await?;
    let pool = connections::connect_mysql(&settings.database, 4).await?;
    // Issue requests need existing users: every id each phase draws from.
    let users = progress::waiting("creating users", || {
        "app_user rows for every phase".to_string()
    });
    for (first, last) in [
        (1, 3_000_000),
        (BACKLOG_FIRST_USER, BACKLOG_FIRST_USER + options.backlog),
        (
            LATENCY_FIRST_USER,
            LATENCY_FIRST_USER + latency_users(options.latency_rate),
        ),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT IGNORE INTO app_user (user_id, name) SELECT seq, 'bench' FROM seq_{first}_to_{last}"
        )))
        .execute(&pool)
        .await?;
    }
    users.finish();
    if options.history > 0 {
        earlier_requests(&pool, options.history).await?;
    }
    let meters = Meters::of_daemon(pool.clone(), &settings, &daemon).await?;
    let mut costs = CostTable::new();
    report.note(format!(
        "scenario coupons: the daemon binary as its own process, driven from the bench's process \
         ({} HTTP workers, {} partition threads, {} intake writers, embedded Kafka with {} brokers), \
         {} earlier requests in the database, {} clients for {} s, push latency at {} req/s for {} s",
        settings.http.workers,
        settings.kafka.consumer.partition_threads,
        settings.coupons.intake_writers,
        settings.kafka.embedded_brokers,
        options.history,
        options.clients,
        options.seconds,
        options.latency_rate,
        options.latency_seconds
    ));

    let baseline = hot_row_updates(&pool, Duration::from_secs(options.baseline_seconds)).await?;
    report.note(format!(
        "hot-row baseline: {baseline:.0} conditional updates/s"
    ));

    let hot_coupon = api.create_coupon(10_000_000).await?;
    // The load gets its own client: after the load its idle connections are closed by the
    // server, and a client reusing them would fail.
    let load = api.another(options.clients);
    let mut timeline = Timeline::start();
    let sampler = Sampler::start(pool.clone(), api.accepted.clone(), timeline.started());
    let before = meters.read().await?;
    let intake = closed_loop_intake(
        &load,
        &api,
        hot_coupon,
        options.clients,
        Duration::from_secs(options.seconds),
        &mut timeline,
    )
    .await?;
    meters.wait_settled().await?;
    costs.add(
        "intake and issuance together",
        "accepted request",
        intake.accepted,
        before.until(&meters.read().await?),
    );
    report.note(format!(
        "intake: {} accepted in {:.1} s ({:.0}/s), {} refused",
        intake.accepted,
        intake.elapsed.as_secs_f64(),
        intake.accepted as f64 / intake.elapsed.as_secs_f64(),
        intake.errors
    ));
    let issuance = measure_issuance(
        &api,
        &load,
        &settings
            .kafka
            .group_id(commerce_events::startup::COUPON_REQUEST_GROUP),
        options.clients,
        options.backlog,
        options.backlog_coupons,
        &mut timeline,
        (&meters, &mut costs),
    )
    .await?;
    report.note(format!(
        "issuance: a backlog of {} issued at {:.0}/s",
        issuance.issued, issuance.per_second
    ));

    // A user asks once per coupon (a second request is answered with the first): a coupon
    // for each round of the users.
    let rounds = (options.latency_rate * options.latency_seconds)
        .div_ceil(latency_users(options.latency_rate))
        + 1;
    let mut latency_coupons = Vec::new();
    for _ in 0..rounds {
        latency_coupons.push(api.create_coupon(10_000_000).await?);
    }
    let before = meters.read().await?;
    let pushes = push_latency(
        &api,
        &latency_coupons,
        options.latency_rate,
        Duration::from_secs(options.latency_seconds),
        &mut timeline,
    )
    .await?;
    meters.wait_settled().await?;
    costs.add(
        format!("push latency at {} req/s", options.latency_rate),
        "request",
        pushes.len() as u64,
        before.until(&meters.read().await?),
    );
    let samples = sampler.finish().await?;
    write_chart(&options.chart, &samples, &timeline, &pushes, report)?;
    let latency = Latencies::of(pushes.iter().map(|push| push.latency_ms));

    let stages = stage_latencies(&pool, &latency_coupons).await?;
    let invariants = check_invariants(&pool).await?;

    let mut table = Table::new(
        "coupon flow",
        vec![
            Column::left("measure", "measure"),
            Column::right("value", "value"),
            Column::left("goal", "goal"),
        ],
    );
    let accepted_per_second = intake.accepted as f64 / intake.elapsed.as_secs_f64();
    table.row(vec![
        Cell::text(format!(
            "accepted requests/s over {} s ({} clients)",
            options.seconds, options.clients
        )),
        Cell::number(accepted_per_second, 0),
        Cell::text("≥ 10,000"),
    ]);
    table.row(vec![
        Cell::text("202 latency p50 / p99 under that load"),
        p50_p99(&intake.latency),
        Cell::empty(),
    ]);
    table.row(vec![
        Cell::text("… issued/s while accepting, one hot coupon (everything running)"),
        Cell::number(intake.issuance.per_second, 0),
        Cell::empty(),
    ]);
    table.row(vec![
        Cell::text(format!(
            "coupons issued/s, {} (a backlog of {})",
            coupons_named(options.backlog_coupons),
            issuance.issued
        )),
        Cell::number(issuance.per_second, 0),
        Cell::text("≥ 5,000"),
    ]);
    table.row(vec![
        Cell::text("hot-row limit: single-row conditional UPDATE, autocommit loop"),
        Cell::new(format!("{baseline:.0}/s"), report::number(baseline)),
        Cell::empty(),
    ]);
    let ratio = issuance.per_second / baseline;
    table.row(vec![
        Cell::text("issued/s ÷ hot-row limit"),
        Cell::new(format!("{ratio:.1}×"), report::number(ratio)),
        Cell::text("≥ 2×"),
    ]);
    let (p50, p99, max) = (
        latency.percentile(50.0),
        latency.percentile(99.0),
        latency.percentile(100.0),
    );
    table.row(vec![
        Cell::text(format!(
            "request → push latency p50 / p99 / max at {} req/s ({} pushes)",
            options.latency_rate,
            latency.count()
        )),
        Cell::new(
            format!("{p50:.1} ms / {p99:.1} ms / {max:.1} ms"),
            json!({
                "p50_ms": report::number(p50),
                "p99_ms": report::number(p99),
                "max_ms": report::number(max),
            }),
        ),
        Cell::text("p99 ≤ 100 ms"),
    ]);
    table.row(vec![
        Cell::text("… of which accepted → decided (issuer commit) p50 / p99"),
        p50_p99(&stages.decided),
        Cell::empty(),
    ]);
    table.row(vec![
        Cell::text("… of which decided → notified (notifier commit) p50 / p99"),
        p50_p99(&stages.notified),
        Cell::empty(),
    ]);
    table.row(vec![
        Cell::text("over-issued coupons / users holding one coupon twice / requests not decided"),
        Cell::new(
            format!(
                "{} / {} / {}",
                invariants.over_issued, invariants.duplicates, invariants.undecided
            ),
            json!({
                "over_issued": invariants.over_issued,
                "duplicates": invariants.duplicates,
                "undecided": invariants.undecided,
            }),
        ),
        Cell::text("0 / 0 / 0"),
    ]);
    report.table(table);
    report.table(costs.table("costs per unit of work"));

    pool.close().await;
    daemon.stop().await?;
    drop_database(&database).await?;
    if invariants.over_issued + invariants.duplicates + invariants.undecided > 0 {
        bail!("invariants violated");
    }
    Ok(())
}

/// Writes `count` earlier requests for one earlier coupon, as the daemon leaves them once
/// settled: the request's row NOTIFIED with its claim and its decision (the coupon history's
/// id and the result's event id), and the coupon history. Their ids sort before every id the daemon makes (ids are
/// time-ordered), and the reconciler's checkpoints are moved past them, as passes over them
/// would have done.
async fn earlier_requests(pool: &MySqlPool, count: u64) -> anyhow::Result<()> {
    const FIRST_USER: u64 = 3_000_001;
    let bar = progress::waiting("writing earlier requests", move || {
        format!("{count} decided requests")
    });
    let coupon: u64 = sqlx::query(
        "INSERT INTO coupon (name, discount_amount, total_quantity, issued_quantity, valid_from, valid_until) \
         VALUES ('earlier', 1000, ?, ?, NOW(6) - INTERVAL 2 DAY, NOW(6) - INTERVAL 1 DAY)",
    )
    .bind(count)
    .bind(count)
    .execute(pool)
    .await?
    .last_insert_id();
    let last = FIRST_USER + count - 1;
    // Request ids 00000000-…, their results' ids 00000001-…: before any id of today. The
    // checkpoints first, so that no pass walks the rows while they are written.
    let request_id = "CONCAT('00000000-0000-7000-8000-', LPAD(HEX(seq), 12, '0'))";
    let result_id = "CONCAT('00000001-0000-7000-8000-', LPAD(HEX(seq), 12, '0'))";
    let last_request_id = format!("00000000-0000-7000-8000-{last:012X}");
    for statement in [
        "INSERT IGNORE INTO reconcile_checkpoint (consumer, event_id) \
         VALUES ('CouponIssuer', ''), ('ResultNotifier', '')"
            .to_string(),
        format!(
            "UPDATE reconcile_checkpoint SET event_id = GREATEST(event_id, '{last_request_id}')"
        ),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await?;
    }
    // In chunks: one statement for a million rows would exceed the lock table of a small
    // buffer pool. The histories first: each request's row records its decision with its
    // coupon history's id (and its result's event id), as the issuer writes it.
    const CHUNK: u64 = 50_000;
    let mut first = FIRST_USER;
    while first <= last {
        let until = (first + CHUNK - 1).min(last);
        let seq = format!("seq_{first}_to_{until}");
        for statement in [
            format!(
                "INSERT INTO coupon_history (coupon_id, user_id, request_id, status, issued_at) \
                 SELECT {coupon}, seq, {request_id}, 'ISSUED', NOW(6) - INTERVAL 1 DAY FROM {seq}"
            ),
            format!(
                "INSERT INTO event_log (event_id, event_type, topic, event_key, coupon_claim, \
                   payload, status, result, occurred_at, published_at) \
                 SELECT {request_id}, 'CouponRequested', 'coupon-requests', CONCAT('user:', seq), \
                   CONCAT({coupon}, '/', seq), JSON_OBJECT('userId', seq, 'couponId', {coupon}), 'NOTIFIED', \
                   JSON_OBJECT('resultEventId', {result_id}, 'couponHistoryId', h.coupon_history_id), \
                   NOW(6) - INTERVAL 1 DAY, NOW(6) - INTERVAL 1 DAY \
                 FROM {seq} JOIN coupon_history h ON h.request_id = {request_id}"
            ),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(pool)
                .await?;
        }
        first = until + 1;
    }
    sqlx::raw_sql("ANALYZE TABLE event_log, coupon_history")
        .execute(pool)
        .await?;
    bar.finish();
    Ok(())
}

/// `p50 ms / p99 ms` of a latency histogram; `{"p50_ms", "p99_ms"}` in JSON.
fn p50_p99(latency: &Latencies) -> Cell {
    let (p50, p99) = (latency.percentile(50.0), latency.percentile(99.0));
    Cell::new(
        format!("{p50:.1} ms / {p99:.1} ms"),
        json!({"p50_ms": report::number(p50), "p99_ms": report::number(p99)}),
    )
}

/// Writes the chart of the run to `path` and notes where; without a font, notes which to
/// install.
fn write_chart(
    path: &Path,
    samples: &[Sample],
    timeline: &Timeline,
    pushes: &[Push],
    report: &mut Report,
) -> anyhow::Result<()> {
    let font = chart::register_font();
    let data = Chart {
        samples,
        phases: timeline.phases(),
        pushes,
    };
    chart::draw(path, &data, font.is_some())?;
    report.note(format!("chart: {}", path.display()));
    if font.is_none() {
        report.note(
            "chart drawn without text: no TrueType font found (set BENCH_FONT, or \
             apt-get install fonts-dejavu-core)",
        );
    }
    Ok(())
}

/// The daemon binary (`commerce-events`, beside the bench's), run as its own process so the
/// bench's clients neither flatter nor starve it by sharing its runtime, and so its CPU time
/// is its own: its own configuration (defaults, file, `APP_` variables) with `overrides` on
/// top, logging its warnings (passed on to stderr) and the line that names its address.
pub(crate) fn start_daemon(overrides: &[(&str, String)]) -> anyhow::Result<Daemon> {
    let mut command = DaemonCommand::beside_this_executable()?
        .env("APP_LOG__FILTER", "warn,commerce_events::startup=info")
        .echoing_warnings();
    for (name, value) in overrides {
        command = command.env(*name, value.as_str());
    }
    command.start()
}

/// The first user id of the backlog phase and of the push-latency phase (the intake's
/// users count from 1).
const BACKLOG_FIRST_USER: u64 = 2_000_000_000;
const LATENCY_FIRST_USER: u64 = 1_000_000_000;

/// How often a backlog request is sent before its user is given up.
const BACKLOG_ATTEMPTS: u32 = 20;

/// The tokens' secret of the bench's daemon.
const JWT_SECRET: &str = "bench-secret-of-the-coupon-scenario";

/// The push-latency phase's users, each with an open WebSocket (the bench lifts the
/// per-user issue limit, so each may send `rate` ÷ 200 requests/s).
fn latency_users(_rate: u64) -> u64 {
    200
}

/// The daemon's HTTP API as the bench's clients use it.
#[derive(Clone)]
struct Api {
    client: awc::Client,
    address: String,
    auth: Authenticator,
    admin: String,
    /// Issue requests accepted (202) so far, by this client and every one made with
    /// [`Api::another`].
    accepted: Rc<std::cell::Cell<u64>>,
}

impl Api {
    fn new(address: &str, connections: usize, auth: Authenticator) -> Self {
        let admin = Self::token_of(&auth, 1, true);
        Self {
            client: Self::client(connections),
            address: address.to_string(),
            auth,
            admin,
            accepted: Rc::default(),
        }
    }

    /// The same API through a client of its own with `connections` connections, counting
    /// its accepted requests with this one's.
    fn another(&self, connections: usize) -> Self {
        Self {
            client: Self::client(connections),
            ..self.clone()
        }
    }

    fn client(connections: usize) -> awc::Client {
        awc::Client::builder()
            .connector(awc::Connector::new().limit(connections + 256))
            .timeout(Duration::from_secs(60))
            .finish()
    }

    fn count_accepted(&self) {
        self.accepted.set(self.accepted.get() + 1);
    }

    fn token_of(auth: &Authenticator, user: u64, admin: bool) -> String {
        load::token(auth, user, admin)
    }

    /// A user's token (signed per request, as a client with many users would).
    fn token(&self, user: u64) -> String {
        Self::token_of(&self.auth, user, false)
    }

    async fn create_coupon(&self, total_quantity: u32) -> anyhow::Result<u64> {
        let now = Utc::now();
        let body = json!({
            "name": "bench",
            "discountAmount": 1000,
            "totalQuantity": total_quantity,
            "validFrom": now - chrono::Duration::hours(1),
            "validUntil": now + chrono::Duration::days(1),
        });
        let mut response = self
            .client
            .post(format!("{}/coupons", self.address))
            .bearer_auth(&self.admin)
            .send_json(&body)
            .await
            .map_err(|error| anyhow::anyhow!("create coupon: {error}"))?;
        let created: Value = response.json().await?;
        created["couponId"].as_u64().context("a coupon id")
    }

    async fn admin(&self, path: &str) -> anyhow::Result<()> {
        let response = self
            .client
            .post(format!("{}{path}", self.address))
            .bearer_auth(&self.admin)
            .send()
            .await
            .map_err(|error| anyhow::anyhow!("{path}: {error}"))?;
        if !response.status().is_success() {
            bail!("{path}: {}", response.status());
        }
        Ok(())
    }

    /// Sends an issue request; `Ok` when it was accepted (202), else what went wrong (the
    /// load's lean path: no JSON is built or parsed on this side).
    async fn issue_accepted(&self, user_id: u64, coupon_id: u64) -> Result<(), String> {
        let sent = self
            .client
            .post(format!("{}/coupons/issue", self.address))
            .bearer_auth(self.token(user_id))
            .insert_header(("content-type", "application/json"))
            .send_body(format!(r#"{{"userId":{user_id},"couponId":{coupon_id}}}"#))
            .await;
        match sent {
            Ok(mut response) if response.status().as_u16() == 202 => {
                self.count_accepted();
                // Accepted whatever becomes of reading the answer.
                let _ = response.body().await;
                Ok(())
            }
            Ok(mut response) => Err(load::refusal(&mut response).await),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Sends an issue request; returns its request id when accepted.
    async fn issue(&self, user_id: u64, coupon_id: u64) -> Option<String> {
        let mut response = self
            .client
            .post(format!("{}/coupons/issue", self.address))
            .bearer_auth(self.token(user_id))
            .send_json(&json!({"userId": user_id, "couponId": coupon_id}))
            .await
            .ok()?;
        if response.status().as_u16() != 202 {
            return None;
        }
        self.count_accepted();
        let accepted: Value = response.json().await.ok()?;
        accepted["requestId"].as_str().map(str::to_string)
    }

    /// Reads the coupon's issued quantity; a pooled connection the server closed for idling
    /// is retried.
    /// The coupons' issued quantities summed.
    async fn issued_total(&self, coupon_ids: &[u64]) -> anyhow::Result<u64> {
        let mut total = 0;
        for coupon_id in coupon_ids {
            total += self.issued_quantity(*coupon_id).await?;
        }
        Ok(total)
    }

    async fn issued_quantity(&self, coupon_id: u64) -> anyhow::Result<u64> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let read = async {
                let mut response = self
                    .client
                    .get(format!("{}/coupons/{coupon_id}", self.address))
                    .bearer_auth(&self.admin)
                    .send()
                    .await
                    .map_err(|error| anyhow::anyhow!("read coupon: {error}"))?;
                let coupon: Value = response.json().await?;
                coupon["issuedQuantity"].as_u64().context("issuedQuantity")
            };
            match read.await {
                Err(_) if attempt < 3 => continue,
                read => return read,
            }
        }
    }
}

/// "one hot coupon", or "N coupons".
fn coupons_named(count: u64) -> String {
    match count {
        0 | 1 => "one hot coupon".to_string(),
        count => format!("{count} coupons"),
    }
}

/// Pauses the issuer's group, has `backlog` requests accepted for `coupons` fresh coupons
/// (round robin over the users), resumes the group and times the issuing of the backlog.
#[allow(clippy::too_many_arguments)]
async fn measure_issuance(
    control: &Api,
    load: &Api,
    issuer_group: &str,
    clients: usize,
    backlog: u64,
    coupons: u64,
    timeline: &mut Timeline,
    (meters, costs): (&Meters, &mut CostTable),
) -> anyhow::Result<Issuance> {
    let mut coupon_ids = Vec::new();
    for _ in 0..coupons.max(1) {
        coupon_ids.push(control.create_coupon(10_000_000).await?);
    }
    let coupon_ids = Rc::new(coupon_ids);
    let before_writing = meters.read().await?;
    control
        .admin(&format!("/admin/consumer-groups/{issuer_group}/pause"))
        .await?;
    let next_user = Rc::new(AtomicU64::new(BACKLOG_FIRST_USER));
    let remaining = Rc::new(AtomicU64::new(backlog));
    let failures = Rc::new(AtomicU64::new(0));
    let abandoned = Rc::new(AtomicU64::new(0));
    let writing = Instant::now();
    let bar = progress::counting("backlog write", backlog);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (load, next_user, remaining, failures, abandoned, bar, coupon_ids) = (
                load.clone(),
                next_user.clone(),
                remaining.clone(),
                failures.clone(),
                abandoned.clone(),
                bar.clone(),
                coupon_ids.clone(),
            );
            actix_rt::spawn(async move {
                while remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        left.checked_sub(1)
                    })
                    .is_ok()
                {
                    // A request that failed is sent again for the same user: a repeat is
                    // answered with the first request, so nothing is counted twice.
                    let user = next_user.fetch_add(1, Ordering::Relaxed);
                    let coupon_id = coupon_ids[(user % coupon_ids.len() as u64) as usize];
                    let mut attempts = 0;
                    let accepted = loop {
                        let Err(error) = load.issue_accepted(user, coupon_id).await else {
                            break true;
                        };
                        attempts += 1;
                        if attempts == 1 && failures.fetch_add(1, Ordering::Relaxed) < 3 {
                            bar.suspend(|| eprintln!("backlog request of user {user}: {error}"));
                        }
                        if attempts == BACKLOG_ATTEMPTS {
                            break false;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    if accepted {
                        bar.inc(1);
                    } else {
                        abandoned.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    bar.finish_and_clear();
    timeline.phase("backlog write", writing, Instant::now());
    let abandoned = abandoned.load(Ordering::Relaxed);
    if abandoned > backlog / 100 {
        bail!("{abandoned} of {backlog} backlog requests were never accepted");
    }
    // The users whose requests were never accepted are not waited for.
    let backlog = backlog - abandoned;
    if control.issued_total(&coupon_ids).await? != 0 {
        bail!("the issuer consumed while paused");
    }
    let before_issuing = meters.read().await?;
    costs.add(
        "intake alone (issuer paused)",
        "accepted request",
        backlog,
        before_writing.until(&before_issuing),
    );
    control
        .admin(&format!("/admin/consumer-groups/{issuer_group}/resume"))
        .await?;
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(600);
    let bar = progress::counting("backlog issuance", backlog);
    loop {
        let issued = control.issued_total(&coupon_ids).await?;
        bar.set_position(issued.min(backlog));
        if issued >= backlog {
            bar.finish_and_clear();
            let done = Instant::now();
            timeline.phase("backlog issuance", resumed, done);
            meters.wait_settled().await?;
            costs.add(
                "issuance alone (from the backlog)",
                "issued coupon",
                issued,
                before_issuing.until(&meters.read().await?),
            );
            return Ok(Issuance {
                issued,
                per_second: issued as f64 / done.duration_since(resumed).as_secs_f64(),
            });
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            bail!("only {issued} of a backlog of {backlog} issued");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hot_row_updates(pool: &MySqlPool, duration: Duration) -> anyhow::Result<f64> {
    sqlx::query("CREATE TABLE bench_hot_row (id INT PRIMARY KEY, remaining INT NOT NULL)")
        .execute(pool)
        .await?;
    sqlx::query("INSERT INTO bench_hot_row VALUES (1, 2000000000)")
        .execute(pool)
        .await?;
    let mut connection = pool.acquire().await?;
    let updates = Rc::new(std::cell::Cell::new(0u64));
    let bar = progress::timed("hot-row baseline", duration, {
        let updates = updates.clone();
        move || format!("{} updates", updates.get())
    });
    let started = Instant::now();
    while started.elapsed() < duration {
        let updated = sqlx::query(
            "UPDATE bench_hot_row SET remaining = remaining - 1 WHERE id = 1 AND remaining > 0",
        )
        .execute(&mut *connection)
        .await?;
        updates.set(updates.get() + updated.rows_affected());
    }
    bar.finish();
    Ok(updates.get() as f64 / started.elapsed().as_secs_f64())
}

struct IntakeRun {
    accepted: u64,
    errors: u64,
    elapsed: Duration,
    latency: Latencies,
    issuance: Issuance,
}

struct Issuance {
    issued: u64,
    per_second: f64,
}

/// `clients` clients, each sending its next request as soon as the previous is answered;
/// `control` follows the coupon's issued quantity meanwhile.
async fn closed_loop_intake(
    api: &Api,
    control: &Api,
    coupon_id: u64,
    clients: usize,
    duration: Duration,
    timeline: &mut Timeline,
) -> anyhow::Result<IntakeRun> {
    let next_user = Rc::new(AtomicU64::new(1));
    let accepted = Rc::new(AtomicU64::new(0));
    let errors = Rc::new(AtomicU64::new(0));
    let latencies = Rc::new(RefCell::new(Latencies::default()));
    let started = Instant::now();
    let deadline = started + duration;
    let bar = progress::timed("intake", duration, {
        let (accepted, errors) = (accepted.clone(), errors.clone());
        move || {
            format!(
                "{} accepted, {} refused",
                accepted.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed)
            )
        }
    });

    // Issuance is followed from the coupon's issued quantity while the load runs.
    let watcher = {
        let api = control.clone();
        actix_rt::spawn(async move {
            let mut samples: Vec<(Instant, u64)> = Vec::new();
            loop {
                if let Ok(issued) = api.issued_quantity(coupon_id).await {
                    samples.push((Instant::now(), issued));
                }
                if Instant::now() > deadline {
                    return samples;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (api, next_user, accepted, errors, latencies) = (
                api.clone(),
                next_user.clone(),
                accepted.clone(),
                errors.clone(),
                latencies.clone(),
            );
            actix_rt::spawn(async move {
                while Instant::now() < deadline {
                    let user = next_user.fetch_add(1, Ordering::Relaxed);
                    let sent = Instant::now();
                    match api.issue_accepted(user, coupon_id).await {
                        Ok(()) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            latencies.borrow_mut().record(sent.elapsed());
                        }
                        Err(error) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("intake request of user {user}: {error}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let ended = Instant::now();
    bar.finish();
    timeline.phase("intake", started, ended);
    let accepted = accepted.load(Ordering::Relaxed);
    let mut samples = watcher.await?;

    // Every accepted request is from a distinct user with ample stock: each must end with a
    // coupon. Follow the issued quantity until it gets there.
    let drain_deadline = Instant::now() + Duration::from_secs(600);
    let bar = progress::counting("drain", accepted).with_message("issued of the accepted");
    loop {
        let issued = control.issued_quantity(coupon_id).await?;
        samples.push((Instant::now(), issued));
        bar.set_position(issued.min(accepted));
        if issued >= accepted {
            break;
        }
        if Instant::now() > drain_deadline {
            bar.finish_and_clear();
            bail!("only {issued} of {accepted} accepted requests were issued");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    timeline.phase("drain", ended, Instant::now());
    // From the last sample that saw nothing issued yet (conservative by up to one sampling
    // interval) to the sample that saw everything issued.
    let issuing_from = samples
        .iter()
        .take_while(|(_, issued)| *issued == 0)
        .last()
        .map(|(at, _)| *at)
        .unwrap_or(started);
    let (done, issued) = samples.last().copied().unwrap_or((started, 0));
    let window = done.duration_since(issuing_from);
    let latency = latencies.borrow().clone();
    Ok(IntakeRun {
        accepted,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latency,
        issuance: Issuance {
            issued,
            per_second: issued as f64 / window.as_secs_f64(),
        },
    })
}

/// Requests at a fixed rate from users with an open WebSocket; for each request, when it
/// was sent and the time from sending it to receiving its result on the socket, in the
/// order sent.
async fn push_latency(
    api: &Api,
    coupons: &[u64],
    rate: u64,
    duration: Duration,
    timeline: &mut Timeline,
) -> anyhow::Result<Vec<Push>> {
    let users = latency_users(rate);
    const FIRST_USER: u64 = LATENCY_FIRST_USER;
    let received = load::Arrivals::default();
    let ws_address = api.address.replace("http://", "ws://");
    let mut readers = Vec::new();
    for user in FIRST_USER..FIRST_USER + users {
        readers.push(
            load::read_results(&api.client, &ws_address, user, api.token(user), &received).await?,
        );
    }

    let sent: Rc<RefCell<HashMap<String, Instant>>> = Rc::default();
    let tick = Duration::from_millis(5);
    let per_tick = (rate as f64 * tick.as_secs_f64()).round().max(1.0) as u64;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let bar = progress::timed("push latency", duration, {
        let (sent, received) = (sent.clone(), received.clone());
        move || {
            format!(
                "{} accepted, {} pushed",
                sent.borrow().len(),
                received.borrow().len()
            )
        }
    });
    let mut requests = Vec::new();
    let mut next = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        for _ in 0..per_tick {
            let user = FIRST_USER + next % users;
            let coupon_id = coupons[((next / users) as usize).min(coupons.len() - 1)];
            next += 1;
            let (api, sent) = (api.clone(), sent.clone());
            requests.push(actix_rt::spawn(async move {
                let at = Instant::now();
                if let Some(request_id) = api.issue(user, coupon_id).await {
                    sent.borrow_mut().insert(request_id, at);
                }
            }));
        }
    }
    futures::future::join_all(requests).await;
    bar.finish();
    let expected = sent.borrow().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    let bar = progress::counting("pushes", expected as u64).with_message("received");
    loop {
        let pushed = received
            .borrow()
            .keys()
            .filter(|id| sent.borrow().contains_key(*id))
            .count();
        bar.set_position(pushed as u64);
        if pushed >= expected {
            break;
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            bail!("pushes missing after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();
    timeline.phase("push latency", started, Instant::now());
    for reader in readers {
        reader.abort();
    }
    let mut pushes: Vec<Push> = sent
        .borrow()
        .iter()
        .map(|(request_id, sent_at)| {
            let received_at = received.borrow()[request_id];
            Push {
                sent: timeline.seconds(*sent_at),
                latency_ms: received_at
                    .saturating_duration_since(*sent_at)
                    .as_secs_f64()
                    * 1000.0,
            }
        })
        .collect();
    pushes.sort_by(|a, b| a.sent.total_cmp(&b.sent));
    Ok(pushes)
}

/// Latencies in milliseconds.
#[derive(Clone, Default)]
struct Latencies {
    milliseconds: Vec<f64>,
}

impl Latencies {
    fn of(milliseconds: impl IntoIterator<Item = f64>) -> Self {
        Self {
            milliseconds: milliseconds.into_iter().collect(),
        }
    }

    fn record(&mut self, latency: Duration) {
        self.milliseconds.push(latency.as_secs_f64() * 1000.0);
    }

    fn count(&self) -> usize {
        self.milliseconds.len()
    }

    fn percentile(&self, percentile: f64) -> f64 {
        let mut sorted = self.milliseconds.clone();
        sorted.sort_by(f64::total_cmp);
        chart::nearest_rank(&sorted, percentile)
    }
}

struct Stages {
    decided: Latencies,
    notified: Latencies,
}

/// Where the push latency goes, from the request's row: its commit (`created_at`), the
/// decision (the millisecond of its result's event id, generated in the issuer's
/// transaction) and its last update (NOTIFIED, by the notifier).
async fn stage_latencies(pool: &MySqlPool, coupons: &[u64]) -> anyhow::Result<Stages> {
    type Row = (chrono::DateTime<Utc>, String, chrono::DateTime<Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT created_at, JSON_UNQUOTE(JSON_EXTRACT(result, '$.resultEventId')), updated_at \
         FROM event_log \
         WHERE event_type = 'CouponRequested' AND status = 'NOTIFIED' \
           AND JSON_EXTRACT(payload, '$.couponId') BETWEEN ? AND ?",
    )
    .bind(coupons.iter().min().copied().unwrap_or(0))
    .bind(coupons.iter().max().copied().unwrap_or(0))
    .fetch_all(pool)
    .await?;
    let mut stages = Stages {
        decided: Latencies::default(),
        notified: Latencies::default(),
    };
    for (accepted, result_id, notified) in rows {
        let Some(decided) = result_id
            .parse::<EventId>()
            .ok()
            .and_then(|id| id.generated_at())
        else {
            continue;
        };
        stages
            .decided
            .record((decided - accepted).to_std().unwrap_or_default());
        stages
            .notified
            .record((notified - decided).to_std().unwrap_or_default());
    }
    Ok(stages)
}

struct Invariants {
    over_issued: i64,
    duplicates: i64,
    undecided: i64,
}

async fn check_invariants(pool: &MySqlPool) -> anyhow::Result<Invariants> {
    let (over_issued,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM coupon_stock c WHERE c.issued_quantity > c.total_quantity \
         OR c.issued_quantity <> (SELECT COUNT(*) FROM coupon_history h WHERE h.coupon_id = c.coupon_id)",
    )
    .fetch_one(pool)
    .await?;
    let (duplicates,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM (SELECT coupon_id, user_id FROM coupon_history \
         GROUP BY coupon_id, user_id HAVING COUNT(*) > 1) AS twice",
    )
    .fetch_one(pool)
    .await?;
    let (undecided,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM event_log WHERE event_type = 'CouponRequested' \
         AND status NOT IN ('COMPLETED', 'FAILED', 'NOTIFIED')",
    )
    .fetch_one(pool)
    .await?;
    Ok(Invariants {
        over_issued,
        duplicates,
        undecided,
    })
}

pub(crate) async fn drop_database(database: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut connection = sqlx::MySqlConnection::connect("mysql://root@127.0.0.1:3306").await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS `{database}`"
    )))
    .execute(&mut connection)
    .await?;
    Ok(())
}
