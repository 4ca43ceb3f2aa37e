//! Delivering events to an external system as webhooks, with the Standard Webhooks headers
//! (or, for a file target, as JSON lines).
//!
//! Each delivery is a `POST {base_url}{route}` with the body
//! `{"type", "eventId", "timestamp", "data"}` and the headers
//!
//! - `webhook-id`: the event id, the same on every retry, so the receiver can deduplicate;
//! - `webhook-timestamp`: seconds since the epoch when the attempt was made;
//! - `webhook-signature`: `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")),
//!   when a signing secret is configured. A secret written `whsec_<base64>` is the base64
//!   of the key, as the standard has it; any other value is used as the key's bytes.
//!
//! How an answer is classed ([`classify`]): 2xx delivered; connection errors, timeouts, 5xx,
//! 408 and 429 retried later (honouring `Retry-After`); any other answer is a rejection,
//! dead-lettered at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::Sha256;

use crate::common::grouped::{GroupWrite, Grouped};
use crate::config::ExternalSettings;
use crate::events::{EventEnvelope, EventType};
use crate::observability::otlp::{SpanKind, SpanRecord};
use crate::observability::trace::{TRACEPARENT, TraceParent};

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// The key webhook signatures are made with.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// `whsec_<base64>` is decoded; anything else is taken as the key's bytes.
    pub fn parse(secret: &str) -> Result<Self, base64::DecodeError> {
        match secret.strip_prefix("whsec_") {
            Some(encoded) => Ok(Self(BASE64.decode(encoded)?)),
            None => Ok(Self(secret.as_bytes().to_vec())),
        }
    }

    /// `v1,<base64 signature>` over `{id}.{timestamp}.{body}`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

/// The body of a webhook.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    event_id: String,
    timestamp: DateTime<Utc>,
    data: serde_json::Value,
}

/// What an attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered,
    /// Worth another attempt; `after` is what the receiver asked for (`Retry-After`).
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// The receiver refused it; another attempt would be refused too.
    Rejected {
        error: String,
    },
}

/// What came back from one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// No answer: connection refused or reset, timeout.
    NoAnswer(String),
}

/// Classes an answer (see the module documentation).
pub fn classify(answer: &Answer, now: DateTime<Utc>) -> DeliveryOutcome {
    match answer {
        Answer::NoAnswer(error) => DeliveryOutcome::Retry {
            error: error.clone(),
            after: None,
        },
        Answer::Status { code, .. } if (200..300).contains(code) => DeliveryOutcome::Delivered,
        Answer::Status { code, retry_after } if *code == 408 || *code == 429 || *code >= 500 => {
            DeliveryOutcome::Retry {
                error: format!("HTTP {code}"),
                after: retry_after
                    .as_deref()
                    .and_then(|value| parse_retry_after(value, now)),
            }
        }
        Answer::Status { code, .. } => DeliveryOutcome::Rejected {
            error: format!("HTTP {code}"),
        },
    }
}

/// `Retry-After` is either seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or_default())
}

/// Where events of one type go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// POSTed to this URL, as a webhook.
    Http(String),
    /// Appended to this file, one webhook body per line (JSON lines).
    File(PathBuf),
}

/// Delivers events to their type's [`Target`].
#[derive(Clone)]
pub struct WebhookDeliverer {
    targets: BTreeMap<EventType, Target>,
    key: Option<SigningKey>,
    timeout: Duration,
    /// Where each attempt's client span goes (see [`crate::observability::otlp`]).
    spans: crate::observability::otlp::Spans,
    /// Appends to file targets, the lines of concurrent attempts with one `fsync`.
    files: std::sync::Arc<Grouped<FileAppend>>,
}

thread_local! {
    /// One HTTP client (and connection pool) per arbiter thread: awc's client is bound to
    /// the thread that made it. Its connector has no connection limit of its own (awc's
    /// default is 100 at once): the forwarders' `max_in_flight` per partition and the
    /// scheduler's 16 attempts per pass bound the deliveries at once.
    static CLIENT: awc::Client = awc::Client::builder()
        .disable_redirects()
        .connector(awc::Connector::new().limit(0))
        .finish();
}

impl WebhookDeliverer {
    /// The targets `external.*` describes (none when `external.base_url` is empty). Route
    /// keys are event type names, matched without regard to case (environment variables
    /// arrive lower-cased).
    pub fn external_targets(
        settings: &ExternalSettings,
    ) -> anyhow::Result<BTreeMap<EventType, Target>> {
        let mut targets = BTreeMap::new();
        if settings.base_url.is_empty() {
            return Ok(targets);
        }
        let base_url = settings.base_url.trim_end_matches('/');
        for (name, path) in &settings.routes {
            let event_type = EventType::ALL
                .iter()
                .copied()
                .find(|known| known.as_str().eq_ignore_ascii_case(name))
                .ok_or_else(|| anyhow::anyhow!("external.routes: unknown event type {name:?}"))?;
            if !path.starts_with('/') {
                anyhow::bail!("external.routes.{name}: {path:?} must start with '/'");
            }
            targets.insert(event_type, Target::Http(format!("{base_url}{path}")));
        }
        Ok(targets)
    }

    /// A deliverer of `targets`, signing with `external.signing_secret`.
    pub fn from_settings(
        targets: BTreeMap<EventType, Target>,
        settings: &ExternalSettings,
    ) -> anyhow::Result<Self> {
        Self::new(
            targets,
            Some(&settings.signing_secret),
            Duration::from_millis(settings.timeout_ms),
        )
        .map_err(|error| {
            anyhow::anyhow!("external.signing_secret: not valid whsec_ base64: {error}")
        })
    }

    /// The event types that have a target.
    pub fn event_types(&self) -> Vec<EventType> {
        self.targets.keys().copied().collect()
    }

    pub fn new(
        targets: BTreeMap<EventType, Target>,
        secret: Option<&SecretString>,
        timeout: Duration,
    ) -> Result<Self, base64::DecodeError> {
        let key = secret
            .map(|secret| secret.expose_secret())
            .filter(|secret| !secret.is_empty())
            .map(SigningKey::parse)
            .transpose()?;
        Ok(Self {
            targets,
            key,
            timeout,
            spans: Default::default(),
            files: std::sync::Arc::new(Grouped::new(FileAppend)),
        })
    }

    /// The same deliverer, exporting a client span per attempt to `spans`.
    pub fn with_spans(self, spans: crate::observability::otlp::Spans) -> Self {
        Self { spans, ..self }
    }

    /// Where events of this type go (a URL or a file path), as logs and views name it.
    pub fn target_name(&self, event_type: EventType) -> String {
        match self.targets.get(&event_type) {
            Some(Target::Http(url)) => url.clone(),
            Some(Target::File(path)) => path.display().to_string(),
            None => format!("(no route for {event_type})"),
        }
    }

    /// Whether events of this type have somewhere to go.
    pub fn routes(&self, event_type: EventType) -> bool {
        self.targets.contains_key(&event_type)
    }

    /// One attempt at delivering `event`, made at `now`: its body written to its type's
    /// target, the answer classed, and the attempt exported as a client span when the event
    /// is part of a trace.
    pub async fn deliver(&self, event: &EventEnvelope, now: DateTime<Utc>) -> DeliveryOutcome {
        let Some(target) = self.targets.get(&event.event_type()) else {
            return DeliveryOutcome::Rejected {
                error: format!("no webhook route for {}", event.event_type()),
            };
        };
        let id = event.event_id.to_string();
        let body = webhook_body(event, &id);
        let url = match target {
            Target::Http(url) => url,
            Target::File(path) => {
                return match self.files.submit((path.clone(), body)).await {
                    Some(outcome) => outcome,
                    // The writer is gone (its arbiter stopped): this attempt appends alone.
                    None => {
                        let line = (path.clone(), webhook_body(event, &id));
                        FileAppend.write(vec![line]).await.remove(0)
                    }
                };
            }
        };
        // The receiver joins the event's trace: one hop further down it.
        let parent = event.traceparent.as_deref().and_then(TraceParent::parse);
        let hop = parent.as_ref().map(TraceParent::child);
        let request = self.request(url, &id, now.timestamp(), &body, hop.as_ref());
        let started = std::time::SystemTime::now();
        let answer = send(request, body).await;
        let outcome = classify(&answer, now);
        if let (Some(parent), Some(hop)) = (&parent, &hop) {
            self.spans.record(hop, || {
                attempt_span(event, &id, parent, hop, started, &answer, &outcome)
            });
        }
        tracing::debug!(
            event_id = %id,
            trace_id = parent.as_ref().map(|parent| parent.trace_id.as_str()),
            ?outcome,
            "webhook attempted"
        );
        outcome
    }

    /// The POST of a webhook to `url` with its headers: content type, id, timestamp, the
    /// signature when a key is configured, and `traceparent` naming `hop` when there is one.
    fn request(
        &self,
        url: &str,
        id: &str,
        timestamp: i64,
        body: &[u8],
        hop: Option<&TraceParent>,
    ) -> awc::ClientRequest {
        let mut request = CLIENT
            .with(|client| client.post(url))
            .timeout(self.timeout)
            .insert_header(("content-type", "application/json"))
            .insert_header((ID_HEADER, id))
            .insert_header((TIMESTAMP_HEADER, timestamp.to_string()));
        if let Some(key) = &self.key {
            request = request.insert_header((SIGNATURE_HEADER, key.sign(id, timestamp, body)));
        }
        if let Some(hop) = hop {
            request = request.insert_header((TRACEPARENT, hop.header_value()));
        }
        request
    }
}

/// The JSON body of `event`'s webhook (`id` is its event id).
fn webhook_body(event: &EventEnvelope, id: &str) -> Vec<u8> {
    serde_json::to_vec(&WebhookBody {
        kind: event.event_type().as_str(),
        event_id: id.to_string(),
        timestamp: event.occurred_at,
        data: event.payload_json(),
    })
    .expect("a webhook body serializes")
}

/// Sends `request` with `body`, and reads what came back: the status and `Retry-After`, or
/// why nothing did.
async fn send(request: awc::ClientRequest, body: Vec<u8>) -> Answer {
    match request.send_body(body).await {
        Ok(mut response) => {
            // Read the body so the connection can be reused.
            let _ = response.body().limit(64 * 1024).await;
            Answer::Status {
                code: response.status().as_u16(),
                retry_after: response
                    .headers()
                    .get("retry-after")
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_string),
            }
        }
        Err(error) => Answer::NoAnswer(error.to_string()),
    }
}

/// The client span of one attempt: `POST <event type>` from `started`, one `hop` below the
/// event's `parent`, with the answer's status (or why there was none) and, unless it was
/// delivered, the error.
fn attempt_span(
    event: &EventEnvelope,
    id: &str,
    parent: &TraceParent,
    hop: &TraceParent,
    started: std::time::SystemTime,
    answer: &Answer,
    outcome: &DeliveryOutcome,
) -> SpanRecord {
    let span = SpanRecord::of(
        SpanKind::Client,
        format!("POST {}", event.event_type()),
        hop,
        Some(&parent.parent_id),
        started,
    )
    .attribute("http.request.method", "POST")
    .attribute("messaging.message.id", id.to_string());
    let span = match answer {
        Answer::Status { code, .. } => {
            span.attribute("http.response.status_code", i64::from(*code))
        }
        Answer::NoAnswer(error) => span.attribute("error.type", error.clone()),
    };
    span.failed(match outcome {
        DeliveryOutcome::Delivered => None,
        DeliveryOutcome::Retry { error, .. } | DeliveryOutcome::Rejected { error } => {
            Some(error.clone())
        }
    })
}

/// Appends lines to files: each write takes the lines waiting, writes each file's lines
/// with one `write` (in the order they came) and syncs it once, on a blocking thread, before
/// any of them counts as delivered; an I/O failure is retried later.
#[derive(Clone, Copy)]
struct FileAppend;

impl GroupWrite for FileAppend {
    /// A file and one body, written as a line.
    type Item = (PathBuf, Vec<u8>);
    type Answer = DeliveryOutcome;

    const MAX_ITEMS: usize = 1_000;

    async fn write(&self, lines: Vec<(PathBuf, Vec<u8>)>) -> Vec<DeliveryOutcome> {
        let mut files: BTreeMap<PathBuf, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
        for (position, (path, body)) in lines.into_iter().enumerate() {
            let (positions, bytes) = files.entry(path).or_default();
            positions.push(position);
            bytes.extend_from_slice(&body);
            bytes.push(b'\n');
        }
        let count = files.values().map(|(positions, _)| positions.len()).sum();
        let written = tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .map(|(path, (positions, bytes))| (positions, append(&path, &bytes)))
                .collect::<Vec<_>>()
        })
        .await;
        let mut outcomes = vec![DeliveryOutcome::Delivered; count];
        match written {
            Ok(files) => {
                for (positions, result) in files {
                    if let Err(error) = result {
                        for position in positions {
                            outcomes[position] = DeliveryOutcome::Retry {
                                error: format!("cannot append to the file: {error}"),
                                after: None,
                            };
                        }
                    }
                }
            }
            Err(error) => outcomes.fill(DeliveryOutcome::Retry {
                error: format!("file append did not finish: {error}"),
                after: None,
            }),
        }
        outcomes
    }
}

/// Appends `bytes` to the file at `path` (created, with its directory, if missing) with one
/// write, so concurrent appends do not interleave, and syncs its data.
fn append(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(directory) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(directory)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap()
    }

    fn status(code: u16) -> Answer {
        Answer::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn answers_are_classed_as_the_integration_contract_says() {
        let class = |outcome: DeliveryOutcome| match outcome {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retry { .. } => "retried",
            DeliveryOutcome::Rejected { .. } => "rejected",
        };
        let expected = [
            (&[200, 204][..], "delivered"),
            (&[408, 429, 500, 502, 503], "retried"),
            (&[301, 400, 401, 404, 422], "rejected"),
        ];
        for (codes, expected) in expected {
            for code in codes {
                assert_eq!(class(classify(&status(*code), now())), expected, "{code}");
            }
        }
        assert!(matches!(
            classify(&Answer::NoAnswer("connection refused".into()), now()),
            DeliveryOutcome::Retry { after: None, .. }
        ));
    }

    #[test]
    fn retry_after_is_honoured_in_seconds_or_as_a_date() {
        let answer = |value: &str| Answer::Status {
            code: 429,
            retry_after: Some(value.into()),
        };
        let after = |answer| match classify(&answer, now()) {
            DeliveryOutcome::Retry { after, .. } => after,
            other => panic!("{other:?}"),
        };
        assert_eq!(after(answer("3")), Some(Duration::from_secs(3)));
        assert_eq!(
            after(answer("Tue, 24 Nov 2026 10:00:42 GMT")),
            Some(Duration::from_secs(42))
        );
        assert_eq!(after(answer("soon")), None);
    }

    #[actix_rt::test]
    async fn lines_written_together_land_in_their_own_files_in_the_order_they_came() {
        let directory = std::env::temp_dir().join(format!("file-append-{}", std::process::id()));
        let (first, second) = (directory.join("a.jsonl"), directory.join("b/b.jsonl"));
        let lines = vec![
            (first.clone(), b"1".to_vec()),
            (second.clone(), b"2".to_vec()),
            (first.clone(), b"3".to_vec()),
        ];
        let outcomes = FileAppend.write(lines).await;
        assert_eq!(outcomes, vec![DeliveryOutcome::Delivered; 3]);
        assert_eq!(std::fs::read_to_string(&first).unwrap(), "1\n3\n");
        assert_eq!(std::fs::read_to_string(&second).unwrap(), "2\n");

        // A file that cannot be written fails its own lines only.
        let blocked = first.join("not-a-directory.jsonl");
        let outcomes = FileAppend
            .write(vec![
                (blocked, b"4".to_vec()),
                (second.clone(), b"5".to_vec()),
            ])
            .await;
        assert!(
            matches!(outcomes[0], DeliveryOutcome::Retry { .. }),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1], DeliveryOutcome::Delivered);
        assert_eq!(std::fs::read_to_string(&second).unwrap(), "2\n5\n");
        std::fs::remove_dir_all(directory).unwrap();
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
