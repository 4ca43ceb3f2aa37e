//! The one error body of the HTTP API: `{"error": {"code": "...", "message": "..."}}`, with
//! an optional `details` object. Every 4xx and 5xx response the server can shape has it,
//! including the ones actix-web produces itself (malformed JSON, unknown route, wrong
//! method, body too large).

use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpResponse, ResponseError};
use futures::StreamExt;
use serde::Serialize;
use tracing::error;

use crate::common::error::Classify;
use crate::guards::tokens::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// No usable bearer token (401 with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(AuthError),
    /// Authenticated, but not allowed (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("{what} not found")]
    NotFound { what: String },
    /// The request is valid but the resource's state refuses it.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// Well-formed but refused as it stands (422), for example an idempotency key reused
    /// with another body.
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("too many requests; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        details: serde_json::Value,
        /// Sent as `Retry-After` when set.
        retry_after: Option<Duration>,
    },
    #[error("internal error: {0}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::NotFound { what: what.into() }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::Forbidden(message.into())
    }

    /// A dependency does not answer: 503 with `Retry-After`, never a 500.
    pub fn unavailable(what: impl std::fmt::Display) -> Self {
        ApiError::Unavailable {
            code: "UNAVAILABLE",
            message: format!("temporarily unavailable: {what}"),
            details: serde_json::Value::Null,
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    /// An error of a store: a dependency outage is a 503, anything else an internal error.
    pub fn from_store<E>(error: E) -> Self
    where
        E: Classify + std::error::Error + Send + Sync + 'static,
    {
        if error.class().is_unavailable() {
            ApiError::unavailable(&error)
        } else {
            ApiError::Internal(error.into())
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unprocessable { code, .. }
            | ApiError::Unavailable { code, .. } => code,
            ApiError::Unauthorized(_) => "UNAUTHORIZED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::NotFound { .. } => "NOT_FOUND",
            ApiError::RateLimited { .. } => "RATE_LIMITED",
            ApiError::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            ApiError::BodyTimeout => "REQUEST_TIMEOUT",
            ApiError::Internal(_) => "INTERNAL",
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"error": {"code": "NOT_FOUND", "message": "coupon 7 not found"}}))]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// What went wrong.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// A stable, machine-readable code in SCREAMING_SNAKE_CASE (`NOT_FOUND`, `INVALID_JSON`,
    /// `RATE_LIMITED`, …); each operation lists the codes of its error statuses.
    #[schema(example = "NOT_FOUND", pattern = "^[A-Z][A-Z0-9_]*$")]
    pub code: &'a str,
    /// For people: what was refused and why. Not stable; do not parse it.
    pub message: &'a str,
    /// More about the error, when there is more (for example `NOT_READY`'s failed checks).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub details: Option<&'a serde_json::Value>,
}

/// A response in the common error shape.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    details: Option<&serde_json::Value>,
) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody {
        error: ErrorDetail {
            code,
            message,
            details,
        },
    })
}

/// Whole seconds for `Retry-After`, at least one.
fn retry_after_header(wait: Duration) -> (header::HeaderName, String) {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    (header::RETRY_AFTER, seconds.max(1).to_string())
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        let status = self.status_code();
        let mut response = match self {
            ApiError::Internal(cause) => {
                // The cause is logged, not shown: it may name internals. `{:#}` is the
                // error chain, never a backtrace.
                error!(error = %format!("{cause:#}"), "request failed");
                error_response(status, self.code(), "internal error", None)
            }
            ApiError::Unavailable {
                message, details, ..
            } => error_response(
                status,
                self.code(),
                message,
                Some(details).filter(|details| !details.is_null()),
            ),
            other => error_response(status, self.code(), &other.to_string(), None),
        };
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited { retry_after }
            | ApiError::Unavailable {
                retry_after: Some(retry_after),
                ..
            } => {
                let (name, value) = retry_after_header(*retry_after);
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            }
            _ => {}
        }
        response
    }
}

/// A malformed id (in a path, a query or a body) is a 400 with its own code.
impl From<crate::common::ids::InvalidId> for ApiError {
    fn from(invalid: crate::common::ids::InvalidId) -> Self {
        ApiError::bad_request(invalid.code, invalid.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        ApiError::Unauthorized(error)
    }
}

/// Store failures: a dependency outage is a 503; anything else the caller cannot act on is
/// an internal error (logged, not shown).
macro_rules! store_errors {
    ($($error:ty),+) => {
        $(impl From<$error> for ApiError {
            fn from(error: $error) -> Self {
                ApiError::from_store(error)
            }
        })+
    };
}
store_errors!(
    crate::event_log::EventLogError,
    crate::coupons::store::CouponStoreError,
    crate::common::connections::RedisConnectionError,
    sqlx::Error
);

/// Rewrites error responses that are not JSON yet (actix-web's own) into the common shape.
pub fn into_json_error<B: MessageBody + 'static>(
    response: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = response
        .response()
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value == HeaderValue::from_static("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(
            response.map_into_left_body(),
        ));
    }
    let status = response.status();
    let (code, default_message) = match status {
        StatusCode::NOT_FOUND => ("NOT_FOUND", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("METHOD_NOT_ALLOWED", "method not allowed on this route")
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("PAYLOAD_TOO_LARGE", "request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("UNSUPPORTED_MEDIA_TYPE", "unsupported content type")
        }
        StatusCode::REQUEST_TIMEOUT => ("REQUEST_TIMEOUT", "the request did not arrive in time"),
        status if status.is_client_error() => ("BAD_REQUEST", "bad request"),
        _ => ("INTERNAL", "internal error"),
    };
    let message = response
        .response()
        .error()
        .filter(|_| status.is_client_error())
        .map(|error| error.to_string())
        .unwrap_or_else(|| default_message.to_string());
    let (request, _) = response.into_parts();
    let mut rewritten = error_response(status, code, &message, None);
    // A 405 names the methods the route takes (RFC 9110).
    if status == StatusCode::METHOD_NOT_ALLOWED
        && let Some(pattern) = request.match_pattern()
    {
        let allowed: Vec<&str> = crate::api::ROUTES
            .iter()
            .filter(|route| route.path == pattern)
            .map(|route| route.method)
            .collect();
        if let Ok(allow) = HeaderValue::from_str(&allowed.join(", "))
            && !allowed.is_empty()
        {
            rewritten.headers_mut().insert(header::ALLOW, allow);
        }
    }
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(request, rewritten).map_into_right_body(),
    ))
}

/// Turns extractor failures (malformed JSON, bad path or query) into 400s of the common
/// shape.
pub fn extractor_error(code: &'static str, error: impl std::fmt::Display) -> actix_web::Error {
    ApiError::bad_request(code, error.to_string()).into()
}

/// How large a body may be and how long it may take to arrive (`http.*`).
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// Reads a request body within the configured limits: 413 past the size, 408 past the
/// time.
pub async fn read_body(
    request: &actix_web::HttpRequest,
    mut payload: actix_web::dev::Payload,
) -> Result<actix_web::web::Bytes, ApiError> {
    let limits = request
        .app_data::<BodyLimits>()
        .copied()
        .unwrap_or(BodyLimits {
            max_bytes: 64 * 1024,
            timeout: Duration::from_secs(10),
        });
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limits.max_bytes) {
        return Err(ApiError::PayloadTooLarge {
            limit: limits.max_bytes,
        });
    }
    let read = async {
        let mut body = actix_web::web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|error| ApiError::bad_request("INVALID_BODY", error.to_string()))?;
            if body.len() + chunk.len() > limits.max_bytes {
                return Err(ApiError::PayloadTooLarge {
                    limit: limits.max_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(limits.timeout, read)
        .await
        .unwrap_or(Err(ApiError::BodyTimeout))
}

/// A JSON object body, read within the body limits. Unlike `web::Json`, it refuses arrays
/// that serde would read as structs (`[1, 2]` for `{"userId": 1, "couponId": 2}`), and a key
/// given twice (`{"amount": 1, "amount": 100000000}`): every body of this API is an object
/// with named fields, each once.
pub struct JsonObject<T>(pub T);

impl<T: serde::de::DeserializeOwned + 'static> actix_web::FromRequest for JsonObject<T> {
    type Error = ApiError;
    type Future = futures::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(
        request: &actix_web::HttpRequest,
        payload: &mut actix_web::dev::Payload,
    ) -> Self::Future {
        let request = request.clone();
        let payload = payload.take();
        Box::pin(async move {
            let is_json = request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.split(';').next())
                .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
            if !is_json {
                return Err(ApiError::bad_request(
                    "INVALID_JSON",
                    "the body must be JSON (content-type: application/json)",
                ));
            }
            let body = read_body(&request, payload).await?;
            parse_object(&body).map(JsonObject)
        })
    }
}

/// Parses a JSON object with no key given twice into `T`.
pub fn parse_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let invalid = |message: String| ApiError::bad_request("INVALID_JSON", message);
    let value: UniqueKeys =
        serde_json::from_slice(body).map_err(|error| invalid(error.to_string()))?;
    if !value.0.is_object() {
        return Err(invalid("the body must be a JSON object".into()));
    }
    serde_json::from_value(value.0).map_err(|error| invalid(error.to_string()))
}

/// A JSON value whose objects, at every depth, name each key once.
struct UniqueKeys(serde_json::Value);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueKeysVisitor)
            .map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(value).map_or(serde_json::Value::Null, Into::into))
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, inner: D) -> Result<Self::Value, D::Error> {
        serde::Deserialize::deserialize(inner).map(|UniqueKeys(value)| value)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let UniqueKeys(value) = map.next_value()?;
            if object.insert(key.clone(), value).is_some() {
                return Err(serde::de::Error::custom(format!(
                    "key {key:?} is given twice"
                )));
            }
        }
        Ok(object.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Charge {
        amount: i64,
    }

    #[test]
    fn a_key_given_twice_is_refused_at_any_depth() {
        assert_eq!(
            parse_object::<Charge>(br#"{"amount": 1}"#).unwrap(),
            Charge { amount: 1 }
        );
        for body in [
            &br#"{"amount": 1, "amount": 100000000}"#[..],
            br#"{"amount": 1, "nested": {"a": 1, "a": 2}}"#,
        ] {
            let error = parse_object::<serde_json::Value>(body).unwrap_err();
            assert!(error.to_string().contains("twice"), "{error}");
        }
    }

    #[test]
    fn only_objects_are_bodies() {
        assert!(parse_object::<serde_json::Value>(b"[1, 2]").is_err());
        assert!(parse_object::<serde_json::Value>(b"7").is_err());
    }

    use proptest::{prop_assert, prop_assert_eq};

    proptest::proptest! {
        #[test]
        fn any_body_parses_or_is_a_400_never_a_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            #[derive(Debug, serde::Deserialize)]
            #[serde(rename_all = "camelCase", deny_unknown_fields)]
            #[allow(dead_code)]
            struct Issue {
                user_id: Option<i64>,
                coupon_id: i64,
            }
            if let Err(error) = parse_object::<Issue>(&body) {
                prop_assert_eq!(error.status_code(), actix_web::http::StatusCode::BAD_REQUEST);
            }
        }

        #[test]
        fn json_text_with_keys_repeated_is_refused(key in "[a-z]{1,8}", first in 0i64..10, second in 0i64..10) {
            let body = format!(r#"{{"{key}": {first}, "{key}": {second}}}"#);
            prop_assert!(parse_object::<serde_json::Value>(body.as_bytes()).is_err());
        }
    }
}
