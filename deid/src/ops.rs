//! Policy actions prepared with the domain key: [`Op`] is what the record walkers apply to one
//! value. Keys are derived once per (transform, key name) here, never on the hot path.
//!
//! Date shifts do not go through `FieldTransformer`: the engine keeps the domain's one
//! [`DateShifter`] and computes each patient's offset once per record ([`PatientState`]),
//! then shifts every date of the record with `date_shift::shift_into` — the same arithmetic as
//! the transform, without one HMAC per date.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use tokenize::date_shift::{self, DateShifter};
use tokenize::{Context, DomainKey, FieldTransformer, Outcome, TokenizeError, Transform};

use crate::policy::{Action, Policy};
use crate::DeidError;

/// What to do with one value, and the field label it is counted and reported under.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub(crate) kind: OpKind,
    pub(crate) label: Arc<str>,
}

#[derive(Debug, Clone)]
pub(crate) enum OpKind {
    Keep,
    Drop,
    Shift,
    Apply(Arc<Applier>),
}

impl Op {
    /// The transform kind, as in the report.
    pub(crate) fn kind_name(&self) -> &'static str {
        match &self.kind {
            OpKind::Keep => "keep",
            OpKind::Drop => "drop",
            OpKind::Shift => "date_shift",
            OpKind::Apply(a) => a.kind,
        }
    }

    pub(crate) fn is_drop(&self) -> bool {
        matches!(self.kind, OpKind::Drop)
    }
}

/// A prepared transform other than keep, drop and date shift.
#[derive(Debug)]
pub(crate) struct Applier {
    transformer: FieldTransformer,
    uuid: bool,
    zero_pad: usize,
    kind: &'static str,
    /// For `age` under an `age_cap` below 89: ages above it are aggregated too.
    age_cap: Option<u32>,
}

impl Applier {
    /// Writes the transformed `value` into `out` (cleared first). Empty stays empty.
    pub(crate) fn apply(&self, value: &str, out: &mut String) -> Result<(), TokenizeError> {
        let padded;
        let value = if value.len() < self.zero_pad
            && !value.is_empty()
            && value.bytes().all(|b| b.is_ascii_digit())
        {
            padded = format!("{value:0>width$}", width = self.zero_pad);
            padded.as_str()
        } else {
            value
        };
        match self
            .transformer
            .apply_into(value, &Context::default(), out)?
        {
            Outcome::Written => {}
            // Drop is OpKind::Drop and never prepared as an Applier.
            Outcome::Dropped => out.clear(),
        }
        if self.uuid && !out.is_empty() {
            token_to_uuid(out);
        }
        if let Some(cap) = self.age_cap {
            let above = out == tokenize::generalize::AGE_90_OR_OLDER
                || out.parse::<u32>().is_ok_and(|age| age > cap);
            if above {
                out.clear();
                out.push_str(&format!("{} or older", cap + 1));
            }
        }
        Ok(())
    }

    /// The pseudonym token of `value` (not UUID-formatted): the patient context of date shifts.
    pub(crate) fn token(&self, value: &str, out: &mut String) -> Result<(), TokenizeError> {
        self.transformer
            .apply_into(value, &Context::default(), out)?;
        Ok(())
    }
}

/// Rewrites a pseudonym token `v<version>.<base64url of 16 bytes>` in place as a UUID
/// (RFC 9562 version 8, "custom": the 122 free bits come from the pseudonym).
pub(crate) fn token_to_uuid(token: &mut String) {
    let payload = token.split_once('.').map_or("", |(_, p)| p);
    let mut bytes = [0u8; 16];
    let decoded = URL_SAFE_NO_PAD.decode(payload).unwrap_or_default();
    let n = decoded.len().min(16);
    bytes[..n].copy_from_slice(&decoded[..n]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    token.clear();
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            token.push('-');
        }
        token.push(char::from(HEX[usize::from(b >> 4)]));
        token.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The patient a record belongs to: the pseudonym token and, once needed, the date offset.
#[derive(Debug, Default)]
pub(crate) struct PatientState {
    token: Option<String>,
    offset: Option<i64>,
}

impl PatientState {
    pub(crate) fn new(token: Option<String>) -> Self {
        Self {
            token,
            offset: None,
        }
    }

    /// A patient whose offset may be known already (a cache of the previous record's).
    pub(crate) fn with_offset(token: String, offset: Option<i64>) -> Self {
        Self {
            token: Some(token),
            offset,
        }
    }

    /// The token and the offset, if it was computed, for the caller's cache.
    pub(crate) fn into_parts(self) -> (Option<String>, Option<i64>) {
        (self.token, self.offset)
    }
}

/// Every prepared transform of one engine.
#[derive(Debug)]
pub(crate) struct Ops {
    shifter: Option<DateShifter>,
    cache: HashMap<(usize, String), Arc<Applier>>,
    patient: Option<Arc<Applier>>,
}

impl Ops {
    pub(crate) fn new(policy: &Policy, key: &DomainKey) -> Result<Self, DeidError> {
        let mut shifter = None;
        for spec in &policy.specs {
            if let Transform::DateShift { max_days } = spec.transform {
                // The policy allows one max_days per domain, so one shifter serves all.
                shifter = Some(DateShifter::new(key, max_days).map_err(|source| {
                    DeidError::Transform {
                        field: "date_shift".to_owned(),
                        source,
                    }
                })?);
            }
        }
        let mut ops = Self {
            shifter,
            cache: HashMap::new(),
            patient: None,
        };
        if let Some(id) = policy.patient_spec() {
            let op = ops.op(policy, key, crate::policy::Action::Apply(id), "patient")?;
            if let OpKind::Apply(a) = op.kind {
                ops.patient = Some(a);
            }
        }
        Ok(ops)
    }

    /// The patient transform (its token is the date-shift context).
    pub(crate) fn patient(&self) -> Option<&Arc<Applier>> {
        self.patient.as_ref()
    }

    /// Prepares `action` for the field `label`.
    pub(crate) fn op(
        &mut self,
        policy: &Policy,
        key: &DomainKey,
        action: Action,
        label: &str,
    ) -> Result<Op, DeidError> {
        let label: Arc<str> = Arc::from(label);
        let id = match action {
            Action::Keep => {
                return Ok(Op {
                    kind: OpKind::Keep,
                    label,
                })
            }
            Action::Apply(id) => id,
        };
        let spec = &policy.specs[id];
        let kind = match &spec.transform {
            Transform::Drop { .. } => OpKind::Drop,
            Transform::DateShift { .. } => OpKind::Shift,
            transform => {
                let derivation = spec.key.clone().unwrap_or_else(|| label.to_string());
                let cache_key = (id, derivation);
                let applier = match self.cache.get(&cache_key) {
                    Some(a) => Arc::clone(a),
                    None => {
                        let transformer = FieldTransformer::new(key, &cache_key.1, transform)
                            .map_err(|source| DeidError::Transform {
                                field: label.to_string(),
                                source,
                            })?;
                        let a = Arc::new(Applier {
                            transformer,
                            uuid: spec.uuid,
                            zero_pad: spec.zero_pad,
                            kind: transform.kind(),
                            age_cap: policy.age_cap.map(|a| a.cap).filter(|&cap| {
                                cap < 89 && matches!(transform, Transform::Age { .. })
                            }),
                        });
                        self.cache.insert(cache_key, Arc::clone(&a));
                        a
                    }
                };
                OpKind::Apply(applier)
            }
        };
        Ok(Op { kind, label })
    }

    /// A pseudonym of file names (`fhir.file_names = "pseudonymize"`), as a UUID.
    pub(crate) fn file_namer(&mut self, key: &DomainKey) -> Result<Arc<Applier>, DeidError> {
        let transform = Transform::Pseudonym {
            normalize: tokenize::Normalization::Exact,
        };
        let transformer =
            FieldTransformer::new(key, "deid/file-name", &transform).map_err(|source| {
                DeidError::Transform {
                    field: "file name".to_owned(),
                    source,
                }
            })?;
        Ok(Arc::new(Applier {
            transformer,
            uuid: true,
            zero_pad: 0,
            kind: "pseudonym",
            age_cap: None,
        }))
    }

    /// Shifts `value` by the record's patient offset into `out`.
    pub(crate) fn shift(
        &self,
        value: &str,
        patient: &mut PatientState,
        out: &mut String,
    ) -> Result<(), TokenizeError> {
        out.clear();
        if value.is_empty() {
            return Ok(());
        }
        let offset = match patient.offset {
            Some(o) => o,
            None => {
                let token = patient
                    .token
                    .as_deref()
                    .ok_or(TokenizeError::MissingPatient)?;
                let shifter = self.shifter.as_ref().ok_or(TokenizeError::MissingPatient)?;
                let o = shifter.offset_days(token);
                patient.offset = Some(o);
                o
            }
        };
        date_shift::shift_into(value, offset, out)
    }

    /// Applies `op` to `value`; `Ok(false)` if the field is dropped.
    pub(crate) fn apply(
        &self,
        op: &Op,
        value: &str,
        patient: &mut PatientState,
        out: &mut String,
    ) -> Result<bool, TokenizeError> {
        match &op.kind {
            OpKind::Keep => {
                out.clear();
                out.push_str(value);
            }
            OpKind::Drop => {
                out.clear();
                return Ok(false);
            }
            OpKind::Shift => self.shift(value, patient, out)?,
            OpKind::Apply(a) => a.apply(value, out)?,
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_from_token_is_a_version_8_uuid() {
        let mut t = "v1.AAECAwQFBgcICQoLDA0ODw".to_owned();
        token_to_uuid(&mut t);
        assert_eq!(t, "00010203-0405-8607-8809-0a0b0c0d0e0f");
    }
}
