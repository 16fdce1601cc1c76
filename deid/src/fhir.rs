//! FHIR R4 resources, bundles and NDJSON lines under `[fhir]` rules.
//!
//! Rules name `ResourceType.element.element` (or `*.element…` for every type); arrays are
//! transparent, `value[x]` matches every choice (`valueString`, `valueQuantity`, …). A rule
//! covers the element's whole subtree; a deeper rule overrides it, and a type's rule overrides
//! a `*` rule of the same depth. `drop` removes the subtree. An element no rule covers is
//! unknown: an error, or dropped and reported.
//!
//! What the engine does whatever the rules say:
//! - the resource `id`, `fullUrl`, and every `reference` (`urn:uuid:<id>`, `Type/<id>`,
//!   absolute URLs, `#contained`) are rewritten with the `ids` pseudonym as a UUID, so every
//!   reference still resolves; absolute references lose their server base; conditional
//!   references (`Type?identifier=system|value`) and `request.ifNoneExist` have their value
//!   transformed by the rule for `Type.identifier.value`, so they match the transformed
//!   identifiers; anything else in a reference is unknown;
//! - `extension` / `modifierExtension` entries are matched by URL (`[fhir.extensions]`): kept
//!   whole (references still rewritten), dropped, or with every value transformed;
//! - `contained` resources are walked as resources of their own type;
//! - a Reference no rule names (`Claim.prescription`, `Provenance.target`) is allowed: its
//!   `reference` is rewritten, its other members (`display`) still need a rule;
//! - elements left empty by drops are removed (FHIR forbids empty objects).
//!
//! The patient of a resource, whose pseudonym keys its date shift: a Patient is its own; other
//! resources name it in one of `patient_references` (`subject`, `patient`, …); in a bundle with
//! exactly one Patient, resources that name none belong to it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::RejectReason;
use crate::json::{Fail, Json, RecordCx};
use crate::ops::{Applier, Op, OpKind, PatientState};
use crate::policy::PathSeg;
use crate::table::OVER_AGE_CAP;

/// A trie of element rules.
#[derive(Debug, Default)]
pub(crate) struct Node {
    op: Option<Op>,
    children: HashMap<String, Node>,
    choices: Vec<(String, Node)>,
}

impl Node {
    pub(crate) fn insert(&mut self, segs: &[PathSeg], op: Op) {
        let mut node = self;
        for seg in segs {
            node = match seg {
                PathSeg::Name(n) => node.children.entry(n.clone()).or_default(),
                PathSeg::Choice(prefix) => {
                    let i = match node.choices.iter().position(|(p, _)| p == prefix) {
                        Some(i) => i,
                        None => {
                            node.choices.push((prefix.clone(), Node::default()));
                            node.choices.len() - 1
                        }
                    };
                    &mut node.choices[i].1
                }
            };
        }
        node.op = Some(op);
    }

    fn child(&self, key: &str) -> Option<&Node> {
        if let Some(n) = self.children.get(key) {
            return Some(n);
        }
        self.choices.iter().find_map(|(prefix, n)| {
            let rest = key.strip_prefix(prefix.as_str())?;
            rest.starts_with(|c: char| c.is_ascii_uppercase())
                .then_some(n)
        })
    }
}

/// The `[fhir]` rules, prepared.
#[derive(Debug)]
pub(crate) struct FhirRules {
    pub(crate) types: HashMap<String, Node>,
    pub(crate) star: Node,
    pub(crate) extensions: HashMap<String, Op>,
    pub(crate) ids: Arc<Applier>,
    pub(crate) patient_references: Vec<String>,
    pub(crate) reference_label: Arc<str>,
    pub(crate) id_label: Arc<str>,
    pub(crate) birth_date_label: Arc<str>,
    /// Extensions dropped from a Patient over `age_cap` (their values show the age).
    pub(crate) age_extensions: Vec<Arc<str>>,
}

/// What a reference string is.
enum Ref<'a> {
    Local(&'a str),
    Urn(&'a str),
    /// `Type/id[/_history/v]`, relative or absolute.
    Literal {
        rtype: &'a str,
        id: &'a str,
        history: Option<&'a str>,
    },
    Conditional {
        rtype: &'a str,
        query: &'a str,
    },
    Other,
}

fn is_type(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn parse_reference(s: &str) -> Ref<'_> {
    if let Some(local) = s.strip_prefix('#') {
        return Ref::Local(local);
    }
    if let Some(id) = s.strip_prefix("urn:uuid:") {
        return Ref::Urn(id);
    }
    if let Some((rtype, query)) = s.split_once('?') {
        if is_type(rtype) {
            return Ref::Conditional { rtype, query };
        }
        return Ref::Other;
    }
    let path = match s.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, p)| p),
        None => s,
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (rtype, id, history) = match parts.as_slice() {
        [.., t, id, "_history", v] => (*t, *id, Some(*v)),
        [.., t, id] => (*t, *id, None),
        _ => return Ref::Other,
    };
    if is_type(rtype) && is_id(id) && history.is_none_or(is_id) {
        return Ref::Literal { rtype, id, history };
    }
    Ref::Other
}

impl FhirRules {
    /// The rule for `path` under `rtype`, with the walker's precedence.
    fn effective_op(&self, rtype: &str, path: &[&str]) -> Option<&Op> {
        let mut tn = self.types.get(rtype);
        let mut sn = Some(&self.star);
        let mut op = None;
        for seg in path {
            tn = tn.and_then(|n| n.child(seg));
            sn = sn.and_then(|n| n.child(seg));
            if let Some(o) = tn
                .and_then(|n| n.op.as_ref())
                .or_else(|| sn.and_then(|n| n.op.as_ref()))
            {
                op = Some(o);
            }
        }
        op
    }

    /// The pseudonym of a resource id, as a UUID.
    fn id(&self, id: &str, cx: &mut RecordCx<'_>) -> Result<String, Fail> {
        let mut out = String::new();
        self.ids.apply(id, &mut out).map_err(|error| {
            Fail::Reject(RejectReason::Transform {
                field: "id".to_owned(),
                entry: cx.entry,
                error,
            })
        })?;
        Ok(out)
    }

    /// Rewrites a reference; `Ok(None)` if it must be dropped (unknown form, warn mode).
    fn reference(
        &self,
        s: &str,
        path: &str,
        cx: &mut RecordCx<'_>,
    ) -> Result<Option<String>, Fail> {
        cx.stats.add(&self.reference_label, "reference", 1);
        let out = match parse_reference(s) {
            Ref::Local("") => "#".to_owned(),
            Ref::Local(id) => format!("#{}", self.id(id, cx)?),
            Ref::Urn(id) => format!("urn:uuid:{}", self.id(id, cx)?),
            Ref::Literal { rtype, id, history } => {
                let mut out = format!("{rtype}/{}", self.id(id, cx)?);
                if let Some(v) = history {
                    out.push_str("/_history/");
                    out.push_str(v);
                }
                out
            }
            Ref::Conditional { rtype, query } => match self.query(rtype, query, path, cx)? {
                Some(q) => format!("{rtype}?{q}"),
                None => return Ok(None),
            },
            Ref::Other => {
                cx.unknown(format!("{path} (reference form)"))?;
                return Ok(None);
            }
        };
        Ok(Some(out))
    }

    /// A search query `identifier=system|value[&…]`: values transformed by the rule for
    /// `Type.identifier.value`. Any other parameter is unknown.
    fn query(
        &self,
        rtype: &str,
        query: &str,
        path: &str,
        cx: &mut RecordCx<'_>,
    ) -> Result<Option<String>, Fail> {
        let mut out = String::new();
        for param in query.split('&') {
            let Some(("identifier", token)) = param.split_once('=') else {
                let name = param.split_once('=').map_or(param, |(n, _)| n);
                cx.unknown(format!("{path} (search parameter {name})"))?;
                return Ok(None);
            };
            let (system, value) = match token.split_once('|') {
                Some((s, v)) => (Some(s), v),
                None => (None, token),
            };
            let Some(op) = self.effective_op(rtype, &["identifier", "value"]).cloned() else {
                cx.unknown(format!("{rtype}.identifier.value (in {path})"))?;
                return Ok(None);
            };
            let mut v = Json::String(percent_decode(value));
            let label = format!("{rtype}.identifier.value");
            if !cx.leaf(&mut v, &op, &label)? {
                return Ok(None);
            }
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str("identifier=");
            if let Some(system) = system {
                out.push_str(system);
                out.push('|');
            }
            percent_encode_into(v.as_str().unwrap_or_default(), &mut out);
        }
        Ok(Some(out))
    }

    /// The raw id of the patient a resource belongs to.
    fn patient_of(
        &self,
        res: &Json,
        rtype: &str,
        types: &HashMap<String, String>,
        bundle_patient: Option<&str>,
    ) -> Option<String> {
        if rtype == "Patient" {
            return res.get("id").and_then(Json::as_str).map(str::to_owned);
        }
        for name in &self.patient_references {
            let target = match res.get(name) {
                Some(Json::Array(items)) => items.first(),
                other => other,
            };
            let Some(reference) = target
                .and_then(|t| t.get("reference"))
                .and_then(Json::as_str)
            else {
                continue;
            };
            match parse_reference(reference) {
                Ref::Urn(id) if types.get(reference).is_none_or(|t| t == "Patient") => {
                    return Some(id.to_owned())
                }
                Ref::Literal {
                    rtype: "Patient",
                    id,
                    ..
                } => return Some(id.to_owned()),
                _ => {}
            }
        }
        bundle_patient.map(str::to_owned)
    }

    fn patient_state(&self, raw_id: Option<String>, cx: &RecordCx<'_>) -> PatientState {
        let token = match (raw_id, cx.ops.patient()) {
            (Some(id), Some(p)) => {
                let mut t = String::new();
                p.token(&id, &mut t).ok().map(|()| t)
            }
            _ => None,
        };
        PatientState::new(token)
    }

    /// One NDJSON line: a resource, or a bundle.
    pub(crate) fn line(&self, value: &mut Json, cx: &mut RecordCx<'_>) -> Result<(), Fail> {
        let rtype = resource_type(value).ok_or(Fail::Reject(RejectReason::Shape {
            what: "not a FHIR resource (no resourceType)",
            entry: None,
        }))?;
        if rtype == "Bundle" {
            return self.bundle(value, cx);
        }
        cx.patient = self.patient_state(self.patient_of(value, &rtype, &HashMap::new(), None), cx);
        self.resource(value, &rtype, cx)
    }

    /// A whole bundle document.
    pub(crate) fn document(&self, value: &mut Json, cx: &mut RecordCx<'_>) -> Result<(), Fail> {
        if resource_type(value).as_deref() != Some("Bundle") {
            return Err(Fail::Reject(RejectReason::Shape {
                what: "not a FHIR Bundle",
                entry: None,
            }));
        }
        self.bundle(value, cx)
    }

    fn bundle(&self, value: &mut Json, cx: &mut RecordCx<'_>) -> Result<(), Fail> {
        let Json::Object(members) = value else {
            return Err(Fail::Reject(RejectReason::Shape {
                what: "not a FHIR Bundle",
                entry: None,
            }));
        };
        let entry_at = members.iter().position(|(k, _)| k == "entry");
        let mut entries = match entry_at.map(|i| members.remove(i).1) {
            None => Vec::new(),
            Some(Json::Array(items)) => items,
            Some(_) => {
                return Err(Fail::Reject(RejectReason::Shape {
                    what: "Bundle.entry is not an array",
                    entry: None,
                }))
            }
        };
        // Shape first, and what the entries are: fullUrl → type, the one Patient.
        let mut types = HashMap::new();
        let mut patients = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let shape = |what| {
                Fail::Reject(RejectReason::Shape {
                    what,
                    entry: Some(i),
                })
            };
            if !matches!(e, Json::Object(_)) {
                return Err(shape("entry is not an object"));
            }
            let res = e
                .get("resource")
                .ok_or_else(|| shape("entry has no resource"))?;
            let rtype =
                resource_type(res).ok_or_else(|| shape("entry resource has no resourceType"))?;
            if let Some(url) = e.get("fullUrl").and_then(Json::as_str) {
                types.insert(url.to_owned(), rtype.clone());
            }
            if rtype == "Patient" {
                patients.push(res.get("id").and_then(Json::as_str).map(str::to_owned));
            }
        }
        let bundle_patient = match patients.as_slice() {
            [Some(id)] => Some(id.clone()),
            _ => None,
        };
        cx.entry = None;
        cx.patient = PatientState::default();
        self.resource(value, "Bundle", cx)?;
        for (i, e) in entries.iter_mut().enumerate() {
            cx.entry = Some(i);
            self.entry(e, &types, bundle_patient.as_deref(), cx)?;
        }
        cx.entry = None;
        if let (Json::Object(members), Some(at)) = (value, entry_at) {
            let at = at.min(members.len());
            members.insert(at, ("entry".to_owned(), Json::Array(entries)));
        }
        Ok(())
    }

    fn entry(
        &self,
        e: &mut Json,
        types: &HashMap<String, String>,
        bundle_patient: Option<&str>,
        cx: &mut RecordCx<'_>,
    ) -> Result<(), Fail> {
        let Json::Object(members) = e else {
            return Ok(());
        };
        let rtype = members
            .iter()
            .find(|(k, _)| k == "resource")
            .and_then(|(_, r)| resource_type(r))
            .unwrap_or_default();
        for (k, mut v) in std::mem::take(members) {
            let keep = match k.as_str() {
                "resource" => {
                    cx.patient =
                        self.patient_state(self.patient_of(&v, &rtype, types, bundle_patient), cx);
                    self.resource(&mut v, &rtype, cx)?;
                    true
                }
                "fullUrl" => self.string_reference(&mut v, "Bundle.entry.fullUrl", cx)?,
                "request" => self.request(&mut v, &rtype, cx)?,
                _ => {
                    cx.unknown(format!("Bundle.entry.{k}"))?;
                    false
                }
            };
            if keep {
                members.push((k, v));
            }
        }
        Ok(())
    }

    fn string_reference(
        &self,
        v: &mut Json,
        path: &str,
        cx: &mut RecordCx<'_>,
    ) -> Result<bool, Fail> {
        let Json::String(s) = v else {
            cx.unknown(path.to_owned())?;
            return Ok(false);
        };
        match self.reference(s, path, cx)? {
            Some(new) => {
                *s = new;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn request(&self, v: &mut Json, rtype: &str, cx: &mut RecordCx<'_>) -> Result<bool, Fail> {
        let Json::Object(members) = v else {
            cx.unknown("Bundle.entry.request".to_owned())?;
            return Ok(false);
        };
        for (k, mut v) in std::mem::take(members) {
            let keep = match (k.as_str(), &mut v) {
                ("method", Json::String(_)) => true,
                ("url", Json::String(s)) if is_type(s) => true,
                ("url", _) => self.string_reference(&mut v, "Bundle.entry.request.url", cx)?,
                ("ifNoneExist", Json::String(q)) => {
                    match self.query(rtype, q, "Bundle.entry.request.ifNoneExist", cx)? {
                        Some(new) => {
                            *q = new;
                            true
                        }
                        None => false,
                    }
                }
                _ => {
                    cx.unknown(format!("Bundle.entry.request.{k}"))?;
                    false
                }
            };
            if keep {
                members.push((k, v));
            }
        }
        Ok(!members.is_empty())
    }

    /// One resource (the top level of a resource object).
    fn resource(&self, value: &mut Json, rtype: &str, cx: &mut RecordCx<'_>) -> Result<(), Fail> {
        let Json::Object(members) = value else {
            return Err(Fail::Reject(RejectReason::Shape {
                what: "resource is not an object",
                entry: cx.entry,
            }));
        };
        if rtype == "Patient" {
            self.age_cap(members, cx);
        }
        let tn = self.types.get(rtype);
        self.object(members, tn, Some(&self.star), None, rtype, true, cx)
    }

    /// A Patient over the policy's `age_cap` (by its own birth and death dates) loses its
    /// `birthDate` (with `_birthDate`) and the `age_extensions`, before the rules apply.
    fn age_cap(&self, members: &mut Vec<(String, Json)>, cx: &mut RecordCx<'_>) {
        let Some(age) = cx.age else { return };
        let text = |key: &str| {
            members
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.as_str())
        };
        let Some(birth) = text("birthDate") else {
            return;
        };
        if !age.exceeded(birth, text("deceasedDateTime")) {
            return;
        }
        members.retain(|(k, _)| k != "birthDate" && k != "_birthDate");
        cx.stats.add(&self.birth_date_label, OVER_AGE_CAP, 1);
        let Some((_, Json::Array(items))) = members.iter_mut().find(|(k, _)| k == "extension")
        else {
            return;
        };
        items.retain(|item| {
            let url = item.get("url").and_then(Json::as_str).unwrap_or_default();
            match self.age_extensions.iter().find(|u| u.as_ref() == url) {
                Some(label) => {
                    cx.stats.add(label, OVER_AGE_CAP, 1);
                    false
                }
                None => true,
            }
        });
        if items.is_empty() {
            members.retain(|(k, _)| k != "extension");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn object(
        &self,
        members: &mut Vec<(String, Json)>,
        tn: Option<&Node>,
        sn: Option<&Node>,
        inherited: Option<&Op>,
        path: &str,
        root: bool,
        cx: &mut RecordCx<'_>,
    ) -> Result<(), Fail> {
        for (k, mut v) in std::mem::take(members) {
            let child_path = format!("{path}.{k}");
            let keep = match k.as_str() {
                "extension" | "modifierExtension" => self.extensions(&mut v, &child_path, cx)?,
                "reference" if matches!(v, Json::String(_)) => {
                    self.string_reference(&mut v, &child_path, cx)?
                }
                "resourceType" if root => true,
                "id" if root => match &mut v {
                    Json::String(s) => {
                        *s = self.id(s, cx)?;
                        cx.stats.add(&self.id_label, "pseudonym", 1);
                        true
                    }
                    _ => {
                        cx.unknown(child_path)?;
                        false
                    }
                },
                "contained" if root => {
                    if let Json::Array(items) = &mut v {
                        for item in items.iter_mut() {
                            let rtype =
                                resource_type(item).ok_or(Fail::Reject(RejectReason::Shape {
                                    what: "contained resource has no resourceType",
                                    entry: cx.entry,
                                }))?;
                            self.resource(item, &rtype, cx)?;
                        }
                        true
                    } else {
                        cx.unknown(child_path)?;
                        false
                    }
                }
                _ => {
                    let ct = tn.and_then(|n| n.child(&k));
                    let cs = sn.and_then(|n| n.child(&k));
                    let op = ct
                        .and_then(|n| n.op.as_ref())
                        .or_else(|| cs.and_then(|n| n.op.as_ref()))
                        .or(inherited);
                    if ct.is_none() && cs.is_none() && inherited.is_none() {
                        if is_reference(&v) {
                            // A Reference no rule names: its `reference` is rewritten like
                            // every other; its other members still need rules.
                            self.value(&mut v, None, None, None, &child_path, cx)?
                        } else {
                            cx.unknown(child_path)?;
                            false
                        }
                    } else if let Some(op) = op.filter(|op| op.is_drop()) {
                        cx.stats.count(op);
                        false
                    } else {
                        self.value(&mut v, ct, cs, op, &child_path, cx)?
                    }
                }
            };
            if keep {
                members.push((k, v));
            }
        }
        Ok(())
    }

    fn value(
        &self,
        v: &mut Json,
        tn: Option<&Node>,
        sn: Option<&Node>,
        op: Option<&Op>,
        path: &str,
        cx: &mut RecordCx<'_>,
    ) -> Result<bool, Fail> {
        match v {
            Json::Object(members) => {
                let was_empty = members.is_empty();
                self.object(members, tn, sn, op, path, false, cx)?;
                Ok(was_empty || !members.is_empty())
            }
            Json::Array(items) => {
                let was_empty = items.is_empty();
                for mut item in std::mem::take(items) {
                    if self.value(&mut item, tn, sn, op, path, cx)? {
                        items.push(item);
                    }
                }
                Ok(was_empty || !items.is_empty())
            }
            _ => match op {
                Some(op) => cx.leaf(v, op, path),
                None => {
                    cx.unknown(path.to_owned())?;
                    Ok(false)
                }
            },
        }
    }

    /// An `extension` array: each entry by its URL.
    fn extensions(&self, v: &mut Json, path: &str, cx: &mut RecordCx<'_>) -> Result<bool, Fail> {
        let Json::Array(items) = v else {
            cx.unknown(path.to_owned())?;
            return Ok(false);
        };
        for mut item in std::mem::take(items) {
            let Some(url) = item.get("url").and_then(Json::as_str).map(str::to_owned) else {
                cx.unknown(format!("{path} (without url)"))?;
                continue;
            };
            let Some(op) = self.extensions.get(&url) else {
                cx.unknown(format!("{path}({url})"))?;
                continue;
            };
            let keep = match op.kind {
                OpKind::Drop => {
                    cx.stats.count(op);
                    false
                }
                _ => {
                    self.extension_values(&mut item, op, path, cx)?;
                    true
                }
            };
            if keep {
                items.push(item);
            }
        }
        Ok(!items.is_empty())
    }

    /// Applies an extension rule to every value but its `url`s; references are rewritten.
    fn extension_values(
        &self,
        v: &mut Json,
        op: &Op,
        path: &str,
        cx: &mut RecordCx<'_>,
    ) -> Result<bool, Fail> {
        match v {
            Json::Object(members) => {
                for (k, mut child) in std::mem::take(members) {
                    let keep = match (k.as_str(), &child) {
                        ("url", Json::String(_)) => true,
                        ("reference", Json::String(_)) => {
                            self.string_reference(&mut child, path, cx)?
                        }
                        _ => self.extension_values(&mut child, op, path, cx)?,
                    };
                    if keep {
                        members.push((k, child));
                    }
                }
                Ok(!members.is_empty())
            }
            Json::Array(items) => {
                for mut item in std::mem::take(items) {
                    if self.extension_values(&mut item, op, path, cx)? {
                        items.push(item);
                    }
                }
                Ok(!items.is_empty())
            }
            _ => cx.leaf(v, op, path),
        }
    }
}

/// A Reference (an object with a string `reference`), or an array of them.
fn is_reference(v: &Json) -> bool {
    match v {
        Json::Object(_) => matches!(v.get("reference"), Some(Json::String(_))),
        Json::Array(items) => !items.is_empty() && items.iter().all(is_reference),
        _ => false,
    }
}

fn resource_type(v: &Json) -> Option<String> {
    v.get("resourceType")
        .and_then(Json::as_str)
        .filter(|t| is_type(t))
        .map(str::to_owned)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode_into(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_forms() {
        assert!(matches!(parse_reference("urn:uuid:abc"), Ref::Urn("abc")));
        assert!(matches!(
            parse_reference("#referral"),
            Ref::Local("referral")
        ));
        assert!(matches!(
            parse_reference("Patient/123"),
            Ref::Literal {
                rtype: "Patient",
                id: "123",
                history: None
            }
        ));
        assert!(matches!(
            parse_reference("https://fhir.example.org/r4/Encounter/e-1/_history/2"),
            Ref::Literal {
                rtype: "Encounter",
                id: "e-1",
                history: Some("2")
            }
        ));
        assert!(matches!(
            parse_reference("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999177691"),
            Ref::Conditional {
                rtype: "Practitioner",
                ..
            }
        ));
        assert!(matches!(parse_reference("urn:oid:1.2.3"), Ref::Other));
        assert!(matches!(parse_reference("patient 123"), Ref::Other));
    }

    #[test]
    fn percent_coding_round_trips() {
        assert_eq!(percent_decode("a%20b%7C"), "a b|");
        assert_eq!(percent_decode("50%"), "50%");
        let mut out = String::new();
        percent_encode_into("v1.a b|", &mut out);
        assert_eq!(out, "v1.a%20b%7C");
    }
}
