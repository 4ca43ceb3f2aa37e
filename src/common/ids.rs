//! The identifiers every slice uses, as newtypes built only by `parse` (or `generate`), so an
//! invalid id cannot travel past the edge that received it. A leaf module: it depends on
//! nothing else in the crate.
//!
//! - [`EventId`], [`RequestId`]: UUIDs (time-ordered v7 when generated here). A coupon
//!   request's id is the event id of its `CouponRequested` event.
//! - [`UserId`], [`CouponId`], [`CouponHistoryId`], [`ProductId`], [`OrderId`],
//!   [`PaymentId`]: positive integers (MySQL `BIGINT UNSIGNED AUTO_INCREMENT`).
//!
//! Each has its OpenAPI schema (`utoipa::ToSchema`), as it serializes: a UUID string or an
//! integer of at least 1.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An id that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be {expected}, got {value}")]
pub struct InvalidId {
    pub what: &'static str,
    pub expected: &'static str,
    pub value: String,
    /// The API's error code for it (`INVALID_USER_ID`, …).
    pub code: &'static str,
}

/// What an identifier is called and what its text must be: for its parse errors, its
/// schema and the API's documentation of them.
pub trait IdKind {
    /// Its name in JSON and in messages (`userId`, …).
    const WHAT: &'static str;
    /// What a valid one is: `a UUID` or `a positive integer`.
    const EXPECTED: &'static str;
    /// The API's error code for one that does not parse (`INVALID_USER_ID`, …).
    const CODE: &'static str;
}

impl InvalidId {
    /// `value` (as the message shows it) is not an `Id`.
    fn of<Id: IdKind>(value: String) -> Self {
        InvalidId {
            what: Id::WHAT,
            expected: Id::EXPECTED,
            value,
            code: Id::CODE,
        }
    }
}

/// The OpenAPI schema of an `Id`, whose JSON is of type `json_type` in `format`; the
/// description says what it must be.
fn id_schema<Id: IdKind>(
    json_type: utoipa::openapi::schema::Type,
    format: utoipa::openapi::KnownFormat,
    description: &str,
) -> utoipa::openapi::ObjectBuilder {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(json_type)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(format)))
        .description(Some(format!("`{}`: {description}.", Id::WHAT)))
}

/// Says what `$name` is called, what its text must be and the API's error code for it.
macro_rules! id_kind {
    ($name:ident, $what:literal, $expected:literal, $code:literal) => {
        impl IdKind for $name {
            const WHAT: &'static str = $what;
            const EXPECTED: &'static str = $expected;
            const CODE: &'static str = $code;
        }
    };
}

/// A UUID identifier stored as `CHAR(36)` (hyphenated, lower case).
macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $what:literal, $code:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        id_kind!($name, $what, "a UUID", $code);

        impl $name {
            /// A new, time-ordered (UUIDv7) id.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            /// Accepts a UUID in any of its text forms.
            pub fn parse(text: &str) -> Result<Self, InvalidId> {
                Uuid::parse_str(text)
                    .map(Self)
                    .map_err(|_| InvalidId::of::<Self>(format!("{text:?}")))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Self::parse(text)
            }
        }

        $crate::common::columns::sql_column!(
            $name,
            String,
            encode: |id| id.to_string(),
            decode: |text: String| $name::parse(&text)
        );

        /// OpenAPI: a UUID string.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                id_schema::<Self>(
                    utoipa::openapi::schema::Type::String,
                    utoipa::openapi::KnownFormat::Uuid,
                    "a UUID (hyphenated)",
                )
                .examples(["01a20c4d-9946-77b8-9ac2-9e7b856b2318"])
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

uuid_id!(
    /// Identifies one business event across the event log, Kafka and every consumer;
    /// consumers deduplicate by it.
    EventId,
    "eventId",
    "INVALID_EVENT_ID"
);

uuid_id!(
    /// A coupon issue request: the event id of its `CouponRequested` event.
    RequestId,
    "requestId",
    "INVALID_REQUEST_ID"
);

impl EventId {
    /// The smallest UUIDv7 of the millisecond `at`: every event id generated before `at`
    /// sorts below it (as a UUID and as its text).
    pub fn first_at(at: chrono::DateTime<chrono::Utc>) -> Self {
        let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
        let high = (millis << 16) | 0x7000;
        let low: u64 = 0x8000_0000_0000_0000;
        EventId(Uuid::from_u64_pair(high, low))
    }
}

impl EventId {
    /// When the id was generated: the millisecond of its UUIDv7 (`None` for another
    /// version).
    pub fn generated_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let (seconds, nanos) = self.0.get_timestamp()?.to_unix();
        chrono::DateTime::from_timestamp(i64::try_from(seconds).ok()?, nanos)
    }
}

impl RequestId {
    /// When the request was accepted: the millisecond of its UUIDv7 (`None` for an id
    /// generated elsewhere, of another version).
    pub fn accepted_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let (seconds, nanos) = self.0.get_timestamp()?.to_unix();
        chrono::DateTime::from_timestamp(i64::try_from(seconds).ok()?, nanos)
    }
}

impl From<RequestId> for EventId {
    fn from(request: RequestId) -> Self {
        EventId(request.0)
    }
}

impl RequestId {
    /// The request whose `CouponRequested` event this is.
    pub fn of_event(event: EventId) -> Self {
        RequestId(event.0)
    }
}

/// A positive integer identifier stored as `BIGINT UNSIGNED`.
macro_rules! positive_id {
    ($(#[$meta:meta])* $name:ident, $what:literal, $code:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "u64", into = "u64")]
        pub struct $name(u64);

        id_kind!($name, $what, "a positive integer", $code);

        impl $name {
            /// Accepts positive integers only (as JSON numbers arrive: signed).
            pub fn parse(value: i64) -> Result<Self, InvalidId> {
                u64::try_from(value)
                    .ok()
                    .filter(|value| *value > 0)
                    .map(Self)
                    .ok_or_else(|| Self::invalid(value))
            }

            /// Accepts anything but zero (ids read back from events and rows).
            pub fn from_u64(value: u64) -> Result<Self, InvalidId> {
                (value > 0).then_some(Self(value)).ok_or_else(|| Self::invalid(value))
            }

            pub fn get(&self) -> u64 {
                self.0
            }

            fn invalid(value: impl fmt::Display) -> InvalidId {
                InvalidId::of::<Self>(value.to_string())
            }
        }

        impl TryFrom<u64> for $name {
            type Error = InvalidId;

            fn try_from(value: u64) -> Result<Self, Self::Error> {
                Self::from_u64(value)
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        /// Path segments: decimal digits naming a positive id.
        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                text.parse::<u64>()
                    .ok()
                    .filter(|value| *value > 0)
                    .map(Self)
                    .ok_or_else(|| Self::invalid(format_args!("{text:?}")))
            }
        }

        $crate::common::columns::sql_column!(
            $name,
            u64,
            encode: |id| id.0,
            decode: $name::from_u64
        );

        /// OpenAPI: a positive integer.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                id_schema::<Self>(
                    utoipa::openapi::schema::Type::Integer,
                    utoipa::openapi::KnownFormat::Int64,
                    Self::EXPECTED,
                )
                .minimum(Some(1))
                .examples([1])
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

positive_id!(UserId, "userId", "INVALID_USER_ID");
positive_id!(CouponId, "couponId", "INVALID_COUPON_ID");
positive_id!(
    /// One coupon a user holds (a row of `coupon_history`).
    CouponHistoryId,
    "couponHistoryId",
    "INVALID_COUPON_HISTORY_ID"
);
positive_id!(ProductId, "productId", "INVALID_PRODUCT_ID");
positive_id!(OrderId, "orderId", "INVALID_ORDER_ID");
positive_id!(PaymentId, "paymentId", "INVALID_PAYMENT_ID");

impl UserId {
    /// The Kafka key that keeps one user's requests in order on one partition.
    pub fn partition_key(&self) -> String {
        format!("user:{}", self.0)
    }
}

impl OrderId {
    /// The Kafka key that keeps one order's events in order on one partition.
    pub fn partition_key(&self) -> String {
        format!("order:{}", self.0)
    }
}

impl ProductId {
    /// The Kafka key that keeps one product's changes in order on one partition.
    pub fn partition_key(&self) -> String {
        format!("product:{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_positive() {
        assert!(UserId::parse(0).is_err());
        assert_eq!(
            CouponId::parse(-4).unwrap_err().to_string(),
            "couponId must be a positive integer, got -4"
        );
        assert_eq!(UserId::parse(42).unwrap().partition_key(), "user:42");
        assert_eq!("17".parse::<OrderId>().unwrap().get(), 17);
        for bad in ["0", "-1", "x", "", "1.5"] {
            assert!(bad.parse::<ProductId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_read_from_json_are_checked_too() {
        assert_eq!(
            serde_json::from_str::<UserId>("42").unwrap(),
            UserId::parse(42).unwrap()
        );
        assert!(serde_json::from_str::<UserId>("0").is_err());
        assert_eq!(
            serde_json::to_string(&UserId::parse(7).unwrap()).unwrap(),
            "7"
        );
    }

    #[test]
    fn uuids_print_hyphenated_and_parse_back() {
        let id = EventId::generate();
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let later = EventId::first_at(chrono::Utc::now() + chrono::Duration::milliseconds(2));
        assert!(id < later && id.to_string() < later.to_string());
        let earlier = EventId::first_at(chrono::Utc::now() - chrono::Duration::seconds(1));
        assert!(earlier < id && earlier.to_string() < id.to_string());
        assert_eq!(
            EventId::parse("nope").unwrap_err().to_string(),
            "eventId must be a UUID, got \"nope\""
        );
        let request = RequestId::of_event(id);
        assert_eq!(EventId::from(request), id);
        assert_eq!(request.to_string(), id.to_string());
    }
}
