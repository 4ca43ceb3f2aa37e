//! Coupons in MySQL: creating and reading them, issuing a batch of requests in one
//! transaction, and the coupons a user holds (used at payment).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{MySqlConnection, QueryBuilder};

use crate::common::columns::named_enum;
use crate::common::connections::is_duplicate_key;
use crate::common::error::{Classify, ErrorClass};
use crate::common::ids::{CouponHistoryId, CouponId, OrderId, RequestId, UserId};
use crate::coupons::owners::Fence;
use crate::coupons::results::RecordedDecision;
use crate::coupons::{CouponState, IssueDecision, IssueRequest, decide_issues};
use crate::event_log::{EventLog, EventLogError, EventStatus, Move, OutboxEvent, StatusChange};
use crate::events::{CouponResult, EventEnvelope, EventId, EventPayload, EventType};
use crate::outbox::{Committed, Outbox, OutboxTransaction};

#[derive(Debug, thiserror::Error)]
pub enum CouponStoreError {
    #[error("coupon query failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error("coupon {0} could not take the stock decided for it")]
    StockInvariant(CouponId),
    /// Read without locks, the batch was decided on state that changed before its commit
    /// (another batch took the stock, or issued to the same user first).
    #[error("the decision was made on stale coupon state")]
    StaleDecision,
    /// The batch's owner no longer owns its partition: nothing was decided.
    #[error("the batch's owner lost its partition")]
    Fenced,
}

impl Classify for CouponStoreError {
    fn class(&self) -> ErrorClass {
        match self {
            CouponStoreError::Database(error) => error.class(),
            CouponStoreError::EventLog(error) => error.class(),
            // The coupon row is locked while deciding, so this means the decision logic is
            // wrong: stop and restart rather than guess.
            CouponStoreError::StockInvariant(_) => ErrorClass::Fatal,
            CouponStoreError::StaleDecision | CouponStoreError::Fenced => ErrorClass::Retryable,
        }
    }
}

/// A coupon to create.
#[derive(Clone, Debug)]
pub struct NewCoupon {
    pub name: String,
    pub discount_amount: u64,
    pub total_quantity: u32,
    pub valid_from: DateTime<Utc>,
    pub valid_until: DateTime<Utc>,
}

/// A coupon, with its stock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Coupon {
    pub coupon_id: CouponId,
    pub name: String,
    pub discount_amount: u64,
    pub total_quantity: u32,
    pub issued_quantity: u32,
    pub remaining: u32,
    pub valid_from: DateTime<Utc>,
    pub valid_until: DateTime<Utc>,
}

named_enum! {
    /// Where a coupon a user holds stands.
    pub enum HeldStatus ("coupon history status") {
        Issued = "ISSUED",
        /// Spent on an order.
        Used = "USED",
    }
}

/// A coupon a user holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldCoupon {
    pub coupon_history_id: CouponHistoryId,
    pub coupon_id: CouponId,
    pub name: String,
    pub discount_amount: u64,
    pub status: HeldStatus,
    pub issued_at: DateTime<Utc>,
}

/// Why a held coupon cannot pay for an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CouponUnusable {
    /// Missing, or another user's.
    NotOwned,
    AlreadyUsed,
}

/// One coupon request to decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CouponRequest {
    pub coupon_id: CouponId,
    pub request: IssueRequest,
    /// The request's trace context; its result continues the trace.
    pub traceparent: Option<String>,
}

impl CouponRequest {
    /// The request a `CouponRequested` event carries (`None` for any other event).
    pub fn of_event(event: &EventEnvelope) -> Option<Self> {
        let EventPayload::CouponRequested(payload) = &event.payload else {
            return None;
        };
        Some(CouponRequest {
            coupon_id: payload.coupon_id,
            request: IssueRequest {
                request_id: RequestId::of_event(event.event_id),
                user_id: payload.user_id,
                requested_at: event.occurred_at,
            },
            traceparent: event.traceparent.clone(),
        })
    }
}

/// What became of one request of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum RequestOutcome {
    /// Decided now: issued (with its coupon history) or refused.
    Decided {
        decision: IssueDecision,
        coupon_history_id: Option<CouponHistoryId>,
    },
    /// Decided before (a redelivery): nothing changed, no result is sent again.
    AlreadyDecided,
    /// No event-log row: the request did not come through the intake.
    NotRecorded,
}

/// The effects of one batch: an outcome per request, and the result events committed with
/// them (to publish).
pub struct IssuedBatch {
    /// One per request of the batch, in order.
    pub outcomes: Vec<RequestOutcome>,
    /// The same users' earlier requests decided ahead of the batch (see
    /// [`CouponStore::issue`]); their own records later find them decided.
    pub decided_ahead: usize,
    pub results: Committed,
}

#[derive(Clone)]
pub struct CouponStore {
    outbox: Outbox,
    /// Shard rows a new coupon's stock is split over.
    stock_shards: u16,
}

impl CouponStore {
    pub fn new(outbox: Outbox) -> Self {
        Self {
            outbox,
            stock_shards: 1,
        }
    }

    /// New coupons get their stock split over `shards` rows (at most one per unit of stock).
    pub fn with_stock_shards(mut self, shards: u16) -> Self {
        self.stock_shards = shards.max(1);
        self
    }

    pub async fn create(&self, coupon: &NewCoupon) -> Result<Coupon, CouponStoreError> {
        let shards = split_stock(coupon.total_quantity, self.stock_shards);
        let mut transaction = self.outbox.event_log().pool().begin().await?;
        let inserted = sqlx::query!(
            "INSERT INTO coupon (name, discount_amount, total_quantity, stock_shards, \
                                 valid_from, valid_until) \
             VALUES (?, ?, ?, ?, ?, ?)",
            coupon.name,
            coupon.discount_amount,
            coupon.total_quantity,
            shards.len() as u16,
            // As DATETIME, not TIMESTAMP: a TIMESTAMP parameter ends in 2038.
            coupon.valid_from.naive_utc(),
            coupon.valid_until.naive_utc(),
        )
        .execute(&mut *transaction)
        .await?;
        let coupon_id =
            CouponId::from_u64(inserted.last_insert_id()).expect("AUTO_INCREMENT ids start at 1");
        if shards.len() > 1 {
            let mut insert = QueryBuilder::new(
                "INSERT INTO coupon_stock_shard (coupon_id, shard, total_quantity) ",
            );
            insert.push_values(shards.iter().enumerate(), |mut row, (shard, total)| {
                row.push_bind(coupon_id)
                    .push_bind(shard as u16)
                    .push_bind(*total);
            });
            insert.build().execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(self
            .find(coupon_id)
            .await?
            .expect("a coupon is readable right after its insert"))
    }

    pub async fn find(&self, coupon_id: CouponId) -> Result<Option<Coupon>, CouponStoreError> {
        let row = sqlx::query_as!(
            FoundCoupon,
            r#"SELECT c.coupon_id AS "coupon_id: CouponId", c.name, c.discount_amount,
                      c.total_quantity, s.issued_quantity AS "issued_quantity!: u64",
                      c.valid_from AS "valid_from: DateTime<Utc>",
                      c.valid_until AS "valid_until: DateTime<Utc>"
               FROM coupon c JOIN coupon_stock s ON s.coupon_id = c.coupon_id
               WHERE c.coupon_id = ?"#,
            coupon_id,
        )
        .fetch_optional(self.outbox.event_log().pool())
        .await?;
        Ok(row.map(|row| {
            let issued_quantity = u32::try_from(row.issued_quantity).unwrap_or(u32::MAX);
            Coupon {
                coupon_id: row.coupon_id,
                name: row.name,
                discount_amount: row.discount_amount,
                total_quantity: row.total_quantity,
                issued_quantity,
                remaining: row.total_quantity.saturating_sub(issued_quantity),
                valid_from: row.valid_from,
                valid_until: row.valid_until,
            }
        }))
    }

    /// The coupon history a request created, if it was issued.
    pub async fn history_of_request(
        &self,
        request_id: RequestId,
    ) -> Result<Option<CouponHistoryId>, CouponStoreError> {
        let id = sqlx::query_scalar!(
            r#"SELECT coupon_history_id AS "coupon_history_id: CouponHistoryId"
               FROM coupon_history WHERE request_id = ?"#,
            request_id,
        )
        .fetch_optional(self.outbox.event_log().pool())
        .await?;
        Ok(id)
    }

    /// The coupons `user` holds, newest first.
    pub async fn held_by(&self, user: UserId) -> Result<Vec<HeldCoupon>, CouponStoreError> {
        let held = sqlx::query_as!(
            HeldCoupon,
            r#"SELECT h.coupon_history_id AS "coupon_history_id: CouponHistoryId",
                      h.coupon_id AS "coupon_id: CouponId", c.name, c.discount_amount,
                      h.status AS "status: HeldStatus",
                      h.issued_at AS "issued_at: DateTime<Utc>"
               FROM coupon_history h JOIN coupon c ON c.coupon_id = h.coupon_id
               WHERE h.user_id = ? ORDER BY h.coupon_history_id DESC"#,
            user,
        )
        .fetch_all(self.outbox.event_log().pool())
        .await?;
        Ok(held)
    }

    /// Decides and applies a batch of requests (in offset order) in one transaction:
    /// requests already decided are skipped (their event-log rows are locked and read
    /// first), [`decide_issues`] decides each coupon's requests, histories are inserted
    /// (unique per coupon and user, and per request), the requests' event-log rows become
    /// COMPLETED with their decisions (issued with its coupon history, or refused with its
    /// reason, and the id of the result event, published after the commit), and last the
    /// stock moves
    /// with a conditional update.
    ///
    /// The first attempt reads the coupons without locking them, so batches of different
    /// partitions for one popular coupon only meet at that final update: the coupon row is
    /// locked from there to the commit, not for the whole transaction. If the update finds
    /// the stock gone (or a history was inserted first by another batch), the attempt rolls
    /// back and the batch is decided again with the coupon rows locked from the start.
    ///
    /// A sharded coupon's stock is taken from the shard `home` picks (the batch's partition:
    /// batches of different partitions meet on different rows); when that shard cannot
    /// cover the batch, the batch is decided again with every shard of the coupon locked and
    /// takes what its shard lacks from the others.
    ///
    /// Under a `fence` (see [`crate::coupons::owners`]) the transaction first checks that
    /// the batch's owner still owns its partition, and fails with
    /// [`CouponStoreError::Fenced`] when another took it since.
    pub async fn issue(
        &self,
        batch: &[CouponRequest],
        home: u32,
        fence: Option<&Fence>,
    ) -> Result<IssuedBatch, CouponStoreError> {
        match self
            .issue_with(batch, Locking::Optimistic, home, fence)
            .await
        {
            Err(CouponStoreError::StaleDecision) => {
                self.issue_with(batch, Locking::Pessimistic, home, fence)
                    .await
            }
            decided => decided,
        }
    }

    async fn issue_with(
        &self,
        batch: &[CouponRequest],
        locking: Locking,
        home: u32,
        fence: Option<&Fence>,
    ) -> Result<IssuedBatch, CouponStoreError> {
        let mut transaction = self.outbox.begin().await?;
        // On error the transaction is dropped, which rolls it back.
        if let Some(fence) = fence
            && !fence.holds_in(&mut transaction).await?
        {
            return Err(CouponStoreError::Fenced);
        }
        let sequenced = sequence(&mut transaction, batch).await?;
        let outcomes = issue_in(&mut transaction, &sequenced.requests, locking, home).await?;
        let results = transaction.commit().await?;
        Ok(IssuedBatch {
            outcomes: sequenced.batch_outcomes(&outcomes),
            decided_ahead: sequenced.ahead(),
            results,
        })
    }
}

/// The discount of a coupon `user` holds and has not used.
pub async fn usable_discount(
    connection: &mut MySqlConnection,
    coupon_history_id: CouponHistoryId,
    user: UserId,
) -> Result<Result<u64, CouponUnusable>, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT h.user_id AS "user_id: UserId", h.status AS "status: HeldStatus",
                  c.discount_amount
           FROM coupon_history h JOIN coupon c ON c.coupon_id = h.coupon_id
           WHERE h.coupon_history_id = ?"#,
        coupon_history_id,
    )
    .fetch_optional(&mut *connection)
    .await?;
    Ok(match row {
        Some(row) if row.user_id != user => Err(CouponUnusable::NotOwned),
        None => Err(CouponUnusable::NotOwned),
        Some(row) if row.status != HeldStatus::Issued => Err(CouponUnusable::AlreadyUsed),
        Some(row) => Ok(row.discount_amount),
    })
}

/// Spends a coupon `user` holds on `order` (ISSUED → USED), in the caller's transaction.
pub async fn use_coupon(
    connection: &mut MySqlConnection,
    coupon_history_id: CouponHistoryId,
    user: UserId,
    order: OrderId,
) -> Result<Result<(), CouponUnusable>, sqlx::Error> {
    let used = sqlx::query!(
        "UPDATE coupon_history SET status = ?, used_order_id = ? \
         WHERE coupon_history_id = ? AND user_id = ? AND status = ?",
        HeldStatus::Used,
        order,
        coupon_history_id,
        user,
        HeldStatus::Issued,
    )
    .execute(&mut *connection)
    .await?;
    if used.rows_affected() == 1 {
        return Ok(Ok(()));
    }
    Ok(
        match usable_discount(connection, coupon_history_id, user).await? {
            Err(unusable) => Err(unusable),
            // Usable a moment ago and not now: another payment just used it.
            Ok(_) => Err(CouponUnusable::AlreadyUsed),
        },
    )
}

/// The states of a request not decided yet.
const UNDECIDED: [EventStatus; 3] = [
    EventStatus::Pending,
    EventStatus::Published,
    EventStatus::InProgress,
];

/// A batch put in the order its users' requests were accepted: what to decide, in order
/// (the batch's requests and the same users' earlier undecided ones), and for each request
/// of the batch where its outcome is in that order.
struct Sequenced {
    requests: Vec<CouponRequest>,
    place_of_batch: Vec<usize>,
}

impl Sequenced {
    /// The outcomes of the batch's requests, in batch order.
    fn batch_outcomes(&self, outcomes: &[RequestOutcome]) -> Vec<RequestOutcome> {
        self.place_of_batch
            .iter()
            .map(|place| outcomes[*place])
            .collect()
    }

    /// Requests decided that were not in the batch.
    fn ahead(&self) -> usize {
        self.requests.len() - self.place_of_batch.len()
    }
}

/// Puts `batch` in the order its users' requests were accepted, with their earlier
/// requests not decided yet: one read by key of the event log, in the batch's transaction.
/// A record can reach its partition after a later request of the same user (two daemons
/// whose producers run at different speeds, a publication lost after the commit and
/// published again by the reconciler), in the same batch or an earlier one: deciding in
/// acceptance order makes a user's requests decided in the order the database accepted
/// them, whatever order the transport delivers them in. The earlier requests' own records
/// later find them decided.
async fn sequence(
    connection: &mut MySqlConnection,
    batch: &[CouponRequest],
) -> Result<Sequenced, CouponStoreError> {
    let batch_ids = ids_of(batch);
    let keys: BTreeSet<String> = batch_ids.iter().map(|(key, _)| key.clone()).collect();
    let accepted = EventLog::keyed_in_acceptance_order_in(
        connection,
        EventType::CouponRequested,
        &keys,
        &UNDECIDED,
    )
    .await?;
    let (order, place_of_batch) = acceptance_order(&batch_ids, &accepted);
    let ahead: Vec<EventId> = order
        .iter()
        .filter_map(|slot| match slot {
            Slot::Ahead(row) => Some(accepted[*row].1),
            Slot::Batch(_) => None,
        })
        .collect();
    // Rare: the whole rows only of the requests to decide ahead.
    let earlier: BTreeMap<EventId, CouponRequest> = EventLog::records_in(connection, &ahead)
        .await?
        .iter()
        .filter_map(|record| {
            Some((
                record.event_id,
                CouponRequest::of_event(&record.envelope())?,
            ))
        })
        .collect();
    let mut requests = Vec::with_capacity(order.len());
    let mut place_of = Vec::with_capacity(order.len());
    for slot in order {
        match slot {
            Slot::Batch(position) => {
                place_of.push(Some(requests.len()));
                requests.push(batch[position].clone());
            }
            // A row gone or not a coupon request: nothing to decide ahead.
            Slot::Ahead(row) => match earlier.get(&accepted[row].1) {
                Some(request) => {
                    place_of.push(Some(requests.len()));
                    requests.push(request.clone());
                }
                None => place_of.push(None),
            },
        }
    }
    let place_of_batch = place_of_batch
        .into_iter()
        .map(|place| place_of[place].expect("a batch request is always decided"))
        .collect();
    Ok(Sequenced {
        requests,
        place_of_batch,
    })
}

/// Each request's user key and event id.
fn ids_of(requests: &[CouponRequest]) -> Vec<(String, EventId)> {
    requests
        .iter()
        .map(|item| {
            let id = EventId::from(item.request.request_id);
            (item.request.user_id.partition_key(), id)
        })
        .collect()
}

/// One request to decide: the batch's, or an earlier undecided one (by its row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Batch(usize),
    Ahead(usize),
}

/// The order to decide `batch` in (each request as its user's key and event id), given its
/// users' undecided requests in acceptance order (`accepted`): a user's requests, from its
/// first undecided request in the batch, are decided in acceptance order, with its earlier
/// undecided requests before them, up to its last request in the batch; everything else
/// (requests decided before, not recorded, repeated in the batch) stays in batch order.
/// Also answers, for each request of the batch, its place in that order.
fn acceptance_order(
    batch: &[(String, EventId)],
    accepted: &[(String, EventId)],
) -> (Vec<Slot>, Vec<usize>) {
    let in_batch: BTreeMap<EventId, usize> = batch
        .iter()
        .enumerate()
        .map(|(position, (_, id))| (*id, position))
        .rev()
        .collect();
    let last_in_batch: BTreeMap<&str, usize> = accepted
        .iter()
        .enumerate()
        .filter(|(_, (_, id))| in_batch.contains_key(id))
        .map(|(row, (key, _))| (key.as_str(), row))
        .collect();
    let mut by_user: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (row, (key, _)) in accepted.iter().enumerate() {
        if last_in_batch
            .get(key.as_str())
            .is_some_and(|last| row <= *last)
        {
            by_user.entry(key.as_str()).or_default().push(row);
        }
    }
    let mut order = Vec::new();
    let mut placed: BTreeMap<EventId, usize> = BTreeMap::new();
    let mut place_of_batch = Vec::with_capacity(batch.len());
    for (position, (key, id)) in batch.iter().enumerate() {
        let undecided = by_user
            .get(key.as_str())
            .is_some_and(|rows| rows.iter().any(|row| accepted[*row].1 == *id));
        if undecided && let Some(rows) = by_user.remove(key.as_str()) {
            for row in rows {
                let row_id = accepted[row].1;
                placed.insert(row_id, order.len());
                order.push(match in_batch.get(&row_id) {
                    Some(first) => Slot::Batch(*first),
                    None => Slot::Ahead(row),
                });
            }
        }
        match placed.remove(id) {
            Some(place) => place_of_batch.push(place),
            None => {
                place_of_batch.push(order.len());
                order.push(Slot::Batch(position));
            }
        }
    }
    (order, place_of_batch)
}

/// How a batch reads the coupon rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Locking {
    /// Without locks; the conditional stock update at the end verifies the decision.
    Optimistic,
    /// `FOR UPDATE` before deciding.
    Pessimistic,
}

/// Decides and applies one batch in the caller's transaction (see [`CouponStore::issue`]),
/// step by step, in the order its statements run: lock the requests' event-log rows, read
/// the coupons, decide each coupon's requests, insert the histories, record the decisions,
/// and last take the stock.
async fn issue_in(
    transaction: &mut OutboxTransaction,
    batch: &[CouponRequest],
    locking: Locking,
    home: u32,
) -> Result<Vec<RequestOutcome>, CouponStoreError> {
    let event_ids: Vec<EventId> = batch
        .iter()
        .map(|item| item.request.request_id.into())
        .collect();
    let statuses = EventLog::lock_statuses_in(transaction, &event_ids).await?;
    let mut outcomes = vec![RequestOutcome::AlreadyDecided; batch.len()];
    let pending = pending_by_coupon(batch, &event_ids, &statuses, &mut outcomes);
    if pending.is_empty() {
        return Ok(outcomes);
    }
    let coupons = read_coupons(transaction, pending.keys().copied().collect(), locking).await?;
    let decided = decide_pending(transaction, &pending, &coupons, &mut outcomes).await?;
    let history_ids = match insert_histories(transaction, &decided.issued).await {
        Err(CouponStoreError::Database(error)) if is_duplicate_key(&error) => {
            return Err(CouponStoreError::StaleDecision);
        }
        inserted => inserted?,
    };
    record_decisions(transaction, batch, &mut outcomes, &history_ids).await?;
    take_decided_stock(transaction, &coupons, decided.stock_taken, locking, home).await?;
    Ok(outcomes)
}

/// The requests of a batch still to decide, per coupon, in batch (offset) order with their
/// position in the batch. A request without an event-log row is marked
/// [`RequestOutcome::NotRecorded`]; one already decided, or repeated in the batch, is left
/// [`RequestOutcome::AlreadyDecided`].
fn pending_by_coupon(
    batch: &[CouponRequest],
    event_ids: &[EventId],
    statuses: &BTreeMap<EventId, EventStatus>,
    outcomes: &mut [RequestOutcome],
) -> BTreeMap<CouponId, Vec<(usize, IssueRequest)>> {
    let mut pending: BTreeMap<CouponId, Vec<(usize, IssueRequest)>> = BTreeMap::new();
    let mut seen_in_batch = BTreeSet::new();
    for (position, (item, event_id)) in batch.iter().zip(event_ids).enumerate() {
        let undecided = statuses
            .get(event_id)
            .is_some_and(|status| UNDECIDED.contains(status));
        if !statuses.contains_key(event_id) {
            outcomes[position] = RequestOutcome::NotRecorded;
        } else if undecided && seen_in_batch.insert(*event_id) {
            pending
                .entry(item.coupon_id)
                .or_default()
                .push((position, item.request));
        }
    }
    pending
}

/// What deciding a batch's pending requests leaves to write.
struct Decided {
    /// The requests issued, a coupon history each, in batch order (so a user's coupon
    /// histories are numbered in the order the user's requests were decided).
    issued: Vec<(CouponId, IssueRequest)>,
    /// How many units each coupon gives, in coupon order.
    stock_taken: Vec<(CouponId, u32)>,
}

/// Decides each coupon's pending requests with [`decide_issues`] (reading which of their
/// users already hold the coupon) and marks them [`RequestOutcome::Decided`], without their
/// coupon histories yet.
async fn decide_pending(
    connection: &mut MySqlConnection,
    pending: &BTreeMap<CouponId, Vec<(usize, IssueRequest)>>,
    coupons: &BTreeMap<CouponId, ReadCoupon>,
    outcomes: &mut [RequestOutcome],
) -> Result<Decided, CouponStoreError> {
    let mut decided = Decided {
        issued: Vec::new(),
        stock_taken: Vec::new(),
    };
    let mut issued = Vec::new();
    for (coupon_id, requests) in pending {
        let coupon = coupons.get(coupon_id).map(|read| &read.state);
        let users: Vec<UserId> = requests
            .iter()
            .map(|(_, request)| request.user_id)
            .collect();
        let holders = match coupon {
            Some(_) => holders_among(connection, *coupon_id, &users).await?,
            None => BTreeSet::new(),
        };
        let plain: Vec<IssueRequest> = requests.iter().map(|(_, request)| *request).collect();
        let decisions = decide_issues(coupon, &holders, &plain);
        let issued_now = decisions
            .iter()
            .filter(|decision| **decision == IssueDecision::Issue)
            .count() as u32;
        if issued_now > 0 {
            decided.stock_taken.push((*coupon_id, issued_now));
        }
        for ((position, request), decision) in requests.iter().zip(decisions) {
            outcomes[*position] = RequestOutcome::Decided {
                decision,
                coupon_history_id: None,
            };
            if decision == IssueDecision::Issue {
                issued.push((*position, *coupon_id, *request));
            }
        }
    }
    issued.sort_by_key(|(position, _, _)| *position);
    decided.issued = issued
        .into_iter()
        .map(|(_, coupon_id, request)| (coupon_id, request))
        .collect();
    Ok(decided)
}

/// Completes the decided requests' event-log rows, each with its decision and the id of
/// the result event announcing it, and hands those result events to the transaction to
/// publish after the commit. The outcomes get their coupon histories.
///
/// Decided either way, the request is COMPLETED: a refusal is its business result (the
/// reason), not a processing failure. Its row records the decision with the id of the
/// result event, so the result needs no row of its own: it is published after the commit,
/// and the request's row is rebuilt into it when it must be published again (see
/// `coupons::results`).
async fn record_decisions(
    transaction: &mut OutboxTransaction,
    batch: &[CouponRequest],
    outcomes: &mut [RequestOutcome],
    history_ids: &BTreeMap<RequestId, CouponHistoryId>,
) -> Result<(), CouponStoreError> {
    let mut decisions = Vec::new();
    let mut results = Vec::new();
    for (position, item) in batch.iter().enumerate() {
        let RequestOutcome::Decided { decision, .. } = outcomes[position] else {
            continue;
        };
        let coupon_history_id = history_ids.get(&item.request.request_id).copied();
        outcomes[position] = RequestOutcome::Decided {
            decision,
            coupon_history_id,
        };
        let (envelope, result) = result_of(item, decision, coupon_history_id);
        decisions.push((
            EventId::from(item.request.request_id),
            RecordedDecision::of(envelope.event_id, &result).to_json(),
        ));
        results.push(OutboxEvent::new(envelope));
    }
    EventLog::change_status_of_many_with_results_in(
        transaction,
        &decisions,
        StatusChange::new(Move::Complete),
    )
    .await?;
    transaction.publish_proven(results);
    Ok(())
}

/// The result event of a decided request, continuing the request's trace, and the result
/// it carries.
fn result_of(
    item: &CouponRequest,
    decision: IssueDecision,
    coupon_history_id: Option<CouponHistoryId>,
) -> (EventEnvelope, CouponResult) {
    let request = item.request;
    let reason = match decision {
        IssueDecision::Issue => None,
        IssueDecision::Refuse(reason) => Some(reason),
    };
    let result = CouponResult {
        request_id: request.request_id,
        user_id: request.user_id,
        coupon_id: item.coupon_id,
        success: decision == IssueDecision::Issue,
        coupon_history_id,
        reason,
    };
    let envelope = EventEnvelope::new(
        request.user_id.partition_key(),
        EventPayload::CouponResult(result.clone()),
    )
    .continuing(item.traceparent.as_deref());
    (envelope, result)
}

/// Takes the decided units from each coupon's stock, in coupon order: from here to the
/// commit the coupon rows (or the shard rows taken from) are locked. A coupon whose stock
/// cannot give them means the decision was stale (optimistic) or wrong (pessimistic).
async fn take_decided_stock(
    connection: &mut MySqlConnection,
    coupons: &BTreeMap<CouponId, ReadCoupon>,
    stock_taken: Vec<(CouponId, u32)>,
    locking: Locking,
    home: u32,
) -> Result<(), CouponStoreError> {
    for (coupon_id, count) in stock_taken {
        let stock = &coupons[&coupon_id].stock;
        if !take_stock(connection, coupon_id, stock, count, home).await? {
            return Err(match locking {
                Locking::Optimistic => CouponStoreError::StaleDecision,
                Locking::Pessimistic => CouponStoreError::StockInvariant(coupon_id),
            });
        }
    }
    Ok(())
}

/// A coupon row as the issuer reads it (its issued count summed over its shards).
#[derive(sqlx::FromRow)]
struct CouponRow {
    coupon_id: CouponId,
    total_quantity: u32,
    issued_quantity: u64,
    stock_shards: u16,
    valid_from: DateTime<Utc>,
    valid_until: DateTime<Utc>,
}

/// A coupon as `find` reads it.
struct FoundCoupon {
    coupon_id: CouponId,
    name: String,
    discount_amount: u64,
    total_quantity: u32,
    issued_quantity: u64,
    valid_from: DateTime<Utc>,
    valid_until: DateTime<Utc>,
}

/// What a batch read of a coupon: the state it decides on, and where its stock lives.
struct ReadCoupon {
    state: CouponState,
    stock: Stock,
}

/// Where a coupon's stock is kept.
enum Stock {
    /// `coupon.issued_quantity`.
    Row,
    /// `shards` rows of `coupon_stock_shard`; when locked (pessimistic), what each has left.
    Shards { shards: u16, left: Vec<u32> },
}

/// Reads the coupon rows, locking them (in key order, so concurrent batches cannot deadlock
/// on them) when pessimistic, and then the shard rows of sharded coupons (in (coupon,
/// shard) order, the order every batch takes shard rows in).
async fn read_coupons(
    connection: &mut MySqlConnection,
    coupon_ids: Vec<CouponId>,
    locking: Locking,
) -> Result<BTreeMap<CouponId, ReadCoupon>, CouponStoreError> {
    let rows = select_coupon_rows(connection, &coupon_ids, locking).await?;
    let mut coupons: BTreeMap<CouponId, ReadCoupon> = rows
        .into_iter()
        .map(|row| (row.coupon_id, ReadCoupon::from_row(row)))
        .collect();
    if locking == Locking::Pessimistic {
        lock_shards(connection, &mut coupons).await?;
    }
    Ok(coupons)
}

/// The coupon rows of `coupon_ids`, in key order. Unlocked, the view sums a sharded
/// coupon's shards; locked (`FOR UPDATE`), the coupon rows are read alone and the shards
/// by [`lock_shards`].
async fn select_coupon_rows(
    connection: &mut MySqlConnection,
    coupon_ids: &[CouponId],
    locking: Locking,
) -> Result<Vec<CouponRow>, CouponStoreError> {
    let mut select = QueryBuilder::new(match locking {
        Locking::Optimistic => {
            "SELECT c.coupon_id, c.total_quantity, s.issued_quantity, c.stock_shards, \
                    c.valid_from, c.valid_until \
             FROM coupon c JOIN coupon_stock s ON s.coupon_id = c.coupon_id \
             WHERE c.coupon_id IN ("
        }
        Locking::Pessimistic => {
            "SELECT c.coupon_id, c.total_quantity, \
                    CAST(c.issued_quantity AS UNSIGNED) AS issued_quantity, c.stock_shards, \
                    c.valid_from, c.valid_until \
             FROM coupon c WHERE c.coupon_id IN ("
        }
    });
    let mut separated = select.separated(", ");
    for coupon_id in coupon_ids {
        separated.push_bind(*coupon_id);
    }
    select.push(") ORDER BY c.coupon_id");
    if locking == Locking::Pessimistic {
        select.push(" FOR UPDATE");
    }
    Ok(select.build_query_as().fetch_all(&mut *connection).await?)
}

impl ReadCoupon {
    /// The state a coupon row gives, its stock kept in the row or in shards (whose units
    /// left are read only when they are locked).
    fn from_row(row: CouponRow) -> Self {
        let stock = if row.stock_shards > 1 {
            Stock::Shards {
                shards: row.stock_shards,
                left: Vec::new(),
            }
        } else {
            Stock::Row
        };
        let state = CouponState {
            coupon_id: row.coupon_id,
            total_quantity: row.total_quantity,
            issued_quantity: u32::try_from(row.issued_quantity).unwrap_or(u32::MAX),
            valid_from: row.valid_from,
            valid_until: row.valid_until,
        };
        ReadCoupon { state, stock }
    }
}

/// Locks the shard rows of the sharded coupons among `coupons` (in (coupon, shard) order)
/// and records what each shard has left; locked, the shards' sum is exact, so it becomes
/// the coupon's issued count.
async fn lock_shards(
    connection: &mut MySqlConnection,
    coupons: &mut BTreeMap<CouponId, ReadCoupon>,
) -> Result<(), CouponStoreError> {
    let sharded: Vec<CouponId> = coupons
        .iter()
        .filter(|(_, read)| matches!(read.stock, Stock::Shards { .. }))
        .map(|(coupon_id, _)| *coupon_id)
        .collect();
    if sharded.is_empty() {
        return Ok(());
    }
    let mut select = QueryBuilder::new(
        "SELECT coupon_id, total_quantity, issued_quantity FROM coupon_stock_shard \
         WHERE coupon_id IN (",
    );
    let mut separated = select.separated(", ");
    for coupon_id in &sharded {
        separated.push_bind(*coupon_id);
    }
    select.push(") ORDER BY coupon_id, shard FOR UPDATE");
    let shards: Vec<(CouponId, u32, u32)> =
        select.build_query_as().fetch_all(&mut *connection).await?;
    for (coupon_id, total, issued) in shards {
        let read = coupons.get_mut(&coupon_id).expect("read above");
        if let Stock::Shards { left, .. } = &mut read.stock {
            left.push(total.saturating_sub(issued));
        }
    }
    for coupon_id in &sharded {
        let read = coupons.get_mut(coupon_id).expect("read above");
        if let Stock::Shards { left, .. } = &read.stock {
            let units_left: u32 = left.iter().sum();
            read.state.issued_quantity = read.state.total_quantity.saturating_sub(units_left);
        }
    }
    Ok(())
}

/// A coupon's stock split over `shards` rows: as even as can be, the first ones one larger;
/// never a row with no stock.
fn split_stock(total: u32, shards: u16) -> Vec<u32> {
    let shards = u32::from(shards.max(1)).min(total.max(1));
    (0..shards)
        .map(|shard| total / shards + u32::from(shard < total % shards))
        .collect()
}

/// How `count` units are taken from a coupon's shards, `left` in each, starting at `home`
/// and going round: `(shard, units)` in shard order (the order rows are locked in), or
/// `None` when all of them together have fewer.
fn take_from_shards(left: &[u32], home: u32, count: u32) -> Option<Vec<(u16, u32)>> {
    let shards = left.len();
    let mut needed = count;
    let mut taken = Vec::new();
    for step in 0..shards {
        if needed == 0 {
            break;
        }
        let shard = (home as usize + step) % shards;
        let units = left[shard].min(needed);
        if units > 0 {
            taken.push((shard as u16, units));
            needed -= units;
        }
    }
    if needed > 0 {
        return None;
    }
    taken.sort_unstable();
    Some(taken)
}

/// Which of `users` already hold `coupon_id`.
async fn holders_among(
    connection: &mut MySqlConnection,
    coupon_id: CouponId,
    users: &[UserId],
) -> Result<BTreeSet<UserId>, CouponStoreError> {
    let mut select = QueryBuilder::new("SELECT user_id FROM coupon_history WHERE coupon_id = ");
    select.push_bind(coupon_id).push(" AND user_id IN (");
    let mut separated = select.separated(", ");
    for user in users {
        separated.push_bind(*user);
    }
    select.push(")");
    let holders: Vec<(UserId,)> = select.build_query_as().fetch_all(&mut *connection).await?;
    Ok(holders.into_iter().map(|(user,)| user).collect())
}

/// Moves `count` units of stock if that many are left; the condition makes over-issuing
/// impossible whatever was decided. Returns whether it moved. A sharded coupon's units come
/// from its `home` shard alone when its shards are not locked (the batch is decided again,
/// locked, if that shard has too few), and from `home` then the others when they are.
async fn take_stock(
    connection: &mut MySqlConnection,
    coupon_id: CouponId,
    stock: &Stock,
    count: u32,
    home: u32,
) -> Result<bool, CouponStoreError> {
    let taken = match stock {
        Stock::Row => {
            let updated = sqlx::query!(
                "UPDATE coupon SET issued_quantity = issued_quantity + ? \
                 WHERE coupon_id = ? AND issued_quantity + ? <= total_quantity",
                count,
                coupon_id,
                count,
            )
            .execute(&mut *connection)
            .await?;
            return Ok(updated.rows_affected() == 1);
        }
        Stock::Shards { shards, left } if left.is_empty() => {
            vec![((home % u32::from(*shards)) as u16, count)]
        }
        Stock::Shards { left, .. } => match take_from_shards(left, home, count) {
            Some(taken) => taken,
            None => return Ok(false),
        },
    };
    for (shard, units) in taken {
        let updated = sqlx::query!(
            "UPDATE coupon_stock_shard SET issued_quantity = issued_quantity + ? \
             WHERE coupon_id = ? AND shard = ? AND issued_quantity + ? <= total_quantity",
            units,
            coupon_id,
            shard,
            units,
        )
        .execute(&mut *connection)
        .await?;
        if updated.rows_affected() != 1 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Inserts the histories and returns their ids by request.
async fn insert_histories(
    connection: &mut MySqlConnection,
    issued: &[(CouponId, IssueRequest)],
) -> Result<BTreeMap<RequestId, CouponHistoryId>, CouponStoreError> {
    if issued.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut insert = QueryBuilder::new(
        "INSERT INTO coupon_history (coupon_id, user_id, request_id, status, issued_at) ",
    );
    insert.push_values(issued, |mut row, (coupon_id, request)| {
        row.push_bind(*coupon_id)
            .push_bind(request.user_id)
            .push_bind(request.request_id)
            .push_bind(HeldStatus::Issued)
            .push("NOW(6)");
    });
    insert.build().execute(&mut *connection).await?;

    let mut select = QueryBuilder::new(
        "SELECT request_id, coupon_history_id FROM coupon_history WHERE request_id IN (",
    );
    let mut separated = select.separated(", ");
    for (_, request) in issued {
        separated.push_bind(request.request_id);
    }
    select.push(")");
    let rows: Vec<(RequestId, CouponHistoryId)> =
        select.build_query_as().fetch_all(&mut *connection).await?;
    Ok(rows.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(rows: &[(&str, u64)]) -> Vec<(String, EventId)> {
        rows.iter()
            .map(|(key, id)| {
                let id = format!("00000000-0000-7000-8000-{id:012}");
                (key.to_string(), EventId::parse(&id).unwrap())
            })
            .collect()
    }

    #[test]
    fn a_users_requests_are_decided_in_acceptance_order_with_the_earlier_undecided_first() {
        // User 1's request 3 reached the partition before request 1, which is not in the
        // batch; user 2's is alone; request 9 was decided before (not undecided).
        let batch = ids(&[("user:1", 3), ("user:2", 5), ("user:1", 9)]);
        let accepted = ids(&[("user:1", 1), ("user:2", 5), ("user:1", 3), ("user:1", 4)]);
        let (order, places) = acceptance_order(&batch, &accepted);
        assert_eq!(
            order,
            vec![
                Slot::Ahead(0),
                Slot::Batch(0),
                Slot::Batch(1),
                Slot::Batch(2)
            ],
            "request 4, accepted after user 1's last request in the batch, waits for its record"
        );
        assert_eq!(places, vec![1, 2, 3]);
    }

    #[test]
    fn requests_of_one_user_in_one_batch_are_reordered_and_repeats_stay_in_place() {
        let batch = ids(&[("user:1", 7), ("user:1", 6), ("user:1", 7)]);
        let accepted = ids(&[("user:1", 6), ("user:1", 7)]);
        let (order, places) = acceptance_order(&batch, &accepted);
        assert_eq!(order, vec![Slot::Batch(1), Slot::Batch(0), Slot::Batch(2)]);
        assert_eq!(
            places,
            vec![1, 0, 2],
            "the repeat of 7 is decided as a repeat"
        );
    }

    #[test]
    fn a_batch_without_earlier_undecided_requests_keeps_its_order() {
        let batch = ids(&[("user:2", 2), ("user:1", 1)]);
        let (order, places) = acceptance_order(&batch, &ids(&[("user:1", 1), ("user:2", 2)]));
        assert_eq!(order, vec![Slot::Batch(0), Slot::Batch(1)]);
        assert_eq!(places, vec![0, 1]);
        let (order, _) = acceptance_order(&batch, &[]);
        assert_eq!(order, vec![Slot::Batch(0), Slot::Batch(1)]);
    }

    #[test]
    fn stock_is_split_evenly_and_never_into_empty_shards() {
        assert_eq!(split_stock(10, 3), vec![4, 3, 3]);
        assert_eq!(split_stock(9, 3), vec![3, 3, 3]);
        assert_eq!(split_stock(2, 6), vec![1, 1]);
        assert_eq!(split_stock(7, 1), vec![7]);
        assert_eq!(split_stock(1_000_000, 6).iter().sum::<u32>(), 1_000_000);
    }

    #[test]
    fn units_come_from_the_home_shard_then_the_next_ones_round() {
        assert_eq!(take_from_shards(&[5, 5, 5], 1, 3), Some(vec![(1, 3)]));
        assert_eq!(
            take_from_shards(&[2, 2, 2], 1, 5),
            Some(vec![(0, 1), (1, 2), (2, 2)])
        );
        assert_eq!(take_from_shards(&[0, 0, 4], 0, 4), Some(vec![(2, 4)]));
        assert_eq!(
            take_from_shards(&[1, 1, 1], 2, 4),
            None,
            "not enough in all"
        );
        assert_eq!(take_from_shards(&[1, 1, 1], 5, 1), Some(vec![(2, 1)]));
    }
}
