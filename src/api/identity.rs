//! Who a push channel belongs to — the one place to change when channels are
//! authenticated. Today the client names its user (`?userId=` or the path) and is trusted.

use actix_web::HttpRequest;

use crate::api::error::ApiError;
use crate::ids::UserId;

pub fn channel_user(_request: &HttpRequest, claimed: i64) -> Result<UserId, ApiError> {
    Ok(UserId::parse(claimed)?)
}
