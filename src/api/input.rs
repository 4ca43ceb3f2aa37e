//! Validation of what clients send, shared by the route areas: a refused value is a 400
//! that changes nothing.

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::api::error::ApiError;

/// The longest name of a user, product or coupon, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// A name: trimmed, 1 to [`MAX_NAME_CHARS`] characters, no control characters (NUL, line
/// breaks, escapes).
pub fn name(raw: &str) -> Result<String, ApiError> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::bad_request(
            "INVALID_NAME",
            format!("name must have 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "INVALID_NAME",
            "name may not contain control characters",
        ));
    }
    Ok(name.to_string())
}

/// An instant MySQL's `DATETIME(6)` holds as it is: years 1000 to 9999, no leap second.
pub fn storable_instant(
    field: &str,
    instant: DateTime<Utc>,
    code: &'static str,
) -> Result<DateTime<Utc>, ApiError> {
    let in_range = (1000..=9999).contains(&instant.year());
    // chrono keeps a leap second as a nanosecond count past one second.
    let leap_second = instant.nanosecond() >= 1_000_000_000;
    if !in_range || leap_second {
        return Err(ApiError::bad_request(
            code,
            format!(
                "{field} must be between 1000-01-01 and 9999-12-31 and not a leap second, got {}",
                instant.to_rfc3339()
            ),
        ));
    }
    Ok(instant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_control_characters_and_blanks() {
        assert_eq!(name("  Welcome ").unwrap(), "Welcome");
        for bad in [
            "",
            "   ",
            "a\0b",
            "line\nbreak",
            "esc\u{1b}[0m",
            &"x".repeat(101),
        ] {
            assert!(name(bad).is_err(), "{bad:?}");
        }
        assert!(name("Café ☕").is_ok());
    }

    #[test]
    fn instants_outside_datetime_or_on_a_leap_second_are_refused() {
        let parse = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc)
        };
        for (text, storable) in [
            ("2040-01-01T00:00:00Z", true),
            ("2100-06-30T12:00:00Z", true),
            ("9999-12-31T23:59:59.999999Z", true),
            ("1000-01-01T00:00:00Z", true),
            ("2016-12-31T23:59:60Z", false),
            ("0999-12-31T23:59:59Z", false),
            ("0000-01-01T00:00:00Z", false),
        ] {
            assert_eq!(
                storable_instant("validUntil", parse(text), "X").is_ok(),
                storable,
                "{text}"
            );
        }
    }

    use proptest::{prop_assert, prop_assert_eq};

    proptest::proptest! {
        #[test]
        fn a_name_is_accepted_only_when_clean(raw in "\\PC*|.*") {
            if let Ok(name) = name(&raw) {
                prop_assert!(!name.is_empty() && name.chars().count() <= MAX_NAME_CHARS);
                prop_assert!(!name.chars().any(char::is_control));
            }
        }

        #[test]
        fn any_instant_is_stored_or_refused_never_a_panic(
            seconds in -100_000_000_000i64..300_000_000_000i64,
            nanos in 0u32..2_000_000_000
        ) {
            if let Some(instant) = DateTime::from_timestamp(seconds, nanos) {
                let stored = storable_instant("at", instant, "X").is_ok();
                prop_assert_eq!(
                    stored,
                    (1000..=9999).contains(&instant.year()) && instant.nanosecond() < 1_000_000_000
                );
            }
        }
    }
}
