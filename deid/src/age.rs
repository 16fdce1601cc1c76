//! HIPAA Safe Harbor's age limit (45 CFR 164.514(b)(2)(i)(C)): ages over 89 and every element
//! of a date, the year included, that would show such an age are aggregated into one
//! "90 or older" category.
//!
//! With `[patient] age_cap = 89` the engine decides per patient record, on the *input* dates,
//! whether the patient is over the cap: their age at death if the record has a death date,
//! otherwise at the reference date (the policy's `reference_date`, else the run's date). The
//! birth date of such a patient is not shifted but removed (an empty CSV field, no FHIR
//! `Patient.birthDate`); their other dates are shifted as usual, and alone they show no age.
//! Partial dates are read conservatively: a birth year as 1 January, a death year as
//! 31 December, so a patient is never judged younger than they can be.

use std::time::{SystemTime, UNIX_EPOCH};

/// A calendar date (proleptic Gregorian), e.g. the date ages are computed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    year: i32,
    month: u8,
    day: u8,
}

impl Date {
    /// The date, if it exists (years 1 to 9999).
    pub fn new(year: i32, month: u8, day: u8) -> Option<Self> {
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        ((1..=9999).contains(&year) && (1..=days).contains(&day)).then_some(Self {
            year,
            month,
            day,
        })
    }

    /// `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        Self::new(
            digits(text.get(0..4)?)?,
            u8::try_from(digits(text.get(5..7)?)?).ok()?,
            u8::try_from(digits(text.get(8..10)?)?).ok()?,
        )
    }

    /// Today in UTC, by the system clock.
    pub fn today() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::from_days(i64::try_from(secs / 86_400).unwrap_or(0))
    }

    /// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
    fn from_days(days: i64) -> Self {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        // Day 1..=31 and month 1..=12 by construction; the year fits for any clock reading.
        Self {
            year: i32::try_from(year).unwrap_or(i32::MAX),
            month: month as u8,
            day: day as u8,
        }
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

fn digits(s: &str) -> Option<i32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The (year, month, day) a date value starts with: `YYYY-MM-DD…` (date-times too), or a
/// partial `YYYY-MM` / `YYYY` completed with `fill` (month, day). Not checked as a calendar
/// date: only compared.
fn leading_date(value: &str, fill: (u8, u8)) -> Option<(i32, u8, u8)> {
    let year = digits(value.get(0..4)?)?;
    let b = value.as_bytes();
    if b.len() == 4 {
        return Some((year, fill.0, fill.1));
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let month = u8::try_from(digits(value.get(5..7)?)?).ok()?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if b.len() == 7 {
        return Some((year, month, fill.1));
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let day = u8::try_from(digits(value.get(8..10)?)?).ok()?;
    Some((year, month, day))
}

/// A run's age limit: the cap and the date ages are computed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AgeCap {
    pub(crate) cap: u32,
    pub(crate) at: Date,
}

impl AgeCap {
    /// Whether someone born on `birth` (who died on `death`, if given) is older than the cap.
    /// An unreadable birth date is not judged here: the date shift rejects it.
    pub(crate) fn exceeded(&self, birth: &str, death: Option<&str>) -> bool {
        // Earliest possible birth, latest possible death.
        let Some(born) = leading_date(birth.trim(), (1, 1)) else {
            return false;
        };
        let end = death
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .and_then(|d| leading_date(d, (12, 31)))
            .unwrap_or((self.at.year, self.at.month, self.at.day));
        let mut years = i64::from(end.0) - i64::from(born.0);
        if (end.1, end.2) < (born.1, born.2) {
            years -= 1;
        }
        years > i64::from(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(at: &str) -> AgeCap {
        AgeCap {
            cap: 89,
            at: Date::parse(at).unwrap(),
        }
    }

    #[test]
    fn ninety_is_over_the_cap_from_the_ninetieth_birthday() {
        let c = cap("2020-06-15");
        assert!(!c.exceeded("1930-06-16", None));
        assert!(c.exceeded("1930-06-15", None));
        assert!(c.exceeded("1920-01-01T08:00:00Z", None));
        assert!(!c.exceeded("1980-01-01", None));
    }

    #[test]
    fn the_age_at_death_counts_and_partial_dates_are_read_conservatively() {
        let c = cap("2020-06-15");
        assert!(!c.exceeded("1920-03-01", Some("2000-01-01")));
        assert!(c.exceeded("1920-03-01", Some("2010-03-01T10:00:00Z")));
        assert!(c.exceeded("1930", None));
        assert!(c.exceeded("1930-06", None));
        assert!(c.exceeded("1920-07-01", Some("2010")));
        // An unreadable death date counts as none; an unreadable birth date is the shift's.
        assert!(c.exceeded("1920-07-01", Some("soon")));
        assert!(!c.exceeded("12/05/1920", None));
    }

    #[test]
    fn dates() {
        assert_eq!(Date::from_days(0), Date::new(1970, 1, 1).unwrap());
        assert_eq!(Date::from_days(19_417), Date::new(2023, 3, 1).unwrap());
        assert_eq!(Date::from_days(11_016), Date::new(2000, 2, 29).unwrap());
        assert_eq!(Date::parse("2024-02-29").unwrap().to_string(), "2024-02-29");
        for bad in [
            "2023-02-29",
            "2023-13-01",
            "2023-1-01",
            "20230101",
            "0000-01-01",
        ] {
            assert!(Date::parse(bad).is_none(), "{bad}");
        }
        assert!(Date::today() > Date::new(2024, 1, 1).unwrap());
    }
}
