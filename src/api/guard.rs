//! Abuse limits at the HTTP edge: rate limits per user (on the routes that write in a
//! user's name) or per client address, and the `Idempotency-Key` header.

use actix_web::{HttpRequest, HttpResponse};

use crate::api::AppState;
use crate::api::auth::{Caller, client_address};
use crate::api::error::ApiError;
use crate::config::RateLimit;
use crate::guards::idempotency::{IdempotencyKey, StoredAnswer};
use crate::guards::limits::Decision;

/// The header a client names its retries with.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Counts a caller's request against the limit `name` (429 `RATE_LIMITED` past it).
pub async fn limit_user(
    state: &AppState,
    name: &str,
    caller: &Caller,
    limit: RateLimit,
) -> Result<(), ApiError> {
    decided(
        state
            .limits
            .limiter
            .check(&format!("{name}:user:{}", caller.user()), limit)
            .await,
    )
}

/// Counts a request without a token against the anonymous limit of its client address.
pub async fn limit_anonymous(state: &AppState, request: &HttpRequest) -> Result<(), ApiError> {
    let Some(address) = client_address(request, &state.limits.trusted_proxy_header) else {
        return Ok(());
    };
    decided(
        state
            .limits
            .limiter
            .check(
                &format!("anonymous:{address}"),
                state.limits.settings.anonymous,
            )
            .await,
    )
}

fn decided(decision: Decision) -> Result<(), ApiError> {
    match decision {
        Decision::Allowed => Ok(()),
        Decision::Limited { retry_after } => Err(ApiError::RateLimited { retry_after }),
    }
}

/// The request's `Idempotency-Key`, if it sent one, bound to the caller, the route and
/// what identifies the request (`request`: path ids and body).
pub fn idempotency_key(
    request: &HttpRequest,
    caller: &Caller,
    route: &'static str,
    identity_of_request: &[u8],
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = request.headers().get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .and_then(|key| IdempotencyKey::new(caller.user(), route, key, identity_of_request).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_IDEMPOTENCY_KEY",
                "Idempotency-Key must have 1 to 128 visible ASCII characters",
            )
        })?;
    Ok(Some(key))
}

/// The `Idempotency-Key` header as the document describes it, for the routes that replay
/// a retry's first answer (`params(IdempotencyKeyHeader)`).
pub struct IdempotencyKeyHeader;

impl utoipa::IntoParams for IdempotencyKeyHeader {
    fn into_params(
        _parameter_in: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::{ObjectBuilder, Required, schema::Type};
        let key = ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(128))
            .pattern(Some("^[!-~]+$"));
        vec![
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .description(Some(
                    "Names this request's retries: 1 to 128 visible ASCII characters; a retry \
                     with the same key gets the first answer again (`Idempotent-Replay: true`).",
                ))
                .required(Required::False)
                .schema(Some(key))
                .build(),
        ]
    }
}

/// 422 for a key reused with another request.
pub fn key_reused() -> ApiError {
    ApiError::Unprocessable {
        code: "IDEMPOTENCY_KEY_REUSED",
        message: "this Idempotency-Key was used with another request".into(),
    }
}

/// A stored answer, sent again.
pub fn replay(answer: &StoredAnswer) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(answer.status)
        .unwrap_or(actix_web::http::StatusCode::OK);
    HttpResponse::build(status)
        .content_type("application/json")
        .insert_header(("idempotent-replay", "true"))
        .body(answer.body.clone())
}
