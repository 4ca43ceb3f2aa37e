//! Per-consumer progress: for every event and every consumer that must handle it, where it
//! stands.
//!
//! Each consumer records its progress where it records its effect, so that the two cannot
//! disagree and the fast paths pay no extra write:
//!
//! | consumer (group)                              | events            | progress recorded in |
//! |-----------------------------------------------|-------------------|----------------------|
//! | CouponIssuer (`coupon-request-group`)         | `CouponRequested` | the event-log row, in the issuing transaction: COMPLETED (issued, or refused with its reason) |
//! | ResultNotifier (`coupon-result-notifier-*`)   | `CouponResult`    | the request's row, which holds the decision and its result's event id: NOTIFIED once an instance pushed it (a result has no row of its own) |
//! | ProductEventProcessor (`product-event-group`) | `ProductChanged`  | the row: COMPLETED after the cache write |
//! | OrderAnalytics (`order-analytics-group`)      | `OrderCompleted`  | the row: IN_PROGRESS (leased), COMPLETED, FAILED with `next_attempt_at`, DEAD_LETTER |
//! | ExternalForwarder (`external-event-group`)    | external events   | the row, as OrderAnalytics |
//! | RankingUpdater (`ranking-updater-group`)      | `OrderCompleted`  | Redis: the order's applied mark `ranking:applied:{eventId}`, set in the same script that counts it (no MySQL write at 400 k orders/s); a dead letter is a `dead_letter` row |
//!
//! Every dead letter, whoever sent it, is also a `dead_letter` row. A consumer has
//! **settled** an event when its effect is done (COMPLETED, NOTIFIED, counted), when the
//! event is dead-lettered, or when a retry of it is scheduled or leased (the retry
//! scheduler owns it then). An event published long ago that a consumer has not settled,
//! although its group has read past it, is stranded: the reconciler drives it again. How a
//! consumer's progress is read is its settlement (`outbox/settlement.rs`), which the slices
//! implement for the consumers that record it outside the event's row.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::event_log::{EventRecord, EventStatus};

/// Where a consumer records its progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum RecordedIn {
    /// The event-log row's status, retry count, last error and schedule.
    EventLog,
    /// The ranking's applied marks in Redis.
    RankingMarks,
    /// The row of the event that led to the consumer's event: a coupon result is recorded
    /// in its request's row (the decision in `result`, with the result's event id), and
    /// its push moves that row from COMPLETED to NOTIFIED.
    RequestRow,
}

/// One consumer of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerSpec {
    /// The domain actor's name (`CouponIssuer`, ...): also the reconciler's checkpoint key.
    pub name: &'static str,
    /// The full consumer group id of this instance.
    pub group_id: String,
    pub topic: &'static str,
    pub recorded_in: RecordedIn,
}

/// Whether the consumer whose progress is the row has settled the event.
pub fn row_settled(status: EventStatus, next_attempt_at: Option<DateTime<Utc>>) -> bool {
    match status {
        EventStatus::Completed | EventStatus::Notified | EventStatus::DeadLetter => true,
        // The retry scheduler owns it: an attempt is due, or leased to an instance.
        EventStatus::Failed | EventStatus::InProgress => next_attempt_at.is_some(),
        EventStatus::Pending | EventStatus::Published => false,
    }
}

/// Where one consumer stands with one event, as `GET /admin/events/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerProgress {
    pub consumer: &'static str,
    pub group_id: String,
    pub recorded_in: RecordedIn,
    pub status: EventStatus,
    pub settled: bool,
    /// Delivery attempts that failed (scheduled retries); in-place retries are not counted.
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

impl ConsumerProgress {
    /// The progress of a consumer that records it in the event's row.
    pub fn from_row(consumer: &ConsumerSpec, record: &EventRecord) -> Self {
        Self {
            consumer: consumer.name,
            group_id: consumer.group_id.clone(),
            recorded_in: RecordedIn::EventLog,
            status: record.status,
            settled: row_settled(record.status, record.next_attempt_at),
            attempts: record.retry_count,
            last_error: record.last_error.clone(),
            next_attempt_at: record.next_attempt_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_settled_when_done_dead_or_owned_by_the_retry_scheduler() {
        let at = Some(Utc::now());
        assert!(row_settled(EventStatus::Completed, None));
        assert!(row_settled(EventStatus::Notified, None));
        assert!(row_settled(EventStatus::DeadLetter, None));
        assert!(row_settled(EventStatus::Failed, at));
        assert!(row_settled(EventStatus::InProgress, at));
        assert!(!row_settled(EventStatus::Published, None));
        assert!(!row_settled(EventStatus::Pending, None));
        assert!(!row_settled(EventStatus::InProgress, None));
    }
}
