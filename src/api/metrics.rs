//! `GET /metrics`: the Prometheus text format, rendered by this server; and the middleware
//! that traces and measures every request ([`Observed`]).

use std::time::{Duration, Instant};

use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::{HttpResponse, web};

use crate::api::AppState;
use crate::observability::metrics;
use crate::observability::trace::{TRACEPARENT, TraceParent};

/// How long a scrape waits for Redis to answer its ping.
const REDIS_PING_TIMEOUT: Duration = Duration::from_millis(500);

/// Prometheus metrics.
///
/// Every metric of the process (see [`crate::observability::metrics`]), after reading the values
/// only a scrape reads: pool use, push sessions, Redis's ping.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "observability",
    operation_id = "metrics",
    responses(
        crate::api::responses::ServerErrors,
        (status = 200, description = "The Prometheus text exposition format (0.0.4).",
            content_type = "text/plain", body = String),
    )
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let operations = &state.operations;
    for (name, pool) in &operations.pools {
        metrics::db_pool(name, pool);
    }
    metrics::push_sessions_open(state.coupons.sessions.state().sessions);
    let started = Instant::now();
    let ping = tokio::time::timeout(REDIS_PING_TIMEOUT, operations.redis.ping()).await;
    metrics::redis_ping(matches!(ping, Ok(Ok(()))), started.elapsed());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics::render())
}

/// Middleware that observes every request:
/// - puts it in a trace (see [`crate::observability::trace`]): the caller's `traceparent` when valid, a new
///   trace otherwise; the handler runs in it and in a `request` span with its `trace_id`,
///   and the answer's `traceparent` names this server's hop;
/// - counts and times it by route template, method and status (`http_requests_total`,
///   `http_request_duration_seconds`). Requests that match no route are counted under
///   `route="unmatched"`, so a scan of random paths adds one series only;
/// - exports it as a server span when spans are exported (see [`crate::observability::otlp`]).
pub struct Observed {
    spans: crate::observability::otlp::Spans,
}

impl Observed {
    pub fn new(spans: crate::observability::otlp::Spans) -> Self {
        Self { spans }
    }
}

impl<S, B> Transform<S, ServiceRequest> for Observed
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = ObservedService<S>;
    type InitError = ();
    type Future = std::future::Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        std::future::ready(Ok(ObservedService {
            service,
            spans: self.spans.clone(),
        }))
    }
}

pub struct ObservedService<S> {
    service: S,
    spans: crate::observability::otlp::Spans,
}

impl<S, B> Service<ServiceRequest> for ObservedService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Future = futures::future::LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        use tracing::Instrument as _;
        let started = Instant::now();
        let method = request.method().to_string();
        let route = request
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_string());
        let caller = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|value| value.to_str().ok())
            .and_then(TraceParent::parse);
        let hop = caller
            .as_ref()
            .map(TraceParent::child)
            .unwrap_or_else(TraceParent::generate);
        let span = tracing::info_span!("request", trace_id = %hop.trace_id);
        let header = hop.header_value();
        let exported = self.spans.enabled().then(|| {
            (
                self.spans.clone(),
                hop.clone(),
                std::time::SystemTime::now(),
            )
        });
        let answer =
            crate::observability::trace::in_trace(hop, self.service.call(request).instrument(span));
        Box::pin(async move {
            let answer = answer.await;
            let status = match &answer {
                Ok(response) => response.status().as_u16(),
                Err(error) => error.as_response_error().status_code().as_u16(),
            };
            metrics::http_request(&route, &method, status, started.elapsed());
            if let Some((spans, hop, started_at)) = exported {
                spans.record(&hop, || {
                    use crate::observability::otlp::{SpanKind, SpanRecord};
                    SpanRecord::of(
                        SpanKind::Server,
                        format!("{method} {route}"),
                        &hop,
                        caller.as_ref().map(|caller| caller.parent_id.as_str()),
                        started_at,
                    )
                    .attribute("http.request.method", method.as_str())
                    .attribute("http.route", route.as_str())
                    .attribute("http.response.status_code", i64::from(status))
                    .failed((status >= 500).then(|| format!("answered {status}")))
                });
            }
            let mut response = answer?;
            if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&header) {
                response.headers_mut().insert(
                    actix_web::http::header::HeaderName::from_static(TRACEPARENT),
                    value,
                );
            }
            Ok(response)
        })
    }
}
