//! Request path normalization for authorization: what is matched is what the application sees.
//!
//! Unreserved characters that arrive percent-encoded are decoded, other escapes are kept with
//! uppercase hex, repeated slashes are merged and `.`/`..` segments resolved. Anything
//! ambiguous — an encoded `/` or `\`, a raw `\`, a malformed escape, a control character, a
//! `..` above the root — is an error: the request is denied rather than guessed at.

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F` or `%5C`: a separator hidden from routing.
    #[error("encoded '/' or '\\' in path")]
    EncodedSeparator,
    /// A raw backslash, which some servers treat as a separator.
    #[error("backslash in path")]
    Backslash,
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding in path")]
    BadEscape,
    /// A control character, raw or encoded, or a non-ASCII byte.
    #[error("control or non-ASCII character in path")]
    BadChar,
    /// `..` would climb above `/`.
    #[error("path escapes the root")]
    AboveRoot,
    /// A raw `;`: path parameters that some servers strip before routing (`/admin;x/`).
    #[error("path parameter (';') in path")]
    PathParameter,
    /// The path does not start with `/`.
    #[error("path is not absolute")]
    NotAbsolute,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes the path part of a request target (without the query). `*` (the OPTIONS
/// asterisk form) is returned unchanged.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if path == "*" {
        return Ok("*".into());
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Decode unreserved escapes, canonicalize the others, refuse the dangerous ones.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (h, l) = match (
                    bytes.get(i + 1).and_then(|c| hex(*c)),
                    bytes.get(i + 2).and_then(|c| hex(*c)),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let v = h * 16 + l;
                if v == b'/' || v == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if v < 0x20 || v == 0x7f {
                    return Err(PathError::BadChar);
                }
                if unreserved(v) {
                    decoded.push(v as char);
                } else {
                    decoded.push_str(&format!("%{v:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter),
            b if !(0x20..0x7f).contains(&b) => return Err(PathError::BadChar),
            _ => {
                decoded.push(b as char);
                i += 1;
            }
        }
    }
    // 2. Merge slashes and resolve dot segments.
    let trailing = decoded.len() > 1 && decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    let ends_in_dot = decoded.ends_with("/.") || decoded.ends_with("/..");
    if norm.is_empty() || ((trailing || ends_in_dot) && !out.is_empty()) {
        norm.push('/');
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_table() {
        let ok = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a//b", "/a/b"),
            ("//a///b//", "/a/b/"),
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/%61%62c", "/abc"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E%2e/%2e/b", "/b"),
            ("/x%20y", "/x%20y"),
            ("/x%3a", "/x%3A"),
            ("/a%3bb", "/a%3Bb"),
            ("/%7euser", "/~user"),
            ("/admin/", "/admin/"),
            ("*", "*"),
        ];
        for (raw, want) in ok {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
        let bad = [
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::Backslash),
            ("/admin;x/users", PathError::PathParameter),
            ("/a%zz", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("/a%00b", PathError::BadChar),
            ("/a\u{7f}", PathError::BadChar),
            ("/é", PathError::BadChar),
            ("/..", PathError::AboveRoot),
            ("/a/../../b", PathError::AboveRoot),
            ("/%2e%2e/etc", PathError::AboveRoot),
            ("a/b", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ];
        for (raw, want) in bad {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }
}
