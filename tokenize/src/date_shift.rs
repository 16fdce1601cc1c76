//! Consistent date shifting: one offset per patient, applied to every date of that patient in
//! every file, so intervals between the patient's events are kept exactly.
//!
//! The offset is derived from the patient's *pseudonym* (the output of the patient-id
//! pseudonym transform of the same domain) under a domain-wide key (HKDF purpose
//! `date-shift/hmac-sha256`, field `""`): HMAC-SHA256(key, u32be(counter) ‖ pseudonym), read as
//! 64-bit big-endian words, mapped to [−N, N] by rejection sampling (a word at or above the
//! largest multiple of 2N+1 is skipped), so every offset is equally likely, with no modulo bias.
//! An offset of 0 is as likely as any other and is kept: excluding it would tell an attacker
//! that every shown date is *not* the real one. The same N must be used for a whole domain
//! (offsets for different N are unrelated).
//!
//! Accepted forms (ISO 8601 / RFC 3339 / FHIR `date` and `dateTime`):
//! - `YYYY-MM-DD`: shifted.
//! - `YYYY-MM-DDThh:mm[:ss[.fraction]][Z|±hh:mm]`: the calendar date is shifted, the time and
//!   the offset are kept as written, so the instant moves by exactly offset × 24 h and the
//!   interval between any two date-times of the patient is unchanged.
//! - Partial dates `YYYY` and `YYYY-MM` cannot be shifted by days without inventing a day; they
//!   are *generalized to the year* (`1968-07` → `1968`), which HIPAA Safe Harbor permits (ages
//!   over 89 aside, which the generalization module handles).

use time::{Date, Duration, Month};

use crate::keys::{DomainKey, Purpose};
use crate::pseudonym::{mac, prepare};
use crate::{Result, TokenizeError};

/// Largest allowed ±N, in days (100 years).
pub const MAX_SHIFT_DAYS: u32 = 36_525;

/// Derives per-patient offsets and applies them.
#[derive(Clone)]
pub struct DateShifter {
    mac: hmac::Hmac<sha2::Sha256>,
    max_days: u32,
}

impl DateShifter {
    /// The date shifter of the domain, with offsets in ±`max_days` (1 to [`MAX_SHIFT_DAYS`]).
    pub fn new(domain_key: &DomainKey, max_days: u32) -> Result<Self> {
        if !(1..=MAX_SHIFT_DAYS).contains(&max_days) {
            return Err(TokenizeError::InvalidParameter {
                parameter: "max_days",
                reason: "must be between 1 and 36525",
            });
        }
        let key = domain_key.derive::<32>("", Purpose::DateShift);
        Ok(Self {
            mac: prepare(key.as_slice()),
            max_days,
        })
    }

    /// The configured N.
    pub fn max_days(&self) -> u32 {
        self.max_days
    }

    /// The patient's offset in days, uniform in [−N, N].
    pub fn offset_days(&self, patient_pseudonym: &str) -> i64 {
        let n = u64::from(self.max_days);
        let range = 2 * n + 1;
        // Words below the largest multiple of the range under 2^64 are accepted.
        let limit = (1u128 << 64) / u128::from(range) * u128::from(range);
        let mut msg = Vec::with_capacity(4 + patient_pseudonym.len());
        let mut counter: u32 = 0;
        loop {
            msg.clear();
            msg.extend_from_slice(&counter.to_be_bytes());
            msg.extend_from_slice(patient_pseudonym.as_bytes());
            let tag = mac(&self.mac, &msg);
            for word in tag.chunks_exact(8) {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(word);
                let x = u64::from_be_bytes(bytes);
                if u128::from(x) < limit {
                    // x % range ≤ 2N ≤ 73 050, so both conversions are exact.
                    return (x % range) as i64 - n as i64;
                }
            }
            counter = counter.wrapping_add(1);
        }
    }

    /// Shifts `value` by the patient's offset into `out` (cleared first).
    pub fn shift_into(&self, value: &str, patient_pseudonym: &str, out: &mut String) -> Result<()> {
        shift_into(value, self.offset_days(patient_pseudonym), out)
    }
}

impl std::fmt::Debug for DateShifter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DateShifter")
            .field("max_days", &self.max_days)
            .finish_non_exhaustive()
    }
}

/// A parsed date value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// `YYYY` or `YYYY-MM`.
    Partial { year: i32 },
    /// A full date, with the rest (`""` or a validated `T…` time part).
    Full { date: Date, rest: &'a str },
}

/// Shifts `value` by `offset` days into `out` (cleared first); see the module documentation.
pub fn shift_into(value: &str, offset: i64, out: &mut String) -> Result<()> {
    out.clear();
    match parse(value)? {
        Parsed::Partial { year } => push_year(out, year),
        Parsed::Full { date, rest } => {
            let shifted = date
                .checked_add(Duration::days(offset))
                .ok_or(TokenizeError::DateOutOfRange)?;
            if !(0..=9999).contains(&shifted.year()) {
                return Err(TokenizeError::DateOutOfRange);
            }
            push_date(out, shifted);
            out.push_str(rest);
        }
    }
    Ok(())
}

pub(crate) fn push_year(out: &mut String, year: i32) {
    use std::fmt::Write;
    let _ = write!(out, "{year:04}");
}

fn push_date(out: &mut String, date: Date) {
    use std::fmt::Write;
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    );
}

fn invalid(reason: &'static str) -> TokenizeError {
    TokenizeError::InvalidDate { reason }
}

fn digits(s: &str, range: std::ops::Range<usize>) -> Result<u32> {
    let part = s.get(range).ok_or(invalid("too short"))?;
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("expected digits"));
    }
    part.parse().map_err(|_| invalid("expected digits"))
}

/// Parses the accepted forms (see the module documentation).
pub(crate) fn parse(value: &str) -> Result<Parsed<'_>> {
    let year = digits(value, 0..4)? as i32;
    match value.len() {
        4 => return Ok(Parsed::Partial { year }),
        7 if value.as_bytes()[4] == b'-' => {
            let month = digits(value, 5..7)?;
            if !(1..=12).contains(&month) {
                return Err(invalid("month out of range"));
            }
            return Ok(Parsed::Partial { year });
        }
        n if n < 10 => return Err(invalid("not YYYY, YYYY-MM or YYYY-MM-DD")),
        _ => {}
    }
    let bytes = value.as_bytes();
    if bytes[4] != b'-' || bytes[7] != b'-' {
        return Err(invalid("not YYYY-MM-DD"));
    }
    let month = digits(value, 5..7)?;
    let day = digits(value, 8..10)?;
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or(invalid("month out of range"))?;
    let day = u8::try_from(day).map_err(|_| invalid("day out of range"))?;
    let date =
        Date::from_calendar_date(year, month, day).map_err(|_| invalid("not a calendar date"))?;
    let rest = &value[10..];
    if !rest.is_empty() {
        check_time(rest)?;
    }
    Ok(Parsed::Full { date, rest })
}

/// `Thh:mm[:ss[.fraction]][Z|±hh:mm]`.
fn check_time(rest: &str) -> Result<()> {
    let b = rest.as_bytes();
    if b[0] != b'T' || b.len() < 6 || b[3] != b':' {
        return Err(invalid("time must be Thh:mm"));
    }
    if digits(rest, 1..3)? > 23 || digits(rest, 4..6)? > 59 {
        return Err(invalid("time out of range"));
    }
    let mut i = 6;
    if b.get(i) == Some(&b':') {
        if digits(rest, i + 1..i + 3)? > 60 {
            return Err(invalid("seconds out of range"));
        }
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start || i - start > 9 {
                return Err(invalid("fraction must have 1 to 9 digits"));
            }
        }
    }
    match b.get(i) {
        None => Ok(()),
        Some(b'Z') if i + 1 == b.len() => Ok(()),
        Some(b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            if digits(rest, i + 1..i + 3)? > 23 || digits(rest, i + 4..i + 6)? > 59 {
                return Err(invalid("zone offset out of range"));
            }
            Ok(())
        }
        _ => Err(invalid("bad time zone")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shifted(v: &str, offset: i64) -> Result<String> {
        let mut out = String::new();
        shift_into(v, offset, &mut out).map(|()| out)
    }

    #[test]
    fn forms() {
        assert_eq!(shifted("2020-02-28", 1).unwrap(), "2020-02-29");
        assert_eq!(shifted("2020-12-31", 1).unwrap(), "2021-01-01");
        assert_eq!(
            shifted("2021-08-22T03:26:50-07:00", -30).unwrap(),
            "2021-07-23T03:26:50-07:00"
        );
        assert_eq!(
            shifted("2021-08-22T03:26:50.123Z", 2).unwrap(),
            "2021-08-24T03:26:50.123Z"
        );
        assert_eq!(shifted("2021-08-22T03:26", 2).unwrap(), "2021-08-24T03:26");
        assert_eq!(shifted("1968-07", 100).unwrap(), "1968");
        assert_eq!(shifted("1968", -100).unwrap(), "1968");
        for bad in [
            "2001-02-29",
            "0000-00-00",
            "12/05/2011",
            "2021-08-22 03:26",
            "2021-08-22T25:00",
            "2021-13",
            "2021-08-22T03:26:50+0700",
            "20210822",
            "",
            "２０２１",
        ] {
            assert!(
                matches!(shifted(bad, 1), Err(TokenizeError::InvalidDate { .. })),
                "{bad}"
            );
        }
        assert_eq!(shifted("9999-12-31", 1), Err(TokenizeError::DateOutOfRange));
    }
}
