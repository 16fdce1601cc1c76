//! Property tests: FF1 round trips over random radixes, alphabets, lengths and separators (and
//! its `u128` path equal to its bignum path), AES-SIV round trips and tamper detection,
//! determinism of every keyed transform, date shifts that keep intervals exactly within ±N days,
//! and the ASCII fast path of text normalization equal to the Unicode path. Then the FF1 domain
//! rules as written in a policy.

use aes::cipher::KeyInit;
use aes::Aes256;
use proptest::prelude::*;
use time::{Date, Duration};
use tokenize::date_shift::DateShifter;
use tokenize::ff1::{smallest_min_len, Ff1, FormatPreserving, MAX_LEN_LIMIT};
use tokenize::siv::{aes_siv_open, aes_siv_seal};
use tokenize::{
    Context, DomainKey, FieldTransformer, Normalization, TokenizeError, Transform, Transformed,
};
use zeroize::Zeroizing;

/// Symbols alphabets are drawn from: ASCII letters and digits, Greek, Cyrillic, CJK, an emoji.
const POOL: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\
                    αβγδεζηθικλμνξοπρστυφχψωабвгдежзийклмнопрстуфхцчшщ太郎山田🙂";

/// Separators: none of them is in [`POOL`].
const SEPARATORS: &str = "- /.()";

fn domain(bytes: [u8; 32]) -> DomainKey {
    DomainKey::new("prop-domain", 7, Zeroizing::new(bytes))
}

fn value(t: Transformed) -> String {
    match t {
        Transformed::Value(v) => v,
        Transformed::Dropped => panic!("dropped"),
    }
}

/// An alphabet (distinct symbols of [`POOL`] in random order) and a value over it: symbols
/// within the domain rules' lengths, with separators between some of them.
fn alphabet_and_value() -> impl Strategy<Value = (String, String)> {
    let pool: Vec<char> = POOL.chars().collect();
    let size = pool.len();
    (Just(pool).prop_shuffle(), 2..=size)
        .prop_flat_map(|(shuffled, radix)| {
            let alphabet: Vec<char> = shuffled[..radix].to_vec();
            let min = smallest_min_len(radix as u32);
            let symbols = prop::collection::vec(
                (
                    0..radix,
                    prop::option::weighted(
                        0.2,
                        prop::sample::select(SEPARATORS.chars().collect::<Vec<_>>()),
                    ),
                ),
                min..=min + 24,
            );
            (Just(alphabet), symbols)
        })
        .prop_map(|(alphabet, symbols)| {
            let mut value = String::new();
            for (i, separator) in symbols {
                value.push(alphabet[i]);
                value.extend(separator);
            }
            (alphabet.into_iter().collect(), value)
        })
}

/// A radix up to 65 536 and a numeral string within its domain rules.
fn radix_and_numerals() -> impl Strategy<Value = (u32, Vec<u16>)> {
    prop_oneof![2u32..=64, 2u32..=65_536].prop_flat_map(|radix| {
        let min = smallest_min_len(radix);
        let numeral = (0..radix).prop_map(|x| x as u16);
        (Just(radix), prop::collection::vec(numeral, min..=min + 16))
    })
}

proptest! {
    #[test]
    fn ff1_round_trip_keeps_length_alphabet_and_separators(
        key in any::<[u8; 32]>(),
        (alphabet, plain) in alphabet_and_value(),
    ) {
        let domain = domain(key);
        let fp = FormatPreserving::new(&domain, "f", &alphabet, SEPARATORS, None, 64).unwrap();
        let mut enc = String::new();
        fp.encrypt_into(&plain, &mut enc).unwrap();
        prop_assert_eq!(enc.chars().count(), plain.chars().count());
        for (p, e) in plain.chars().zip(enc.chars()) {
            if SEPARATORS.contains(p) {
                prop_assert_eq!(e, p);
            } else {
                prop_assert!(alphabet.contains(e));
            }
        }
        let mut dec = String::new();
        fp.decrypt_into(&enc, &mut dec).unwrap();
        prop_assert_eq!(&dec, &plain);
        // Deterministic: again, and with a transform built anew from the same key.
        let mut again = String::new();
        fp.encrypt_into(&plain, &mut again).unwrap();
        prop_assert_eq!(&again, &enc);
        let rebuilt = FormatPreserving::new(&domain, "f", &alphabet, SEPARATORS, None, 64).unwrap();
        rebuilt.encrypt_into(&plain, &mut again).unwrap();
        prop_assert_eq!(&again, &enc);
    }

    #[test]
    fn ff1_fast_path_equals_bignum_path_and_round_trips(
        key in any::<[u8; 32]>(),
        tweak in prop::collection::vec(any::<u8>(), 0..=40),
        (radix, x) in radix_and_numerals(),
    ) {
        let n = x.len();
        let cipher = Aes256::new_from_slice(&key).unwrap();
        let ff1 = Ff1::new(cipher, radix, &tweak, n, n).unwrap();
        let mut fast = vec![0u16; n];
        let mut big = vec![0u16; n];
        ff1.encrypt(&x, &mut fast).unwrap();
        ff1.encrypt_bignum(&x, &mut big).unwrap();
        prop_assert_eq!(&fast, &big);
        prop_assert!(fast.iter().all(|&c| u32::from(c) < radix));
        let mut back = vec![0u16; n];
        ff1.decrypt(&fast, &mut back).unwrap();
        prop_assert_eq!(&back, &x);
        ff1.decrypt_bignum(&fast, &mut back).unwrap();
        prop_assert_eq!(&back, &x);
    }

    #[test]
    fn ff1_long_values_round_trip(
        key in any::<[u8; 32]>(),
        digits in prop::collection::vec(0u16..10, 57..=MAX_LEN_LIMIT),
    ) {
        // Beyond 56 decimal digits the halves no longer fit the u128 path.
        let n = digits.len();
        let ff1 = Ff1::new(Aes256::new_from_slice(&key).unwrap(), 10, b"t", 6, MAX_LEN_LIMIT).unwrap();
        let mut enc = vec![0u16; n];
        ff1.encrypt(&digits, &mut enc).unwrap();
        prop_assert_ne!(&enc, &digits);
        let mut dec = vec![0u16; n];
        ff1.decrypt(&enc, &mut dec).unwrap();
        prop_assert_eq!(&dec, &digits);
    }

    #[test]
    fn aes_siv_round_trips_and_detects_any_flipped_bit(
        key_len in prop::sample::select(vec![32usize, 48, 64]),
        key in prop::collection::vec(any::<u8>(), 64),
        headers in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..4),
        plaintext in prop::collection::vec(any::<u8>(), 0..300),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let key = &key[..key_len];
        let headers: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        let sealed = aes_siv_seal(key, &headers, &plaintext).unwrap();
        prop_assert_eq!(sealed.len(), 16 + plaintext.len());
        prop_assert_eq!(&aes_siv_seal(key, &headers, &plaintext).unwrap(), &sealed);
        prop_assert_eq!(&aes_siv_open(key, &headers, &sealed).unwrap(), &plaintext);
        let mut tampered = sealed.clone();
        tampered[flip.index(sealed.len())] ^= 1 << bit;
        prop_assert_eq!(aes_siv_open(key, &headers, &tampered), Err(TokenizeError::DecryptFailed));
    }

    #[test]
    fn deterministic_transform_round_trips_any_text(
        key in any::<[u8; 32]>(),
        text in "\\PC{1,300}",
    ) {
        let t = Transform::Deterministic { normalize: Normalization::Exact };
        let siv = FieldTransformer::new(&domain(key), "note", &t).unwrap();
        let token = value(siv.apply(&text, &Context::default()).unwrap());
        prop_assert!(token.starts_with("v7."));
        prop_assert_eq!(&siv.reverse(&token).unwrap(), &text);
        let rebuilt = FieldTransformer::new(&domain(key), "note", &t).unwrap();
        prop_assert_eq!(value(rebuilt.apply(&text, &Context::default()).unwrap()), token);
    }

    #[test]
    fn pseudonyms_are_deterministic(
        key in any::<[u8; 32]>(),
        text in "\\PC{1,80}",
    ) {
        let t = Transform::Pseudonym { normalize: Normalization::Exact };
        let a = FieldTransformer::new(&domain(key), "name", &t).unwrap();
        let b = FieldTransformer::new(&domain(key), "name", &t).unwrap();
        let pa = value(a.apply(&text, &Context::default()).unwrap());
        prop_assert_eq!(pa.len(), "v7.".len() + 22);
        prop_assert_eq!(&value(a.apply(&text, &Context::default()).unwrap()), &pa);
        prop_assert_eq!(&value(b.apply(&text, &Context::default()).unwrap()), &pa);
    }

    #[test]
    fn date_shift_keeps_intervals_and_stays_within_max_days(
        key in any::<[u8; 32]>(),
        max_days in 1u32..=tokenize::date_shift::MAX_SHIFT_DAYS,
        patient in "v1\\.[A-Za-z0-9_-]{22}",
        first in 0i32..2_500_000,
        second in 0i32..2_500_000,
        time in prop::option::of("T[01][0-9]:[0-5][0-9]:[0-5][0-9](Z|[+-]0[0-9]:[03]0)"),
    ) {
        // Julian days from 1000-01-01 on, so every shift stays within the years 0000–9999.
        let base = Date::from_calendar_date(1000, time::Month::January, 1).unwrap().to_julian_day();
        let a = Date::from_julian_day(base + first).unwrap();
        let b = Date::from_julian_day(base + second).unwrap();
        let domain = domain(key);
        let shift = FieldTransformer::new(&domain, "date", &Transform::DateShift { max_days }).unwrap();
        let ctx = Context { patient_pseudonym: Some(&patient) };
        let suffix = time.unwrap_or_default();
        let shifted = |d: Date| {
            let out = value(shift.apply(&format!("{}{suffix}", iso(d)), &ctx).unwrap());
            prop_assert!(out.ends_with(&suffix));
            Ok(parse_iso(&out[..10]))
        };
        let (sa, sb) = (shifted(a)?, shifted(b)?);
        prop_assert_eq!(sb - sa, b - a);
        let offset = sa - a;
        prop_assert!(offset.whole_days().unsigned_abs() <= u64::from(max_days));
        let shifter = DateShifter::new(&domain, max_days).unwrap();
        prop_assert_eq!(offset, Duration::days(shifter.offset_days(&patient)));
    }

    #[test]
    fn ascii_text_fast_path_equals_the_unicode_path(text in "[ -~\t\n\r\u{b}\u{c}]{0,40}") {
        // A zero-width space is removed by the Unicode path and forces it.
        let forced = format!("\u{200B}{text}");
        prop_assert_eq!(Normalization::Text.normalize(&text), Normalization::Text.normalize(&forced));
    }
}

fn iso(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

fn parse_iso(s: &str) -> Date {
    let month = time::Month::try_from(s[5..7].parse::<u8>().unwrap()).unwrap();
    Date::from_calendar_date(s[..4].parse().unwrap(), month, s[8..10].parse().unwrap()).unwrap()
}

/// The FF1 domain rules of SP 800-38G as a policy states them (`kind = "fpe"` in TOML).
#[test]
fn ff1_domain_rules_in_a_policy() {
    let key = domain([9; 32]);
    let prepare = |toml_text: &str| {
        let t: Transform = toml::from_str(toml_text).unwrap();
        FieldTransformer::new(&key, "f", &t)
    };
    // radix 10: 10^5 < 1 000 000 is refused, 10^6 is the smallest allowed domain.
    assert_eq!(
        prepare("kind = \"fpe\"\nalphabet = \"digits\"\nmin_len = 5\nmax_len = 9").err(),
        Some(TokenizeError::DomainTooSmall {
            radix: 10,
            min_len: 5
        })
    );
    let six = prepare("kind = \"fpe\"\nalphabet = \"digits\"\nmin_len = 6\nmax_len = 9").unwrap();
    let out = value(six.apply("123456", &Context::default()).unwrap());
    assert!(out.len() == 6 && out.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(
        six.apply("12345", &Context::default()),
        Err(TokenizeError::InputTooShort { len: 5, min_len: 6 })
    );
    // The default minimum is the smallest allowed one.
    let default = prepare("kind = \"fpe\"\nalphabet = \"digits\"\nmax_len = 9").unwrap();
    assert!(default.apply("123456", &Context::default()).is_ok());
    // Radix 36: 36^4 ≥ 1 000 000 > 36^3.
    assert!(matches!(
        prepare("kind = \"fpe\"\nalphabet = \"lower_alphanumeric\"\nmin_len = 3\nmax_len = 9"),
        Err(TokenizeError::DomainTooSmall {
            radix: 36,
            min_len: 3
        })
    ));
    // A symbol listed twice.
    assert_eq!(
        prepare("kind = \"fpe\"\nalphabet = { custom = \"0123456789abcdea\" }\nmax_len = 9").err(),
        Some(TokenizeError::DuplicateSymbol { position: 15 })
    );
    // A maximum above the crate's limit, and a value longer than the maximum.
    assert!(matches!(
        prepare("kind = \"fpe\"\nalphabet = \"digits\"\nmax_len = 257"),
        Err(TokenizeError::MaxLength { max_len: 257, .. })
    ));
    assert_eq!(
        six.apply("1234567890", &Context::default()),
        Err(TokenizeError::InputTooLong {
            len: 10,
            max_len: 9
        })
    );
}
