//! What stands between a request and its effect: the caller's identity (bearer tokens),
//! abuse limits, and `Idempotency-Key`.

pub mod idempotency;
pub mod limits;
pub mod tokens;
