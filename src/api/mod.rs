//! The HTTP API (actix-web).
//!
//! | route                        | what                                                      |
//! |------------------------------|-----------------------------------------------------------|
//! | `GET /healthz`               | the process is alive                                      |
//! | `GET /readyz`                | MySQL, Redis, Kafka reachable and consumer groups joined  |
//! | `GET /admin/actors`          | observable state of the whole actor tree                  |
//! | `GET /admin/events/{id}`     | one event-log row                                         |
//! | `POST /admin/probes`         | sends a pipeline probe through a consumed topic           |

pub mod admin;
pub mod error;
pub mod health;

use actix_web::http::StatusCode;
use actix_web::middleware::ErrorHandlers;
use actix_web::web;

use crate::actors::tree::ActorTree;
use crate::event_log::EventLog;
use crate::kafka::producer::EventPublisher;
use crate::outbox::Outbox;
use crate::stores::RedisStore;

/// What request handlers share. Its database pool is the HTTP workers' own.
pub struct AppState {
    pub event_log: EventLog,
    pub outbox: Outbox,
    pub redis: RedisStore,
    pub publisher: EventPublisher,
    pub actors: ActorTree,
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
        .service(web::resource("/admin/events/{event_id}").get(admin::event))
        .service(web::resource("/admin/probes").post(admin::send_probe));
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
