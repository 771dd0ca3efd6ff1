//! Test-only: lists every field a `Deserialize` type accepts (dotted paths), by driving its derived visitor.
//!
//! serde's derive passes each struct's field names (after `rename_all`) to
//! `Deserializer::deserialize_struct`. [`Walker`] is a deserializer that answers such a call
//! either by recording those names (at the end of the requested path) or by feeding the visitor
//! exactly one key, the next step of the path, whose value it walks in turn. Every probe then
//! fails on purpose ([`Stop`]); one probe per node of the field tree lists them all, nested
//! structs, `Option`s, lists and enums included. Types that read through `deserialize_any`
//! (untagged enums, maps) show up as [`Kind::Opaque`], so a caller can never miss fields hidden
//! behind them silently.
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, Visitor};
use serde::Deserialize;

/// One entry of a type's field tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    /// Dotted path of serialized names (`limits.maxHandshakes`).
    pub(crate) path: String,
    /// What sits there.
    pub(crate) kind: Kind,
    /// Whether the value is an `Option` (absent means unset).
    pub(crate) optional: bool,
}

/// What a field holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A scalar or a list of scalars.
    Leaf,
    /// A struct; its fields follow as their own entries.
    Struct,
    /// An enum of unit variants (their serialized names).
    Enum(Vec<&'static str>),
    /// Read through `deserialize_any` (untagged enum, map) or an enum variant with data: the
    /// walker cannot see inside.
    Opaque,
}

/// Every field of `T`, depth first, in declaration order.
pub(crate) fn fields<T: for<'de> Deserialize<'de>>() -> Vec<Field> {
    let mut out = Vec::new();
    walk::<T>(&mut Vec::new(), &mut out);
    out
}

#[derive(Debug, Clone)]
enum Step {
    Field(&'static str),
    Variant(&'static str),
}

fn walk<T: for<'de> Deserialize<'de>>(steps: &mut Vec<Step>, out: &mut Vec<Field>) {
    let (found, optional) = probe::<T>(steps);
    let path = steps
        .iter()
        .filter_map(|s| match s {
            Step::Field(f) => Some(*f),
            Step::Variant(_) => None,
        })
        .collect::<Vec<_>>()
        .join(".");
    let kind = match found {
        Found::Struct(names) => {
            if !steps.is_empty() {
                out.push(Field {
                    path,
                    kind: Kind::Struct,
                    optional,
                });
            }
            for name in names {
                steps.push(Step::Field(name));
                walk::<T>(steps, out);
                steps.pop();
            }
            return;
        }
        Found::Enum(variants) => {
            let all_unit = variants.iter().all(|v| {
                steps.push(Step::Variant(v));
                let (found, _) = probe::<T>(steps);
                steps.pop();
                matches!(found, Found::UnitVariant)
            });
            if all_unit {
                Kind::Enum(variants.to_vec())
            } else {
                Kind::Opaque
            }
        }
        Found::Leaf => Kind::Leaf,
        Found::Opaque | Found::UnitVariant | Found::Nothing => Kind::Opaque,
    };
    out.push(Field {
        path,
        kind,
        optional,
    });
}

/// What the probe met at the end of its path, and whether an `Option` wrapped it.
fn probe<T: for<'de> Deserialize<'de>>(steps: &[Step]) -> (Found, bool) {
    let mut rec = Record {
        found: Found::Nothing,
        optional: false,
    };
    // The probe always ends in an error: `Stop` once it has recorded, or the visitor's own
    // complaint about a value the walker never gives. Either way `rec` holds the answer.
    let _ = T::deserialize(Walker {
        steps,
        rec: &mut rec,
    });
    (rec.found, rec.optional)
}

#[derive(Debug)]
enum Found {
    Nothing,
    Struct(&'static [&'static str]),
    Enum(&'static [&'static str]),
    UnitVariant,
    Leaf,
    Opaque,
}

struct Record {
    found: Found,
    optional: bool,
}

/// The error every probe ends with.
#[derive(Debug)]
pub(crate) struct Stop(String);

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<M: std::fmt::Display>(msg: M) -> Self {
        Self(msg.to_string())
    }
}

fn stop() -> Stop {
    Stop("probe done".into())
}

struct Walker<'a> {
    steps: &'a [Step],
    rec: &'a mut Record,
}

impl Walker<'_> {
    fn leaf<V>(self) -> Result<V, Stop> {
        if self.steps.is_empty() {
            self.rec.found = Found::Leaf;
        }
        Err(stop())
    }
}

macro_rules! leaves {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
            self.leaf()
        }
    )*};
}

impl<'de> Deserializer<'de> for Walker<'_> {
    type Error = Stop;

    leaves! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_unit
        deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        if self.steps.is_empty() {
            self.rec.found = Found::Opaque;
        }
        Err(stop())
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        self.deserialize_any(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        if self.steps.is_empty() {
            self.rec.optional = true;
        }
        visitor.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        self.leaf()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        // A list: its element stands at the same path.
        visitor.visit_seq(OneElement { walker: Some(self) })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Stop> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.steps.split_first() {
            None => {
                self.rec.found = Found::Struct(fields);
                Err(stop())
            }
            Some((Step::Field(name), rest)) => visitor.visit_map(OneKey {
                key: Some(name),
                walker: Some(Walker {
                    steps: rest,
                    rec: self.rec,
                }),
            }),
            Some((Step::Variant(_), _)) => Err(Stop("a variant step at a struct".into())),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.steps.split_first() {
            None => {
                self.rec.found = Found::Enum(variants);
                Err(stop())
            }
            Some((Step::Variant(v), rest)) => visitor.visit_enum(OneVariant {
                name: v,
                walker: Walker {
                    steps: rest,
                    rec: self.rec,
                },
            }),
            Some((Step::Field(_), _)) => Err(Stop("a field step at an enum".into())),
        }
    }
}

/// A map with one key (the next field of the path); its value is walked further.
struct OneKey<'a> {
    key: Option<&'static str>,
    walker: Option<Walker<'a>>,
}

impl<'de> de::MapAccess<'de> for OneKey<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Stop> {
        match self.walker.take() {
            Some(w) => seed.deserialize(w),
            None => Err(Stop("value asked twice".into())),
        }
    }
}

/// A list with one element, walked at the list's own path.
struct OneElement<'a> {
    walker: Option<Walker<'a>>,
}

impl<'de> de::SeqAccess<'de> for OneElement<'_> {
    type Error = Stop;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, Stop> {
        match self.walker.take() {
            Some(w) => seed.deserialize(w).map(Some),
            None => Ok(None),
        }
    }
}

/// The enum variant named by the path.
struct OneVariant<'a> {
    name: &'static str,
    walker: Walker<'a>,
}

impl<'de, 'a> de::EnumAccess<'de> for OneVariant<'a> {
    type Error = Stop;
    type Variant = VariantBody<'a>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), Stop> {
        let v = seed.deserialize(self.name.into_deserializer())?;
        Ok((v, VariantBody(self.walker)))
    }
}

/// The data of the variant: only unit variants are plain values.
struct VariantBody<'a>(Walker<'a>);

impl VariantBody<'_> {
    fn record(self, found: Found) -> Stop {
        if self.0.steps.is_empty() {
            self.0.rec.found = found;
        }
        stop()
    }
}

impl<'de> de::VariantAccess<'de> for VariantBody<'_> {
    type Error = Stop;

    fn unit_variant(self) -> Result<(), Stop> {
        Err(self.record(Found::UnitVariant))
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, _seed: S) -> Result<S::Value, Stop> {
        Err(self.record(Found::Opaque))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, Stop> {
        Err(self.record(Found::Opaque))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        Err(self.record(Found::Opaque))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    #[allow(
        dead_code,
        reason = "only the type's Deserialize impl is walked; no value is made"
    )]
    enum Colour {
        Red,
        Blue,
    }

    #[derive(Deserialize)]
    #[allow(
        dead_code,
        reason = "only the type's Deserialize impl is walked; no value is made"
    )]
    enum WithData {
        Plain,
        Carrying(u8),
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(
        dead_code,
        reason = "only the type's Deserialize impl is walked; no value is made"
    )]
    struct Inner {
        max_things: u32,
        names: Vec<String>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    #[allow(
        dead_code,
        reason = "only the type's Deserialize impl is walked; no value is made"
    )]
    enum Either {
        Path(String),
        Inner(Inner),
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(
        dead_code,
        reason = "only the type's Deserialize impl is walked; no value is made"
    )]
    struct Outer {
        first_field: String,
        #[serde(default)]
        section: Option<Inner>,
        limits: Inner,
        colour: Colour,
        data: WithData,
        either: Either,
        labels: BTreeMap<String, String>,
        addr: Option<std::net::SocketAddr>,
    }

    #[test]
    fn lists_nested_optional_enum_and_opaque_fields() {
        let got: Vec<(String, Kind, bool)> = fields::<Outer>()
            .into_iter()
            .map(|f| (f.path, f.kind, f.optional))
            .collect();
        let want = [
            ("firstField", Kind::Leaf, false),
            ("section", Kind::Struct, true),
            ("section.maxThings", Kind::Leaf, false),
            ("section.names", Kind::Leaf, false),
            ("limits", Kind::Struct, false),
            ("limits.maxThings", Kind::Leaf, false),
            ("limits.names", Kind::Leaf, false),
            ("colour", Kind::Enum(vec!["red", "blue"]), false),
            ("data", Kind::Opaque, false),
            ("either", Kind::Opaque, false),
            ("labels", Kind::Opaque, false),
            ("addr", Kind::Leaf, true),
        ]
        .map(|(p, k, o)| (p.to_string(), k, o));
        assert_eq!(got, want);
    }
}
