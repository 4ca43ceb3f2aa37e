//! Every setting's dotted path (`kafka.producer.linger_ms`), read from the settings tree
//! itself: the tree is deserialized once from a deserializer that records the fields each
//! struct asks for and answers every leaf with a placeholder. A map or a list is one setting
//! (`reconcile.after_ms_by_event_type`), whatever keys it holds. So the list cannot drift
//! from the structs: the configuration reference is checked against it.

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};

/// One setting of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingPath {
    /// Its dotted path, `kafka.producer.linger_ms`.
    pub path: String,
    /// Whether it is a map, whose keys are the configuration's own (`kafka.producer.extra`).
    pub is_map: bool,
}

/// Every setting `T` (a settings struct) has, in declaration order.
pub fn setting_paths<'de, T: serde::Deserialize<'de>>() -> Vec<SettingPath> {
    let mut paths = Vec::new();
    T::deserialize(PathCollector {
        prefix: String::new(),
        paths: &mut paths,
    })
    .expect("a settings tree deserializes from placeholders");
    paths
}

#[derive(Debug)]
struct Unsupported(String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

impl de::Error for Unsupported {
    fn custom<M: std::fmt::Display>(message: M) -> Self {
        Unsupported(message.to_string())
    }
}

/// Deserializes one value at `prefix`: a struct's fields one level down, anything else as
/// a leaf.
struct PathCollector<'a> {
    prefix: String,
    paths: &'a mut Vec<SettingPath>,
}

impl PathCollector<'_> {
    fn leaf(self) {
        self.paths.push(SettingPath {
            path: self.prefix,
            is_map: false,
        });
    }
}

/// Answers every leaf with the same placeholder of its kind.
macro_rules! leaf {
    ($($method:ident => $visit:ident($value:expr)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Unsupported> {
                self.leaf();
                visitor.$visit($value)
            }
        )*
    };
}

impl<'de> Deserializer<'de> for PathCollector<'_> {
    type Error = Unsupported;

    leaf! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i8(0),
        deserialize_i16 => visit_i16(0),
        deserialize_i32 => visit_i32(0),
        deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u8(0),
        deserialize_u16 => visit_u16(0),
        deserialize_u32 => visit_u32(0),
        deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f32(0.0),
        deserialize_f64 => visit_f64(0.0),
        deserialize_char => visit_char('x'),
        deserialize_str => visit_str(""),
        deserialize_string => visit_str(""),
        deserialize_bytes => visit_bytes(&[]),
        deserialize_byte_buf => visit_bytes(&[]),
        deserialize_identifier => visit_str(""),
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Unsupported> {
        self.leaf();
        visitor.visit_unit()
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Unsupported> {
        self.leaf();
        visitor.visit_unit()
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Unsupported> {
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Unsupported> {
        visitor.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Unsupported> {
        self.leaf();
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Unsupported> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Unsupported> {
        self.leaf();
        visitor.visit_seq(de::value::SeqDeserializer::new(std::iter::empty::<()>()))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _length: usize,
        visitor: V,
    ) -> Result<V::Value, Unsupported> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _length: usize,
        visitor: V,
    ) -> Result<V::Value, Unsupported> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Unsupported> {
        self.paths.push(SettingPath {
            path: self.prefix,
            is_map: true,
        });
        visitor.visit_map(de::value::MapDeserializer::new(
            std::iter::empty::<((), ())>(),
        ))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Unsupported> {
        visitor.visit_map(Fields {
            prefix: self.prefix,
            paths: self.paths,
            fields: fields.iter(),
            current: None,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Unsupported> {
        self.leaf();
        let first = variants
            .first()
            .copied()
            .ok_or_else(|| Unsupported("an enum without variants".into()))?;
        visitor.visit_enum(first.into_deserializer())
    }
}

/// A struct's fields, each deserialized one level down.
struct Fields<'a> {
    prefix: String,
    paths: &'a mut Vec<SettingPath>,
    fields: std::slice::Iter<'static, &'static str>,
    current: Option<&'static str>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Unsupported;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Unsupported> {
        let Some(field) = self.fields.next() else {
            return Ok(None);
        };
        self.current = Some(field);
        seed.deserialize(field.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Unsupported> {
        let field = self
            .current
            .take()
            .ok_or_else(|| Unsupported("a value asked for before its key".into()))?;
        let prefix = if self.prefix.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.prefix)
        };
        seed.deserialize(PathCollector {
            prefix,
            paths: self.paths,
        })
    }
}
