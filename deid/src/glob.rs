//! File-name patterns of the policy: `*` (any run of characters), `?` (one character), every
//! other character literal; compared case-insensitively on the file's name (not its directory).

/// A compiled file-name pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob {
    pattern: Vec<char>,
}

impl Glob {
    /// Compiles `pattern`; `None` if it is empty or names a directory.
    pub(crate) fn new(pattern: &str) -> Option<Self> {
        if pattern.is_empty() || pattern.contains('/') || pattern.contains('\\') {
            return None;
        }
        Some(Self {
            pattern: lower(pattern),
        })
    }

    /// Whether `name` (a file name without directory) matches.
    pub(crate) fn matches(&self, name: &str) -> bool {
        matches(&self.pattern, &lower(name))
    }
}

fn lower(s: &str) -> Vec<char> {
    s.chars().flat_map(char::to_lowercase).collect()
}

/// Iterative wildcard matching with one backtrack point (linear in practice, no recursion).
fn matches(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some('?') => {
                p += 1;
                n += 1;
            }
            Some(&c) if c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_case() {
        let g = |p: &str| Glob::new(p).unwrap();
        assert!(g("*").matches("patients.csv"));
        assert!(g("patients.csv").matches("PATIENTS.CSV"));
        assert!(!g("patients.csv").matches("patients.csv.bak"));
        assert!(g("claims*.csv").matches("claims_transactions.csv"));
        assert!(g("*.ndjson").matches("Observation.ndjson"));
        assert!(!g("*.ndjson").matches("Observation.json"));
        assert!(g("p?ti*s.c*").matches("patients.csv"));
        assert!(g("a*b*c").matches("aXbYbc"));
        assert!(!g("a*b*c").matches("aXbYbd"));
        assert!(Glob::new("dir/x.csv").is_none());
        assert!(Glob::new("").is_none());
    }
}
