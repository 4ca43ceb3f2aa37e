//! The event envelope every Kafka record carries, and its decoding.
//!
//! On the wire a record's value is one JSON object:
//!
//! ```json
//! {"eventId": "0193…", "eventType": "PipelineProbe", "key": "probe:0193…",
//!  "occurredAt": "2026-11-24T06:00:00.123456Z", "payload": {"note": "hello"}}
//! ```
//!
//! Decoding is strict: a record that is too large, not JSON, missing a field, of an unknown
//! event type or with a payload that does not fit its type is a [`DecodeError`], and the
//! partition actor dead-letters it instead of handing it to a domain actor.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::common::columns::{UnknownName, named_enum};
pub use crate::common::ids::EventId;
use crate::common::ids::{
    CouponHistoryId, CouponId, OrderId, PaymentId, ProductId, RequestId, UserId,
};

/// The design document's topics.
pub mod topics {
    pub const COUPON_REQUESTS: &str = "coupon-requests";
    pub const COUPON_RESULTS: &str = "coupon-results";
    pub const ORDER_COMPLETED: &str = "order-completed";
    pub const EXTERNAL_EVENTS: &str = "external-events";
    pub const PRODUCT_EVENTS: &str = "product-events";

    pub const ALL: [&str; 5] = [
        COUPON_REQUESTS,
        COUPON_RESULTS,
        ORDER_COMPLETED,
        EXTERNAL_EVENTS,
        PRODUCT_EVENTS,
    ];

    /// The topic of this name, as the constant above (names read back from rows).
    pub fn named(name: &str) -> Option<&'static str> {
        ALL.into_iter().find(|topic| *topic == name)
    }

    /// Where records of `topic` that cannot be processed go.
    pub fn dead_letter_topic(topic: &str) -> String {
        format!("{topic}.DLT")
    }

    /// Every topic the daemon makes sure exists: the business topics and their dead-letter
    /// topics.
    pub fn all_with_dead_letters() -> Vec<String> {
        ALL.iter()
            .flat_map(|topic| [topic.to_string(), dead_letter_topic(topic)])
            .collect()
    }
}

named_enum! {
    /// Every event type this system knows. A record naming any other type is a poison pill.
    pub enum EventType ("event type") {
        /// A synthetic event that checks one topic's whole pipeline end to end.
        PipelineProbe = "PipelineProbe",
        /// A user asked for a coupon (the design document's `CouponRequestEvent`); the event
        /// id is the request id.
        CouponRequested = "CouponRequested",
        /// The decision on a coupon request (the design document's `CouponResultEvent`).
        CouponResult = "CouponResult",
        /// A payment went through (the design document's `PaymentCompletedEvent`);
        /// forwarded to external systems.
        PaymentCompleted = "PaymentCompleted",
        /// An order was paid (the design document's `OrderCompletedEvent`); feeds the
        /// ranking and analytics.
        OrderCompleted = "OrderCompleted",
        /// A product was created or its price or stock changed; carries the whole product.
        ProductChanged = "ProductChanged",
    }
}

impl EventType {
    /// The topic every event of this type is published to: the one table from event type
    /// to topic. `None` for probes, which name the topic whose pipeline they check.
    pub fn topic(self) -> Option<&'static str> {
        match self {
            EventType::PipelineProbe => None,
            EventType::CouponRequested => Some(topics::COUPON_REQUESTS),
            EventType::CouponResult => Some(topics::COUPON_RESULTS),
            EventType::PaymentCompleted => Some(topics::EXTERNAL_EVENTS),
            EventType::OrderCompleted => Some(topics::ORDER_COMPLETED),
            EventType::ProductChanged => Some(topics::PRODUCT_EVENTS),
        }
    }

    /// Whether its events are recorded proven (see the outbox): PUBLISHED from their
    /// insert on, their publication proven by the progress of their consumers, shared groups
    /// whose committed offsets outlive their members. Coupon requests (the issuer, progress
    /// in the row), orders completed (the ranking, progress in its marks; the analytics
    /// delivery, in the row), payments completed (the external delivery, in the row) and
    /// product changes (the product cache, in the row). Coupon results have no row at all:
    /// each is recorded in its request's row (see the coupon slice's `results`), and their
    /// notifier's progress, NOTIFIED in that row, proves their publication against the
    /// notifier member's own positions. Probes stay PENDING until marked: they check the
    /// path the relay takes.
    pub fn recorded_proven(self) -> bool {
        matches!(
            self,
            EventType::CouponRequested
                | EventType::OrderCompleted
                | EventType::PaymentCompleted
                | EventType::ProductChanged
        )
    }
}

/// Payload of [`EventType::PipelineProbe`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineProbe {
    /// Free text the requester attached, echoed in the event log.
    #[serde(default)]
    pub note: Option<String>,
}

/// Payload of [`EventType::CouponRequested`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CouponRequested {
    pub user_id: UserId,
    pub coupon_id: CouponId,
}

named_enum! {
    /// Why a coupon request got no coupon: the business result of a refused request,
    /// carried by its `CouponResult`.
    pub enum RefusalReason ("refusal reason") {
        OutOfStock = "OUT_OF_STOCK", AlreadyIssued = "ALREADY_ISSUED",
        CouponNotFound = "COUPON_NOT_FOUND", NotStarted = "NOT_STARTED", Expired = "EXPIRED",
    }
}

/// Payload of [`EventType::CouponResult`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CouponResult {
    /// The request this decides (the event id of its `CouponRequested`).
    pub request_id: RequestId,
    pub user_id: UserId,
    pub coupon_id: CouponId,
    pub success: bool,
    #[serde(default)]
    pub coupon_history_id: Option<CouponHistoryId>,
    #[serde(default)]
    pub reason: Option<RefusalReason>,
}

/// Payload of [`EventType::PaymentCompleted`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentCompleted {
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: u64,
    pub timestamp: DateTime<Utc>,
}

/// One line of [`OrderCompleted`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderedProduct {
    pub id: ProductId,
    pub qty: u32,
}

/// Payload of [`EventType::OrderCompleted`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderCompleted {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub products: Vec<OrderedProduct>,
    pub total_amount: u64,
}

/// What changed about a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProductChange {
    Created,
    PriceChanged,
    StockChanged,
}

/// Payload of [`EventType::ProductChanged`]: the product after the change. `version`
/// counts the product's changes, so consumers keep only the newest state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductChanged {
    pub product_id: ProductId,
    pub name: String,
    pub price: u64,
    pub stock: u32,
    pub version: u64,
    pub change: ProductChange,
}

/// A typed payload; its variant always matches the envelope's event type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventPayload {
    PipelineProbe(PipelineProbe),
    CouponRequested(CouponRequested),
    CouponResult(CouponResult),
    PaymentCompleted(PaymentCompleted),
    OrderCompleted(OrderCompleted),
    ProductChanged(ProductChanged),
}

impl EventPayload {
    pub fn event_type(&self) -> EventType {
        match self {
            EventPayload::PipelineProbe(_) => EventType::PipelineProbe,
            EventPayload::CouponRequested(_) => EventType::CouponRequested,
            EventPayload::CouponResult(_) => EventType::CouponResult,
            EventPayload::PaymentCompleted(_) => EventType::PaymentCompleted,
            EventPayload::OrderCompleted(_) => EventType::OrderCompleted,
            EventPayload::ProductChanged(_) => EventType::ProductChanged,
        }
    }

    /// Decodes a payload stored as JSON text (an event-log row's `payload`).
    pub fn decode_json(event_type: EventType, text: &str) -> Result<Self, DecodeError> {
        let raw: &RawValue = serde_json::from_str(text)
            .map_err(|error| DecodeError::InvalidJson(error.to_string()))?;
        Self::decode(event_type, raw)
    }

    fn decode(event_type: EventType, raw: &RawValue) -> Result<Self, DecodeError> {
        fn parse<T: serde::de::DeserializeOwned>(
            event_type: EventType,
            raw: &RawValue,
        ) -> Result<T, DecodeError> {
            serde_json::from_str(raw.get()).map_err(|error| DecodeError::InvalidPayload {
                event_type,
                reason: error.to_string(),
            })
        }
        Ok(match event_type {
            EventType::PipelineProbe => EventPayload::PipelineProbe(parse(event_type, raw)?),
            EventType::CouponRequested => EventPayload::CouponRequested(parse(event_type, raw)?),
            EventType::CouponResult => EventPayload::CouponResult(parse(event_type, raw)?),
            EventType::PaymentCompleted => EventPayload::PaymentCompleted(parse(event_type, raw)?),
            EventType::OrderCompleted => EventPayload::OrderCompleted(parse(event_type, raw)?),
            EventType::ProductChanged => EventPayload::ProductChanged(parse(event_type, raw)?),
        })
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self)
            .expect("payload structs serialize to JSON without fallible fields")
    }
}

/// A payload serializes as the payload struct it holds (the event log's `payload`).
impl Serialize for EventPayload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            EventPayload::PipelineProbe(probe) => probe.serialize(serializer),
            EventPayload::CouponRequested(request) => request.serialize(serializer),
            EventPayload::CouponResult(result) => result.serialize(serializer),
            EventPayload::PaymentCompleted(payment) => payment.serialize(serializer),
            EventPayload::OrderCompleted(order) => order.serialize(serializer),
            EventPayload::ProductChanged(product) => product.serialize(serializer),
        }
    }
}

/// OpenAPI: the payload struct it holds, whichever of them (the event's `eventType` says
/// which).
impl utoipa::PartialSchema for EventPayload {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::ToSchema;
        let payload = |name: std::borrow::Cow<'static, str>| {
            utoipa::openapi::RefOr::Ref(utoipa::openapi::Ref::from_schema_name(name))
        };
        utoipa::openapi::schema::AnyOfBuilder::new()
            .item(payload(PipelineProbe::name()))
            .item(payload(CouponRequested::name()))
            .item(payload(CouponResult::name()))
            .item(payload(PaymentCompleted::name()))
            .item(payload(OrderCompleted::name()))
            .item(payload(ProductChanged::name()))
            .description(Some("The payload of the event's `eventType`."))
            .into()
    }
}

impl utoipa::ToSchema for EventPayload {
    fn schemas(schemas: &mut NamedSchemas) {
        add_schema::<PipelineProbe>(schemas);
        add_schema::<CouponRequested>(schemas);
        add_schema::<CouponResult>(schemas);
        add_schema::<PaymentCompleted>(schemas);
        add_schema::<OrderCompleted>(schemas);
        add_schema::<ProductChanged>(schemas);
    }
}

/// The schemas a `ToSchema::schemas` adds to the document's components, by name.
pub type NamedSchemas = Vec<(
    String,
    utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
)>;

/// Adds `T`'s schema, and those it refers to, to the components of the document: for a
/// hand-written `ToSchema::schemas` whose schema refers to others by name.
pub fn add_schema<T: utoipa::ToSchema>(schemas: &mut NamedSchemas) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

/// One decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventEnvelope {
    pub event_id: EventId,
    /// The Kafka record key (for example `user:123`); records with one key stay in order.
    pub key: String,
    pub occurred_at: DateTime<Utc>,
    pub payload: EventPayload,
    /// The W3C trace context the event was produced in: the `traceparent` Kafka header,
    /// not part of the record value.
    pub traceparent: Option<String>,
}

impl EventEnvelope {
    /// A new event, in the current trace (see [`crate::observability::trace::current`]) when there is one.
    pub fn new(key: impl Into<String>, payload: EventPayload) -> Self {
        Self {
            event_id: EventId::generate(),
            key: key.into(),
            occurred_at: Utc::now(),
            payload,
            // The producing span (the request's) is the event's parent.
            traceparent: crate::observability::trace::current().map(|parent| parent.header_value()),
        }
    }

    /// The event, produced in the trace `traceparent` (of an event that led to it), when
    /// there is one: a sibling of that event, under the same parent span.
    pub fn continuing(mut self, traceparent: Option<&str>) -> Self {
        if let Some(parent) = traceparent.and_then(crate::observability::trace::TraceParent::parse)
        {
            self.traceparent = Some(parent.header_value());
        }
        self
    }

    pub fn event_type(&self) -> EventType {
        self.payload.event_type()
    }

    /// The JSON record value.
    pub fn encode(&self) -> Vec<u8> {
        let wire = WireEnvelopeOut {
            event_id: self.event_id,
            event_type: self.event_type(),
            key: &self.key,
            occurred_at: self.occurred_at,
            payload: self.payload.to_json(),
        };
        serde_json::to_vec(&wire).expect("an envelope always serializes")
    }

    /// The payload alone, as stored in the event log.
    pub fn payload_json(&self) -> serde_json::Value {
        self.payload.to_json()
    }

    /// Decodes a record value, refusing anything over `max_bytes`.
    pub fn decode(value: Option<&[u8]>, max_bytes: usize) -> Result<Self, DecodeError> {
        let bytes = value.ok_or(DecodeError::MissingValue)?;
        if bytes.len() > max_bytes {
            return Err(DecodeError::Oversized {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8)?;
        let wire: WireEnvelopeIn<'_> =
            serde_json::from_str(text).map_err(|error| match error.classify() {
                serde_json::error::Category::Data => {
                    DecodeError::InvalidEnvelope(error.to_string())
                }
                _ => DecodeError::InvalidJson(error.to_string()),
            })?;
        let event_type: EventType = wire.event_type.parse()?;
        let event_id = wire.event_id.parse().map_err(|_| {
            DecodeError::InvalidEnvelope(format!("eventId {:?} is not a UUID", wire.event_id))
        })?;
        if wire.key.is_empty() {
            return Err(DecodeError::InvalidEnvelope("key is empty".into()));
        }
        Ok(Self {
            event_id,
            key: wire.key.into_owned(),
            occurred_at: wire.occurred_at,
            payload: EventPayload::decode(event_type, wire.payload)?,
            traceparent: None,
        })
    }

    /// Best effort: the event id of a record that failed to decode, so its event-log row
    /// can be marked as dead-lettered.
    pub fn salvage_event_id(value: Option<&[u8]>) -> Option<EventId> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct JustTheId {
            event_id: String,
        }
        let parsed: JustTheId = serde_json::from_slice(value?).ok()?;
        parsed.event_id.parse().ok()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireEnvelopeOut<'a> {
    event_id: EventId,
    event_type: EventType,
    key: &'a str,
    occurred_at: DateTime<Utc>,
    payload: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireEnvelopeIn<'a> {
    #[serde(borrow)]
    event_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    event_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(deserialize_with = "deserialize_timestamp")]
    occurred_at: DateTime<Utc>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// RFC 3339 timestamps, with a fast path for the UTC form this system writes
/// (`2026-11-24T06:00:00.123456Z`); chrono's general parser was a third of the samples of
/// envelope decoding in a profile.
fn deserialize_timestamp<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<DateTime<Utc>, D::Error> {
    let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
    parse_utc_timestamp(&text)
        .map(Ok)
        .unwrap_or_else(|| {
            DateTime::parse_from_rfc3339(&text).map(|parsed| parsed.with_timezone(&Utc))
        })
        .map_err(serde::de::Error::custom)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z`; anything else (offsets, leap seconds) is left
/// to the general parser.
fn parse_utc_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let bytes = text.as_bytes();
    let well_formed = bytes.len() >= 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
        && bytes[16] == b':'
        && bytes[bytes.len() - 1] == b'Z';
    if !well_formed {
        return None;
    }
    let number = |digits: &[u8]| -> Option<u32> {
        digits.iter().try_fold(0u32, |value, digit| {
            digit
                .is_ascii_digit()
                .then(|| value * 10 + u32::from(digit - b'0'))
        })
    };
    let nanoseconds = match &bytes[19..bytes.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if !fraction.is_empty() && fraction.len() <= 9 => {
            number(fraction)? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(number(&bytes[0..4])?).ok()?,
        number(&bytes[5..7])?,
        number(&bytes[8..10])?,
    )?;
    let time = chrono::NaiveTime::from_hms_nano_opt(
        number(&bytes[11..13])?,
        number(&bytes[14..16])?,
        number(&bytes[17..19])?,
        nanoseconds,
    )?;
    Some(date.and_time(time).and_utc())
}

/// Why a record is a poison pill.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value")]
    MissingValue,
    #[error("record of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized { size: usize, limit: usize },
    #[error("record value is not UTF-8")]
    NotUtf8,
    #[error("record value is not JSON: {0}")]
    InvalidJson(String),
    #[error("record is not an event envelope: {0}")]
    InvalidEnvelope(String),
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    #[error("payload does not fit {event_type}: {reason}")]
    InvalidPayload {
        event_type: EventType,
        reason: String,
    },
}

impl From<UnknownName> for DecodeError {
    fn from(unknown: UnknownName) -> Self {
        DecodeError::UnknownEventType(unknown.name)
    }
}

impl DecodeError {
    /// A stable, short name for headers and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::MissingValue => "missing-value",
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::NotUtf8 => "not-utf8",
            DecodeError::InvalidJson(_) => "invalid-json",
            DecodeError::InvalidEnvelope(_) => "invalid-envelope",
            DecodeError::UnknownEventType(_) => "unknown-event-type",
            DecodeError::InvalidPayload { .. } => "invalid-payload",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(note: &str) -> EventEnvelope {
        EventEnvelope::new(
            "probe:1",
            EventPayload::PipelineProbe(PipelineProbe {
                note: Some(note.into()),
            }),
        )
    }

    #[test]
    fn an_encoded_envelope_decodes_to_itself() {
        let envelope = probe("round trip");
        let decoded = EventEnvelope::decode(Some(&envelope.encode()), 1024).unwrap();
        assert_eq!(decoded, envelope);
    }

    #[test]
    fn each_kind_of_bad_record_is_named() {
        let valid = String::from_utf8(probe("x").encode()).unwrap();
        let cases: Vec<(Option<Vec<u8>>, &str)> = vec![
            (None, "missing-value"),
            (Some(vec![b'x'; 2048]), "oversized"),
            (Some(vec![0xff, 0xfe]), "not-utf8"),
            (Some(b"{not json".to_vec()), "invalid-json"),
            (Some(br#"{"eventId": "x"}"#.to_vec()), "invalid-envelope"),
            (
                Some(valid.replace("PipelineProbe", "Teleported").into_bytes()),
                "unknown-event-type",
            ),
            (
                Some(valid.replace(r#""note""#, r#""colour""#).into_bytes()),
                "invalid-payload",
            ),
            (
                Some(valid.replace("probe:1", "").into_bytes()),
                "invalid-envelope",
            ),
        ];
        for (value, expected_kind) in cases {
            let error = EventEnvelope::decode(value.as_deref(), 1024).unwrap_err();
            assert_eq!(error.kind(), expected_kind, "{error}");
        }
    }

    #[test]
    fn timestamps_decode_like_the_general_rfc3339_parser() {
        let samples = [
            "2026-11-24T06:00:00Z",
            "2026-11-24T06:00:00.1Z",
            "2026-11-24T06:00:00.123456Z",
            "2026-11-24T06:00:00.123456789Z",
            "2024-02-29T23:59:59.999Z",
            "2026-11-24T15:00:00.5+09:00",
            "2016-12-31T23:59:60Z",
        ];
        for sample in samples {
            let expected = DateTime::parse_from_rfc3339(sample)
                .unwrap()
                .with_timezone(&Utc);
            let quoted = format!("{sample:?}");
            let mut deserializer = serde_json::Deserializer::from_str(&quoted);
            assert_eq!(
                deserialize_timestamp(&mut deserializer).unwrap(),
                expected,
                "{sample}"
            );
        }
        for invalid in [
            "2026-13-01T00:00:00Z",
            "2026-11-24T06:00:00.Z",
            "2026-11-24T06:00Z",
            "yesterday",
        ] {
            let quoted = format!("{invalid:?}");
            let mut deserializer = serde_json::Deserializer::from_str(&quoted);
            assert!(
                deserialize_timestamp(&mut deserializer).is_err(),
                "{invalid}"
            );
        }
    }

    #[test]
    fn the_event_id_of_an_undecodable_record_can_often_be_salvaged() {
        let envelope = probe("x");
        let broken = String::from_utf8(envelope.encode())
            .unwrap()
            .replace("PipelineProbe", "Teleported");
        assert_eq!(
            EventEnvelope::salvage_event_id(Some(broken.as_bytes())),
            Some(envelope.event_id)
        );
        assert_eq!(EventEnvelope::salvage_event_id(Some(b"junk")), None);
    }

    use proptest::prop_assert;

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_to_an_event_or_a_named_error_never_a_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)
        ) {
            let _ = EventEnvelope::decode(Some(&bytes), 256).map_err(|error| error.kind());
        }

        #[test]
        fn envelope_shaped_json_with_any_values_never_panics(
            id in ".{0,40}", event_type in ".{0,20}", key in ".{0,10}",
            at in ".{0,30}", payload in ".{0,40}"
        ) {
            let value = serde_json::json!({
                "eventId": id, "eventType": event_type, "key": key,
                "occurredAt": at, "payload": payload,
            });
            let bytes = value.to_string().into_bytes();
            prop_assert!(EventEnvelope::decode(Some(&bytes), 4096).is_err() || !key.is_empty());
        }
    }
}
