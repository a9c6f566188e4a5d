//! JSON parsing that refuses duplicate object members, at any depth.
//!
//! serde_json keeps the last of two members with the same name, so `{"sub":"a","sub":"b"}`
//! means whatever the last parser in a chain decides. Security inputs (token headers and
//! claims, key sets, introspection answers) must mean one thing to everyone who reads them:
//! they are parsed here, and a repeated member makes the whole document invalid.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictJsonError {
    /// Not JSON (syntax, nesting too deep, trailing data).
    #[error("not valid JSON")]
    Invalid,
    /// Valid JSON in which some object has the same member twice.
    #[error("an object has a duplicate member")]
    DuplicateMember,
    /// Valid JSON, but not an object.
    #[error("not a JSON object")]
    NotAnObject,
}

/// Parses `bytes` as JSON, refusing duplicate members anywhere.
pub fn parse(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(value)) => Ok(value),
        // The only data errors our visitor raises are duplicates; everything else is syntax.
        Err(e) if e.is_data() => Err(StrictJsonError::DuplicateMember),
        Err(_) => Err(StrictJsonError::Invalid),
    }
}

/// As [`parse`], for a document that must be an object.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, StrictJsonError> {
    match parse(bytes)? {
        Value::Object(map) => Ok(map),
        _ => Err(StrictJsonError::NotAnObject),
    }
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::Number(v.into())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        // serde_json never produces a non-finite number.
        Ok(Strict(
            Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Strict(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom("duplicate member"));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Strict(Value::Object(object)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_at_any_depth() {
        for doc in [
            r#"{"sub":"a","sub":"b"}"#,
            r#"{"realm_access":{"roles":["x"],"roles":["admin"]}}"#,
            r#"{"a":[{"b":1,"b":1}]}"#,
            r#"{"a":1,"\u0061":2}"#,
        ] {
            assert_eq!(
                parse(doc.as_bytes()),
                Err(StrictJsonError::DuplicateMember),
                "{doc}"
            );
        }
    }

    #[test]
    fn ordinary_documents_parse_as_serde_json_does() {
        for doc in [
            r#"{"sub":"a","n":-1,"f":1.5,"big":18446744073709551615,"l":[1,{"x":null}],"t":true}"#,
            r#"[1,2,{"a":{"a":{"a":1}}}]"#,
            r#""text""#,
        ] {
            let expected: Value = serde_json::from_str(doc).unwrap();
            assert_eq!(parse(doc.as_bytes()), Ok(expected), "{doc}");
        }
    }

    #[test]
    fn syntax_errors_and_non_objects_are_told_apart() {
        assert_eq!(parse(b"{\"a\":"), Err(StrictJsonError::Invalid));
        assert_eq!(parse(b"{} x"), Err(StrictJsonError::Invalid));
        assert_eq!(parse_object(b"[1]"), Err(StrictJsonError::NotAnObject));
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert_eq!(parse(deep.as_bytes()), Err(StrictJsonError::Invalid));
    }
}
