//! The HTTP API (actix-web).
//!
//! One file per route area; [`configure`] is the route table.
//!
//! | file          | routes                                                                  |
//! |---------------|-------------------------------------------------------------------------|
//! | [`health`]    | `GET /healthz`, `GET /readyz`                                           |
//! | [`admin`]     | `GET /admin/actors`, `GET /admin/events`, `GET /admin/events/{id}`,     |
//! |               | `POST /admin/events/{id}/replay`, `POST /admin/probes`,                 |
//! |               | `POST /admin/consumer-groups/{id}/pause` and `/resume`                  |
//! | [`coupons`]   | `POST /coupons`, `GET /coupons/{id}`, `POST /coupons/issue`,            |
//! |               | `GET /coupons/requests/{id}`, `GET /users/{id}/coupons`                 |
//! | [`push`]      | `GET /ws?userId=`, `GET /users/{id}/events` (coupon results, live)      |
//! | [`shop`]      | `POST /users`, `GET /users/{id}/balance`, `POST …/balance/charge`,      |
//! |               | `POST/GET /products`, `GET/PATCH /products/{id}`, `POST /orders`,       |
//! |               | `GET /orders/{id}`, `POST /orders/{id}/pay`                             |
//! | [`ranking`]   | `GET /products/ranking`                                                 |

pub mod admin;
pub mod coupons;
pub mod error;
pub mod health;
pub mod identity;
pub mod push;
pub mod ranking;
pub mod shop;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::middleware::ErrorHandlers;
use actix_web::web;

use crate::actors::tree::ActorTree;
use crate::clock::SharedClock;
use crate::coupons::intake::CouponIntake;
use crate::coupons::sessions::Sessions;
use crate::coupons::store::CouponStore;
use crate::delivery::scheduler::RetryScheduler;
use crate::event_log::EventLog;
use crate::kafka::producer::EventPublisher;
use crate::outbox::Outbox;
use crate::ranking::RankingStore;
use crate::shop::cache::ProductCache;
use crate::shop::store::ShopStore;
use crate::stores::RedisStore;

/// What request handlers share, by slice.
pub struct AppState {
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
    pub max_total_quantity: u32,
}

pub struct ShopState {
    pub store: ShopStore,
    pub cache: ProductCache,
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
    pub redis: RedisStore,
    pub publisher: EventPublisher,
    pub actors: ActorTree,
    /// Replays dead letters.
    pub scheduler: Addr<RetryScheduler>,
}

/// Registers every route and the common error handling.
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .app_data(
            web::JsonConfig::default()
                .error_handler(|error, _| error::extractor_error("INVALID_JSON", error)),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|error, _| error::extractor_error("INVALID_PATH", error)),
        )
        .app_data(
            web::QueryConfig::default()
                .error_handler(|error, _| error::extractor_error("INVALID_QUERY", error)),
        )
        // Resources (not bare routes) so a known path with the wrong method is a 405.
        .service(web::resource("/healthz").get(health::healthz))
        .service(web::resource("/readyz").get(health::readyz))
        .service(web::resource("/admin/actors").get(admin::actors))
        .service(web::resource("/admin/events").get(admin::events))
        .service(web::resource("/admin/events/{event_id}").get(admin::event))
        .service(web::resource("/admin/events/{event_id}/replay").post(admin::replay))
        .service(web::resource("/admin/probes").post(admin::send_probe))
        .service(
            web::resource("/admin/consumer-groups/{group_id}/{action}")
                .post(admin::set_group_paused),
        )
        .service(web::resource("/coupons").post(coupons::create))
        .service(web::resource("/coupons/issue").post(coupons::issue))
        .service(web::resource("/coupons/requests/{request_id}").get(coupons::request))
        .service(web::resource("/coupons/{coupon_id}").get(coupons::find))
        .service(web::resource("/users/{user_id}/coupons").get(coupons::held))
        .service(web::resource("/users/{user_id}/events").get(push::server_sent_events))
        .service(web::resource("/ws").get(push::websocket))
        .service(web::resource("/users").post(shop::create_user))
        .service(web::resource("/users/{user_id}/balance").get(shop::balance))
        .service(web::resource("/users/{user_id}/balance/charge").post(shop::charge))
        .service(
            web::resource("/products")
                .post(shop::create_product)
                .get(shop::products),
        )
        .service(web::resource("/products/ranking").get(ranking::ranking))
        .service(
            web::resource("/products/{product_id}")
                .get(shop::product)
                .patch(shop::update_product),
        )
        .service(web::resource("/orders").post(shop::create_order))
        .service(web::resource("/orders/{order_id}").get(shop::order))
        .service(web::resource("/orders/{order_id}/pay").post(shop::pay));
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
