//! The live ops dashboard: one page embedded in the binary (`GET /dashboard`, plain
//! HTML/CSS/JS, no build step) fed by a stream of views (`GET /admin/dashboard/events`,
//! server-sent events, admin only) or one view (`GET /admin/dashboard`).
//!
//! A view holds the consumer groups with each partition's lag and counters, the domain
//! actors with their restarts, the open dead letters, the outbox backlog and relay, the
//! retry scheduler, the outages, today's best sellers and the coupon decisions so far. The
//! page acts through the admin API: `POST /admin/events/{id}/replay` for a dead letter,
//! `POST /admin/consumer-groups/{id}/pause|resume` for a group. The page takes the admin
//! token from its address (`/dashboard#token=…`, then forgotten by the address bar) or asks
//! for it, and keeps it in the tab's session storage.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use serde::Serialize;

use crate::actors::consumer_group::ConsumerGroupState;
use crate::actors::domain::DomainActorState;
use crate::actors::lag::PartitionLag;
use crate::api::auth::Admin;
use crate::api::ranking::{self, RankingEntry};
use crate::api::{AppState, uncached};
use crate::kafka::dead_letter::DeadLetterRow;
use crate::observability::outages::OutageView;
use crate::outbox::OutboxBacklog;

/// The page.
const PAGE: &str = include_str!("../../static/dashboard/index.html");

/// How many open dead letters a view lists (oldest first).
const DEAD_LETTERS_SHOWN: u32 = 50;
/// How many best sellers a view lists.
const BEST_SELLERS_SHOWN: usize = 10;

/// The live ops dashboard.
///
/// Plain HTML (public: it holds no data); its data comes from `GET /admin/dashboard/events`
/// with the admin token (passed as `/dashboard#token=…` or asked for).
#[utoipa::path(
    get,
    path = "/dashboard",
    tag = "observability",
    operation_id = "dashboardPage",
    responses(
        (status = 200, description = "The page.", content_type = "text/html", body = String),
        crate::api::responses::ServerErrors,
    )
)]
pub async fn page() -> HttpResponse {
    uncached("text/html; charset=utf-8", PAGE)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupView {
    #[serde(flatten)]
    group: ConsumerGroupState,
    /// Every partition of the group's topics, owned here or not.
    lag: Vec<PartitionLag>,
}

/// One view of the dashboard.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DashboardView {
    at: chrono::DateTime<chrono::Utc>,
    consumer_groups: Vec<GroupView>,
    domain_actors: Vec<DomainActorState>,
    dead_letters: Vec<DeadLetterRow>,
    outbox: OutboxBacklog,
    outbox_relay: serde_json::Value,
    retry_scheduler: serde_json::Value,
    outages: Vec<OutageView>,
    best_sellers: Vec<RankingEntry>,
    /// Coupon requests decided by this instance since it started.
    coupon_decisions: CouponDecisions,
    /// Where a part of the view could not be read (a dependency down), by part.
    unavailable: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct CouponDecisions {
    issued: u64,
    refused: u64,
}

impl CouponDecisions {
    fn of(actors: &[DomainActorState]) -> Self {
        let Some(issuer) = actors.iter().find(|actor| actor.name == "CouponIssuer") else {
            return Self::default();
        };
        let refused = issuer.details["refused"]
            .as_object()
            .map(|reasons| reasons.values().filter_map(|count| count.as_u64()).sum())
            .unwrap_or(0);
        Self {
            issued: issuer.details["issued"].as_u64().unwrap_or(0),
            refused,
        }
    }
}

async fn view(state: &AppState) -> DashboardView {
    let operations = &state.operations;
    let mut unavailable = Vec::new();
    let mut tree = operations.actors.observe().await;
    let lag = operations.lag.current();
    let consumer_groups = tree
        .consumer_groups
        .drain(..)
        .map(|group| GroupView {
            lag: lag
                .iter()
                .filter(|partition| partition.consumer_group == group.group_id)
                .cloned()
                .collect(),
            group,
        })
        .collect();
    let dead_letters = match operations.dead_letters.open(0, DEAD_LETTERS_SHOWN).await {
        Ok(letters) => letters,
        Err(error) => {
            unavailable.push(format!("deadLetters: {error}"));
            Vec::new()
        }
    };
    let best_sellers = match ranking::best_sellers(state, 1, BEST_SELLERS_SHOWN).await {
        Ok(best) => best,
        Err(error) => {
            unavailable.push(format!("bestSellers: {error}"));
            Vec::new()
        }
    };
    let mut background = tree.background;
    DashboardView {
        at: chrono::Utc::now(),
        coupon_decisions: CouponDecisions::of(&tree.domain_actors),
        consumer_groups,
        domain_actors: tree.domain_actors,
        dead_letters,
        outbox: operations.outbox_backlog.current(),
        outbox_relay: background.remove("outboxRelay").unwrap_or_default(),
        retry_scheduler: background.remove("retryScheduler").unwrap_or_default(),
        outages: operations.outages.current(),
        best_sellers,
        unavailable,
    }
}

/// One view of the dashboard.
///
/// Consumer groups with each partition's lag, domain actors, open dead letters, the
/// outbox, the retry scheduler, outages, today's best sellers and the coupon decisions so
/// far. Its exact shape is internal.
#[utoipa::path(
    get,
    path = "/admin/dashboard",
    tag = "observability",
    operation_id = "dashboardSnapshot",
    responses(
        (status = 200, description = "The view.", body = Object),
        crate::api::responses::AdminErrors,
        crate::api::responses::ServerErrors,
    ),
    security(("bearerAuth" = []))
)]
pub async fn snapshot(state: web::Data<AppState>, _admin: Admin) -> HttpResponse {
    HttpResponse::Ok().json(view(&state).await)
}

/// The dashboard's views, live.
///
/// Server-Sent Events (`event: view`), one view every `metrics.dashboard_interval_ms`,
/// until the client leaves or the daemon stops.
#[utoipa::path(
    get,
    path = "/admin/dashboard/events",
    tag = "observability",
    operation_id = "dashboardStream",
    responses(
        (status = 200, description = "A stream of views (`text/event-stream`).",
            content_type = "text/event-stream", body = String),
        crate::api::responses::AdminErrors,
        crate::api::responses::ServerErrors,
    ),
    security(("bearerAuth" = []))
)]
pub async fn stream(state: web::Data<AppState>, _admin: Admin) -> HttpResponse {
    let interval = Duration::from_millis(state.operations.dashboard_interval_ms.max(100));
    let closing = state.coupons.sessions.closing();
    let views = futures::stream::unfold(
        (state, true, closing),
        move |(state, first, closing)| async move {
            if !first {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = closing.cancelled() => return None,
                }
            }
            let json = serde_json::to_string(&view(&state).await).expect("a view serializes");
            let frame = web::Bytes::from(format!("event: view\ndata: {json}\n\n"));
            Some((Ok::<_, actix_web::Error>(frame), (state, false, closing)))
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(views)
}
