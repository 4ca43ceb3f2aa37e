//! A coupon request's decision as its event-log row records it, and the `CouponResult`
//! event that announces it.
//!
//! A result has no row of its own: the issuer writes the decision into the request's row
//! (`result`, with the result's event id, in the transaction that decides), publishes the
//! result after the commit, and the notifier's push moves the request on to NOTIFIED. So
//! the request's row holds everything the result event is made of, and the event is rebuilt
//! from it, with the same id, when it must be published again (the reconciler) or read again
//! (a reconnecting push channel).

use serde::{Deserialize, Serialize};

use crate::common::ids::{CouponHistoryId, RequestId};
use crate::coupons::RefusalReason;
use crate::event_log::{EventRecord, EventStatus};
use crate::events::{CouponResult, EventEnvelope, EventId, EventPayload};

/// The `result` of a decided coupon request's row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedDecision {
    /// The event id of the request's `CouponResult` (absent in rows decided before results
    /// were recorded in their requests' rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_event_id: Option<EventId>,
    /// The coupon history of an issued request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coupon_history_id: Option<CouponHistoryId>,
    /// Why a refused request got no coupon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RefusalReason>,
}

impl RecordedDecision {
    /// The decision of a result event.
    pub fn of(result_event_id: EventId, result: &CouponResult) -> Self {
        Self {
            result_event_id: Some(result_event_id),
            coupon_history_id: result.coupon_history_id,
            reason: result.reason,
        }
    }

    /// The decision a request's row records, if it is decided and records one.
    pub fn recorded_in(record: &EventRecord) -> Option<Self> {
        let decided = matches!(
            record.status,
            EventStatus::Completed | EventStatus::Notified
        );
        if !decided || record.event_type != crate::events::EventType::CouponRequested {
            return None;
        }
        record
            .result
            .as_ref()
            .and_then(|result| serde_json::from_value(result.clone()).ok())
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::to_value(self).expect("a decision serializes")
    }
}

/// The result event of a decided request's row, as the issuer published it (same id, key,
/// payload and trace), when the row records its result's event id.
pub fn result_event(record: &EventRecord) -> Option<EventEnvelope> {
    let decision = RecordedDecision::recorded_in(record)?;
    let event_id = decision.result_event_id?;
    let EventPayload::CouponRequested(request) = &record.payload else {
        return None;
    };
    Some(EventEnvelope {
        event_id,
        key: record.key.clone(),
        occurred_at: event_id.generated_at().unwrap_or(record.updated_at),
        payload: EventPayload::CouponResult(CouponResult {
            request_id: RequestId::of_event(record.event_id),
            user_id: request.user_id,
            coupon_id: request.coupon_id,
            success: decision.reason.is_none(),
            coupon_history_id: decision.coupon_history_id,
            reason: decision.reason,
        }),
        traceparent: record.traceparent.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issue_records_no_reason_and_a_refusal_no_history() {
        let id = EventId::generate();
        let issued = RecordedDecision {
            result_event_id: Some(id),
            coupon_history_id: Some(CouponHistoryId::from_u64(7).unwrap()),
            reason: None,
        };
        assert_eq!(
            issued.to_json(),
            serde_json::json!({"resultEventId": id.to_string(), "couponHistoryId": 7})
        );
        let refused = RecordedDecision {
            result_event_id: Some(id),
            coupon_history_id: None,
            reason: Some(RefusalReason::OutOfStock),
        };
        assert_eq!(
            refused.to_json(),
            serde_json::json!({"resultEventId": id.to_string(), "reason": "OUT_OF_STOCK"})
        );
        let legacy: RecordedDecision =
            serde_json::from_value(serde_json::json!({"reason": "EXPIRED"})).unwrap();
        assert_eq!(legacy.result_event_id, None);
    }
}
