//! Normalization of values before they are pseudonymized, so that one person's identifier
//! written in different ways gives one pseudonym.
//!
//! - [`Normalization::Text`] (names, e-mail addresses, free identifiers): apostrophe variants
//!   (`’ ‘ ʼ ` ´ ′`) become `'`, dash variants (U+2010–U+2015, U+2212, U+FE58, U+FE63, U+FF0D)
//!   become `-`, invisible format characters (soft hyphen, zero-width space, word joiner, BOM,
//!   bidirectional marks and embeddings) are removed; then Unicode canonical decomposition, full
//!   Unicode *case folding* (`caseless::default_case_fold`, Unicode's operation for caseless
//!   matching: unlike `str::to_lowercase` it maps `ß`/`ẞ` to `ss` and final `ς` to `σ`, so
//!   `STRASSE` and `Straße` match) and recomposition to NFC; finally every run of white space
//!   (Unicode `White_Space`, which includes NBSP and TAB) becomes one space and the ends are
//!   trimmed. Compatibility forms (full-width letters) are *not* folded: NFC, not NFKC.
//! - [`Normalization::Ssn`], [`Normalization::Phone`], [`Normalization::Digits`]: decimal digits
//!   only (ASCII, full-width and Arabic-Indic digits, as ASCII); separators, spaces, `+`,
//!   parentheses and letters (`ext.`) are dropped.
//! - [`Normalization::Mrn`]: letters and digits only, case-folded, leading zeros removed (one MRN
//!   is often zero-padded to different widths by different systems: `000123456` = `0000123456`).
//! - [`Normalization::Exact`]: the value as given.
//!
//! A value of which nothing is left (`"  "`, a phone number without digits) is an error, never
//! an empty string: all such values would share one pseudonym. ASCII and Latin-1 input take
//! fast paths with no Unicode tables and no allocation besides the output buffer; tests check
//! them against the general path on every Latin-1 character and on random strings.

use caseless::Caseless;
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

use crate::{Result, TokenizeError};

/// How a value is normalized before it is pseudonymized (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// The value as given, byte for byte.
    Exact,
    /// Names and other text: NFC, case folding, apostrophes, dashes, white space.
    #[default]
    Text,
    /// Social Security numbers: digits only.
    Ssn,
    /// Phone numbers: digits only.
    Phone,
    /// Any digit string (ZIP codes, member numbers): digits only.
    Digits,
    /// Medical record numbers: letters and digits, case-folded, leading zeros removed.
    Mrn,
}

impl Normalization {
    /// Writes the normalized form of `value` into `out` (cleared first).
    pub fn normalize_into(self, value: &str, out: &mut String) -> Result<()> {
        out.clear();
        match self {
            Normalization::Exact => out.push_str(value),
            Normalization::Text => text(value, out),
            Normalization::Ssn | Normalization::Phone | Normalization::Digits => {
                if value.is_ascii() {
                    let digits = value.bytes().filter(u8::is_ascii_digit);
                    out.extend(digits.map(char::from));
                } else {
                    out.extend(value.chars().filter_map(decimal_digit));
                }
            }
            Normalization::Mrn => mrn(value, out),
        }
        if out.is_empty() {
            return Err(TokenizeError::EmptyAfterNormalization);
        }
        Ok(())
    }

    /// The normalized form of `value`.
    pub fn normalize(self, value: &str) -> Result<String> {
        let mut out = String::with_capacity(value.len());
        self.normalize_into(value, &mut out)?;
        Ok(out)
    }
}

fn text(value: &str, out: &mut String) {
    if value.is_ascii() {
        // NFC and case folding are the identity on ASCII except for A–Z.
        if is_tidy_ascii(value.as_bytes()) {
            out.push_str(value);
            out.make_ascii_lowercase();
            return;
        }
        let mut pending_space = false;
        for b in value.bytes() {
            if b.is_ascii_whitespace() || b == 0x0b {
                pending_space = !out.is_empty();
                continue;
            }
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            let c = match b {
                b'`' => '\'',
                _ => char::from(b.to_ascii_lowercase()),
            };
            out.push(c);
        }
        return;
    }
    if value.chars().all(|c| c <= '\u{FF}') {
        latin1(value, out);
        return;
    }
    unicode(value, out);
}

/// The text normalization of a value with characters beyond Latin-1 (the general path).
fn unicode(value: &str, out: &mut String) {
    let folded = value
        .chars()
        .filter(|&c| !is_invisible(c))
        .map(punctuation)
        .nfd()
        .default_case_fold()
        .nfc();
    let mut pending_space = false;
    for c in folded {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(c);
    }
}

/// The text normalization of ASCII and Latin-1 text, character by character. Equal to
/// [`unicode`] on such text (tested on every Latin-1 character and on random strings): Latin-1
/// has no combining marks, so the text is NFC and its letters decompose and recompose to
/// themselves; its case folding is one character to one (A–Z, À–Þ but ×, µ → μ), except
/// ß → ss; U+00AD is the one invisible character, `` ` `` and `´` the apostrophes, NBSP and NEL
/// the white space beyond ASCII.
fn latin1(value: &str, out: &mut String) {
    let mut pending_space = false;
    for c in value.chars() {
        if c == '\u{AD}' {
            continue;
        }
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        match c {
            'A'..='Z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{DE}' => {
                // The lowercase letter is 0x20 above its capital in both ranges.
                out.push(char::from_u32(u32::from(c) + 0x20).unwrap_or(c));
            }
            '\u{DF}' => out.push_str("ss"),
            '\u{B5}' => out.push('\u{3BC}'),
            '`' | '\u{B4}' => out.push('\''),
            c => out.push(c),
        }
    }
}

/// ASCII text that the ASCII path only lowercases: no backtick, no white space other than single
/// spaces between other characters.
fn is_tidy_ascii(bytes: &[u8]) -> bool {
    let mut previous_space = true; // a leading space is not tidy
    for &b in bytes {
        let space = b == b' ';
        if (space && previous_space)
            || b == b'`'
            || (b.is_ascii_whitespace() && !space)
            || b == 0x0b
        {
            return false;
        }
        previous_space = space;
    }
    !previous_space || bytes.is_empty()
}

fn mrn(value: &str, out: &mut String) {
    for c in value.chars() {
        if let Some(d) = decimal_digit(c) {
            if d == '0' && out.is_empty() {
                continue;
            }
            out.push(d);
        } else if c.is_alphanumeric() {
            out.extend(std::iter::once(c).default_case_fold());
        }
    }
    if out.is_empty() && value.chars().any(|c| decimal_digit(c) == Some('0')) {
        out.push('0');
    }
}

/// Apostrophe and dash variants to their ASCII form.
fn punctuation(c: char) -> char {
    match c {
        '\u{2019}' | '\u{2018}' | '\u{02BC}' | '`' | '\u{00B4}' | '\u{2032}' => '\'',
        '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}' | '\u{FF0D}' => '-',
        c => c,
    }
}

/// Invisible format characters that differ between copies of one value.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// A decimal digit (ASCII, full-width, Arabic-Indic, extended Arabic-Indic) as ASCII.
fn decimal_digit(c: char) -> Option<char> {
    let zero = match c {
        '0'..='9' => '0',
        '\u{FF10}'..='\u{FF19}' => '\u{FF10}',
        '\u{0660}'..='\u{0669}' => '\u{0660}',
        '\u{06F0}'..='\u{06F9}' => '\u{06F0}',
        _ => return None,
    };
    let value = u32::from(c) - u32::from(zero);
    char::from_digit(value, 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(s: &str) -> String {
        Normalization::Text.normalize(s).unwrap()
    }

    #[test]
    fn text_unifies_nfd_case_apostrophes_dashes_and_space() {
        assert_eq!(text_of("Jose\u{301} Emilio"), text_of("José  EMILIO "));
        assert_eq!(text_of("O’Hara"), "o'hara");
        assert_eq!(text_of("O`HARA"), "o'hara");
        assert_eq!(text_of("Smith\u{2013}Jones"), "smith-jones");
        assert_eq!(text_of("\t Ava\u{a0}Mary \r\n"), "ava mary");
        assert_eq!(text_of("Sm\u{200B}ith"), "smith");
        assert_eq!(text_of("STRASSE"), text_of("Straße"));
        assert_eq!(text_of("ΣΊΣΥΦΟΣ"), text_of("σίσυφος"));
    }

    #[test]
    fn ascii_fast_path_agrees_with_the_unicode_path() {
        // The same ASCII text with one invisible character forces the Unicode path.
        for s in ["  Mr. Gilbert O'Conner\tJr ", "a`b", "X-Y_Z 09", "\x0bq"] {
            let forced = format!("{s}\u{200B}");
            assert_eq!(text_of(s), text_of(&forced), "{s:?}");
        }
    }

    #[test]
    fn latin1_path_equals_the_unicode_path_on_every_latin1_character() {
        let general = |s: &str| {
            let mut out = String::new();
            unicode(s, &mut out);
            out
        };
        for c in (0u32..=0xFF).filter_map(char::from_u32) {
            for s in [format!("{c}"), format!("x{c}y"), format!("A{c}{c} É")] {
                let mut fast = String::new();
                latin1(&s, &mut fast);
                assert_eq!(fast, general(&s), "U+{:04X}", u32::from(c));
            }
        }
        for s in [
            "José Emilio366",
            "HERNÁN",
            "Straße",
            "Ñuñez\u{a0}\u{a0}Peña",
            "µ´`\u{ad}",
        ] {
            assert_eq!(text_of(s), general(s), "{s}");
        }
    }

    proptest::proptest! {
        #[test]
        fn latin1_path_equals_the_unicode_path(s in "[\\x00-\\u{ff}]{0,24}") {
            let mut fast = String::new();
            latin1(&s, &mut fast);
            let mut general = String::new();
            unicode(&s, &mut general);
            proptest::prop_assert_eq!(fast, general);
        }
    }

    #[test]
    fn digits_and_mrn() {
        let ssn = |s| Normalization::Ssn.normalize(s).unwrap();
        assert_eq!(ssn(" 999-41-2363 "), "999412363");
        assert_eq!(ssn("999 41 2363"), "999412363");
        assert_eq!(
            Normalization::Phone.normalize("０３-５５５５").unwrap(),
            "035555"
        );
        assert_eq!(Normalization::Phone.normalize("٠٥٥").unwrap(), "055");
        let mrn = |s| Normalization::Mrn.normalize(s).unwrap();
        assert_eq!(mrn("000123456"), mrn("0000123456"));
        assert_eq!(mrn("MRN-00042"), "mrn00042");
        assert_eq!(mrn("0000"), "0");
        assert_eq!(mrn("3112219680806371x"), mrn("3112219680806371X"));
    }

    #[test]
    fn nothing_left_is_an_error() {
        assert_eq!(
            Normalization::Phone.normalize("ext."),
            Err(TokenizeError::EmptyAfterNormalization)
        );
        assert_eq!(
            Normalization::Text.normalize(" \u{200B} "),
            Err(TokenizeError::EmptyAfterNormalization)
        );
        assert_eq!(
            Normalization::Exact.normalize(""),
            Err(TokenizeError::EmptyAfterNormalization)
        );
    }
}
