//! The CouponIssuer: the domain actor of `coupon-requests`.
//!
//! For each batch from a partition it takes the design document's Redis locks
//! (`coupon:{couponId}:user:{userId}`, advisory), decides and applies the whole batch in one
//! MySQL transaction ([`CouponStore::issue`]: each request's row records its decision and
//! the id of the result event announcing it), releases the locks, answers the partition
//! actor and publishes the result events — so a success is never announced before it is
//! committed, and a result lost between the commit and the send is published again from
//! its request's row by the reconciler (see [`crate::coupons::results`]). Publishing runs
//! beside the next batch rather than before it: the results are durable in the requests'
//! rows once committed. A redelivered request finds its event-log row decided and changes
//! nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tracing::warn;

use crate::actors::domain::{Batch, DomainHandler, EventOutcome, HandlerError, Stats};
use crate::coupons::IssueDecision;
use crate::coupons::locks::RedisLocks;
use crate::coupons::owners::{Ownership, PartitionOwners};
use crate::coupons::store::{CouponRequest, CouponStore, CouponStoreError, RequestOutcome};
use crate::events::EventEnvelope;
use crate::observability::metrics;

/// Counters shown in the admin view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerStats {
    pub issued: u64,
    /// Refusals by reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// Requests delivered again after they were decided.
    pub redelivered: u64,
    /// Requests decided ahead of their own records, with a later request of the same user
    /// whose record came first (their records then count as redelivered).
    pub decided_ahead: u64,
    /// Batches of an owner that lost its partition, not decided (see
    /// [`crate::coupons::owners`]).
    pub batches_fenced: u64,
    /// Lock keys another holder had (the database decided anyway).
    pub locks_contended: u64,
    /// Batches decided without locks because Redis did not answer.
    pub locks_unavailable: u64,
    pub results_published: u64,
    /// Results whose publication failed; the reconciler publishes them again from their
    /// requests' rows.
    pub results_left_to_reconciler: u64,
}

pub struct CouponIssuer {
    store: CouponStore,
    locks: RedisLocks,
    owners: PartitionOwners,
}

impl CouponIssuer {
    pub fn new(store: CouponStore, locks: RedisLocks, owners: PartitionOwners) -> Self {
        Self {
            store,
            locks,
            owners,
        }
    }
}

impl DomainHandler for CouponIssuer {
    type Stats = IssuerStats;

    fn name(&self) -> &'static str {
        "CouponIssuer"
    }

    async fn handle(&self, batch: &Batch, stats: &Stats<IssuerStats>) -> Vec<EventOutcome> {
        let fence = match self.owners.fence_for(&batch.origin).await {
            Ok(Ownership::Owner(fence)) => fence,
            Ok(Ownership::Stale) => return fenced(batch, stats),
            Err(error) => {
                let failed = EventOutcome::Failed(HandlerError::from_error(&error));
                return vec![failed; batch.events.len()];
            }
        };
        let parsed: Vec<Result<CouponRequest, HandlerError>> =
            batch.events.iter().map(coupon_request).collect();
        let requests: Vec<CouponRequest> = parsed
            .iter()
            .filter_map(|parsed| parsed.clone().ok())
            .collect();

        let keys: BTreeSet<String> = requests
            .iter()
            .map(|request| {
                self.locks
                    .coupon_user_key(request.coupon_id, request.request.user_id)
            })
            .collect();
        let held = match self.locks.acquire(keys.into_iter().collect()).await {
            Ok(held) => Some(held),
            Err(error) => {
                warn!(%error, "coupon locks unavailable; deciding on the database alone");
                stats.update(|stats| stats.locks_unavailable += 1);
                None
            }
        };
        let contended = held.as_ref().map_or(0, |held| held.contended as u64);
        let issued = self
            .store
            .issue(
                &requests,
                batch.origin.source.partition.unsigned_abs(),
                Some(&fence),
            )
            .await;
        if let Some(held) = held
            && let Err(error) = self.locks.release(held).await
        {
            warn!(%error, "coupon locks not released; they expire on their own");
        }

        let outcomes = match issued {
            Ok(batch) => {
                let outcomes = batch.outcomes.iter().map(outcome_of).collect();
                for (request, outcome) in requests.iter().zip(&batch.outcomes) {
                    if let RequestOutcome::Decided { decision, .. } = outcome {
                        metrics::coupon_decided(
                            request.request.requested_at,
                            *decision == IssueDecision::Issue,
                        );
                    }
                }
                stats.update(|stats| {
                    stats.locks_contended += contended;
                    stats.decided_ahead += batch.decided_ahead as u64;
                    record(stats, &batch.outcomes);
                });
                // Publishing runs beside the next batch: the results are durable once
                // committed, and the reconciler covers a failure.
                let stats = stats.clone();
                actix_rt::spawn(async move {
                    let publication = batch.results.publish().await;
                    stats.update(|stats| {
                        stats.results_published += publication.published;
                        stats.results_left_to_reconciler += publication.failed;
                    });
                });
                outcomes
            }
            Err(CouponStoreError::Fenced) => return fenced(batch, stats),
            Err(error) => {
                vec![EventOutcome::Failed(HandlerError::from_error(&error)); requests.len()]
            }
        };
        merge(parsed, outcomes)
    }
}

/// A batch from an owner that lost its partition: nothing decided, no failure counted.
fn fenced(batch: &Batch, stats: &Stats<IssuerStats>) -> Vec<EventOutcome> {
    warn!(source = %batch.origin.source, "batch of an owner that lost its partition: not decided");
    stats.update(|stats| stats.batches_fenced += 1);
    vec![EventOutcome::Fenced; batch.events.len()]
}

fn coupon_request(event: &EventEnvelope) -> Result<CouponRequest, HandlerError> {
    CouponRequest::of_event(event)
        .ok_or_else(|| HandlerError::not_for_this_handler(event, "a coupon request"))
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

fn record(stats: &mut IssuerStats, outcomes: &[RequestOutcome]) {
    for outcome in outcomes {
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
