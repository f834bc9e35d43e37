//! Selectors: `type:value` facts about a node or a workload (e.g. `unix:uid:1000`).
//!
//! An entry matches a caller when every one of the entry's selectors is among the caller's
//! (subset match, as SPIRE does). Both sides are kept sorted and de-duplicated so the check is
//! a linear merge.

use std::fmt;
use std::str::FromStr;

/// Longest accepted selector value in bytes.
pub const MAX_VALUE_LEN: usize = 1024;
/// Longest accepted selector type in bytes.
pub const MAX_TYPE_LEN: usize = 64;

/// Why a selector was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// No `:` separating type and value.
    #[error("selector must be `type:value`")]
    Shape,
    /// Type is empty, too long, or has characters outside `[a-z0-9_]`.
    #[error("selector type must be 1-64 characters of a-z, 0-9 and `_`")]
    Type,
    /// Value is empty.
    #[error("selector value is empty")]
    EmptyValue,
    /// Value is longer than the limit.
    #[error("selector value is longer than 1024 bytes")]
    ValueTooLong,
    /// Value has control characters or surrounding whitespace.
    #[error("selector value has control characters or leading/trailing whitespace")]
    ValueChar,
}

/// One selector.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its parts, validating both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind.is_empty()
            || kind.len() > MAX_TYPE_LEN
            || !kind
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        {
            return Err(SelectorError::Type);
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(SelectorError::ValueTooLong);
        }
        if value.chars().any(char::is_control) || value.trim() != value {
            return Err(SelectorError::ValueChar);
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Parses `type:value`; the value may itself contain `:` (e.g. `unix:uid:1000`).
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s.split_once(':').ok_or(SelectorError::Shape)?;
        Self::new(kind, value)
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        Self::parse(s)
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Selector::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A sorted, de-duplicated set of selectors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SelectorSet(Vec<Selector>);

impl SelectorSet {
    /// Builds a set, sorting and removing duplicates.
    pub fn new(mut selectors: Vec<Selector>) -> Self {
        selectors.sort();
        selectors.dedup();
        Self(selectors)
    }

    /// True if every selector of `self` is in `other`.
    pub fn is_subset_of(&self, other: &SelectorSet) -> bool {
        let mut theirs = other.0.iter();
        'outer: for mine in &self.0 {
            for t in theirs.by_ref() {
                match t.cmp(mine) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => continue 'outer,
                    std::cmp::Ordering::Greater => return false,
                }
            }
            return false;
        }
        true
    }

    /// The selectors, sorted.
    pub fn as_slice(&self) -> &[Selector] {
        &self.0
    }

    /// True if the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of selectors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Iterates in sorted order.
    pub fn iter(&self) -> std::slice::Iter<'_, Selector> {
        self.0.iter()
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> SelectorSet {
        items.iter().map(|s| Selector::parse(s).unwrap()).collect()
    }

    #[test]
    fn parses_and_validates() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!((s.kind(), s.value()), ("unix", "uid:1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        assert_eq!(Selector::parse("nocolon"), Err(SelectorError::Shape));
        assert_eq!(Selector::parse(":x"), Err(SelectorError::Type));
        assert_eq!(Selector::parse("Unix:x"), Err(SelectorError::Type));
        assert_eq!(Selector::parse("un-ix:x"), Err(SelectorError::Type));
        assert_eq!(Selector::parse("unix:"), Err(SelectorError::EmptyValue));
        assert_eq!(Selector::parse("unix:a\nb"), Err(SelectorError::ValueChar));
        assert_eq!(Selector::parse("unix: a"), Err(SelectorError::ValueChar));
        let long = format!("unix:{}", "a".repeat(MAX_VALUE_LEN + 1));
        assert_eq!(Selector::parse(&long), Err(SelectorError::ValueTooLong));
    }

    #[test]
    fn subset_matching() {
        let caller = set(&["unix:uid:1000", "unix:gid:1000", "unix:user:alice"]);
        assert!(set(&[]).is_subset_of(&caller));
        assert!(set(&["unix:uid:1000"]).is_subset_of(&caller));
        assert!(set(&["unix:user:alice", "unix:uid:1000"]).is_subset_of(&caller));
        assert!(!set(&["unix:uid:1001"]).is_subset_of(&caller));
        assert!(!set(&["unix:uid:1000", "unix:gid:0"]).is_subset_of(&caller));
        assert!(!set(&["unix:zzz:1"]).is_subset_of(&caller));
        assert!(!set(&["a:a"]).is_subset_of(&set(&[])));
        assert_eq!(set(&["a:b", "a:b"]).len(), 1);
    }
}
