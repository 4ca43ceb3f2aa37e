//! The one error body of the HTTP API: `{"error": {"code": "...", "message": "..."}}`, with
//! an optional `details` object. Every 4xx and 5xx response has this shape, including the
//! ones actix-web produces itself (malformed JSON, unknown route, wrong method).

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use tracing::error;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{what} not found")]
    NotFound { what: String },
    /// The request is valid but the resource's state refuses it.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        details: serde_json::Value,
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

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unavailable { code, .. } => code,
            ApiError::NotFound { .. } => "NOT_FOUND",
            ApiError::Internal(_) => "INTERNAL",
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a serde_json::Value>,
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

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        match self {
            ApiError::Internal(cause) => {
                // The cause is logged, not shown: it may name internals.
                error!(error = ?cause, "request failed");
                error_response(self.status_code(), self.code(), "internal error", None)
            }
            ApiError::Unavailable {
                message, details, ..
            } => error_response(self.status_code(), self.code(), message, Some(details)),
            other => error_response(self.status_code(), self.code(), &other.to_string(), None),
        }
    }
}

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
    let rewritten = error_response(status, code, &message, None);
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(request, rewritten).map_into_right_body(),
    ))
}

/// A malformed id (in a path, a query or a body) is a 400 with its own code.
impl From<crate::ids::InvalidId> for ApiError {
    fn from(invalid: crate::ids::InvalidId) -> Self {
        ApiError::bad_request(invalid.code, invalid.to_string())
    }
}

/// Store failures the caller cannot act on are internal errors (logged, not shown).
macro_rules! internal_errors {
    ($($error:ty),+) => {
        $(impl From<$error> for ApiError {
            fn from(error: $error) -> Self {
                ApiError::Internal(error.into())
            }
        })+
    };
}
internal_errors!(
    crate::event_log::EventLogError,
    crate::coupons::store::CouponStoreError,
    crate::stores::RedisStoreError
);

/// Turns extractor failures (malformed JSON, bad path or query) into 400s of the common
/// shape.
pub fn extractor_error(code: &'static str, error: impl std::fmt::Display) -> actix_web::Error {
    ApiError::bad_request(code, error.to_string()).into()
}

/// A JSON object body. Unlike `web::Json`, it refuses arrays that serde would read as
/// structs (`[1, 2]` for `{"userId": 1, "couponId": 2}`): every body of this API is an
/// object with named fields.
pub struct JsonObject<T>(pub T);

impl<T: serde::de::DeserializeOwned + 'static> actix_web::FromRequest for JsonObject<T> {
    type Error = actix_web::Error;
    type Future = futures::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(
        request: &actix_web::HttpRequest,
        payload: &mut actix_web::dev::Payload,
    ) -> Self::Future {
        let value = actix_web::web::Json::<serde_json::Value>::from_request(request, payload);
        Box::pin(async move {
            let value = value.await?.into_inner();
            if !value.is_object() {
                return Err(extractor_error(
                    "INVALID_JSON",
                    "the body must be a JSON object",
                ));
            }
            serde_json::from_value(value)
                .map(JsonObject)
                .map_err(|error| extractor_error("INVALID_JSON", error))
        })
    }
}
