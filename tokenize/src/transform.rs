//! The description of transforms ([`Transform`], read from the policy file) and their prepared
//! form for one field ([`FieldTransformer`]): the one entry point that applies a transform to a
//! field value, and the inverse one for the reversible transforms.

use serde::Deserialize;

use crate::date_shift::DateShifter;
use crate::ff1::FormatPreserving;
use crate::keys::DomainKey;
use crate::normalize::Normalization;
use crate::pseudonym::Pseudonymizer;
use crate::siv::SivCipher;
use crate::{generalize, mask, Result, TokenizeError};

/// One transform with its parameters, as written in a policy (`kind = "…"`; unknown keys are
/// refused).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// Keyed pseudonym: HMAC-SHA256 of the normalized value; irreversible, joinable.
    Pseudonym {
        /// How the value is normalized first.
        #[serde(default)]
        normalize: Normalization,
    },
    /// Deterministic encryption with AES-SIV; reversible, joinable.
    Deterministic {
        /// How the value is normalized first (default: exact, so decryption gives it back).
        #[serde(default = "exact")]
        normalize: Normalization,
    },
    /// Format-preserving encryption with FF1; reversible, keeps length, alphabet, separators.
    Fpe {
        /// The symbols that are encrypted.
        alphabet: Alphabet,
        /// Characters kept in place (e.g. `"-"` for SSNs, `" -()."` for phones).
        #[serde(default)]
        separators: String,
        /// Fewest symbols a value may have (default and lowest allowed: the smallest length with
        /// radix^len ≥ 1 000 000).
        #[serde(default)]
        min_len: Option<usize>,
        /// Most symbols a value may have (at most 256).
        max_len: usize,
    },
    /// Date shift by the patient's offset in ±`max_days`.
    DateShift {
        /// N of the ±N days; one value per domain.
        max_days: u32,
    },
    /// ZIP code to its first three digits (`000` for the restricted areas).
    // The parameterless kinds are empty struct variants, not unit variants: serde ignores
    // `deny_unknown_fields` for unit variants of an internally tagged enum, and a mistyped
    // parameter must be an error, not silently dropped.
    Zip3 {},
    /// Date to its year.
    Year {},
    /// Age in years: kept up to 89, `90 or older` above.
    Age {},
    /// Keep the last `keep_last` characters, mask the rest.
    Mask {
        /// Characters kept at the end.
        keep_last: usize,
        /// The masking character.
        #[serde(default = "star")]
        mask_char: char,
    },
    /// Replace the value by a fixed text.
    Redact {
        /// The replacement.
        #[serde(default = "redacted")]
        replacement: String,
    },
    /// Remove the field.
    Drop {},
}

fn exact() -> Normalization {
    Normalization::Exact
}

fn star() -> char {
    '*'
}

fn redacted() -> String {
    "[REDACTED]".to_owned()
}

/// An FF1 alphabet: its symbols in numeral order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Alphabet {
    /// `0123456789` (radix 10).
    Digits,
    /// `0-9a-z` (radix 36).
    LowerAlphanumeric,
    /// `0-9A-Z` (radix 36).
    UpperAlphanumeric,
    /// `0-9A-Za-z` (radix 62).
    Alphanumeric,
    /// The given symbols, each once.
    Custom(String),
}

impl Alphabet {
    /// The symbols.
    pub fn symbols(&self) -> &str {
        match self {
            Alphabet::Digits => "0123456789",
            Alphabet::LowerAlphanumeric => "0123456789abcdefghijklmnopqrstuvwxyz",
            Alphabet::UpperAlphanumeric => "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            Alphabet::Alphanumeric => {
                "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
            }
            Alphabet::Custom(symbols) => symbols,
        }
    }
}

impl Transform {
    /// The transform's kind, as in the policy.
    pub fn kind(&self) -> &'static str {
        match self {
            Transform::Pseudonym { .. } => "pseudonym",
            Transform::Deterministic { .. } => "deterministic",
            Transform::Fpe { .. } => "fpe",
            Transform::DateShift { .. } => "date_shift",
            Transform::Zip3 {} => "zip3",
            Transform::Year {} => "year",
            Transform::Age {} => "age",
            Transform::Mask { .. } => "mask",
            Transform::Redact { .. } => "redact",
            Transform::Drop {} => "drop",
        }
    }
}

/// What a transform needs besides the value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// The patient's pseudonym (the domain's pseudonym of the patient id), for date shifts.
    pub patient_pseudonym: Option<&'a str>,
}

/// What [`FieldTransformer::apply_into`] did with the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The buffer holds the new value.
    Written,
    /// The field is to be removed; the buffer is empty.
    Dropped,
}

/// The result of [`FieldTransformer::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transformed {
    /// The new value.
    Value(String),
    /// The field is to be removed.
    Dropped,
}

/// A transform prepared for one field of one domain: its keys are derived once, here, so
/// applying it does no HKDF. Build one per (field, transform) and reuse it; it is `Send + Sync`.
#[derive(Debug)]
pub struct FieldTransformer {
    prepared: Prepared,
}

#[derive(Debug)]
enum Prepared {
    Pseudonym(Pseudonymizer),
    Deterministic(Box<SivCipher>),
    Fpe(Box<FormatPreserving>),
    DateShift(DateShifter),
    Zip3,
    Year,
    Age,
    Mask { keep_last: usize, mask_char: char },
    Redact(String),
    Drop,
}

impl FieldTransformer {
    /// Prepares `transform` for `field`, deriving its keys from `domain_key`; parameter errors
    /// (FF1 domain rules, date-shift range) are reported here.
    pub fn new(domain_key: &DomainKey, field: &str, transform: &Transform) -> Result<Self> {
        let prepared = match transform {
            Transform::Pseudonym { normalize } => {
                Prepared::Pseudonym(Pseudonymizer::new(domain_key, field, *normalize))
            }
            Transform::Deterministic { normalize } => {
                Prepared::Deterministic(Box::new(SivCipher::new(domain_key, field, *normalize)))
            }
            Transform::Fpe {
                alphabet,
                separators,
                min_len,
                max_len,
            } => Prepared::Fpe(Box::new(FormatPreserving::new(
                domain_key,
                field,
                alphabet.symbols(),
                separators,
                *min_len,
                *max_len,
            )?)),
            Transform::DateShift { max_days } => {
                Prepared::DateShift(DateShifter::new(domain_key, *max_days)?)
            }
            Transform::Zip3 {} => Prepared::Zip3,
            Transform::Year {} => Prepared::Year,
            Transform::Age {} => Prepared::Age,
            Transform::Mask {
                keep_last,
                mask_char,
            } => Prepared::Mask {
                keep_last: *keep_last,
                mask_char: *mask_char,
            },
            Transform::Redact { replacement } => Prepared::Redact(replacement.clone()),
            Transform::Drop {} => Prepared::Drop,
        };
        Ok(Self { prepared })
    }

    /// Applies the transform to `value`, writing the result into `out` (cleared first; reuse it
    /// across calls to avoid allocations). An empty value stays empty (there is nothing to
    /// hide), except that a dropped field is dropped.
    pub fn apply_into(&self, value: &str, ctx: &Context<'_>, out: &mut String) -> Result<Outcome> {
        out.clear();
        if let Prepared::Drop = self.prepared {
            return Ok(Outcome::Dropped);
        }
        if value.is_empty() {
            return Ok(Outcome::Written);
        }
        match &self.prepared {
            Prepared::Pseudonym(p) => p.pseudonymize_into(value, out)?,
            Prepared::Deterministic(s) => s.encrypt_into(value, out)?,
            Prepared::Fpe(f) => f.encrypt_into(value, out)?,
            Prepared::DateShift(d) => {
                let patient = ctx.patient_pseudonym.ok_or(TokenizeError::MissingPatient)?;
                d.shift_into(value, patient, out)?;
            }
            Prepared::Zip3 => out.push_str(generalize::zip3(value)?),
            Prepared::Year => generalize::year_into(value, out)?,
            Prepared::Age => generalize::age_into(value, out)?,
            Prepared::Mask {
                keep_last,
                mask_char,
            } => mask::mask_into(value, *keep_last, *mask_char, out),
            Prepared::Redact(replacement) => mask::redact_into(replacement, out),
            Prepared::Drop => return Ok(Outcome::Dropped),
        }
        Ok(Outcome::Written)
    }

    /// [`FieldTransformer::apply_into`] into a new string.
    pub fn apply(&self, value: &str, ctx: &Context<'_>) -> Result<Transformed> {
        let mut out = String::with_capacity(value.len() + 32);
        match self.apply_into(value, ctx, &mut out)? {
            Outcome::Written => Ok(Transformed::Value(out)),
            Outcome::Dropped => Ok(Transformed::Dropped),
        }
    }

    /// Reverses a reversible transform (deterministic encryption, FF1): writes the original
    /// value into `out` (cleared first). Any failure to decrypt is
    /// [`TokenizeError::DecryptFailed`]; other transforms are [`TokenizeError::NotReversible`].
    pub fn reverse_into(&self, token: &str, out: &mut String) -> Result<()> {
        out.clear();
        if token.is_empty() {
            return Ok(());
        }
        match &self.prepared {
            Prepared::Deterministic(s) => s.decrypt_into(token, out),
            Prepared::Fpe(f) => f
                .decrypt_into(token, out)
                .map_err(|_| TokenizeError::DecryptFailed),
            other => Err(TokenizeError::NotReversible {
                transform: other.kind(),
            }),
        }
    }

    /// [`FieldTransformer::reverse_into`] into a new string.
    pub fn reverse(&self, token: &str) -> Result<String> {
        let mut out = String::with_capacity(token.len());
        self.reverse_into(token, &mut out)?;
        Ok(out)
    }
}

impl Prepared {
    fn kind(&self) -> &'static str {
        match self {
            Prepared::Pseudonym(_) => "pseudonym",
            Prepared::Deterministic(_) => "deterministic",
            Prepared::Fpe(_) => "fpe",
            Prepared::DateShift(_) => "date_shift",
            Prepared::Zip3 => "zip3",
            Prepared::Year => "year",
            Prepared::Age => "age",
            Prepared::Mask { .. } => "mask",
            Prepared::Redact(_) => "redact",
            Prepared::Drop => "drop",
        }
    }
}
