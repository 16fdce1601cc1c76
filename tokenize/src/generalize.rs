//! Generalization per HIPAA Safe Harbor (45 CFR 164.514(b)(2)): ZIP codes to their first three
//! digits, or `000` where the three-digit area has 20 000 people or fewer; dates to the year;
//! ages over 89 to a single `90 or older` category.

use time::Date;

use crate::date_shift::{parse, push_year, Parsed};
use crate::{Result, TokenizeError};

/// Three-digit ZIP areas with 20 000 or fewer inhabitants (2000 Census, as listed by HHS).
pub const RESTRICTED_ZIP3: [&str; 17] = [
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878",
    "879", "884", "890", "893",
];

/// The category of every age over 89.
pub const AGE_90_OR_OLDER: &str = "90 or older";

/// A 5-digit ZIP, ZIP+4 (`12345-6789`) or 9-digit ZIP to its first three digits, `000` for the
/// restricted areas. Surrounding white space is ignored; anything else is [`TokenizeError::InvalidZip`].
pub fn zip3(value: &str) -> Result<&str> {
    let v = value.trim();
    let b = v.as_bytes();
    let well_formed = match b.len() {
        5 | 9 => b.iter().all(u8::is_ascii_digit),
        10 => b[5] == b'-' && b[..5].iter().chain(&b[6..]).all(u8::is_ascii_digit),
        _ => false,
    };
    if !well_formed {
        return Err(TokenizeError::InvalidZip);
    }
    let prefix = &v[..3];
    if RESTRICTED_ZIP3.contains(&prefix) {
        return Ok("000");
    }
    Ok(prefix)
}

/// A date, date-time or partial date (forms as in [`crate::date_shift`]) to its year, `YYYY`.
pub fn year_into(value: &str, out: &mut String) -> Result<()> {
    out.clear();
    let year = match parse(value)? {
        Parsed::Partial { year } => year,
        Parsed::Full { date, .. } => date.year(),
    };
    push_year(out, year);
    Ok(())
}

/// An age in whole years: kept up to 89, `90 or older` above.
pub fn age_into(value: &str, out: &mut String) -> Result<()> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenizeError::InvalidAge);
    }
    let age: u32 = v.parse().unwrap_or(u32::MAX);
    out.clear();
    push_age(out, age);
    Ok(())
}

fn push_age(out: &mut String, age: u32) {
    use std::fmt::Write;
    if age > 89 {
        out.push_str(AGE_90_OR_OLDER);
    } else {
        let _ = write!(out, "{age}");
    }
}

/// Completed years between `birth` and `reference` (0 before the first birthday; a 29 February
/// birthday is reached on 1 March in common years). `reference` before `birth` is an error.
pub fn age_in_years(birth: Date, reference: Date) -> Result<u32> {
    if reference < birth {
        return Err(TokenizeError::InvalidAge);
    }
    let mut years = reference.year() - birth.year();
    if (u8::from(reference.month()), reference.day()) < (u8::from(birth.month()), birth.day()) {
        years -= 1;
    }
    u32::try_from(years).map_err(|_| TokenizeError::InvalidAge)
}

/// The generalized age of someone born on `birth` (`YYYY-MM-DD`, or a date-time) at
/// `reference`: the age up to 89, `90 or older` above. For when only a birth date is known.
pub fn age_from_birth_date_into(birth: &str, reference: Date, out: &mut String) -> Result<()> {
    let Parsed::Full { date, .. } = parse(birth)? else {
        return Err(TokenizeError::InvalidDate {
            reason: "a birth date needs month and day to give an age",
        });
    };
    let age = age_in_years(date, reference)?;
    out.clear();
    push_age(out, age);
    Ok(())
}
