use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use actix_web::http::StatusCode;
use chrono::{Duration as Span, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};

use commerce_events::common::ids::CouponId;
use commerce_events::event_log::EventStatus;
use commerce_events::kafka::cluster::KafkaCluster;
use testkit::app::{TestApp, domain_actor, replay_from_offset_zero, spawn_app};
use testkit::records::histories_of;
use testkit::wait::eventually;

#[actix_web::test]
async fn a_coupon_is_created_and_read_back() {
    let app = spawn_app().await;
    let valid_from = Utc::now();
    let valid_until = valid_from + Span::days(7);
    let body = json!({
        "name": "Welcome",
        "discountAmount": 3000,
        "totalQuantity": 50,
        "validFrom": valid_from,
        "validUntil": valid_until,
    });
    let (status, created) = app.post("/coupons", &body.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let coupon_id = created["couponId"].as_u64().unwrap();
    assert_eq!(
        created,
        json!({
            "couponId": coupon_id,
            "name": "Welcome",
            "discountAmount": 3000,
            "totalQuantity": 50,
            "issuedQuantity": 0,
            "remaining": 50,
            "validFrom": created["validFrom"],
            "validUntil": created["validUntil"],
        })
    );
    let (status, read) = app.get(&format!("/coupons/{coupon_id}")).await;
    assert_eq!((status, &read), (StatusCode::OK, &created));
    assert_eq!(app.get("/coupons/999999").await.0, StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn a_coupon_with_sharded_stock_issues_exactly_its_stock_and_answers_one_remaining() {
    let app = TestApp::builder()
        .settings(|settings| settings.coupons.stock_shards = 3)
        .start()
        .await;
    let coupon_id = app.create_coupon(5).await;
    app.ensure_users(1, 12).await;
    let requests = futures::future::join_all((1..=12).map(|user| app.issue(user, coupon_id))).await;
    let mut issued = 0;
    for request in &requests {
        if app.wait_until_notified(request).await["outcome"] == "ISSUED" {
            issued += 1;
        }
    }
    assert_eq!(
        issued, 5,
        "the whole stock, over three shard rows, and no more"
    );
    let (_, coupon) = app.get(&format!("/coupons/{coupon_id}")).await;
    assert_eq!(
        (&coupon["issuedQuantity"], &coupon["remaining"]),
        (&json!(5), &json!(0))
    );
    let (shards,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM coupon_stock_shard WHERE coupon_id = ?")
            .bind(coupon_id)
            .fetch_one(app.event_log.pool())
            .await
            .unwrap();
    assert_eq!(shards, 3);
}

#[actix_web::test]
async fn an_issued_coupon_is_committed_notified_and_held_by_its_user() {
    let app = spawn_app().await;
    let coupon_id = app.create_coupon(10).await;
    let request_id = app.issue(42, coupon_id).await;

    let view = app.wait_until_notified(&request_id).await;
    let history_id = view["couponHistoryId"].as_u64().expect("a coupon history");
    assert_eq!(
        view,
        json!({
            "requestId": request_id,
            "userId": 42,
            "couponId": coupon_id,
            "status": "NOTIFIED",
            "outcome": "ISSUED",
            "reason": null,
            "couponHistoryId": history_id,
        })
    );
    let (_, held) = app.get("/users/42/coupons").await;
    assert_eq!(held.as_array().unwrap().len(), 1);
    assert_eq!(held[0]["couponHistoryId"], history_id);
    assert_eq!(held[0]["couponId"], coupon_id);
    assert_eq!(held[0]["name"], "Black Friday");
    assert_eq!(held[0]["status"], "ISSUED");
    assert_eq!(
        app.get(&format!("/coupons/{coupon_id}")).await.1["remaining"],
        9
    );
    assert_eq!(app.get("/users/43/coupons").await.1, json!([]));
}

async fn refusal_of(app: &TestApp, user_id: u64, coupon_id: u64) -> Value {
    let request_id = app.issue(user_id, coupon_id).await;
    let view = app.wait_until_notified(&request_id).await;
    assert_eq!(view["couponHistoryId"], Value::Null, "{view}");
    view["reason"].clone()
}

#[actix_web::test]
async fn each_refusal_reason_is_reported() {
    let app = spawn_app().await;
    let now = Utc::now();
    let single = app.create_coupon(1).await;
    let future = app
        .create_coupon_between(10, now + Span::days(1), now + Span::days(2))
        .await;
    let past = app
        .create_coupon_between(10, now - Span::days(2), now - Span::days(1))
        .await;

    let first = app.issue(1, single).await;
    assert!(app.wait_until_notified(&first).await["couponHistoryId"].is_u64());
    // A user's second request for a coupon is the first one again: nothing new is
    // recorded, so ALREADY_ISSUED is left to requests that reach the issuer twice.
    let (status, again) = app
        .as_user(1)
        .await
        .post("/coupons/issue", &json!({"couponId": single}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["requestId"], first.as_str());
    assert_eq!(again["status"], "NOTIFIED");
    assert_eq!(refusal_of(&app, 2, single).await, "OUT_OF_STOCK");
    assert_eq!(refusal_of(&app, 3, 987_654).await, "COUPON_NOT_FOUND");
    assert_eq!(refusal_of(&app, 4, future).await, "NOT_STARTED");
    assert_eq!(refusal_of(&app, 5, past).await, "EXPIRED");

    let (_, tree) = app.get("/admin/actors").await;
    assert_eq!(
        domain_actor(&tree, "CouponIssuer")["details"]["refused"],
        json!({"COUPON_NOT_FOUND": 1, "EXPIRED": 1, "NOT_STARTED": 1, "OUT_OF_STOCK": 1})
    );
}

#[actix_web::test]
async fn malformed_requests_are_refused_with_400() {
    let app = spawn_app().await;
    let cases = [
        (r#"{"userId": 1}"#, "INVALID_JSON"),
        (
            r#"{"userId": 1, "couponId": 1, "couponId": 2}"#,
            "INVALID_JSON",
        ),
        (r#"{"userId": "one", "couponId": 1}"#, "INVALID_JSON"),
        (r#"{"userId": 1.5, "couponId": 1}"#, "INVALID_JSON"),
        (r#"{"userId": -3, "couponId": 1}"#, "INVALID_USER_ID"),
        (r#"{"userId": 0, "couponId": 1}"#, "INVALID_USER_ID"),
        (r#"{"userId": 1, "couponId": -1}"#, "INVALID_COUPON_ID"),
        (r#"[1, 2]"#, "INVALID_JSON"),
    ];
    let user = app.as_user(1).await;
    for (body, code) in cases {
        let (status, error) = user.post("/coupons/issue", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
    }
    let bad_coupon = json!({"name": "x", "discountAmount": 1, "totalQuantity": 0, "validFrom": Utc::now(), "validUntil": Utc::now()});
    let (status, error) = app.post("/coupons", &bad_coupon.to_string()).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_TOTAL_QUANTITY"))
    );
    assert_eq!(
        app.get("/coupons/requests/nope").await.1["error"]["code"],
        "INVALID_REQUEST_ID"
    );
    assert_eq!(
        app.get("/coupons/abc").await.1["error"]["code"],
        "INVALID_COUPON_ID"
    );
    assert_eq!(
        app.get("/users/-1/coupons").await.1["error"]["code"],
        "INVALID_USER_ID"
    );
    let unknown = "/coupons/requests/01a20c4d-9946-77b8-9ac2-9e7b856b2318";
    assert_eq!(app.get(unknown).await.0, StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn a_request_committed_but_never_published_is_relayed_and_decided() {
    let app = spawn_app().await;
    let coupon_id = app.create_coupon(5).await;
    let request_id = app.commit_unpublished_coupon_request(77, coupon_id).await;
    assert_eq!(
        app.get(&format!("/coupons/requests/{request_id}")).await.1["status"],
        "PENDING"
    );
    let view = app.wait_until_notified(&request_id.to_string()).await;
    assert!(view["couponHistoryId"].is_u64(), "{view}");
}

#[actix_web::test]
async fn an_accepted_request_never_published_is_published_again_by_the_reconciler() {
    let app = spawn_app().await;
    let coupon_id = app.create_coupon(5).await;
    let request_id = app.commit_proven_coupon_request(78, coupon_id).await;
    // As the intake writes it: PUBLISHED, and so nothing for the relay.
    assert_eq!(
        app.event(request_id).await.unwrap().status,
        EventStatus::Published
    );
    let view = app.wait_until_notified(&request_id.to_string()).await;
    assert!(view["couponHistoryId"].is_u64(), "{view}");
    let (_, tree) = app.get("/admin/actors").await;
    assert_eq!(tree["outboxRelay"]["republished"], 0, "{tree}");
    let redriven = tree["reconciler"]["consumers"]["CouponIssuer"]["redriven"]
        .as_u64()
        .unwrap_or(0);
    assert!(redriven >= 1, "{}", tree["reconciler"]);
}

#[actix_web::test]
async fn a_request_whose_publication_was_lost_is_decided_before_the_users_next_one() {
    // The reconciler is off: only the user's next request can bring the lost one forward.
    let app = TestApp::builder()
        .settings(|settings| settings.reconcile.enabled = false)
        .start()
        .await;
    let (first, second) = (app.create_coupon(5).await, app.create_coupon(5).await);
    // Committed as the intake commits it, answered, and its record never produced.
    let lost = app.commit_proven_coupon_request(79, first).await;
    let next = app.issue(79, second).await;

    assert_issued_first(&app, &lost.to_string(), &next).await;
}

/// Waits until both requests are notified and checks that `earlier` was issued first (its
/// coupon history numbered before `later`'s).
async fn assert_issued_first(app: &TestApp, earlier: &str, later: &str) {
    let later_view = app.wait_until_notified(later).await;
    let earlier_view = app.wait_until_notified(earlier).await;
    let (earlier_history, later_history) = (
        earlier_view["couponHistoryId"].as_u64().expect("issued"),
        later_view["couponHistoryId"].as_u64().expect("issued"),
    );
    assert!(
        earlier_history < later_history,
        "the earlier request is decided first: {earlier_view} {later_view}"
    );
}

#[actix_web::test]
async fn each_coupon_request_partition_takes_its_owner_epoch_when_assigned() {
    let app = spawn_app().await;
    // Before any request: the epoch is the assignment's, not its first batch's.
    let owned = || async {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM partition_owner WHERE topic = 'coupon-requests' AND epoch >= 1",
        )
        .fetch_one(app.event_log.pool())
        .await
        .unwrap();
        count
    };
    eventually("every partition owned", Duration::from_secs(30), || async {
        owned().await == 3
    })
    .await;
}

#[actix_web::test]
async fn a_request_whose_record_was_lost_while_the_broker_was_cut_is_decided_before_the_users_next_one()
 {
    // The reconciler is off and a delivery gives up after five seconds, so the cut loses the
    // record for good: only the user's next request can bring the first forward.
    let app = TestApp::builder()
        .settings(|settings| {
            settings.reconcile.enabled = false;
            settings.kafka.producer.delivery_timeout_ms = 5_000;
        })
        .start()
        .await;
    let KafkaCluster::Embedded { cluster, .. } = &*app.kafka else {
        panic!("the test cuts the embedded cluster's broker")
    };
    let (first, second) = (app.create_coupon(5).await, app.create_coupon(5).await);
    app.ensure_users(81, 81).await;
    let failures = app.publisher.failures();

    // Kafka clients reach a broker at the address it advertises, so the broker itself drops
    // its connections and refuses new ones (a proxy in front of the bootstrap address would
    // not cut them).
    cluster.set_broker_up(1, false).expect("broker down");
    let lost = app.issue(81, first).await;
    eventually(
        "the cut request's delivery failed",
        Duration::from_secs(30),
        || async { app.publisher.failures() > failures },
    )
    .await;
    cluster.set_broker_up(1, true).expect("broker up");
    eventually(
        "the daemon reaches the broker again",
        Duration::from_secs(30),
        || async { app.get("/readyz").await.0 == StatusCode::OK },
    )
    .await;
    let next = app.issue(81, second).await;

    assert_issued_first(&app, &lost, &next).await;
    let pool = app.event_log.pool();
    for coupon in [first, second] {
        let coupon = CouponId::parse(coupon as i64).expect("a coupon id");
        assert_eq!(histories_of(pool, coupon).await, 1, "issued once");
    }
}

#[actix_web::test]
async fn a_full_intake_queue_answers_503_with_retry_after_at_once_and_records_nothing() {
    // One writer taking one request at a time, two requests waiting at most.
    let app = TestApp::builder()
        .settings(|settings| {
            settings.coupons.intake_writers = 1;
            settings.coupons.intake_max_batch = 1;
            settings.coupons.intake_queue = 2;
        })
        .start()
        .await;
    let coupon = app.create_coupon(10).await;
    let users: Vec<u64> = (91..=94).collect();
    app.ensure_users(91, 94).await;
    let mut calls = Vec::new();
    for user in &users {
        calls.push(app.as_user(*user).await);
    }
    let recorded = || async {
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM event_log WHERE event_type = 'CouponRequested'")
                .fetch_one(app.event_log.pool())
                .await
                .unwrap();
        count
    };

    // The test holds the event log, so the writer waits on its first insert.
    let mut holder = app.event_log.pool().acquire().await.unwrap();
    sqlx::query("LOCK TABLES event_log WRITE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut answers: FuturesUnordered<_> = calls
        .iter()
        .zip(&users)
        .map(|(calls, user)| async move {
            let body = format!(r#"{{"userId": {user}, "couponId": {coupon}}}"#);
            (*user, calls.post_once("/coupons/issue", &body).await)
        })
        .collect();
    // At most three fit (one being written, two waiting): the first answer, while the
    // others wait for the writer, is a refusal.
    let (user, (status, headers, answer)) = answers.next().await.expect("an answer");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{user}: {answer}");
    assert_eq!(answer["error"]["code"], "UNAVAILABLE", "{answer}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");

    sqlx::query("UNLOCK TABLES")
        .execute(&mut *holder)
        .await
        .unwrap();
    let (mut accepted, mut refused) = (0_i64, 1_i64);
    while let Some((user, (status, _, answer))) = answers.next().await {
        match status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => refused += 1,
            _ => panic!("{user}: {status} {answer}"),
        }
    }
    assert!(
        accepted >= 2 && accepted + refused == 4,
        "{accepted} {refused}"
    );
    assert_eq!(
        recorded().await,
        accepted,
        "a refused request records nothing"
    );
}

#[actix_web::test]
async fn thousands_of_concurrent_requests_never_over_issue_or_double_issue() {
    let app = spawn_app().await;
    let coupon_id = app.create_coupon(100).await;
    // 2,500 users, 5,500 requests: every user once, 3,000 of them again.
    let users: Vec<u64> = (1..=2_500)
        .chain((1..=3_000).map(|n| n % 2_500 + 1))
        .collect();
    app.ensure_users(1, 2_500).await;
    let answers: Vec<(u64, String)> = futures::stream::iter(users)
        .map(|user| {
            let app = &app;
            async move { (user, app.issue_any(user, coupon_id).await.1) }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert_eq!(answers.len(), 5_500);
    // A user's repeated requests all name its one request.
    let mut request_of_user: BTreeMap<u64, String> = BTreeMap::new();
    for (user, request_id) in &answers {
        let first = request_of_user
            .entry(*user)
            .or_insert_with(|| request_id.clone());
        assert_eq!(first, request_id, "user {user} got two requests");
    }
    let requests: Vec<(u64, String)> = request_of_user.into_iter().collect();
    assert_eq!(requests.len(), 2_500);

    eventually(
        "every request decided",
        Duration::from_secs(120),
        || async {
            let (decided,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM event_log WHERE event_type = 'CouponRequested' \
             AND status IN ('COMPLETED', 'NOTIFIED')",
            )
            .fetch_one(app.event_log.pool())
            .await
            .unwrap();
            decided == 2_500
        },
    )
    .await;

    let histories: Vec<(u64, u64)> =
        sqlx::query_as("SELECT user_id, coupon_history_id FROM coupon_history WHERE coupon_id = ?")
            .bind(coupon_id)
            .fetch_all(app.event_log.pool())
            .await
            .unwrap();
    assert_eq!(histories.len(), 100, "exactly the stock was issued");
    let holders: BTreeSet<u64> = histories.iter().map(|(user, _)| *user).collect();
    assert_eq!(holders.len(), 100, "no user holds two");

    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut successes_by_user: BTreeMap<u64, usize> = BTreeMap::new();
    for (user, request_id) in &requests {
        let view = app.get(&format!("/coupons/requests/{request_id}")).await.1;
        let outcome = match view["reason"].as_str() {
            None => {
                assert!(view["couponHistoryId"].is_u64(), "{view}");
                *successes_by_user.entry(*user).or_default() += 1;
                "SUCCESS".to_string()
            }
            Some(reason) => reason.to_string(),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    assert_eq!(outcomes["SUCCESS"], 100, "{outcomes:?}");
    assert!(successes_by_user.values().all(|count| *count == 1));
    assert_eq!(
        successes_by_user.keys().copied().collect::<BTreeSet<_>>(),
        holders
    );
    assert_eq!(outcomes.values().sum::<usize>(), 2_500);
    assert!(
        outcomes.keys().all(
            |outcome| ["SUCCESS", "OUT_OF_STOCK", "ALREADY_ISSUED"].contains(&outcome.as_str())
        )
    );
    let coupon = app.get(&format!("/coupons/{coupon_id}")).await.1;
    assert_eq!(
        (
            coupon["issuedQuantity"].as_u64(),
            coupon["remaining"].as_u64()
        ),
        (Some(100), Some(0))
    );
}

/// Everything the issuer writes, to compare before and after a replay.
async fn written_state(app: &TestApp) -> Vec<String> {
    let histories: Vec<(u64, u64, u64, String)> = sqlx::query_as(
        "SELECT coupon_history_id, coupon_id, user_id, request_id FROM coupon_history ORDER BY 1",
    )
    .fetch_all(app.event_log.pool())
    .await
    .unwrap();
    let coupons: Vec<(u64, u32)> =
        sqlx::query_as("SELECT coupon_id, issued_quantity FROM coupon ORDER BY 1")
            .fetch_all(app.event_log.pool())
            .await
            .unwrap();
    type EventRow = (
        String,
        String,
        String,
        Option<String>,
        chrono::DateTime<Utc>,
    );
    let events: Vec<EventRow> = sqlx::query_as(
        "SELECT event_id, event_type, status, CAST(result AS CHAR), updated_at FROM event_log ORDER BY 1",
    )
    .fetch_all(app.event_log.pool())
    .await
    .unwrap();
    vec![
        format!("{histories:?}"),
        format!("{coupons:?}"),
        format!("{events:?}"),
    ]
}

async fn records_in(app: &TestApp, topic: &'static str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let bootstrap = app.bootstrap_servers();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        (0..3)
            .map(|partition| {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(5))
                    .unwrap();
                high - low
            })
            .sum()
    })
    .await
    .unwrap()
}

#[actix_web::test]
async fn replaying_the_requests_from_offset_zero_changes_nothing_and_sends_no_second_result() {
    let app = spawn_app().await;
    let coupon_id = app.create_coupon(2).await;
    let mut requests = Vec::new();
    for user in [1, 2, 3] {
        requests.push(app.issue(user, coupon_id).await);
    }
    // Asked again: the same request, nothing new recorded.
    assert_eq!(
        app.issue_any(1, coupon_id).await,
        (StatusCode::OK, requests[0].clone())
    );
    for request in &requests {
        app.wait_until_notified(request).await;
    }
    // A result has no row of its own: its request's row records it (with its event id).
    let (result_rows,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM event_log WHERE event_type = 'CouponResult'")
            .fetch_one(app.event_log.pool())
            .await
            .unwrap();
    assert_eq!(
        result_rows, 0,
        "results are recorded in their requests' rows"
    );
    let before = written_state(&app).await;
    let results_before = records_in(&app, commerce_events::events::topics::COUPON_RESULTS).await;
    assert_eq!(results_before, 3, "one result per request");

    let replayed =
        replay_from_offset_zero(&app, commerce_events::events::topics::COUPON_REQUESTS).await;
    assert_eq!(replayed, 3);
    eventually("the replay was processed", Duration::from_secs(30), || async {
        domain_actor(&app.get("/admin/actors").await.1, "CouponIssuer")["details"]["redelivered"] == 3
    })
    .await;

    assert_eq!(written_state(&app).await, before, "no row changed");
    assert_eq!(
        records_in(&app, commerce_events::events::topics::COUPON_RESULTS).await,
        results_before,
        "no second result"
    );
}
