//! Coupons in MySQL: creating and reading them, and issuing a batch of requests in one
//! transaction.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{MySqlConnection, MySqlPool, QueryBuilder, Row};

use crate::coupons::{CouponId, CouponState, IssueDecision, IssueRequest, UserId, decide_issues};
use crate::error::{Classify, ErrorClass};
use crate::event_log::{EventLog, EventLogError, EventStatus, OutboxEvent, RecordedOutcome};
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
}

impl Classify for CouponStoreError {
    fn class(&self) -> ErrorClass {
        match self {
            CouponStoreError::Database(error) => error.class(),
            CouponStoreError::EventLog(error) => error.class(),
            // The coupon row is locked while deciding, so this means the decision logic is
            // wrong: stop and restart rather than guess.
            CouponStoreError::StockInvariant(_) => ErrorClass::Fatal,
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
    /// first), each coupon row is locked, [`decide_issues`] decides, the stock moves with a
    /// conditional update, histories are inserted (unique per coupon and user, and per
    /// request), the requests' event-log rows become COMPLETED or FAILED with their result,
    /// and the result events go into the outbox.
    pub async fn issue(&self, batch: &[CouponRequest]) -> Result<IssuedBatch, CouponStoreError> {
        let mut transaction = self.pool.begin().await?;
        let issued = issue_in(&mut transaction, batch).await?;
        transaction.commit().await?;
        Ok(issued)
    }
}

async fn issue_in(
    connection: &mut MySqlConnection,
    batch: &[CouponRequest],
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

    let coupons = lock_coupons(connection, pending.keys().copied().collect()).await?;
    let mut issued_rows: Vec<(CouponId, IssueRequest)> = Vec::new();
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
            take_stock(connection, *coupon_id, issued_now).await?;
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
    let history_ids = insert_histories(connection, &issued_rows).await?;

    let mut recorded = Vec::new();
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
        let (status, result, reason) = match decision {
            IssueDecision::Issue => (
                EventStatus::Completed,
                json!({ "couponHistoryId": coupon_history_id }),
                None,
            ),
            IssueDecision::Refuse(reason) => (
                EventStatus::Failed,
                json!({ "reason": reason }),
                Some(reason),
            ),
        };
        recorded.push(RecordedOutcome {
            event_id: request.request_id,
            status,
            result: Some(result),
        });
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
    EventLog::record_outcomes_in(connection, &recorded).await?;
    EventLog::insert_pending(connection, &results).await?;
    Ok(IssuedBatch { outcomes, results })
}

/// Locks the coupon rows (in key order, so concurrent batches cannot deadlock on them).
async fn lock_coupons(
    connection: &mut MySqlConnection,
    coupon_ids: Vec<CouponId>,
) -> Result<BTreeMap<CouponId, CouponState>, CouponStoreError> {
    let mut select = QueryBuilder::new(
        "SELECT coupon_id, total_quantity, issued_quantity, valid_from, valid_until \
         FROM coupon WHERE coupon_id IN (",
    );
    let mut separated = select.separated(", ");
    for coupon_id in &coupon_ids {
        separated.push_bind(coupon_id.get());
    }
    select.push(") ORDER BY coupon_id FOR UPDATE");
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

/// Moves `count` units of stock; the condition makes over-issuing impossible even if the
/// decision were wrong.
async fn take_stock(
    connection: &mut MySqlConnection,
    coupon_id: CouponId,
    count: u32,
) -> Result<(), CouponStoreError> {
    let updated = sqlx::query(
        "UPDATE coupon SET issued_quantity = issued_quantity + ? \
         WHERE coupon_id = ? AND issued_quantity + ? <= total_quantity",
    )
    .bind(count)
    .bind(coupon_id.get())
    .bind(count)
    .execute(&mut *connection)
    .await?;
    if updated.rows_affected() == 1 {
        Ok(())
    } else {
        Err(CouponStoreError::StockInvariant(coupon_id))
    }
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
