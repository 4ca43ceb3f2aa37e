//! Scenario `payments`: orders and payments end to end through the daemon binary, started
//! as its own process (its own database, the embedded Kafka cluster), driven over HTTP from
//! this process.
//!
//! `buyers` buyers (each charged a large balance) and `products` products (ample stock).
//! `clients` concurrent clients, for `seconds`: each places an order of one unit of a product
//! (`POST /orders`) and pays it (`POST /orders/{id}/pay`: stock, balance and outbox in one
//! transaction), then the next, going round its own share of the buyers and round the
//! products. Meanwhile the ranking (`GET /products/ranking`) is read every 20 ms; the k-th
//! unit of a product paid (in the order the payments were answered) is reflected when a
//! reading first shows k units of it. The lag from a payment's answer to that reading is
//! the ranking lag, to within the 20 ms of the readings.
//!
//! At the end the ranking must count every paid unit exactly once. Costs per payment (its
//! order included) come from [`crate::costs`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use commerce_events::common::connections;
use commerce_events::config::Settings;
use commerce_events::guards::tokens::Authenticator;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::chart::nearest_rank;
use crate::costs::{CostTable, Meters};
use crate::coupons::{drop_database, start_daemon};
use crate::load;
use crate::report::{Cell, Column, Report, Table};

const JWT_SECRET: &str = "bench-secret-of-the-payment-scenario";
/// How often the ranking is read.
const READING_INTERVAL: Duration = Duration::from_millis(20);

#[derive(clap::Args)]
pub struct Options {
    /// Buyers, shared out among the clients.
    #[arg(long, default_value_t = 1_000)]
    pub buyers: u64,
    /// Products bought, in turn (at most 100: the ranking answers up to 100).
    #[arg(long, default_value_t = 100)]
    pub products: u64,
    /// Concurrent clients, each ordering and paying one order after another.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// How long the clients order and pay.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

/// Readings of the ranking: when, and the units counted by product.
type Readings = Vec<(Instant, BTreeMap<u64, u64>)>;

/// One payment as its client saw it.
struct Paid {
    product: u64,
    answered: Instant,
    order_ms: f64,
    pay_ms: f64,
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
    let overrides = [
        ("APP_DATABASE__URL", database_url.clone()),
        ("APP_REDIS__KEY_PREFIX", prefix),
        ("APP_INSTANCE__ID", "bench".to_string()),
        ("APP_AUTH__JWT_SECRET", JWT_SECRET.to_string()),
        ("APP_LIMITS__ORDER_CREATE__PER_SECOND", unlimited.clone()),
        ("APP_LIMITS__ORDER_CREATE__BURST", unlimited.clone()),
        ("APP_LIMITS__PAYMENT__PER_SECOND", unlimited.clone()),
        ("APP_LIMITS__PAYMENT__BURST", unlimited.clone()),
        ("APP_LIMITS__CHARGE__PER_SECOND", unlimited.clone()),
        ("APP_LIMITS__CHARGE__BURST", unlimited.clone()),
        // The ranking is read anonymously, 50 times a second.
        ("APP_LIMITS__ANONYMOUS__PER_SECOND", unlimited.clone()),
        ("APP_LIMITS__ANONYMOUS__BURST", unlimited),
    ];
    report.note(format!(
        "scenario payments: {} buyers over {} products, {} clients for {} s, the ranking read \
         every {} ms",
        options.buyers,
        options.products,
        options.clients,
        options.seconds,
        READING_INTERVAL.as_millis()
    ));
    let auth = Authenticator::from_settings(&settings.auth, &settings.kafka)?;
    let daemon = start_daemon(&overrides)?;
    daemon.wait_until_ready().await?;
    let shop = Shop {
        client: awc::Client::builder()
            .connector(awc::Connector::new().limit(options.clients + 64))
            .timeout(Duration::from_secs(60))
            .finish(),
        address: daemon.address.clone(),
        auth,
    };
    let mut products = Vec::new();
    for number in 0..options.products {
        let (status, product) = shop
            .post(
                1,
                true,
                "/products",
                json!({"name": format!("Product {number}"), "price": 1, "stock": 10_000_000}),
            )
            .await?;
        if status != 201 {
            bail!("create product: {status} {product}");
        }
        products.push(product["productId"].as_u64().context("a product id")?);
    }
    let mut buyers = Vec::new();
    for _ in 0..options.buyers {
        let (status, user) = shop
            .post(1, true, "/users", json!({"name": "Buyer"}))
            .await?;
        if status != 201 {
            bail!("create user: {status} {user}");
        }
        let buyer = user["userId"].as_u64().context("a user id")?;
        let (status, charged) = shop
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
        buyers.push(buyer);
    }
    let pool = connections::connect_mysql(&settings.database, 2).await?;
    let meters = Meters::of_daemon(pool.clone(), &settings, &daemon).await?;
    meters.wait_settled().await?;

    let before = meters.read().await?;
    let readings: Rc<RefCell<Readings>> = Rc::default();
    let reading = Rc::new(std::cell::Cell::new(true));
    let reader = actix_rt::spawn({
        let (shop, readings, reading) = (shop.clone(), readings.clone(), reading.clone());
        let limit = options.products;
        async move {
            let mut ticker = tokio::time::interval(READING_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while reading.get() {
                ticker.tick().await;
                if let Ok(ranking) = shop.ranking(limit).await {
                    readings.borrow_mut().push((Instant::now(), ranking));
                }
            }
        }
    });
    let paid: Rc<RefCell<Vec<Paid>>> = Rc::default();
    let failures = Rc::new(std::cell::Cell::new(0u64));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.seconds);
    let clients = options.clients.max(1);
    let workers: Vec<_> = (0..clients)
        .map(|worker| {
            let own: Vec<u64> = buyers
                .iter()
                .copied()
                .skip(worker)
                .step_by(clients)
                .collect();
            let (shop, products, paid, failures) = (
                shop.clone(),
                products.clone(),
                paid.clone(),
                failures.clone(),
            );
            actix_rt::spawn(async move {
                if own.is_empty() {
                    return;
                }
                let mut round = worker;
                while Instant::now() < deadline {
                    let buyer = own[round % own.len()];
                    let product = products[round % products.len()];
                    round += 1;
                    match shop.order_and_pay(buyer, product).await {
                        Ok((order_ms, pay_ms)) => paid.borrow_mut().push(Paid {
                            product,
                            answered: Instant::now(),
                            order_ms,
                            pay_ms,
                        }),
                        Err(error) => load::count_failure(&failures, format!("payments: {error}")),
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let paid = std::mem::take(&mut *paid.borrow_mut());
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for payment in &paid {
        *expected.entry(payment.product).or_default() += 1;
    }
    // Every paid unit in the ranking, exactly once.
    let settle_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = readings.borrow().last().map(|(_, ranking)| ranking.clone());
        if last.as_ref() == Some(&expected) {
            break;
        }
        if let Some(last) = &last
            && last
                .iter()
                .any(|(product, units)| *units > expected.get(product).copied().unwrap_or(0))
        {
            bail!("the ranking counted more than was paid: {last:?} against {expected:?}");
        }
        if Instant::now() > settle_deadline {
            bail!("the ranking did not reach what was paid: {last:?} against {expected:?}");
        }
        tokio::time::sleep(READING_INTERVAL).await;
    }
    reading.set(false);
    reader.await?;
    meters.wait_settled().await?;
    let after = meters.read().await?;

    let lags = ranking_lags(&paid, &readings.borrow());
    let percentile = |values: &mut Vec<f64>, p: f64| {
        values.sort_by(f64::total_cmp);
        nearest_rank(values, p)
    };
    let mut order_ms: Vec<f64> = paid.iter().map(|payment| payment.order_ms).collect();
    let mut pay_ms: Vec<f64> = paid.iter().map(|payment| payment.pay_ms).collect();
    let mut lags = lags;
    let mut table = Table::new(
        "payments",
        vec![
            Column::right("payments", "payments"),
            Column::right("failed", "failed"),
            Column::right("payments/s", "payments_per_second"),
            Column::right("order p50 ms", "order_p50_ms"),
            Column::right("order p99 ms", "order_p99_ms"),
            Column::right("pay p50 ms", "pay_p50_ms"),
            Column::right("pay p99 ms", "pay_p99_ms"),
            Column::right("ranking lag p50 ms", "ranking_lag_p50_ms"),
            Column::right("ranking lag p99 ms", "ranking_lag_p99_ms"),
            Column::left("ranking", "ranking"),
        ],
    );
    table.row(vec![
        Cell::count(paid.len() as u64),
        Cell::count(failures.get()),
        Cell::number(paid.len() as f64 / elapsed.as_secs_f64(), 0),
        Cell::number(percentile(&mut order_ms, 50.0), 1),
        Cell::number(percentile(&mut order_ms, 99.0), 1),
        Cell::number(percentile(&mut pay_ms, 50.0), 1),
        Cell::number(percentile(&mut pay_ms, 99.0), 1),
        Cell::number(percentile(&mut lags, 50.0), 1),
        Cell::number(percentile(&mut lags, 99.0), 1),
        Cell::text("every paid unit counted once"),
    ]);
    report.table(table);
    let mut costs = CostTable::new();
    costs.add(
        "order and payment",
        "payment",
        paid.len() as u64,
        before.until(&after),
    );
    report.table(costs.table("costs per payment (its order included)"));
    pool.close().await;
    daemon.stop().await?;
    drop_database(&database).await?;
    Ok(())
}

/// For each payment, the ms from its answer to the first reading of the ranking that counts
/// it (the k-th unit of its product answered, against readings of at least k units).
fn ranking_lags(paid: &[Paid], readings: &Readings) -> Vec<f64> {
    let mut by_product: BTreeMap<u64, Vec<Instant>> = BTreeMap::new();
    for payment in paid {
        by_product
            .entry(payment.product)
            .or_default()
            .push(payment.answered);
    }
    let mut lags = Vec::new();
    for (product, mut answered) in by_product {
        answered.sort();
        let mut reading = 0;
        for (position, at) in answered.iter().enumerate() {
            let units = position as u64 + 1;
            while reading < readings.len()
                && readings[reading].1.get(&product).copied().unwrap_or(0) < units
            {
                reading += 1;
            }
            if let Some((seen, _)) = readings.get(reading) {
                lags.push(seen.saturating_duration_since(*at).as_secs_f64() * 1_000.0);
            }
        }
    }
    lags
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

    /// One order of one unit, paid; the ms each request took.
    async fn order_and_pay(&self, buyer: u64, product: u64) -> anyhow::Result<(f64, f64)> {
        let token = self.token(buyer, false);
        let sent = Instant::now();
        let mut response = self
            .client
            .post(format!("{}/orders", self.address))
            .bearer_auth(&token)
            .send_json(&json!({"userId": buyer, "items": [{"productId": product, "quantity": 1}]}))
            .await
            .map_err(|error| anyhow::anyhow!("order: {error}"))?;
        let order: Value = response.json().await.unwrap_or(Value::Null);
        if response.status().as_u16() != 201 {
            bail!("order: {} {order}", response.status());
        }
        let order_ms = sent.elapsed().as_secs_f64() * 1_000.0;
        let order_id = order["orderId"].as_u64().context("an order id")?;
        let sent = Instant::now();
        let mut response = self
            .client
            .post(format!("{}/orders/{order_id}/pay", self.address))
            .bearer_auth(&token)
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
        Ok((order_ms, sent.elapsed().as_secs_f64() * 1_000.0))
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
