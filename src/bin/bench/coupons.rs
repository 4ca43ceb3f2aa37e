//! Scenario `coupons`: the coupon flow end to end through a daemon started in this process
//! (its own thread and actix system, its own database, the embedded Kafka cluster), driven
//! over HTTP and WebSocket like a client would.
//!
//! 1. The hot-row limit: one connection updating one row with a conditional decrement in
//!    autocommit, as fast as it can.
//! 2. Intake: `clients` concurrent clients send issue requests for one hot coupon (distinct
//!    users, ample stock) for `seconds`, everything running; accepted requests/s is counted
//!    by the clients, and the run waits until every accepted request holds its coupon.
//! 3. Issuance: with the CouponIssuer's consumer group paused, `backlog` requests for another
//!    hot coupon are accepted; then the group is resumed and issued coupons/s is the backlog
//!    over the time until the last one is issued.
//! 4. Push latency: `latency-rate` requests/s for `latency-seconds` from users with an open
//!    WebSocket; the time from sending a request to receiving its result.
//! 5. Invariants: no coupon over-issued, no user holding one coupon twice, every request
//!    decided.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use awc::ws::Frame;
use chrono::Utc;
use commerce_events::auth::Authenticator;
use commerce_events::config::Settings;
use commerce_events::ids::UserId;
use commerce_events::startup::Application;
use commerce_events::stores;
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::MySqlPool;

#[derive(clap::Args)]
pub struct Options {
    /// How long the intake phase sends requests.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Requests written while the issuer is paused, then issued from the backlog.
    #[arg(long, default_value_t = 150_000)]
    pub backlog: u64,
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
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let database = format!("bench_coupons_{}", std::process::id());
    // The daemon's own configuration (defaults, file, APP_ variables) with a bench database.
    let mut settings = Settings::load()?;
    settings.http.port = 0;
    settings.database.url = SecretString::from(format!("mysql://root@127.0.0.1:3306/{database}"));
    settings.redis.key_prefix = format!("{database}:");
    settings.instance.id = "bench".into();
    settings.log.filter = "warn".into();
    commerce_events::telemetry::init(&settings.log);

    let auth = Authenticator::from_settings(&settings.auth, &settings.kafka)?;
    let daemon = Daemon::start(settings.clone())?;
    let api = Api::new(&daemon.address, 64, auth.clone());
    api.wait_until_ready().await?;
    let pool = stores::connect_mysql(&settings.database, 4).await?;
    // Issue requests need existing users: every id each phase draws from.
    for (first, last) in [
        (1, 3_000_000),
        (BACKLOG_FIRST_USER, BACKLOG_FIRST_USER + options.backlog),
        (LATENCY_FIRST_USER, LATENCY_FIRST_USER + LATENCY_USERS),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT IGNORE INTO app_user (user_id, name) SELECT seq, 'bench' FROM seq_{first}_to_{last}"
        )))
        .execute(&pool)
        .await?;
    }
    println!(
        "scenario coupons: daemon in this process ({} HTTP workers, {} partition threads, {} intake writers, \
         embedded Kafka with {} brokers), {} clients for {} s, push latency at {} req/s for {} s",
        settings.http.workers,
        settings.kafka.consumer.partition_threads,
        settings.coupons.intake_writers,
        settings.kafka.embedded_brokers,
        options.clients,
        options.seconds,
        options.latency_rate,
        options.latency_seconds
    );

    let baseline = hot_row_updates(&pool, Duration::from_secs(options.baseline_seconds)).await?;
    println!("hot-row baseline: {baseline:.0} conditional updates/s");

    let hot_coupon = api.create_coupon(10_000_000).await?;
    // The load gets its own client: after the load its idle connections are closed by the
    // server, and a client reusing them would fail.
    let load = Api::new(&daemon.address, options.clients, auth.clone());
    let intake = closed_loop_intake(
        &load,
        &api,
        hot_coupon,
        options.clients,
        Duration::from_secs(options.seconds),
    )
    .await?;
    println!(
        "intake: {} accepted in {:.1} s ({:.0}/s), {} refused",
        intake.accepted,
        intake.elapsed.as_secs_f64(),
        intake.accepted as f64 / intake.elapsed.as_secs_f64(),
        intake.errors
    );
    let issuance = measure_issuance(
        &api,
        &load,
        &settings
            .kafka
            .group_id(commerce_events::startup::COUPON_REQUEST_GROUP),
        options.clients,
        options.backlog,
    )
    .await?;
    println!(
        "issuance: a backlog of {} issued at {:.0}/s",
        issuance.issued, issuance.per_second
    );

    let latency_coupon = api.create_coupon(10_000_000).await?;
    let latency = push_latency(
        &api,
        latency_coupon,
        options.latency_rate,
        Duration::from_secs(options.latency_seconds),
    )
    .await?;

    let stages = stage_latencies(&pool, latency_coupon).await?;
    let invariants = check_invariants(&pool).await?;

    println!();
    println!("| measure | value | goal |");
    println!("|---|---:|---|");
    println!(
        "| accepted requests/s over {} s ({} clients) | {:.0} | ≥ 10,000 |",
        options.seconds,
        options.clients,
        intake.accepted as f64 / intake.elapsed.as_secs_f64()
    );
    println!(
        "| 202 latency p50 / p99 under that load | {} | |",
        p50_p99(&intake.latency)
    );
    println!(
        "| … issued/s while accepting, one hot coupon (everything running) | {:.0} | |",
        intake.issuance.per_second
    );
    println!(
        "| coupons issued/s, one hot coupon (a backlog of {}) | {:.0} | ≥ 5,000 |",
        issuance.issued, issuance.per_second
    );
    println!(
        "| hot-row limit: single-row conditional UPDATE, autocommit loop | {baseline:.0}/s | |"
    );
    println!(
        "| issued/s ÷ hot-row limit | {:.1}× | ≥ 2× |",
        issuance.per_second / baseline
    );
    println!(
        "| request → push latency p50 / p99 / max at {} req/s ({} pushes) | {:.1} ms / {:.1} ms / {:.1} ms | p99 ≤ 100 ms |",
        options.latency_rate,
        latency.count(),
        latency.percentile(50.0),
        latency.percentile(99.0),
        latency.percentile(100.0)
    );
    println!(
        "| … of which accepted → decided (issuer commit) p50 / p99 | {} | |",
        p50_p99(&stages.decided)
    );
    println!(
        "| … of which decided → notified (notifier commit) p50 / p99 | {} | |",
        p50_p99(&stages.notified)
    );
    println!(
        "| over-issued coupons / users holding one coupon twice / requests not decided | {} / {} / {} | 0 / 0 / 0 |",
        invariants.over_issued, invariants.duplicates, invariants.undecided
    );

    pool.close().await;
    daemon.stop().await?;
    drop_database(&database).await?;
    if invariants.over_issued + invariants.duplicates + invariants.undecided > 0 {
        bail!("invariants violated");
    }
    Ok(())
}

/// `p50 ms / p99 ms` of a latency histogram.
fn p50_p99(latency: &Latencies) -> String {
    format!(
        "{:.1} ms / {:.1} ms",
        latency.percentile(50.0),
        latency.percentile(99.0)
    )
}

/// The daemon on its own thread with its own actix system.
struct Daemon {
    address: String,
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    fn start(settings: Settings) -> anyhow::Result<Self> {
        let (port_sender, port) = std::sync::mpsc::channel();
        let (shutdown, shutdown_signal) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("daemon".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let application = Application::build(settings).await?;
                    port_sender.send(application.port())?;
                    application
                        .run_until_stopped(async move {
                            let _ = shutdown_signal.await;
                        })
                        .await
                })
            })?;
        let port = port
            .recv_timeout(Duration::from_secs(120))
            .context("the daemon did not start")?;
        Ok(Self {
            address: format!("http://127.0.0.1:{port}"),
            shutdown,
            thread,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the daemon thread panicked"))?
    }
}

/// The first user id of the backlog phase and of the push-latency phase (the intake's
/// users count from 1).
const BACKLOG_FIRST_USER: u64 = 2_000_000_000;
const LATENCY_FIRST_USER: u64 = 1_000_000_000;
const LATENCY_USERS: u64 = 200;

#[derive(Clone)]
struct Api {
    client: awc::Client,
    address: String,
    auth: Authenticator,
    admin: String,
}

impl Api {
    fn new(address: &str, connections: usize, auth: Authenticator) -> Self {
        let client = awc::Client::builder()
            .connector(awc::Connector::new().limit(connections + 256))
            .timeout(Duration::from_secs(60))
            .finish();
        let admin = Self::token_of(&auth, 1, true);
        Self {
            client,
            address: address.to_string(),
            auth,
            admin,
        }
    }

    fn token_of(auth: &Authenticator, user: u64, admin: bool) -> String {
        auth.mint(
            UserId::from_u64(user).expect("positive user ids"),
            admin,
            Duration::from_secs(86_400),
        )
        .expect("the bench signs HS256 tokens")
    }

    /// A user's token (signed per request, as a client with many users would).
    fn token(&self, user: u64) -> String {
        Self::token_of(&self.auth, user, false)
    }

    async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(response) = self
                .client
                .get(format!("{}/readyz", self.address))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the daemon did not become ready")
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

    /// Sends an issue request; returns whether it was accepted (the load's lean path: no
    /// JSON is built or parsed on this side).
    async fn issue_accepted(&self, user_id: u64, coupon_id: u64) -> bool {
        let sent = self
            .client
            .post(format!("{}/coupons/issue", self.address))
            .bearer_auth(self.token(user_id))
            .insert_header(("content-type", "application/json"))
            .send_body(format!(r#"{{"userId":{user_id},"couponId":{coupon_id}}}"#))
            .await;
        match sent {
            Ok(mut response) => response.status().as_u16() == 202 && response.body().await.is_ok(),
            Err(_) => false,
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
        let accepted: Value = response.json().await.ok()?;
        accepted["requestId"].as_str().map(str::to_string)
    }

    /// Reads the coupon's issued quantity; a pooled connection the server closed for idling
    /// is retried.
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

/// Pauses the issuer's group, has `backlog` requests accepted for a fresh hot coupon, resumes
/// the group and times the issuing of the backlog.
async fn measure_issuance(
    control: &Api,
    load: &Api,
    issuer_group: &str,
    clients: usize,
    backlog: u64,
) -> anyhow::Result<Issuance> {
    let coupon_id = control.create_coupon(10_000_000).await?;
    control
        .admin(&format!("/admin/consumer-groups/{issuer_group}/pause"))
        .await?;
    let next_user = Rc::new(AtomicU64::new(BACKLOG_FIRST_USER));
    let remaining = Rc::new(AtomicU64::new(backlog));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (load, next_user, remaining) = (load.clone(), next_user.clone(), remaining.clone());
            actix_rt::spawn(async move {
                while remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        left.checked_sub(1)
                    })
                    .is_ok()
                {
                    let user = next_user.fetch_add(1, Ordering::Relaxed);
                    if !load.issue_accepted(user, coupon_id).await {
                        remaining.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    if control.issued_quantity(coupon_id).await? != 0 {
        bail!("the issuer consumed while paused");
    }
    control
        .admin(&format!("/admin/consumer-groups/{issuer_group}/resume"))
        .await?;
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(600);
    loop {
        let issued = control.issued_quantity(coupon_id).await?;
        if issued >= backlog {
            return Ok(Issuance {
                issued,
                per_second: issued as f64 / resumed.elapsed().as_secs_f64(),
            });
        }
        if Instant::now() > deadline {
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
    let started = Instant::now();
    let mut updates = 0u64;
    while started.elapsed() < duration {
        let updated = sqlx::query(
            "UPDATE bench_hot_row SET remaining = remaining - 1 WHERE id = 1 AND remaining > 0",
        )
        .execute(&mut *connection)
        .await?;
        updates += updated.rows_affected();
    }
    Ok(updates as f64 / started.elapsed().as_secs_f64())
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
) -> anyhow::Result<IntakeRun> {
    let next_user = Rc::new(AtomicU64::new(1));
    let accepted = Rc::new(AtomicU64::new(0));
    let errors = Rc::new(AtomicU64::new(0));
    let latencies = Rc::new(RefCell::new(Latencies::default()));
    let started = Instant::now();
    let deadline = started + duration;

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
                    if api.issue_accepted(user, coupon_id).await {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        latencies.borrow_mut().record(sent.elapsed());
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let accepted = accepted.load(Ordering::Relaxed);
    let mut samples = watcher.await?;

    // Every accepted request is from a distinct user with ample stock: each must end with a
    // coupon. Follow the issued quantity until it gets there.
    let drain_deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let issued = control.issued_quantity(coupon_id).await?;
        samples.push((Instant::now(), issued));
        if issued >= accepted {
            break;
        }
        if Instant::now() > drain_deadline {
            bail!("only {issued} of {accepted} accepted requests were issued");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// Requests at a fixed rate from users with an open WebSocket; the time from sending each
/// request to receiving its result on the socket.
async fn push_latency(
    api: &Api,
    coupon_id: u64,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Latencies> {
    const USERS: u64 = LATENCY_USERS;
    const FIRST_USER: u64 = LATENCY_FIRST_USER;
    let received: Rc<RefCell<HashMap<String, Instant>>> = Rc::default();
    let ws_address = api.address.replace("http://", "ws://");
    let mut readers = Vec::new();
    for user in FIRST_USER..FIRST_USER + USERS {
        let (_, mut socket) = api
            .client
            .ws(format!("{ws_address}/ws?userId={user}"))
            .bearer_auth(api.token(user))
            .connect()
            .await
            .map_err(|error| anyhow::anyhow!("websocket: {error}"))?;
        let received = received.clone();
        readers.push(actix_rt::spawn(async move {
            while let Some(Ok(frame)) = socket.next().await {
                if let Frame::Text(text) = frame
                    && let Ok(message) = serde_json::from_slice::<Value>(&text)
                    && let Some(request_id) = message["requestId"].as_str()
                {
                    received
                        .borrow_mut()
                        .insert(request_id.to_string(), Instant::now());
                }
            }
        }));
    }

    let sent: Rc<RefCell<HashMap<String, Instant>>> = Rc::default();
    let tick = Duration::from_millis(5);
    let per_tick = (rate as f64 * tick.as_secs_f64()).round().max(1.0) as u64;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut requests = Vec::new();
    let mut next = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        for _ in 0..per_tick {
            let user = FIRST_USER + next % USERS;
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
    let expected = sent.borrow().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received
        .borrow()
        .keys()
        .filter(|id| sent.borrow().contains_key(*id))
        .count()
        < expected
    {
        if Instant::now() > deadline {
            bail!("pushes missing after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for reader in readers {
        reader.abort();
    }
    let mut latencies = Latencies::default();
    for (request_id, sent_at) in sent.borrow().iter() {
        let received_at = received.borrow()[request_id];
        latencies.record(received_at.saturating_duration_since(*sent_at));
    }
    Ok(latencies)
}

#[derive(Clone, Default)]
struct Latencies {
    milliseconds: Vec<f64>,
}

impl Latencies {
    fn record(&mut self, latency: Duration) {
        self.milliseconds.push(latency.as_secs_f64() * 1000.0);
    }

    fn count(&self) -> usize {
        self.milliseconds.len()
    }

    fn percentile(&self, percentile: f64) -> f64 {
        if self.milliseconds.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.milliseconds.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((percentile / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[rank.min(sorted.len() - 1)]
    }
}

struct Stages {
    decided: Latencies,
    notified: Latencies,
}

/// Where the push latency goes, from the event log's timestamps: the request's row commit,
/// its result event's commit (the issuer's transaction) and the request's last update
/// (NOTIFIED, by the notifier).
async fn stage_latencies(pool: &MySqlPool, coupon_id: u64) -> anyhow::Result<Stages> {
    type Row = (
        chrono::DateTime<Utc>,
        chrono::DateTime<Utc>,
        chrono::DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT request.created_at, result.created_at, request.updated_at \
         FROM event_log result JOIN event_log request \
           ON request.event_id = JSON_UNQUOTE(JSON_EXTRACT(result.payload, '$.requestId')) \
         WHERE result.event_type = 'CouponResult' AND JSON_EXTRACT(result.payload, '$.couponId') = ? \
           AND request.status = 'NOTIFIED'",
    )
    .bind(coupon_id)
    .fetch_all(pool)
    .await?;
    let mut stages = Stages {
        decided: Latencies::default(),
        notified: Latencies::default(),
    };
    for (accepted, decided, notified) in rows {
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
        "SELECT COUNT(*) FROM coupon c WHERE c.issued_quantity > c.total_quantity \
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
