//! One payment, one trace: the caller's `traceparent` reaches the consumers' log lines and
//! the webhook's `traceparent` header, and the daemon exports the trace's spans over OTLP
//! to a collector with the ids those headers carry.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use awc::http::StatusCode;
use serde_json::Value;

use crate::exclusive;
use crate::metrics::{configure_webhooks, receiver_refusing_first_attempts};
use testkit::app::{TestApp, client};
use testkit::receiver::Receiver;
use testkit::wait::eventually;

const WAIT: Duration = Duration::from_secs(30);

/// Every JSON log line of the process, from the first call on.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = logs.clone();
        // With TEST_LOG set, the tests' own subscriber may be first; then nothing is captured
        // and the log assertions below say so.
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(
                "info,commerce_events::actors::domain=debug,commerce_events::delivery=debug",
            )
            .with_writer(move || Capture(writer.clone()))
            .try_init();
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured lines that mention `trace_id`, parsed.
fn lines_of(logs: &Mutex<Vec<u8>>, trace_id: &str) -> Vec<Value> {
    String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter(|line| line.contains(trace_id))
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Whether a line was logged inside a consumer's batch span of `actor` for the trace.
fn in_batch_of(line: &Value, actor: &str, trace_id: &str) -> bool {
    line["spans"].as_array().is_some_and(|spans| {
        spans.iter().any(|span| {
            span["name"] == "batch"
                && span["actor"] == actor
                && span["trace_ids"]
                    .as_str()
                    .is_some_and(|ids| ids.contains(trace_id))
        })
    })
}

/// The spans of one trace an OTLP/HTTP collector (a receiver) was posted at `/v1/traces`
/// (JSON encoding), each post's resource naming the service.
fn spans_of_trace(collector: &Receiver, trace_id: &str) -> Vec<Value> {
    let mut spans = Vec::new();
    for post in collector.received_at("/v1/traces") {
        let body = post.json();
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            assert_eq!(
                resource["resource"]["attributes"][0],
                serde_json::json!({"key": "service.name", "value": {"stringValue": "commerce-events"}})
            );
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                spans.extend(
                    scope["spans"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|span| span["traceId"] == trace_id)
                        .cloned(),
                );
            }
        }
    }
    spans
}

/// A span's attribute value (string or integer, as text).
fn attribute(span: &Value, key: &str) -> Option<String> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|attribute| attribute["key"] == key)
        .map(|attribute| {
            let value = &attribute["value"];
            value["stringValue"]
                .as_str()
                .or(value["intValue"].as_str())
                .unwrap_or_default()
                .to_string()
        })
}

/// The span id in a `traceparent` header value.
fn span_id_of(traceparent: &str) -> String {
    commerce_events::observability::trace::TraceParent::parse(traceparent)
        .expect("a valid traceparent")
        .parent_id
}

#[actix_rt::test]
async fn a_payments_trace_reaches_the_consumers_logs_and_the_webhooks_traceparent() {
    let _exclusive = exclusive().await;
    let logs = captured_logs();
    let receiver = receiver_refusing_first_attempts(500);
    let address = receiver.address.clone();
    let collector = Receiver::start();
    let endpoint = collector.address.clone();
    let app = TestApp::builder()
        .settings(move |settings| {
            configure_webhooks(settings, &address);
            settings.otlp.endpoint = endpoint;
            settings.otlp.interval_ms = 100;
        })
        .start()
        .await;
    let buyer = app.create_user(100_000).await;
    let product = app.create_product("traced", 1_000, 10).await;
    let order = app.place_order(buyer, &[(product, 1)]).await;

    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let caller = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let mut answer = client()
        .post(format!("{}/orders/{order}/pay", app.address))
        .insert_header((
            "authorization",
            format!("Bearer {}", app.token(buyer, false)),
        ))
        .insert_header(("traceparent", caller.as_str()))
        .send()
        .await
        .expect("the payment is sent");
    let body = answer.body().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK, "{body:?}");
    let answered = answer
        .headers()
        .get("traceparent")
        .expect("a traceparent")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        answered.starts_with(&format!("00-{trace_id}-")),
        "{answered}"
    );
    assert_ne!(answered, caller, "the server answers with its own hop");

    // The webhook (refused once, then taken) carries the trace, a hop further, each time.
    eventually("the webhook's two attempts", WAIT, || async {
        receiver.received().len() >= 2
    })
    .await;
    for attempt in receiver.received() {
        let traceparent = attempt.header("traceparent").expect("a traceparent header");
        assert!(
            traceparent.starts_with(&format!("00-{trace_id}-")),
            "{traceparent}"
        );
        assert_ne!(traceparent, answered);
    }

    // The consumers' log lines carry the trace id: the ranking's, the forwarder's.
    for actor in ["RankingUpdater", "ExternalForwarder", "OrderAnalytics"] {
        eventually(
            &format!("a log line of {actor} in the trace"),
            WAIT,
            || async {
                lines_of(&logs, &trace_id)
                    .iter()
                    .any(|line| in_batch_of(line, actor, &trace_id))
            },
        )
        .await;
    }
    assert!(
        lines_of(&logs, &trace_id)
            .iter()
            .any(|line| line["message"] == "webhook attempted"
                && line["trace_id"] == trace_id.as_str()),
        "the webhook attempt's line names the trace"
    );
    // The collector has the trace: the payment's server span (the caller's child, its id
    // the answer's), a consumer span per consumer of its events (children of the
    // payment's span), a client span per webhook attempt (its id the webhook's header's).
    let request_span = span_id_of(&answered);
    let consumers = ["RankingUpdater", "ExternalForwarder", "OrderAnalytics"];
    eventually("the trace's spans at the collector", WAIT, || async {
        let spans = spans_of_trace(&collector, &trace_id);
        let consumed = consumers.iter().all(|actor| {
            spans.iter().any(|span| {
                span["kind"] == 5 && attribute(span, "commerce.actor").as_deref() == Some(*actor)
            })
        });
        let attempts = spans.iter().filter(|span| span["kind"] == 3).count();
        consumed && attempts >= 2 && spans.iter().any(|span| span["kind"] == 2)
    })
    .await;
    let spans = spans_of_trace(&collector, &trace_id);
    let server = spans
        .iter()
        .find(|span| span["kind"] == 2)
        .expect("a server span");
    assert_eq!(server["name"], "POST /orders/{order_id}/pay");
    assert_eq!(server["spanId"], request_span.as_str());
    assert_eq!(server["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(
        attribute(server, "http.response.status_code").as_deref(),
        Some("200")
    );
    for actor in consumers {
        let consumer = spans
            .iter()
            .find(|span| {
                span["kind"] == 5 && attribute(span, "commerce.actor").as_deref() == Some(actor)
            })
            .unwrap();
        assert_eq!(
            consumer["parentSpanId"],
            request_span.as_str(),
            "{consumer}"
        );
        assert_eq!(
            attribute(consumer, "messaging.system").as_deref(),
            Some("kafka")
        );
        assert!(
            consumer["name"]
                .as_str()
                .is_some_and(|name| name.starts_with("process ")),
            "{consumer}"
        );
    }
    let headers: Vec<String> = receiver
        .received()
        .iter()
        .filter_map(|attempt| attempt.header("traceparent"))
        .map(span_id_of)
        .collect();
    let attempts: Vec<&Value> = spans.iter().filter(|span| span["kind"] == 3).collect();
    for attempt in &attempts {
        assert_eq!(attempt["parentSpanId"], request_span.as_str(), "{attempt}");
        assert!(
            headers.iter().any(|id| attempt["spanId"] == id.as_str()),
            "{attempt} is one of the webhook requests {headers:?}"
        );
    }
    let refused = attempts
        .iter()
        .find(|attempt| attribute(attempt, "http.response.status_code").as_deref() == Some("500"))
        .expect("the refused attempt's span");
    assert_eq!(refused["status"]["code"], 2, "{refused}");

    // A request without a traceparent starts a trace of its own.
    let mut fresh = client()
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    let _ = fresh.body().await;
    let started = fresh
        .headers()
        .get("traceparent")
        .expect("a traceparent")
        .to_str()
        .unwrap();
    assert!(
        commerce_events::observability::trace::TraceParent::parse(started).is_some(),
        "{started}"
    );
    assert!(!started.contains(&trace_id));
}
