//! Payments through a crash: the daemon is SIGKILLed while batches of payments are being
//! decided and committed. Every payment answered 200 must be whole (order COMPLETED, one
//! payment row, stock taken, balance debited, its events recorded), every other order
//! untouched, and after a restart every committed payment's events reach their consumers
//! (nothing stranded).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use commerce_events::common::ids::UserId;
use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::MySqlPool;
use testkit::database::{TEST_JWT_SECRET, TestDatabase};
use testkit::faults::{Clients, user_rows};
use testkit::process::Daemon;
use testkit::wait::eventually_found;

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-events");
const BUYERS: u64 = 600;
const PRODUCTS: u64 = 10;
const PRICE: u64 = 100;
const BALANCE: u64 = 1_000_000;
const STOCK: u64 = 1_000_000;

/// What a payment's client saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Paid,
    Refused(u16),
    NoAnswer,
}

async fn post_as(
    client: &awc::Client,
    clients: &Clients,
    address: &str,
    user: u64,
    path: &str,
    body: Value,
) -> Result<(StatusCode, Value), String> {
    let token = clients
        .auth
        .mint(
            UserId::from_u64(user).unwrap(),
            false,
            Duration::from_secs(3_600),
        )
        .unwrap();
    let mut response = client
        .post(format!("{address}{path}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send_json(&body)
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

#[actix_web::test]
async fn sigkill_during_payment_batches_leaves_every_payment_whole_or_absent() {
    let _slot = testkit::faults::drill_slot();
    let database = TestDatabase::new();
    let settings = database.settings();
    let unlimited = "1000000";
    let environment = [
        ("APP_LIMITS__ORDER_CREATE__PER_SECOND", unlimited),
        ("APP_LIMITS__ORDER_CREATE__BURST", unlimited),
        ("APP_LIMITS__PAYMENT__PER_SECOND", unlimited),
        ("APP_LIMITS__PAYMENT__BURST", unlimited),
    ];
    let start = || {
        Daemon::start_with(
            Path::new(BINARY),
            &database.url(),
            &format!("{}:", database.name),
            TEST_JWT_SECRET,
            None,
            &environment,
        )
    };
    let first = start();
    let clients = Clients::new(&first.address, &settings);
    clients.wait_ready().await;
    let pool = MySqlPool::connect(&database.url()).await.unwrap();
    user_rows(&database.url(), BUYERS + 1).await;
    sqlx::query("UPDATE app_user SET balance = ? WHERE user_id > 1")
        .bind(BALANCE)
        .execute(&pool)
        .await
        .unwrap();
    let mut products = Vec::new();
    for number in 0..PRODUCTS {
        let (status, product) = clients
            .admin(
                "/products",
                json!({"name": format!("Product {number}"), "price": PRICE, "stock": STOCK}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{product}");
        products.push(product["productId"].as_u64().unwrap());
    }

    // One order per buyer: one or two lines.
    let client = awc::Client::builder()
        .connector(awc::Connector::new().limit(64))
        .finish();
    let address = first.address.clone();
    let orders: Vec<(u64, u64)> = futures::stream::iter(2..=BUYERS + 1)
        .map(|buyer| {
            let (client, clients, address) = (&client, &clients, &address);
            let first_product = products[(buyer % PRODUCTS) as usize];
            let second_product = products[((buyer + 3) % PRODUCTS) as usize];
            let items = if buyer % 2 == 0 {
                json!([{"productId": first_product, "quantity": 1}])
            } else {
                json!([{"productId": first_product, "quantity": 2},
                       {"productId": second_product, "quantity": 1}])
            };
            async move {
                let (status, order) = post_as(
                    client,
                    clients,
                    address,
                    buyer,
                    "/orders",
                    json!({"items": items}),
                )
                .await
                .expect("the daemon answers");
                assert_eq!(status, StatusCode::CREATED, "{order}");
                (buyer, order["orderId"].as_u64().unwrap())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    // Pay them 64 at a time; SIGKILL once 100 are paid.
    let seen: Arc<Mutex<BTreeMap<u64, Seen>>> = Arc::default();
    let paying =
        {
            let (client, clients, address, seen) = (
                client.clone(),
                clients.clone(),
                address.clone(),
                seen.clone(),
            );
            actix_rt::spawn(async move {
                futures::stream::iter(orders)
                    .for_each_concurrent(64, |(buyer, order)| {
                        let (client, clients, address, seen) = (&client, &clients, &address, &seen);
                        async move {
                            let path = format!("/orders/{order}/pay");
                            let outcome =
                                match post_as(client, clients, address, buyer, &path, Value::Null)
                                    .await
                                {
                                    Ok((StatusCode::OK, _)) => Seen::Paid,
                                    Ok((status, _)) => Seen::Refused(status.as_u16()),
                                    Err(_) => Seen::NoAnswer,
                                };
                            seen.lock().unwrap().insert(order, outcome);
                        }
                    })
                    .await;
            })
        };
    eventually_found(
        "100 payments answered 200",
        Duration::from_secs(120),
        || {
            let seen = seen.clone();
            async move {
                let paid = seen
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|seen| **seen == Seen::Paid)
                    .count();
                if paid >= 100 {
                    Ok(())
                } else {
                    Err(Some(format!("{paid} paid")))
                }
            }
        },
    )
    .await;
    first.signal("-KILL");
    first.exited().await;
    paying.await.unwrap();

    let seen = seen.lock().unwrap().clone();
    let paid: BTreeSet<u64> = seen
        .iter()
        .filter(|(_, seen)| **seen == Seen::Paid)
        .map(|(order, _)| *order)
        .collect();
    let refused: Vec<_> = seen
        .iter()
        .filter(|(_, seen)| matches!(seen, Seen::Refused(status) if *status != 503))
        .collect();
    assert!(refused.is_empty(), "refused before the kill: {refused:?}");
    assert_whole_or_absent(&pool, &paid).await;

    // Restarted on a fresh embedded cluster, the daemon publishes again what its consumers
    // have not settled (the events are recorded proven: none waits PENDING for the relay),
    // and every committed order's events reach their consumers: the analytics delivery and
    // the product cache complete their rows.
    let second = start();
    clients.point_at(&second.address);
    clients.wait_ready().await;
    eventually_found(
        "every committed payment's events settled by their consumers",
        Duration::from_secs(90),
        || {
            let pool = pool.clone();
            async move {
                let unsettled: Vec<(String, String, i64)> = sqlx::query_as(
                    "SELECT event_type, status, COUNT(*) FROM event_log \
                     WHERE event_type IN ('OrderCompleted', 'ProductChanged') \
                     AND status <> 'COMPLETED' GROUP BY event_type, status",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                if unsettled.is_empty() {
                    Ok(())
                } else {
                    Err(Some(format!("unsettled: {unsettled:?}")))
                }
            }
        },
    )
    .await;
    second.signal("-TERM");
    second.exited().await;
}

/// Every order answered paid is complete, every completed order is whole (one payment of its
/// amount, its two events), every other order is untouched, and the stock and balances taken
/// are exactly those of the completed orders.
async fn assert_whole_or_absent(pool: &MySqlPool, paid: &BTreeSet<u64>) {
    let orders: Vec<(u64, u64, String, u64, Option<u64>, i64)> = sqlx::query_as(
        "SELECT o.order_id, o.user_id, o.status, o.pay_amount, p.amount, \
                (SELECT COUNT(*) FROM payment q WHERE q.order_id = o.order_id) \
         FROM customer_order o LEFT JOIN payment p ON p.order_id = o.order_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let events: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, event_key FROM event_log \
         WHERE event_type IN ('OrderCompleted', 'PaymentCompleted')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut events_by_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (event_type, key) in events {
        events_by_order.entry(key).or_default().push(event_type);
    }
    let mut debited: BTreeMap<u64, u64> = BTreeMap::new();
    let mut completed = BTreeSet::new();
    for (order, user, status, pay_amount, payment, payments) in &orders {
        let mut order_events = events_by_order
            .remove(&format!("order:{order}"))
            .unwrap_or_default();
        order_events.sort();
        if status == "COMPLETED" {
            completed.insert(*order);
            assert_eq!(*payments, 1, "order {order}: one payment");
            assert_eq!(*payment, Some(*pay_amount), "order {order}: its amount");
            assert_eq!(
                order_events,
                ["OrderCompleted", "PaymentCompleted"],
                "order {order}: its events"
            );
            *debited.entry(*user).or_default() += pay_amount;
        } else {
            assert_eq!(status, "PENDING", "order {order}");
            assert_eq!(*payments, 0, "order {order}: no payment");
            assert!(order_events.is_empty(), "order {order}: no events");
        }
    }
    let missing: Vec<_> = paid.difference(&completed).collect();
    assert!(
        missing.is_empty(),
        "answered 200, not complete: {missing:?}"
    );
    assert!(events_by_order.is_empty(), "{events_by_order:?}");

    let balances: Vec<(u64, u64)> =
        sqlx::query_as("SELECT user_id, balance FROM app_user WHERE user_id > 1")
            .fetch_all(pool)
            .await
            .unwrap();
    for (user, balance) in balances {
        let taken = debited.get(&user).copied().unwrap_or(0);
        assert_eq!(balance, BALANCE - taken, "user {user}'s balance");
    }
    let stock_taken: Vec<(u64, u64, u64)> = sqlx::query_as(
        "SELECT p.product_id, p.stock, \
                CAST(COALESCE(SUM(CASE WHEN o.status = 'COMPLETED' THEN i.quantity END), 0) \
                     AS UNSIGNED) \
         FROM product p LEFT JOIN order_item i ON i.product_id = p.product_id \
         LEFT JOIN customer_order o ON o.order_id = i.order_id GROUP BY p.product_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (product, stock, sold) in stock_taken {
        assert_eq!(stock, STOCK - sold, "product {product}'s stock");
    }
    eprintln!(
        "payments through a SIGKILL: {} answered 200, {} completed of {} orders",
        paid.len(),
        completed.len(),
        orders.len()
    );
}
