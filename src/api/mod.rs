//! The HTTP API (actix-web).
//!
//! | route                        | what                                                      |
//! |------------------------------|-----------------------------------------------------------|
//! | `GET /healthz`               | the process is alive                                      |
//! | `GET /readyz`                | MySQL, Redis, Kafka reachable and consumer groups joined  |
//! | `GET /admin/actors`          | observable state of the whole actor tree                  |
//! | `GET /admin/events/{id}`     | one event-log row                                         |
//! | `POST /admin/probes`         | sends a pipeline probe through a consumed topic           |
//! | `POST /admin/consumer-groups/{id}/pause` / `resume` | stops / resumes fetching      |
//! | `POST /coupons`              | creates a coupon                                          |
//! | `GET /coupons/{id}`          | one coupon with its remaining stock                       |
//! | `POST /coupons/issue`        | accepts an issue request (202), decided asynchronously    |
//! | `GET /coupons/requests/{id}` | the state of an issue request                             |
//! | `GET /users/{id}/coupons`    | the coupons a user holds                                  |
//! | `GET /ws?userId=`            | WebSocket pushing the user's coupon results               |
//! | `GET /users/{id}/events`     | the same as Server-Sent Events                            |

pub mod admin;
pub mod coupons;
pub mod error;
pub mod health;
pub mod identity;
pub mod push;
pub mod ranking;
pub mod shop;

use actix_web::http::StatusCode;
use actix_web::middleware::ErrorHandlers;
use actix_web::web;

use crate::actors::tree::ActorTree;
use crate::clock::SharedClock;
use crate::coupons::intake::CouponIntake;
use crate::coupons::sessions::Sessions;
use crate::coupons::store::CouponStore;
use crate::event_log::EventLog;
use crate::kafka::producer::EventPublisher;
use crate::outbox::Outbox;
use crate::ranking::RankingStore;
use crate::shop::cache::ProductCache;
use crate::shop::store::ShopStore;
use crate::stores::RedisStore;

/// What request handlers share. Its database pool is the HTTP workers' own.
pub struct AppState {
    pub event_log: EventLog,
    pub outbox: Outbox,
    pub redis: RedisStore,
    pub publisher: EventPublisher,
    pub actors: ActorTree,
    pub coupons: CouponStore,
    pub intake: CouponIntake,
    pub sessions: Sessions,
    pub max_total_quantity: u32,
    pub shop: ShopStore,
    /// What "now" is for payments and the ranking's days.
    pub clock: SharedClock,
    pub ranking: RankingStore,
    pub product_cache: ProductCache,
    pub max_ranking_days: u32,
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
