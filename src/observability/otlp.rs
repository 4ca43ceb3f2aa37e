//! Trace export over OTLP (OTLP/HTTP, JSON bodies, `POST {otlp.endpoint}/v1/traces`), off
//! unless `otlp.endpoint` is set. The spans are the hops of [`crate::observability::trace`]'s context, with
//! the same ids the `traceparent` headers carry, so a collector (the OpenTelemetry
//! Collector, Jaeger, Tempo) joins them with the caller's and the webhook receiver's spans:
//!
//! - `server`: one per HTTP request (`POST /orders/{id}/pay`); its span id is the parent id
//!   in the answer's `traceparent` and in the events the request produced;
//! - `consumer`: one per event and consumer (`process order-completed`), a child of the
//!   span that produced the event, over the batch that handled it;
//! - `client`: one per webhook attempt, its span id the one in the webhook's `traceparent`.
//!
//! Only sampled contexts (flag `01`) are exported. Spans queue in memory (`otlp.queue`) and
//! leave in batches (`otlp.batch_size`, at least every `otlp.interval_ms`) from a thread of
//! their own; when the queue is full or the collector fails, spans are dropped and counted
//! (`otlp_spans_dropped_total`): tracing never slows or stops the work it describes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::config::{InstanceSettings, OtlpSettings};
use crate::observability::trace::TraceParent;

/// What a span is to its trace (OTLP's `SpanKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
    Consumer,
}

impl SpanKind {
    fn code(self) -> u8 {
        match self {
            Self::Server => 2,
            Self::Client => 3,
            Self::Consumer => 5,
        }
    }
}

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attribute {
    Text(String),
    Int(i64),
}

impl From<&str> for Attribute {
    fn from(text: &str) -> Self {
        Self::Text(text.to_string())
    }
}

impl From<String> for Attribute {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<i64> for Attribute {
    fn from(number: i64) -> Self {
        Self::Int(number)
    }
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub name: String,
    pub kind: SpanKind,
    pub trace_id: String,
    pub span_id: String,
    /// The span that led to this one, when there is one (a caller's, a producer's).
    pub parent_span_id: Option<String>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attribute)>,
    /// Set when the work failed: the span's status is then `ERROR` with this message.
    pub error: Option<String>,
}

impl SpanRecord {
    /// A span of `kind` in `context`'s trace: its own id is `context`'s parent id (the hop
    /// it made), its parent `parent_span_id`.
    pub fn of(
        kind: SpanKind,
        name: impl Into<String>,
        context: &TraceParent,
        parent_span_id: Option<&str>,
        start: SystemTime,
    ) -> Self {
        Self {
            name: name.into(),
            kind,
            trace_id: context.trace_id.clone(),
            span_id: context.parent_id.clone(),
            parent_span_id: parent_span_id.map(str::to_string),
            start,
            end: SystemTime::now(),
            attributes: Vec::new(),
            error: None,
        }
    }

    pub fn attribute(mut self, key: &'static str, value: impl Into<Attribute>) -> Self {
        self.attributes.push((key, value.into()));
        self
    }

    pub fn failed(mut self, error: Option<String>) -> Self {
        self.error = error;
        self
    }
}

enum Message {
    Span(Box<SpanRecord>),
    Flush(oneshot::Sender<()>),
}

/// Where finished spans go: a handle passed to what records them, cheap to clone. The
/// default handle exports nothing and costs nothing.
#[derive(Clone, Default)]
pub struct Spans {
    sender: Option<mpsc::Sender<Message>>,
}

impl Spans {
    /// Starts the export thread when `otlp.endpoint` is set; otherwise a handle that
    /// exports nothing.
    pub fn start(settings: &OtlpSettings, instance: &InstanceSettings) -> std::io::Result<Self> {
        if settings.endpoint.is_empty() {
            return Ok(Self::default());
        }
        let (sender, receiver) = mpsc::channel(settings.queue.max(1));
        let exporter = Exporter {
            url: format!("{}/v1/traces", settings.endpoint.trim_end_matches('/')),
            resource: resource(settings, instance),
            batch_size: settings.batch_size.max(1),
            interval: Duration::from_millis(settings.interval_ms.max(1)),
            timeout: Duration::from_millis(settings.timeout_ms.max(1)),
        };
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || actix_rt::System::new().block_on(exporter.run(receiver)))?;
        tracing::info!(endpoint = %settings.endpoint, "exporting traces over OTLP");
        Ok(Self {
            sender: Some(sender),
        })
    }

    /// Whether spans are exported (callers skip building them otherwise).
    pub fn enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues the span `build` makes, when spans are exported and `context` is sampled.
    pub fn record(&self, context: &TraceParent, build: impl FnOnce() -> SpanRecord) {
        let Some(sender) = &self.sender else {
            return;
        };
        if !context.sampled() {
            return;
        }
        if sender.try_send(Message::Span(Box::new(build()))).is_err() {
            crate::observability::metrics::otlp_spans_dropped("queue_full", 1);
        }
    }

    /// Sends what is queued and waits for it to leave, at most `deadline` (at shutdown).
    pub async fn flush(&self, deadline: Duration) {
        let Some(sender) = &self.sender else {
            return;
        };
        let (done, sent) = oneshot::channel();
        if sender.send(Message::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(deadline, sent).await;
        }
    }
}

fn resource(settings: &OtlpSettings, instance: &InstanceSettings) -> Value {
    json!({
        "attributes": [
            attribute_json("service.name", &Attribute::from(settings.service_name.as_str())),
            attribute_json("service.instance.id", &Attribute::from(instance.id.as_str())),
            attribute_json("service.version", &Attribute::from(env!("CARGO_PKG_VERSION"))),
        ]
    })
}

struct Exporter {
    url: String,
    resource: Value,
    batch_size: usize,
    interval: Duration,
    timeout: Duration,
}

impl Exporter {
    /// Batches spans until the handles are gone; a batch leaves when full, when the
    /// interval passes, or when a flush asks.
    async fn run(self, mut receiver: mpsc::Receiver<Message>) {
        let client = awc::Client::builder()
            .timeout(self.timeout)
            .disable_redirects()
            .finish();
        let mut batch: Vec<SpanRecord> = Vec::with_capacity(self.batch_size);
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            let flushed = tokio::select! {
                message = receiver.recv() => match message {
                    Some(Message::Span(span)) => {
                        batch.push(*span);
                        if batch.len() < self.batch_size {
                            continue;
                        }
                        None
                    }
                    Some(Message::Flush(done)) => Some(done),
                    None => {
                        self.send(&client, &mut batch, &mut failing).await;
                        return;
                    }
                },
                _ = ticker.tick() => None,
            };
            self.send(&client, &mut batch, &mut failing).await;
            if let Some(done) = flushed {
                let _ = done.send(());
            }
        }
    }

    async fn send(&self, client: &awc::Client, batch: &mut Vec<SpanRecord>, failing: &mut bool) {
        if batch.is_empty() {
            return;
        }
        let spans = batch.len() as u64;
        let body = export_request(&self.resource, batch);
        batch.clear();
        let answer = client
            .post(self.url.as_str())
            .insert_header(("content-type", "application/json"))
            .send_body(body)
            .await;
        let failure = match answer {
            Ok(mut response) if response.status().is_success() => {
                let _ = response.body().limit(64 * 1024).await;
                None
            }
            Ok(response) => Some(format!("the collector answered {}", response.status())),
            Err(error) => Some(error.to_string()),
        };
        match failure {
            None => {
                if *failing {
                    tracing::info!(url = %self.url, "the trace collector takes spans again");
                }
                *failing = false;
                crate::observability::metrics::otlp_spans_exported(spans);
            }
            Some(error) => {
                // One line per failing streak, not per batch.
                if !*failing {
                    tracing::warn!(url = %self.url, %error, "trace export failed: spans dropped");
                }
                *failing = true;
                crate::observability::metrics::otlp_spans_dropped("export_failed", spans);
            }
        }
    }
}

/// An `ExportTraceServiceRequest` in OTLP's JSON encoding (ids in hex, times as decimal
/// strings of Unix nanoseconds).
pub fn export_request(resource: &Value, spans: &[SpanRecord]) -> Vec<u8> {
    let spans: Vec<Value> = spans.iter().map(span_json).collect();
    serde_json::to_vec(&json!({
        "resourceSpans": [{
            "resource": resource,
            "scopeSpans": [{
                "scope": {"name": env!("CARGO_PKG_NAME"), "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    }))
    .expect("a trace export serializes")
}

fn nanos(at: SystemTime) -> String {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

fn attribute_json(key: &str, value: &Attribute) -> Value {
    let value = match value {
        Attribute::Text(text) => json!({"stringValue": text}),
        Attribute::Int(number) => json!({"intValue": number.to_string()}),
    };
    json!({"key": key, "value": value})
}

fn span_json(span: &SpanRecord) -> Value {
    let mut object = json!({
        "traceId": span.trace_id,
        "spanId": span.span_id,
        "name": span.name,
        "kind": span.kind.code(),
        "startTimeUnixNano": nanos(span.start),
        "endTimeUnixNano": nanos(span.end.max(span.start)),
        "attributes": span
            .attributes
            .iter()
            .map(|(key, value)| attribute_json(key, value))
            .collect::<Vec<_>>(),
        "status": match &span.error {
            Some(message) => json!({"code": 2, "message": message}),
            None => json!({"code": 0}),
        },
    });
    if let Some(parent) = &span.parent_span_id {
        object["parentSpanId"] = json!(parent);
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_is_encoded_as_otlp_json() {
        let context =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_123);
        let mut span = SpanRecord::of(
            SpanKind::Server,
            "POST /orders/{id}/pay",
            &context,
            Some("1111111111111111"),
            start,
        )
        .attribute("http.request.method", "POST")
        .attribute("http.response.status_code", 200)
        .failed(Some("boom".into()));
        span.end = start + Duration::from_millis(5);
        let body: Value = serde_json::from_slice(&export_request(
            &json!({"attributes": []}),
            std::slice::from_ref(&span),
        ))
        .unwrap();
        let encoded = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(encoded["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(encoded["spanId"], "00f067aa0ba902b7");
        assert_eq!(encoded["parentSpanId"], "1111111111111111");
        assert_eq!(encoded["kind"], 2);
        assert_eq!(encoded["startTimeUnixNano"], "1700000000000000123");
        assert_eq!(encoded["endTimeUnixNano"], "1700000000005000123");
        assert_eq!(
            encoded["attributes"][1],
            json!({"key": "http.response.status_code", "value": {"intValue": "200"}})
        );
        assert_eq!(encoded["status"], json!({"code": 2, "message": "boom"}));
    }

    #[test]
    fn disabled_spans_build_nothing() {
        let context = TraceParent::generate();
        Spans::default().record(&context, || panic!("not built when disabled"));
    }
}
