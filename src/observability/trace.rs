//! W3C trace context (`traceparent`) carried from an HTTP request into the events it
//! produces, their Kafka headers, the consumers' log lines and outgoing webhooks.
//!
//! - An HTTP request continues the caller's `traceparent` or starts a trace; its handler
//!   runs [`in_trace`], its log lines carry `trace_id`, and the answer has a `traceparent`
//!   header.
//! - An event created in a trace (`EventEnvelope::new`) keeps the trace
//!   context in its event-log row and sends it as the record's `traceparent` header; the
//!   consumer reads it back into the envelope.
//! - A consumer's batch runs in a span listing the `trace_ids` of its events; events a
//!   consumer produces continue their cause's trace (a coupon result its request's); a
//!   webhook carries its event's trace as a `traceparent` header.

use rdkafka::message::Headers;

tokio::task_local! {
    /// The trace the current task works in (an HTTP request's).
    static CURRENT: TraceParent;
}

/// The trace of the running task, if it runs in one ([`in_trace`]).
pub fn current() -> Option<TraceParent> {
    CURRENT.try_with(TraceParent::clone).ok()
}

/// Runs `work` in the trace `parent`: events it creates carry it on.
pub async fn in_trace<F: Future>(parent: TraceParent, work: F) -> F::Output {
    CURRENT.scope(parent, work).await
}

/// The distinct trace ids of the events whose `traceparent`s these are, comma-separated (a
/// batch's span field).
pub fn trace_ids<'a>(traceparents: impl IntoIterator<Item = &'a str>) -> String {
    let mut ids: Vec<&str> = traceparents
        .into_iter()
        .filter_map(|traceparent| traceparent.get(3..35))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.join(",")
}

/// The Kafka header and HTTP header that carry the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A valid `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: String,
}

fn is_lower_hex(text: &str, length: usize) -> bool {
    text.len() == length
        && text
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

impl TraceParent {
    /// Parses a header value; `None` when it is not a valid version-00 trace context (an
    /// all-zero trace or parent id is invalid).
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let valid = version == "00"
            && parts.next().is_none()
            && is_lower_hex(trace_id, 32)
            && is_lower_hex(parent_id, 16)
            && is_lower_hex(flags, 2)
            && trace_id.bytes().any(|byte| byte != b'0')
            && parent_id.bytes().any(|byte| byte != b'0');
        valid.then(|| Self {
            trace_id: trace_id.to_string(),
            parent_id: parent_id.to_string(),
            flags: flags.to_string(),
        })
    }

    /// A new trace (sampled).
    pub fn generate() -> Self {
        Self {
            trace_id: format!("{:032x}", uuid::Uuid::new_v4().as_u128()),
            parent_id: new_span_id(),
            flags: "01".into(),
        }
    }

    /// The same trace, one hop further: a new parent id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            parent_id: new_span_id(),
            flags: self.flags.clone(),
        }
    }

    /// Whether the caller asked for this trace to be recorded (flag `01`).
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.flags, 16).is_ok_and(|flags| flags & 1 == 1)
    }

    pub fn header_value(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.parent_id, self.flags)
    }
}

fn new_span_id() -> String {
    loop {
        let id = (uuid::Uuid::new_v4().as_u128() & u128::from(u64::MAX)) as u64;
        if id != 0 {
            return format!("{id:016x}");
        }
    }
}

/// The `traceparent` header of a consumed record, if it holds a valid one.
pub fn traceparent_header<H: Headers + ?Sized>(headers: Option<&H>) -> Option<String> {
    let headers = headers?;
    (0..headers.count())
        .filter_map(|index| headers.try_get(index))
        .find(|header| header.key == TRACEPARENT)
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(TraceParent::parse)
        .map(|parent| parent.header_value())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_valid_version_00_contexts_parse() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(TraceParent::parse(valid).unwrap().header_value(), valid);
        for invalid in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(invalid), None, "{invalid:?}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_parent() {
        let root = TraceParent::generate();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.parent_id, root.parent_id);
        assert!(TraceParent::parse(&child.header_value()).is_some());
    }
}
