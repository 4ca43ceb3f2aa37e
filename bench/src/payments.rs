//! Scenario `payments`: orders and payments end to end through the daemon binary, started
//! as its own process (its own database, the embedded Kafka cluster), driven over HTTP from
//! this process.
//!
//! `buyers` buyers (each charged a large balance) and `products` products (ample stock).
//! Each shape is a phase of `seconds`: `clients` concurrent clients, each placing an order
//! of one unit (`POST /orders`) and paying it (`POST /orders/{id}/pay`) as one of its own
//! share of the buyers, then the next:
//!
//! - `spread`: the products in turn;
//! - `hot`: every order for the first product, so every payment of a batch takes the same
//!   product row;
//! - `coupons`: the products in turn, every order spending a coupon its buyer holds (issued
//!   before the phase through `POST /coupons/issue`, `coupons` of them per buyer); a client
//!   stops early when its buyers hold no coupon any more;
//! - `keys`: the products in turn, every payment sent with an `Idempotency-Key`, and every
//!   tenth sent a second time with the same key, which must replay the same payment.
//!
//! After each phase the ranking must count every paid unit exactly once. The ranking lag is
//! the daemon's own `payment_ranking_applied_seconds`, from each payment's commit to its
//! units in the sorted set (the reader's HTTP latency is not in it). Costs per payment (its
//! order included) come from [`crate::costs`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use commerce_events::common::connections;
use commerce_events::config::Settings;
use commerce_events::guards::tokens::Authenticator;
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::MySqlPool;

use crate::chart::nearest_rank;
use crate::costs::{CostTable, Meters};
use crate::coupons::{drop_database, start_daemon};
use crate::load;
use crate::report::{Cell, Column, Report, Table};

const JWT_SECRET: &str = "bench-secret-of-the-payment-scenario";

/// How payments are made in a phase (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    Spread,
    Hot,
    Coupons,
    Keys,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Spread => "spread",
            Shape::Hot => "hot",
            Shape::Coupons => "coupons",
            Shape::Keys => "keys",
        }
    }
}

#[derive(clap::Args)]
pub struct Options {
    /// Buyers, shared out among the clients.
    #[arg(long, default_value_t = 2_000)]
    pub buyers: u64,
    /// Products bought, in turn (at most 100: the ranking answers up to 100).
    #[arg(long, default_value_t = 100)]
    pub products: u64,
    /// Concurrent clients, each ordering and paying one order after another.
    #[arg(long, default_value_t = 256)]
    pub clients: usize,
    /// How long each phase's clients order and pay.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// The phases, in this order.
    #[arg(long, value_delimiter = ',', default_values_t = [Shape::Spread, Shape::Hot, Shape::Coupons, Shape::Keys])]
    pub shapes: Vec<Shape>,
    /// Coupons each buyer holds for the `coupons` phase (one coupon of each of this many).
    #[arg(long, default_value_t = 20)]
    pub coupons: u64,
}

/// One payment as its client saw it.
struct Paid {
    product: u64,
    order_ms: f64,
    pay_ms: f64,
}

/// What a phase's clients saw.
#[derive(Default)]
struct Phase {
    paid: Vec<Paid>,
    failures: std::cell::Cell<u64>,
    replays: u64,
    /// Clients that ran out of coupons before the end.
    out_of_coupons: u64,
}

pub async fn run(options: Options, report: &mut Report) -> anyhow::Result<()> {
    if options.products == 0 || options.products > 100 {
        bail!("--products must be 1 to 100 (the ranking answers up to 100)");
    }
    let database = format!("bench_payments_{}", std::process::id());
    let database_url = format!("mysql://root@127.0.0.1:3306/{database}");
    let mut settings = Settings::load()?;
    settings.database.url = SecretString::from(database_url.clone());
    settings.auth.jwt_secret = SecretString::from(JWT_SECRET);
    let prefix = format!("{database}:");
    let unlimited = "1000000".to_string();
    let mut overrides = vec![
        ("APP_DATABASE__URL", database_url.clone()),
        ("APP_REDIS__KEY_PREFIX", prefix),
        ("APP_INSTANCE__ID", "bench".to_string()),
        ("APP_AUTH__JWT_SECRET", JWT_SECRET.to_string()),
    ];
    for name in [
        "APP_LIMITS__ORDER_CREATE__PER_SECOND",
        "APP_LIMITS__ORDER_CREATE__BURST",
        "APP_LIMITS__PAYMENT__PER_SECOND",
        "APP_LIMITS__PAYMENT__BURST",
        "APP_LIMITS__CHARGE__PER_SECOND",
        "APP_LIMITS__CHARGE__BURST",
        "APP_LIMITS__COUPON_ISSUE__PER_SECOND",
        "APP_LIMITS__COUPON_ISSUE__BURST",
        // The ranking is read anonymously after each phase.
        "APP_LIMITS__ANONYMOUS__PER_SECOND",
        "APP_LIMITS__ANONYMOUS__BURST",
    ] {
        overrides.push((name, unlimited.clone()));
    }
    report.note(format!(
        "scenario payments: {} buyers over {} products, {} clients, {} s per phase ({})",
        options.buyers,
        options.products,
        options.clients,
        options.seconds,
        options
            .shapes
            .iter()
            .map(|shape| shape.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let auth = Authenticator::from_settings(&settings.auth, &settings.kafka)?;
    let daemon = start_daemon(&overrides)?;
    daemon.wait_until_ready().await?;
    let shop = Shop {
        client: awc::Client::builder()
            // Idle connections are dropped before the daemon's keep-alive (5 s) closes
            // them: between phases they would otherwise fail their next request.
            .connector(
                awc::Connector::new()
                    .limit(options.clients + 64)
                    .conn_keep_alive(Duration::from_secs(3)),
            )
            .timeout(Duration::from_secs(60))
            .finish(),
        address: daemon.address.clone(),
        auth,
    };
    let products = shop.create_products(options.products).await?;
    let buyers = shop.create_buyers(options.buyers).await?;
    let pool = connections::connect_mysql(&settings.database, 2).await?;
    let meters = Meters::of_daemon(pool.clone(), &settings, &daemon).await?;
    meters.wait_settled().await?;

    let mut table = Table::new(
        "payments",
        vec![
            Column::left("shape", "shape"),
            Column::right("payments", "payments"),
            Column::right("failed", "failed"),
            Column::right("payments/s", "payments_per_second"),
            Column::right("order p50 ms", "order_p50_ms"),
            Column::right("order p99 ms", "order_p99_ms"),
            Column::right("pay p50 ms", "pay_p50_ms"),
            Column::right("pay p99 ms", "pay_p99_ms"),
            Column::right("ranking lag p50 ms", "ranking_lag_p50_ms"),
            Column::right("ranking lag p99 ms", "ranking_lag_p99_ms"),
            Column::right("lag ≤ 100 ms", "ranking_lag_within_100_ms"),
            Column::right("replays", "replays"),
            Column::left("ranking", "ranking"),
        ],
    );
    let mut costs = CostTable::new();
    let mut ranked: BTreeMap<u64, u64> = BTreeMap::new();
    for shape in options.shapes.clone() {
        let holdings = if shape == Shape::Coupons {
            hold_coupons(&shop, &pool, &buyers, options.coupons).await?
        } else {
            BTreeMap::new()
        };
        meters.wait_settled().await?;
        let before = meters.read().await?;
        let lag_before = meters.histogram("payment_ranking_applied_seconds").await?;
        let started = Instant::now();
        let phase = run_phase(&shop, &options, shape, &products, &buyers, holdings).await;
        let elapsed = started.elapsed();
        for payment in &phase.paid {
            *ranked.entry(payment.product).or_default() += 1;
        }
        shop.wait_for_ranking(&ranked, options.products).await?;
        meters.wait_settled().await?;
        let after = meters.read().await?;
        let lag = lag_before.until(&meters.histogram("payment_ranking_applied_seconds").await?);
        let percentile = |values: Vec<f64>, p: f64| {
            let mut values = values;
            values.sort_by(f64::total_cmp);
            nearest_rank(&values, p)
        };
        let order_ms: Vec<f64> = phase.paid.iter().map(|payment| payment.order_ms).collect();
        let pay_ms: Vec<f64> = phase.paid.iter().map(|payment| payment.pay_ms).collect();
        let mut ranking = "every paid unit counted once".to_string();
        if phase.out_of_coupons > 0 {
            ranking.push_str(&format!(
                "; {} clients ran out of coupons",
                phase.out_of_coupons
            ));
        }
        table.row(vec![
            Cell::text(shape.name()),
            Cell::count(phase.paid.len() as u64),
            Cell::count(phase.failures.get()),
            Cell::number(phase.paid.len() as f64 / elapsed.as_secs_f64(), 0),
            Cell::number(percentile(order_ms.clone(), 50.0), 1),
            Cell::number(percentile(order_ms, 99.0), 1),
            Cell::number(percentile(pay_ms.clone(), 50.0), 1),
            Cell::number(percentile(pay_ms, 99.0), 1),
            Cell::number(lag.quantile(0.5) * 1_000.0, 1),
            Cell::number(lag.quantile(0.99) * 1_000.0, 1),
            Cell::number(lag.share_within(0.1) * 100.0, 1),
            Cell::count(phase.replays),
            Cell::text(ranking),
        ]);
        costs.add(
            shape.name(),
            "payment",
            phase.paid.len() as u64,
            before.until(&after),
        );
    }
    report.table(table);
    report.table(costs.table("costs per payment (its order included), by shape"));
    pool.close().await;
    daemon.stop().await?;
    drop_database(&database).await?;
    Ok(())
}

/// One phase's clients (see the module documentation).
async fn run_phase(
    shop: &Shop,
    options: &Options,
    shape: Shape,
    products: &[u64],
    buyers: &[u64],
    holdings: BTreeMap<u64, Vec<u64>>,
) -> Phase {
    let phase: Rc<RefCell<Phase>> = Rc::default();
    let holdings = Rc::new(RefCell::new(holdings));
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let clients = options.clients.max(1);
    let workers = (0..clients).map(|worker| {
        let own: Vec<u64> = buyers
            .iter()
            .copied()
            .skip(worker)
            .step_by(clients)
            .collect();
        let (shop, phase, holdings) = (shop.clone(), phase.clone(), holdings.clone());
        let products = products.to_vec();
        async move {
            let mut round = worker;
            while !own.is_empty() && Instant::now() < deadline {
                let buyer = own[round % own.len()];
                let product = match shape {
                    Shape::Hot => products[0],
                    _ => products[round % products.len()],
                };
                round += 1;
                // Coupons: the next of its buyers still holding one pays, spending it.
                let (buyer, coupon) = if shape == Shape::Coupons {
                    let held = own
                        .iter()
                        .cycle()
                        .skip(round % own.len())
                        .take(own.len())
                        .find_map(|buyer| {
                            let mut holdings = holdings.borrow_mut();
                            Some((*buyer, holdings.get_mut(buyer)?.pop()?))
                        });
                    let Some((holder, coupon)) = held else {
                        phase.borrow_mut().out_of_coupons += 1;
                        return;
                    };
                    (holder, Some(coupon))
                } else {
                    (buyer, None)
                };
                let with_key = shape == Shape::Keys;
                let repeat = with_key && round % 10 == 0;
                match shop
                    .order_and_pay(buyer, product, coupon, with_key, repeat)
                    .await
                {
                    Ok((order_ms, pay_ms, replayed)) => {
                        let mut phase = phase.borrow_mut();
                        phase.paid.push(Paid {
                            product,
                            order_ms,
                            pay_ms,
                        });
                        phase.replays += u64::from(replayed);
                    }
                    Err(error) => load::count_failure(
                        &phase.borrow().failures,
                        format!("payments ({}): {error}", shape.name()),
                    ),
                }
            }
        }
    });
    futures::future::join_all(workers.map(actix_rt::spawn)).await;
    Rc::try_unwrap(phase)
        .map(RefCell::into_inner)
        .unwrap_or_default()
}

/// Issues `coupons` coupons (100,000 units each) to every buyer through the API and waits
/// until every one is issued: the coupon history ids each buyer holds.
async fn hold_coupons(
    shop: &Shop,
    pool: &MySqlPool,
    buyers: &[u64],
    coupons: u64,
) -> anyhow::Result<BTreeMap<u64, Vec<u64>>> {
    let mut coupon_ids = Vec::new();
    for number in 0..coupons {
        coupon_ids.push(
            shop.create(
                "/coupons",
                json!({"name": format!("Bench coupon {number}"), "discountAmount": 1,
                       "totalQuantity": 100_000, "validFrom": "2026-01-01T00:00:00Z",
                       "validUntil": "2099-01-01T00:00:00Z"}),
                "couponId",
            )
            .await?,
        );
    }
    let requests: Vec<(u64, u64)> = coupon_ids
        .iter()
        .flat_map(|coupon| buyers.iter().map(move |buyer| (*buyer, *coupon)))
        .collect();
    let expected = requests.len() as i64;
    let refused: Vec<String> = futures::stream::iter(requests)
        .map(|(buyer, coupon)| async move {
            shop.post(
                buyer,
                false,
                "/coupons/issue",
                json!({"userId": buyer, "couponId": coupon}),
            )
            .await
            .map_or_else(
                |error| Some(error.to_string()),
                |(status, body)| (status != 202).then(|| format!("{status} {body}")),
            )
        })
        .buffer_unordered(128)
        .filter_map(|refused| async move { refused })
        .collect()
        .await;
    if let Some(first) = refused.first() {
        bail!(
            "{} coupon requests refused, the first: {first}",
            refused.len()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (issued,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM coupon_history")
            .fetch_one(pool)
            .await?;
        if issued == expected {
            break;
        }
        if Instant::now() > deadline {
            bail!("{issued} of {expected} coupons issued after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows: Vec<(u64, u64)> = sqlx::query_as(
        "SELECT user_id, coupon_history_id FROM coupon_history WHERE status = 'ISSUED'",
    )
    .fetch_all(pool)
    .await?;
    let mut holdings: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (user, history) in rows {
        holdings.entry(user).or_default().push(history);
    }
    Ok(holdings)
}

/// The shop's API as the bench's clients use it.
#[derive(Clone)]
struct Shop {
    client: awc::Client,
    address: String,
    auth: Authenticator,
}

impl Shop {
    fn token(&self, user: u64, admin: bool) -> String {
        load::token(&self.auth, user, admin)
    }

    async fn post(
        &self,
        user: u64,
        admin: bool,
        path: &str,
        body: Value,
    ) -> anyhow::Result<(u16, Value)> {
        let mut response = self
            .client
            .post(format!("{}{path}", self.address))
            .bearer_auth(self.token(user, admin))
            .send_json(&body)
            .await
            .map_err(|error| anyhow::anyhow!("{path}: {error}"))?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Creates what `body` describes at `path`, as an admin: its id, the answer's `id_field`.
    async fn create(&self, path: &str, body: Value, id_field: &str) -> anyhow::Result<u64> {
        let (status, created) = self.post(1, true, path, body).await?;
        if status != 201 {
            bail!("POST {path}: {status} {created}");
        }
        created[id_field]
            .as_u64()
            .with_context(|| format!("{id_field} in {created}"))
    }

    /// `count` products with ample stock: their ids.
    async fn create_products(&self, count: u64) -> anyhow::Result<Vec<u64>> {
        let mut products = Vec::new();
        for number in 0..count {
            products.push(
                self.create(
                    "/products",
                    json!({"name": format!("Product {number}"), "price": 100, "stock": 10_000_000}),
                    "productId",
                )
                .await?,
            );
        }
        Ok(products)
    }

    /// `count` buyers, each charged a large balance: their ids.
    async fn create_buyers(&self, count: u64) -> anyhow::Result<Vec<u64>> {
        let created: Vec<anyhow::Result<u64>> = futures::stream::iter(0..count)
            .map(|_| async {
                let buyer = self
                    .create("/users", json!({"name": "Buyer"}), "userId")
                    .await?;
                let (status, charged) = self
                    .post(
                        buyer,
                        false,
                        &format!("/users/{buyer}/balance/charge"),
                        json!({"amount": 100_000_000u64}),
                    )
                    .await?;
                if status != 200 {
                    bail!("charge: {status} {charged}");
                }
                Ok(buyer)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut buyers = created.into_iter().collect::<anyhow::Result<Vec<u64>>>()?;
        buyers.sort_unstable();
        Ok(buyers)
    }

    /// One order of one unit (spending `coupon` when given), paid (with an
    /// `Idempotency-Key` when `with_key`, sent twice when `repeat`): the ms each request
    /// took, and whether a repeat replayed the payment.
    async fn order_and_pay(
        &self,
        buyer: u64,
        product: u64,
        coupon: Option<u64>,
        with_key: bool,
        repeat: bool,
    ) -> anyhow::Result<(f64, f64, bool)> {
        let token = self.token(buyer, false);
        let mut order = json!({"userId": buyer, "items": [{"productId": product, "quantity": 1}]});
        if let Some(coupon) = coupon {
            order["couponHistoryId"] = json!(coupon);
        }
        let sent = Instant::now();
        let mut response = self
            .client
            .post(format!("{}/orders", self.address))
            .bearer_auth(&token)
            .send_json(&order)
            .await
            .map_err(|error| anyhow::anyhow!("order: {error}"))?;
        let order: Value = response.json().await.unwrap_or(Value::Null);
        if response.status().as_u16() != 201 {
            bail!("order: {} {order}", response.status());
        }
        let order_ms = sent.elapsed().as_secs_f64() * 1_000.0;
        let order_id = order["orderId"].as_u64().context("an order id")?;
        let key = with_key.then(|| format!("bench-pay-{order_id}"));
        let sent = Instant::now();
        let payment = self.pay(&token, order_id, key.as_deref()).await?;
        let pay_ms = sent.elapsed().as_secs_f64() * 1_000.0;
        if !repeat {
            return Ok((order_ms, pay_ms, false));
        }
        let replayed = self.pay(&token, order_id, key.as_deref()).await?;
        if replayed != payment {
            bail!("a repeated payment answered {replayed}, not {payment}");
        }
        Ok((order_ms, pay_ms, true))
    }

    /// Pays `order_id`: the payment answered.
    async fn pay(&self, token: &str, order_id: u64, key: Option<&str>) -> anyhow::Result<Value> {
        let mut request = self
            .client
            .post(format!("{}/orders/{order_id}/pay", self.address))
            .bearer_auth(token);
        if let Some(key) = key {
            request = request.insert_header(("Idempotency-Key", key));
        }
        let mut response = request
            .send()
            .await
            .map_err(|error| anyhow::anyhow!("pay: {error}"))?;
        let body = response.body().await.unwrap_or_default();
        if response.status().as_u16() != 200 {
            bail!(
                "pay: {} {}",
                response.status(),
                String::from_utf8_lossy(&body)
            );
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// Waits until the ranking counts exactly `expected` units by product (the sorted set
    /// is never ahead of the payments: that fails at once).
    async fn wait_for_ranking(
        &self,
        expected: &BTreeMap<u64, u64>,
        limit: u64,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ranking = self.ranking(limit).await?;
            if &ranking == expected {
                return Ok(());
            }
            if ranking
                .iter()
                .any(|(product, units)| *units > expected.get(product).copied().unwrap_or(0))
            {
                bail!("the ranking counted more than was paid: {ranking:?} against {expected:?}");
            }
            if Instant::now() > deadline {
                bail!("the ranking did not reach what was paid: {ranking:?} against {expected:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Units counted by product in today's ranking.
    async fn ranking(&self, limit: u64) -> anyhow::Result<BTreeMap<u64, u64>> {
        let mut response = self
            .client
            .get(format!("{}/products/ranking?limit={limit}", self.address))
            .send()
            .await
            .map_err(|error| anyhow::anyhow!("ranking: {error}"))?;
        let ranking: Value = response.json().await?;
        Ok(ranking
            .as_array()
            .context("the ranking is a list")?
            .iter()
            .filter_map(|entry| Some((entry["productId"].as_u64()?, entry["quantity"].as_u64()?)))
            .collect())
    }
}
