//! The fault-injection suite: coupon load through crashes, restarts, outages of the broker,
//! MySQL and Redis, a poisoned business row and a group member coming and going. Every
//! scenario counts each request as ok / failed / unknown and ends with one shared
//! `Checker` over MySQL (and the dead-letter record): nothing accepted is lost or
//! stranded, nothing is over-issued, held twice or applied twice, nobody is told of a coupon
//! that was not issued, no push is missing, and no outage dead-letters anything.
//!
//! MySQL and Redis outages go through a `TcpProxy` the test controls, so the machine's own
//! servers keep running; the crash scenarios run the built binary as an operator does and
//! kill it. The drill pieces live in `commerce_events::faults`, shared with `bench faults`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use commerce_events::config::Settings;
use commerce_events::kafka::cluster::KafkaCluster;
use commerce_events::startup::COUPON_REQUEST_GROUP;
use secrecy::ExposeSecret;
use serde_json::Value;
use testkit::faults::{
    Checker, Clients, Ledger, Report, SETTLE, assert_kept_every_promise, coupon_body, user_rows,
};
use testkit::process::{Daemon, TansuBroker};
use testkit::proxy::TcpProxy;

use testkit::app::TestApp;
use testkit::database::{TEST_JWT_SECRET, TestDatabase};
use testkit::faults::accepted_reach;
use testkit::wait::eventually;

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-events");
/// How long the outages last.
const OUTAGE: Duration = Duration::from_secs(30);

/// Short reconciler bounds, so a re-drive comes within the scenario.
fn fault_settings(settings: &mut Settings) {
    settings.reconcile.after_ms = 3_000;
    settings.reconcile.interval_ms = 1_000;
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

// ---------------------------------------------------------------------------------------
// Crashes of the binary.

/// Coupon load with a backlog (the issuer's group paused), the daemon killed with `signal`
/// in the middle of it, restarted on the same database (and a fresh embedded cluster).
async fn crash_under_load_with_a_backlog(signal: &str, brokers: Option<&str>) {
    let scenario = format!(
        "{signal} under load with a backlog ({})",
        brokers.map_or("embedded cluster", |_| "separate broker")
    );
    let database = TestDatabase::new();
    let settings = database.settings();
    let start = || {
        Daemon::start(
            Path::new(BINARY),
            &database.url(),
            &format!("{}:", database.name),
            TEST_JWT_SECRET,
            brokers,
        )
    };
    let first = start();
    let clients = Clients::new(&first.address, &settings);
    clients.wait_ready().await;
    user_rows(&database.url(), 800).await;
    let (status, coupon) = clients.admin("/coupons", coupon_body(150)).await;
    assert_eq!(status, StatusCode::CREATED, "{coupon}");
    let coupon = coupon["couponId"].as_u64().unwrap();

    // A decided part, then a backlog the issuer has not read when the daemon dies.
    clients.load(1..=150, coupon, 8).await;
    let group = settings.kafka.group_id(COUPON_REQUEST_GROUP);
    let (status, paused) = clients
        .admin(
            &format!("/admin/consumer-groups/{group}/pause"),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    clients.load(151..=450, coupon, 8).await;
    let load = clients.load_in_background(451..=800, coupon, 200);
    let accepted_before = clients.accepted();
    accepted_reach(
        &clients,
        accepted_before + 50,
        "more requests accepted under load",
        Duration::from_secs(60),
    )
    .await;
    first.signal(signal);
    let code = first.exited().await;
    if signal == "-TERM" {
        assert_eq!(code, Some(0), "SIGTERM ends the daemon cleanly");
    }
    let second = start();
    clients.point_at(&second.address);
    clients.wait_ready().await;
    load.await.unwrap();
    clients.ask_again_unknown().await;

    let checker = Checker::connect(&database.url()).await;
    let (report, recovery) = checker.settle(&clients, &[coupon]).await;
    {
        let ledger = clients.ledger.lock().unwrap();
        assert_kept_every_promise(&scenario, &report, &ledger);
        assert!(ledger.unanswered.is_empty(), "asked again: {ledger:?}");
        eprintln!("{scenario}: settled {recovery:?} after the restart");
    }
    second.signal("-TERM");
    second.exited().await;
}

#[actix_web::test]
async fn sigkill_under_coupon_load_with_a_backlog_loses_and_strands_nothing() {
    let _slot = testkit::faults::drill_slot();
    crash_under_load_with_a_backlog("-KILL", None).await;
}

#[actix_web::test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs the tansu broker (feature external-tools; scripts/test installs it)"
)]
async fn sigkill_against_a_separate_broker_process_loses_and_strands_nothing() {
    let _slot = testkit::faults::drill_slot();
    // The broker outlives the daemon: the restarted daemon rejoins the groups the killed
    // one held (the broker expires the dead member after the session timeout) and goes on
    // from the committed offsets.
    let broker = TansuBroker::start().await;
    crash_under_load_with_a_backlog("-KILL", Some(&broker.address)).await;
}

#[actix_web::test]
async fn sigterm_under_coupon_load_with_a_backlog_loses_and_strands_nothing() {
    let _slot = testkit::faults::drill_slot();
    crash_under_load_with_a_backlog("-TERM", None).await;
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
    clients.ask_again_unknown().await;
    let (report, _) = checker.settle(&clients, &[coupon]).await;
    let ledger = std::mem::take(&mut *clients.ledger.lock().unwrap());
    assert_kept_every_promise(scenario, &report, &ledger);
    (ledger, report, recovery)
}

#[actix_web::test]
async fn the_broker_down_for_30_seconds_under_load_loses_nothing() {
    let _slot = testkit::faults::drill_slot();
    let app = TestApp::builder().settings(fault_settings).start().await;
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
    let _slot = testkit::faults::drill_slot();
    let proxy = TcpProxy::start("127.0.0.1:3306".parse().unwrap());
    let port = proxy.port;
    let app = TestApp::builder()
        .settings(move |settings| {
            fault_settings(settings);
            let direct = settings.database.url.expose_secret().to_string();
            settings.database.url = direct.replace(":3306/", &format!(":{port}/")).into();
        })
        .start()
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

/// Orders paid while Redis is cut.
const PAID_DURING_THE_CUT: u64 = 10;

#[actix_web::test]
async fn redis_cut_for_30_seconds_under_load_loses_nothing() {
    let _slot = testkit::faults::drill_slot();
    let proxy = TcpProxy::start("127.0.0.1:6379".parse().unwrap());
    let port = proxy.port;
    let app = TestApp::builder()
        .settings(move |settings| {
            fault_settings(settings);
            settings.redis.url = format!("redis://127.0.0.1:{port}").into();
        })
        .start()
        .await;
    let product = app.create_product("Lamp", 100, 100).await;
    let buyer = app.create_user(1_000_000).await;
    // Orders paid while Redis is away: the payments are not held up by the product cache,
    // and the ranking and the cache get every one of them once Redis is back.
    let payments = async {
        eventually("Redis cut", Duration::from_secs(60), || async {
            !proxy.up.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        let mut slowest = Duration::ZERO;
        for _ in 0..PAID_DURING_THE_CUT {
            let order = app.place_order(buyer, &[(product, 1)]).await;
            let started = Instant::now();
            app.pay(order).await;
            slowest = slowest.max(started.elapsed());
        }
        (slowest, !proxy.up.load(std::sync::atomic::Ordering::SeqCst))
    };
    let database_url = app.database_url();
    let (_, (slowest_payment, paid_during_the_cut)) = futures::join!(
        outage_under_load(
            "Redis cut 30 s",
            &app,
            &database_url,
            || proxy.cut(),
            || proxy.restore(),
        ),
        payments
    );
    // The payment waits 100 ms at most for the product cache. The payments end while Redis
    // is still cut: had they waited for it to come back, they would end after. (Not a bound
    // on a payment's time: on a loaded machine one took 2.2 s, Redis or not.)
    assert!(
        paid_during_the_cut,
        "payments are not held up by the cache (slowest {slowest_payment:?})"
    );
    eventually("the ranking counts every order once", SETTLE, || async {
        let ranking = app.get("/products/ranking").await.1;
        ranking.as_array().is_some_and(|entries| entries.len() == 1)
            && ranking[0]["productId"] == product
            && ranking[0]["quantity"] == PAID_DURING_THE_CUT
    })
    .await;
    eventually(
        "the cache holds the stock after the payments",
        SETTLE,
        || async {
            app.get(&format!("/products/{product}")).await.1["stock"] == 100 - PAID_DURING_THE_CUT
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// A bad row, and a member coming and going.

#[actix_web::test]
async fn a_poisoned_coupon_row_fails_only_its_own_requests() {
    let _slot = testkit::faults::drill_slot();
    let app = TestApp::builder().settings(fault_settings).start().await;
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
        .filter(|((user, _), _)| *user % 3 == 0)
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
    let _slot = testkit::faults::drill_slot();
    let first = TestApp::builder().settings(fault_settings).start().await;
    // Every user asks for three coupons, one after the other: the checker holds that each
    // user's coupons were issued in that order, across the partitions moving twice.
    let mut coupons = Vec::new();
    for _ in 0..3 {
        coupons.push(first.create_coupon(600).await);
    }
    first.ensure_users(1, 600).await;
    let clients = Clients::new(&first.address, &first.settings);
    let load = clients.load_in_order_in_background(1..=600, coupons.clone(), 30);
    let (brokers, database) = (first.bootstrap_servers(), first.database_url());
    accepted_reach(&clients, 100, "load under way", Duration::from_secs(60)).await;
    let mut second = TestApp::builder()
        .settings(move |settings| {
            fault_settings(settings);
            settings.instance.id = "second".into();
            settings.kafka.brokers = brokers;
            settings.database.url = database.into();
        })
        .start()
        .await;
    let joined_at = clients.accepted();
    accepted_reach(
        &clients,
        joined_at + 150,
        "load while both members share the group",
        Duration::from_secs(60),
    )
    .await;
    second
        .stop()
        .await
        .expect("the second member leaves cleanly");
    load.await.unwrap();
    // A request that timed out (the clients share this process with both members) is asked
    // again, as a client would: answered with the first one if it was recorded.
    clients.ask_again_unknown().await;
    let checker = Checker::connect(&first.database_url()).await;
    let (report, _) = checker.settle(&clients, &coupons).await;
    let ledger = clients.ledger.lock().unwrap();
    assert_kept_every_promise("a member joins and leaves", &report, &ledger);
    assert_eq!(ledger.failed, 0, "{ledger:?}");
    assert!(ledger.unanswered.is_empty(), "asked again: {ledger:?}");
    assert_eq!(
        ledger
            .in_order
            .values()
            .filter(|requests| requests.len() == 3)
            .count(),
        600,
        "every user asked for the three coupons: {ledger:?}"
    );
}
