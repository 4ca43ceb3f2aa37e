//! The CouponIssuer: the domain actor of `coupon-requests`.
//!
//! For each batch from a partition it takes the design document's Redis locks
//! (`coupon:{couponId}:user:{userId}`, advisory), decides and applies the whole batch in one
//! MySQL transaction ([`CouponStore::issue`]), releases the locks, answers the partition
//! actor and publishes the result events that the transaction wrote to the outbox — so a
//! success is never announced before it is committed, and a result lost between the commit
//! and the send is republished by the relay. Publishing runs beside the next batch rather
//! than before it: the results are durable in the outbox once committed. A redelivered
//! request finds its event-log row decided and changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::Serialize;
use tracing::warn;

use crate::actors::domain::{BatchOrigin, DomainHandler, EventOutcome, HandlerError};
use crate::coupons::store::{CouponRequest, CouponStore, IssuedBatch, RequestOutcome};
use crate::coupons::{CouponId, IssueDecision, IssueRequest, UserId};
use crate::events::{EventEnvelope, EventPayload};

use crate::coupons::locks::RedisLocks;
use crate::outbox::Outbox;

/// Counters shown in the admin view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerStats {
    pub issued: u64,
    /// Refusals by reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// Requests delivered again after they were decided.
    pub redelivered: u64,
    /// Lock keys another holder had (the database decided anyway).
    pub locks_contended: u64,
    /// Batches decided without locks because Redis did not answer.
    pub locks_unavailable: u64,
    pub results_published: u64,
    /// Results whose publication failed; the outbox relay republishes them.
    pub results_left_to_relay: u64,
}

pub struct CouponIssuer {
    store: CouponStore,
    outbox: Outbox,
    locks: RedisLocks,
    stats: Arc<Mutex<IssuerStats>>,
}

impl CouponIssuer {
    pub fn new(store: CouponStore, outbox: Outbox, locks: RedisLocks) -> Self {
        Self {
            store,
            outbox,
            locks,
            stats: Arc::default(),
        }
    }
}

impl DomainHandler for CouponIssuer {
    fn name(&self) -> &'static str {
        "CouponIssuer"
    }

    fn handle(
        &mut self,
        _origin: &BatchOrigin,
        events: Arc<[EventEnvelope]>,
    ) -> LocalBoxFuture<'static, Vec<EventOutcome>> {
        let store = self.store.clone();
        let outbox = self.outbox.clone();
        let locks = self.locks.clone();
        let stats = self.stats.clone();
        async move {
            let parsed: Vec<Result<CouponRequest, HandlerError>> =
                events.iter().map(coupon_request).collect();
            let requests: Vec<CouponRequest> = parsed
                .iter()
                .filter_map(|parsed| parsed.clone().ok())
                .collect();

            let keys: BTreeSet<String> = requests
                .iter()
                .map(|request| {
                    locks.coupon_user_key(request.coupon_id.get(), request.request.user_id.get())
                })
                .collect();
            let held = match locks.acquire(keys.into_iter().collect()).await {
                Ok(held) => Some(held),
                Err(error) => {
                    warn!(%error, "coupon locks unavailable; deciding on the database alone");
                    stats.lock().expect("stats lock").locks_unavailable += 1;
                    None
                }
            };
            let contended = held.as_ref().map_or(0, |held| held.contended as u64);
            let issued = store.issue(&requests).await;
            if let Some(held) = held
                && let Err(error) = locks.release(held).await
            {
                warn!(%error, "coupon locks not released; they expire on their own");
            }

            let outcomes = match issued {
                Ok(batch) => {
                    {
                        let mut stats = stats.lock().expect("stats lock");
                        stats.locks_contended += contended;
                        record(&mut stats, &batch);
                    }
                    let outcomes = batch.outcomes.iter().map(outcome_of).collect();
                    let stats = stats.clone();
                    actix_rt::spawn(async move {
                        let publication = outbox.publish_committed(&batch.results).await;
                        let mut stats = stats.lock().expect("stats lock");
                        stats.results_published += publication.published;
                        stats.results_left_to_relay += publication.failed;
                    });
                    outcomes
                }
                Err(error) => {
                    vec![EventOutcome::Failed(HandlerError::from_error(&error)); requests.len()]
                }
            };
            merge(parsed, outcomes)
        }
        .boxed_local()
    }

    fn details(&self) -> Option<serde_json::Value> {
        let stats = self.stats.lock().expect("stats lock").clone();
        Some(serde_json::to_value(stats).expect("stats serialize"))
    }
}

fn coupon_request(event: &EventEnvelope) -> Result<CouponRequest, HandlerError> {
    let EventPayload::CouponRequested(payload) = &event.payload else {
        return Err(HandlerError::permanent(format!(
            "{} is not a coupon request",
            event.event_type()
        )));
    };
    let invalid = |error: crate::coupons::InvalidId| HandlerError::permanent(error.to_string());
    Ok(CouponRequest {
        coupon_id: CouponId::from_u64(payload.coupon_id).map_err(invalid)?,
        request: IssueRequest {
            request_id: event.event_id,
            user_id: UserId::from_u64(payload.user_id).map_err(invalid)?,
            requested_at: event.occurred_at,
        },
    })
}

fn outcome_of(outcome: &RequestOutcome) -> EventOutcome {
    match outcome {
        RequestOutcome::Decided { .. } => EventOutcome::Done,
        RequestOutcome::AlreadyDecided => EventOutcome::Duplicate,
        RequestOutcome::NotRecorded => EventOutcome::Failed(HandlerError::permanent(
            "the request has no event-log row: it was not accepted through the intake",
        )),
    }
}

fn record(stats: &mut IssuerStats, batch: &IssuedBatch) {
    for outcome in &batch.outcomes {
        match outcome {
            RequestOutcome::Decided {
                decision: IssueDecision::Issue,
                ..
            } => stats.issued += 1,
            RequestOutcome::Decided {
                decision: IssueDecision::Refuse(reason),
                ..
            } => *stats.refused.entry(reason.as_str()).or_default() += 1,
            RequestOutcome::AlreadyDecided => stats.redelivered += 1,
            RequestOutcome::NotRecorded => {}
        }
    }
}

/// Puts the outcomes of the valid requests back among the events that were refused before
/// reaching the store, in event order.
fn merge(
    parsed: Vec<Result<CouponRequest, HandlerError>>,
    outcomes: Vec<EventOutcome>,
) -> Vec<EventOutcome> {
    let mut outcomes = outcomes.into_iter();
    parsed
        .into_iter()
        .map(|parsed| match parsed {
            Ok(_) => outcomes.next().expect("one outcome per valid request"),
            Err(error) => EventOutcome::Failed(error),
        })
        .collect()
}
