//! Orders with group commit.
//!
//! `POST /orders` authenticates, rate-limits and validates its request, then hands the order
//! to the intake and waits. Writer tasks take whatever orders are waiting and place them
//! together in one transaction:
//!
//! 1. claim the batch's `Idempotency-Key`s with one locking read (as payments do; a key sent
//!    twice within the batch runs alone once the batch is committed, and replays);
//! 2. read, one statement each, which buyers exist, the products' prices and the coupons the
//!    orders name;
//! 3. price every order in arrival order ([`price_order`]: the checks of one order alone, in
//!    their order), so a refused order writes nothing and gets its own answer;
//! 4. insert the orders (one statement each, so that each learns its own id: the ids of a
//!    multi-row insert need not be consecutive), all their lines in one statement, and the
//!    idempotent answers in one;
//!
//! then commit and answer. Placing an order takes no lock (nothing it reads is changed by it:
//! a coupon is spent, and its stock taken, when the order is paid). A batch that fails for a
//! reason of its own runs again one order per transaction ([`ShopStore::create_order`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sqlx::{MySqlConnection, QueryBuilder};

use crate::common::ids::{CouponHistoryId, ProductId, UserId};
use crate::coupons::intake::known_users;
use crate::coupons::store::{CouponUnusable, HeldStatus};
use crate::guards::idempotency::{self, Claim, IdempotencyKey, StoredAnswer};
use crate::outbox::{Outbox, OutboxTransaction};
use crate::shop::intake::{GroupCommit, Intake};
use crate::shop::store::{
    Answered, Lock, NewOrderLine, Order, ShopError, ShopStore, price_order, products_in,
    write_orders,
};

/// An order to place: `user_id` buys `lines`, with a coupon it holds, at `now`.
#[derive(Clone, Debug)]
pub struct OrderRequest {
    pub user_id: UserId,
    pub lines: Vec<NewOrderLine>,
    pub coupon_history_id: Option<CouponHistoryId>,
    pub now: DateTime<Utc>,
    pub key: Option<IdempotencyKey>,
}

type Answer = Result<Answered<Order>, ShopError>;

/// The orders' intake (see the module documentation).
pub type OrderIntake = Intake<OrderRequest, Answer>;

/// Orders, group-committed through an outbox (see the module documentation).
#[derive(Clone)]
pub struct Orders {
    outbox: Outbox,
    store: ShopStore,
}

impl Orders {
    pub fn new(outbox: Outbox) -> Self {
        Self {
            store: ShopStore::new(outbox.clone()),
            outbox,
        }
    }
}

impl GroupCommit for Orders {
    type Request = OrderRequest;
    type Answer = Answer;

    const WHAT: &'static str = "order";

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn key(request: &OrderRequest) -> Option<&IdempotencyKey> {
        request.key.as_ref()
    }

    async fn write_in(
        &self,
        transaction: &mut OutboxTransaction,
        batch: &[OrderRequest],
    ) -> Result<Vec<Answer>, ShopError> {
        place_in(transaction, batch).await
    }

    /// [`ShopStore::create_order`].
    async fn alone(&self, request: OrderRequest) -> Answer {
        let OrderRequest {
            user_id,
            lines,
            coupon_history_id,
            now,
            key,
        } = request;
        self.store
            .create_order(user_id, &lines, coupon_history_id, now, key.as_ref())
            .await
    }
}

/// The batch's steps (see the module documentation), in the caller's transaction.
async fn place_in(
    connection: &mut MySqlConnection,
    requests: &[OrderRequest],
) -> Result<Vec<Answer>, ShopError> {
    let keys: Vec<_> = requests
        .iter()
        .map(|request| request.key.as_ref())
        .collect();
    let claims = idempotency::claim_many(connection, &keys).await?;
    let buyers: BTreeSet<UserId> = requests.iter().map(|request| request.user_id).collect();
    let known = known_users(connection, &buyers).await?;
    let product_ids: BTreeSet<ProductId> = requests
        .iter()
        .flat_map(|request| request.lines.iter().map(|line| line.product_id))
        .collect();
    let prices: BTreeMap<ProductId, u64> = products_in(
        connection,
        &product_ids.into_iter().collect::<Vec<_>>(),
        Lock::None,
    )
    .await?
    .into_iter()
    .map(|product| (product.product_id, product.price))
    .collect();
    let coupon_ids: BTreeSet<CouponHistoryId> = requests
        .iter()
        .filter_map(|request| request.coupon_history_id)
        .collect();
    let coupons = coupons(connection, &coupon_ids).await?;

    // Each order priced, or its answer when it is not placed.
    let mut decided: Vec<Result<Order, Answer>> = requests
        .iter()
        .zip(claims)
        .map(|(request, claim)| match claim {
            Claim::Replay(answer) => Err(Ok(Answered::Replay(answer))),
            Claim::Mismatch => Err(Err(ShopError::KeyReused)),
            Claim::First => {
                let coupon = request.coupon_history_id.map(|id| {
                    coupons
                        .get(&id)
                        .ok_or(CouponUnusable::NotOwned)
                        .and_then(|coupon| coupon.usable_by(request.user_id))
                });
                price_order(
                    request.user_id,
                    known.contains(&request.user_id),
                    &request.lines,
                    &prices,
                    coupon,
                )
                .map(|priced| {
                    priced.into_order(
                        request.user_id,
                        &request.lines,
                        &prices,
                        request.coupon_history_id,
                        request.now,
                    )
                })
                .map_err(Err)
            }
        })
        .collect();
    let mut placed: Vec<&mut Order> = decided.iter_mut().filter_map(|d| d.as_mut().ok()).collect();
    write_orders(connection, &mut placed).await?;
    let answers: Vec<(&IdempotencyKey, StoredAnswer)> = requests
        .iter()
        .zip(&decided)
        .filter_map(|(request, decided)| {
            Some((
                request.key.as_ref()?,
                StoredAnswer::json(201, decided.as_ref().ok()?),
            ))
        })
        .collect();
    // A key stored since the claim fails the statement on the primary key: the batch then
    // runs one order at a time, and that order replays.
    idempotency::store_many(connection, &answers).await?;
    Ok(decided
        .into_iter()
        .map(|decided| decided.map_or_else(|answer| answer, |order| Ok(Answered::Fresh(order))))
        .collect())
}

/// A coupon an order names: whose it is, where it stands, its discount.
struct NamedCoupon {
    user_id: UserId,
    status: HeldStatus,
    discount: u64,
}

impl NamedCoupon {
    /// Its discount for an order of `user`, or why it cannot be used.
    fn usable_by(&self, user: UserId) -> Result<u64, CouponUnusable> {
        if self.user_id != user {
            Err(CouponUnusable::NotOwned)
        } else if self.status != HeldStatus::Issued {
            Err(CouponUnusable::AlreadyUsed)
        } else {
            Ok(self.discount)
        }
    }
}

/// The coupons among `ids` that exist (one statement).
async fn coupons(
    connection: &mut MySqlConnection,
    ids: &BTreeSet<CouponHistoryId>,
) -> Result<BTreeMap<CouponHistoryId, NamedCoupon>, ShopError> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut select = QueryBuilder::new(
        "SELECT h.coupon_history_id, h.user_id, h.status, c.discount_amount \
         FROM coupon_history h JOIN coupon c ON c.coupon_id = h.coupon_id \
         WHERE h.coupon_history_id IN (",
    );
    let mut separated = select.separated(", ");
    for id in ids {
        separated.push_bind(*id);
    }
    select.push(")");
    let rows: Vec<(CouponHistoryId, UserId, HeldStatus, u64)> =
        select.build_query_as().fetch_all(&mut *connection).await?;
    Ok(rows
        .into_iter()
        .map(|(id, user_id, status, discount)| {
            (
                id,
                NamedCoupon {
                    user_id,
                    status,
                    discount,
                },
            )
        })
        .collect())
}
