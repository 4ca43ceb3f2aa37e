//! Several daemon processes in one consumer group, on one separate broker process
//! (`commerce-events broker`), under coupon load: members join, leave with SIGTERM, die
//! with SIGKILL and restart one at a time. Each scenario ends with the shared checker
//! (nothing lost, stranded, applied twice or over-issued, every result pushed, each user's
//! coupons issued in the order the user asked for them) and prints what moved: partitions
//! revoked per member, and how long each moved partition went unconsumed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use commerce_events::startup::{COUPON_REQUEST_GROUP, RESULT_NOTIFIER_GROUP_PREFIX};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use testkit::faults::{Checker, Clients, assert_kept_every_promise, coupon_body, user_rows};
use testkit::process::{BrokerProcess, Daemon};

use testkit::database::{TEST_JWT_SECRET, TestDatabase};
use testkit::faults::accepted_reach;
use testkit::wait::eventually;

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-events");
/// The members' session timeout: a SIGKILLed member's partitions must move within it (and
/// the broker's rebalance).
const SESSION_TIMEOUT_MS: u64 = 10_000;
/// Users, each asking for every coupon in turn.
const USERS: u64 = 600;
const COUPONS: usize = 3;
/// A new user starts about this often (about 40 s of load).
const LOAD_USERS_PER_SECOND: u64 = 15;
/// Partitions of `coupon-requests` (the default).
const PARTITIONS: usize = 3;
/// Buyers paying orders throughout, each one order of one unit at a time, and the products
/// they buy.
const BUYERS: u64 = 3;
const PRODUCTS: usize = 3;

/// The group protocol and assignment the members run with.
#[derive(Clone, Copy, Debug)]
enum Membership {
    /// Classic protocol, `cooperative-sticky`, dynamic members.
    Cooperative,
    /// Classic protocol, `range` (stop-the-world), dynamic members.
    Eager,
    /// KIP-848 (the broker assigns) with static members.
    StaticConsumerProtocol,
}

impl Membership {
    fn environment(self) -> Vec<(&'static str, &'static str)> {
        let mut environment = vec![
            // The mock broker holds an empty fetch for the whole wait.
            ("APP_KAFKA__CONSUMER__FETCH_WAIT_MAX_MS", "10"),
            // Each buyer orders and pays up to 10 times a second.
            ("APP_LIMITS__ORDER_CREATE__PER_SECOND", "1000"),
            ("APP_LIMITS__ORDER_CREATE__BURST", "1000"),
            ("APP_LIMITS__PAYMENT__PER_SECOND", "1000"),
            ("APP_LIMITS__PAYMENT__BURST", "1000"),
        ];
        match self {
            Membership::Cooperative => environment.extend([
                ("APP_KAFKA__CONSUMER__ASSIGNMENT", "cooperative"),
                ("APP_KAFKA__CONSUMER__STATIC_MEMBERSHIP", "false"),
            ]),
            Membership::Eager => environment.extend([
                ("APP_KAFKA__CONSUMER__ASSIGNMENT", "eager"),
                ("APP_KAFKA__CONSUMER__STATIC_MEMBERSHIP", "false"),
            ]),
            Membership::StaticConsumerProtocol => environment.extend([
                ("APP_KAFKA__CONSUMER__GROUP_PROTOCOL", "consumer"),
                ("APP_KAFKA__CONSUMER__STATIC_MEMBERSHIP", "true"),
            ]),
        }
        environment
    }
}

/// One broker process, one database, the members started on them, and the load.
struct Group {
    broker: BrokerProcess,
    database: TestDatabase,
    membership: Membership,
    clients: Clients,
    coupons: Vec<u64>,
    group: String,
    payments: Payments,
    /// The ERROR lines of every member started, for the checks no daemon log can skip.
    error_logs: Mutex<Vec<Arc<Mutex<Vec<String>>>>>,
}

/// The payment load: buyers ordering and paying through the members (a buyer always goes
/// to the same one, as a coupon user does), every paid unit counted by product.
#[derive(Clone, Default)]
struct Payments {
    products: Vec<u64>,
    buyers: Vec<u64>,
    paid: Arc<Mutex<BTreeMap<u64, u64>>>,
    /// Answers other than 201 to an order or 200 to its payment, or no answer, except
    /// refusals.
    failed: Arc<Mutex<Vec<String>>>,
    /// 503s with the error body (an overloaded pool): the order or payment did not happen.
    refused: Arc<Mutex<u64>>,
    stop: Arc<AtomicBool>,
}

impl Group {
    async fn new(membership: Membership) -> (Self, Daemon) {
        let broker = BrokerProcess::start(Path::new(BINARY), SESSION_TIMEOUT_MS);
        let database = TestDatabase::new();
        let settings = database.settings();
        let group = settings.kafka.group_id(COUPON_REQUEST_GROUP);
        let clients = Clients::new("http://unused", &settings);
        let mut this = Self {
            broker,
            database,
            membership,
            clients,
            coupons: Vec::new(),
            group,
            payments: Payments::default(),
            error_logs: Mutex::default(),
        };
        let first = this.member("a");
        this.clients.point_at(&first.address);
        this.clients.wait_ready().await;
        user_rows(&this.database.url(), USERS).await;
        for _ in 0..COUPONS {
            let (status, coupon) = this
                .clients
                .admin("/coupons", coupon_body(USERS as u32))
                .await;
            assert_eq!(status, StatusCode::CREATED, "{coupon}");
            this.coupons.push(coupon["couponId"].as_u64().unwrap());
        }
        for product in 0..PRODUCTS {
            let (status, created) = this
                .clients
                .admin(
                    "/products",
                    serde_json::json!({"name": format!("Lamp {product}"), "price": 10, "stock": 1_000_000}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            this.payments
                .products
                .push(created["productId"].as_u64().unwrap());
        }
        for _ in 0..BUYERS {
            let (status, created) = this
                .clients
                .admin("/users", serde_json::json!({"name": "Buyer"}))
                .await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            let buyer = created["userId"].as_u64().unwrap();
            let (status, charged) = this
                .as_buyer(
                    buyer,
                    &format!("/users/{buyer}/balance/charge"),
                    serde_json::json!({"amount": 100_000_000}),
                )
                .await
                .expect("the charge is answered");
            assert_eq!(status, StatusCode::OK, "{charged}");
            this.payments.buyers.push(buyer);
        }
        (this, first)
    }

    /// A `POST` as `buyer`, to the member the buyer's requests go to.
    async fn as_buyer(
        &self,
        buyer: u64,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(StatusCode, serde_json::Value), String> {
        as_buyer(&self.clients, buyer, path, body).await
    }

    /// Every buyer orders and pays, one order after another, until [`Group::stop_payments`].
    fn payments_in_background(&self) -> Vec<actix_rt::task::JoinHandle<()>> {
        self.payments
            .buyers
            .iter()
            .enumerate()
            .map(|(position, &buyer)| {
                let (clients, payments) = (self.clients.clone(), self.payments.clone());
                actix_rt::spawn(async move {
                    let product = payments.products[position % payments.products.len()];
                    while !payments.stop.load(Ordering::SeqCst) {
                        actix_rt::time::sleep(Duration::from_millis(250)).await;
                        // Held back while users move, like the coupon requests.
                        let pass = clients.pass().await;
                        let order = as_buyer(
                            &clients,
                            buyer,
                            "/orders",
                            serde_json::json!({"userId": buyer,
                                "items": [{"productId": product, "quantity": 1}]}),
                        )
                        .await;
                        let order = match order {
                            Ok((StatusCode::CREATED, order)) => order["orderId"].as_u64().unwrap(),
                            Ok((StatusCode::SERVICE_UNAVAILABLE, body))
                                if body["error"]["code"].is_string() =>
                            {
                                *payments.refused.lock().unwrap() += 1;
                                continue;
                            }
                            other => {
                                payments
                                    .failed
                                    .lock()
                                    .unwrap()
                                    .push(format!("order: {other:?}"));
                                continue;
                            }
                        };
                        let paid = as_buyer(
                            &clients,
                            buyer,
                            &format!("/orders/{order}/pay"),
                            serde_json::Value::Null,
                        )
                        .await;
                        match paid {
                            Ok((StatusCode::OK, _)) => {
                                *payments.paid.lock().unwrap().entry(product).or_default() += 1
                            }
                            // Refused: not paid (the ranking check below would see otherwise).
                            Ok((StatusCode::SERVICE_UNAVAILABLE, body))
                                if body["error"]["code"].is_string() =>
                            {
                                *payments.refused.lock().unwrap() += 1
                            }
                            other => payments
                                .failed
                                .lock()
                                .unwrap()
                                .push(format!("pay: {other:?}")),
                        }
                        drop(pass);
                    }
                })
            })
            .collect()
    }

    /// Stops the payment load and waits for its last payments.
    async fn stop_payments(&self, buyers: Vec<actix_rt::task::JoinHandle<()>>) {
        self.payments.stop.store(true, Ordering::SeqCst);
        for buyer in buyers {
            buyer.await.unwrap();
        }
    }

    /// Every order and payment answered (201 or 200, or refused with a 503 and the error
    /// body), and the ranking counts each paid unit exactly once.
    async fn check_payments(&self, scenario: &str) {
        let failed = self.payments.failed.lock().unwrap().clone();
        assert!(
            failed.is_empty(),
            "{scenario}: {} order or payment requests failed, the first: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        let paid = self.payments.paid.lock().unwrap().clone();
        let total: u64 = paid.values().sum();
        assert!(total > 0, "{scenario}: orders were paid");
        let address = self.clients.address_of(0);
        let client = awc::Client::default();
        let mut counted = BTreeMap::new();
        let settled = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let ranking: serde_json::Value = client
                    .get(format!("{address}/products/ranking?limit=10"))
                    .send()
                    .await
                    .expect("the ranking answers")
                    .json()
                    .await
                    .unwrap();
                counted = ranking
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|entry| {
                        (
                            entry["productId"].as_u64().unwrap(),
                            entry["quantity"].as_u64().unwrap(),
                        )
                    })
                    .collect();
                // More than paid never comes back down: stop there too.
                if counted == paid
                    || counted.iter().any(|(product, quantity)| {
                        *quantity > paid.get(product).copied().unwrap_or(0)
                    })
                {
                    return;
                }
                actix_rt::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        assert_eq!(
            counted, paid,
            "{scenario}: the ranking counts every paid unit once (settled: {settled:?})"
        );
        eprintln!(
            "{scenario}: {total} payments, each counted once by the ranking; {} orders or \
             payments refused (503)",
            self.payments.refused.lock().unwrap()
        );
    }

    /// Starts the member `instance`.
    fn member(&self, instance: &str) -> Daemon {
        let mut environment = self.membership.environment();
        environment.push(("APP_INSTANCE__ID", instance));
        let member = Daemon::start_with(
            Path::new(BINARY),
            &self.database.url(),
            &format!("{}:", self.database.name),
            TEST_JWT_SECRET,
            Some(&self.broker.address),
            &environment,
        );
        self.error_logs.lock().unwrap().push(member.error_log());
        member
    }

    /// Waits until these members hold every `coupon-requests` partition between them, each
    /// exactly once; returns how long that took.
    async fn shared_by(&self, members: &[&Daemon], within: Duration) -> Duration {
        let started = Instant::now();
        eventually(
            &format!(
                "{} partitions shared by {} members",
                PARTITIONS,
                members.len()
            ),
            within,
            || async {
                let held: Vec<BTreeSet<String>> = members
                    .iter()
                    .map(|member| requests_partitions(&member.holds(&self.group)))
                    .collect();
                let all: BTreeSet<&String> = held.iter().flatten().collect();
                all.len() == PARTITIONS
                    && held.iter().map(BTreeSet::len).sum::<usize>() == PARTITIONS
                    && held.iter().all(|partitions| !partitions.is_empty())
            },
        )
        .await;
        started.elapsed()
    }

    /// Moves every user to `addresses` between two requests (none in flight while the
    /// addresses change, so the ledger knows which member answered what). Nothing waits for
    /// the requests accepted by the member being left to reach Kafka: a user's next request,
    /// accepted by another member, may reach its partition first, and the CouponIssuer still
    /// decides the two in the order they were accepted (the checker counts users out of
    /// order).
    async fn move_users_to(&self, addresses: &[&str]) {
        let _held = self.clients.hold().await;
        self.clients.spread_over(addresses);
    }

    /// Waits for `more` requests accepted (or the whole load).
    async fn accepted_at_least(&self, more: u64) {
        let target = (self.clients.accepted() + more).min(USERS * COUPONS as u64);
        // Generous: with other drills beside it on two cores, a classic rebalance takes
        // tens of seconds and the clients' pace drops.
        accepted_reach(
            &self.clients,
            target,
            "the load goes on",
            Duration::from_secs(120),
        )
        .await;
    }

    /// Ends the scenario: every request answered, the checker over MySQL.
    async fn settle(&self, scenario: &str) {
        self.clients.ask_again_unknown().await;
        let checker = Checker::connect(&self.database.url()).await;
        let (report, recovery) = checker.settle(&self.clients, &self.coupons).await;
        if report.out_of_order > 0 {
            let in_order = self.clients.ledger.lock().unwrap().in_order.clone();
            eprintln!(
                "{scenario}: out of order:\n{}",
                self.explain_out_of_order(&in_order).await
            );
        }
        // A record on a group's own queue is read again once its partition is split off;
        // a partition that cannot be split would leave its records to the reconciler.
        let unsplittable: Vec<String> = self
            .error_logs
            .lock()
            .unwrap()
            .iter()
            .flat_map(|log| log.lock().unwrap().clone())
            .filter(|line| line.contains("cannot split partition queue"))
            .collect();
        assert!(
            unsplittable.is_empty(),
            "{scenario}: a partition's queue could not be split: {unsplittable:#?}"
        );
        let ledger = self.clients.ledger.lock().unwrap();
        assert_kept_every_promise(scenario, &report, &ledger);
        assert!(ledger.unanswered.is_empty(), "asked again: {ledger:?}");
        let complete = ledger
            .in_order
            .values()
            .filter(|requests| requests.len() == COUPONS)
            .count();
        assert_eq!(
            complete, USERS as usize,
            "every user asked for every coupon: {ledger:?}"
        );
        eprintln!("{scenario}: settled {recovery:?} after the load; {report:?}");
    }
}

impl Group {
    /// For each user whose coupons were issued out of order: each request in the order it
    /// was accepted, with its event-log times, its coupon history and where its records
    /// are on `coupon-requests`.
    async fn explain_out_of_order(
        &self,
        in_order: &std::collections::BTreeMap<u64, Vec<String>>,
    ) -> String {
        let pool = sqlx::MySqlPool::connect(&self.database.url())
            .await
            .unwrap();
        let histories: Vec<(u64, u64, String)> = sqlx::query_as(
            "SELECT coupon_history_id, user_id, request_id FROM coupon_history \
             ORDER BY coupon_history_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let history_of: std::collections::BTreeMap<&str, u64> = histories
            .iter()
            .map(|(id, _, request)| (request.as_str(), *id))
            .collect();
        let records = records_of(&self.broker.address).await;
        let mut out = String::new();
        for (user, requests) in in_order {
            let ids: Vec<u64> = requests
                .iter()
                .filter_map(|request| history_of.get(request.as_str()).copied())
                .collect();
            if !ids.windows(2).any(|pair| pair[0] > pair[1]) {
                continue;
            }
            out.push_str(&format!("user {user}:\n"));
            for request in requests {
                let row: Option<(String, String, String, Option<String>)> = sqlx::query_as(
                    "SELECT status, CAST(created_at AS CHAR), CAST(updated_at AS CHAR), \
                     CAST(published_at AS CHAR) FROM event_log WHERE event_id = ?",
                )
                .bind(request)
                .fetch_optional(&pool)
                .await
                .unwrap();
                out.push_str(&format!(
                    "  {request}: history {:?}, row {row:?}, records {:?}\n",
                    history_of.get(request.as_str()),
                    records.get(request.as_str()),
                ));
            }
        }
        pool.close().await;
        out
    }
}

/// Where each event's records are on `coupon-requests`: `(partition, offset)` by event id.
async fn records_of(broker: &str) -> std::collections::BTreeMap<String, Vec<(i32, i64)>> {
    let broker = broker.to_string();
    actix_rt::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &broker)
            .set("group.id", "out-of-order-explainer")
            .set("enable.auto.commit", "false")
            .create()
            .expect("a consumer that reads the topic");
        let mut partitions = TopicPartitionList::new();
        let mut ends = std::collections::BTreeMap::new();
        for partition in 0..PARTITIONS as i32 {
            partitions
                .add_partition_offset("coupon-requests", partition, Offset::Beginning)
                .unwrap();
            let (_, high) = consumer
                .fetch_watermarks("coupon-requests", partition, Duration::from_secs(10))
                .unwrap();
            ends.insert(partition, high);
        }
        consumer.assign(&partitions).unwrap();
        let mut found: std::collections::BTreeMap<String, Vec<(i32, i64)>> = Default::default();
        let mut at: std::collections::BTreeMap<i32, i64> = Default::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && ends
                .iter()
                .any(|(partition, high)| at.get(partition).copied().unwrap_or(-1) + 1 < *high)
        {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            use rdkafka::Message;
            at.insert(message.partition(), message.offset());
            let Some(payload) = message.payload() else {
                continue;
            };
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload)
                && let Some(id) = value["eventId"].as_str()
            {
                found
                    .entry(id.to_string())
                    .or_default()
                    .push((message.partition(), message.offset()));
            }
        }
        found
    })
    .await
    .unwrap()
}

/// The `coupon-requests` records these members consumed again after deciding them (the
/// `duplicate` outcome of `consumer_records_total`), summed over their `/metrics`; a member's
/// count starts at 0 when it starts.
async fn redelivered(members: &[&Daemon]) -> u64 {
    let client = awc::Client::default();
    let mut total = 0.0;
    for member in members {
        let mut response = client
            .get(format!("{}/metrics", member.address))
            .send()
            .await
            .expect("the member answers /metrics");
        let body = response.body().limit(16 << 20).await.unwrap();
        total += String::from_utf8_lossy(&body)
            .lines()
            .filter(|line| {
                line.starts_with("consumer_records_total{")
                    && line.contains(r#"topic="coupon-requests""#)
                    && line.contains(r#"outcome="duplicate""#)
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total as u64
}

/// A `POST` as `buyer` to the member its requests go to: the status and body, or why there
/// was no answer.
async fn as_buyer(
    clients: &Clients,
    buyer: u64,
    path: &str,
    body: serde_json::Value,
) -> Result<(StatusCode, serde_json::Value), String> {
    let token = clients
        .auth
        .mint(
            commerce_events::common::ids::UserId::from_u64(buyer).unwrap(),
            false,
            Duration::from_secs(3_600),
        )
        .unwrap();
    let request = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish()
        .post(format!("{}{path}", clients.address_of(buyer)))
        .bearer_auth(token);
    let sent = if body.is_null() {
        request.send().await
    } else {
        request.send_json(&body).await
    };
    let mut response = sent.map_err(|error| error.to_string())?;
    let status = response.status();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, body))
}

/// Whether `partition` (`topic[n]`, as the log names it) is one of `coupon-requests`.
fn is_requests_partition(partition: &str) -> bool {
    partition.starts_with("coupon-requests[")
}

fn requests_partitions(held: &BTreeSet<String>) -> BTreeSet<String> {
    held.iter()
        .filter(|partition| is_requests_partition(partition))
        .cloned()
        .collect()
}

/// How many `coupon-requests` partitions `member` gave up after `since`.
fn revoked_since(member: &Daemon, group: &str, since: Instant) -> usize {
    member
        .rebalances()
        .iter()
        .filter(|r| r.group == group && !r.assigned && r.at >= since)
        .flat_map(|r| r.partitions.iter())
        .filter(|partition| is_requests_partition(partition))
        .count()
}

/// The longest a `coupon-requests` partition went unconsumed after `since`: from its
/// revocation (or `since`, for a killed member's) to its next assignment anywhere.
fn longest_pause(members: &[&Daemon], group: &str, since: Instant) -> Duration {
    let mut events: Vec<_> = members
        .iter()
        .flat_map(|member| member.rebalances())
        .filter(|r| r.group == group && r.at >= since)
        .collect();
    events.sort_by_key(|r| r.at);
    let mut longest = Duration::ZERO;
    let mut open: std::collections::BTreeMap<String, Instant> = Default::default();
    for event in events {
        for partition in event
            .partitions
            .iter()
            .filter(|partition| is_requests_partition(partition))
        {
            if event.assigned {
                let from = open.remove(partition).unwrap_or(since);
                longest = longest.max(event.at.duration_since(from));
            } else {
                open.insert(partition.clone(), event.at);
            }
        }
    }
    longest
}

#[actix_web::test]
async fn members_joining_leaving_and_dying_under_load_lose_repeat_and_reorder_nothing() {
    let _slot = testkit::faults::drill_slot();
    members_join_die_and_leave(Membership::Cooperative).await;
}

#[actix_web::test]
async fn on_the_consumer_protocol_members_joining_leaving_and_dying_lose_nothing() {
    let _slot = testkit::faults::drill_slot();
    members_join_die_and_leave(Membership::StaticConsumerProtocol).await;
}

/// A third member joins two under load, is SIGKILLed, then the second leaves with SIGTERM.
async fn members_join_die_and_leave(membership: Membership) {
    let scenario = format!("members join, die and leave ({membership:?})");
    let (group, a) = Group::new(membership).await;
    let b = group.member("b");
    group.clients.spread_over(&[&a.address, &b.address]);
    group.shared_by(&[&a, &b], Duration::from_secs(60)).await;
    let load = group.clients.load_in_order_in_background(
        1..=USERS,
        group.coupons.clone(),
        LOAD_USERS_PER_SECOND,
    );
    let buyers = group.payments_in_background();
    group.accepted_at_least(200).await;

    // A third member joins (it takes no requests, it consumes).
    let joined = Instant::now();
    let before_join = redelivered(&[&a, &b]).await;
    let c = group.member("c");
    let join = group
        .shared_by(&[&a, &b, &c], Duration::from_secs(60))
        .await;
    let moved_on_join =
        revoked_since(&a, &group.group, joined) + revoked_since(&b, &group.group, joined);
    group.accepted_at_least(200).await;
    let redelivered_on_join = redelivered(&[&a, &b, &c]).await.saturating_sub(before_join);

    // It dies: its partitions go to the others within the session timeout.
    let killed = Instant::now();
    let before_kill = redelivered(&[&a, &b]).await;
    c.signal("-KILL");
    c.exited().await;
    let resumed = group
        .shared_by(
            &[&a, &b],
            Duration::from_millis(SESSION_TIMEOUT_MS) + Duration::from_secs(20),
        )
        .await;
    let pause_after_kill = longest_pause(&[&a, &b], &group.group, killed);
    group.accepted_at_least(200).await;
    let redelivered_on_kill = redelivered(&[&a, &b]).await.saturating_sub(before_kill);

    // A member leaves cleanly; its users move to the other first.
    let left = Instant::now();
    group.move_users_to(&[&a.address]).await;
    let before_leave = redelivered(&[&a]).await;
    b.signal("-TERM");
    assert_eq!(b.exited().await, Some(0), "SIGTERM ends a member cleanly");
    let taken_over = group.shared_by(&[&a], Duration::from_secs(30)).await;
    let pause_after_leave = longest_pause(&[&a], &group.group, left);

    load.await.unwrap();
    group.stop_payments(buyers).await;
    group.settle(&scenario).await;
    group.check_payments(&scenario).await;
    let redelivered_on_leave = redelivered(&[&a]).await.saturating_sub(before_leave);
    eprintln!(
        "{scenario}: join shared in {join:?} ({moved_on_join} partitions \
         revoked from the members that stayed, {redelivered_on_join} records redelivered); \
         SIGKILL: resumed in {resumed:?}, longest pause {pause_after_kill:?}, \
         {redelivered_on_kill} records redelivered; SIGTERM: taken over in {taken_over:?}, \
         longest pause {pause_after_leave:?}, {redelivered_on_leave} records redelivered"
    );
    a.signal("-TERM");
    a.exited().await;

    // No sprawl: the shared group keeps its offsets; the members' own result-notifier groups
    // committed none, so nothing is left of them once their members are gone.
    let broker = &group.broker.address;
    assert_eq!(
        committed(broker, &group.group, "coupon-requests").await,
        PARTITIONS,
        "the control: the shared group's offsets are readable"
    );
    for instance in ["a", "b", "c"] {
        let notifier = format!("{RESULT_NOTIFIER_GROUP_PREFIX}{instance}");
        assert_eq!(
            committed(broker, &notifier, "coupon-results").await,
            0,
            "{notifier} left no committed offsets behind"
        );
    }
}

/// How many partitions of `topic` have an offset committed by `group`.
async fn committed(broker: &str, group: &str, topic: &str) -> usize {
    let (broker, group, topic) = (broker.to_string(), group.to_string(), topic.to_string());
    actix_rt::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &broker)
            .set("group.id", &group)
            .create()
            .expect("a consumer that only reads offsets");
        let mut partitions = TopicPartitionList::new();
        for partition in 0..PARTITIONS as i32 {
            partitions.add_partition(&topic, partition);
        }
        consumer
            .committed_offsets(partitions, Duration::from_secs(10))
            .expect("the broker answers OffsetFetch")
            .elements()
            .iter()
            .filter(|element| matches!(element.offset(), Offset::Offset(_)))
            .count()
    })
    .await
    .unwrap()
}

/// Restarts every member in turn (its users moved to another member meanwhile) and returns
/// the partitions the members that stayed gave up.
async fn rolling_restart(membership: Membership) -> usize {
    let scenario = format!("rolling restart ({membership:?})");
    let (group, a) = Group::new(membership).await;
    let b = group.member("b");
    let mut members = vec![a, b];
    group
        .clients
        .spread_over(&[&members[0].address, &members[1].address]);
    group
        .shared_by(&[&members[0], &members[1]], Duration::from_secs(60))
        .await;
    let load = group.clients.load_in_order_in_background(
        1..=USERS,
        group.coupons.clone(),
        LOAD_USERS_PER_SECOND,
    );
    let buyers = group.payments_in_background();
    group.accepted_at_least(150).await;
    let mut moved_from_stayers = 0;
    for (restarting, instance) in ["a", "b"].into_iter().enumerate() {
        let old = members.remove(restarting);
        let before = old.holds(&group.group);
        let since = Instant::now();
        group.move_users_to(&[&members[0].address]).await;
        let redelivered_before = redelivered(&[&members[0]]).await;
        old.signal("-TERM");
        assert_eq!(old.exited().await, Some(0), "{scenario}: clean exit");
        members.insert(restarting, group.member(instance));
        let staying = 1 - restarting;
        let (first, second) = (&members[0], &members[1]);
        group
            .move_users_to(&[&first.address, &second.address])
            .await;
        let shared = group
            .shared_by(&[first, second], Duration::from_secs(60))
            .await;
        let moved = revoked_since(&members[staying], &group.group, since);
        moved_from_stayers += moved;
        let pause = longest_pause(&[first, second], &group.group, since);
        group.accepted_at_least(100).await;
        let redelivered_since = redelivered(&[&members[0], &members[1]])
            .await
            .saturating_sub(redelivered_before);
        eprintln!(
            "{scenario}: member {instance} back and sharing in {shared:?}; it held {before:?} \
             and holds {:?}; the member that stayed gave up {moved} partitions; longest \
             pause {pause:?}; {redelivered_since} records redelivered",
            members[restarting].holds(&group.group),
        );
    }
    load.await.unwrap();
    group.stop_payments(buyers).await;
    group.settle(&scenario).await;
    group.check_payments(&scenario).await;
    for member in members {
        member.signal("-TERM");
        member.exited().await;
    }
    moved_from_stayers
}

#[actix_web::test]
async fn a_rolling_restart_with_static_members_moves_no_partition_of_a_member_that_stays() {
    let _slot = testkit::faults::drill_slot();
    let moved = rolling_restart(Membership::StaticConsumerProtocol).await;
    assert_eq!(
        moved, 0,
        "static members on the consumer protocol keep their partitions across a restart"
    );
}

#[actix_web::test]
async fn a_rolling_restart_with_eager_rebalancing_loses_nothing() {
    let _slot = testkit::faults::drill_slot();
    // The comparison: every restart makes the member that stays give up its partitions.
    let moved = rolling_restart(Membership::Eager).await;
    assert!(moved > 0, "eager rebalancing revokes everything, twice");
}
