//! Masking (keep the last N characters, mask the rest) and redaction (a fixed replacement).
//! Both count Unicode scalar values, not bytes.

/// Writes `value` with all but its last `keep_last` characters replaced by `mask` into `out`
/// (cleared first).
pub fn mask_into(value: &str, keep_last: usize, mask: char, out: &mut String) {
    out.clear();
    let count = value.chars().count();
    let masked = count.saturating_sub(keep_last);
    for (i, c) in value.chars().enumerate() {
        out.push(if i < masked { mask } else { c });
    }
}

/// Writes `replacement` into `out` (cleared first), whatever the value was.
pub fn redact_into(replacement: &str, out: &mut String) {
    out.clear();
    out.push_str(replacement);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_all_but_the_last() {
        let mut out = String::new();
        mask_into("555-555-0142", 4, '*', &mut out);
        assert_eq!(out, "********0142");
        mask_into("Zoë", 5, '#', &mut out);
        assert_eq!(out, "Zoë");
        mask_into("Zoë🙂", 1, '•', &mut out);
        assert_eq!(out, "•••🙂");
        redact_into("[REDACTED]", &mut out);
        assert_eq!(out, "[REDACTED]");
    }
}
