//! Payments with group commit.
//!
//! `POST /orders/{orderId}/pay` authenticates, rate-limits and validates its request, then
//! hands the payment to the intake and waits. Writer tasks take whatever payments are waiting
//! (up to `max_batch`; no timer, so batches grow with load) and decide them together in one
//! transaction:
//!
//! 1. claim the batch's `Idempotency-Key`s with one locking read: a key answered before
//!    replays its answer, a key used with another request is refused; a key sent twice within
//!    the batch waits for the batch and then runs alone (it replays);
//! 2. lock what the payments touch, each kind with one read and always in this order, each
//!    sorted by key, so that two batches never wait on each other in a circle: the orders
//!    (their lines read with them), the coupons they spend, their products, their buyers;
//! 3. decide every payment in arrival order against the locked values as the payments before
//!    it in the batch leave them ([`decide`]): the same checks, in the same order, as one
//!    payment alone, so a refused payment writes nothing and is answered with its own 409;
//! 4. write each table with one statement for the whole batch (`UPDATE … CASE`, multi-row
//!    `INSERT`), checking every statement's row count against the decisions; payment ids are
//!    read back by their orders (a unique key), never assumed consecutive;
//! 5. record the events and the idempotent answers: each payment's OrderCompleted and
//!    PaymentCompleted, and one ProductChanged per product the batch changed, with the
//!    product as the batch leaves it (a product's events carry its version, so the cache and
//!    its readers only ever need the latest);
//!
//! then commit, publish the events and answer every waiting payment. A batch that fails on a
//! transient error (a deadlock victim) is tried again; one that fails otherwise runs again one
//! payment per transaction ([`ShopStore::pay`]), so a payment that cannot be written fails
//! alone. A payment is answered only once its rows are committed.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sqlx::{MySqlConnection, QueryBuilder};

use crate::common::ids::{CouponHistoryId, OrderId, PaymentId, ProductId, UserId};
use crate::coupons::store::HeldStatus;
use crate::event_log::OutboxEvent;
use crate::events::ProductChange;
use crate::guards::idempotency::{self, Claim, IdempotencyKey, StoredAnswer};
use crate::observability::trace::{self, TraceParent};
use crate::outbox::{ANSWER_WAIT, Outbox, OutboxTransaction};
use crate::shop::PaymentRefusal;
use crate::shop::intake::{GroupCommit, Intake};
use crate::shop::store::{
    Answered, Lock, Order, OrderLine, OrderRow, OrderStatus, Payment, Product, ShopError,
    ShopStore, payment_events, products_in,
};

/// A payment to make: `payer` pays `order_id` at `now`.
#[derive(Clone, Debug)]
pub struct PaymentRequest {
    pub order_id: OrderId,
    pub payer: UserId,
    pub now: DateTime<Utc>,
    pub key: Option<IdempotencyKey>,
    /// The trace the request came in (its events carry it on): the handler's
    /// [`trace::current`], since the batch is written in the writer's task.
    pub trace: Option<TraceParent>,
}

/// A payment made, with the events committed with it (published, or left to the
/// reconciler, before the answer): its own, and for the last payment of a batch also the
/// batch's product changes, which its answer writes to the product cache.
#[derive(Debug)]
pub struct Paid {
    pub payment: Payment,
    pub events: Vec<OutboxEvent>,
}

type Answer = Result<Answered<Paid>, ShopError>;

/// The payments' intake (see the module documentation).
pub type PaymentIntake = Intake<PaymentRequest, Answer>;

/// Payments, group-committed through an outbox (see the module documentation).
#[derive(Clone)]
pub struct Payments {
    outbox: Outbox,
    store: ShopStore,
}

impl Payments {
    pub fn new(outbox: Outbox) -> Self {
        Self {
            store: ShopStore::new(outbox.clone()),
            outbox,
        }
    }
}

impl GroupCommit for Payments {
    type Request = PaymentRequest;
    type Answer = Answer;

    const WHAT: &'static str = "payment";

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn key(request: &PaymentRequest) -> Option<&IdempotencyKey> {
        request.key.as_ref()
    }

    async fn write_in(
        &self,
        transaction: &mut OutboxTransaction,
        batch: &[PaymentRequest],
    ) -> Result<Vec<Answer>, ShopError> {
        pay_in(transaction, batch).await
    }

    /// As before group commit: [`ShopStore::pay`], its events published before the answer.
    async fn alone(&self, request: PaymentRequest) -> Answer {
        let PaymentRequest {
            order_id,
            payer,
            now,
            key,
            trace,
        } = request;
        let paying = self.store.pay(order_id, payer, now, key.as_ref());
        let paid = match trace {
            Some(trace) => trace::in_trace(trace, paying).await,
            None => paying.await,
        };
        match paid? {
            Answered::Fresh(changed) => {
                let events = changed.events.events().cloned().collect();
                changed.events.publish_within(ANSWER_WAIT).await;
                Ok(Answered::Fresh(Paid {
                    payment: changed.value,
                    events,
                }))
            }
            Answered::Replay(answer) => Ok(Answered::Replay(answer)),
        }
    }
}

/// The batch's steps (see the module documentation), in the caller's transaction.
async fn pay_in(
    transaction: &mut OutboxTransaction,
    requests: &[PaymentRequest],
) -> Result<Vec<Answer>, ShopError> {
    let keys: Vec<_> = requests
        .iter()
        .map(|request| request.key.as_ref())
        .collect();
    let claims = idempotency::claim_many(transaction, &keys).await?;
    let order_ids: BTreeSet<OrderId> = requests.iter().map(|request| request.order_id).collect();
    let orders = lock_orders(transaction, &order_ids).await?;
    let coupon_ids: BTreeSet<CouponHistoryId> = orders
        .values()
        .filter_map(|order| order.coupon_history_id)
        .collect();
    let coupons = lock_coupons(transaction, &coupon_ids).await?;
    let product_ids: BTreeSet<ProductId> = orders
        .values()
        .flat_map(|order| order.items.iter().map(|line| line.product_id))
        .collect();
    let products: BTreeMap<ProductId, Product> = products_in(
        transaction,
        &product_ids.into_iter().collect::<Vec<_>>(),
        Lock::ForUpdate,
    )
    .await?
    .into_iter()
    .map(|product| (product.product_id, product))
    .collect();
    let buyers: BTreeSet<UserId> = orders.values().map(|order| order.user_id).collect();
    let balances = lock_balances(transaction, &buyers).await?;
    let mut locked = Locked {
        orders,
        coupons,
        products,
        balances,
    };
    let mut decisions = decide(requests, &claims, &mut locked);
    recheck_refused_keys(transaction, requests, &mut decisions).await?;
    let paid: Vec<Made<'_>> = requests
        .iter()
        .zip(&decisions)
        .filter_map(|(request, decision)| match decision {
            Decision::Pay(products) => Some((
                request,
                &locked.orders[&request.order_id],
                products.as_slice(),
            )),
            _ => None,
        })
        .collect();
    let mut made = if paid.is_empty() {
        BTreeMap::new()
    } else {
        make_payments(transaction, &locked, &paid).await?
    };
    Ok(decisions
        .into_iter()
        .zip(requests)
        .map(|(decision, request)| {
            // Only the payment made takes it: another request may name the same order.
            let made = match decision {
                Decision::Pay(_) => made.remove(&request.order_id),
                _ => None,
            };
            decision.into_answer(request, made)
        })
        .collect())
}

/// Writes the payments decided to be made (see the module documentation): one statement per
/// table, then their events and idempotent answers. Answers each payment and its events, by
/// order.
async fn make_payments(
    transaction: &mut OutboxTransaction,
    locked: &Locked,
    paid: &[Made<'_>],
) -> Result<BTreeMap<OrderId, (Payment, Vec<OutboxEvent>)>, ShopError> {
    use_coupons(transaction, paid).await?;
    take_stock(transaction, &locked.products, paid).await?;
    debit_balances(transaction, &locked.balances, paid).await?;
    let payment_ids = insert_payments(transaction, paid).await?;
    complete_orders(transaction, paid).await?;
    let mut made = BTreeMap::new();
    let mut events = Vec::new();
    let mut answers = Vec::new();
    // The trace of the last payment that changed each product.
    let mut changed: BTreeMap<ProductId, Option<String>> = BTreeMap::new();
    for (request, order, products) in paid {
        let payment_id = payment_ids[&order.order_id];
        let payment = Payment {
            payment_id,
            order_id: order.order_id,
            status: OrderStatus::Completed,
            amount: order.pay_amount,
        };
        let traceparent = request.trace.as_ref().map(TraceParent::header_value);
        let mut payment_events = payment_events(order, payment_id, &[], request.now);
        for event in &mut payment_events {
            event.envelope.traceparent = traceparent.clone();
        }
        for product in *products {
            changed.insert(product.product_id, traceparent.clone());
        }
        events.extend(payment_events.iter().cloned());
        if let Some(key) = &request.key {
            answers.push((key, StoredAnswer::json(200, &payment)));
        }
        made.insert(order.order_id, (payment, payment_events));
    }
    // One ProductChanged per product the batch changed, with its state after the batch,
    // answered with the batch's last payment (whose answer writes them to the cache).
    let product_events: Vec<OutboxEvent> = changed
        .into_iter()
        .map(|(product_id, traceparent)| {
            let mut event = locked.products[&product_id].changed(ProductChange::StockChanged);
            event.envelope.traceparent = traceparent;
            event
        })
        .collect();
    events.extend(product_events.iter().cloned());
    if let Some((_, last, _)) = paid.last()
        && let Some((_, last_events)) = made.get_mut(&last.order_id)
    {
        last_events.extend(product_events);
    }
    transaction.record(events).await?;
    // A key stored since the claim (another batch's first request with it) fails the
    // statement on the primary key: the batch then runs one payment at a time, and that
    // payment replays.
    idempotency::store_many(transaction, &answers).await?;
    Ok(made)
}

/// The locked rows a batch decides against, as the decisions so far leave them.
#[derive(Debug)]
struct Locked {
    orders: BTreeMap<OrderId, Order>,
    coupons: BTreeMap<CouponHistoryId, HeldCoupon>,
    products: BTreeMap<ProductId, Product>,
    balances: BTreeMap<UserId, u64>,
}

/// A coupon an order spends, as locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HeldCoupon {
    user_id: UserId,
    status: HeldStatus,
}

/// A payment's decision: pay (with its products as the payment leaves them), or why not.
#[derive(Debug, PartialEq)]
enum Decision {
    Pay(Vec<Product>),
    Replay(StoredAnswer),
    KeyReused,
    NotFound,
    Forbidden { owner: UserId },
    Refused(PaymentRefusal),
}

impl Decision {
    /// The answer to `request`: its payment and events when it was made (`made`).
    fn into_answer(
        self,
        request: &PaymentRequest,
        made: Option<(Payment, Vec<OutboxEvent>)>,
    ) -> Answer {
        match self {
            Decision::Pay(_) => {
                let (payment, events) = made.expect("every payment decided is made");
                Ok(Answered::Fresh(Paid { payment, events }))
            }
            Decision::Replay(answer) => Ok(Answered::Replay(answer)),
            Decision::KeyReused => Err(ShopError::KeyReused),
            Decision::NotFound => Err(ShopError::NotFound(format!("order {}", request.order_id))),
            Decision::Forbidden { owner } => Err(ShopError::Forbidden(format!(
                "the token's user {} may not act as user {owner}",
                request.payer
            ))),
            Decision::Refused(refusal) => Err(refusal.into()),
        }
    }
}

/// Decides the payments in arrival order, each against `locked` as the ones before it left
/// it, with the checks of one payment alone in their order: the key, the order (found, the
/// payer's, still PENDING), its coupon (the buyer's, unused), the stock of every line, the
/// balance. A payment decided to be made changes `locked`.
fn decide(requests: &[PaymentRequest], claims: &[Claim], locked: &mut Locked) -> Vec<Decision> {
    requests
        .iter()
        .zip(claims)
        .map(|(request, claim)| match claim {
            Claim::Replay(answer) => Decision::Replay(answer.clone()),
            Claim::Mismatch => Decision::KeyReused,
            Claim::First => decide_one(request, locked),
        })
        .collect()
}

fn decide_one(request: &PaymentRequest, locked: &mut Locked) -> Decision {
    let Some(order) = locked.orders.get(&request.order_id) else {
        return Decision::NotFound;
    };
    if order.user_id != request.payer {
        return Decision::Forbidden {
            owner: order.user_id,
        };
    }
    if order.status != OrderStatus::Pending {
        return Decision::Refused(PaymentRefusal::OrderNotPending);
    }
    if let Some(history_id) = order.coupon_history_id {
        match locked.coupons.get(&history_id) {
            Some(coupon) if coupon.user_id != order.user_id => {
                return Decision::Refused(PaymentRefusal::CouponNotOwned);
            }
            None => return Decision::Refused(PaymentRefusal::CouponNotOwned),
            Some(coupon) if coupon.status != HeldStatus::Issued => {
                return Decision::Refused(PaymentRefusal::CouponAlreadyUsed);
            }
            Some(_) => {}
        }
    }
    let has_stock = order.items.iter().all(|line| {
        locked
            .products
            .get(&line.product_id)
            .is_some_and(|product| product.stock >= line.quantity)
    });
    if !has_stock {
        return Decision::Refused(PaymentRefusal::InsufficientStock);
    }
    let balance = locked.balances.get(&order.user_id).copied().unwrap_or(0);
    if balance < order.pay_amount {
        return Decision::Refused(PaymentRefusal::InsufficientBalance);
    }
    // Made: the locked values as this payment leaves them.
    let (user_id, pay_amount, coupon) = (order.user_id, order.pay_amount, order.coupon_history_id);
    let lines = order.items.clone();
    if let Some(order) = locked.orders.get_mut(&request.order_id) {
        order.status = OrderStatus::Completed;
        order.paid_at = Some(request.now);
    }
    if let Some(coupon) = coupon.and_then(|id| locked.coupons.get_mut(&id)) {
        coupon.status = HeldStatus::Used;
    }
    locked.balances.insert(user_id, balance - pay_amount);
    let mut products = Vec::with_capacity(lines.len());
    for line in &lines {
        let product = locked
            .products
            .get_mut(&line.product_id)
            .expect("checked above");
        product.stock -= line.quantity;
        product.version += 1;
        products.push(product.clone());
    }
    products.sort_by_key(|product| product.product_id);
    Decision::Pay(products)
}

/// Refused payments sent with a key may have met a payment with the same key that another
/// transaction made meanwhile: claims take no lock on a key not stored yet (sessions run at
/// READ COMMITTED), and the order's lock waited for that payment's commit. Such a payment
/// replays that answer instead, as it would have had it come a moment later.
async fn recheck_refused_keys(
    connection: &mut MySqlConnection,
    requests: &[PaymentRequest],
    decisions: &mut [Decision],
) -> Result<(), ShopError> {
    // The keys of the refused payments only.
    let keys: Vec<Option<&IdempotencyKey>> = requests
        .iter()
        .zip(decisions.iter())
        .map(|(request, decision)| match decision {
            Decision::Refused(_) | Decision::NotFound | Decision::Forbidden { .. } => {
                request.key.as_ref()
            }
            _ => None,
        })
        .collect();
    let claims = idempotency::claim_many(connection, &keys).await?;
    for (decision, claim) in decisions.iter_mut().zip(claims) {
        match claim {
            Claim::First => {}
            Claim::Replay(answer) => *decision = Decision::Replay(answer),
            Claim::Mismatch => *decision = Decision::KeyReused,
        }
    }
    Ok(())
}

/// Locks the orders among `ids` that exist (in id order) and reads their lines.
async fn lock_orders(
    connection: &mut MySqlConnection,
    ids: &BTreeSet<OrderId>,
) -> Result<BTreeMap<OrderId, Order>, ShopError> {
    let mut select = QueryBuilder::new(
        "SELECT order_id, user_id, status, total_amount, discount_amount, pay_amount, \
         coupon_history_id, created_at, paid_at FROM customer_order WHERE order_id IN (",
    );
    push_list(&mut select, ids);
    select.push(") ORDER BY order_id FOR UPDATE");
    let rows: Vec<OrderRow> = select.build_query_as().fetch_all(&mut *connection).await?;
    let mut orders: BTreeMap<OrderId, Order> = rows
        .into_iter()
        .map(|row| (row.order_id, Order::from(row)))
        .collect();
    if orders.is_empty() {
        return Ok(orders);
    }
    let mut select = QueryBuilder::new(
        "SELECT order_id, product_id, quantity, unit_price FROM order_item WHERE order_id IN (",
    );
    push_list(&mut select, orders.keys());
    select.push(") ORDER BY order_id, product_id");
    let lines: Vec<(OrderId, ProductId, u32, u64)> =
        select.build_query_as().fetch_all(&mut *connection).await?;
    for (order_id, product_id, quantity, unit_price) in lines {
        if let Some(order) = orders.get_mut(&order_id) {
            order.items.push(OrderLine {
                product_id,
                quantity,
                unit_price,
            });
        }
    }
    Ok(orders)
}

/// Locks the coupons among `ids` (in id order).
async fn lock_coupons(
    connection: &mut MySqlConnection,
    ids: &BTreeSet<CouponHistoryId>,
) -> Result<BTreeMap<CouponHistoryId, HeldCoupon>, ShopError> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut select = QueryBuilder::new(
        "SELECT coupon_history_id, user_id, status FROM coupon_history \
         WHERE coupon_history_id IN (",
    );
    push_list(&mut select, ids);
    select.push(") ORDER BY coupon_history_id FOR UPDATE");
    let rows: Vec<(CouponHistoryId, UserId, HeldStatus)> =
        select.build_query_as().fetch_all(&mut *connection).await?;
    Ok(rows
        .into_iter()
        .map(|(id, user_id, status)| (id, HeldCoupon { user_id, status }))
        .collect())
}

/// Locks the buyers' rows (in id order); answers their balances.
async fn lock_balances(
    connection: &mut MySqlConnection,
    ids: &BTreeSet<UserId>,
) -> Result<BTreeMap<UserId, u64>, ShopError> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut select = QueryBuilder::new("SELECT user_id, balance FROM app_user WHERE user_id IN (");
    push_list(&mut select, ids);
    select.push(") ORDER BY user_id FOR UPDATE");
    let rows: Vec<(UserId, u64)> = select.build_query_as().fetch_all(&mut *connection).await?;
    Ok(rows.into_iter().collect())
}

/// A payment decided to be made: its request, its order and its products as it leaves them.
type Made<'a> = (&'a PaymentRequest, &'a Order, &'a [Product]);

/// Spends the coupons of the payments made: one statement.
async fn use_coupons(connection: &mut MySqlConnection, paid: &[Made<'_>]) -> Result<(), ShopError> {
    let spent: Vec<(CouponHistoryId, OrderId)> = paid
        .iter()
        .filter_map(|(_, order, _)| Some((order.coupon_history_id?, order.order_id)))
        .collect();
    if spent.is_empty() {
        return Ok(());
    }
    let mut update = QueryBuilder::new("UPDATE coupon_history SET status = ");
    update
        .push_bind(HeldStatus::Used)
        .push(", used_order_id = CASE coupon_history_id");
    push_cases(&mut update, spent.iter().copied());
    update.push(" END WHERE status = ");
    update.push_bind(HeldStatus::Issued);
    update.push(" AND coupon_history_id IN (");
    push_list(&mut update, spent.iter().map(|(history_id, _)| history_id));
    update.push(")");
    expect_rows(update, connection, spent.len(), "coupon_history").await
}

/// Sets the stock and version of every product the payments made took from: one statement,
/// to the values the decisions left on the locked rows.
async fn take_stock(
    connection: &mut MySqlConnection,
    products: &BTreeMap<ProductId, Product>,
    paid: &[Made<'_>],
) -> Result<(), ShopError> {
    let taken: BTreeSet<ProductId> = paid
        .iter()
        .flat_map(|(_, _, products)| products.iter().map(|product| product.product_id))
        .collect();
    let mut update = QueryBuilder::new("UPDATE product SET stock = CASE product_id");
    push_cases(
        &mut update,
        taken.iter().map(|id| (*id, products[id].stock)),
    );
    update.push(" END, version = CASE product_id");
    push_cases(
        &mut update,
        taken.iter().map(|id| (*id, products[id].version)),
    );
    update.push(" END, updated_at = NOW(6)");
    update_each(update, connection, ("product", "product_id"), &taken).await
}

/// Sets the balance of every buyer who paid something: one statement, to the values the
/// decisions left on the locked rows.
async fn debit_balances(
    connection: &mut MySqlConnection,
    balances: &BTreeMap<UserId, u64>,
    paid: &[Made<'_>],
) -> Result<(), ShopError> {
    let debited: BTreeSet<UserId> = paid
        .iter()
        .filter(|(_, order, _)| order.pay_amount > 0)
        .map(|(_, order, _)| order.user_id)
        .collect();
    if debited.is_empty() {
        return Ok(());
    }
    let mut update = QueryBuilder::new("UPDATE app_user SET balance = CASE user_id");
    push_cases(&mut update, debited.iter().map(|id| (*id, balances[id])));
    update.push(" END");
    update_each(update, connection, ("app_user", "user_id"), &debited).await
}

/// Inserts the payments made (one statement) and reads their ids back by order.
async fn insert_payments(
    connection: &mut MySqlConnection,
    paid: &[Made<'_>],
) -> Result<BTreeMap<OrderId, PaymentId>, ShopError> {
    let mut insert = QueryBuilder::new("INSERT INTO payment (order_id, user_id, amount, paid_at) ");
    insert.push_values(paid, |mut row, (request, order, _)| {
        row.push_bind(order.order_id)
            .push_bind(order.user_id)
            .push_bind(order.pay_amount)
            .push_bind(request.now);
    });
    insert.build().execute(&mut *connection).await?;
    let mut select =
        QueryBuilder::new("SELECT order_id, payment_id FROM payment WHERE order_id IN (");
    push_list(
        &mut select,
        paid.iter().map(|(_, order, _)| &order.order_id),
    );
    select.push(")");
    let ids: BTreeMap<OrderId, PaymentId> = select
        .build_query_as::<(OrderId, PaymentId)>()
        .fetch_all(&mut *connection)
        .await?
        .into_iter()
        .collect();
    if ids.len() != paid.len() {
        return Err(unexpected_rows("payment", paid.len(), ids.len() as u64));
    }
    Ok(ids)
}

/// Marks the orders paid COMPLETED, each paid at its request's time: one statement.
async fn complete_orders(
    connection: &mut MySqlConnection,
    paid: &[Made<'_>],
) -> Result<(), ShopError> {
    let mut update = QueryBuilder::new("UPDATE customer_order SET status = ");
    update
        .push_bind(OrderStatus::Completed)
        .push(", paid_at = CASE order_id");
    push_cases(
        &mut update,
        paid.iter()
            .map(|(request, order, _)| (order.order_id, request.now)),
    );
    update.push(" END WHERE status = ");
    update.push_bind(OrderStatus::Pending);
    update.push(" AND order_id IN (");
    push_list(
        &mut update,
        paid.iter().map(|(_, order, _)| &order.order_id),
    );
    update.push(")");
    expect_rows(update, connection, paid.len(), "customer_order").await
}

/// Pushes ` WHEN key THEN value` for each pair, both bound (the arms of a `CASE key_column`).
fn push_cases<K, V>(query: &mut QueryBuilder<sqlx::MySql>, pairs: impl IntoIterator<Item = (K, V)>)
where
    K: for<'q> sqlx::Encode<'q, sqlx::MySql> + sqlx::Type<sqlx::MySql> + Send,
    V: for<'q> sqlx::Encode<'q, sqlx::MySql> + sqlx::Type<sqlx::MySql> + Send,
{
    for (key, value) in pairs {
        query
            .push(" WHEN ")
            .push_bind(key)
            .push(" THEN ")
            .push_bind(value);
    }
}

/// Pushes `ids` separated by commas, each bound.
fn push_list<'a, T>(query: &mut QueryBuilder<sqlx::MySql>, ids: impl IntoIterator<Item = &'a T>)
where
    T: 'a + Copy + for<'q> sqlx::Encode<'q, sqlx::MySql> + sqlx::Type<sqlx::MySql> + Send,
{
    let mut separated = query.separated(", ");
    for id in ids {
        separated.push_bind(*id);
    }
}

/// Ends an UPDATE of `table` with `WHERE id_column IN (ids)` and runs it: it must change
/// one row per id.
async fn update_each<T>(
    mut update: QueryBuilder<sqlx::MySql>,
    connection: &mut MySqlConnection,
    (table, id_column): (&'static str, &'static str),
    ids: &BTreeSet<T>,
) -> Result<(), ShopError>
where
    T: Copy + for<'q> sqlx::Encode<'q, sqlx::MySql> + sqlx::Type<sqlx::MySql> + Send,
{
    update.push(format_args!(" WHERE {id_column} IN ("));
    push_list(&mut update, ids);
    update.push(")");
    expect_rows(update, connection, ids.len(), table).await
}

/// Runs an UPDATE that must change exactly `expected` rows: the rows are locked and the
/// decisions made against them, so any other count means the batch is not what was decided.
async fn expect_rows(
    mut update: QueryBuilder<sqlx::MySql>,
    connection: &mut MySqlConnection,
    expected: usize,
    table: &'static str,
) -> Result<(), ShopError> {
    let changed = update.build().execute(&mut *connection).await?;
    if changed.rows_affected() != expected as u64 {
        return Err(unexpected_rows(table, expected, changed.rows_affected()));
    }
    Ok(())
}

fn unexpected_rows(table: &'static str, expected: usize, found: u64) -> ShopError {
    ShopError::Inconsistent(format!(
        "the payment batch expected {expected} {table} rows, found {found}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u64) -> UserId {
        UserId::from_u64(id).unwrap()
    }

    fn product(id: u64, stock: u32) -> Product {
        Product {
            product_id: ProductId::from_u64(id).unwrap(),
            name: format!("product {id}"),
            price: 100,
            stock,
            version: 1,
        }
    }

    fn order(id: u64, buyer: u64, lines: &[(u64, u32)], pay: u64) -> Order {
        Order {
            order_id: OrderId::from_u64(id).unwrap(),
            user_id: user(buyer),
            status: OrderStatus::Pending,
            items: lines
                .iter()
                .map(|(product, quantity)| OrderLine {
                    product_id: ProductId::from_u64(*product).unwrap(),
                    quantity: *quantity,
                    unit_price: 100,
                })
                .collect(),
            total_amount: pay,
            discount_amount: 0,
            pay_amount: pay,
            coupon_history_id: None,
            created_at: DateTime::UNIX_EPOCH,
            paid_at: None,
        }
    }

    fn request(order: u64, payer: u64) -> PaymentRequest {
        PaymentRequest {
            order_id: OrderId::from_u64(order).unwrap(),
            payer: user(payer),
            now: DateTime::UNIX_EPOCH,
            key: None,
            trace: None,
        }
    }

    fn locked(orders: Vec<Order>, products: Vec<Product>, balances: &[(u64, u64)]) -> Locked {
        Locked {
            orders: orders.into_iter().map(|o| (o.order_id, o)).collect(),
            coupons: BTreeMap::new(),
            products: products.into_iter().map(|p| (p.product_id, p)).collect(),
            balances: balances.iter().map(|(id, b)| (user(*id), *b)).collect(),
        }
    }

    fn refusals(decisions: &[Decision]) -> Vec<Option<PaymentRefusal>> {
        decisions
            .iter()
            .map(|decision| match decision {
                Decision::Refused(refusal) => Some(*refusal),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_stock_goes_to_the_payments_that_arrived_first() {
        let orders = (1..=4).map(|id| order(id, id, &[(7, 2)], 200)).collect();
        let mut locked = locked(
            orders,
            vec![product(7, 5)],
            &[(1, 1_000), (2, 1_000), (3, 1_000), (4, 1_000)],
        );
        let requests: Vec<_> = [3, 1, 4, 2].map(|id| request(id, id)).into();
        let decisions = decide(&requests, &vec![Claim::First; 4], &mut locked);
        assert_eq!(
            refusals(&decisions),
            vec![
                None,
                None,
                Some(PaymentRefusal::InsufficientStock),
                Some(PaymentRefusal::InsufficientStock)
            ]
        );
        let product = &locked.products[&ProductId::from_u64(7).unwrap()];
        assert_eq!((product.stock, product.version), (1, 3));
        // Each payment's event shows the product as that payment left it.
        let Decision::Pay(first) = &decisions[0] else {
            panic!("paid")
        };
        assert_eq!((first[0].stock, first[0].version), (3, 2));
    }

    #[test]
    fn a_balance_pays_for_the_first_orders_it_covers_and_never_goes_negative() {
        let orders = vec![
            order(1, 9, &[(7, 1)], 600),
            order(2, 9, &[(7, 1)], 600),
            order(3, 9, &[(7, 1)], 300),
        ];
        let mut locked = locked(orders, vec![product(7, 10)], &[(9, 1_000)]);
        let requests = vec![request(1, 9), request(2, 9), request(3, 9)];
        let decisions = decide(&requests, &vec![Claim::First; 3], &mut locked);
        assert_eq!(
            refusals(&decisions),
            vec![None, Some(PaymentRefusal::InsufficientBalance), None]
        );
        assert_eq!(locked.balances[&user(9)], 100);
        // The refused payment took no stock.
        assert_eq!(locked.products[&ProductId::from_u64(7).unwrap()].stock, 8);
    }

    #[test]
    fn an_order_paid_twice_in_one_batch_is_paid_once() {
        let mut locked = locked(
            vec![order(1, 9, &[(7, 1)], 100)],
            vec![product(7, 10)],
            &[(9, 1_000)],
        );
        let requests = vec![request(1, 9), request(1, 9)];
        let decisions = decide(&requests, &vec![Claim::First; 2], &mut locked);
        assert_eq!(
            refusals(&decisions),
            vec![None, Some(PaymentRefusal::OrderNotPending)]
        );
        assert_eq!(locked.balances[&user(9)], 900);
    }

    #[test]
    fn a_coupon_named_by_two_orders_is_spent_by_the_first_to_pay() {
        let history = CouponHistoryId::from_u64(5).unwrap();
        let mut first = order(1, 9, &[(7, 1)], 100);
        first.coupon_history_id = Some(history);
        let mut second = order(2, 9, &[(7, 1)], 100);
        second.coupon_history_id = Some(history);
        let mut stranger = order(3, 8, &[(7, 1)], 100);
        stranger.coupon_history_id = Some(history);
        let mut locked = locked(
            vec![first, second, stranger],
            vec![product(7, 10)],
            &[(9, 1_000), (8, 1_000)],
        );
        locked.coupons.insert(
            history,
            HeldCoupon {
                user_id: user(9),
                status: HeldStatus::Issued,
            },
        );
        let requests = vec![request(3, 8), request(2, 9), request(1, 9)];
        let decisions = decide(&requests, &vec![Claim::First; 3], &mut locked);
        assert_eq!(
            refusals(&decisions),
            vec![
                Some(PaymentRefusal::CouponNotOwned),
                None,
                Some(PaymentRefusal::CouponAlreadyUsed)
            ]
        );
    }

    #[test]
    fn the_order_is_checked_before_its_payment_is_decided() {
        let mut locked = locked(
            vec![order(1, 9, &[(7, 1)], 100)],
            vec![product(7, 10)],
            &[(9, 1_000)],
        );
        let requests = vec![request(2, 9), request(1, 8), request(1, 9)];
        let claims = vec![Claim::First, Claim::First, Claim::Mismatch];
        let decisions = decide(&requests, &claims, &mut locked);
        assert_eq!(
            decisions,
            vec![
                Decision::NotFound,
                Decision::Forbidden { owner: user(9) },
                Decision::KeyReused
            ]
        );
        // Nothing was taken.
        assert_eq!(locked.balances[&user(9)], 1_000);
        assert_eq!(
            locked.orders[&OrderId::from_u64(1).unwrap()].status,
            OrderStatus::Pending
        );
    }
}
