//! Users, products, orders and payments through HTTP, against MariaDB.

use std::time::Duration;

use actix_web::http::StatusCode;
use commerce_events::common::ids::ProductId;
use commerce_events::event_log::{EventStatus, OutboxEvent};
use commerce_events::events::{EventEnvelope, EventPayload, ProductChange, ProductChanged};
use futures::StreamExt;
use futures::future::join_all;
use serde_json::{Value, json};

use testkit::app::{TestApp, spawn_app};
use testkit::wait::eventually;

/// Places an order as the body's `userId`.
async fn create_order(app: &TestApp, body: Value) -> (StatusCode, Value) {
    let user = body["userId"].as_u64().expect("a userId");
    app.as_token_of(user)
        .post("/orders", &body.to_string())
        .await
}

/// How many payments were answered 200, and how many 409 with `code`.
fn paid_and_refused(answers: &[(StatusCode, Value)], code: &str) -> (usize, usize) {
    let count = |wanted: &dyn Fn(&(StatusCode, Value)) -> bool| {
        answers.iter().filter(|answer| wanted(answer)).count()
    };
    (
        count(&|(status, _)| *status == StatusCode::OK),
        count(&|(status, body)| *status == StatusCode::CONFLICT && body["error"]["code"] == code),
    )
}

async fn balance(app: &TestApp, user_id: u64) -> u64 {
    app.get(&format!("/users/{user_id}/balance")).await.1["balance"]
        .as_u64()
        .unwrap()
}

async fn stock(app: &TestApp, product_id: u64) -> u64 {
    app.get(&format!("/products/{product_id}")).await.1["stock"]
        .as_u64()
        .unwrap()
}

#[actix_web::test]
async fn an_order_is_placed_paid_once_and_its_events_are_recorded() {
    let app = spawn_app().await;
    let user_id = app.create_user(100_000).await;
    let keyboard = app.create_product("Keyboard", 30_000, 10).await;
    let mouse = app.create_product("Keyboard", 5_000, 10).await;

    let (status, order) = create_order(
        &app,
        json!({"userId": user_id, "items": [
            {"productId": keyboard, "quantity": 2},
            {"productId": mouse, "quantity": 1},
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["totalAmount"], 65_000);
    assert_eq!(order["discountAmount"], 0);
    assert_eq!(order["payAmount"], 65_000);
    let order_id = order["orderId"].as_u64().unwrap();

    let (status, payment) = app.try_pay(order_id).await;
    assert_eq!(status, StatusCode::OK, "{payment}");
    assert_eq!(payment["status"], "COMPLETED");
    assert_eq!(payment["orderId"], order_id);
    assert_eq!(payment["amount"], 65_000);
    assert!(payment["paymentId"].as_u64().is_some());
    assert_eq!(balance(&app, user_id).await, 35_000);
    assert_eq!(stock(&app, keyboard).await, 8);
    assert_eq!(stock(&app, mouse).await, 9);
    let (_, paid) = app.get(&format!("/orders/{order_id}")).await;
    assert_eq!(paid["status"], "COMPLETED");

    // Paying again never charges again.
    let (status, refused) = app.try_pay(order_id).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"]["code"], "ORDER_NOT_PENDING");
    assert_eq!(balance(&app, user_id).await, 35_000);

    // The transaction wrote both events to the outbox, published after the commit.
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT event_type, topic, CAST(payload AS CHAR) FROM event_log \
         WHERE event_type IN ('OrderCompleted', 'PaymentCompleted') ORDER BY event_type",
    )
    .fetch_all(app.event_log.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let order_event: Value = serde_json::from_str(&rows[0].2).unwrap();
    assert_eq!(rows[0].1, "order-completed");
    assert_eq!(order_event["orderId"], order_id);
    assert_eq!(order_event["userId"], user_id);
    assert_eq!(order_event["totalAmount"], 65_000);
    assert_eq!(
        order_event["products"],
        json!([{"id": keyboard, "qty": 2}, {"id": mouse, "qty": 1}])
    );
    let payment_event: Value = serde_json::from_str(&rows[1].2).unwrap();
    assert_eq!(rows[1].1, "external-events");
    assert_eq!(payment_event["paymentId"], payment["paymentId"]);
    assert_eq!(payment_event["amount"], 65_000);
    let published: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM event_log WHERE event_type IN ('OrderCompleted', 'PaymentCompleted')",
    )
    .fetch_all(app.event_log.pool())
    .await
    .unwrap();
    assert!(
        published
            .iter()
            .all(|status| status != EventStatus::Pending.as_str()),
        "{published:?}"
    );
}

#[actix_web::test]
async fn payments_are_refused_with_a_clear_code_and_change_nothing() {
    let app = spawn_app().await;
    let poor = app.create_user(1_000).await;
    let product = app.create_product("Keyboard", 5_000, 1).await;
    let order = app.place_order(poor, &[(product, 1)]).await;
    let (status, refused) = app.try_pay(order).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"]["code"], "INSUFFICIENT_BALANCE");
    assert_eq!(
        stock(&app, product).await,
        1,
        "the stock taken is given back"
    );
    assert_eq!(balance(&app, poor).await, 1_000);

    let rich = app.create_user(100_000).await;
    let too_many = app.place_order(rich, &[(product, 2)]).await;
    let (status, refused) = app.try_pay(too_many).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"]["code"], "INSUFFICIENT_STOCK");
    assert_eq!(balance(&app, rich).await, 100_000);

    let (status, missing) = app.as_user(rich).await.post("/orders/999999/pay", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
}

#[actix_web::test]
async fn only_the_buyer_pays_an_order_anyone_else_is_refused_before_any_effect() {
    let app = spawn_app().await;
    let buyer = app.create_user(100_000).await;
    let stranger = app.create_user(100_000).await;
    let product = app.create_product("Keyboard", 5_000, 3).await;
    let order = app.place_order(buyer, &[(product, 2)]).await;

    let (status, refused) = app.pay_as(stranger, order).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(refused["error"]["code"], "FORBIDDEN");
    let (status, refused) = app
        .as_admin()
        .post(&format!("/orders/{order}/pay"), "")
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "an admin never pays for a user: {refused}"
    );
    assert_eq!(balance(&app, buyer).await, 100_000);
    assert_eq!(balance(&app, stranger).await, 100_000);
    assert_eq!(stock(&app, product).await, 3);
    let (_, unpaid) = app.get(&format!("/orders/{order}")).await;
    assert_eq!(unpaid["status"], "PENDING");

    let (status, payment) = app.pay_as(buyer, order).await;
    assert_eq!(status, StatusCode::OK, "{payment}");
    assert_eq!(balance(&app, buyer).await, 90_000);
    assert_eq!(stock(&app, product).await, 1);
}

#[actix_web::test]
async fn an_order_is_answered_as_it_reads_back_later() {
    let app = spawn_app().await;
    let buyer = app.create_user(100_000).await;
    let keyboard = app.create_product("Keyboard", 30_000, 10).await;
    let mouse = app.create_product("Mouse", 5_000, 10).await;
    // Lines in another order than the product ids: an order is shown by product id.
    let (status, created) = create_order(
        &app,
        json!({"userId": buyer, "items": [
            {"productId": mouse, "quantity": 1},
            {"productId": keyboard, "quantity": 2},
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let order_id = created["orderId"].as_u64().unwrap();
    let (status, read) = app.get(&format!("/orders/{order_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(created, read, "the answer is what a read finds");
}

#[actix_web::test]
async fn bad_orders_are_refused_with_400() {
    let app = spawn_app().await;
    let user_id = app.create_user(0).await;
    let product = app.create_product("Keyboard", 1_000, 5).await;
    let cases = [
        (json!({"userId": user_id, "items": []}), "INVALID_ITEMS"),
        (
            json!({"userId": user_id, "items": [{"productId": product, "quantity": 0}]}),
            "INVALID_QUANTITY",
        ),
        (
            json!({"userId": user_id, "items": [{"productId": product, "quantity": -3}]}),
            "INVALID_QUANTITY",
        ),
        (
            json!({"userId": user_id, "items": [{"productId": 987654, "quantity": 1}]}),
            "UNKNOWN_PRODUCT",
        ),
        (
            json!({"userId": user_id, "items": [
                {"productId": product, "quantity": 1}, {"productId": product, "quantity": 1}]}),
            "DUPLICATE_PRODUCT",
        ),
        (
            json!({"userId": 987654, "items": [{"productId": product, "quantity": 1}]}),
            "UNKNOWN_USER",
        ),
        (json!({"userId": user_id}), "INVALID_JSON"),
    ];
    for (body, code) in cases {
        let (status, error) = create_order(&app, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {error}");
        assert_eq!(error["error"]["code"], code, "{body} → {error}");
    }
    let (status, error) = app
        .as_user(user_id)
        .await
        .post(
            &format!("/users/{user_id}/balance/charge"),
            r#"{"amount": 0}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["code"], "INVALID_AMOUNT");
    let (status, error) = app
        .post("/products", r#"{"name": "x", "price": 0, "stock": 1}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["code"], "INVALID_PRICE");
    let (status, page) = app.get("/products?page=0&size=10").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["productId"], product);
}

#[actix_web::test]
async fn a_coupon_discounts_one_payment_and_only_its_owner_can_use_it() {
    let app = spawn_app().await;
    let owner = app.create_user(100_000).await;
    let other = app.create_user(100_000).await;
    let product = app.create_product("Keyboard", 20_000, 10).await;
    let coupon = app.create_coupon(10).await;
    let request = app.issue(owner, coupon).await;
    let history = app.wait_until_notified(&request).await["couponHistoryId"]
        .as_u64()
        .expect("issued");

    let (status, refused) = create_order(
        &app,
        json!({"userId": other, "items": [{"productId": product, "quantity": 1}], "couponHistoryId": history}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"]["code"], "COUPON_NOT_OWNED");

    let with_coupon = json!({"userId": owner, "items": [{"productId": product, "quantity": 1}], "couponHistoryId": history});
    let (_, first) = create_order(&app, with_coupon.clone()).await;
    let (_, second) = create_order(&app, with_coupon).await;
    assert_eq!(first["discountAmount"], 5_000);
    assert_eq!(first["payAmount"], 15_000);
    let (status, _) = app.try_pay(first["orderId"].as_u64().unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(balance(&app, owner).await, 85_000);
    let (status, refused) = app.try_pay(second["orderId"].as_u64().unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"]["code"], "COUPON_ALREADY_USED");
    assert_eq!(balance(&app, owner).await, 85_000);
    assert_eq!(stock(&app, product).await, 9);
}

#[actix_web::test]
async fn two_hundred_payments_for_a_stock_of_fifty_sell_exactly_fifty() {
    let app = spawn_app().await;
    let product = app.create_product("Keyboard", 1_000, 50).await;
    let mut orders = Vec::new();
    for _ in 0..200 {
        let user = app.create_user(10_000).await;
        orders.push((user, app.place_order(user, &[(product, 1)]).await));
    }
    // As many payments at once as the daemon has connections, and more.
    let answers: Vec<(StatusCode, Value)> = futures::stream::iter(&orders)
        .map(|(user, order)| app.pay_as(*user, *order))
        .buffered(16)
        .collect()
        .await;
    assert_eq!(
        paid_and_refused(&answers, "INSUFFICIENT_STOCK"),
        (50, 150),
        "{answers:?}"
    );
    assert_eq!(stock(&app, product).await, 0);

    // Balances and payments agree: each paying user was charged once, nobody else.
    let mut charged = 0;
    for ((user, _), (status, _)) in orders.iter().zip(&answers) {
        let expected = if *status == StatusCode::OK {
            9_000
        } else {
            10_000
        };
        let balance = balance(&app, *user).await;
        assert_eq!(balance, expected, "user {user}");
        charged += 10_000 - balance;
    }
    let (payments, total): (i64, u64) =
        sqlx::query_as("SELECT COUNT(*), CAST(COALESCE(SUM(amount), 0) AS UNSIGNED) FROM payment")
            .fetch_one(app.event_log.pool())
            .await
            .unwrap();
    assert_eq!(payments, 50);
    assert_eq!(total, charged);
}

#[actix_web::test]
async fn one_order_paid_twenty_times_at_once_is_charged_once() {
    let app = spawn_app().await;
    let user = app.create_user(50_000).await;
    let product = app.create_product("Keyboard", 10_000, 100).await;
    let order = app.place_order(user, &[(product, 2)]).await;
    let answers = join_all((0..20).map(|_| app.pay_as(user, order))).await;
    assert_eq!(
        paid_and_refused(&answers, "ORDER_NOT_PENDING"),
        (1, 19),
        "{answers:?}"
    );
    assert_eq!(balance(&app, user).await, 30_000);
    assert_eq!(stock(&app, product).await, 98);
}

#[actix_web::test]
async fn one_buyer_paying_many_orders_at_once_pays_those_the_balance_covers_and_no_more() {
    let app = spawn_app().await;
    let user = app.create_user(5_000).await;
    let product = app.create_product("Cable", 1_000, 100).await;
    let mut orders = Vec::new();
    for _ in 0..12 {
        orders.push(app.place_order(user, &[(product, 1)]).await);
    }
    let answers = join_all(orders.iter().map(|order| app.pay_as(user, *order))).await;
    assert_eq!(
        paid_and_refused(&answers, "INSUFFICIENT_BALANCE"),
        (5, 7),
        "{answers:?}"
    );
    assert_eq!(balance(&app, user).await, 0);
    assert_eq!(stock(&app, product).await, 95);
    // A refused payment left its order PENDING, and wrote no payment.
    let statuses: Vec<(String, i64)> = sqlx::query_as(
        "SELECT o.status, COUNT(p.payment_id) FROM customer_order o \
         LEFT JOIN payment p ON p.order_id = o.order_id GROUP BY o.order_id ORDER BY o.order_id",
    )
    .fetch_all(app.event_log.pool())
    .await
    .unwrap();
    for ((status, payments), (answer, _)) in statuses.iter().zip(&answers) {
        let expected = if *answer == StatusCode::OK {
            ("COMPLETED", 1)
        } else {
            ("PENDING", 0)
        };
        assert_eq!((status.as_str(), *payments), expected);
    }
}

#[actix_web::test]
async fn a_coupon_named_by_two_orders_paid_at_once_is_used_once() {
    let app = spawn_app().await;
    let owner = app.create_user(100_000).await;
    let product = app.create_product("Keyboard", 20_000, 10).await;
    let coupon = app.create_coupon(10).await;
    let request = app.issue(owner, coupon).await;
    let history = app.wait_until_notified(&request).await["couponHistoryId"]
        .as_u64()
        .expect("issued");
    let with_coupon = json!({"userId": owner, "items": [{"productId": product, "quantity": 1}], "couponHistoryId": history});
    let mut orders = Vec::new();
    for _ in 0..4 {
        let (status, order) = create_order(&app, with_coupon.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{order}");
        orders.push(order["orderId"].as_u64().unwrap());
    }
    let answers = join_all(orders.iter().map(|order| app.pay_as(owner, *order))).await;
    assert_eq!(
        paid_and_refused(&answers, "COUPON_ALREADY_USED"),
        (1, 3),
        "{answers:?}"
    );
    assert_eq!(balance(&app, owner).await, 85_000);
    assert_eq!(stock(&app, product).await, 9);
}

#[actix_web::test]
async fn one_payment_sent_many_times_at_once_with_one_key_is_made_once_and_answered_alike() {
    let app = spawn_app().await;
    let user = app.create_user(10_000).await;
    let product = app.create_product("Cable", 1_000, 10).await;
    let order = app.place_order(user, &[(product, 1)]).await;
    let buyer = app.as_user(user).await;
    let key = [("idempotency-key", "pay-at-once")];
    let path = format!("/orders/{order}/pay");
    let answers = join_all((0..10).map(|_| buyer.post_with(&path, "", &key))).await;
    assert_eq!(answers[0].0, StatusCode::OK, "{answers:?}");
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "{answers:?}"
    );
    assert_eq!(balance(&app, user).await, 9_000);
    assert_eq!(stock(&app, product).await, 9);
}

#[actix_web::test]
async fn orders_placed_at_once_are_each_answered_for_themselves() {
    let app = spawn_app().await;
    let cheap = app.create_product("Cable", 1_000, 5).await;
    let dear = app.create_product("Yacht", 100_000_000, 5).await;
    let mut buyers = Vec::new();
    for _ in 0..10 {
        buyers.push(app.create_user(0).await);
    }
    // Three kinds at once, interleaved: good orders, an unknown product, a total too large.
    let bodies: Vec<(Value, Option<&str>)> = buyers
        .iter()
        .flat_map(|buyer| {
            [
                (
                    json!({"userId": buyer, "items": [{"productId": cheap, "quantity": 2}]}),
                    None,
                ),
                (
                    json!({"userId": buyer, "items": [{"productId": cheap, "quantity": 1},
                                                      {"productId": 987654, "quantity": 1}]}),
                    Some("UNKNOWN_PRODUCT"),
                ),
                (
                    json!({"userId": buyer, "items": [{"productId": dear, "quantity": 1000},
                                                      {"productId": cheap, "quantity": 1}]}),
                    None,
                ),
            ]
        })
        .collect();
    let answers = join_all(
        bodies
            .iter()
            .map(|(body, _)| create_order(&app, body.clone())),
    )
    .await;
    let mut placed = Vec::new();
    for ((body, refusal), (status, answer)) in bodies.iter().zip(&answers) {
        match refusal {
            Some(code) => {
                assert_eq!(status, &StatusCode::BAD_REQUEST, "{body} → {answer}");
                assert_eq!(answer["error"]["code"], *code, "{body} → {answer}");
            }
            None => {
                assert_eq!(status, &StatusCode::CREATED, "{body} → {answer}");
                assert_eq!(answer["userId"], body["userId"]);
                let total: u64 = body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|line| {
                        let price = if line["productId"] == dear {
                            100_000_000
                        } else {
                            1_000
                        };
                        price * line["quantity"].as_u64().unwrap()
                    })
                    .sum();
                assert_eq!(answer["totalAmount"], total, "{answer}");
                placed.push(answer.clone());
            }
        }
    }
    // Exactly the orders answered 201 are there, each as answered.
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM customer_order")
        .fetch_one(app.event_log.pool())
        .await
        .unwrap();
    assert_eq!(count, placed.len() as i64);
    for answer in placed {
        let (status, read) = app.get(&format!("/orders/{}", answer["orderId"])).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(read, answer);
    }
}

async fn cached_product(app: &TestApp, product_id: u64) -> Option<Value> {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let cached: Option<String> = redis::cmd("GET")
        .arg(format!(
            "{}product:{product_id}",
            app.settings.redis.key_prefix
        ))
        .query_async(&mut connection)
        .await
        .unwrap();
    cached.map(|text| serde_json::from_str(&text).unwrap())
}

async fn wait_for_cached(app: &TestApp, product_id: u64, field: &str, value: u64) {
    eventually(
        &format!("product {product_id} cached with {field} {value}"),
        Duration::from_secs(30),
        || async {
            cached_product(app, product_id)
                .await
                .is_some_and(|product| product[field] == value)
        },
    )
    .await;
}

#[actix_web::test]
async fn product_changes_reach_the_cache_that_product_reads_go_through() {
    let app = spawn_app().await;
    let product = app.create_product("Keyboard", 1_000, 10).await;
    wait_for_cached(&app, product, "version", 1).await;

    let (status, updated) = app
        .request_json(
            awc::http::Method::PATCH,
            &format!("/products/{product}"),
            r#"{"price": 1500}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["version"], 2);
    wait_for_cached(&app, product, "price", 1500).await;
    assert_eq!(
        app.get(&format!("/products/{product}")).await.1["price"],
        1500
    );

    // A payment changes the stock: the event carries it to the cache.
    let user = app.create_user(100_000).await;
    let order = app.place_order(user, &[(product, 3)]).await;
    let (status, _) = app.try_pay(order).await;
    assert_eq!(status, StatusCode::OK);
    wait_for_cached(&app, product, "stock", 7).await;
    assert_eq!(app.get(&format!("/products/{product}")).await.1["stock"], 7);
    assert_eq!(cached_product(&app, product).await.unwrap()["version"], 3);

    // Changes arriving as events (from another instance, say) are applied by the consumer
    // when newer than the cache, and ignored when older.
    let publish = |version: u64, price: u64| {
        let event = OutboxEvent::new(EventEnvelope::new(
            format!("product:{product}"),
            EventPayload::ProductChanged(ProductChanged {
                product_id: ProductId::from_u64(product).unwrap(),
                name: "Keyboard".into(),
                price,
                stock: 7,
                version,
                change: ProductChange::PriceChanged,
            }),
        ));
        let app = &app;
        async move { app.publish_through_outbox(&event).await }
    };
    publish(10, 2_000).await;
    wait_for_cached(&app, product, "version", 10).await;
    let cached = cached_product(&app, product).await.unwrap();
    assert_eq!(cached["price"], 2_000);
    let processor = || async {
        testkit::app::domain_actor(&app.get("/admin/actors").await.1, "ProductEventProcessor")
            .clone()
    };
    let duplicates_before = processor().await["duplicates"].as_u64().unwrap();
    publish(9, 1).await;
    eventually("the stale change seen", Duration::from_secs(30), || async {
        processor().await["duplicates"].as_u64().unwrap() > duplicates_before
    })
    .await;
    assert_eq!(cached_product(&app, product).await, Some(cached));

    // A miss reads MySQL and fills the cache.
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("DEL")
        .arg(format!(
            "{}product:{product}",
            app.settings.redis.key_prefix
        ))
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    assert_eq!(app.get(&format!("/products/{product}")).await.1["stock"], 7);
    assert_eq!(
        cached_product(&app, product).await.unwrap()["version"],
        3,
        "MySQL's row"
    );

    let (status, error) = app
        .request_json(
            awc::http::Method::PATCH,
            &format!("/products/{product}"),
            "{}",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["code"], "NOTHING_TO_CHANGE");
    let (status, _) = app
        .request_json(
            awc::http::Method::PATCH,
            "/products/987654",
            r#"{"stock": 1}"#,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn a_batch_of_payments_records_one_product_change_per_product_with_its_last_state() {
    use commerce_events::common::ids::{OrderId, UserId};
    use commerce_events::outbox::Outbox;
    use commerce_events::shop::intake::GroupCommit;
    use commerce_events::shop::payments::{PaymentRequest, Payments};

    let app = spawn_app().await;
    let (keyboard, mouse) = (
        app.create_product("Keyboard", 100, 50).await,
        app.create_product("Mouse", 100, 50).await,
    );
    let buyer = app.create_user(1_000_000).await;
    let orders = [
        app.place_order(buyer, &[(keyboard, 2)]).await,
        app.place_order(buyer, &[(keyboard, 3), (mouse, 1)]).await,
        app.place_order(buyer, &[(keyboard, 4)]).await,
    ];
    let requests: Vec<PaymentRequest> = orders
        .iter()
        .map(|order_id| PaymentRequest {
            order_id: OrderId::from_u64(*order_id).unwrap(),
            payer: UserId::from_u64(buyer).unwrap(),
            now: chrono::Utc::now(),
            key: None,
            trace: None,
        })
        .collect();
    let outbox = Outbox::new(app.event_log.clone(), app.publisher.clone());
    let payments = Payments::new(outbox.clone());
    let mut transaction = outbox.begin().await.unwrap();
    let answers = payments
        .write_in(&mut transaction, &requests)
        .await
        .unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let committed = transaction.commit().await.unwrap();

    let changes: Vec<(ProductId, u32)> = committed
        .events()
        .filter_map(|event| match &event.envelope.payload {
            EventPayload::ProductChanged(change) => Some((change.product_id, change.stock)),
            _ => None,
        })
        .collect();
    let id = |id| ProductId::from_u64(id).unwrap();
    assert_eq!(changes, vec![(id(keyboard), 41), (id(mouse), 49)]);
    let kinds: Vec<&str> = committed
        .events()
        .map(|event| event.envelope.event_type().as_str())
        .collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|kind| **kind == "OrderCompleted")
            .count(),
        3
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|kind| **kind == "PaymentCompleted")
            .count(),
        3
    );
    committed.publish().await;
    for (product, stock) in [(keyboard, 41), (mouse, 49)] {
        let path = format!("/products/{product}");
        eventually(
            "the cache has the batch's last state",
            Duration::from_secs(20),
            || async { app.get(&path).await.1["stock"] == stock },
        )
        .await;
    }
}
