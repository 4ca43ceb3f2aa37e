//! The fault-injection suite: coupon load through crashes, restarts, outages of the broker,
//! MySQL and Redis, a poisoned business row and a group member coming and going. Every
//! scenario counts each request as ok / failed / unknown and ends with one shared
//! [`Checker`] over MySQL (and the dead-letter record): nothing accepted is lost or
//! stranded, nothing is over-issued, held twice or applied twice, nobody is told of a coupon
//! that was not issued, no push is missing, and no outage dead-letters anything.
//!
//! MySQL and Redis outages go through a [`TcpProxy`] the test controls, so the machine's own
//! servers keep running; the crash scenarios run the built binary as an operator does and
//! kill it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use commerce_events::auth::Authenticator;
use commerce_events::config::Settings;
use commerce_events::ids::UserId;
use commerce_events::kafka::cluster::KafkaCluster;
use commerce_events::startup::COUPON_REQUEST_GROUP;
use secrecy::ExposeSecret;
use serde_json::Value;
use sqlx::MySqlPool;

use crate::helpers::{TestApp, spawn_app_with};
use crate::support::{TEST_JWT_SECRET, TestDatabase, eventually};

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-events");
/// How long the outages last.
const OUTAGE: Duration = Duration::from_secs(30);
/// How long everything accepted may take to become terminal once the fault is over.
const SETTLE: Duration = Duration::from_secs(120);

/// Short reconciler bounds, so a re-drive comes within the scenario.
fn fault_settings(settings: &mut Settings) {
    settings.reconcile.after_ms = 3_000;
    settings.reconcile.interval_ms = 1_000;
}

// ---------------------------------------------------------------------------------------
// The client side: coupon requests, counted.

/// What the clients saw.
#[derive(Debug, Default)]
struct Ledger {
    /// 202 (a new request) or 200 (the user's earlier one): the request is accepted.
    ok: u64,
    /// An answer that refused it (503 while a dependency is down, 4xx).
    failed: u64,
    /// No answer (connection refused or reset, timeout): the client cannot know.
    unknown: u64,
    /// Answers by status code.
    by_status: BTreeMap<u16, u64>,
    /// The slowest refusal, in milliseconds.
    slowest_refusal_ms: u128,
    /// Accepted request ids, by user.
    accepted: BTreeMap<u64, String>,
    /// Users whose request got no answer.
    unknown_users: BTreeSet<u64>,
}

/// Sends coupon requests to a daemon at `address`, as the users' own clients would.
#[derive(Clone)]
struct Clients {
    address: Arc<Mutex<String>>,
    auth: Arc<Authenticator>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Clients {
    fn new(address: &str, settings: &Settings) -> Self {
        Self {
            address: Arc::new(Mutex::new(address.to_string())),
            auth: Arc::new(
                Authenticator::from_settings(&settings.auth, &settings.kafka)
                    .expect("the test settings authenticate"),
            ),
            ledger: Arc::default(),
        }
    }

    /// Points the clients at a restarted daemon.
    fn point_at(&self, address: &str) {
        *self.address.lock().unwrap() = address.to_string();
    }

    fn accepted(&self) -> u64 {
        self.ledger.lock().unwrap().ok
    }

    /// One request of `user` for `coupon`, counted.
    async fn issue(&self, user: u64, coupon: u64) {
        let token = self
            .auth
            .mint(
                UserId::from_u64(user).unwrap(),
                false,
                Duration::from_secs(3_600),
            )
            .unwrap();
        let address = self.address.lock().unwrap().clone();
        let started = Instant::now();
        let answer = awc::Client::builder()
            .timeout(Duration::from_secs(5))
            .finish()
            .post(format!("{address}/coupons/issue"))
            .bearer_auth(token)
            .insert_header(("content-type", "application/json"))
            .send_body(format!(r#"{{"userId": {user}, "couponId": {coupon}}}"#))
            .await;
        let Ok(mut response) = answer else {
            let mut ledger = self.ledger.lock().unwrap();
            ledger.unknown += 1;
            ledger.unknown_users.insert(user);
            return;
        };
        let status = response.status();
        *self
            .ledger
            .lock()
            .unwrap()
            .by_status
            .entry(status.as_u16())
            .or_default() += 1;
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let mut ledger = self.ledger.lock().unwrap();
        if status == StatusCode::ACCEPTED || status == StatusCode::OK {
            ledger.ok += 1;
            ledger.unknown_users.remove(&user);
            let request_id = body["requestId"]
                .as_str()
                .expect("a request id")
                .to_string();
            ledger.accepted.insert(user, request_id);
        } else {
            ledger.failed += 1;
            ledger.slowest_refusal_ms =
                ledger.slowest_refusal_ms.max(started.elapsed().as_millis());
            assert!(
                body["error"]["code"].is_string(),
                "a refusal carries the error body: {status} {body}"
            );
            assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        }
    }

    /// Requests of `users` for `coupon`, `concurrency` at a time.
    async fn load(&self, users: impl IntoIterator<Item = u64>, coupon: u64, concurrency: usize) {
        use futures::StreamExt;
        futures::stream::iter(users)
            .for_each_concurrent(concurrency, |user| self.issue(user, coupon))
            .await;
    }

    /// The load, in the background, paced at about `per_second`.
    fn load_in_background(
        &self,
        users: std::ops::RangeInclusive<u64>,
        coupon: u64,
        per_second: u64,
    ) -> actix_rt::task::JoinHandle<()> {
        let clients = self.clone();
        actix_rt::spawn(async move {
            let pause = Duration::from_micros(1_000_000 / per_second.max(1));
            let mut in_flight = Vec::new();
            for user in users {
                let clients = clients.clone();
                in_flight.push(actix_rt::spawn(
                    async move { clients.issue(user, coupon).await },
                ));
                actix_rt::time::sleep(pause).await;
            }
            for request in in_flight {
                let _ = request.await;
            }
        })
    }

    /// Asks again for every request that got no answer: the earlier request if it was
    /// recorded (200), or a new one.
    async fn ask_again_unknown(&self, coupon: u64) {
        let users: Vec<u64> = self
            .ledger
            .lock()
            .unwrap()
            .unknown_users
            .iter()
            .copied()
            .collect();
        for user in users {
            self.issue(user, coupon).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The shared checker.

/// What MySQL holds after a scenario, against what the clients were told.
#[derive(Debug, Default, PartialEq, Eq)]
struct Report {
    recorded: u64,
    accepted: u64,
    /// Accepted, but no row.
    lost: u64,
    /// A row that is not decided (PENDING, PUBLISHED, IN_PROGRESS, FAILED).
    stranded: u64,
    /// Issued beyond the coupon's stock.
    over_issued: u64,
    /// A user holding the coupon twice.
    held_twice: u64,
    /// Decided as issued without a coupon history row.
    told_success_not_issued: u64,
    /// Coupon histories beyond the issued count, or requests with two histories.
    applied_twice: u64,
    dead_lettered: u64,
    /// Decided, but the result was never pushed (the notifier did not settle it).
    pushes_lost: u64,
}

impl Report {
    fn settled(&self) -> bool {
        self.stranded == 0 && self.pushes_lost == 0
    }
}

struct Checker {
    pool: MySqlPool,
}

impl Checker {
    async fn connect(database_url: &str) -> Self {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(database_url)
            .await
            .expect("the checker connects to MySQL directly");
        Self { pool }
    }

    async fn report(&self, ledger: &Ledger, coupons: &[u64]) -> Report {
        let rows: Vec<(String, String, Option<Value>)> = sqlx::query_as(
            "SELECT event_id, status, result FROM event_log WHERE event_type = 'CouponRequested'",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let histories: Vec<(u64, u64, String)> =
            sqlx::query_as("SELECT coupon_id, user_id, request_id FROM coupon_history")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let mut report = Report {
            recorded: rows.len() as u64,
            accepted: ledger.accepted.len() as u64,
            ..Report::default()
        };
        let ids: BTreeSet<&str> = rows.iter().map(|(id, _, _)| id.as_str()).collect();
        report.lost = ledger
            .accepted
            .values()
            .filter(|id| !ids.contains(id.as_str()))
            .count() as u64;
        let issued_for: BTreeMap<&str, usize> =
            histories
                .iter()
                .fold(BTreeMap::new(), |mut counts, (_, _, request)| {
                    *counts.entry(request.as_str()).or_default() += 1;
                    counts
                });
        for (id, status, result) in &rows {
            match status.as_str() {
                "NOTIFIED" => {}
                "COMPLETED" => report.pushes_lost += 1,
                "DEAD_LETTER" => {}
                _ => report.stranded += 1,
            }
            let decided = matches!(status.as_str(), "NOTIFIED" | "COMPLETED");
            let refused = result
                .as_ref()
                .is_some_and(|result| result.get("reason").is_some());
            if decided && !refused && !issued_for.contains_key(id.as_str()) {
                report.told_success_not_issued += 1;
            }
        }
        report.applied_twice = issued_for.values().filter(|count| **count > 1).count() as u64;
        let mut holders: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        for (coupon, user, _) in &histories {
            *holders.entry((*coupon, *user)).or_default() += 1;
        }
        report.held_twice = holders.values().filter(|count| **count > 1).count() as u64;
        for coupon in coupons {
            let (total, issued): (u32, u32) = sqlx::query_as(
                "SELECT total_quantity, issued_quantity FROM coupon WHERE coupon_id = ?",
            )
            .bind(coupon)
            .fetch_one(&self.pool)
            .await
            .unwrap();
            let held = histories.iter().filter(|(id, _, _)| id == coupon).count() as u64;
            report.over_issued += held.saturating_sub(u64::from(total));
            report.applied_twice += held.abs_diff(u64::from(issued));
        }
        let (dead,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM dead_letter")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        report.dead_lettered = dead as u64;
        report
    }

    /// How long after now the requests recorded until now take to be decided and pushed
    /// (while the load goes on): the recovery time after a fault.
    async fn recovery(&self) -> Duration {
        let started = Instant::now();
        let (cutoff,): (chrono::NaiveDateTime,) = sqlx::query_as("SELECT NOW(6)")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        eventually(
            "the requests recorded before the fault ended settle",
            SETTLE,
            || async {
                let (unsettled,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM event_log WHERE event_type = 'CouponRequested' \
                 AND created_at <= ? AND status NOT IN ('NOTIFIED', 'DEAD_LETTER')",
                )
                .bind(cutoff)
                .fetch_one(&self.pool)
                .await
                .unwrap();
                unsettled == 0
            },
        )
        .await;
        started.elapsed()
    }

    /// Waits until everything recorded is decided and pushed; returns the final report and
    /// how long that took.
    async fn settle(&self, clients: &Clients, coupons: &[u64]) -> (Report, Duration) {
        let started = Instant::now();
        let deadline = started + SETTLE;
        loop {
            let report = {
                let ledger = clients.ledger.lock().unwrap();
                // Reports are computed from a snapshot of what the clients know.
                Ledger {
                    accepted: ledger.accepted.clone(),
                    ..Ledger::default()
                }
            };
            let report = self.report(&report, coupons).await;
            if report.settled() || Instant::now() >= deadline {
                return (report, started.elapsed());
            }
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The promise every scenario checks: nothing accepted lost or stranded, nothing issued or
/// applied twice, every result pushed, nothing dead-lettered (by an outage).
fn assert_kept_every_promise(scenario: &str, report: &Report, ledger: &Ledger) {
    let expected = Report {
        recorded: report.recorded,
        accepted: report.accepted,
        ..Report::default()
    };
    assert_eq!(
        report, &expected,
        "{scenario}: {report:?}; clients saw {ledger:?}"
    );
    assert!(
        report.accepted > 0,
        "{scenario}: some requests were accepted"
    );
    assert!(report.recorded >= report.accepted, "{scenario}: {report:?}");
    eprintln!(
        "{scenario}: ok {} failed {} unknown {} recorded {} answers {:?}",
        ledger.ok, ledger.failed, ledger.unknown, report.recorded, ledger.by_status
    );
}

// ---------------------------------------------------------------------------------------
// Fault injection.

/// A TCP proxy in front of a server; [`TcpProxy::cut`] drops every connection and refuses
/// new ones (reset at once) until [`TcpProxy::restore`], as a stopped server would.
struct TcpProxy {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (accepting_up, accepting_connections) = (up.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !accepting_up.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = accepting_connections.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                let (mut client_reader, mut server_writer) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_reader, &mut server_writer);
                    let _ = server_writer.shutdown(Shutdown::Both);
                });
                let (mut server_reader, mut client_writer) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_reader, &mut client_writer);
                    let _ = client_writer.shutdown(Shutdown::Both);
                });
            }
        });
        Self {
            port,
            up,
            connections,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn embedded(app: &TestApp) -> Arc<KafkaCluster> {
    let kafka = app.kafka.clone();
    assert!(
        kafka.is_embedded(),
        "the scenario needs the embedded cluster"
    );
    kafka
}

fn set_broker_up(kafka: &KafkaCluster, up: bool) {
    let KafkaCluster::Embedded { cluster, .. } = kafka else {
        unreachable!("checked by embedded()")
    };
    cluster
        .set_broker_up(1, up)
        .expect("the mock broker changes state");
}

/// The built binary, run as an operator runs it, on `database`.
struct Daemon {
    child: Child,
    address: String,
}

impl Daemon {
    fn start(database: &TestDatabase) -> Self {
        let mut child = Command::new(BINARY)
            .env_remove("RUST_LOG")
            .env("APP_CONFIG_FILE", "/nonexistent/commerce-events.toml")
            .env("APP_HTTP__PORT", "0")
            .env("APP_DATABASE__URL", database.url())
            .env("APP_DATABASE__MAX_CONNECTIONS", "6")
            .env("APP_DATABASE__HTTP_MAX_CONNECTIONS", "6")
            .env("APP_REDIS__KEY_PREFIX", format!("{}:", database.name))
            .env("APP_KAFKA__EMBEDDED_BROKERS", "1")
            .env("APP_AUTH__JWT_SECRET", TEST_JWT_SECRET)
            .env("APP_LIMITS__COUPON_ISSUE__PER_SECOND", "100000")
            .env("APP_LIMITS__COUPON_ISSUE__BURST", "100000")
            .env("APP_RECONCILE__AFTER_MS", "3000")
            .env("APP_RECONCILE__INTERVAL_MS", "1000")
            .env("APP_LOG__FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the daemon starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, receiver) = std::sync::mpsc::channel::<String>();
        // Reads every line for as long as the daemon runs (a full pipe would stall it).
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && entry["message"] == "HTTP listening"
                    && let Some(address) = entry["address"].as_str()
                {
                    let _ = sender.send(address.to_string());
                }
            }
        });
        let address = receiver
            .recv_timeout(Duration::from_secs(120))
            .expect("the daemon logs its address");
        Self { child, address }
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    }

    /// Waits for the process to end; its exit code (`None`: killed by a signal).
    async fn exited(mut self) -> Option<i32> {
        actix_rt::task::spawn_blocking(move || self.child.wait().expect("the daemon ends").code())
            .await
            .unwrap()
    }

    async fn wait_ready(&self, clients: &Clients) {
        let token = clients
            .auth
            .mint(
                UserId::from_u64(1).unwrap(),
                true,
                Duration::from_secs(3_600),
            )
            .unwrap();
        let client = awc::Client::default();
        let address = self.address.clone();
        eventually("the daemon is ready", Duration::from_secs(60), || async {
            client
                .get(format!("{address}/readyz"))
                .send()
                .await
                .is_ok_and(|response| response.status() == StatusCode::OK)
        })
        .await;
        let answer = client
            .post(format!("{address}/admin/reconcile"))
            .bearer_auth(&token)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("a reconcile pass");
        assert_eq!(answer.status(), StatusCode::OK);
    }

    /// A call as the administrator.
    async fn admin(&self, clients: &Clients, path: &str, body: Value) -> (StatusCode, Value) {
        let token = clients
            .auth
            .mint(
                UserId::from_u64(1).unwrap(),
                true,
                Duration::from_secs(3_600),
            )
            .unwrap();
        let mut response = awc::Client::default()
            .post(format!("{}{path}", self.address))
            .bearer_auth(token)
            .send_json(&body)
            .await
            .expect("the daemon answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

async fn user_rows(database_url: &str, last: u64) {
    let pool = MySqlPool::connect(database_url).await.unwrap();
    sqlx::query(
        "INSERT IGNORE INTO app_user (user_id, name) \
         SELECT seq, CONCAT('user ', seq) FROM seq_1_to_100000000 WHERE seq BETWEEN 1 AND ?",
    )
    .bind(last)
    .execute(&pool)
    .await
    .unwrap();
}

fn coupon_body(stock: u32) -> Value {
    let now = chrono::Utc::now();
    serde_json::json!({
        "name": "Fault drill",
        "discountAmount": 1000,
        "totalQuantity": stock,
        "validFrom": now - chrono::Duration::hours(1),
        "validUntil": now + chrono::Duration::days(1),
    })
}

// ---------------------------------------------------------------------------------------
// Crashes of the binary.

/// Coupon load with a backlog (the issuer's group paused), the daemon killed with `signal`
/// in the middle of it, restarted on the same database (and a fresh embedded cluster).
async fn crash_under_load_with_a_backlog(signal: &str) {
    let scenario = format!("{signal} under load with a backlog");
    let database = TestDatabase::new();
    let settings = database.settings();
    let first = Daemon::start(&database);
    let clients = Clients::new(&first.address, &settings);
    first.wait_ready(&clients).await;
    user_rows(&database.url(), 800).await;
    let (status, coupon) = first.admin(&clients, "/coupons", coupon_body(150)).await;
    assert_eq!(status, StatusCode::CREATED, "{coupon}");
    let coupon = coupon["couponId"].as_u64().unwrap();

    // A decided part, then a backlog the issuer has not read when the daemon dies.
    clients.load(1..=150, coupon, 8).await;
    let group = settings.kafka.group_id(COUPON_REQUEST_GROUP);
    let (status, paused) = first
        .admin(
            &clients,
            &format!("/admin/consumer-groups/{group}/pause"),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    clients.load(151..=450, coupon, 8).await;
    let load = clients.load_in_background(451..=800, coupon, 200);
    let accepted_before = clients.accepted();
    eventually(
        "more requests accepted under load",
        Duration::from_secs(60),
        || async { clients.accepted() >= accepted_before + 50 },
    )
    .await;
    first.signal(signal);
    let code = first.exited().await;
    if signal == "-TERM" {
        assert_eq!(code, Some(0), "SIGTERM ends the daemon cleanly");
    }
    let second = Daemon::start(&database);
    clients.point_at(&second.address);
    second.wait_ready(&clients).await;
    load.await.unwrap();
    clients.ask_again_unknown(coupon).await;

    let checker = Checker::connect(&database.url()).await;
    let (report, recovery) = checker.settle(&clients, &[coupon]).await;
    {
        let ledger = clients.ledger.lock().unwrap();
        assert_kept_every_promise(&scenario, &report, &ledger);
        assert!(ledger.unknown_users.is_empty(), "asked again: {ledger:?}");
        eprintln!("{scenario}: settled {recovery:?} after the restart");
    }
    second.signal("-TERM");
    second.exited().await;
}

#[actix_web::test]
async fn sigkill_under_coupon_load_with_a_backlog_loses_and_strands_nothing() {
    crash_under_load_with_a_backlog("-KILL").await;
}

#[actix_web::test]
async fn sigterm_under_coupon_load_with_a_backlog_loses_and_strands_nothing() {
    crash_under_load_with_a_backlog("-TERM").await;
}

// ---------------------------------------------------------------------------------------
// Outages of a dependency, in process.

/// A daemon under coupon load while `outage` lasts [`OUTAGE`], then the check.
async fn outage_under_load(
    scenario: &str,
    app: &TestApp,
    database_url: &str,
    start_outage: impl FnOnce(),
    end_outage: impl FnOnce(),
) -> (Ledger, Report, Duration) {
    let coupon = app.create_coupon(200).await;
    app.ensure_users(1, 1_600).await;
    let clients = Clients::new(&app.address, &app.settings);
    clients.load(1..=100, coupon, 8).await;
    // ~30 requests a second through the outage and for 20 s after it.
    let load = clients.load_in_background(101..=1_600, coupon, 30);
    let checker = Checker::connect(database_url).await;
    start_outage();
    let outage_began = Instant::now();
    actix_rt::time::sleep(OUTAGE).await;
    end_outage();
    let recovery = checker.recovery().await;
    eprintln!(
        "{scenario}: outage of {:?}; what was recorded until its end settled {recovery:?} later",
        outage_began.elapsed()
    );
    load.await.unwrap();
    clients.ask_again_unknown(coupon).await;
    let (report, _) = checker.settle(&clients, &[coupon]).await;
    let ledger = std::mem::take(&mut *clients.ledger.lock().unwrap());
    assert_kept_every_promise(scenario, &report, &ledger);
    (ledger, report, recovery)
}

#[actix_web::test]
async fn the_broker_down_for_30_seconds_under_load_loses_nothing() {
    let app = spawn_app_with(fault_settings).await;
    let kafka = embedded(&app);
    let (ledger, _, recovery) = outage_under_load(
        "broker down 30 s",
        &app,
        &app.database_url(),
        || set_broker_up(&kafka, false),
        || set_broker_up(&kafka, true),
    )
    .await;
    assert_eq!(
        (ledger.failed, ledger.unknown),
        (0, 0),
        "the outbox takes requests, and answers them, while the broker is down: {ledger:?}"
    );
    assert!(
        recovery < Duration::from_secs(10),
        "recovered in {recovery:?}"
    );
}

#[actix_web::test]
async fn mysql_cut_for_30_seconds_under_load_answers_503_fast_and_loses_nothing() {
    let proxy = TcpProxy::start("127.0.0.1:3306".parse().unwrap());
    let port = proxy.port;
    let app = spawn_app_with(move |settings| {
        fault_settings(settings);
        let direct = settings.database.url.expose_secret().to_string();
        settings.database.url = direct.replace(":3306/", &format!(":{port}/")).into();
    })
    .await;
    let (ledger, _, _) = outage_under_load(
        "MySQL cut 30 s",
        &app,
        &app.database_url(),
        || proxy.cut(),
        || proxy.restore(),
    )
    .await;
    assert!(
        ledger.by_status.get(&503).is_some_and(|count| *count > 0),
        "{ledger:?}"
    );
    assert!(
        ledger.slowest_refusal_ms < 3_000,
        "refusals come fast (1 s pool acquire timeout): {ledger:?}"
    );
}

#[actix_web::test]
async fn redis_cut_for_30_seconds_under_load_loses_nothing() {
    let proxy = TcpProxy::start("127.0.0.1:6379".parse().unwrap());
    let port = proxy.port;
    let app = spawn_app_with(move |settings| {
        fault_settings(settings);
        settings.redis.url = format!("redis://127.0.0.1:{port}").into();
    })
    .await;
    outage_under_load(
        "Redis cut 30 s",
        &app,
        &app.database_url(),
        || proxy.cut(),
        || proxy.restore(),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// A bad row, and a member coming and going.

#[actix_web::test]
async fn a_poisoned_coupon_row_fails_only_its_own_requests() {
    let app = spawn_app_with(fault_settings).await;
    let good = app.create_coupon(100).await;
    let poisoned = app.create_coupon(100).await;
    // One connection for both statements: the session's sql_mode lets the zero date in.
    let mut connection = app.event_log.pool().acquire().await.unwrap();
    sqlx::query("SET SESSION sql_mode = ''")
        .execute(&mut *connection)
        .await
        .unwrap();
    sqlx::query("UPDATE coupon SET valid_from = '0000-00-00 00:00:00' WHERE coupon_id = ?")
        .bind(poisoned)
        .execute(&mut *connection)
        .await
        .unwrap();
    drop(connection);
    app.ensure_users(1, 60).await;
    let clients = Clients::new(&app.address, &app.settings);
    // Interleaved, so the poisoned requests share batches with the good ones.
    use futures::StreamExt;
    futures::stream::iter(1..=60u64)
        .for_each_concurrent(8, |user| {
            let clients = clients.clone();
            async move {
                clients
                    .issue(user, if user % 3 == 0 { poisoned } else { good })
                    .await
            }
        })
        .await;
    let checker = Checker::connect(&app.database_url()).await;
    let ledger = Ledger {
        accepted: clients.ledger.lock().unwrap().accepted.clone(),
        ..Ledger::default()
    };
    let poisoned_requests: BTreeSet<String> = ledger
        .accepted
        .iter()
        .filter(|(user, _)| *user % 3 == 0)
        .map(|(_, id)| id.clone())
        .collect();
    eventually("every request decided or dead-lettered", SETTLE, || async {
        let report = checker.report(&ledger, &[good]).await;
        report.stranded == 0 && report.pushes_lost == 0 && report.dead_lettered == 20
    })
    .await;
    let report = checker.report(&ledger, &[good]).await;
    assert_eq!(report.accepted, 60);
    assert_eq!(
        (
            report.lost,
            report.over_issued,
            report.held_twice,
            report.told_success_not_issued,
            report.applied_twice
        ),
        (0, 0, 0, 0, 0),
        "{report:?}"
    );
    let dead: Vec<(String,)> = sqlx::query_as("SELECT event_id FROM dead_letter")
        .fetch_all(app.event_log.pool())
        .await
        .unwrap();
    let dead: BTreeSet<String> = dead.into_iter().map(|(id,)| id).collect();
    assert_eq!(
        dead, poisoned_requests,
        "only the poisoned coupon's requests"
    );
    let (issued,): (u32,) =
        sqlx::query_as("SELECT issued_quantity FROM coupon WHERE coupon_id = ?")
            .bind(good)
            .fetch_one(app.event_log.pool())
            .await
            .unwrap();
    assert_eq!(issued, 40, "every good request issued");
}

#[actix_web::test]
async fn a_second_member_joining_and_leaving_under_load_loses_and_repeats_nothing() {
    let first = spawn_app_with(fault_settings).await;
    let coupon = first.create_coupon(300).await;
    first.ensure_users(1, 900).await;
    let clients = Clients::new(&first.address, &first.settings);
    let load = clients.load_in_background(1..=900, coupon, 40);
    let (brokers, database) = (first.bootstrap_servers(), first.database_url());
    eventually("load under way", Duration::from_secs(60), || async {
        clients.accepted() >= 100
    })
    .await;
    let mut second = spawn_app_with(move |settings| {
        fault_settings(settings);
        settings.instance.id = "second".into();
        settings.kafka.brokers = brokers;
        settings.database.url = database.into();
    })
    .await;
    let joined_at = clients.accepted();
    eventually(
        "load while both members share the group",
        Duration::from_secs(60),
        || async { clients.accepted() >= joined_at + 150 },
    )
    .await;
    second
        .stop()
        .await
        .expect("the second member leaves cleanly");
    load.await.unwrap();
    let checker = Checker::connect(&first.database_url()).await;
    let (report, _) = checker.settle(&clients, &[coupon]).await;
    let ledger = clients.ledger.lock().unwrap();
    assert_kept_every_promise("a member joins and leaves", &report, &ledger);
    assert_eq!(ledger.failed + ledger.unknown, 0, "{ledger:?}");
}
