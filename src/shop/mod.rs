//! Users with a balance, products with stock, and orders paid from the balance.
//!
//! Payments are decided in batches ([`payments`]: group commit, as the coupon intake): one
//! transaction locks the batch's orders, coupons, products and buyers in one order, decides
//! each payment in arrival order against the locked values, and writes the payments made —
//! coupons spent, stock taken, balances debited, payment rows, orders COMPLETED and the
//! outbox rows of `OrderCompleted`, `PaymentCompleted` and the products' stock changes — all
//! or nothing. A batch that cannot be written runs again one payment per transaction
//! ([`store::ShopStore::pay`]: the order row locked first, so a second payment of the same
//! order waits, then finds it no longer PENDING). The events are published after the commit.

pub mod cache;
pub mod intake;
pub mod orders;
pub mod payments;
pub mod product_events;
pub mod store;

use serde::Serialize;

/// Why a payment was refused (HTTP 409).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentRefusal {
    #[error("the balance does not cover the amount to pay")]
    InsufficientBalance,
    #[error("a product does not have the stock the order needs")]
    InsufficientStock,
    #[error("the coupon was already used")]
    CouponAlreadyUsed,
    #[error("the coupon does not belong to the order's user")]
    CouponNotOwned,
    #[error("the order is not PENDING (paid already?)")]
    OrderNotPending,
}

impl PaymentRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            PaymentRefusal::InsufficientBalance => "INSUFFICIENT_BALANCE",
            PaymentRefusal::InsufficientStock => "INSUFFICIENT_STOCK",
            PaymentRefusal::CouponAlreadyUsed => "COUPON_ALREADY_USED",
            PaymentRefusal::CouponNotOwned => "COUPON_NOT_OWNED",
            PaymentRefusal::OrderNotPending => "ORDER_NOT_PENDING",
        }
    }
}

/// The amounts of an order: the items' total, the coupon's discount (never more than the
/// total), and what is left to pay.
pub fn order_amounts(total: u64, coupon_discount: Option<u64>) -> (u64, u64, u64) {
    let discount = coupon_discount.unwrap_or(0).min(total);
    (total, discount, total - discount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discount_never_exceeds_the_total() {
        assert_eq!(order_amounts(10_000, None), (10_000, 0, 10_000));
        assert_eq!(order_amounts(10_000, Some(3_000)), (10_000, 3_000, 7_000));
        assert_eq!(order_amounts(2_000, Some(5_000)), (2_000, 2_000, 0));
    }
}
