//! How values travel in and out of MySQL columns and text: two macros every slice uses for
//! its identifiers and statuses. A leaf module.
//!
//! - `sql_column!` stores a type as an inner column type (`u64`, `String`, `&str`), with a
//!   conversion each way.
//! - `named_enum!` declares an enum of named states (`PENDING`, `ISSUED`, …) with its
//!   `ALL` list, `as_str`, `Display`, `FromStr` (an [`UnknownName`] error) and its column
//!   type: statuses are bound as text, never written into SQL as literals; its OpenAPI
//!   schema is a string enum of the names.

/// A name that is none of an enum's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?}")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
}

/// Stores `$type` as the column type `$inner`: `encode` maps a `&$type` to an `$inner`,
/// `decode` an `$inner` to a `Result<$type, impl Error>`.
macro_rules! sql_column {
    ($type:ty, $inner:ty, encode: $encode:expr, decode: $decode:expr) => {
        impl sqlx::Type<sqlx::MySql> for $type {
            fn type_info() -> sqlx::mysql::MySqlTypeInfo {
                <$inner as sqlx::Type<sqlx::MySql>>::type_info()
            }

            fn compatible(ty: &sqlx::mysql::MySqlTypeInfo) -> bool {
                <$inner as sqlx::Type<sqlx::MySql>>::compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, sqlx::MySql> for $type {
            fn encode_by_ref(
                &self,
                buffer: &mut Vec<u8>,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                let encode: fn(&$type) -> $inner = $encode;
                <$inner as sqlx::Encode<sqlx::MySql>>::encode(encode(self), buffer)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::MySql> for $type {
            fn decode(
                value: sqlx::mysql::MySqlValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let inner = <$inner as sqlx::Decode<sqlx::MySql>>::decode(value)?;
                Ok(($decode)(inner)?)
            }
        }
    };
}
pub(crate) use sql_column;

/// An enum of named states, stored as its names.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $($(#[$variant_meta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        $vis enum $name {
            $($(#[$variant_meta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::common::columns::UnknownName;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|known| known.as_str() == text)
                    .ok_or_else(|| $crate::common::columns::UnknownName {
                        what: $what,
                        name: text.to_string(),
                    })
            }
        }

        $crate::common::columns::sql_column!(
            $name,
            &str,
            encode: |value| value.as_str(),
            decode: |text: &str| text.parse::<$name>()
        );

        /// OpenAPI: one of the names, as a string.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text,)+]))
                    .description(Some(concat!("A ", $what, ".")))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}
pub(crate) use named_enum;
