//! Fault drills: the pieces the fault-injection tests and `bench faults` share (built with
//! the `test-util` feature). Coupon load whose every request is counted as ok / failed /
//! unknown ([`Clients`], [`Ledger`]); one [`Checker`] over MySQL that holds what the daemon
//! did against what the clients were told (nothing accepted lost or left undecided, nothing
//! over-issued, held twice or applied twice, nobody told of a coupon not issued, every result
//! pushed, no dead letter, each user's coupons issued in the order the user asked for them);
//! a [`TcpProxy`] that cuts a server off while it keeps running; separate broker processes
//! ([`TansuBroker`], and the embedded cluster alone: [`BrokerProcess`]); and the built
//! binary run as an operator runs it ([`Daemon`]), to be killed, several of them sharing one
//! broker, each one's rebalances read from its log ([`Rebalance`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use serde_json::Value;
use sqlx::MySqlPool;

use crate::common::ids::UserId;
use crate::config::Settings;
use crate::guards::tokens::Authenticator;

/// How long everything accepted may take to become terminal once a fault is over.
pub const SETTLE: Duration = Duration::from_secs(120);

/// Polls `condition` every 20 ms until it holds; panics after `timeout` naming `what`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The client side: coupon requests, counted.

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Ledger {
    /// 202 (a new request) or 200 (the user's earlier one): the request is accepted.
    pub ok: u64,
    /// An answer that refused it (503 while a dependency is down, 4xx).
    pub failed: u64,
    /// No answer (connection refused or reset, timeout): the client cannot know.
    pub unknown: u64,
    /// Answers by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// The slowest refusal, in milliseconds.
    pub slowest_refusal_ms: u128,
    /// Accepted request ids, by user and coupon.
    pub accepted: BTreeMap<(u64, u64), String>,
    /// Each user's accepted requests in the order they were accepted (a user's clients send
    /// the next request once the previous one is answered). A request that got no answer
    /// holds its place until it is asked again: if it had been recorded (200), it was
    /// accepted there, not when asked again.
    pub in_order: BTreeMap<u64, Vec<String>>,
    /// The (user, coupon) requests that got no answer.
    pub unanswered: BTreeSet<(u64, u64)>,
    /// Refusals whose body was not `{"error": {"code", "message"}}`.
    pub refusals_without_error_body: u64,
}

impl Ledger {
    /// The place in [`Ledger::in_order`] of a request for `coupon` that got no answer, until
    /// asking again tells whether it was recorded then.
    fn unanswered_place(coupon: u64) -> String {
        format!("unanswered request for coupon {coupon}")
    }
}

/// Sends coupon requests to a daemon at `address`, as the users' own clients would; spread
/// over several daemons, a user always goes to the same one.
#[derive(Clone)]
pub struct Clients {
    addresses: Arc<Mutex<Vec<String>>>,
    /// Every request holds it shared; [`Clients::hold`] takes it exclusively.
    gate: Arc<tokio::sync::RwLock<()>>,
    pub auth: Arc<Authenticator>,
    pub ledger: Arc<Mutex<Ledger>>,
}

impl Clients {
    pub fn new(address: &str, settings: &Settings) -> Self {
        Self {
            addresses: Arc::new(Mutex::new(vec![address.to_string()])),
            gate: Arc::default(),
            auth: Arc::new(
                Authenticator::from_settings(&settings.auth, &settings.kafka)
                    .expect("the test settings authenticate"),
            ),
            ledger: Arc::default(),
        }
    }

    /// Points the clients at a restarted daemon.
    pub fn point_at(&self, address: &str) {
        self.spread_over(&[address]);
    }

    /// Spreads the users over these daemons (user `u` goes to `addresses[u % n]`).
    pub fn spread_over(&self, addresses: &[&str]) {
        *self.addresses.lock().unwrap() = addresses.iter().map(|a| a.to_string()).collect();
    }

    /// Waits until no request is in flight and holds every new one back until the guard is
    /// dropped (moving users between daemons without a request in between).
    pub async fn hold(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    /// The daemon administration goes to: the first.
    fn address(&self) -> String {
        self.addresses.lock().unwrap()[0].clone()
    }

    /// Waits while the clients are held ([`Clients::hold`]); a request sent while the guard
    /// lives is never in flight when users move.
    pub async fn pass(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// The daemon `user`'s requests go to.
    pub fn address_of(&self, user: u64) -> String {
        let addresses = self.addresses.lock().unwrap();
        addresses[(user % addresses.len() as u64) as usize].clone()
    }

    /// A token of the administrator (user 1), valid an hour.
    fn admin_token(&self) -> String {
        self.auth
            .mint(
                UserId::from_u64(1).unwrap(),
                true,
                Duration::from_secs(3_600),
            )
            .unwrap()
    }

    /// Waits until the daemon the clients point at is ready and has made a reconciler pass.
    pub async fn wait_ready(&self) {
        let token = self.admin_token();
        let client = awc::Client::default();
        let address = self.address();
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

    /// A `POST` as the administrator.
    pub async fn admin(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let token = self.admin_token();
        let mut response = awc::Client::default()
            .post(format!("{}{path}", self.address()))
            .bearer_auth(token)
            .send_json(&body)
            .await
            .expect("the daemon answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub fn accepted(&self) -> u64 {
        self.ledger.lock().unwrap().ok
    }

    /// One request of `user` for `coupon`, counted.
    pub async fn issue(&self, user: u64, coupon: u64) {
        let token = self
            .auth
            .mint(
                UserId::from_u64(user).unwrap(),
                false,
                Duration::from_secs(3_600),
            )
            .unwrap();
        let _gate = self.pass().await;
        let address = self.address_of(user);
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
            ledger.unanswered.insert((user, coupon));
            // Its place among the user's requests, should it turn out to have been recorded.
            let place = Ledger::unanswered_place(coupon);
            let in_order = ledger.in_order.entry(user).or_default();
            if !in_order.contains(&place) {
                in_order.push(place);
            }
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
            ledger.unanswered.remove(&(user, coupon));
            let request_id = body["requestId"]
                .as_str()
                .expect("a request id")
                .to_string();
            let place = Ledger::unanswered_place(coupon);
            let in_order = ledger.in_order.entry(user).or_default();
            let unanswered_at = in_order.iter().position(|request| *request == place);
            if !in_order.contains(&request_id) {
                match unanswered_at {
                    // 200: the request that got no answer had been recorded, when it was
                    // sent: it keeps that place.
                    Some(at) if status == StatusCode::OK => in_order[at] = request_id.clone(),
                    // 202: it had not; this one is new, accepted now.
                    _ => in_order.push(request_id.clone()),
                }
            }
            in_order.retain(|request| *request != place);
            ledger.accepted.insert((user, coupon), request_id);
        } else {
            ledger.failed += 1;
            ledger.slowest_refusal_ms =
                ledger.slowest_refusal_ms.max(started.elapsed().as_millis());
            if !body["error"]["code"].is_string() {
                ledger.refusals_without_error_body += 1;
            }
        }
    }

    /// Requests of `users` for `coupon`, `concurrency` at a time.
    pub async fn load(
        &self,
        users: impl IntoIterator<Item = u64>,
        coupon: u64,
        concurrency: usize,
    ) {
        use futures::StreamExt;
        futures::stream::iter(users)
            .for_each_concurrent(concurrency, |user| self.issue(user, coupon))
            .await;
    }

    /// The load, in the background, paced at about `per_second`.
    pub fn load_in_background(
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

    /// Each of `users` asks for every one of `coupons` in turn (the next once the previous
    /// is answered), in the background; a user starts about every `1 / per_second` s.
    pub fn load_in_order_in_background(
        &self,
        users: std::ops::RangeInclusive<u64>,
        coupons: Vec<u64>,
        per_second: u64,
    ) -> actix_rt::task::JoinHandle<()> {
        let clients = self.clone();
        let coupons = Arc::new(coupons);
        actix_rt::spawn(async move {
            let pause = Duration::from_micros(1_000_000 / per_second.max(1));
            let mut in_flight = Vec::new();
            for user in users {
                let (clients, coupons) = (clients.clone(), coupons.clone());
                in_flight.push(actix_rt::spawn(async move {
                    for coupon in coupons.iter() {
                        clients.issue(user, *coupon).await;
                    }
                }));
                actix_rt::time::sleep(pause).await;
            }
            for request in in_flight {
                let _ = request.await;
            }
        })
    }

    /// Asks again for every request that got no answer: the earlier request if it was
    /// recorded (200), or a new one.
    pub async fn ask_again_unknown(&self) {
        let unanswered: Vec<(u64, u64)> = self
            .ledger
            .lock()
            .unwrap()
            .unanswered
            .iter()
            .copied()
            .collect();
        for (user, coupon) in unanswered {
            self.issue(user, coupon).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The shared checker.

/// What MySQL holds after a scenario, against what the clients were told.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub recorded: u64,
    pub accepted: u64,
    /// Accepted, but no row.
    pub lost: u64,
    /// A row that is not decided (PENDING, PUBLISHED, IN_PROGRESS, FAILED).
    pub stranded: u64,
    /// Issued beyond the coupon's stock.
    pub over_issued: u64,
    /// A user holding the coupon twice.
    pub held_twice: u64,
    /// Decided as issued without a coupon history row.
    pub told_success_not_issued: u64,
    /// Coupon histories beyond the issued count, or requests with two histories.
    pub applied_twice: u64,
    pub dead_lettered: u64,
    /// Decided, but the result was never pushed (the notifier did not settle it).
    pub pushes_lost: u64,
    /// Users whose coupons were issued in another order than their requests were accepted
    /// (coupon histories are numbered in the order they are inserted).
    pub out_of_order: u64,
}

impl Report {
    pub fn settled(&self) -> bool {
        self.stranded == 0 && self.pushes_lost == 0
    }
}

pub struct Checker {
    pub pool: MySqlPool,
}

impl Checker {
    pub async fn connect(database_url: &str) -> Self {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(database_url)
            .await
            .expect("the checker connects to MySQL directly");
        Self { pool }
    }

    pub async fn report(&self, ledger: &Ledger, coupons: &[u64]) -> Report {
        let rows: Vec<(String, String, Option<Value>)> = sqlx::query_as(
            "SELECT event_id, status, result FROM event_log WHERE event_type = 'CouponRequested'",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let histories: Vec<(u64, u64, String)> = sqlx::query_as(
            "SELECT coupon_id, user_id, request_id FROM coupon_history \
             ORDER BY coupon_history_id",
        )
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
        report.out_of_order = Self::users_out_of_order(ledger, &histories);
        for coupon in coupons {
            // The view sums a sharded coupon's shard rows.
            let (total, issued): (u32, u64) = sqlx::query_as(
                "SELECT total_quantity, issued_quantity FROM coupon_stock WHERE coupon_id = ?",
            )
            .bind(coupon)
            .fetch_one(&self.pool)
            .await
            .unwrap();
            let held = histories.iter().filter(|(id, _, _)| id == coupon).count() as u64;
            report.over_issued += held.saturating_sub(u64::from(total));
            report.applied_twice += held.abs_diff(issued);
        }
        let (dead,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM dead_letter")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        report.dead_lettered = dead as u64;
        report
    }

    /// The users whose issued requests, in the order of their coupon histories, are not in
    /// the order the user's requests were accepted.
    pub fn users_out_of_order(ledger: &Ledger, histories: &[(u64, u64, String)]) -> u64 {
        let issued_at: BTreeMap<&str, usize> = histories
            .iter()
            .enumerate()
            .map(|(position, (_, _, request))| (request.as_str(), position))
            .collect();
        ledger
            .in_order
            .values()
            .filter(|requests| {
                let positions: Vec<usize> = requests
                    .iter()
                    .filter_map(|request| issued_at.get(request.as_str()).copied())
                    .collect();
                positions.windows(2).any(|pair| pair[0] > pair[1])
            })
            .count() as u64
    }

    /// How long after now the requests recorded until now take to be decided and pushed
    /// (while the load goes on): the recovery time after a fault.
    pub async fn recovery(&self) -> Duration {
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
    pub async fn settle(&self, clients: &Clients, coupons: &[u64]) -> (Report, Duration) {
        let started = Instant::now();
        let deadline = started + SETTLE;
        loop {
            let report = {
                let ledger = clients.ledger.lock().unwrap();
                // Reports are computed from a snapshot of what the clients know.
                Ledger {
                    accepted: ledger.accepted.clone(),
                    in_order: ledger.in_order.clone(),
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
pub fn assert_kept_every_promise(scenario: &str, report: &Report, ledger: &Ledger) {
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
    assert_eq!(
        ledger.by_status.get(&500).copied().unwrap_or(0),
        0,
        "{scenario}: no 500 answers: {ledger:?}"
    );
    assert_eq!(
        ledger.refusals_without_error_body, 0,
        "{scenario}: every refusal carries the error body: {ledger:?}"
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
pub struct TcpProxy {
    pub port: u16,
    pub up: Arc<AtomicBool>,
    pub connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    pub fn start(upstream: SocketAddr) -> Self {
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

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A separate Kafka-protocol broker process (tansu, in memory) on a free loopback port,
/// killed when dropped.
pub struct TansuBroker {
    process: Child,
    pub address: String,
}

impl TansuBroker {
    pub async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let url = format!("tcp://{address}");
        let process = Command::new("tansu")
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu is installed (scripts/test installs it: cargo install tansu --version 0.6.0 --locked --features dynostore)");
        eventually("the broker listens", Duration::from_secs(20), || async {
            TcpStream::connect(&address).is_ok()
        })
        .await;
        Self { process, address }
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The built binary, run as an operator runs it, on `database`.
pub struct Daemon {
    /// The process; `None` once [`Daemon::exited`] has taken it.
    child: Option<Child>,
    pub address: String,
    rebalances: Arc<Mutex<Vec<Rebalance>>>,
    /// The ERROR lines it has logged, as they were written.
    errors: Arc<Mutex<Vec<String>>>,
}

/// A change of a daemon's assignment, from its log.
#[derive(Clone, Debug)]
pub struct Rebalance {
    pub at: Instant,
    pub group: String,
    /// Assigned (`true`) or revoked.
    pub assigned: bool,
    /// `topic[partition]`.
    pub partitions: Vec<String>,
}

impl Rebalance {
    fn from_log(entry: &Value) -> Option<Self> {
        let assigned = match entry["message"].as_str()? {
            "partitions assigned" => true,
            "partitions revoked: draining" => false,
            _ => return None,
        };
        let partitions = entry["partitions"].as_str()?;
        Some(Self {
            at: Instant::now(),
            group: entry["group"].as_str()?.to_string(),
            assigned,
            partitions: partitions
                .split(", ")
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

/// `commerce-events broker`: the embedded cluster alone in its own process, shared by
/// several daemons; killed when dropped.
pub struct BrokerProcess {
    process: Child,
    pub address: String,
}

impl BrokerProcess {
    /// Starts `binary broker` with one mock broker; members on the `consumer` group
    /// protocol get `session_timeout_ms`.
    pub fn start(binary: &Path, session_timeout_ms: u64) -> Self {
        let mut process = Command::new(binary)
            .args(["broker", "--brokers", "1"])
            .env_remove("RUST_LOG")
            .env("APP_CONFIG_FILE", "/nonexistent/commerce-events.toml")
            .env(
                "APP_KAFKA__CONSUMER__SESSION_TIMEOUT_MS",
                session_timeout_ms.to_string(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the broker starts");
        let mut stdout = BufReader::new(process.stdout.take().expect("stdout is piped"));
        let mut address = String::new();
        stdout
            .read_line(&mut address)
            .expect("the broker prints its address");
        // Keeps reading (a full pipe would stall the broker's log).
        std::thread::spawn(move || for _ in stdout.lines().map_while(Result::ok) {});
        let address = address.trim().to_string();
        assert!(!address.is_empty(), "the broker printed no address");
        Self { process, address }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Drop for Daemon {
    /// A drill that fails half-way must not leave its daemon running (holding MySQL
    /// connections the next drills need).
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Daemon {
    /// Starts `binary` on the database at `database_url`, keys under `key_prefix`, tokens
    /// signed with `jwt_secret`, with the embedded cluster unless `brokers` names others.
    pub fn start(
        binary: &Path,
        database_url: &str,
        key_prefix: &str,
        jwt_secret: &str,
        brokers: Option<&str>,
    ) -> Self {
        Self::start_with(binary, database_url, key_prefix, jwt_secret, brokers, &[])
    }

    /// [`Daemon::start`] with further `APP_…` variables (an instance id, group settings).
    pub fn start_with(
        binary: &Path,
        database_url: &str,
        key_prefix: &str,
        jwt_secret: &str,
        brokers: Option<&str>,
        environment: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(binary);
        if let Some(brokers) = brokers {
            command.env("APP_KAFKA__BROKERS", brokers);
        }
        command
            .env_remove("RUST_LOG")
            .env("APP_CONFIG_FILE", "/nonexistent/commerce-events.toml")
            .env("APP_HTTP__PORT", "0")
            .env("APP_DATABASE__URL", database_url)
            .env("APP_DATABASE__MAX_CONNECTIONS", "6")
            .env("APP_DATABASE__HTTP_MAX_CONNECTIONS", "6")
            .env("APP_REDIS__KEY_PREFIX", key_prefix)
            .env("APP_KAFKA__EMBEDDED_BROKERS", "1")
            .env("APP_AUTH__JWT_SECRET", jwt_secret)
            .env("APP_LIMITS__COUPON_ISSUE__PER_SECOND", "100000")
            .env("APP_LIMITS__COUPON_ISSUE__BURST", "100000")
            .env("APP_RECONCILE__AFTER_MS", "3000")
            .env("APP_RECONCILE__INTERVAL_MS", "1000")
            .env("APP_LOG__FORMAT", "json");
        for (key, value) in environment {
            command.env(key, value);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the daemon starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, receiver) = std::sync::mpsc::channel::<String>();
        let rebalances = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        // Reads every line for as long as the daemon runs (a full pipe would stall it).
        std::thread::spawn({
            let rebalances = rebalances.clone();
            let errors = errors.clone();
            move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if entry["level"] == "ERROR" {
                        errors.lock().unwrap().push(line.clone());
                    }
                    if entry["message"] == "HTTP listening"
                        && let Some(address) = entry["address"].as_str()
                    {
                        let _ = sender.send(address.to_string());
                    } else if let Some(rebalance) = Rebalance::from_log(&entry) {
                        rebalances.lock().unwrap().push(rebalance);
                    }
                }
            }
        });
        let address = receiver
            .recv_timeout(Duration::from_secs(120))
            .expect("the daemon logs its address");
        Self {
            child: Some(child),
            address,
            rebalances,
            errors,
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The ERROR lines this daemon logs, as they come (kept after it exits).
    pub fn error_log(&self) -> Arc<Mutex<Vec<String>>> {
        self.errors.clone()
    }

    /// The assignments and revocations this daemon has logged so far.
    pub fn rebalances(&self) -> Vec<Rebalance> {
        self.rebalances.lock().unwrap().clone()
    }

    /// The partitions of `group` this daemon holds now, by its log.
    pub fn holds(&self, group: &str) -> BTreeSet<String> {
        let mut held = BTreeSet::new();
        for rebalance in self.rebalances().iter().filter(|r| r.group == group) {
            for partition in &rebalance.partitions {
                if rebalance.assigned {
                    held.insert(partition.clone());
                } else {
                    held.remove(partition);
                }
            }
        }
        held
    }

    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([
                signal,
                &self.child.as_ref().expect("running").id().to_string(),
            ])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    }

    /// Waits for the process to end; its exit code (`None`: killed by a signal).
    pub async fn exited(mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        actix_rt::task::spawn_blocking(move || child.wait().expect("the daemon ends").code())
            .await
            .unwrap()
    }
}

pub async fn user_rows(database_url: &str, last: u64) {
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

pub fn coupon_body(stock: u32) -> Value {
    let now = chrono::Utc::now();
    serde_json::json!({
        "name": "Fault drill",
        "discountAmount": 1000,
        "totalQuantity": stock,
        "validFrom": now - chrono::Duration::hours(1),
        "validUntil": now + chrono::Duration::days(1),
    })
}
