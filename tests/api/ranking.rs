//! The best-seller ranking: RankingUpdater counting completed orders into Redis, once each.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use chrono::{DateTime, Utc};
use commerce_events::common::clock::{Clock, ManualClock};
use commerce_events::common::ids::{OrderId, ProductId, UserId};
use commerce_events::event_log::{EventStatus, OutboxEvent};
use commerce_events::events::topics;
use commerce_events::events::{EventEnvelope, EventPayload, OrderCompleted, OrderedProduct};
use serde_json::{Value, json};

use testkit::app::{TestApp, domain_actor, replay_from_offset_zero};
use testkit::wait::eventually;

const WAIT: Duration = Duration::from_secs(30);

/// Publishes an OrderCompleted event that happened at `at`, through the outbox.
async fn publish_order(app: &TestApp, order_id: u64, lines: &[(u64, u32)], at: DateTime<Utc>) {
    let mut envelope = EventEnvelope::new(
        format!("order:{order_id}"),
        EventPayload::OrderCompleted(OrderCompleted {
            order_id: OrderId::from_u64(order_id).unwrap(),
            user_id: UserId::from_u64(1).unwrap(),
            products: lines
                .iter()
                .map(|(id, qty)| OrderedProduct {
                    id: ProductId::from_u64(*id).unwrap(),
                    qty: *qty,
                })
                .collect(),
            total_amount: 1_000,
        }),
    );
    envelope.occurred_at = at;
    let event = OutboxEvent::new(envelope);
    app.publish_through_outbox(&event).await;
}

async fn updater(app: &TestApp) -> Value {
    domain_actor(&app.get("/admin/actors").await.1, "RankingUpdater").clone()
}

async fn wait_for_updater(app: &TestApp, field: &str, value: u64) {
    eventually(
        &format!("RankingUpdater {field} = {value}"),
        WAIT,
        || async { updater(app).await[field] == value },
    )
    .await;
}

/// `(productId, quantity)` in rank order.
async fn ranking(app: &TestApp, query: &str) -> Vec<(u64, u64)> {
    let (status, ranking) = app.get(&format!("/products/ranking{query}")).await;
    assert_eq!(status, StatusCode::OK, "{ranking}");
    ranking
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            assert_eq!(entry["rank"], index + 1);
            (
                entry["productId"].as_u64().unwrap(),
                entry["quantity"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn days_ago(clock: &ManualClock, days: i64) -> DateTime<Utc> {
    clock.now() - chrono::Duration::days(days)
}

#[actix_web::test]
async fn paid_orders_are_ranked_and_a_replay_from_offset_zero_counts_nothing_twice() {
    let clock = ManualClock::starting_at(Utc::now());
    let app = TestApp::builder()
        .clock(Arc::new(clock.clone()))
        .settings(|_| {})
        .start()
        .await;
    let keyboard = app.create_product("Keyboard", 100, 100).await;
    let mouse = app.create_product("Mouse", 100, 100).await;
    let monitor = app.create_product("Monitor", 100, 100).await;
    let user_id = app.create_user(1_000_000).await;
    let orders = [
        vec![(keyboard, 3), (mouse, 1)],
        vec![(keyboard, 2), (monitor, 5)],
        vec![(mouse, 4)],
        vec![(monitor, 1)],
    ];
    for lines in &orders {
        let order_id = app.place_order(user_id, lines).await;
        app.pay(order_id).await;
    }
    wait_for_updater(&app, "processed", 4).await;
    let expected = vec![(monitor, 6), (keyboard, 5), (mouse, 5)];
    assert_eq!(ranking(&app, "").await, expected);
    let (_, named) = app.get("/products/ranking?days=1&limit=1").await;
    assert_eq!(
        named,
        json!([{"rank": 1, "productId": monitor, "name": "Monitor", "quantity": 6}])
    );

    let replayed = replay_from_offset_zero(&app, topics::ORDER_COMPLETED).await;
    assert_eq!(replayed, 4);
    wait_for_updater(&app, "duplicates", 4).await;
    assert_eq!(ranking(&app, "").await, expected, "nothing counted twice");
    assert_eq!(updater(&app).await["details"]["ordersCounted"], 4);
}

#[actix_web::test]
async fn the_window_covers_the_last_days_and_drops_older_ones_as_time_passes() {
    let clock = ManualClock::starting_at(Utc::now());
    let app = TestApp::builder()
        .clock(Arc::new(clock.clone()))
        .settings(|_| {})
        .start()
        .await;
    publish_order(&app, 1, &[(501, 10)], days_ago(&clock, 3)).await;
    publish_order(&app, 2, &[(502, 4), (503, 1)], days_ago(&clock, 2)).await;
    publish_order(&app, 3, &[(503, 2)], days_ago(&clock, 1)).await;
    publish_order(&app, 4, &[(504, 1), (502, 1)], clock.now()).await;
    wait_for_updater(&app, "processed", 4).await;

    // Today and the two days before: the order of three days ago is out.
    assert_eq!(
        ranking(&app, "?days=3&limit=5").await,
        vec![(502, 5), (503, 3), (504, 1)]
    );
    assert_eq!(ranking(&app, "?days=1").await, vec![(502, 1), (504, 1)]);
    assert_eq!(ranking(&app, "?days=4&limit=1").await, vec![(501, 10)]);

    // A day later, the orders of two days ago leave the window.
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(
        ranking(&app, "?days=3").await,
        vec![(503, 2), (502, 1), (504, 1)]
    );

    let (status, error) = app.get("/products/ranking?days=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["code"], "INVALID_DAYS");
    let (status, error) = app.get("/products/ranking?limit=1000").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["code"], "INVALID_LIMIT");
}

/// Deletes every ranking key of this test's daemon (day sets, applied marks, `ranking:built`),
/// as a Redis restarted without persistence would have lost them.
async fn lose_the_ranking(app: &TestApp) {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("{}ranking:*", app.settings.redis.key_prefix);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the ranking had keys under {pattern}");
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut connection)
        .await
        .unwrap();
}

#[actix_web::test]
async fn a_lost_ranking_is_rebuilt_from_mysql_exactly_and_a_rebuild_counts_nothing_twice() {
    let app = testkit::app::spawn_app().await;
    let keyboard = app.create_product("Keyboard", 100, 100).await;
    let mouse = app.create_product("Mouse", 100, 100).await;
    let user_id = app.create_user(1_000_000).await;
    for lines in [
        vec![(keyboard, 3), (mouse, 1)],
        vec![(keyboard, 2)],
        vec![(mouse, 4)],
    ] {
        let order_id = app.place_order(user_id, &lines).await;
        app.pay(order_id).await;
    }
    wait_for_updater(&app, "processed", 3).await;
    let expected = vec![(keyboard, 5), (mouse, 5)];
    assert_eq!(ranking(&app, "").await, expected);

    // Redis loses its data: the reconciler's next pass sees `ranking:built` missing and
    // recomputes the window from the completed orders in MySQL.
    lose_the_ranking(&app).await;
    assert_eq!(ranking(&app, "").await, vec![]);
    let (status, reconciler) = app.post("/admin/reconcile", "").await;
    assert_eq!(status, StatusCode::OK, "{reconciler}");
    assert_eq!(ranking(&app, "").await, expected, "{reconciler}");
    assert!(
        reconciler["rankingRebuilds"].as_u64().unwrap() >= 2,
        "{reconciler}"
    );

    // An operator's rebuild gives the same sums, and the orders it counted are marked: a
    // replay of the topic counts none of them again.
    let (status, report) = app.post("/admin/ranking/rebuild", "").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["orders"], 3);
    assert_eq!(report["quantity"], 10);
    assert_eq!(ranking(&app, "").await, expected);
    let replayed = replay_from_offset_zero(&app, topics::ORDER_COMPLETED).await;
    assert_eq!(replayed, 3);
    wait_for_updater(&app, "duplicates", 3).await;
    assert_eq!(ranking(&app, "").await, expected, "nothing counted twice");

    // Each order's progress per consumer: the ranking's is its mark, the analytics
    // delivery's the event's row.
    let (event_id,): (String,) = sqlx::query_as(
        "SELECT event_id FROM event_log WHERE event_type = 'OrderCompleted' LIMIT 1",
    )
    .fetch_one(app.event_log.pool())
    .await
    .unwrap();
    let (status, event) = app.get(&format!("/admin/events/{event_id}")).await;
    assert_eq!(status, StatusCode::OK, "{event}");
    let consumers: Vec<(String, String, bool)> = event["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|consumer| {
            (
                consumer["consumer"].as_str().unwrap().to_string(),
                consumer["recordedIn"].as_str().unwrap().to_string(),
                consumer["settled"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(
        consumers.contains(&("RankingUpdater".into(), "rankingMarks".into(), true)),
        "{event}"
    );
    assert!(
        consumers
            .iter()
            .any(|(name, recorded_in, _)| name == "OrderAnalytics" && recorded_in == "eventLog"),
        "{event}"
    );
    assert_eq!(event["deadLetters"], serde_json::json!([]));
}

#[actix_web::test]
async fn a_completed_order_never_published_reaches_the_ranking_and_analytics_through_the_reconciler()
 {
    let app = testkit::app::spawn_app().await;
    let envelope = EventEnvelope::new(
        "order:91".to_string(),
        EventPayload::OrderCompleted(OrderCompleted {
            order_id: OrderId::from_u64(91).unwrap(),
            user_id: UserId::from_u64(1).unwrap(),
            products: vec![OrderedProduct {
                id: ProductId::from_u64(591).unwrap(),
                qty: 7,
            }],
            total_amount: 7_000,
        }),
    );
    let event_id = envelope.event_id;
    // Committed as a payment commits it, then lost before it reached Kafka.
    app.record_in_outbox(&OutboxEvent::new(envelope)).await;
    assert_eq!(
        app.event(event_id).await.unwrap().status,
        EventStatus::Published,
        "recorded proven: nothing for the relay"
    );

    eventually(
        "the ranking counts it and the analytics delivery completed it",
        WAIT,
        || async {
            ranking(&app, "").await == vec![(591, 7)]
                && app
                    .event(event_id)
                    .await
                    .is_some_and(|row| row.status == EventStatus::Completed)
        },
    )
    .await;
    let (_, tree) = app.get("/admin/actors").await;
    assert_eq!(tree["outboxRelay"]["republished"], 0, "{tree}");
    let redriven = |consumer: &str| {
        tree["reconciler"]["consumers"][consumer]["redriven"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        redriven("RankingUpdater") + redriven("OrderAnalytics") >= 1,
        "{}",
        tree["reconciler"]
    );
}
