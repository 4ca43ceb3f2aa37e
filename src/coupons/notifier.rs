//! The ResultNotifier: the domain actor of `coupon-results`.
//!
//! Every daemon instance consumes the results with a consumer group of its own, so a user
//! connected to any instance gets the push. For each result it pushes
//! `{"type": "COUPON_RESULT", ...}` to the user's open sessions on this instance, then marks
//! the request's row NOTIFIED (once, whichever instance is first: a conditional update). A
//! result has no row of its own (see [`crate::coupons::results`]): the request's row is this
//! consumer's progress, and a request still COMPLETED (decided, not pushed) after its
//! instance's group has read past where its result would be is one whose result no instance
//! saw, which the reconciler publishes again from the row. A result redelivered to the same
//! instance is pushed again; clients recognise it by its `eventId`.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;

use crate::actors::domain::{Batch, DomainHandler, EventOutcome, HandlerError, Stats};
use crate::common::ids::{CouponHistoryId, CouponId, RequestId};
use crate::coupons::RefusalReason;
use crate::coupons::sessions::{PushMessage, Sessions};
use crate::event_log::{EventLog, Move, StatusChange};
use crate::events::{CouponResult, EventId, EventPayload};
use crate::observability::metrics;

/// What a session receives for a coupon result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CouponResultMessage {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The result's event id: a reconnecting client resumes after the last one it saw.
    pub event_id: EventId,
    pub request_id: RequestId,
    pub coupon_id: CouponId,
    pub success: bool,
    pub coupon_history_id: Option<CouponHistoryId>,
    pub reason: Option<RefusalReason>,
}

/// What a result's sessions receive.
pub fn push_message(event_id: EventId, result: &CouponResult) -> PushMessage {
    let message = CouponResultMessage {
        kind: "COUPON_RESULT",
        event_id,
        request_id: result.request_id,
        coupon_id: result.coupon_id,
        success: result.success,
        coupon_history_id: result.coupon_history_id,
        reason: result.reason,
    };
    PushMessage {
        id: event_id,
        json: Arc::from(serde_json::to_string(&message).expect("a result message serializes")),
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NotifierStats {
    /// Results handed to at least one session.
    pub pushed: u64,
    /// Results for users with no session on this instance.
    pub without_session: u64,
    /// Requests this instance moved to NOTIFIED.
    pub marked_notified: u64,
}

pub struct ResultNotifier {
    sessions: Sessions,
    event_log: EventLog,
}

impl ResultNotifier {
    pub fn new(sessions: Sessions, event_log: EventLog) -> Self {
        Self {
            sessions,
            event_log,
        }
    }
}

impl DomainHandler for ResultNotifier {
    type Stats = NotifierStats;

    fn name(&self) -> &'static str {
        "ResultNotifier"
    }

    async fn handle(&self, batch: &Batch, stats: &Stats<NotifierStats>) -> Vec<EventOutcome> {
        let mut outcomes = Vec::with_capacity(batch.events.len());
        let mut requests = BTreeSet::new();
        let (mut pushed, mut without_session) = (0, 0);
        for event in batch.events.iter() {
            let EventPayload::CouponResult(result) = &event.payload else {
                outcomes.push(EventOutcome::Failed(HandlerError::not_for_this_handler(
                    event,
                    "a coupon result",
                )));
                continue;
            };
            let sessions = self
                .sessions
                .push(result.user_id, push_message(event.event_id, result));
            if sessions > 0 {
                metrics::push_sent(sessions);
                if let Some(accepted_at) = result.request_id.accepted_at() {
                    metrics::coupon_pushed(accepted_at);
                }
                pushed += 1;
            } else {
                without_session += 1;
            }
            requests.insert(EventId::from(result.request_id));
            outcomes.push(EventOutcome::Done);
        }
        let requests: Vec<EventId> = requests.into_iter().collect();
        // The request's row records this consumer's progress: NOTIFIED (pushed by some
        // instance), the design document's last state of a request.
        let marked = async {
            let mut connection = self.event_log.pool().acquire().await?;
            EventLog::change_status_of_many_in(
                &mut connection,
                &requests,
                StatusChange::new(Move::Notify),
            )
            .await
        }
        .await;
        match marked {
            Ok(marked) => {
                stats.update(|stats| {
                    stats.pushed += pushed;
                    stats.without_session += without_session;
                    stats.marked_notified += marked;
                });
                outcomes
            }
            Err(error) => {
                vec![EventOutcome::Failed(HandlerError::from_error(&error)); batch.events.len()]
            }
        }
    }
}
