//! The plan's document model: JSON values with objects kept as ordered
//! lists of (key, value), so that a key written twice stays visible.
//!
//! The text is tokenised by `serde_json` (escapes, surrogates, numbers,
//! line and column of an error, a nesting limit of 128 that bounds the
//! recursion here and in `Drop`); only the shape of the result is ours,
//! built by a `serde` visitor.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// One JSON value of a plan.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Node {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number.
    Number(Number),
    /// A string.
    String(String),
    /// An array, in order.
    Array(Vec<Node>),
    /// An object: every key, in document order, duplicates included.
    Object(Vec<(String, Node)>),
}

/// A JSON number, as `serde_json` classified it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Number {
    /// An integer from 0 to `u64::MAX`.
    Unsigned(u64),
    /// A negative integer down to `i64::MIN`.
    Negative(i64),
    /// Anything else: a fraction, an exponent, or an integer out of range.
    Float(f64),
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Unsigned(n) => write!(f, "{n}"),
            Number::Negative(n) => write!(f, "{n}"),
            // Debug keeps the point: `1.0`, not `1`, so that a message about
            // a non-integer does not show an integer.
            Number::Float(x) => write!(f, "{x:?}"),
        }
    }
}

impl Node {
    /// The JSON type's name, for messages.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "boolean",
            Node::Number(_) => "number",
            Node::String(_) => "string",
            Node::Array(_) => "array",
            Node::Object(_) => "object",
        }
    }
}

/// Where and why the text is not JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    /// 1-based line of the error.
    pub line: usize,
    /// 1-based column (in bytes) of the error.
    pub column: usize,
    /// `serde_json`'s reason, without its position suffix.
    pub reason: String,
}

/// Parses one JSON document (surrounding whitespace allowed, nothing else).
pub(crate) fn parse(text: &str) -> Result<Node, SyntaxError> {
    serde_json::from_str(text).map_err(|e| {
        let (line, column) = (e.line(), e.column());
        let full = e.to_string();
        let suffix = format!(" at line {line} column {column}");
        let reason = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
        SyntaxError {
            line,
            column,
            reason,
        }
    })
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

/// Builds a [`Node`] from whatever value comes next.
struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Number(Number::Unsigned(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Number(match u64::try_from(v) {
            Ok(u) => Number::Unsigned(u),
            Err(_) => Number::Negative(v),
        }))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Number(Number::Float(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        // No `size_hint` preallocation: the length is not known up front,
        // and the text length bounds what can be pushed.
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value()?;
            entries.push((key, value));
        }
        Ok(Node::Object(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Node {
        Node::String(v.to_string())
    }

    #[test]
    fn objects_keep_every_key_in_order() {
        let n = parse(r#"{"b": 1, "a": 2, "b": [true, null, "x"]}"#).unwrap();
        assert_eq!(
            n,
            Node::Object(vec![
                ("b".into(), Node::Number(Number::Unsigned(1))),
                ("a".into(), Node::Number(Number::Unsigned(2))),
                (
                    "b".into(),
                    Node::Array(vec![Node::Bool(true), Node::Null, s("x")])
                ),
            ])
        );
    }

    #[test]
    fn numbers_are_classified() {
        let n = parse("[0, 7, -3, 1.0, 1e3, 18446744073709551615, 18446744073709551616]").unwrap();
        let Node::Array(items) = n else {
            panic!("not an array")
        };
        let nums: Vec<String> = items
            .iter()
            .map(|i| match i {
                Node::Number(n) => format!("{n:?}"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            nums,
            [
                "Unsigned(0)",
                "Unsigned(7)",
                "Negative(-3)",
                "Float(1.0)",
                "Float(1000.0)",
                "Unsigned(18446744073709551615)",
                "Float(1.8446744073709552e19)",
            ]
        );
        assert_eq!(Number::Float(1.0).to_string(), "1.0");
        assert_eq!(Number::Negative(-1).to_string(), "-1");
    }

    #[test]
    fn escapes_are_decoded() {
        assert_eq!(parse(r#""a\/b\u00e9\ud83d\ude00""#).unwrap(), s("a/bé😀"));
    }

    #[test]
    fn syntax_errors_have_a_position_and_a_bare_reason() {
        let e = parse("{\n  \"devices\": {,}\n}").unwrap_err();
        assert_eq!((e.line, e.column), (2, 15));
        assert!(!e.reason.contains("line"), "{}", e.reason);
        let e = parse("{} x").unwrap_err();
        assert_eq!((e.line, e.column), (1, 4));
        assert_eq!(e.reason, "trailing characters");
        let e = parse("").unwrap_err();
        assert_eq!(e.reason, "EOF while parsing a value");
        let e = parse("{\"a\": 1,}").unwrap_err();
        assert_eq!(e.line, 1);
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        let e = parse(&deep).unwrap_err();
        assert!(e.reason.contains("recursion limit"), "{}", e.reason);
        // Nesting well within the limit is fine.
        let ok = "[".repeat(100) + &"]".repeat(100);
        assert!(parse(&ok).is_ok());
    }
}
