//! Coupons in MySQL: creating and reading them, and issuing a batch of requests in one
//! transaction.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{MySqlConnection, MySqlPool, QueryBuilder, Row};

use crate::coupons::{
    CouponId, CouponState, IssueDecision, IssueRequest, RefusalReason, UserId, decide_issues,
};
use crate::error::{Classify, ErrorClass};
use crate::event_log::{EventLog, EventLogError, EventStatus, OutboxEvent};
use crate::events::{CouponResult, EventEnvelope, EventId, EventPayload};
use crate::kafka::topics;

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
}

impl Classify for CouponStoreError {
    fn class(&self) -> ErrorClass {
        match self {
            CouponStoreError::Database(error) => error.class(),
            CouponStoreError::EventLog(error) => error.class(),
            // The coupon row is locked while deciding, so this means the decision logic is
            // wrong: stop and restart rather than guess.
            CouponStoreError::StockInvariant(_) => ErrorClass::Fatal,
            CouponStoreError::StaleDecision => ErrorClass::Retryable,
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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

/// A coupon a user holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldCoupon {
    pub coupon_history_id: u64,
    pub coupon_id: CouponId,
    pub name: String,
    pub discount_amount: u64,
    pub status: String,
    pub issued_at: DateTime<Utc>,
}

/// One coupon request to decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CouponRequest {
    pub coupon_id: CouponId,
    pub request: IssueRequest,
}

/// What became of one request of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum RequestOutcome {
    /// Decided now: issued (with its coupon history) or refused.
    Decided {
        decision: IssueDecision,
        coupon_history_id: Option<u64>,
    },
    /// Decided before (a redelivery): nothing changed, no result is sent again.
    AlreadyDecided,
    /// No event-log row: the request did not come through the intake.
    NotRecorded,
}

/// The effects of one batch: an outcome per request, and the result events written to the
/// outbox in the same transaction (to publish after the commit).
#[derive(Clone, Debug)]
pub struct IssuedBatch {
    pub outcomes: Vec<RequestOutcome>,
    pub results: Vec<OutboxEvent>,
}

#[derive(Clone, Debug)]
pub struct CouponStore {
    pool: MySqlPool,
}

impl CouponStore {
    pub fn new(pool: MySqlPool) -> Self {
        Self { pool }
    }

    pub async fn create(&self, coupon: &NewCoupon) -> Result<Coupon, CouponStoreError> {
        let inserted = sqlx::query(
            "INSERT INTO coupon (name, discount_amount, total_quantity, valid_from, valid_until) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&coupon.name)
        .bind(coupon.discount_amount)
        .bind(coupon.total_quantity)
        .bind(coupon.valid_from)
        .bind(coupon.valid_until)
        .execute(&self.pool)
        .await?;
        let coupon_id = CouponId(inserted.last_insert_id());
        Ok(self
            .find(coupon_id)
            .await?
            .expect("a coupon is readable right after its insert"))
    }

    pub async fn find(&self, coupon_id: CouponId) -> Result<Option<Coupon>, CouponStoreError> {
        let row = sqlx::query(
            "SELECT coupon_id, name, discount_amount, total_quantity, issued_quantity, valid_from, valid_until \
             FROM coupon WHERE coupon_id = ?",
        )
        .bind(coupon_id.get())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let total_quantity: u32 = row.try_get("total_quantity")?;
            let issued_quantity: u32 = row.try_get("issued_quantity")?;
            Ok(Coupon {
                coupon_id: CouponId(row.try_get("coupon_id")?),
                name: row.try_get("name")?,
                discount_amount: row.try_get("discount_amount")?,
                total_quantity,
                issued_quantity,
                remaining: total_quantity.saturating_sub(issued_quantity),
                valid_from: row.try_get("valid_from")?,
                valid_until: row.try_get("valid_until")?,
            })
        })
        .transpose()
    }

    /// The coupon history a request created, if it was issued.
    pub async fn history_of_request(
        &self,
        request_id: EventId,
    ) -> Result<Option<u64>, CouponStoreError> {
        let row: Option<(u64,)> =
            sqlx::query_as("SELECT coupon_history_id FROM coupon_history WHERE request_id = ?")
                .bind(request_id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(id,)| id))
    }

    /// The coupons `user` holds, newest first.
    pub async fn held_by(&self, user: UserId) -> Result<Vec<HeldCoupon>, CouponStoreError> {
        let rows = sqlx::query(
            "SELECT h.coupon_history_id, h.coupon_id, c.name, c.discount_amount, h.status, h.issued_at \
             FROM coupon_history h JOIN coupon c ON c.coupon_id = h.coupon_id \
             WHERE h.user_id = ? ORDER BY h.coupon_history_id DESC",
        )
        .bind(user.get())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(HeldCoupon {
                    coupon_history_id: row.try_get("coupon_history_id")?,
                    coupon_id: CouponId(row.try_get("coupon_id")?),
                    name: row.try_get("name")?,
                    discount_amount: row.try_get("discount_amount")?,
                    status: row.try_get("status")?,
                    issued_at: row.try_get("issued_at")?,
                })
            })
            .collect()
    }

    /// Decides and applies a batch of requests (in offset order) in one transaction:
    /// requests already decided are skipped (their event-log rows are locked and read
    /// first), [`decide_issues`] decides each coupon's requests, histories are inserted
    /// (unique per coupon and user, and per request), the requests' event-log rows become
    /// COMPLETED or FAILED, the result events go into the outbox, and last the stock moves
    /// with a conditional update.
    ///
    /// The first attempt reads the coupons without locking them, so batches of different
    /// partitions for one popular coupon only meet at that final update: the coupon row is
    /// locked from there to the commit, not for the whole transaction. If the update finds
    /// the stock gone (or a history was inserted first by another batch), the attempt rolls
    /// back and the batch is decided again with the coupon rows locked from the start.
    pub async fn issue(&self, batch: &[CouponRequest]) -> Result<IssuedBatch, CouponStoreError> {
        match self.issue_with(batch, Locking::Optimistic).await {
            Err(CouponStoreError::StaleDecision) => {
                self.issue_with(batch, Locking::Pessimistic).await
            }
            decided => decided,
        }
    }

    async fn issue_with(
        &self,
        batch: &[CouponRequest],
        locking: Locking,
    ) -> Result<IssuedBatch, CouponStoreError> {
        let mut transaction = self.pool.begin().await?;
        // On error the transaction is dropped, which rolls it back.
        let issued = issue_in(&mut transaction, batch, locking).await?;
        transaction.commit().await?;
        Ok(issued)
    }
}

/// How a batch reads the coupon rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Locking {
    /// Without locks; the conditional stock update at the end verifies the decision.
    Optimistic,
    /// `FOR UPDATE` before deciding.
    Pessimistic,
}

async fn issue_in(
    connection: &mut MySqlConnection,
    batch: &[CouponRequest],
    locking: Locking,
) -> Result<IssuedBatch, CouponStoreError> {
    let request_ids: Vec<EventId> = batch.iter().map(|item| item.request.request_id).collect();
    let statuses = EventLog::lock_statuses_in(connection, &request_ids).await?;
    let mut outcomes = vec![RequestOutcome::AlreadyDecided; batch.len()];

    // Pending requests per coupon, in batch (offset) order, remembering their position.
    let mut pending: BTreeMap<CouponId, Vec<(usize, IssueRequest)>> = BTreeMap::new();
    let mut seen_in_batch = BTreeSet::new();
    for (position, item) in batch.iter().enumerate() {
        let undecided = matches!(
            statuses.get(&item.request.request_id),
            Some(EventStatus::Pending | EventStatus::Published | EventStatus::InProgress)
        );
        if !statuses.contains_key(&item.request.request_id) {
            outcomes[position] = RequestOutcome::NotRecorded;
        } else if undecided && seen_in_batch.insert(item.request.request_id) {
            pending
                .entry(item.coupon_id)
                .or_default()
                .push((position, item.request));
        }
    }
    if pending.is_empty() {
        return Ok(IssuedBatch {
            outcomes,
            results: Vec::new(),
        });
    }

    let coupons = read_coupons(connection, pending.keys().copied().collect(), locking).await?;
    let mut issued_rows: Vec<(CouponId, IssueRequest)> = Vec::new();
    let mut stock_taken: Vec<(CouponId, u32)> = Vec::new();
    for (coupon_id, requests) in &pending {
        let coupon = coupons.get(coupon_id);
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
            stock_taken.push((*coupon_id, issued_now));
        }
        for ((position, request), decision) in requests.iter().zip(decisions) {
            outcomes[*position] = RequestOutcome::Decided {
                decision,
                coupon_history_id: None,
            };
            if decision == IssueDecision::Issue {
                issued_rows.push((*coupon_id, *request));
            }
        }
    }
    let history_ids = match insert_histories(connection, &issued_rows).await {
        Err(CouponStoreError::Database(error)) if is_duplicate_key(&error) => {
            return Err(CouponStoreError::StaleDecision);
        }
        inserted => inserted?,
    };

    let mut issued_requests = Vec::new();
    let mut refused_requests: BTreeMap<RefusalReason, Vec<EventId>> = BTreeMap::new();
    let mut results = Vec::new();
    for (position, item) in batch.iter().enumerate() {
        let RequestOutcome::Decided { decision, .. } = outcomes[position] else {
            continue;
        };
        let request = item.request;
        let coupon_history_id = history_ids.get(&request.request_id).copied();
        outcomes[position] = RequestOutcome::Decided {
            decision,
            coupon_history_id,
        };
        let reason = match decision {
            IssueDecision::Issue => {
                issued_requests.push(request.request_id);
                None
            }
            IssueDecision::Refuse(reason) => {
                refused_requests
                    .entry(reason)
                    .or_default()
                    .push(request.request_id);
                Some(reason)
            }
        };
        results.push(OutboxEvent {
            topic: topics::COUPON_RESULTS.to_string(),
            envelope: EventEnvelope::new(
                request.user_id.partition_key(),
                EventPayload::CouponResult(CouponResult {
                    request_id: request.request_id,
                    user_id: request.user_id.get(),
                    coupon_id: item.coupon_id.get(),
                    success: decision == IssueDecision::Issue,
                    coupon_history_id,
                    reason,
                }),
            ),
        });
    }
    // A success's coupon history is found by its request id; a refusal records its reason.
    EventLog::change_status_of_many_in(connection, &issued_requests, EventStatus::Completed, None)
        .await?;
    for (reason, requests) in &refused_requests {
        let result = json!({ "reason": reason });
        EventLog::change_status_of_many_in(
            connection,
            requests,
            EventStatus::Failed,
            Some(&result),
        )
        .await?;
    }
    EventLog::insert_pending(connection, &results).await?;

    // Last, in coupon order: from here to the commit the coupon rows are locked.
    for (coupon_id, count) in stock_taken {
        if !take_stock(connection, coupon_id, count).await? {
            return Err(match locking {
                Locking::Optimistic => CouponStoreError::StaleDecision,
                Locking::Pessimistic => CouponStoreError::StockInvariant(coupon_id),
            });
        }
    }
    Ok(IssuedBatch { outcomes, results })
}

fn is_duplicate_key(error: &sqlx::Error) -> bool {
    const DUPLICATE_ENTRY: u16 = 1062;
    error
        .as_database_error()
        .and_then(|error| error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|error| error.number() == DUPLICATE_ENTRY)
}

/// Reads the coupon rows, locking them (in key order, so concurrent batches cannot deadlock
/// on them) when pessimistic.
async fn read_coupons(
    connection: &mut MySqlConnection,
    coupon_ids: Vec<CouponId>,
    locking: Locking,
) -> Result<BTreeMap<CouponId, CouponState>, CouponStoreError> {
    let mut select = QueryBuilder::new(
        "SELECT coupon_id, total_quantity, issued_quantity, valid_from, valid_until \
         FROM coupon WHERE coupon_id IN (",
    );
    let mut separated = select.separated(", ");
    for coupon_id in &coupon_ids {
        separated.push_bind(coupon_id.get());
    }
    select.push(") ORDER BY coupon_id");
    if locking == Locking::Pessimistic {
        select.push(" FOR UPDATE");
    }
    let rows = select.build().fetch_all(&mut *connection).await?;
    rows.iter()
        .map(|row| {
            let coupon_id = CouponId(row.try_get("coupon_id")?);
            Ok((
                coupon_id,
                CouponState {
                    coupon_id,
                    total_quantity: row.try_get("total_quantity")?,
                    issued_quantity: row.try_get("issued_quantity")?,
                    valid_from: row.try_get("valid_from")?,
                    valid_until: row.try_get("valid_until")?,
                },
            ))
        })
        .collect()
}

/// Which of `users` already hold `coupon_id`.
async fn holders_among(
    connection: &mut MySqlConnection,
    coupon_id: CouponId,
    users: &[UserId],
) -> Result<BTreeSet<UserId>, CouponStoreError> {
    let mut select = QueryBuilder::new("SELECT user_id FROM coupon_history WHERE coupon_id = ");
    select.push_bind(coupon_id.get()).push(" AND user_id IN (");
    let mut separated = select.separated(", ");
    for user in users {
        separated.push_bind(user.get());
    }
    select.push(")");
    let rows = select.build().fetch_all(&mut *connection).await?;
    rows.iter()
        .map(|row| Ok(UserId(row.try_get("user_id")?)))
        .collect()
}

/// Moves `count` units of stock if that many are left; the condition makes over-issuing
/// impossible whatever was decided. Returns whether it moved.
async fn take_stock(
    connection: &mut MySqlConnection,
    coupon_id: CouponId,
    count: u32,
) -> Result<bool, CouponStoreError> {
    let updated = sqlx::query(
        "UPDATE coupon SET issued_quantity = issued_quantity + ? \
         WHERE coupon_id = ? AND issued_quantity + ? <= total_quantity",
    )
    .bind(count)
    .bind(coupon_id.get())
    .bind(count)
    .execute(&mut *connection)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Inserts the histories and returns their ids by request.
async fn insert_histories(
    connection: &mut MySqlConnection,
    issued: &[(CouponId, IssueRequest)],
) -> Result<BTreeMap<EventId, u64>, CouponStoreError> {
    if issued.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut insert = QueryBuilder::new(
        "INSERT INTO coupon_history (coupon_id, user_id, request_id, issued_at) ",
    );
    insert.push_values(issued, |mut row, (coupon_id, request)| {
        row.push_bind(coupon_id.get())
            .push_bind(request.user_id.get())
            .push_bind(request.request_id.to_string())
            .push("NOW(6)");
    });
    insert.build().execute(&mut *connection).await?;

    let mut select = QueryBuilder::new(
        "SELECT coupon_history_id, request_id FROM coupon_history WHERE request_id IN (",
    );
    let mut separated = select.separated(", ");
    for (_, request) in issued {
        separated.push_bind(request.request_id.to_string());
    }
    select.push(")");
    let rows = select.build().fetch_all(&mut *connection).await?;
    rows.iter()
        .map(|row| {
            let request_id: String = row.try_get("request_id")?;
            let request_id = request_id
                .parse()
                .map_err(|_| EventLogError::CorruptRow(format!("request id {request_id:?}")))?;
            Ok((request_id, row.try_get("coupon_history_id")?))
        })
        .collect()
}
