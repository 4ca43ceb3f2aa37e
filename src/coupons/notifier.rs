//! The ResultNotifier: the domain actor of `coupon-results`.
//!
//! Every daemon instance consumes the results with a consumer group of its own, so a user
//! connected to any instance gets the push. For each result it pushes
//! `{"type": "COUPON_RESULT", ...}` to the user's open sessions on this instance, then marks
//! the request NOTIFIED (once, whichever instance is first: a conditional update). The result
//! events themselves are broadcast to every instance, so their rows stay PUBLISHED; the
//! request's row carries the outcome. A result redelivered to the same instance is pushed
//! again; clients recognise it by its `requestId`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::Serialize;

use crate::actors::domain::{BatchOrigin, DomainHandler, EventOutcome, HandlerError};
use crate::coupons::UserId;
use crate::event_log::{EventLog, EventStatus};
use crate::events::{CouponResult, EventEnvelope, EventId, EventPayload};

use crate::coupons::sessions::Sessions;

/// What a session receives for a coupon result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CouponResultMessage {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub request_id: EventId,
    pub coupon_id: u64,
    pub success: bool,
    pub coupon_history_id: Option<u64>,
    pub reason: Option<crate::coupons::RefusalReason>,
}

impl From<&CouponResult> for CouponResultMessage {
    fn from(result: &CouponResult) -> Self {
        Self {
            kind: "COUPON_RESULT",
            request_id: result.request_id,
            coupon_id: result.coupon_id,
            success: result.success,
            coupon_history_id: result.coupon_history_id,
            reason: result.reason,
        }
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
    stats: Arc<Mutex<NotifierStats>>,
}

impl ResultNotifier {
    pub fn new(sessions: Sessions, event_log: EventLog) -> Self {
        Self {
            sessions,
            event_log,
            stats: Arc::default(),
        }
    }
}

impl DomainHandler for ResultNotifier {
    fn name(&self) -> &'static str {
        "ResultNotifier"
    }

    fn handle(
        &mut self,
        _origin: &BatchOrigin,
        events: Arc<[EventEnvelope]>,
    ) -> LocalBoxFuture<'static, Vec<EventOutcome>> {
        let sessions = self.sessions.clone();
        let event_log = self.event_log.clone();
        let stats = self.stats.clone();
        async move {
            let mut outcomes = Vec::with_capacity(events.len());
            let mut requests = BTreeSet::new();
            let (mut pushed, mut without_session) = (0, 0);
            for event in events.iter() {
                let EventPayload::CouponResult(result) = &event.payload else {
                    outcomes.push(EventOutcome::Failed(HandlerError::permanent(format!(
                        "{} is not a coupon result",
                        event.event_type()
                    ))));
                    continue;
                };
                let delivered = match UserId::from_u64(result.user_id) {
                    Ok(user) => {
                        let message = serde_json::to_string(&CouponResultMessage::from(result))
                            .expect("a result message serializes");
                        sessions.push(user, Arc::from(message))
                    }
                    Err(_) => 0,
                };
                if delivered > 0 {
                    pushed += 1;
                } else {
                    without_session += 1;
                }
                requests.insert(result.request_id);
                outcomes.push(EventOutcome::Done);
            }
            let requests: Vec<EventId> = requests.into_iter().collect();
            let marked = async {
                let mut connection = event_log.pool().acquire().await?;
                EventLog::change_status_of_many_in(
                    &mut connection,
                    &requests,
                    EventStatus::Notified,
                    None,
                )
                .await
            }
            .await;
            match marked {
                Ok(marked) => {
                    let mut stats = stats.lock().expect("stats lock");
                    stats.pushed += pushed;
                    stats.without_session += without_session;
                    stats.marked_notified += marked;
                    outcomes
                }
                Err(error) => {
                    vec![EventOutcome::Failed(HandlerError::from_error(&error)); events.len()]
                }
            }
        }
        .boxed_local()
    }

    fn details(&self) -> Option<serde_json::Value> {
        let stats = self.stats.lock().expect("stats lock").clone();
        Some(serde_json::to_value(stats).expect("stats serialize"))
    }
}
