//! The error responses the operations share, one [`IntoResponses`] set per kind of refusal,
//! for the handlers' `#[utoipa::path]` annotations; each operation lists its own
//! 400/404/409/422 with their codes. The document that gathers them is `openapi.rs`.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use utoipa::openapi::{self, ContentBuilder, HeaderBuilder, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, PartialSchema};

use crate::common::ids::IdKind;

type Responses = BTreeMap<String, RefOr<openapi::Response>>;

/// A response whose body is an `ErrorBody`.
fn error_response(description: &str) -> openapi::ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(RefOr::Ref(openapi::Ref::from_schema_name(
                "ErrorBody",
            ))))
            .build(),
    )
}

/// `Retry-After`, whole seconds.
fn retry_after() -> openapi::Header {
    HeaderBuilder::new()
        .schema(<u64 as PartialSchema>::schema())
        .description(Some("Seconds to wait before asking again."))
        .build()
}

fn responses<const N: usize>(entries: [(&str, openapi::ResponseBuilder); N]) -> Responses {
    entries
        .into_iter()
        .map(|(status, response)| (status.to_string(), RefOr::T(response.build())))
        .collect()
}

fn unauthorized() -> openapi::ResponseBuilder {
    error_response(
        "`UNAUTHORIZED`: no bearer token, or one that is malformed, expired or badly signed \
         (with `WWW-Authenticate: Bearer`).",
    )
    .header(
        "WWW-Authenticate",
        HeaderBuilder::new()
            .schema(<String as PartialSchema>::schema())
            .description(Some("`Bearer`"))
            .build(),
    )
}

/// 401 for a token that is missing or not valid, and 403 (`forbidden`) for a valid one
/// that may not do this.
fn unauthorized_or_forbidden(forbidden: &str) -> Responses {
    responses([("401", unauthorized()), ("403", error_response(forbidden))])
}

/// 401 for a route any valid token may call.
pub struct Authenticated;

impl IntoResponses for Authenticated {
    fn responses() -> Responses {
        responses([("401", unauthorized())])
    }
}

/// 401, and 403 for a token without the admin role.
pub struct AdminErrors;

impl IntoResponses for AdminErrors {
    fn responses() -> Responses {
        unauthorized_or_forbidden("`FORBIDDEN`: the token does not have the admin role.")
    }
}

/// 401, and 403 for another user's resource (an admin reads any).
pub struct ReadsUserErrors;

impl IntoResponses for ReadsUserErrors {
    fn responses() -> Responses {
        unauthorized_or_forbidden(
            "`FORBIDDEN`: the resource is another user's (only its user or an admin reads it).",
        )
    }
}

/// 401, and 403 for acting in another user's name (even as an admin).
pub struct ActsAsUserErrors;

impl IntoResponses for ActsAsUserErrors {
    fn responses() -> Responses {
        unauthorized_or_forbidden(
            "`FORBIDDEN`: the request names another user than the token's (nobody, an admin \
             neither, acts in another user's name).",
        )
    }
}

/// The 400 for an id in the path that does not parse.
fn invalid_path_id<Id: IdKind>() -> openapi::ResponseBuilder {
    error_response(&format!("`{}`: not {}.", Id::CODE, Id::EXPECTED))
}

/// 400 for an id in the path that does not parse and 404 for nothing by that id: what the
/// routes that read one thing by the id in their path refuse.
pub struct LookupErrors<Id>(PhantomData<Id>);

impl<Id: IdKind> IntoResponses for LookupErrors<Id> {
    fn responses() -> Responses {
        let thing = Id::WHAT.strip_suffix("Id").unwrap_or(Id::WHAT);
        responses([
            ("400", invalid_path_id::<Id>()),
            (
                "404",
                error_response(&format!("`NOT_FOUND`: no such {thing}.")),
            ),
        ])
    }
}

/// 400 for an id in the path that does not parse, for a route that lists what the id names.
pub struct InvalidPathId<Id>(PhantomData<Id>);

impl<Id: IdKind> IntoResponses for InvalidPathId<Id> {
    fn responses() -> Responses {
        responses([("400", invalid_path_id::<Id>())])
    }
}

/// What reading a request body may refuse, past the 400s each operation lists.
pub struct BodyErrors;

impl IntoResponses for BodyErrors {
    fn responses() -> Responses {
        responses([
            (
                "408",
                error_response(
                    "`REQUEST_TIMEOUT`: the body did not arrive within `http.body_timeout`.",
                ),
            ),
            (
                "413",
                error_response(
                    "`PAYLOAD_TOO_LARGE`: the body is larger than `http.max_body_bytes`.",
                ),
            ),
        ])
    }
}

/// 429 past the caller's rate limit.
pub struct RateLimited;

impl IntoResponses for RateLimited {
    fn responses() -> Responses {
        responses([(
            "429",
            error_response("`RATE_LIMITED`: too many requests; retry after `Retry-After`.")
                .header("Retry-After", retry_after()),
        )])
    }
}

/// 500, 503 and the common shape of any other error.
pub struct ServerErrors;

impl IntoResponses for ServerErrors {
    fn responses() -> Responses {
        responses([
            (
                "500",
                error_response("`INTERNAL`: a failure the caller cannot act on (logged)."),
            ),
            (
                "503",
                error_response(
                    "`UNAVAILABLE`: a dependency (MySQL, Redis, Kafka) does not answer; \
                     nothing was changed. Retry after `Retry-After`.",
                )
                .header("Retry-After", retry_after()),
            ),
            (
                "default",
                error_response(
                    "Any other error, in the common shape: `NOT_FOUND` (no such route), \
                     `METHOD_NOT_ALLOWED`, `UNSUPPORTED_MEDIA_TYPE`, `BAD_REQUEST`, ….",
                ),
            ),
        ])
    }
}
