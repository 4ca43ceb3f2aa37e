//! Per-user order as a guarantee: a user's coupon requests are decided in the order they
//! were accepted, whatever order their records reach the partition in. Each scenario checks
//! with the shared checker (0 out of order, 0 lost or undecided, 0 applied twice).

use std::path::Path;

use actix_web::http::StatusCode;
use futures::StreamExt;
use testkit::database::{TEST_JWT_SECRET, TestDatabase};
use testkit::faults::{
    Checker, Clients, assert_kept_every_promise, coupon_body, drill_slot, user_rows,
};
use testkit::process::{BrokerProcess, Daemon};

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-events");
const USERS: u64 = 200;
const SESSION_TIMEOUT_MS: u64 = 10_000;

/// Two daemons behind one load balancer, on one broker; the first one's broker
/// acknowledgements come late (a broker hiccup, played by a 900 ms linger), so its answers
/// (sent after at most 500 ms, the outbox covers the rest) leave before its records reach
/// the partitions. Each user asks the slow daemon, then the fast one, then the slow one
/// again, each request once the previous one is answered: the second request's record
/// reaches the partition before the first's.
#[actix_web::test]
async fn a_users_requests_are_decided_in_the_order_answered_across_daemons_with_a_slow_producer() {
    let _slot = drill_slot();
    let scenario = "two daemons, one slow producer";
    let broker = BrokerProcess::start(Path::new(BINARY), SESSION_TIMEOUT_MS);
    let database = TestDatabase::new();
    let start = |instance: &str, extra: &[(&str, &str)]| {
        let mut environment = vec![("APP_INSTANCE__ID", instance)];
        environment.extend_from_slice(extra);
        Daemon::start_with(
            Path::new(BINARY),
            &database.url(),
            &format!("{}:", database.name),
            TEST_JWT_SECRET,
            Some(&broker.address),
            &environment,
        )
    };
    let slow = start("slow", &[("APP_KAFKA__PRODUCER__LINGER_MS", "900")]);
    let fast = start("fast", &[]);
    let clients = Clients::new(&fast.address, &database.settings());
    clients.wait_ready().await;
    clients.point_at(&slow.address);
    clients.wait_ready().await;
    user_rows(&database.url(), USERS).await;
    let mut coupons = Vec::new();
    for _ in 0..3 {
        let (status, coupon) = clients.admin("/coupons", coupon_body(USERS as u32)).await;
        assert_eq!(status, StatusCode::CREATED, "{coupon}");
        coupons.push(coupon["couponId"].as_u64().unwrap());
    }

    let route = [&slow.address, &fast.address, &slow.address];
    futures::stream::iter(1..=USERS)
        .for_each_concurrent(50, |user| {
            let (clients, coupons) = (&clients, &coupons);
            async move {
                for (address, coupon) in route.iter().zip(coupons) {
                    clients.issue_at(address, user, *coupon).await;
                }
            }
        })
        .await;

    let checker = Checker::connect(&database.url()).await;
    let (report, _) = checker.settle(&clients, &coupons).await;
    let ledger = clients.ledger.lock().unwrap();
    assert_eq!(
        ledger.ok,
        3 * USERS,
        "{scenario}: every request accepted: {ledger:?}"
    );
    assert_kept_every_promise(scenario, &report, &ledger);
}
