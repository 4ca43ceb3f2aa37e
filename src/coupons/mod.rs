//! First-come-first-served coupons: the identifiers, the coupon's state and the pure
//! decision of who gets one.
//!
//! Every decision is made by [`decide_issues`] over plain data; the CouponIssuer actor only
//! reads the state, calls it and writes the effects in one transaction
//! ([`store::CouponStore::issue`]).

pub mod intake;
pub mod issuer;
pub mod locks;
pub mod notifier;
pub mod owners;
pub mod results;
pub mod sessions;
pub mod settlement;
pub mod store;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::common::ids::{CouponId, RequestId, UserId};
pub use crate::events::RefusalReason;

/// What the issuer knows of a coupon when it decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CouponState {
    pub coupon_id: CouponId,
    pub total_quantity: u32,
    pub issued_quantity: u32,
    pub valid_from: DateTime<Utc>,
    pub valid_until: DateTime<Utc>,
}

impl CouponState {
    pub fn remaining(&self) -> u32 {
        self.total_quantity.saturating_sub(self.issued_quantity)
    }
}

/// One request to decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssueRequest {
    pub request_id: RequestId,
    pub user_id: UserId,
    /// When the request was accepted; validity is judged at this instant, so a request
    /// accepted in time is not refused because it waited in a queue.
    pub requested_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(
    tag = "decision",
    content = "reason",
    rename_all = "SCREAMING_SNAKE_CASE"
)]
pub enum IssueDecision {
    Issue,
    Refuse(RefusalReason),
}

/// Decides, in order, the requests for one coupon. `coupon` is `None` when it does not
/// exist; `holders` are the users who already hold it. First come, first served: stock goes
/// to the earliest requests, and a user's second request in the same batch is a duplicate.
pub fn decide_issues(
    coupon: Option<&CouponState>,
    holders: &BTreeSet<UserId>,
    requests: &[IssueRequest],
) -> Vec<IssueDecision> {
    let Some(coupon) = coupon else {
        return vec![IssueDecision::Refuse(RefusalReason::CouponNotFound); requests.len()];
    };
    let mut remaining = coupon.remaining();
    let mut issued_now = BTreeSet::new();
    requests
        .iter()
        .map(|request| {
            let refusal = if request.requested_at < coupon.valid_from {
                Some(RefusalReason::NotStarted)
            } else if request.requested_at >= coupon.valid_until {
                Some(RefusalReason::Expired)
            } else if holders.contains(&request.user_id) || issued_now.contains(&request.user_id) {
                Some(RefusalReason::AlreadyIssued)
            } else if remaining == 0 {
                Some(RefusalReason::OutOfStock)
            } else {
                None
            };
            match refusal {
                Some(reason) => IssueDecision::Refuse(reason),
                None => {
                    remaining -= 1;
                    issued_now.insert(request.user_id);
                    IssueDecision::Issue
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, hour, 0, 0).unwrap()
    }

    fn coupon(total: u32, issued: u32) -> CouponState {
        CouponState {
            coupon_id: CouponId::parse(7).unwrap(),
            total_quantity: total,
            issued_quantity: issued,
            valid_from: at(9),
            valid_until: at(18),
        }
    }

    fn request(user: i64, hour: u32) -> IssueRequest {
        IssueRequest {
            request_id: RequestId::generate(),
            user_id: UserId::parse(user).unwrap(),
            requested_at: at(hour),
        }
    }

    /// The users who hold the coupon already: `user` alone.
    fn holders(user: i64) -> BTreeSet<UserId> {
        BTreeSet::from([UserId::parse(user).unwrap()])
    }

    use IssueDecision::{Issue, Refuse};
    use RefusalReason::*;

    #[test]
    fn stock_goes_to_the_earliest_requests() {
        let decisions = decide_issues(
            Some(&coupon(3, 1)),
            &BTreeSet::new(),
            &[request(1, 10), request(2, 10), request(3, 10)],
        );
        assert_eq!(decisions, vec![Issue, Issue, Refuse(OutOfStock)]);
    }

    #[test]
    fn a_user_gets_one_coupon_whatever_the_number_of_requests() {
        let decisions = decide_issues(
            Some(&coupon(10, 1)),
            &holders(1),
            &[request(1, 10), request(2, 10), request(2, 11)],
        );
        assert_eq!(
            decisions,
            vec![Refuse(AlreadyIssued), Issue, Refuse(AlreadyIssued)]
        );
    }

    #[test]
    fn validity_is_judged_when_the_request_was_made() {
        let decisions = decide_issues(
            Some(&coupon(10, 0)),
            &BTreeSet::new(),
            &[request(1, 8), request(2, 9), request(3, 17), request(4, 18)],
        );
        assert_eq!(
            decisions,
            vec![Refuse(NotStarted), Issue, Issue, Refuse(Expired)]
        );
    }

    #[test]
    fn an_unknown_coupon_refuses_everything() {
        let decisions = decide_issues(None, &BTreeSet::new(), &[request(1, 10), request(2, 10)]);
        assert_eq!(decisions, vec![Refuse(CouponNotFound); 2]);
    }

    #[test]
    fn a_sold_out_coupon_still_reports_duplicates_as_duplicates() {
        let decisions = decide_issues(
            Some(&coupon(1, 1)),
            &holders(1),
            &[request(1, 10), request(2, 10)],
        );
        assert_eq!(decisions, vec![Refuse(AlreadyIssued), Refuse(OutOfStock)]);
    }
}
