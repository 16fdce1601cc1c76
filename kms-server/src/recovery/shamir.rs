//! Shamir secret sharing over GF(256): a small wrapper around [`vsss_rs::Gf256`].
//!
//! A secret of `L` bytes is split byte by byte: for each byte a fresh random polynomial of degree
//! `M - 1` whose constant term is that byte, evaluated at the share indexes `1..=N`. Any `M`
//! shares reconstruct the secret; fewer reveal nothing about it (they reconstruct an unrelated,
//! uniformly random value, which is why callers must check a key-check value).
//!
//! The field arithmetic is vsss-rs's constant-time GF(2^8) (AES polynomial, no lookup tables).
//! vsss-rs encodes a share as one buffer `[index, y_1, .., y_L]`; this module keeps the index
//! apart in [`Share`] and never exposes that layout.
//!
//! Arguments are validated here, before vsss-rs sees them, so its errors are only reported as
//! [`ShamirError::Library`] if it misbehaves. Every buffer of secret or share bytes this module
//! allocates is wiped on drop. vsss-rs's own short-lived internals (the coefficients of the last
//! polynomial, arithmetic temporaries) are not wiped by the library.

use std::fmt;

use rand_core_010::{CryptoRng, UnwrapErr};
use vsss_rs::Gf256;
use zeroize::Zeroizing;

/// The largest number of shares: GF(256) has 255 non-zero points to evaluate at.
pub const MAX_SHARES: usize = 255;

/// One share: its index (1..=255, the x coordinate) and its bytes (same length as the secret).
#[derive(Clone)]
pub struct Share {
    /// The x coordinate, `1..=255`; distinct within one split.
    pub index: u8,
    /// The polynomials' values at `index`, one byte per secret byte. Wiped on drop.
    pub value: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("index", &self.index)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .finish()
    }
}

/// Why a split or a combination was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShamirError {
    /// The threshold `M` is below 2 (with `M = 1` every share would be the secret itself).
    #[error("the threshold must be at least 2")]
    ThresholdTooLow,
    /// The threshold `M` is above the number of shares `N`: the secret could never be recovered.
    #[error("the threshold exceeds the number of shares")]
    ThresholdAboveShares,
    /// More than [`MAX_SHARES`] shares were requested.
    #[error("at most {MAX_SHARES} shares can be made")]
    TooManyShares,
    /// The secret to split, or the shares to combine, are empty.
    #[error("the secret is empty")]
    EmptySecret,
    /// Fewer than 2 shares were given to combine.
    #[error("at least 2 shares are needed")]
    TooFewShares,
    /// Two shares have the same index.
    #[error("two shares have the same index")]
    DuplicateIndex,
    /// A share has index 0, which would be the secret itself.
    #[error("a share has index 0")]
    ZeroIndex,
    /// The shares do not all have the same length.
    #[error("the shares have different lengths")]
    LengthMismatch,
    /// vsss-rs failed or returned malformed shares despite valid arguments.
    #[error("the secret sharing library failed")]
    Library,
}

/// Splits with the operating system's CSPRNG.
///
/// `secret` is split into `shares` shares (`N`), any `threshold` (`M`) of which reconstruct it.
/// The shares are returned in index order `1..=N`.
///
/// # Errors
///
/// [`ShamirError::ThresholdTooLow`] if `M < 2`, [`ShamirError::TooManyShares`] if
/// `N > 255`, [`ShamirError::ThresholdAboveShares`] if `M > N`, [`ShamirError::EmptySecret`] if
/// the secret is empty (checked in that order).
///
/// # Panics
///
/// If the operating system's random number generator fails, which `getrandom` only reports
/// when the platform has no usable source at all.
pub fn split(secret: &[u8], threshold: usize, shares: usize) -> Result<Vec<Share>, ShamirError> {
    split_with_rng(secret, threshold, shares, &mut UnwrapErr(getrandom::SysRng))
}

/// Same, with an injected CSPRNG (rand_core 0.10 CryptoRng), for tests.
///
/// Behaves exactly as [`split`] but draws the polynomials' coefficients from `rng`, so a seeded
/// generator gives reproducible shares. Production code uses [`split`].
///
/// # Errors
///
/// As [`split`].
pub fn split_with_rng<R: CryptoRng>(
    secret: &[u8],
    threshold: usize,
    shares: usize,
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    if threshold < 2 {
        return Err(ShamirError::ThresholdTooLow);
    }
    if shares > MAX_SHARES {
        return Err(ShamirError::TooManyShares);
    }
    if threshold > shares {
        return Err(ShamirError::ThresholdAboveShares);
    }
    if secret.is_empty() {
        return Err(ShamirError::EmptySecret);
    }

    // vsss-rs returns each share as `[index, y_1, .., y_L]`.
    let raw = Zeroizing::new(
        Gf256::split_bytes(threshold, shares, secret, rng).map_err(|_| ShamirError::Library)?,
    );
    let mut out = raw
        .iter()
        .map(|encoded| match encoded.split_first() {
            Some((&index, value)) if value.len() == secret.len() => Ok(Share {
                index,
                value: Zeroizing::new(value.to_vec()),
            }),
            _ => Err(ShamirError::Library),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if out.len() != shares {
        return Err(ShamirError::Library);
    }
    check_indexes(out.iter().map(|share| share.index)).map_err(|_| ShamirError::Library)?;
    out.sort_unstable_by_key(|share| share.index);
    Ok(out)
}

/// Reconstructs from at least `threshold` distinct shares. With fewer than the threshold it
/// returns an unrelated value — callers check a key-check value.
///
/// The order of the shares does not matter. Giving more than the threshold is fine.
///
/// # Errors
///
/// [`ShamirError::TooFewShares`] with fewer than 2 shares, [`ShamirError::ZeroIndex`] or
/// [`ShamirError::DuplicateIndex`] for a bad index, [`ShamirError::LengthMismatch`] if the
/// shares' lengths differ, [`ShamirError::EmptySecret`] if they are all empty.
pub fn combine(shares: &[Share]) -> Result<Zeroizing<Vec<u8>>, ShamirError> {
    if shares.len() < 2 {
        return Err(ShamirError::TooFewShares);
    }
    check_indexes(shares.iter().map(|share| share.index))?;
    let len = shares[0].value.len();
    if shares.iter().any(|share| share.value.len() != len) {
        return Err(ShamirError::LengthMismatch);
    }
    if len == 0 {
        return Err(ShamirError::EmptySecret);
    }

    let raw: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(
        shares
            .iter()
            .map(|share| {
                let mut encoded = Vec::with_capacity(len + 1);
                encoded.push(share.index);
                encoded.extend_from_slice(&share.value);
                encoded
            })
            .collect(),
    );
    let secret = Gf256::combine_bytes(raw.as_slice())
        .map(Zeroizing::new)
        .map_err(|_| ShamirError::Library)?;
    if secret.len() != len {
        return Err(ShamirError::Library);
    }
    Ok(secret)
}

/// Every index is non-zero and none repeats.
fn check_indexes(indexes: impl IntoIterator<Item = u8>) -> Result<(), ShamirError> {
    let mut seen = [false; 256];
    for index in indexes {
        if index == 0 {
            return Err(ShamirError::ZeroIndex);
        }
        if std::mem::replace(&mut seen[usize::from(index)], true) {
            return Err(ShamirError::DuplicateIndex);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use proptest::prelude::*;
    use rand_core_010::{TryCryptoRng, TryRng};

    use super::*;

    /// SplitMix64 (Steele, Lea and Flood, 2014): deterministic and tiny. Not cryptographic; it
    /// claims `TryCryptoRng` only so that tests can inject it.
    struct TestRng(u64);

    impl TestRng {
        fn step(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Roughly uniform in `0..bound` (the modulo bias is irrelevant for tests).
        fn below(&mut self, bound: usize) -> usize {
            (self.step() % bound as u64) as usize
        }
    }

    impl TryRng for TestRng {
        type Error = Infallible;

        fn try_next_u32(&mut self) -> Result<u32, Infallible> {
            Ok((self.step() >> 32) as u32)
        }

        fn try_next_u64(&mut self) -> Result<u64, Infallible> {
            Ok(self.step())
        }

        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
            for chunk in dst.chunks_mut(8) {
                chunk.copy_from_slice(&self.step().to_le_bytes()[..chunk.len()]);
            }
            Ok(())
        }
    }

    impl TryCryptoRng for TestRng {}

    /// Subsets (as positions) checked per size: all of them up to this many, else this many random.
    const SUBSETS_CHECKED: u64 = 200;

    fn binomial(n: usize, k: usize) -> u64 {
        (0..k as u64).fold(1, |acc, i| acc * (n as u64 - i) / (i + 1))
    }

    /// All `k`-subsets of `0..n` if there are at most [`SUBSETS_CHECKED`], otherwise that many
    /// random ones (each in random order).
    fn subsets(n: usize, k: usize, rng: &mut TestRng) -> Vec<Vec<usize>> {
        if binomial(n, k) > SUBSETS_CHECKED {
            return (0..SUBSETS_CHECKED)
                .map(|_| {
                    let mut positions: Vec<usize> = (0..n).collect();
                    for i in 0..k {
                        let j = i + rng.below(n - i);
                        positions.swap(i, j);
                    }
                    positions.truncate(k);
                    positions
                })
                .collect();
        }
        let mut all = Vec::new();
        let mut current: Vec<usize> = (0..k).collect();
        loop {
            all.push(current.clone());
            // Advance to the next combination in lexicographic order.
            let Some(i) = (0..k).rev().find(|&i| current[i] < n - k + i) else {
                return all;
            };
            current[i] += 1;
            for j in i + 1..k {
                current[j] = current[j - 1] + 1;
            }
        }
    }

    fn pick(shares: &[Share], positions: &[usize]) -> Vec<Share> {
        positions.iter().map(|&p| shares[p].clone()).collect()
    }

    fn plain(shares: &[Share]) -> Vec<(u8, Vec<u8>)> {
        shares.iter().map(|s| (s.index, s.value.to_vec())).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn threshold_subsets_reconstruct_and_smaller_ones_do_not(
            (threshold, count) in (2usize..10).prop_flat_map(|m| (Just(m), m..20)),
            secret in any::<[u8; 32]>(),
            seed in any::<u64>(),
        ) {
            let mut rng = TestRng(seed);
            let shares = split_with_rng(&secret, threshold, count, &mut rng).unwrap();
            prop_assert_eq!(shares.len(), count);
            for (position, share) in shares.iter().enumerate() {
                prop_assert_eq!(usize::from(share.index), position + 1);
                prop_assert_eq!(share.value.len(), secret.len());
            }

            for positions in subsets(count, threshold, &mut rng) {
                let recovered = combine(&pick(&shares, &positions)).unwrap();
                prop_assert_eq!(recovered.as_slice(), &secret[..], "subset {:?}", positions);
            }
            for positions in subsets(count, threshold - 1, &mut rng) {
                match combine(&pick(&shares, &positions)) {
                    Ok(value) => prop_assert_ne!(value.as_slice(), &secret[..]),
                    Err(error) => {
                        prop_assert_eq!(positions.len(), 1);
                        prop_assert_eq!(error, ShamirError::TooFewShares);
                    }
                }
            }
        }
    }

    #[derive(serde::Deserialize)]
    struct FieldKats {
        kats: FieldOps,
    }

    #[derive(serde::Deserialize)]
    struct FieldOps {
        add: Vec<FieldKat>,
        mult: Vec<FieldKat>,
        div: Vec<FieldKat>,
    }

    #[derive(serde::Deserialize)]
    struct FieldKat {
        a: u8,
        b: u8,
        out: u8,
    }

    /// The field under the split: HashiCorp Vault's GF(2^8) known answers
    /// (`../shared/data/vectors/shamir/vault_shamir_gf256_kats.json`, from Vault's
    /// `shamir/shamir_test.go`), which never reach the reduction step, so also the worked
    /// multiplications of FIPS 197 section 4.2 (`{57} * {83} = {c1}`, `{57} * {13} = {fe}`),
    /// which pin the AES polynomial, and every inverse.
    #[test]
    fn field_arithmetic_matches_known_answers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/vectors/shamir/vault_shamir_gf256_kats.json"
        );
        let text = std::fs::read_to_string(path).expect("vector file");
        let file: FieldKats = serde_json::from_str(&text).expect("json");
        let ops = &file.kats;
        assert!(!ops.add.is_empty() && !ops.mult.is_empty() && !ops.div.is_empty());
        for k in &ops.add {
            assert_eq!((Gf256(k.a) + Gf256(k.b)).0, k.out, "{} + {}", k.a, k.b);
        }
        for k in &ops.mult {
            assert_eq!((Gf256(k.a) * Gf256(k.b)).0, k.out, "{} * {}", k.a, k.b);
        }
        for k in &ops.div {
            assert_eq!((Gf256(k.a) / Gf256(k.b)).0, k.out, "{} / {}", k.a, k.b);
        }
        assert_eq!((Gf256(0x57) * Gf256(0x83)).0, 0xc1);
        assert_eq!((Gf256(0x57) * Gf256(0x13)).0, 0xfe);
        for a in 1..=255u8 {
            assert_eq!((Gf256(a) * (Gf256(1) / Gf256(a))).0, 1, "inverse of {a}");
        }
    }

    /// The 0.999 quantile of the chi-square distribution with 255 degrees of freedom, 330.52:
    /// R's `qchisq(0.999, 255)` / SciPy's `scipy.stats.chi2.ppf(0.999, 255)` (here computed by
    /// inverting the regularized incomplete gamma function; Wilson–Hilferty gives 330.55).
    /// A correct implementation fails this check with probability 0.001 per histogram.
    const CHI_SQUARE_255_Q999: f64 = 330.52;

    fn chi_square(counts: &[u32; 256], samples: usize) -> f64 {
        let expected = samples as f64 / 256.0;
        counts
            .iter()
            .map(|&observed| (f64::from(observed) - expected).powi(2) / expected)
            .sum()
    }

    #[test]
    fn share_bytes_are_uniform() {
        const SPLITS: usize = 25_600; // 100 expected per value
        let secret = [0x42u8; 32];
        // counts[k][v]: how often byte 0 of share k + 1 was v.
        let mut counts = [[0u32; 256]; 2];
        for _ in 0..SPLITS {
            let shares = split(&secret, 3, 5).unwrap();
            for (histogram, share) in counts.iter_mut().zip(&shares) {
                histogram[usize::from(share.value[0])] += 1;
            }
        }
        for (k, histogram) in counts.iter().enumerate() {
            let statistic = chi_square(histogram, SPLITS);
            assert!(
                statistic < CHI_SQUARE_255_Q999,
                "byte 0 of share {}: chi-square {statistic:.1} >= {CHI_SQUARE_255_Q999}",
                k + 1
            );
        }
    }

    #[test]
    fn split_rejects_invalid_parameters() {
        let secret = [0x42u8; 32];
        assert_eq!(
            split(&secret, 1, 3).err(),
            Some(ShamirError::ThresholdTooLow)
        );
        assert_eq!(
            split(&secret, 0, 3).err(),
            Some(ShamirError::ThresholdTooLow)
        );
        assert_eq!(
            split(&secret, 4, 3).err(),
            Some(ShamirError::ThresholdAboveShares)
        );
        assert_eq!(
            split(&secret, 2, 256).err(),
            Some(ShamirError::TooManyShares)
        );
        assert_eq!(
            split(&secret, 256, 256).err(),
            Some(ShamirError::TooManyShares)
        );
        assert_eq!(split(&[], 2, 3).err(), Some(ShamirError::EmptySecret));
    }

    #[test]
    fn extreme_parameters_round_trip() {
        let secret = [0x42u8; 32];
        let two = split(&secret, 2, 2).unwrap();
        assert_eq!(combine(&two).unwrap().as_slice(), &secret[..]);

        let all = split(&secret, MAX_SHARES, MAX_SHARES).unwrap();
        let indexes: Vec<u8> = all.iter().map(|share| share.index).collect();
        assert_eq!(indexes, (1..=255).collect::<Vec<u8>>());
        assert_eq!(combine(&all).unwrap().as_slice(), &secret[..]);
        assert_ne!(combine(&all[1..]).unwrap().as_slice(), &secret[..]);

        let one_byte = split(&[0x99], 2, 3).unwrap();
        assert_eq!(combine(&one_byte[1..]).unwrap().as_slice(), &[0x99]);
    }

    #[test]
    fn combine_rejects_invalid_shares() {
        let shares = split(&[0x42u8; 32], 3, 5).unwrap();

        assert_eq!(combine(&[]).err(), Some(ShamirError::TooFewShares));
        assert_eq!(combine(&shares[..1]).err(), Some(ShamirError::TooFewShares));

        let duplicate = [shares[0].clone(), shares[1].clone(), shares[0].clone()];
        assert_eq!(combine(&duplicate).err(), Some(ShamirError::DuplicateIndex));

        let mut zero = shares[..3].to_vec();
        zero[1].index = 0;
        assert_eq!(combine(&zero).err(), Some(ShamirError::ZeroIndex));

        let mut short = shares[..3].to_vec();
        short[2].value.pop();
        assert_eq!(combine(&short).err(), Some(ShamirError::LengthMismatch));

        let empty = [1, 2].map(|index| Share {
            index,
            value: Zeroizing::new(Vec::new()),
        });
        assert_eq!(combine(&empty).err(), Some(ShamirError::EmptySecret));
    }

    #[test]
    fn injected_rng_drives_the_split() {
        let secret = [0x42u8; 32];
        let first = split_with_rng(&secret, 3, 5, &mut TestRng(1)).unwrap();
        let again = split_with_rng(&secret, 3, 5, &mut TestRng(1)).unwrap();
        let other = split_with_rng(&secret, 3, 5, &mut TestRng(2)).unwrap();
        assert_eq!(plain(&first), plain(&again));
        assert_ne!(plain(&first), plain(&other));
        assert_eq!(combine(&other[2..]).unwrap().as_slice(), &secret[..]);
    }

    #[test]
    fn os_rng_splits_differ() {
        let secret = [0x42u8; 32];
        assert_ne!(
            plain(&split(&secret, 3, 5).unwrap()),
            plain(&split(&secret, 3, 5).unwrap())
        );
    }

    #[test]
    fn debug_never_prints_the_value() {
        let share = Share {
            index: 7,
            value: Zeroizing::new(vec![0xab; 4]),
        };
        let printed = format!("{share:?}");
        assert_eq!(printed, "Share { index: 7, value: <4 bytes redacted> }");
    }
}
