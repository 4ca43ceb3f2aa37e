//! Users, products, orders and payments in MySQL.

use std::collections::BTreeMap;

use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{MySqlConnection, QueryBuilder};

use crate::common::columns::named_enum;
use crate::common::error::{Classify, Dependency, ErrorClass};
use crate::common::ids::{CouponHistoryId, OrderId, PaymentId, ProductId, UserId};
use crate::coupons::store::{CouponUnusable, usable_discount, use_coupon};
use crate::event_log::{EventLogError, OutboxEvent};
use crate::events::{
    EventEnvelope, EventPayload, OrderCompleted, OrderedProduct, PaymentCompleted, ProductChange,
    ProductChanged,
};
use crate::guards::idempotency::{self, Claim, IdempotencyKey, StoredAnswer};
use crate::outbox::{Committed, Outbox, OutboxTransaction};
use crate::shop::{PaymentRefusal, order_amounts};

/// How often a payment is tried again after a deadlock.
const PAYMENT_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ShopError {
    #[error("shop query failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error("{0} not found")]
    NotFound(String),
    /// The caller may not do this to this resource (HTTP 403).
    #[error("{0}")]
    Forbidden(String),
    /// A request naming things that do not exist or cannot be combined (HTTP 400).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error(transparent)]
    Refused(#[from] PaymentRefusal),
    /// An `Idempotency-Key` sent with another request before.
    #[error("the idempotency key was used with another request")]
    KeyReused,
    /// The order or payment intake is shutting down.
    #[error("the shop's intake is shutting down")]
    Closed,
    /// A batch's writes did not match its decisions (rows changed under its locks).
    #[error("{0}")]
    Inconsistent(String),
}

impl Classify for ShopError {
    fn class(&self) -> ErrorClass {
        match self {
            // Two first requests with one idempotency key: the second retries and replays.
            ShopError::Database(error) if idempotency::is_key_race(error) => ErrorClass::Retryable,
            ShopError::Database(error) => error.class(),
            ShopError::EventLog(error) => error.class(),
            ShopError::Closed => ErrorClass::Unavailable(Dependency::Mysql),
            _ => ErrorClass::Permanent,
        }
    }
}

impl From<CouponUnusable> for ShopError {
    fn from(unusable: CouponUnusable) -> Self {
        ShopError::Refused(match unusable {
            CouponUnusable::NotOwned => PaymentRefusal::CouponNotOwned,
            CouponUnusable::AlreadyUsed => PaymentRefusal::CouponAlreadyUsed,
        })
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> ShopError {
    ShopError::Invalid {
        code,
        message: message.into(),
    }
}

/// A user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub user_id: UserId,
    pub name: String,
    pub balance: u64,
}

/// A product.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub product_id: ProductId,
    pub name: String,
    pub price: u64,
    pub stock: u32,
    /// Counts the product's changes (1 when created).
    pub version: u64,
}

impl Product {
    pub(super) fn changed(&self, change: ProductChange) -> OutboxEvent {
        OutboxEvent::new(EventEnvelope::new(
            self.product_id.partition_key(),
            EventPayload::ProductChanged(ProductChanged {
                product_id: self.product_id,
                name: self.name.clone(),
                price: self.price,
                stock: self.stock,
                version: self.version,
                change,
            }),
        ))
    }
}

/// A user's balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    pub user_id: UserId,
    pub balance: u64,
}

/// What a request sent with an `Idempotency-Key` came to: done now, or the first answer.
#[derive(Debug)]
pub enum Answered<T> {
    Fresh(T),
    Replay(StoredAnswer),
}

impl<T> Answered<T> {
    pub fn map<U>(self, change: impl FnOnce(T) -> U) -> Answered<U> {
        match self {
            Answered::Fresh(value) => Answered::Fresh(change(value)),
            Answered::Replay(answer) => Answered::Replay(answer),
        }
    }
}

/// A change committed with its events (to publish after the commit).
pub struct Changed<T> {
    pub value: T,
    pub events: Committed,
}

/// A page of products.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductPage {
    pub items: Vec<Product>,
    pub page: u32,
    pub size: u32,
    pub total: u64,
}

/// One line of an order to place.
#[derive(Clone, Copy, Debug)]
pub struct NewOrderLine {
    pub product_id: ProductId,
    pub quantity: u32,
}

/// One line of an order, at the price it was placed at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub product_id: ProductId,
    pub quantity: u32,
    pub unit_price: u64,
}

named_enum! {
    /// Where an order stands.
    pub enum OrderStatus ("order status") {
        Pending = "PENDING",
        /// Paid.
        Completed = "COMPLETED",
    }
}

/// An order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub status: OrderStatus,
    pub items: Vec<OrderLine>,
    pub total_amount: u64,
    pub discount_amount: u64,
    pub pay_amount: u64,
    pub coupon_history_id: Option<CouponHistoryId>,
    pub created_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
}

/// A payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub status: OrderStatus,
    pub amount: u64,
}

#[derive(Clone)]
pub struct ShopStore {
    outbox: Outbox,
}

impl ShopStore {
    pub fn new(outbox: Outbox) -> Self {
        Self { outbox }
    }

    fn pool(&self) -> &sqlx::MySqlPool {
        self.outbox.event_log().pool()
    }

    pub async fn create_user(&self, name: &str) -> Result<User, ShopError> {
        let inserted = sqlx::query!("INSERT INTO app_user (name) VALUES (?)", name)
            .execute(self.pool())
            .await?;
        Ok(User {
            user_id: UserId::from_u64(inserted.last_insert_id())
                .expect("AUTO_INCREMENT ids start at 1"),
            name: name.to_string(),
            balance: 0,
        })
    }

    pub async fn user(&self, user_id: UserId) -> Result<Option<User>, ShopError> {
        Ok(sqlx::query_as!(
            User,
            r#"SELECT user_id AS "user_id: UserId", name, balance FROM app_user WHERE user_id = ?"#,
            user_id,
        )
        .fetch_optional(self.pool())
        .await?)
    }

    /// Adds `amount` to the balance unless that would pass `max_balance`.
    pub async fn charge(
        &self,
        user_id: UserId,
        amount: u64,
        max_balance: u64,
        key: Option<&IdempotencyKey>,
    ) -> Result<Answered<Balance>, ShopError> {
        retrying(|| {
            self.idempotent(key, 200, async |transaction| {
                let updated = sqlx::query!(
                    "UPDATE app_user SET balance = balance + ? WHERE user_id = ? AND balance + ? <= ?",
                    amount,
                    user_id,
                    amount,
                    max_balance,
                )
                .execute(&mut **transaction)
                .await?;
                let balance = sqlx::query_scalar!(
                    "SELECT balance FROM app_user WHERE user_id = ?",
                    user_id
                )
                .fetch_optional(&mut **transaction)
                .await?
                .ok_or_else(|| ShopError::NotFound(format!("user {user_id}")))?;
                if updated.rows_affected() == 0 {
                    return Err(invalid(
                        "BALANCE_LIMIT_EXCEEDED",
                        format!("a balance may not pass {max_balance}"),
                    ));
                }
                Ok(Balance { user_id, balance })
            })
        })
        .await
        .map(|answered| answered.map(|changed| changed.value))
    }

    /// Runs `effect` in one transaction with the `Idempotency-Key`, if any: a key answered
    /// before replays its answer and runs nothing; a first one stores the answer (`status`
    /// and the effect's value) in the same transaction.
    async fn idempotent<T: Serialize>(
        &self,
        key: Option<&IdempotencyKey>,
        status: u16,
        effect: impl AsyncFnOnce(&mut OutboxTransaction) -> Result<T, ShopError>,
    ) -> Result<Answered<Changed<T>>, ShopError> {
        let mut transaction = self.outbox.begin().await?;
        if let Some(key) = key {
            match idempotency::claim(&mut transaction, key).await? {
                Claim::First => {}
                Claim::Replay(answer) => return Ok(Answered::Replay(answer)),
                Claim::Mismatch => return Err(ShopError::KeyReused),
            }
        }
        let value = match effect(&mut transaction).await {
            Ok(value) => value,
            // A refusal may be the mark of the same request, made meanwhile by another
            // transaction with the key (a claim takes no lock on a key not stored yet, at
            // READ COMMITTED): that answer, now committed, is replayed instead.
            Err(refusal) => {
                let answered_refusal = matches!(
                    refusal,
                    ShopError::Refused(_)
                        | ShopError::NotFound(_)
                        | ShopError::Forbidden(_)
                        | ShopError::Invalid { .. }
                );
                let Some(key) = key.filter(|_| answered_refusal) else {
                    return Err(refusal);
                };
                return match idempotency::claim(&mut transaction, key).await? {
                    Claim::First => Err(refusal),
                    Claim::Replay(answer) => Ok(Answered::Replay(answer)),
                    Claim::Mismatch => Err(ShopError::KeyReused),
                };
            }
        };
        if let Some(key) = key {
            idempotency::store(&mut transaction, key, &StoredAnswer::json(status, &value)).await?;
        }
        Ok(Answered::Fresh(Changed {
            value,
            events: transaction.commit().await?,
        }))
    }

    /// Creates a product; its ProductChanged (CREATED) event is committed with it.
    pub async fn create_product(
        &self,
        name: &str,
        price: u64,
        stock: u32,
    ) -> Result<Changed<Product>, ShopError> {
        let mut transaction = self.outbox.begin().await?;
        let inserted = sqlx::query!(
            "INSERT INTO product (name, price, stock) VALUES (?, ?, ?)",
            name,
            price,
            stock,
        )
        .execute(&mut *transaction)
        .await?;
        let product = Product {
            product_id: ProductId::from_u64(inserted.last_insert_id())
                .expect("AUTO_INCREMENT ids start at 1"),
            name: name.to_string(),
            price,
            stock,
            version: 1,
        };
        transaction
            .record(vec![product.changed(ProductChange::Created)])
            .await?;
        Ok(Changed {
            value: product,
            events: transaction.commit().await?,
        })
    }

    /// Sets a product's price and/or stock; its ProductChanged event is committed with it.
    pub async fn update_product(
        &self,
        product_id: ProductId,
        price: Option<u64>,
        stock: Option<u32>,
    ) -> Result<Changed<Product>, ShopError> {
        let mut transaction = self.outbox.begin().await?;
        let updated = sqlx::query!(
            "UPDATE product SET price = COALESCE(?, price), stock = COALESCE(?, stock), \
             version = version + 1, updated_at = NOW(6) WHERE product_id = ?",
            price,
            stock,
            product_id,
        )
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(ShopError::NotFound(format!("product {product_id}")));
        }
        let product = products_in(&mut transaction, &[product_id], Lock::None)
            .await?
            .pop()
            .expect("the product just updated");
        let change = if price.is_some() {
            ProductChange::PriceChanged
        } else {
            ProductChange::StockChanged
        };
        transaction.record(vec![product.changed(change)]).await?;
        Ok(Changed {
            value: product,
            events: transaction.commit().await?,
        })
    }

    pub async fn product(&self, product_id: ProductId) -> Result<Option<Product>, ShopError> {
        Ok(sqlx::query_as!(
            Product,
            r#"SELECT product_id AS "product_id: ProductId", name, price, stock, version
               FROM product WHERE product_id = ?"#,
            product_id,
        )
        .fetch_optional(self.pool())
        .await?)
    }

    /// The names of the products among `ids` that exist.
    pub async fn product_names(
        &self,
        ids: &[ProductId],
    ) -> Result<BTreeMap<ProductId, String>, ShopError> {
        let mut connection = self.pool().acquire().await?;
        Ok(products_in(&mut connection, ids, Lock::None)
            .await?
            .into_iter()
            .map(|product| (product.product_id, product.name))
            .collect())
    }

    /// Products by id, `page` counted from 0.
    pub async fn products(&self, page: u32, size: u32) -> Result<ProductPage, ShopError> {
        let items = sqlx::query_as!(
            Product,
            r#"SELECT product_id AS "product_id: ProductId", name, price, stock, version
               FROM product ORDER BY product_id LIMIT ? OFFSET ?"#,
            size,
            u64::from(page) * u64::from(size),
        )
        .fetch_all(self.pool())
        .await?;
        let total = sqlx::query_scalar!("SELECT COUNT(*) FROM product")
            .fetch_one(self.pool())
            .await?;
        Ok(ProductPage {
            items,
            page,
            size,
            total: total.max(0) as u64,
        })
    }

    /// Places an order at today's prices, with the coupon's discount, created at `now`; the
    /// answer is built from what was written (no read-back).
    pub async fn create_order(
        &self,
        user_id: UserId,
        lines: &[NewOrderLine],
        coupon_history_id: Option<CouponHistoryId>,
        now: DateTime<Utc>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Answered<Order>, ShopError> {
        retrying(|| {
            self.idempotent(key, 201, async |transaction| {
                insert_order(transaction, user_id, lines, coupon_history_id, now).await
            })
        })
        .await
        .map(|answered| answered.map(|changed| changed.value))
    }

    pub async fn order(&self, order_id: OrderId) -> Result<Option<Order>, ShopError> {
        let mut connection = self.pool().acquire().await?;
        read_order(&mut connection, order_id, Lock::None).await
    }

    /// `payer` pays an order in one transaction (see the module documentation); a deadlock
    /// is retried. Only the order's buyer pays it: anyone else is refused on the locked row,
    /// before any effect. The returned events are committed but not yet published.
    pub async fn pay(
        &self,
        order_id: OrderId,
        payer: UserId,
        now: DateTime<Utc>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Answered<Changed<Payment>>, ShopError> {
        retrying(|| {
            self.idempotent(key, 200, async |transaction| {
                pay_in(transaction, order_id, payer, now).await
            })
        })
        .await
    }
}

/// Runs `attempt` again after a retryable failure (a deadlock, two first requests with one
/// idempotency key), up to [`PAYMENT_ATTEMPTS`] times in all.
async fn retrying<T, F: Future<Output = Result<T, ShopError>>>(
    mut attempt: impl FnMut() -> F,
) -> Result<T, ShopError> {
    let mut attempts = 1;
    loop {
        match attempt().await {
            Err(error) if error.class() == ErrorClass::Retryable && attempts < PAYMENT_ATTEMPTS => {
                attempts += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Inserts an order and its lines, created at `now`; returns the order as written (its lines
/// by product id, as an order is read).
async fn insert_order(
    transaction: &mut MySqlConnection,
    user_id: UserId,
    lines: &[NewOrderLine],
    coupon_history_id: Option<CouponHistoryId>,
    now: DateTime<Utc>,
) -> Result<Order, ShopError> {
    let user_exists =
        sqlx::query_scalar!("SELECT user_id FROM app_user WHERE user_id = ?", user_id)
            .fetch_optional(&mut *transaction)
            .await?
            .is_some();
    let ids: Vec<ProductId> = lines.iter().map(|line| line.product_id).collect();
    let prices: BTreeMap<ProductId, u64> = products_in(transaction, &ids, Lock::None)
        .await?
        .into_iter()
        .map(|product| (product.product_id, product.price))
        .collect();
    let discount = match coupon_history_id {
        None => None,
        Some(history_id) => Some(usable_discount(transaction, history_id, user_id).await?),
    };
    let mut order = price_order(user_id, user_exists, lines, &prices, discount)?.into_order(
        user_id,
        lines,
        &prices,
        coupon_history_id,
        now,
    );
    write_orders(transaction, &mut [&mut order]).await?;
    Ok(order)
}

/// What an order comes to: its amounts (total, discount, to pay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Priced {
    total: u64,
    discount: u64,
    pay: u64,
}

/// Decides what an order comes to from what was read, refusing it as placing it alone would,
/// naming the first thing wrong: the user (exists), the products (exist), the total (fits),
/// the coupon (`coupon`: its discount, or why it cannot be used; `None` when the order names
/// none or it is not read yet).
pub(super) fn price_order(
    user_id: UserId,
    user_exists: bool,
    lines: &[NewOrderLine],
    prices: &BTreeMap<ProductId, u64>,
    coupon: Option<Result<u64, CouponUnusable>>,
) -> Result<Priced, ShopError> {
    if !user_exists {
        return Err(invalid(
            "UNKNOWN_USER",
            format!("user {user_id} does not exist"),
        ));
    }
    let missing: Vec<String> = lines
        .iter()
        .filter(|line| !prices.contains_key(&line.product_id))
        .map(|line| line.product_id.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(invalid(
            "UNKNOWN_PRODUCT",
            format!("no product {}", missing.join(", ")),
        ));
    }
    let mut total: u64 = 0;
    for line in lines {
        total = prices[&line.product_id]
            .checked_mul(u64::from(line.quantity))
            .and_then(|amount| total.checked_add(amount))
            .ok_or_else(|| invalid("AMOUNT_TOO_LARGE", "the order's total is too large"))?;
    }
    let discount = coupon.transpose()?;
    let (total, discount, pay) = order_amounts(total, discount);
    Ok(Priced {
        total,
        discount,
        pay,
    })
}

impl Priced {
    /// The PENDING order of `user_id` at these amounts, created at `now` (as the column keeps
    /// it: microseconds), its lines by product id; its id is given when it is written.
    pub(super) fn into_order(
        self,
        user_id: UserId,
        lines: &[NewOrderLine],
        prices: &BTreeMap<ProductId, u64>,
        coupon_history_id: Option<CouponHistoryId>,
        now: DateTime<Utc>,
    ) -> Order {
        let created_at = now
            .with_nanosecond(now.nanosecond() / 1_000 * 1_000)
            .unwrap_or(now);
        let mut items: Vec<OrderLine> = lines
            .iter()
            .map(|line| OrderLine {
                product_id: line.product_id,
                quantity: line.quantity,
                unit_price: prices[&line.product_id],
            })
            .collect();
        items.sort_by_key(|line| line.product_id);
        Order {
            order_id: OrderId::from_u64(u64::MAX).expect("a placeholder id"),
            user_id,
            status: OrderStatus::Pending,
            items,
            total_amount: self.total,
            discount_amount: self.discount,
            pay_amount: self.pay,
            coupon_history_id,
            created_at,
            paid_at: None,
        }
    }
}

/// Inserts new orders (one statement each, so that each learns its own id: the ids of a
/// multi-row insert need not be consecutive) and all their lines (one statement), giving
/// each order its id.
pub(super) async fn write_orders(
    connection: &mut MySqlConnection,
    orders: &mut [&mut Order],
) -> Result<(), ShopError> {
    for order in orders.iter_mut() {
        let inserted = sqlx::query!(
            "INSERT INTO customer_order \
                 (user_id, status, total_amount, discount_amount, pay_amount, coupon_history_id, \
                  created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            order.user_id,
            order.status,
            order.total_amount,
            order.discount_amount,
            order.pay_amount,
            order.coupon_history_id,
            order.created_at,
        )
        .execute(&mut *connection)
        .await?;
        order.order_id =
            OrderId::from_u64(inserted.last_insert_id()).expect("AUTO_INCREMENT ids start at 1");
    }
    let lines: Vec<(OrderId, &OrderLine)> = orders
        .iter()
        .flat_map(|order| order.items.iter().map(|line| (order.order_id, line)))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut insert =
        QueryBuilder::new("INSERT INTO order_item (order_id, product_id, quantity, unit_price) ");
    insert.push_values(lines, |mut row, (order_id, line)| {
        row.push_bind(order_id)
            .push_bind(line.product_id)
            .push_bind(line.quantity)
            .push_bind(line.unit_price);
    });
    insert.build().execute(&mut *connection).await?;
    Ok(())
}

/// Pays an order in the caller's transaction: locks the order (still PENDING), spends its
/// coupon, takes the stock, debits the balance, records the payment and completes the
/// order, then records its events (OrderCompleted, PaymentCompleted and the products'
/// stock changes).
async fn pay_in(
    transaction: &mut OutboxTransaction,
    order_id: OrderId,
    payer: UserId,
    now: DateTime<Utc>,
) -> Result<Payment, ShopError> {
    let order = lock_pending_order(transaction, order_id, payer).await?;
    if let Some(history_id) = order.coupon_history_id {
        use_coupon(transaction, history_id, order.user_id, order_id).await??;
    }
    // Products in id order, so payments sharing products lock them in one order.
    let mut lines = order.items.clone();
    lines.sort_by_key(|line| line.product_id);
    let products = take_product_stock(transaction, &lines).await?;
    debit_balance(transaction, &order).await?;
    let payment_id = insert_payment(transaction, &order, now).await?;
    complete_order(transaction, order_id, now).await?;
    let events = payment_events(&order, payment_id, &products, now);
    transaction.record(events).await?;
    Ok(Payment {
        payment_id,
        order_id,
        status: OrderStatus::Completed,
        amount: order.pay_amount,
    })
}

/// Reads and locks an order for `payer` to pay: not found; forbidden when it is another
/// user's (even an admin never pays for a user); refused when it is not PENDING (paid
/// already).
async fn lock_pending_order(
    connection: &mut MySqlConnection,
    order_id: OrderId,
    payer: UserId,
) -> Result<Order, ShopError> {
    let order = read_order(connection, order_id, Lock::ForUpdate)
        .await?
        .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))?;
    if order.user_id != payer {
        return Err(ShopError::Forbidden(format!(
            "the token's user {payer} may not act as user {}",
            order.user_id
        )));
    }
    if order.status != OrderStatus::Pending {
        return Err(PaymentRefusal::OrderNotPending.into());
    }
    Ok(order)
}

/// Takes each line's quantity from its product's stock: one locking read of the lines'
/// products (in id order, as `lines` is sorted), refused when one has fewer left, then one
/// `UPDATE … CASE` for them all. Answers the products as they are now (stock taken,
/// version counted), for their events.
async fn take_product_stock(
    connection: &mut MySqlConnection,
    lines: &[OrderLine],
) -> Result<Vec<Product>, ShopError> {
    let ids: Vec<ProductId> = lines.iter().map(|line| line.product_id).collect();
    let mut products = products_in(connection, &ids, Lock::ForUpdate).await?;
    let quantities: BTreeMap<ProductId, u32> = lines
        .iter()
        .map(|line| (line.product_id, line.quantity))
        .collect();
    for product in &mut products {
        let quantity = quantities[&product.product_id];
        product.stock = product
            .stock
            .checked_sub(quantity)
            .ok_or(PaymentRefusal::InsufficientStock)?;
        product.version += 1;
    }
    if products.len() != lines.len() {
        return Err(PaymentRefusal::InsufficientStock.into());
    }
    let mut update = QueryBuilder::new("UPDATE product SET stock = CASE product_id");
    for line in lines {
        update
            .push(" WHEN ")
            .push_bind(line.product_id)
            .push(" THEN stock - ")
            .push_bind(line.quantity);
    }
    update.push(" END, version = version + 1, updated_at = NOW(6) WHERE product_id IN (");
    let mut separated = update.separated(", ");
    for line in lines {
        separated.push_bind(line.product_id);
    }
    update.push(")");
    let taken = update.build().execute(&mut *connection).await?;
    if taken.rows_affected() != lines.len() as u64 {
        // Not reachable: the rows are locked and their stock checked above.
        return Err(PaymentRefusal::InsufficientStock.into());
    }
    Ok(products)
}

/// Debits the order's amount to pay from its user's balance; refused when the balance is
/// smaller.
async fn debit_balance(connection: &mut MySqlConnection, order: &Order) -> Result<(), ShopError> {
    let debited = sqlx::query!(
        "UPDATE app_user SET balance = balance - ? WHERE user_id = ? AND balance >= ?",
        order.pay_amount,
        order.user_id,
        order.pay_amount,
    )
    .execute(&mut *connection)
    .await?;
    if debited.rows_affected() == 0 {
        return Err(PaymentRefusal::InsufficientBalance.into());
    }
    Ok(())
}

/// Inserts the payment of an order, made at `now`; returns its id.
async fn insert_payment(
    connection: &mut MySqlConnection,
    order: &Order,
    now: DateTime<Utc>,
) -> Result<PaymentId, ShopError> {
    let inserted = sqlx::query!(
        "INSERT INTO payment (order_id, user_id, amount, paid_at) VALUES (?, ?, ?, ?)",
        order.order_id,
        order.user_id,
        order.pay_amount,
        now,
    )
    .execute(&mut *connection)
    .await?;
    Ok(PaymentId::from_u64(inserted.last_insert_id()).expect("AUTO_INCREMENT ids start at 1"))
}

/// Marks an order COMPLETED, paid at `now`.
async fn complete_order(
    connection: &mut MySqlConnection,
    order_id: OrderId,
    now: DateTime<Utc>,
) -> Result<(), ShopError> {
    sqlx::query!(
        "UPDATE customer_order SET status = ?, paid_at = ? WHERE order_id = ?",
        OrderStatus::Completed,
        now,
        order_id,
    )
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The events of a payment: OrderCompleted and PaymentCompleted (keyed by the order), then
/// a StockChanged product change per product, as the payment left it.
pub(super) fn payment_events(
    order: &Order,
    payment_id: PaymentId,
    products: &[Product],
    now: DateTime<Utc>,
) -> Vec<OutboxEvent> {
    let key = order.order_id.partition_key();
    let stock_changes = products
        .iter()
        .map(|product| product.changed(ProductChange::StockChanged));
    let mut events = vec![
        OutboxEvent::new(EventEnvelope::new(
            key.clone(),
            EventPayload::OrderCompleted(OrderCompleted {
                order_id: order.order_id,
                user_id: order.user_id,
                products: order
                    .items
                    .iter()
                    .map(|line| OrderedProduct {
                        id: line.product_id,
                        qty: line.quantity,
                    })
                    .collect(),
                total_amount: order.total_amount,
            }),
        )),
        OutboxEvent::new(EventEnvelope::new(
            key,
            EventPayload::PaymentCompleted(PaymentCompleted {
                payment_id,
                order_id: order.order_id,
                user_id: order.user_id,
                amount: order.pay_amount,
                timestamp: now,
            }),
        )),
    ];
    events.extend(stock_changes);
    events
}

/// The products among `ids` that exist, by id; locked to the end of the transaction with
/// [`Lock::ForUpdate`].
pub(super) async fn products_in(
    connection: &mut MySqlConnection,
    ids: &[ProductId],
    lock: Lock,
) -> Result<Vec<Product>, ShopError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut select = QueryBuilder::new(
        "SELECT product_id, name, price, stock, version FROM product WHERE product_id IN (",
    );
    let mut separated = select.separated(", ");
    for id in ids {
        separated.push_bind(*id);
    }
    select.push(match lock {
        Lock::None => ") ORDER BY product_id",
        Lock::ForUpdate => ") ORDER BY product_id FOR UPDATE",
    });
    Ok(select.build_query_as().fetch_all(&mut *connection).await?)
}

/// Whether reading an order locks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lock {
    None,
    /// The row stays locked to the end of the transaction (paying).
    ForUpdate,
}

/// An order's row (its lines are read apart).
#[derive(sqlx::FromRow)]
pub(super) struct OrderRow {
    pub order_id: OrderId,
    user_id: UserId,
    status: OrderStatus,
    total_amount: u64,
    discount_amount: u64,
    pay_amount: u64,
    coupon_history_id: Option<CouponHistoryId>,
    created_at: DateTime<Utc>,
    paid_at: Option<DateTime<Utc>>,
}

impl From<OrderRow> for Order {
    /// The order of the row, its lines still to read.
    fn from(row: OrderRow) -> Self {
        Order {
            order_id: row.order_id,
            user_id: row.user_id,
            status: row.status,
            items: Vec::new(),
            total_amount: row.total_amount,
            discount_amount: row.discount_amount,
            pay_amount: row.pay_amount,
            coupon_history_id: row.coupon_history_id,
            created_at: row.created_at,
            paid_at: row.paid_at,
        }
    }
}

async fn read_order(
    connection: &mut MySqlConnection,
    order_id: OrderId,
    lock: Lock,
) -> Result<Option<Order>, ShopError> {
    macro_rules! select_order {
        ($suffix:literal) => {
            sqlx::query_as!(
                OrderRow,
                r#"SELECT order_id AS "order_id: OrderId", user_id AS "user_id: UserId",
                          status AS "status: OrderStatus", total_amount, discount_amount,
                          pay_amount, coupon_history_id AS "coupon_history_id: CouponHistoryId",
                          created_at AS "created_at: DateTime<Utc>",
                          paid_at AS "paid_at: DateTime<Utc>"
                   FROM customer_order WHERE order_id = ?"# + $suffix,
                order_id,
            )
            .fetch_optional(&mut *connection)
            .await?
            .map(Order::from)
        };
    }
    let order = match lock {
        Lock::None => select_order!(""),
        Lock::ForUpdate => select_order!(" FOR UPDATE"),
    };
    let Some(mut order) = order else {
        return Ok(None);
    };
    order.items = sqlx::query_as!(
        OrderLine,
        r#"SELECT product_id AS "product_id: ProductId", quantity, unit_price
           FROM order_item WHERE order_id = ? ORDER BY product_id"#,
        order_id,
    )
    .fetch_all(&mut *connection)
    .await?;
    Ok(Some(order))
}
