//! The API's own description: the OpenAPI 3.1 document generated from the handlers'
//! `#[utoipa::path]` annotations (`GET /openapi.json`) and Swagger UI to read and try it
//! (`GET /docs`).
//!
//! Swagger UI is vendored in `static/swagger-ui/` (see its `VERSION`) and embedded in the
//! binary: the page loads nothing from elsewhere, at build or at run time.
//!
//! An operation's tag is its module's name (utoipa's default for a handler listed as
//! `module::handler`), unless its annotation names another (`observability`, `docs`).
//!
//! The error responses every operation shares are the sets of `responses.rs`. The
//! `tests/api/openapi.rs` checks that the document covers exactly the route table (`ROUTES`
//! in `api/mod.rs`).

use std::sync::OnceLock;

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{self, RefOr};
use utoipa::{Modify, OpenApi};

use crate::api::error::{ApiError, ErrorBody};
use crate::api::responses::ServerErrors;
use crate::api::{admin, coupons, dashboard, health, metrics, push, ranking, shop, uncached};

/// The name of the bearer security scheme in the document.
pub const BEARER: &str = "bearerAuth";

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "commerce-events",
        description = "The HTTP API of the commerce-events daemon: coupons issued first come \
            first served through Kafka, users, products, orders and payments, the best-seller \
            ranking, push channels for coupon results, and the operator endpoints.\n\n\
            Every error answers `{\"error\": {\"code\": \"...\", \"message\": \"...\", \
            \"details\"?: {...}}}` (`ErrorBody`); `code` is stable, `message` is for people. \
            Ids are positive integers (users, coupons, products, orders, payments) or UUIDs \
            (events, coupon requests).\n\n\
            Authentication: `Authorization: Bearer <JWT>` (see the `bearerAuth` scheme). \
            Writes made in a user's name are rate limited per user (429 `RATE_LIMITED` with \
            `Retry-After`) and take an `Idempotency-Key` header where noted: a retry with the \
            same key gets the first answer again (header `Idempotent-Replay: true`)."
    ),
    modifiers(&BearerScheme, &Fixes),
    tags(
        (name = "health", description = "Liveness and readiness."),
        (name = "observability", description = "Metrics and the live ops dashboard."),
        (name = "admin", description = "Operator endpoints (the admin role): actors, \
            events, dead letters and their replay, probes, reconciliation, consumer groups."),
        (name = "coupons", description = "Coupons and their first-come-first-served issue."),
        (name = "push", description = "Live coupon results: WebSocket and Server-Sent Events."),
        (name = "shop", description = "Users and balances, products, orders and payments."),
        (name = "ranking", description = "The best sellers."),
        (name = "docs", description = "This document and Swagger UI."),
    ),
    paths(
        health::healthz,
        health::readyz,
        metrics::metrics,
        dashboard::page,
        dashboard::snapshot,
        dashboard::stream,
        admin::actors,
        admin::events,
        admin::event,
        admin::replay,
        admin::send_probe,
        admin::reconcile,
        admin::rebuild_ranking,
        admin::set_group_paused,
        coupons::create,
        coupons::issue,
        coupons::request,
        coupons::find,
        coupons::held,
        push::server_sent_events,
        push::websocket,
        push::ticket,
        shop::create_user,
        shop::balance,
        shop::charge,
        shop::create_product,
        shop::products,
        ranking::ranking,
        shop::product,
        shop::update_product,
        shop::create_order,
        shop::order,
        shop::pay,
        openapi,
        swagger_ui,
        asset,
    ),
    components(schemas(crate::api::error::ErrorBody, crate::api::error::ErrorDetail))
)]
pub struct ApiDoc;

/// Adds the `bearerAuth` scheme.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, document: &mut openapi::OpenApi) {
        let components = document.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT signed with HS256 (`auth.jwt_secret`; RS256/ES256 when \
                         `auth.public_key_file` is set). Claims: `sub` the user id as a \
                         decimal string (`\"42\"`), `exp` the expiry in seconds since the \
                         epoch (required), `roles` an optional array where `\"admin\"` grants \
                         the admin routes, and `iss`/`aud`, checked when configured. \
                         `commerce-events token --user 42 [--admin]` mints one. A missing, \
                         malformed, expired or badly signed token is a 401 `UNAUTHORIZED` \
                         with `WWW-Authenticate: Bearer`; a valid token without the needed \
                         role or for another user's resource is a 403 `FORBIDDEN`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// What the derive cannot say (or says wrong, in utoipa 5.5).
struct Fixes;

impl Modify for Fixes {
    fn modify(&self, document: &mut openapi::OpenApi) {
        // `#[schema(min_properties = 1)]` comes out as `maxProperties`.
        if let Some(RefOr::T(openapi::schema::Schema::Object(update))) = document
            .components
            .as_mut()
            .and_then(|components| components.schemas.get_mut("UpdateProduct"))
        {
            update.min_properties = Some(1);
        }
    }
}

/// The document as JSON, rendered once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let json = ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serializes");
        // utoipa 5.5 writes a Link object's fields in snake case; OpenAPI spells them in
        // camel case. In JSON text, `"operation_id":` can only be a key (a quote inside a
        // string is escaped).
        json.replace("\"operation_id\":", "\"operationId\":")
    })
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "docs",
    operation_id = "openapi",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document (JSON).", body = Object),
        ServerErrors,
    )
)]
pub async fn openapi() -> HttpResponse {
    uncached("application/json", document())
}

/// Swagger UI, reading `/openapi.json` (its assets are served under `/docs/`).
const SWAGGER_UI_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>commerce-events API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      persistAuthorization: true,
      // No badge that would ask swagger.io to validate the document.
      validatorUrl: null,
    });
  </script>
</body>
</html>
"##;

/// Swagger UI.
///
/// To read this document and try the routes (authorize with a bearer token first).
#[utoipa::path(
    get,
    path = "/docs",
    tag = "docs",
    operation_id = "swaggerUi",
    responses(
        (status = 200, description = "The Swagger UI page.", content_type = "text/html",
            body = String),
        ServerErrors,
    )
)]
pub async fn swagger_ui() -> HttpResponse {
    uncached("text/html; charset=utf-8", SWAGGER_UI_PAGE)
}

/// The vendored Swagger UI files: name, content type, content.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../static/swagger-ui/swagger-ui-bundle.js"),
    ),
    (
        "swagger-ui.css",
        "text/css; charset=utf-8",
        include_bytes!("../../static/swagger-ui/swagger-ui.css"),
    ),
];

/// Swagger UI's files.
///
/// `swagger-ui-bundle.js` and `swagger-ui.css`, as vendored; 404 for any other name.
#[utoipa::path(
    get,
    path = "/docs/{file}",
    tag = "docs",
    operation_id = "swaggerUiAsset",
    params(("file" = String, Path, description = "`swagger-ui-bundle.js` or `swagger-ui.css`.")),
    responses(
        (status = 200, description = "The file (cached for an hour).", content(
            (String = "text/javascript"),
            (String = "text/css"),
        )),
        (status = 404, description = "`NOT_FOUND`: no such file.", body = ErrorBody),
        ServerErrors,
    )
)]
pub async fn asset(path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let (_, content_type, content) = ASSETS
        .iter()
        .find(|(known, _, _)| *known == name)
        .ok_or_else(|| ApiError::not_found(format!("file {name:?}")))?;
    Ok(HttpResponse::Ok()
        .content_type(*content_type)
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(*content))
}
