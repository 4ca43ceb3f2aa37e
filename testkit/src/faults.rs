//! Fault drills: coupon load whose every request is counted as ok / failed / unknown
//! ([`Clients`], [`Ledger`]), and one [`Checker`] over MySQL that holds what the daemon did
//! against what the clients were told (nothing accepted lost or left undecided, nothing
//! over-issued, held twice or applied twice, nobody told of a coupon not issued, every result
//! pushed, no dead letter, each user's coupons issued in the order the user asked for them).
//! The faults themselves come from the edges: [`crate::proxy::TcpProxy`], the processes of
//! [`crate::process`], the embedded cluster's own fault injection.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use commerce_events::common::ids::UserId;
use commerce_events::config::Settings;
use commerce_events::guards::tokens::Authenticator;
use serde_json::Value;
use sqlx::MySqlPool;

use crate::wait::eventually;

/// How long everything accepted may take to become terminal once a fault is over.
pub const SETTLE: Duration = Duration::from_secs(120);

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
    /// Requests that got no answer when sent and turned out recorded when asked again
    /// (200): when they were accepted is known only from their commit (the checker places
    /// them by it).
    pub answered_late: BTreeSet<String>,
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

    /// One request of `user` for `coupon`, to the daemon the user's requests go to, counted.
    pub async fn issue(&self, user: u64, coupon: u64) {
        self.issue_at(&self.address_of(user), user, coupon).await
    }

    /// One request of `user` for `coupon`, to the daemon at `address`, counted.
    pub async fn issue_at(&self, address: &str, user: u64, coupon: u64) {
        let token = self
            .auth
            .mint(
                UserId::from_u64(user).unwrap(),
                false,
                Duration::from_secs(3_600),
            )
            .unwrap();
        let _gate = self.pass().await;
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
            let mut late = false;
            if !in_order.contains(&request_id) {
                match unanswered_at {
                    // 200: the request that got no answer had been recorded: it keeps that
                    // place until the checker places it by its commit.
                    Some(at) if status == StatusCode::OK => {
                        in_order[at] = request_id.clone();
                        late = true;
                    }
                    // 202: it had not; this one is new, accepted now.
                    _ => in_order.push(request_id.clone()),
                }
            }
            in_order.retain(|request| *request != place);
            if late {
                ledger.answered_late.insert(request_id.clone());
            }
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
        let rows: Vec<(String, String, Option<Value>, u64)> = sqlx::query_as(
            "SELECT event_id, status, result, accepted_seq FROM event_log \
             WHERE event_type = 'CouponRequested'",
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
        let ids: BTreeSet<&str> = rows.iter().map(|(id, _, _, _)| id.as_str()).collect();
        let accepted_seq: BTreeMap<String, u64> = rows
            .iter()
            .map(|(id, _, _, seq)| (id.clone(), *seq))
            .collect();
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
        for (id, status, result, _) in &rows {
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
        report.out_of_order = Self::users_out_of_order(ledger, &histories, &accepted_seq);
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
    /// the order the user's requests were accepted: as the clients saw it, but for requests
    /// that got no answer when sent (recorded, as asking again showed), which are placed by
    /// their commit (`accepted_seq`).
    pub fn users_out_of_order(
        ledger: &Ledger,
        histories: &[(u64, u64, String)],
        accepted_seq: &BTreeMap<String, u64>,
    ) -> u64 {
        let issued_at: BTreeMap<&str, usize> = histories
            .iter()
            .enumerate()
            .map(|(position, (_, _, request))| (request.as_str(), position))
            .collect();
        ledger
            .in_order
            .values()
            .filter(|requests| {
                let requests = placed_by_commit(requests, &ledger.answered_late, accepted_seq);
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
                    answered_late: ledger.answered_late.clone(),
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

/// A user's requests in the order the clients saw them accepted, with each request of
/// `late` (no answer when sent) moved to where its commit puts it: before the first answered
/// request committed after it.
fn placed_by_commit(
    requests: &[String],
    late: &BTreeSet<String>,
    accepted_seq: &BTreeMap<String, u64>,
) -> Vec<String> {
    let mut placed: Vec<String> = requests
        .iter()
        .filter(|request| !late.contains(*request))
        .cloned()
        .collect();
    for request in requests.iter().filter(|request| late.contains(*request)) {
        let Some(seq) = accepted_seq.get(request) else {
            placed.push(request.clone());
            continue;
        };
        let at = placed
            .iter()
            .position(|other| {
                !late.contains(other) && accepted_seq.get(other).is_some_and(|other| other > seq)
            })
            .unwrap_or(placed.len());
        placed.insert(at, request.clone());
    }
    placed
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

/// A drill's turn: held for the whole drill. Each drill runs daemon processes, a broker
/// and a load, and its progress deadlines assume a machine it shares with at most as many
/// drills as it has cores: with `--test-threads=8` on two cores, eight drills at once would
/// starve one another (every load's pace drops to a crawl and the drills fail on their
/// progress deadlines, not on an invariant), so the rest wait for a slot instead.
pub struct DrillSlot;

static SLOTS_TAKEN: Mutex<usize> = Mutex::new(0);
static SLOT_FREED: std::sync::Condvar = std::sync::Condvar::new();

/// Waits until fewer drills than the machine has cores are running, and takes a slot.
/// Called first thing in a drill, before its runtime has anything to do.
pub fn drill_slot() -> DrillSlot {
    let slots = std::thread::available_parallelism().map_or(2, usize::from);
    let mut taken = SLOTS_TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    while *taken >= slots {
        taken = SLOT_FREED
            .wait(taken)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    *taken += 1;
    DrillSlot
}

impl Drop for DrillSlot {
    fn drop(&mut self) {
        let mut taken = SLOTS_TAKEN
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *taken -= 1;
        SLOT_FREED.notify_one();
    }
}

/// Waits until `clients` have had `target` requests accepted in all; after `timeout`
/// panics naming `what` and how many were accepted.
pub async fn accepted_reach(clients: &Clients, target: u64, what: &str, timeout: Duration) {
    crate::wait::eventually_found(what, timeout, || async {
        let accepted = clients.accepted();
        if accepted >= target {
            Ok(())
        } else {
            Err(Some(format!("{accepted} of {target} requests accepted")))
        }
    })
    .await
}

/// The checker's own rules, on hand-made inputs: each can fail.
#[cfg(test)]
mod tests {
    use super::*;
    fn history(request: &str) -> (u64, u64, String) {
        (1, 7, request.to_string())
    }

    #[test]
    fn a_user_whose_coupons_were_issued_in_another_order_is_counted_once() {
        let mut ledger = Ledger::default();
        ledger
            .in_order
            .insert(7, vec!["a".into(), "b".into(), "c".into()]);
        ledger.in_order.insert(8, vec!["d".into(), "e".into()]);
        let seq = BTreeMap::new();
        let in_order = [history("a"), history("b"), history("d"), history("c")];
        assert_eq!(Checker::users_out_of_order(&ledger, &in_order, &seq), 0);
        // A request not issued (refused) says nothing about the order of the others.
        let refused_between = [history("a"), history("c")];
        assert_eq!(
            Checker::users_out_of_order(&ledger, &refused_between, &seq),
            0
        );
        let swapped = [history("b"), history("a"), history("e"), history("d")];
        assert_eq!(Checker::users_out_of_order(&ledger, &swapped, &seq), 2);
        let last_first = [history("c"), history("a"), history("b"), history("d")];
        assert_eq!(Checker::users_out_of_order(&ledger, &last_first, &seq), 1);
    }

    #[test]
    fn a_request_that_got_no_answer_is_placed_by_its_commit() {
        // "b" got no answer when sent after "a"; asked again after "c" was answered, it
        // turned out recorded, committed after "c".
        let mut ledger = Ledger::default();
        ledger
            .in_order
            .insert(7, vec!["a".into(), "b".into(), "c".into()]);
        ledger.answered_late.insert("b".into());
        let seq: BTreeMap<String, u64> = [("a", 1), ("c", 2), ("b", 3)]
            .into_iter()
            .map(|(request, seq)| (request.to_string(), seq))
            .collect();
        let issued = [history("a"), history("c"), history("b")];
        assert_eq!(Checker::users_out_of_order(&ledger, &issued, &seq), 0);
        let by_client_order = [history("a"), history("b"), history("c")];
        assert_eq!(
            Checker::users_out_of_order(&ledger, &by_client_order, &seq),
            1
        );
    }
}
