//! JSON records: an order-preserving value type ([`Json`]; `serde_json::Value` sorts members
//! unless the workspace-wide `preserve_order` feature is on, which would change every other
//! crate's JSON), parsing with errors reduced to position and category (serde_json's messages
//! can quote input), and the walker for `[[json]]` rules by JSON pointer.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::age::AgeCap;
use crate::error::RejectReason;
use crate::ops::{Op, Ops, PatientState};
use crate::policy::PointerSeg;
use crate::report::FieldStats;
use crate::UnknownFields;

/// A JSON value whose objects keep their members in input order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as text for a transform (`None` for null, arrays and objects).
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match self {
            Json::String(s) => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            Json::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        serde_json::Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some((k, v)) = map.next_entry::<String, Json>()? {
            members.push((k, v));
        }
        Ok(Json::Object(members))
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(members) => {
                let mut map = s.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// Parses one JSON text; the error keeps only serde_json's category and position.
pub(crate) fn parse(bytes: &[u8]) -> Result<Json, RejectReason> {
    serde_json::from_slice(bytes).map_err(|e| RejectReason::InvalidJson {
        category: match e.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "eof",
        },
        line: e.line() as u64,
        column: e.column() as u64,
    })
}

/// Appends `value` as compact JSON.
pub(crate) fn write(out: &mut Vec<u8>, value: &Json) {
    // Serializing our own value type into a Vec cannot fail (no I/O, no non-string keys).
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Why processing one record stopped.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The record is malformed: reject it (or stop, by option).
    Reject(RejectReason),
    /// A field the policy does not mention, with `unknown_fields = "error"`.
    Unknown(String),
}

/// Per-record state shared by the JSON and FHIR walkers.
pub(crate) struct RecordCx<'a> {
    pub(crate) ops: &'a Ops,
    pub(crate) patient: PatientState,
    pub(crate) stats: &'a mut FieldStats,
    /// Unknown fields dropped under `unknown_fields = "warn"`: label → count.
    pub(crate) unknown: &'a mut HashMap<String, u64>,
    pub(crate) mode: UnknownFields,
    pub(crate) entry: Option<usize>,
    pub(crate) scratch: String,
    /// The run's age limit, if the policy sets `age_cap`.
    pub(crate) age: Option<AgeCap>,
}

impl RecordCx<'_> {
    /// Reports an unknown field: an error, or a count and a drop.
    pub(crate) fn unknown(&mut self, label: String) -> Result<(), Fail> {
        match self.mode {
            UnknownFields::Error => Err(Fail::Unknown(label)),
            UnknownFields::Warn => {
                *self.unknown.entry(label).or_insert(0) += 1;
                Ok(())
            }
        }
    }

    /// Applies `op` to a scalar; `Ok(false)` if the value is dropped. `label` names the place.
    pub(crate) fn leaf(&mut self, value: &mut Json, op: &Op, label: &str) -> Result<bool, Fail> {
        if matches!(value, Json::Null) {
            return Ok(true);
        }
        self.stats.count(op);
        match op.kind {
            crate::ops::OpKind::Keep => return Ok(true),
            crate::ops::OpKind::Drop => return Ok(false),
            _ => {}
        }
        let Some(text) = value.scalar_text() else {
            return Ok(true);
        };
        let mut out = std::mem::take(&mut self.scratch);
        let result = self.ops.apply(op, &text, &mut self.patient, &mut out);
        let keep = match result {
            Ok(keep) => keep,
            Err(error) => {
                self.scratch = out;
                return Err(Fail::Reject(RejectReason::Transform {
                    field: label.to_owned(),
                    entry: self.entry,
                    error,
                }));
            }
        };
        *value = Json::String(out.clone());
        self.scratch = out;
        Ok(keep)
    }
}

/// `[[json]]` rules as a trie over pointer segments.
#[derive(Debug, Default)]
pub(crate) struct PointerNode {
    op: Option<Op>,
    keys: HashMap<String, PointerNode>,
    any: Option<Box<PointerNode>>,
}

impl PointerNode {
    pub(crate) fn insert(&mut self, segs: &[PointerSeg], op: Op) {
        let mut node = self;
        for seg in segs {
            node = match seg {
                PointerSeg::Key(k) => node.keys.entry(k.clone()).or_default(),
                PointerSeg::Any => node.any.get_or_insert_with(Default::default),
            };
        }
        node.op = Some(op);
    }

    /// The rule on the node itself (for the root: the pointer `""`).
    pub(crate) fn op(&self) -> Option<&Op> {
        self.op.as_ref()
    }

    fn child(&self, key: &str) -> Option<&PointerNode> {
        self.keys.get(key).or(self.any.as_deref())
    }
}

/// Walks a generic JSON record under pointer rules: every member is covered by a rule on it
/// or an ancestor, or it is unknown.
pub(crate) fn walk_pointer(
    value: &mut Json,
    node: Option<&PointerNode>,
    op: Option<&Op>,
    path: &str,
    cx: &mut RecordCx<'_>,
) -> Result<bool, Fail> {
    match value {
        Json::Object(members) => {
            let was_empty = members.is_empty();
            for (k, mut v) in std::mem::take(members) {
                let child_path = format!("{path}/{}", k.replace('~', "~0").replace('/', "~1"));
                if let Some(keep) = walk_member(&mut v, node, op, &k, child_path, cx)? {
                    if keep {
                        members.push((k, v));
                    }
                }
            }
            Ok(was_empty || !members.is_empty())
        }
        Json::Array(items) => {
            let was_empty = items.is_empty();
            for (i, mut v) in std::mem::take(items).into_iter().enumerate() {
                let key = i.to_string();
                let child_path = format!("{path}/{key}");
                if let Some(true) = walk_member(&mut v, node, op, &key, child_path, cx)? {
                    items.push(v);
                }
            }
            Ok(was_empty || !items.is_empty())
        }
        _ => match op {
            Some(op) => cx.leaf(value, op, path),
            None => {
                cx.unknown(if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                })?;
                Ok(false)
            }
        },
    }
}

fn walk_member(
    v: &mut Json,
    node: Option<&PointerNode>,
    inherited: Option<&Op>,
    key: &str,
    path: String,
    cx: &mut RecordCx<'_>,
) -> Result<Option<bool>, Fail> {
    let child = node.and_then(|n| n.child(key));
    let op = child.and_then(|n| n.op.as_ref()).or(inherited);
    if child.is_none() && inherited.is_none() {
        cx.unknown(path)?;
        return Ok(Some(false));
    }
    if let Some(op) = op.filter(|op| op.is_drop()) {
        cx.stats.count(op);
        return Ok(Some(false));
    }
    walk_pointer(v, child, op, &path, cx).map(Some)
}

/// The value at a pointer of plain keys (array indices as decimal keys).
pub(crate) fn lookup<'v>(value: &'v Json, keys: &[String]) -> Option<&'v Json> {
    let mut v = value;
    for k in keys {
        v = match v {
            Json::Object(_) => v.get(k)?,
            Json::Array(items) => items.get(k.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_order_and_numbers_their_form() {
        let text = br#"{"z":1,"a":[true,null,1.5,-2,"x"],"m":{"b":2.0,"a":{}}}"#;
        let v = parse(text).unwrap();
        let mut out = Vec::new();
        write(&mut out, &v);
        assert_eq!(out, text);
    }

    #[test]
    fn parse_errors_carry_no_text() {
        let e = parse(b"{\"ssn\": \"999-41-2363\" oops}").unwrap_err();
        let shown = e.to_string();
        assert!(!shown.contains("999"), "{shown}");
        assert!(matches!(
            e,
            RejectReason::InvalidJson {
                category: "syntax",
                line: 1,
                ..
            }
        ));
    }
}
