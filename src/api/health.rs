//! Liveness and readiness.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde::Serialize;
use serde_json::json;

use crate::api::AppState;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::responses::ServerErrors;
use crate::observability::outages::OutageView;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Alive {
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

/// `GET /readyz`'s answer when ready.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Ready {
    #[schema(value_type = String, example = "ready")]
    status: &'static str,
    /// Each check (`mysql`, `redis`, `kafka`, `partitions`): `ok`.
    #[schema(value_type = BTreeMap<String, String>)]
    checks: BTreeMap<&'static str, String>,
    /// The outages the actors are waiting out (a delivery target's does not make the
    /// daemon unready).
    outages: Vec<OutageView>,
}

/// Liveness.
///
/// The process is alive and serving HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    responses(
        (status = 200, description = "Alive.", body = Alive),
        ServerErrors,
    )
)]
pub async fn healthz() -> web::Json<Alive> {
    web::Json(Alive { status: "ok" })
}

/// Readiness: MySQL, Redis, Kafka and the partitions.
///
/// Ready when MySQL, Redis and Kafka answer and every consumer group has been given its
/// partitions; otherwise 503 naming the checks that failed. Either way the answer lists the
/// outages the actors are waiting out (`outages`: the dependency, since when, and which
/// partitions wait), a delivery target's included, which does not make the daemon unready.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    responses(
        ServerErrors,
        (status = 200, description = "Ready.", body = Ready),
        (status = 503, description = "`NOT_READY`: a check failed. `details`: `checks` (each \
            check's error, or `ok`) and `outages`. `UNAVAILABLE` as for any route.",
            body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds."))),
    )
)]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (mysql, redis, kafka) = futures::join!(
        check_mysql(&state),
        check_redis(&state),
        check_kafka(&state)
    );
    let partitions = check_partitions(&state);
    let checks: BTreeMap<&'static str, Result<(), String>> = BTreeMap::from([
        ("mysql", mysql),
        ("redis", redis),
        ("kafka", kafka),
        ("partitions", partitions),
    ]);
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, result)| result.is_err())
        .map(|(name, _)| *name)
        .collect();
    let details: BTreeMap<&'static str, String> = checks
        .iter()
        .map(|(name, result)| (*name, result.clone().err().unwrap_or_else(|| "ok".into())))
        .collect();
    let outages = state.operations.outages.current();
    if failed.is_empty() {
        return Ok(HttpResponse::Ok().json(Ready {
            status: "ready",
            checks: details,
            outages,
        }));
    }
    Err(ApiError::Unavailable {
        code: "NOT_READY",
        message: format!("not ready: {}", failed.join(", ")),
        details: json!({ "checks": details, "outages": outages }),
        retry_after: Some(CHECK_TIMEOUT),
    })
}

async fn with_timeout<F, E>(check: F) -> Result<(), String>
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

async fn check_mysql(state: &AppState) -> Result<(), String> {
    with_timeout(async {
        sqlx::query!("SELECT 1 AS answer")
            .fetch_one(state.operations.event_log.pool())
            .await
            .map(|_| ())
    })
    .await
}

async fn check_redis(state: &AppState) -> Result<(), String> {
    with_timeout(state.operations.redis.ping()).await
}

async fn check_kafka(state: &AppState) -> Result<(), String> {
    let publisher = state.operations.publisher.clone();
    let metadata =
        tokio::task::spawn_blocking(move || publisher.check_cluster_blocking(CHECK_TIMEOUT));
    match metadata.await {
        Ok(Ok(_brokers)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

fn check_partitions(state: &AppState) -> Result<(), String> {
    let waiting: Vec<&str> = state
        .operations
        .actors
        .consumer_groups
        .iter()
        .filter(|group| !group.health().joined())
        .map(|group| group.group_id())
        .collect();
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "no partitions assigned yet to {}",
            waiting.join(", ")
        ))
    }
}
