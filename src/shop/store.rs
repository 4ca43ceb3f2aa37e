//! Users, products, orders and payments in MySQL.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{MySqlConnection, MySqlPool, QueryBuilder, Row};

use crate::error::{Classify, ErrorClass};
use crate::event_log::{EventLogError, OutboxEvent};
use crate::events::{
    EventEnvelope, EventPayload, OrderCompleted, OrderedProduct, PaymentCompleted, ProductChange,
    ProductChanged,
};
use crate::kafka::topics;
use crate::outbox::Outbox;
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
    /// A request naming things that do not exist or cannot be combined (HTTP 400).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error(transparent)]
    Refused(#[from] PaymentRefusal),
}

impl Classify for ShopError {
    fn class(&self) -> ErrorClass {
        match self {
            ShopError::Database(error) => error.class(),
            ShopError::EventLog(error) => error.class(),
            _ => ErrorClass::Permanent,
        }
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> ShopError {
    ShopError::Invalid {
        code,
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub user_id: u64,
    pub name: String,
    pub balance: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub product_id: u64,
    pub name: String,
    pub price: u64,
    pub stock: u32,
    /// Counts the product's changes (1 when created).
    pub version: u64,
}

impl Product {
    fn changed(&self, change: ProductChange) -> OutboxEvent {
        OutboxEvent {
            topic: topics::PRODUCT_EVENTS.into(),
            envelope: EventEnvelope::new(
                format!("product:{}", self.product_id),
                EventPayload::ProductChanged(ProductChanged {
                    product_id: self.product_id,
                    name: self.name.clone(),
                    price: self.price,
                    stock: self.stock,
                    version: self.version,
                    change,
                }),
            ),
        }
    }
}

/// A change committed with its events (to publish after the commit).
pub struct Committed<T> {
    pub value: T,
    pub events: Vec<OutboxEvent>,
}

/// A page of products.
#[derive(Clone, Debug, Serialize)]
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
    pub product_id: u64,
    pub quantity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub product_id: u64,
    pub quantity: u32,
    pub unit_price: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: u64,
    pub user_id: u64,
    pub status: String,
    pub items: Vec<OrderLine>,
    pub total_amount: u64,
    pub discount_amount: u64,
    pub pay_amount: u64,
    pub coupon_history_id: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub payment_id: u64,
    pub order_id: u64,
    pub status: &'static str,
    pub amount: u64,
}

/// A payment and the events its transaction recorded (to publish after the commit).
pub struct Paid {
    pub payment: Payment,
    pub events: Vec<OutboxEvent>,
}

#[derive(Clone)]
pub struct ShopStore {
    pool: MySqlPool,
}

impl ShopStore {
    pub fn new(pool: MySqlPool) -> Self {
        Self { pool }
    }

    pub async fn create_user(&self, name: &str) -> Result<User, ShopError> {
        let inserted = sqlx::query("INSERT INTO app_user (name) VALUES (?)")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(User {
            user_id: inserted.last_insert_id(),
            name: name.to_string(),
            balance: 0,
        })
    }

    pub async fn user(&self, user_id: u64) -> Result<Option<User>, ShopError> {
        let row = sqlx::query("SELECT user_id, name, balance FROM app_user WHERE user_id = ?")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(User {
                user_id: row.try_get("user_id")?,
                name: row.try_get("name")?,
                balance: row.try_get("balance")?,
            })
        })
        .transpose()
    }

    /// Adds `amount` to the balance unless that would pass `max_balance`.
    pub async fn charge(
        &self,
        user_id: u64,
        amount: u64,
        max_balance: u64,
    ) -> Result<User, ShopError> {
        let updated = sqlx::query(
            "UPDATE app_user SET balance = balance + ? WHERE user_id = ? AND balance + ? <= ?",
        )
        .bind(amount)
        .bind(user_id)
        .bind(amount)
        .bind(max_balance)
        .execute(&self.pool)
        .await?;
        let user = self
            .user(user_id)
            .await?
            .ok_or_else(|| ShopError::NotFound(format!("user {user_id}")))?;
        if updated.rows_affected() == 0 {
            return Err(invalid(
                "BALANCE_LIMIT_EXCEEDED",
                format!("a balance may not pass {max_balance}"),
            ));
        }
        Ok(user)
    }

    /// Creates a product; its ProductChanged (CREATED) event is in the outbox.
    pub async fn create_product(
        &self,
        name: &str,
        price: u64,
        stock: u32,
    ) -> Result<Committed<Product>, ShopError> {
        let mut transaction = self.pool.begin().await?;
        let inserted = sqlx::query("INSERT INTO product (name, price, stock) VALUES (?, ?, ?)")
            .bind(name)
            .bind(price)
            .bind(stock)
            .execute(&mut *transaction)
            .await?;
        let product = Product {
            product_id: inserted.last_insert_id(),
            name: name.to_string(),
            price,
            stock,
            version: 1,
        };
        let events = vec![product.changed(ProductChange::Created)];
        Outbox::record(&mut transaction, &events).await?;
        transaction.commit().await?;
        Ok(Committed {
            value: product,
            events,
        })
    }

    /// Sets a product's price and/or stock; its ProductChanged event is in the outbox.
    pub async fn update_product(
        &self,
        product_id: u64,
        price: Option<u64>,
        stock: Option<u32>,
    ) -> Result<Committed<Product>, ShopError> {
        let mut transaction = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE product SET price = COALESCE(?, price), stock = COALESCE(?, stock), \
             version = version + 1, updated_at = NOW(6) WHERE product_id = ?",
        )
        .bind(price)
        .bind(stock)
        .bind(product_id)
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(ShopError::NotFound(format!("product {product_id}")));
        }
        let product = products_in(&mut transaction, &[product_id])
            .await?
            .pop()
            .expect("the product just updated");
        let change = if price.is_some() {
            ProductChange::PriceChanged
        } else {
            ProductChange::StockChanged
        };
        let events = vec![product.changed(change)];
        Outbox::record(&mut transaction, &events).await?;
        transaction.commit().await?;
        Ok(Committed {
            value: product,
            events,
        })
    }

    pub async fn product(&self, product_id: u64) -> Result<Option<Product>, ShopError> {
        let mut connection = self.pool.acquire().await?;
        Ok(products_in(&mut connection, &[product_id]).await?.pop())
    }

    /// The names of the products among `ids` that exist.
    pub async fn product_names(&self, ids: &[u64]) -> Result<BTreeMap<u64, String>, ShopError> {
        let mut connection = self.pool.acquire().await?;
        Ok(products_in(&mut connection, ids)
            .await?
            .into_iter()
            .map(|product| (product.product_id, product.name))
            .collect())
    }

    /// Products by id, `page` counted from 0.
    pub async fn products(&self, page: u32, size: u32) -> Result<ProductPage, ShopError> {
        let rows = sqlx::query(
            "SELECT product_id, name, price, stock, version FROM product ORDER BY product_id LIMIT ? OFFSET ?",
        )
        .bind(size)
        .bind(u64::from(page) * u64::from(size))
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM product")
            .fetch_one(&self.pool)
            .await?;
        Ok(ProductPage {
            items: rows
                .iter()
                .map(product_from_row)
                .collect::<Result<_, _>>()?,
            page,
            size,
            total: total.max(0) as u64,
        })
    }

    /// Places an order at today's prices, with the coupon's discount.
    pub async fn create_order(
        &self,
        user_id: u64,
        lines: &[NewOrderLine],
        coupon_history_id: Option<u64>,
    ) -> Result<Order, ShopError> {
        let mut transaction = self.pool.begin().await?;
        let user_exists: Option<u64> =
            sqlx::query_scalar("SELECT user_id FROM app_user WHERE user_id = ?")
                .bind(user_id)
                .fetch_optional(&mut *transaction)
                .await?;
        if user_exists.is_none() {
            return Err(invalid(
                "UNKNOWN_USER",
                format!("user {user_id} does not exist"),
            ));
        }
        let ids: Vec<u64> = lines.iter().map(|line| line.product_id).collect();
        let prices: BTreeMap<u64, u64> = products_in(&mut transaction, &ids)
            .await?
            .into_iter()
            .map(|product| (product.product_id, product.price))
            .collect();
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
        let discount = match coupon_history_id {
            None => None,
            Some(history_id) => Some(usable_coupon(&mut transaction, history_id, user_id).await?),
        };
        let (total, discount, pay) = order_amounts(total, discount);
        let inserted = sqlx::query(
            "INSERT INTO customer_order (user_id, total_amount, discount_amount, pay_amount, coupon_history_id) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(user_id)
        .bind(total)
        .bind(discount)
        .bind(pay)
        .bind(coupon_history_id)
        .execute(&mut *transaction)
        .await?;
        let order_id = inserted.last_insert_id();
        let mut insert = QueryBuilder::new(
            "INSERT INTO order_item (order_id, product_id, quantity, unit_price) ",
        );
        insert.push_values(lines, |mut row, line| {
            row.push_bind(order_id)
                .push_bind(line.product_id)
                .push_bind(line.quantity)
                .push_bind(prices[&line.product_id]);
        });
        insert.build().execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(self
            .order(order_id)
            .await?
            .expect("an order is readable right after its commit"))
    }

    pub async fn order(&self, order_id: u64) -> Result<Option<Order>, ShopError> {
        let mut connection = self.pool.acquire().await?;
        read_order(&mut connection, order_id, false).await
    }

    /// Pays an order in one transaction (see the module documentation); a deadlock is
    /// retried. The returned events are committed but not yet published.
    pub async fn pay(&self, order_id: u64, now: DateTime<Utc>) -> Result<Paid, ShopError> {
        let mut attempt = 1;
        loop {
            match self.pay_once(order_id, now).await {
                Err(error)
                    if error.class() == ErrorClass::Retryable && attempt < PAYMENT_ATTEMPTS =>
                {
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn pay_once(&self, order_id: u64, now: DateTime<Utc>) -> Result<Paid, ShopError> {
        let mut transaction = self.pool.begin().await?;
        let order = read_order(&mut transaction, order_id, true)
            .await?
            .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))?;
        if order.status != "PENDING" {
            return Err(PaymentRefusal::OrderNotPending.into());
        }
        if let Some(history_id) = order.coupon_history_id {
            let used = sqlx::query(
                "UPDATE coupon_history SET status = 'USED', used_order_id = ? \
                 WHERE coupon_history_id = ? AND user_id = ? AND status = 'ISSUED'",
            )
            .bind(order_id)
            .bind(history_id)
            .bind(order.user_id)
            .execute(&mut *transaction)
            .await?;
            if used.rows_affected() == 0 {
                usable_coupon(&mut transaction, history_id, order.user_id).await?;
                // Usable a moment ago and not now: another payment just used it.
                return Err(PaymentRefusal::CouponAlreadyUsed.into());
            }
        }
        // Products in id order, so payments sharing products lock them in one order.
        let mut lines = order.items.clone();
        lines.sort_by_key(|line| line.product_id);
        for line in &lines {
            let taken = sqlx::query(
                "UPDATE product SET stock = stock - ?, version = version + 1, updated_at = NOW(6) \
                 WHERE product_id = ? AND stock >= ?",
            )
            .bind(line.quantity)
            .bind(line.product_id)
            .bind(line.quantity)
            .execute(&mut *transaction)
            .await?;
            if taken.rows_affected() == 0 {
                return Err(PaymentRefusal::InsufficientStock.into());
            }
        }
        let debited = sqlx::query(
            "UPDATE app_user SET balance = balance - ? WHERE user_id = ? AND balance >= ?",
        )
        .bind(order.pay_amount)
        .bind(order.user_id)
        .bind(order.pay_amount)
        .execute(&mut *transaction)
        .await?;
        if debited.rows_affected() == 0 {
            return Err(PaymentRefusal::InsufficientBalance.into());
        }
        let inserted = sqlx::query(
            "INSERT INTO payment (order_id, user_id, amount, paid_at) VALUES (?, ?, ?, ?)",
        )
        .bind(order_id)
        .bind(order.user_id)
        .bind(order.pay_amount)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        let payment_id = inserted.last_insert_id();
        sqlx::query(
            "UPDATE customer_order SET status = 'COMPLETED', paid_at = ? WHERE order_id = ?",
        )
        .bind(now)
        .bind(order_id)
        .execute(&mut *transaction)
        .await?;
        let key = format!("order:{order_id}");
        let ids: Vec<u64> = lines.iter().map(|line| line.product_id).collect();
        let stock_changes = products_in(&mut transaction, &ids)
            .await?
            .iter()
            .map(|product| product.changed(ProductChange::StockChanged))
            .collect::<Vec<_>>();
        let mut events = vec![
            OutboxEvent {
                topic: topics::ORDER_COMPLETED.into(),
                envelope: EventEnvelope::new(
                    key.clone(),
                    EventPayload::OrderCompleted(OrderCompleted {
                        order_id,
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
                ),
            },
            OutboxEvent {
                topic: topics::EXTERNAL_EVENTS.into(),
                envelope: EventEnvelope::new(
                    key,
                    EventPayload::PaymentCompleted(PaymentCompleted {
                        payment_id,
                        order_id,
                        user_id: order.user_id,
                        amount: order.pay_amount,
                        timestamp: now,
                    }),
                ),
            },
        ];
        events.extend(stock_changes);
        Outbox::record(&mut transaction, &events).await?;
        transaction.commit().await?;
        Ok(Paid {
            payment: Payment {
                payment_id,
                order_id,
                status: "COMPLETED",
                amount: order.pay_amount,
            },
            events,
        })
    }
}

fn product_from_row(row: &sqlx::mysql::MySqlRow) -> Result<Product, ShopError> {
    Ok(Product {
        product_id: row.try_get("product_id")?,
        name: row.try_get("name")?,
        price: row.try_get("price")?,
        stock: row.try_get("stock")?,
        version: row.try_get("version")?,
    })
}

/// The products among `ids` that exist, by id.
async fn products_in(
    connection: &mut MySqlConnection,
    ids: &[u64],
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
    select.push(") ORDER BY product_id");
    let rows = select.build().fetch_all(&mut *connection).await?;
    rows.iter().map(product_from_row).collect()
}

/// The discount of a coupon the user holds and has not used; refused otherwise.
async fn usable_coupon(
    connection: &mut MySqlConnection,
    coupon_history_id: u64,
    user_id: u64,
) -> Result<u64, ShopError> {
    let row = sqlx::query(
        "SELECT h.user_id, h.status, c.discount_amount FROM coupon_history h \
         JOIN coupon c ON c.coupon_id = h.coupon_id WHERE h.coupon_history_id = ?",
    )
    .bind(coupon_history_id)
    .fetch_optional(&mut *connection)
    .await?;
    let Some(row) = row else {
        return Err(PaymentRefusal::CouponNotOwned.into());
    };
    let owner: u64 = row.try_get("user_id")?;
    let status: String = row.try_get("status")?;
    if owner != user_id {
        return Err(PaymentRefusal::CouponNotOwned.into());
    }
    if status != "ISSUED" {
        return Err(PaymentRefusal::CouponAlreadyUsed.into());
    }
    Ok(row.try_get("discount_amount")?)
}

async fn read_order(
    connection: &mut MySqlConnection,
    order_id: u64,
    lock: bool,
) -> Result<Option<Order>, ShopError> {
    let statement = if lock {
        "SELECT * FROM customer_order WHERE order_id = ? FOR UPDATE"
    } else {
        "SELECT * FROM customer_order WHERE order_id = ?"
    };
    let Some(row) = sqlx::query(statement)
        .bind(order_id)
        .fetch_optional(&mut *connection)
        .await?
    else {
        return Ok(None);
    };
    let items = sqlx::query(
        "SELECT product_id, quantity, unit_price FROM order_item WHERE order_id = ? ORDER BY product_id",
    )
    .bind(order_id)
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|item| {
        Ok(OrderLine {
            product_id: item.try_get("product_id")?,
            quantity: item.try_get("quantity")?,
            unit_price: item.try_get("unit_price")?,
        })
    })
    .collect::<Result<_, ShopError>>()?;
    Ok(Some(Order {
        order_id: row.try_get("order_id")?,
        user_id: row.try_get("user_id")?,
        status: row.try_get("status")?,
        items,
        total_amount: row.try_get("total_amount")?,
        discount_amount: row.try_get("discount_amount")?,
        pay_amount: row.try_get("pay_amount")?,
        coupon_history_id: row.try_get("coupon_history_id")?,
        created_at: row.try_get("created_at")?,
        paid_at: row.try_get("paid_at")?,
    }))
}
