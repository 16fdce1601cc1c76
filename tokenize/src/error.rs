//! The crate's one error type. No variant carries an input value, a token or key material:
//! positions and lengths only.

/// Everything that can go wrong in a transform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizeError {
    /// A value was empty, or nothing was left of it after normalization (e.g. a phone number
    /// without any digit); pseudonymizing it would make all such values collide.
    #[error("value is empty after normalization")]
    EmptyAfterNormalization,
    /// A key given to a known-answer helper has a length the algorithm does not take.
    #[error("invalid key length {actual} for {algorithm}")]
    InvalidKeyLength {
        /// The algorithm.
        algorithm: &'static str,
        /// The length given, in bytes.
        actual: usize,
    },
    /// A token (AES-SIV) or an FF1 ciphertext could not be decrypted: malformed, truncated,
    /// tampered with, of another field, domain or key version. Deliberately one error.
    #[error("token cannot be decrypted")]
    DecryptFailed,
    /// The transform has no inverse.
    #[error("transform {transform} is not reversible")]
    NotReversible {
        /// The transform's kind.
        transform: &'static str,
    },
    /// An FF1 alphabet has fewer than 2 or more than 65 536 symbols.
    #[error("FF1 alphabet has {size} symbols; 2 to 65536 are allowed")]
    AlphabetSize {
        /// Number of symbols.
        size: usize,
    },
    /// An FF1 alphabet lists a symbol twice.
    #[error("FF1 alphabet repeats the symbol at position {position}")]
    DuplicateSymbol {
        /// Index (in characters) of the second occurrence.
        position: usize,
    },
    /// A declared separator is also an alphabet symbol.
    #[error("FF1 separator at position {position} is also an alphabet symbol")]
    SeparatorInAlphabet {
        /// Index (in characters) in the separator list.
        position: usize,
    },
    /// The FF1 domain is too small: radix^min_len must be at least 1 000 000 (SP 800-38G).
    #[error("FF1 domain too small: radix {radix} with minimum length {min_len} gives fewer than 1000000 values")]
    DomainTooSmall {
        /// The alphabet's radix.
        radix: u32,
        /// The minimum length.
        min_len: usize,
    },
    /// The configured FF1 maximum length is below the minimum or above the crate's limit.
    #[error(
        "FF1 maximum length {max_len} must be between the minimum length {min_len} and {limit}"
    )]
    MaxLength {
        /// Configured maximum.
        max_len: usize,
        /// The minimum length in force.
        min_len: usize,
        /// The crate's limit.
        limit: usize,
    },
    /// The value has fewer alphabet symbols than the FF1 minimum length.
    #[error("value has {len} symbols, fewer than the minimum {min_len}")]
    InputTooShort {
        /// Symbols in the value.
        len: usize,
        /// Minimum.
        min_len: usize,
    },
    /// The value has more alphabet symbols than the FF1 maximum length.
    #[error("value has {len} symbols, more than the maximum {max_len}")]
    InputTooLong {
        /// Symbols in the value.
        len: usize,
        /// Maximum.
        max_len: usize,
    },
    /// A character is neither in the FF1 alphabet nor a declared separator.
    #[error("character at position {position} is neither in the alphabet nor a separator")]
    OutsideAlphabet {
        /// Index (in characters) of the offending character.
        position: usize,
    },
    /// A date or date-time is not in a supported form (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`, or a
    /// date-time `YYYY-MM-DDThh:mm[:ss[.f]][Z|±hh:mm]`), or is not a calendar date.
    #[error("invalid date: {reason}")]
    InvalidDate {
        /// What is wrong, without the value.
        reason: &'static str,
    },
    /// Shifting a date left the years 0000–9999.
    #[error("shifted date is out of range")]
    DateOutOfRange,
    /// A date shift needs the patient's pseudonym and none was given.
    #[error("date shift needs the patient's pseudonym")]
    MissingPatient,
    /// A ZIP code is not 5 digits, ZIP+4 (`12345-6789`) or 9 digits.
    #[error("invalid ZIP code")]
    InvalidZip,
    /// An age is not a whole number of years.
    #[error("invalid age")]
    InvalidAge,
    /// A transform parameter is out of range.
    #[error("invalid parameter {parameter}: {reason}")]
    InvalidParameter {
        /// The parameter.
        parameter: &'static str,
        /// Why.
        reason: &'static str,
    },
}
