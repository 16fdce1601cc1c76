//! Format-preserving encryption with FF1 (NIST SP 800-38G), written over the `aes` crate.
//!
//! [`Ff1`] is the algorithm on numeral strings, generic over AES-128/192/256 (the NIST samples
//! use all three; the transform uses AES-256). Per length `n` it precomputes at construction
//! the CBC-MAC state after the fixed block `P` and after the tweak-only blocks of `Q`, so a round
//! costs one or two AES blocks. Numeral strings whose halves fit in 32 bits (up to 19 decimal
//! digits: SSNs, phone numbers, most MRNs) run their ten rounds in `u64` arithmetic with Barrett
//! reduction (no division), inside the cipher's backend so that the AES rounds are inlined;
//! halves up to 96 bits (56 decimal digits) use `u128`; longer strings `num-bigint`. No path
//! allocates but the bignum one.
//!
//! [`FormatPreserving`] is the field transform: a declared alphabet (its radix), declared
//! separators that stay in place, and the SP 800-38G domain rule radix^minlen ≥ 1 000 000 with
//! a maximum length. Only alphabet symbols are encrypted (`999-41-2363` stays `ddd-dd-dddd`); any
//! other character is [`TokenizeError::OutsideAlphabet`]. The key is derived for the field and the
//! tweak from the domain and field. FF1 output has no room for a key version: the policy must
//! record which version a data set was encrypted under. FF3-1 is not offered.

use aes::cipher::consts::U16;
use aes::cipher::{BlockBackend, BlockClosure, BlockEncrypt, BlockSizeUser, KeyInit};
use aes::{Aes128, Aes192, Aes256, Block};
use num_bigint::BigUint;
use sha2::{Digest, Sha256};

use crate::keys::{push_lp, DomainKey, Purpose};
use crate::{Result, TokenizeError};

/// Largest number of numerals a value may have (configurable maxima must not exceed it).
pub const MAX_LEN_LIMIT: usize = 256;

/// Smallest number of values the domain radix^minlen must have (SP 800-38G).
pub const MIN_DOMAIN: u64 = 1_000_000;

/// Symbols of a value that [`FormatPreserving`] handles in a stack buffer.
const STACK_NUMERALS: usize = 32;

/// Longest tweak accepted, in bytes.
pub const MAX_TWEAK: usize = 256;

/// FF1 over the block cipher `C`, for one radix, tweak and length range.
pub struct Ff1<C> {
    cipher: C,
    radix: u32,
    /// The radix with its reciprocal, for NUM and STR without division.
    radix_mod: Modulus64,
    min_len: usize,
    max_len: usize,
    /// Per length `n` in `min_len..=max_len`.
    lengths: Vec<LenParams>,
}

/// What depends only on the key, radix, tweak and length.
struct LenParams {
    u: usize,
    v: usize,
    b: usize,
    d: usize,
    /// CBC-MAC state after `P` and the whole tweak-only blocks of `Q`.
    state: Block,
    /// The rest of the constant part of `Q` (tweak tail and zero padding), fewer than 16 bytes.
    tail: [u8; 16],
    tail_len: usize,
    /// The path a value of this length takes.
    path: Path,
}

/// How values of one length are computed.
enum Path {
    /// radix^v ≤ 2^32: `u64` arithmetic.
    Small(Small),
    /// radix^v ≤ 2^96: `u128` arithmetic.
    Fast(Fast),
    /// Longer: `num-bigint`.
    Big,
}

/// The `u128` path of one length. With radix^v < 2^96, b ≤ 12 and d ≤ 16, so the variable part
/// of `Q` is exactly one block — the constant tail, `[i]`, `[NUM(B)]_b` — and `S` is the first `d`
/// bytes of `R`: a round is one AES block and a few register operations, with no division.
#[derive(Clone, Copy)]
struct Fast {
    mu: Modulus,
    mv: Modulus,
    /// The CBC-MAC state after `P` and the whole constant blocks of `Q`, big-endian.
    state: u128,
    /// The last block of `Q` with `[i]` and `[NUM(B)]_b` zero: the tweak tail and padding.
    template: u128,
    /// 8·b: `[i]` is the byte above the b bytes of `NUM(B)`.
    round_shift: u32,
    /// 8·(16 − d): y is the first d bytes of `R`.
    y_shift: u32,
}

/// The `u64` path of one length, when radix^v ≤ 2^32 (b ≤ 4, so d = 8: up to 19 decimal digits
/// or 12 base-36 symbols): the halves fit in 32 bits, y is the first 8 bytes of `R`, and the last
/// block of `Q` changes from round to round only in its low 8 bytes (`[i]` and `[NUM(B)]_b`).
#[derive(Clone, Copy)]
struct Small {
    mu: Modulus64,
    mv: Modulus64,
    /// The first 8 bytes of (CBC-MAC state ⊕ last block of `Q`): the same in every round.
    high_word: u64,
    /// The last 8 bytes of (state ⊕ last block of `Q` with `NUM(B)` = 0) for round i.
    low: [u64; 10],
}

/// The ten Feistel rounds of the `u64` path, run inside the cipher's backend: the AES rounds are
/// inlined into the loop and the block need not go through memory between the arithmetic and
/// the cipher.
struct SmallRounds<'a> {
    s: &'a Small,
    a: &'a mut u64,
    b: &'a mut u64,
    decrypt: bool,
}

impl BlockSizeUser for SmallRounds<'_> {
    type BlockSize = U16;
}

impl BlockClosure for SmallRounds<'_> {
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        let (s, mut a, mut b) = (self.s, *self.a, *self.b);
        for step in 0..10usize {
            let i = if self.decrypt { 9 - step } else { step };
            let m = if i % 2 == 0 { s.mu } else { s.mv };
            let num = if self.decrypt { a } else { b };
            let whole = (u128::from(s.high_word) << 64) | u128::from(s.low[i] ^ num);
            let mut block = Block::from(whole.to_be_bytes());
            backend.proc_block((&mut block).into());
            let mut first = [0u8; 8];
            first.copy_from_slice(&block[..8]);
            let y = m.reduce(u64::from_be_bytes(first));
            if self.decrypt {
                // c = (NUM(B) − y) mod radix^m; B < m and y < m.
                let c = if b >= y { b - y } else { b + m.m - y };
                b = a;
                a = c;
            } else {
                // c = (NUM(A) + y) mod radix^m; A < m and y < m.
                let mut c = a + y;
                if c >= m.m {
                    c -= m.m;
                }
                a = b;
                b = c;
            }
        }
        *self.a = a;
        *self.b = b;
    }
}

/// A modulus below 2^64 and its reciprocal ⌊2^64/m⌋: division of a 64-bit value is a
/// multiplication and at most one correction (Barrett), with no `div` instruction.
#[derive(Clone, Copy)]
struct Modulus64 {
    m: u64,
    magic: u64,
}

impl Modulus64 {
    /// `m` ≥ 2 (a radix, or a power of one with a positive exponent).
    fn new(m: u64) -> Self {
        let m = m.max(2);
        // ⌊2^64 / m⌋ < 2^64 for m ≥ 2.
        let magic = ((1u128 << 64) / u128::from(m)) as u64;
        Self { m, magic }
    }

    /// (x / m, x mod m).
    fn div_rem(self, x: u64) -> (u64, u64) {
        // 0 ≤ 2^64/m − magic < 1, so x/m − x·magic/2^64 < x/2^64 < 1: q is ⌊x/m⌋ or one less.
        let mut q = ((u128::from(x) * u128::from(self.magic)) >> 64) as u64;
        let mut r = x - q * self.m;
        if r >= self.m {
            r -= self.m;
            q += 1;
        }
        (q, r)
    }

    fn reduce(self, x: u64) -> u64 {
        self.div_rem(x).1
    }
}

/// A modulus below 2^96, with the 64-bit fast division when it and the dividend fit.
#[derive(Clone, Copy)]
struct Modulus {
    m: u128,
    small: Option<Modulus64>,
}

impl Modulus {
    fn new(m: u128) -> Self {
        let small = u64::try_from(m)
            .ok()
            .filter(|&m| m >= 1)
            .map(Modulus64::new);
        Self { m, small }
    }

    /// (x / m, x mod m).
    fn div_rem(self, x: u128) -> (u128, u128) {
        if let (Some(small), Ok(x)) = (self.small, u64::try_from(x)) {
            let (q, r) = small.div_rem(x);
            return (u128::from(q), u128::from(r));
        }
        (x / self.m, x % self.m)
    }

    fn reduce(self, x: u128) -> u128 {
        self.div_rem(x).1
    }
}

impl<C: BlockEncrypt + BlockSizeUser<BlockSize = U16>> Ff1<C> {
    /// FF1 for `radix` and `tweak` over numeral strings of `min_len..=max_len` numerals.
    ///
    /// Checks radix 2..=65536, radix^min_len ≥ 1 000 000, min_len ≥ 2, max_len ≤
    /// [`MAX_LEN_LIMIT`], tweak ≤ [`MAX_TWEAK`] bytes.
    pub fn new(
        cipher: C,
        radix: u32,
        tweak: &[u8],
        min_len: usize,
        max_len: usize,
    ) -> Result<Self> {
        if !(2..=65_536).contains(&radix) {
            return Err(TokenizeError::AlphabetSize {
                size: radix as usize,
            });
        }
        if min_len < 2 || !domain_large_enough(radix, min_len) {
            return Err(TokenizeError::DomainTooSmall { radix, min_len });
        }
        if max_len < min_len || max_len > MAX_LEN_LIMIT {
            return Err(TokenizeError::MaxLength {
                max_len,
                min_len,
                limit: MAX_LEN_LIMIT,
            });
        }
        if tweak.len() > MAX_TWEAK {
            return Err(TokenizeError::InvalidParameter {
                parameter: "tweak",
                reason: "longer than 256 bytes",
            });
        }
        let mut ff1 = Self {
            cipher,
            radix,
            radix_mod: Modulus64::new(u64::from(radix)),
            min_len,
            max_len,
            lengths: Vec::with_capacity(max_len - min_len + 1),
        };
        for n in min_len..=max_len {
            let params = ff1.len_params(n, tweak);
            ff1.lengths.push(params);
        }
        Ok(ff1)
    }

    /// The radix.
    pub fn radix(&self) -> u32 {
        self.radix
    }

    fn len_params(&self, n: usize, tweak: &[u8]) -> LenParams {
        let u = n / 2;
        let v = n - u;
        let radix_big = BigUint::from(self.radix);
        let domain_v = radix_big.pow(v as u32);
        // b = ⌈⌈v·log2(radix)⌉ / 8⌉, and ⌈log2(x)⌉ = bit length of x − 1 for x ≥ 2.
        let bits = (&domain_v - 1u32).bits() as usize;
        let b = bits.div_ceil(8);
        let d = 4 * b.div_ceil(4) + 4;
        let t = tweak.len();
        let mut p = Block::default();
        p[..3].copy_from_slice(&[1, 2, 1]);
        p[3..6].copy_from_slice(&self.radix.to_be_bytes()[1..]);
        p[6] = 10;
        p[7] = (u % 256) as u8;
        p[8..12].copy_from_slice(&(n as u32).to_be_bytes());
        p[12..16].copy_from_slice(&(t as u32).to_be_bytes());
        let mut state = p;
        self.cipher.encrypt_block(&mut state);
        // Q = T ‖ 0^pad ‖ [i] ‖ [NUM(B)]_b, pad = (−t−b−1) mod 16.
        let pad = (16 - (t + b + 1) % 16) % 16;
        let mut constant = tweak.to_vec();
        constant.resize(t + pad, 0);
        let whole = constant.len() / 16 * 16;
        for chunk in constant[..whole].chunks_exact(16) {
            xor_into(&mut state, chunk);
            self.cipher.encrypt_block(&mut state);
        }
        let mut tail = [0u8; 16];
        let tail_len = constant.len() - whole;
        tail[..tail_len].copy_from_slice(&constant[whole..]);
        let state_num = u128::from_be_bytes(state.into());
        let template = u128::from_be_bytes(tail);
        let path = match (pow_u128(self.radix, u), pow_u128(self.radix, v)) {
            // The layout argument of `Small` and `Fast` (one variable block) is checked here.
            (Some(mu), Some(mv)) if mv <= 1 << 32 && tail_len + 1 + b == 16 && d == 8 => {
                let mixed = state_num ^ template;
                let high_word = (mixed >> 64) as u64;
                let mut low = [0u64; 10];
                for (i, slot) in (0u64..).zip(low.iter_mut()) {
                    // The low 64 bits of `mixed` (truncation intended) with [i] above NUM(B).
                    *slot = mixed as u64 ^ (i << (8 * b));
                }
                Path::Small(Small {
                    mu: Modulus64::new(mu as u64),
                    mv: Modulus64::new(mv as u64),
                    high_word,
                    low,
                })
            }
            (Some(mu), Some(mv)) if mv <= 1 << 96 && tail_len + 1 + b == 16 && d <= 16 => {
                Path::Fast(Fast {
                    mu: Modulus::new(mu),
                    mv: Modulus::new(mv),
                    state: state_num,
                    template,
                    round_shift: 8 * b as u32,
                    y_shift: 8 * (16 - d) as u32,
                })
            }
            _ => Path::Big,
        };
        LenParams {
            u,
            v,
            b,
            d,
            state,
            tail,
            tail_len,
            path,
        }
    }

    fn params(&self, n: usize) -> Result<&LenParams> {
        if n < self.min_len {
            return Err(TokenizeError::InputTooShort {
                len: n,
                min_len: self.min_len,
            });
        }
        if n > self.max_len {
            return Err(TokenizeError::InputTooLong {
                len: n,
                max_len: self.max_len,
            });
        }
        self.lengths
            .get(n - self.min_len)
            .ok_or(TokenizeError::InputTooLong {
                len: n,
                max_len: self.max_len,
            })
    }

    /// Encrypts the numeral string `x` (each numeral < radix) into `out` (same length).
    pub fn encrypt(&self, x: &[u16], out: &mut [u16]) -> Result<()> {
        self.crypt(x, out, false)
    }

    /// Decrypts the numeral string `x` into `out` (same length).
    pub fn decrypt(&self, x: &[u16], out: &mut [u16]) -> Result<()> {
        self.crypt(x, out, true)
    }

    /// Like [`Ff1::encrypt`], always on the `num-bigint` path (to test it against the fast one).
    #[doc(hidden)]
    pub fn encrypt_bignum(&self, x: &[u16], out: &mut [u16]) -> Result<()> {
        self.crypt_bignum(x, out, false)
    }

    /// Like [`Ff1::decrypt`], always on the `num-bigint` path (to test it against the fast one).
    #[doc(hidden)]
    pub fn decrypt_bignum(&self, x: &[u16], out: &mut [u16]) -> Result<()> {
        self.crypt_bignum(x, out, true)
    }

    fn crypt_bignum(&self, x: &[u16], out: &mut [u16], decrypt: bool) -> Result<()> {
        self.check(x, out)?;
        let p = self.params(x.len())?;
        self.crypt_big(p, x, out, decrypt);
        Ok(())
    }

    fn check(&self, x: &[u16], out: &[u16]) -> Result<()> {
        if x.len() != out.len() {
            return Err(TokenizeError::InvalidParameter {
                parameter: "out",
                reason: "output length differs from input length",
            });
        }
        if let Some(position) = x.iter().position(|&c| u32::from(c) >= self.radix) {
            return Err(TokenizeError::OutsideAlphabet { position });
        }
        Ok(())
    }

    fn crypt(&self, x: &[u16], out: &mut [u16], decrypt: bool) -> Result<()> {
        self.check(x, out)?;
        let p = self.params(x.len())?;
        match &p.path {
            Path::Small(small) => self.crypt_small(small, p.u, x, out, decrypt),
            Path::Fast(fast) => self.crypt_fast(fast, p.u, x, out, decrypt),
            Path::Big => self.crypt_big(p, x, out, decrypt),
        }
        Ok(())
    }

    /// PRF(P ‖ Q) from the precomputed state: `rest` is the variable part of Q
    /// ([i] ‖ [NUM]_b), appended to the constant tail.
    fn prf(&self, p: &LenParams, round: u8, num_be: &[u8]) -> Block {
        let mut state = p.state;
        let mut block = Block::default();
        block[..p.tail_len].copy_from_slice(&p.tail[..p.tail_len]);
        let mut fill = p.tail_len;
        let push = |byte: u8, state: &mut Block, block: &mut Block, fill: &mut usize| {
            block[*fill] = byte;
            *fill += 1;
            if *fill == 16 {
                xor_into(state, block);
                self.cipher.encrypt_block(state);
                *fill = 0;
            }
        };
        push(round, &mut state, &mut block, &mut fill);
        for &byte in num_be {
            push(byte, &mut state, &mut block, &mut fill);
        }
        // The layout of Q makes its length a multiple of 16, so nothing is left over.
        debug_assert_eq!(fill, 0);
        state
    }

    fn crypt_small(&self, s: &Small, u: usize, x: &[u16], out: &mut [u16], decrypt: bool) {
        let radix = self.radix_mod;
        let mut a = num_u64(&x[..u], radix.m);
        let mut b = num_u64(&x[u..], radix.m);
        self.cipher.encrypt_with_backend(SmallRounds {
            s,
            a: &mut a,
            b: &mut b,
            decrypt,
        });
        str_u64(a, radix, &mut out[..u]);
        str_u64(b, radix, &mut out[u..]);
    }

    fn crypt_fast(&self, f: &Fast, u: usize, x: &[u16], out: &mut [u16], decrypt: bool) {
        let radix = Modulus {
            m: u128::from(self.radix),
            small: Some(self.radix_mod),
        };
        let mut a = num_u128(&x[..u], radix.m);
        let mut b = num_u128(&x[u..], radix.m);
        for step in 0..10u8 {
            let i = if decrypt { 9 - step } else { step };
            let m = if i % 2 == 0 { f.mu } else { f.mv };
            let y = m.reduce(self.prf_fast(f, i, if decrypt { a } else { b }));
            if decrypt {
                // c = (NUM(B) − y) mod radix^m; B < m and y < m.
                let c = if b >= y { b - y } else { b + m.m - y };
                b = a;
                a = c;
            } else {
                // c = (NUM(A) + y) mod radix^m; A < m and y < m.
                let mut c = a + y;
                if c >= m.m {
                    c -= m.m;
                }
                a = b;
                b = c;
            }
        }
        str_u128(a, radix, &mut out[..u]);
        str_u128(b, radix, &mut out[u..]);
    }

    /// NUM(S) of round `round` for the numeral value `num` (< 2^(8b)): PRF over the last block of
    /// `Q`, from the precomputed state.
    fn prf_fast(&self, f: &Fast, round: u8, num: u128) -> u128 {
        let q = f.template | (u128::from(round) << f.round_shift) | num;
        let mut block = Block::from((f.state ^ q).to_be_bytes());
        self.cipher.encrypt_block(&mut block);
        u128::from_be_bytes(block.into()) >> f.y_shift
    }

    fn crypt_big(&self, p: &LenParams, x: &[u16], out: &mut [u16], decrypt: bool) {
        let radix = BigUint::from(self.radix);
        let mu = radix.pow(p.u as u32);
        let mv = radix.pow(p.v as u32);
        let mut a = num_big(&x[..p.u], &radix);
        let mut b = num_big(&x[p.u..], &radix);
        let mut num_be = vec![0u8; p.b];
        for step in 0..10u8 {
            let i = if decrypt { 9 - step } else { step };
            let m = if i % 2 == 0 { &mu } else { &mv };
            let input = if decrypt { &a } else { &b };
            let bytes = input.to_bytes_be();
            num_be.fill(0);
            num_be[p.b - bytes.len()..].copy_from_slice(&bytes);
            let r = self.prf(p, i, &num_be);
            let y = BigUint::from_bytes_be(&self.expand_s(r, p.d)) % m;
            if decrypt {
                let c = (&b + m - y) % m;
                b = std::mem::replace(&mut a, c);
            } else {
                let c = (&a + y) % m;
                a = std::mem::replace(&mut b, c);
            }
        }
        str_big(a, &radix, &mut out[..p.u]);
        str_big(b, &radix, &mut out[p.u..]);
    }

    /// S = R ‖ CIPH(R ⊕ [1]_16) ‖ CIPH(R ⊕ [2]_16) ‖ …, the first `d` bytes.
    fn expand_s(&self, r: Block, d: usize) -> Vec<u8> {
        let mut s = Vec::with_capacity(d.div_ceil(16) * 16);
        s.extend_from_slice(&r);
        let mut j: u128 = 1;
        while s.len() < d {
            let mut block = r;
            xor_into(&mut block, &j.to_be_bytes());
            self.cipher.encrypt_block(&mut block);
            s.extend_from_slice(&block);
            j += 1;
        }
        s.truncate(d);
        s
    }
}

impl<C> std::fmt::Debug for Ff1<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ff1")
            .field("radix", &self.radix)
            .field("min_len", &self.min_len)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

/// FF1 under a raw AES key of 16, 24 or 32 bytes (for the NIST samples).
pub enum Ff1Aes {
    /// AES-128.
    Aes128(Ff1<Aes128>),
    /// AES-192.
    Aes192(Ff1<Aes192>),
    /// AES-256.
    Aes256(Ff1<Aes256>),
}

impl Ff1Aes {
    /// FF1 under `key` (16, 24 or 32 bytes); the other parameters as in [`Ff1::new`].
    pub fn new(
        key: &[u8],
        radix: u32,
        tweak: &[u8],
        min_len: usize,
        max_len: usize,
    ) -> Result<Self> {
        let invalid = |_| TokenizeError::InvalidKeyLength {
            algorithm: "FF1",
            actual: key.len(),
        };
        Ok(match key.len() {
            16 => Self::Aes128(Ff1::new(
                Aes128::new_from_slice(key).map_err(invalid)?,
                radix,
                tweak,
                min_len,
                max_len,
            )?),
            24 => Self::Aes192(Ff1::new(
                Aes192::new_from_slice(key).map_err(invalid)?,
                radix,
                tweak,
                min_len,
                max_len,
            )?),
            32 => Self::Aes256(Ff1::new(
                Aes256::new_from_slice(key).map_err(invalid)?,
                radix,
                tweak,
                min_len,
                max_len,
            )?),
            actual => {
                return Err(TokenizeError::InvalidKeyLength {
                    algorithm: "FF1",
                    actual,
                })
            }
        })
    }

    /// [`Ff1::encrypt`].
    pub fn encrypt(&self, x: &[u16], out: &mut [u16]) -> Result<()> {
        match self {
            Self::Aes128(f) => f.encrypt(x, out),
            Self::Aes192(f) => f.encrypt(x, out),
            Self::Aes256(f) => f.encrypt(x, out),
        }
    }

    /// [`Ff1::decrypt`].
    pub fn decrypt(&self, x: &[u16], out: &mut [u16]) -> Result<()> {
        match self {
            Self::Aes128(f) => f.decrypt(x, out),
            Self::Aes192(f) => f.decrypt(x, out),
            Self::Aes256(f) => f.decrypt(x, out),
        }
    }
}

/// The FF1 field transform: alphabet, separators, length rules, key and tweak of one field.
pub struct FormatPreserving {
    ff1: Ff1<Aes256>,
    alphabet: AlphabetMap,
    separators: Vec<char>,
}

/// An alphabet's symbols and the reverse lookup.
struct AlphabetMap {
    symbols: Vec<char>,
    /// The symbols as bytes when they are all ASCII (the byte path of ASCII values).
    ascii_symbols: Option<Vec<u8>>,
    ascii: [u32; 128],
    other: Vec<(char, u16)>,
}

const NOT_IN_ALPHABET: u32 = u32::MAX;

impl AlphabetMap {
    fn new(symbols: &str) -> Result<Self> {
        let symbols: Vec<char> = symbols.chars().collect();
        if !(2..=65_536).contains(&symbols.len()) {
            return Err(TokenizeError::AlphabetSize {
                size: symbols.len(),
            });
        }
        let mut ascii = [NOT_IN_ALPHABET; 128];
        let mut other = Vec::new();
        for (position, &c) in symbols.iter().enumerate() {
            if symbols[..position].contains(&c) {
                return Err(TokenizeError::DuplicateSymbol { position });
            }
            // position < 65 536, checked above.
            let index = position as u16;
            match ascii.get_mut(c as usize) {
                Some(slot) => *slot = u32::from(index),
                None => other.push((c, index)),
            }
        }
        other.sort_unstable();
        let ascii_symbols = symbols
            .iter()
            .map(|&c| u8::try_from(c).ok().filter(u8::is_ascii))
            .collect();
        Ok(Self {
            symbols,
            ascii_symbols,
            ascii,
            other,
        })
    }

    fn index(&self, c: char) -> Option<u16> {
        match self.ascii.get(c as usize) {
            Some(&NOT_IN_ALPHABET) => None,
            Some(&i) => u16::try_from(i).ok(),
            None => self
                .other
                .binary_search_by_key(&c, |&(s, _)| s)
                .ok()
                .map(|k| self.other[k].1),
        }
    }

    fn symbol(&self, numeral: u16) -> char {
        // Numerals come from FF1 modulo the radix, the number of symbols.
        self.symbols[usize::from(numeral)]
    }
}

impl FormatPreserving {
    /// The FF1 transform of `field` over `alphabet` (its symbols in numeral order), keeping
    /// `separators` in place, for values of `min_len` (default: the smallest allowed) to
    /// `max_len` symbols.
    pub fn new(
        domain_key: &DomainKey,
        field: &str,
        alphabet: &str,
        separators: &str,
        min_len: Option<usize>,
        max_len: usize,
    ) -> Result<Self> {
        let alphabet = AlphabetMap::new(alphabet)?;
        let separators: Vec<char> = separators.chars().collect();
        if let Some(position) = separators.iter().position(|&c| alphabet.index(c).is_some()) {
            return Err(TokenizeError::SeparatorInAlphabet { position });
        }
        // At most 65 536 symbols, checked by AlphabetMap::new.
        let radix = alphabet.symbols.len() as u32;
        let min_len = min_len.unwrap_or_else(|| smallest_min_len(radix));
        let key = domain_key.derive::<32>(field, Purpose::Ff1);
        let cipher = Aes256::new(key.as_ref().into());
        let tweak = tweak(domain_key.domain(), field);
        let ff1 = Ff1::new(cipher, radix, &tweak, min_len, max_len)?;
        Ok(Self {
            ff1,
            alphabet,
            separators,
        })
    }

    /// Writes the encryption of `value` into `out` (cleared first).
    pub fn encrypt_into(&self, value: &str, out: &mut String) -> Result<()> {
        self.crypt_into(value, out, false)
    }

    /// Writes the decryption of `value` into `out` (cleared first).
    pub fn decrypt_into(&self, value: &str, out: &mut String) -> Result<()> {
        self.crypt_into(value, out, true)
    }

    fn crypt_into(&self, value: &str, out: &mut String, decrypt: bool) -> Result<()> {
        out.clear();
        // A value has at most as many symbols as bytes: short values (most identifiers) use a
        // small stack buffer, longer ones up to the crate's limit a heap one.
        let slots = value.len().min(MAX_LEN_LIMIT);
        let mut stack = [0u16; 2 * STACK_NUMERALS];
        let mut heap = Vec::new();
        let buf: &mut [u16] = if slots <= STACK_NUMERALS {
            &mut stack
        } else {
            heap.resize(2 * slots, 0);
            &mut heap
        };
        let (numerals, result) = buf.split_at_mut(buf.len() / 2);
        let mut n = 0usize;
        let mut push = |x: u16| {
            if let Some(slot) = numerals.get_mut(n) {
                *slot = x;
            }
            n += 1;
        };
        if value.is_ascii() {
            // Byte by byte: an ASCII character's index is its byte's.
            for (position, &byte) in value.as_bytes().iter().enumerate() {
                match self.alphabet.ascii[usize::from(byte & 0x7f)] {
                    NOT_IN_ALPHABET if !self.separators.contains(&char::from(byte)) => {
                        return Err(TokenizeError::OutsideAlphabet { position });
                    }
                    NOT_IN_ALPHABET => {}
                    // Indexes are below 65 536 (checked by AlphabetMap::new).
                    x => push(x as u16),
                }
            }
        } else {
            for (position, c) in value.chars().enumerate() {
                if let Some(x) = self.alphabet.index(c) {
                    push(x);
                } else if !self.separators.contains(&c) {
                    return Err(TokenizeError::OutsideAlphabet { position });
                }
            }
        }
        if n > self.ff1.max_len {
            return Err(TokenizeError::InputTooLong {
                len: n,
                max_len: self.ff1.max_len,
            });
        }
        let crypted = if decrypt {
            self.ff1.decrypt(&numerals[..n], &mut result[..n])
        } else {
            self.ff1.encrypt(&numerals[..n], &mut result[..n])
        };
        crypted?;
        let result = &result[..n];
        out.reserve(value.len());
        if let (true, Some(symbols)) = (value.is_ascii(), &self.alphabet.ascii_symbols) {
            // ASCII value and alphabet: byte by byte, no UTF-8 decoding. Numerals come from FF1
            // modulo the radix, the number of symbols.
            let mut k = 0;
            for &byte in value.as_bytes() {
                let is_symbol = self.alphabet.ascii[usize::from(byte & 0x7f)] != NOT_IN_ALPHABET;
                match result.get(k) {
                    Some(&x) if is_symbol => {
                        out.push(char::from(symbols[usize::from(x)]));
                        k += 1;
                    }
                    _ => out.push(char::from(byte)),
                }
            }
            return Ok(());
        }
        let mut next = result.iter();
        for c in value.chars() {
            match (self.alphabet.index(c), next.as_slice().first()) {
                (Some(_), Some(&x)) => {
                    out.push(self.alphabet.symbol(x));
                    next.next();
                }
                _ => out.push(c),
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for FormatPreserving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FormatPreserving")
            .field("ff1", &self.ff1)
            .field("separators", &self.separators)
            .finish_non_exhaustive()
    }
}

/// The FF1 tweak of a field: the first 8 bytes of SHA-256 over the length-prefixed label,
/// domain and field (public, like every tweak).
pub fn tweak(domain: &str, field: &str) -> [u8; 8] {
    let mut input = Vec::with_capacity(32 + domain.len() + field.len());
    push_lp(&mut input, b"kms-tokenize/v1 ff1 tweak");
    push_lp(&mut input, domain.as_bytes());
    push_lp(&mut input, field.as_bytes());
    let digest = Sha256::digest(&input);
    let mut t = [0u8; 8];
    t.copy_from_slice(&digest[..8]);
    t
}

/// The smallest length with radix^len ≥ 1 000 000 (and at least 2).
pub fn smallest_min_len(radix: u32) -> usize {
    (2..).find(|&n| domain_large_enough(radix, n)).unwrap_or(2)
}

fn domain_large_enough(radix: u32, len: usize) -> bool {
    let mut size: u64 = 1;
    for _ in 0..len {
        size = size.saturating_mul(u64::from(radix));
        if size >= MIN_DOMAIN {
            return true;
        }
    }
    size >= MIN_DOMAIN
}

fn pow_u128(radix: u32, exp: usize) -> Option<u128> {
    let mut x: u128 = 1;
    for _ in 0..exp {
        x = x.checked_mul(u128::from(radix))?;
    }
    Some(x)
}

fn xor_into(block: &mut Block, bytes: &[u8]) {
    for (a, b) in block.iter_mut().zip(bytes) {
        *a ^= b;
    }
}

fn num_u64(x: &[u16], radix: u64) -> u64 {
    x.iter().fold(0u64, |acc, &c| acc * radix + u64::from(c))
}

fn str_u64(mut value: u64, radix: Modulus64, out: &mut [u16]) {
    for slot in out.iter_mut().rev() {
        let (q, r) = radix.div_rem(value);
        // r < radix ≤ 65 536.
        *slot = r as u16;
        value = q;
    }
}

fn num_u128(x: &[u16], radix: u128) -> u128 {
    x.iter().fold(0u128, |acc, &c| acc * radix + u128::from(c))
}

fn str_u128(mut value: u128, radix: Modulus, out: &mut [u16]) {
    for slot in out.iter_mut().rev() {
        let (q, r) = radix.div_rem(value);
        // r < radix ≤ 65 536.
        *slot = r as u16;
        value = q;
    }
}

fn num_big(x: &[u16], radix: &BigUint) -> BigUint {
    x.iter()
        .fold(BigUint::default(), |acc, &c| acc * radix + u32::from(c))
}

fn str_big(mut value: BigUint, radix: &BigUint, out: &mut [u16]) {
    for slot in out.iter_mut().rev() {
        let digit = &value % radix;
        *slot = digit.iter_u32_digits().next().unwrap_or(0) as u16;
        value /= radix;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn key() -> DomainKey {
        DomainKey::new("research-1", 1, Zeroizing::new([3u8; 32]))
    }

    #[test]
    fn domain_rule_radix_10_length_5_rejected_6_accepted() {
        assert_eq!(smallest_min_len(10), 6);
        assert_eq!(
            FormatPreserving::new(&key(), "f", "0123456789", "", Some(5), 20).err(),
            Some(TokenizeError::DomainTooSmall {
                radix: 10,
                min_len: 5
            })
        );
        let fp = FormatPreserving::new(&key(), "f", "0123456789", "", Some(6), 20).unwrap();
        let mut out = String::new();
        assert_eq!(
            fp.encrypt_into("12345", &mut out),
            Err(TokenizeError::InputTooShort { len: 5, min_len: 6 })
        );
        fp.encrypt_into("123456", &mut out).unwrap();
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn alphabet_and_separator_rules() {
        assert_eq!(
            FormatPreserving::new(&key(), "f", "01234567891", "", None, 20).err(),
            Some(TokenizeError::DuplicateSymbol { position: 10 })
        );
        assert_eq!(
            FormatPreserving::new(&key(), "f", "0", "", None, 20).err(),
            Some(TokenizeError::AlphabetSize { size: 1 })
        );
        assert_eq!(
            FormatPreserving::new(&key(), "f", "0123456789", " -5", None, 20).err(),
            Some(TokenizeError::SeparatorInAlphabet { position: 2 })
        );
        assert!(matches!(
            FormatPreserving::new(&key(), "f", "0123456789", "", None, MAX_LEN_LIMIT + 1),
            Err(TokenizeError::MaxLength { .. })
        ));
        let fp = FormatPreserving::new(&key(), "ssn", "0123456789", "-", None, 12).unwrap();
        let mut out = String::new();
        assert_eq!(
            fp.encrypt_into("999-41-236X", &mut out),
            Err(TokenizeError::OutsideAlphabet { position: 10 })
        );
        assert_eq!(
            fp.encrypt_into("1234567890123", &mut out),
            Err(TokenizeError::InputTooLong {
                len: 13,
                max_len: 12
            })
        );
        let long = "1".repeat(MAX_LEN_LIMIT + 5);
        assert_eq!(
            fp.encrypt_into(&long, &mut out),
            Err(TokenizeError::InputTooLong {
                len: MAX_LEN_LIMIT + 5,
                max_len: 12
            })
        );
    }

    #[test]
    fn ssn_keeps_its_shape_and_decrypts() {
        let fp = FormatPreserving::new(&key(), "ssn", "0123456789", "-", None, 12).unwrap();
        let mut enc = String::new();
        fp.encrypt_into("999-41-2363", &mut enc).unwrap();
        assert_ne!(enc, "999-41-2363");
        let shape: String = enc
            .chars()
            .map(|c| if c.is_ascii_digit() { 'd' } else { c })
            .collect();
        assert_eq!(shape, "ddd-dd-dddd");
        let mut dec = String::new();
        fp.decrypt_into(&enc, &mut dec).unwrap();
        assert_eq!(dec, "999-41-2363");
        // Another field has another key and tweak.
        let other = FormatPreserving::new(&key(), "phone", "0123456789", "-", None, 12).unwrap();
        let mut enc2 = String::new();
        other.encrypt_into("999-41-2363", &mut enc2).unwrap();
        assert_ne!(enc, enc2);
    }

    #[test]
    fn barrett_reduction_equals_division_at_the_edges() {
        let moduli = [
            2u64,
            3,
            10,
            36,
            10_000,
            100_000,
            36u64.pow(5),
            65_536,
            (1 << 63) + 1,
            u64::MAX - 1,
            u64::MAX,
        ];
        for m in moduli {
            let modulus = Modulus::new(u128::from(m));
            let xs = [
                0u64,
                1,
                m - 1,
                m,
                m.wrapping_add(1),
                u64::MAX / 2,
                u64::MAX - 1,
                u64::MAX,
            ];
            for x in xs {
                let (q, r) = modulus.div_rem(u128::from(x));
                assert_eq!((q, r), (u128::from(x / m), u128::from(x % m)), "{x} / {m}");
            }
        }
        // Above 64 bits it divides.
        let big = Modulus::new(1u128 << 90);
        assert_eq!(big.div_rem((1u128 << 95) + 5), (32, 5));
        assert_eq!(
            Modulus::new(10).div_rem(u128::from(u64::MAX) + 1),
            ((u128::from(u64::MAX) + 1) / 10, 6)
        );
    }

    #[test]
    fn non_ascii_alphabet() {
        let fp = FormatPreserving::new(&key(), "f", "αβγδεζηθικ", " ", None, 30).unwrap();
        let mut enc = String::new();
        fp.encrypt_into("αβγ δεζ ηθι", &mut enc).unwrap();
        assert_eq!(enc.chars().nth(3), Some(' '));
        let mut dec = String::new();
        fp.decrypt_into(&enc, &mut dec).unwrap();
        assert_eq!(dec, "αβγ δεζ ηθι");
    }
}
