//! SPIFFE IDs and trust domain names, parsed strictly per the SPIFFE ID specification.
//!
//! Parsing never normalises: an ID that is not already in canonical form (lowercase scheme
//! and trust domain, no empty or dot segments, no trailing slash) is rejected, so two equal
//! strings always denote the same identity.

use std::fmt;
use std::str::FromStr;

/// Maximum length of a trust domain name in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Maximum length of a SPIFFE ID in bytes (what we accept; we never generate longer).
pub const MAX_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID or trust domain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("empty SPIFFE ID")]
    Empty,
    /// The string does not start with `spiffe://`.
    #[error("scheme is missing or not `spiffe://`")]
    Scheme,
    /// The trust domain is empty.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// A character not allowed in a trust domain.
    #[error("trust domain has {0:?}, which is not a lowercase letter, digit, `.`, `-` or `_`")]
    TrustDomainChar(char),
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// The ID is longer than 2048 bytes.
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
    /// An empty path segment (`//`).
    #[error("path has an empty segment")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path has a `.` or `..` segment")]
    DotSegment,
    /// A character not allowed in a path segment.
    #[error("path has {0:?}, which is not a letter, digit, `.`, `-` or `_`")]
    PathChar(char),
    /// The path ends with `/`.
    #[error("path has a trailing `/`")]
    TrailingSlash,
    /// The ID has no path where one is required (e.g. a workload SVID).
    #[error("SPIFFE ID has no path")]
    NoPath,
}

fn is_td_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
}

fn is_path_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_')
}

/// The first character of `s` that `ok` refuses.
fn first_bad(s: &str, ok: fn(u8) -> bool) -> Option<char> {
    s.chars().find(|c| !c.is_ascii() || !ok(*c as u8))
}

/// A trust domain name such as `example.org`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name, or a `spiffe://td` ID with no path.
    pub fn new(s: &str) -> Result<Self, IdError> {
        let name = match s.strip_prefix(SCHEME) {
            Some(rest) => rest,
            None if s.contains(':') || s.contains('/') => return Err(IdError::Scheme),
            None => s,
        };
        validate_td(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://example.org`, as used for bundle map keys.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// Builds an ID in this trust domain from path segments, validating each.
    pub fn id_from_segments<'a>(
        &self,
        segments: impl IntoIterator<Item = &'a str>,
    ) -> Result<SpiffeId, IdError> {
        let mut s = self.id_string();
        for seg in segments {
            if seg.contains('/') {
                return Err(IdError::PathChar('/'));
            }
            s.push('/');
            s.push_str(seg);
        }
        SpiffeId::new(&s)
    }
}

fn validate_td(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    if let Some(c) = first_bad(name, is_td_char) {
        return Err(IdError::TrustDomainChar(c));
    }
    Ok(())
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain><path>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    full: String,
    td_end: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_td(td)?;
        validate_path(path)?;
        Ok(Self {
            full: s.to_owned(),
            td_end: SCHEME.len() + td.len(),
        })
    }

    /// Parses an ID and requires a non-empty path (workload and agent IDs).
    pub fn new_with_path(s: &str) -> Result<Self, IdError> {
        let id = Self::new(s)?;
        if id.path().is_empty() {
            return Err(IdError::NoPath);
        }
        Ok(id)
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The trust domain name without allocating.
    pub fn trust_domain_name(&self) -> &str {
        &self.full[SCHEME.len()..self.td_end]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.td_end..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// True if this ID is in trust domain `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name()
    }
}

fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(IdError::TrailingSlash);
    }
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err(IdError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(c) = first_bad(seg, is_path_char) {
            return Err(IdError::PathChar(c));
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/ns/default/sa/web",
            "spiffe://a-b_c.9/x.y-z_1/A",
        ] {
            let id = SpiffeId::new(s).unwrap();
            assert_eq!(id.as_str(), s);
        }
        let id = SpiffeId::new("spiffe://td/a/b").unwrap();
        assert_eq!(id.trust_domain_name(), "td");
        assert_eq!(id.path(), "/a/b");
    }

    #[test]
    fn rejects_invalid_ids() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://example.org/a", IdError::Scheme),
            ("SPIFFE://example.org/a", IdError::Scheme),
            ("spiffe://", IdError::MissingTrustDomain),
            ("spiffe:///a", IdError::MissingTrustDomain),
            ("spiffe://Example.org/a", IdError::TrustDomainChar('E')),
            ("spiffe://ex:8080/a", IdError::TrustDomainChar(':')),
            ("spiffe://user@ex/a", IdError::TrustDomainChar('@')),
            ("spiffe://é.org/a", IdError::TrustDomainChar('é')),
            ("spiffe://ex/a//b", IdError::EmptySegment),
            ("spiffe://ex/a/./b", IdError::DotSegment),
            ("spiffe://ex/a/..", IdError::DotSegment),
            ("spiffe://ex/a/", IdError::TrailingSlash),
            ("spiffe://ex/", IdError::TrailingSlash),
            ("spiffe://ex/a%20b", IdError::PathChar('%')),
            ("spiffe://ex/a?b", IdError::PathChar('?')),
            ("spiffe://ex/a#b", IdError::PathChar('#')),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::new(s).unwrap_err(), *want, "{s}");
        }
        let long_td = format!("spiffe://{}", "a".repeat(256));
        assert_eq!(
            SpiffeId::new(&long_td).unwrap_err(),
            IdError::TrustDomainTooLong
        );
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        assert_eq!(SpiffeId::new(&long).unwrap_err(), IdError::TooLong);
        assert_eq!(
            SpiffeId::new_with_path("spiffe://td").unwrap_err(),
            IdError::NoPath
        );
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::new("example.org").unwrap().name(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().name(),
            "example.org"
        );
        assert!(TrustDomain::new("spiffe://example.org/x").is_err());
        assert!(TrustDomain::new("example.org/x").is_err());
        assert!(TrustDomain::new("").is_err());
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(td.id_string(), "spiffe://td");
        assert_eq!(
            td.id_from_segments(["a", "b"]).unwrap().as_str(),
            "spiffe://td/a/b"
        );
        assert!(td.id_from_segments(["a/.."]).is_err());
        // A segment must be one segment, even when the joined path would be valid.
        assert!(td.id_from_segments(["a/b"]).is_err());
    }
}
