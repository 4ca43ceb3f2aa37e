//! The HTTP API (actix-web).
//!
//! One file per route area; [`ROUTES`] is the route table, with who may call each route
//! ([`Access`], enforced by the extractors of [`auth`]).
//!
//! | file          | routes                                                                  |
//! |---------------|-------------------------------------------------------------------------|
//! | [`health`]    | `GET /healthz`, `GET /readyz`                                           |
//! | [`metrics`]   | `GET /metrics` (Prometheus)                                             |
//! | [`dashboard`] | `GET /dashboard`, `GET /admin/dashboard`, `GET /admin/dashboard/events` |
//! | [`admin`]     | `GET /admin/actors`, `GET /admin/events`, `GET /admin/events/{id}`,     |
//! |               | `POST /admin/events/{id}/replay`, `POST /admin/probes`,                 |
//! |               | `POST /admin/reconcile`, `POST /admin/ranking/rebuild`,                 |
//! |               | `POST /admin/consumer-groups/{id}/pause` and `/resume`                  |
//! | [`coupons`]   | `POST /coupons`, `GET /coupons/{id}`, `POST /coupons/issue`,            |
//! |               | `GET /coupons/requests/{id}`, `GET /users/{id}/coupons`                 |
//! | [`push`]      | `GET /ws`, `GET /users/{id}/events` (coupon results, live),             |
//! |               | `POST /push/tickets`                                                    |
//! | [`shop`]      | `POST /users`, `GET /users/{id}/balance`, `POST …/balance/charge`,      |
//! |               | `POST/GET /products`, `GET/PATCH /products/{id}`, `POST /orders`,       |
//! |               | `GET /orders/{id}`, `POST /orders/{id}/pay`                             |
//! | [`ranking`]   | `GET /products/ranking`                                                 |
//! | [`openapi`]   | `GET /openapi.json` (OpenAPI 3.1), `GET /docs` (Swagger UI), its files  |

pub mod admin;
pub mod auth;
pub mod coupons;
pub mod dashboard;
pub mod error;
pub mod guard;
pub mod health;
pub mod input;
pub mod metrics;
pub mod openapi;
pub mod push;
pub mod ranking;
pub mod responses;
pub mod shop;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::middleware::ErrorHandlers;
use actix_web::web;

use crate::actors::lag::LagView;
use crate::actors::tree::ActorTree;
use crate::common::clock::SharedClock;
use crate::common::connections::RedisConnection;
use crate::config::{LimitSettings, PushSettings};
use crate::coupons::intake::CouponIntake;
use crate::coupons::sessions::PushTickets;
use crate::coupons::sessions::Sessions;
use crate::coupons::store::CouponStore;
use crate::delivery::scheduler::RetryScheduler;
use crate::event_log::EventLog;
use crate::guards::limits::RateLimiter;
use crate::guards::tokens::Authenticator;
use crate::kafka::dead_letter::DeadLetterLog;
use crate::kafka::producer::EventPublisher;
use crate::observability::outages::Outages;
use crate::outbox::reconciler::Reconciler;
use crate::outbox::settlement::Consumers;
use crate::outbox::{Outbox, OutboxBacklogView};
use crate::ranking::RankingStore;
use crate::shop::cache::ProductCache;
use crate::shop::orders::OrderIntake;
use crate::shop::payments::PaymentIntake;
use crate::shop::store::ShopStore;

/// What request handlers share, by slice.
pub struct AppState {
    /// Verifies bearer tokens.
    pub auth: Authenticator,
    pub limits: LimitsState,
    pub coupons: CouponsState,
    pub shop: ShopState,
    pub ranking: RankingState,
    pub operations: OperationsState,
    /// What "now" is for payments and the ranking's days.
    pub clock: SharedClock,
}

pub struct CouponsState {
    pub store: CouponStore,
    pub intake: CouponIntake,
    /// Push sessions of this instance.
    pub sessions: Sessions,
    pub push: PushSettings,
    /// Single-use push tickets, shared by the instances through Redis.
    pub tickets: PushTickets,
    /// Origins whose pages may open push channels.
    pub allowed_origins: Vec<String>,
    pub max_total_quantity: u32,
    pub max_discount_amount: u64,
}

/// Rate limits.
pub struct LimitsState {
    pub limiter: RateLimiter,
    pub settings: LimitSettings,
    /// `http.trusted_proxy_header`.
    pub trusted_proxy_header: String,
}

pub struct ShopState {
    pub store: ShopStore,
    pub cache: ProductCache,
    /// New orders, placed in batches (group commit).
    pub orders: OrderIntake,
    /// Payments, decided in batches (group commit).
    pub payments: PaymentIntake,
}

pub struct RankingState {
    pub store: RankingStore,
    /// The largest `days` the ranking endpoint takes.
    pub max_days: u32,
}

/// What readiness and the admin endpoints look at.
pub struct OperationsState {
    pub event_log: EventLog,
    pub outbox: Outbox,
    pub redis: RedisConnection,
    pub publisher: EventPublisher,
    pub actors: ActorTree,
    /// Replays dead letters.
    pub scheduler: Addr<RetryScheduler>,
    /// Drives stranded events again (`POST /admin/reconcile` runs a pass).
    pub reconciler: Addr<Reconciler>,
    /// The outages the actors are waiting out.
    pub outages: Outages,
    /// Every dead letter, whoever sent it.
    pub dead_letters: DeadLetterLog,
    /// This instance's consumers, for the per-consumer progress of an event.
    pub consumers: Consumers,
    /// The MySQL pools, by name, for the metrics.
    pub pools: Vec<(&'static str, sqlx::MySqlPool)>,
    /// Consumer lag, as last measured.
    pub lag: LagView,
    /// The outbox's unpublished rows, as last counted.
    pub outbox_backlog: OutboxBacklogView,
    /// How often the dashboard's stream sends a view.
    pub dashboard_interval_ms: u64,
}

/// Who may call a route. Handlers enforce it with the extractors of [`auth`]; the
/// authorization tests check every route of [`ROUTES`] against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without a token.
    Public,
    /// Any caller with a valid token.
    Authenticated,
    /// A user's resource, read by that user or by an admin.
    ReadsUser,
    /// Acts in a user's name: only that user, never an admin for someone else.
    ActsAsUser,
    /// The admin role.
    Admin,
}

/// One route of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    /// The path template, with `{…}` parameters.
    pub path: &'static str,
    pub access: Access,
}

/// Declares the route table once: [`ROUTES`] (what the tests walk) and [`register`] (what
/// actix serves), so a route cannot be served without being listed. One resource per path,
/// so a known path with the wrong method is a 405.
macro_rules! route_table {
    ($($path:literal => { $($method:ident $handler:path : $access:ident),+ $(,)? })+) => {
        /// Every route, with who may call it.
        pub const ROUTES: &[Route] = &[
            $($(Route {
                method: stringify!($method),
                path: $path,
                access: Access::$access,
            },)+)+
        ];

        fn register(config: &mut web::ServiceConfig) {
            $(config.service(
                web::resource($path)
                    $(.route(route_table!(@method $method).to($handler)))+
            );)+
        }
    };
    (@method GET) => { web::get() };
    (@method POST) => { web::post() };
    (@method PATCH) => { web::patch() };
}

route_table! {
    "/healthz" => { GET health::healthz: Public }
    "/readyz" => { GET health::readyz: Public }
    "/metrics" => { GET metrics::metrics: Public }
    "/dashboard" => { GET dashboard::page: Public }
    "/admin/dashboard" => { GET dashboard::snapshot: Admin }
    "/admin/dashboard/events" => { GET dashboard::stream: Admin }
    "/admin/actors" => { GET admin::actors: Admin }
    "/admin/events" => { GET admin::events: Admin }
    "/admin/events/{event_id}" => { GET admin::event: Admin }
    "/admin/events/{event_id}/replay" => { POST admin::replay: Admin }
    "/admin/probes" => { POST admin::send_probe: Admin }
    "/admin/reconcile" => { POST admin::reconcile: Admin }
    "/admin/ranking/rebuild" => { POST admin::rebuild_ranking: Admin }
    "/admin/consumer-groups/{group_id}/{action}" => { POST admin::set_group_paused: Admin }
    "/coupons" => { POST coupons::create: Admin }
    "/coupons/issue" => { POST coupons::issue: ActsAsUser }
    "/coupons/requests/{request_id}" => { GET coupons::request: ReadsUser }
    "/coupons/{coupon_id}" => { GET coupons::find: Authenticated }
    "/users/{user_id}/coupons" => { GET coupons::held: ReadsUser }
    "/users/{user_id}/events" => { GET push::server_sent_events: ActsAsUser }
    "/ws" => { GET push::websocket: ActsAsUser }
    "/push/tickets" => { POST push::ticket: Authenticated }
    "/users" => { POST shop::create_user: Admin }
    "/users/{user_id}/balance" => { GET shop::balance: ReadsUser }
    "/users/{user_id}/balance/charge" => { POST shop::charge: ActsAsUser }
    "/products" => { POST shop::create_product: Admin, GET shop::products: Public }
    "/products/ranking" => { GET ranking::ranking: Public }
    "/products/{product_id}" => { GET shop::product: Public, PATCH shop::update_product: Admin }
    "/orders" => { POST shop::create_order: ActsAsUser }
    "/orders/{order_id}" => { GET shop::order: ReadsUser }
    "/orders/{order_id}/pay" => { POST shop::pay: ActsAsUser }
    "/openapi.json" => { GET openapi::openapi: Public }
    "/docs" => { GET openapi::swagger_ui: Public }
    "/docs/{file}" => { GET openapi::asset: Public }
}

/// Registers every route and the common error handling.
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .app_data(
            web::PathConfig::default()
                .error_handler(|error, _| error::extractor_error("INVALID_PATH", error)),
        )
        .app_data(
            web::QueryConfig::default()
                .error_handler(|error, _| error::extractor_error("INVALID_QUERY", error)),
        );
    register(config);
}

/// A document served as it is, to be fetched again each time (`Cache-Control: no-cache`):
/// the dashboard's page, the OpenAPI document, Swagger UI's page.
pub fn uncached(content_type: &'static str, body: &'static str) -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// The middleware that gives actix-web's own error responses the common JSON shape.
pub fn json_errors<B: actix_web::body::MessageBody + 'static>() -> ErrorHandlers<B> {
    let mut handlers = ErrorHandlers::new().default_handler(error::into_json_error);
    // `default_handler` covers 4xx and 5xx alike; listed here to document the intent.
    for status in [StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED] {
        handlers = handlers.handler(status, error::into_json_error);
    }
    handlers
}
