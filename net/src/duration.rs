//! Human-friendly durations in configuration files: `90s`, `10m`, `1h`, `1h30m`, `7d`.

use std::time::Duration;

/// The units [`parse`] accepts, for error messages.
const UNITS: &str = "accepted units: ms, s, m, h, d, e.g. 90s, 10m, 1h30m";

/// Parses `<n><unit>` sequences with units `ms`, `s`, `m`, `h`, `d`. Every error names the
/// accepted units.
pub fn parse(s: &str) -> Result<Duration, String> {
    parse_inner(s.trim()).map_err(|e| format!("{e} ({UNITS})"))
}

fn parse_inner(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("invalid duration {s:?}: expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            "" => return Err(format!("invalid duration {s:?}: missing unit")),
            other => return Err(format!("invalid duration {s:?}: unknown unit {other:?}")),
        };
        total = total.saturating_add(d);
    }
    Ok(total)
}

/// Formats a duration the way [`parse`] reads it (largest exact units).
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

/// serde adapter: `#[serde(with = "ward_net::duration::serde_str")]`.
pub mod serde_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as a string such as `1h`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    /// Deserializes from a string such as `1h`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// serde adapter for `Option<Duration>`: `#[serde(default, with = "ward_net::duration::serde_opt")]`.
pub mod serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as a string such as `1h`, or null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes from a string such as `1h`, or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::parse(&s).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        for (bad, why) in [
            ("", "empty duration"),
            ("10", "missing unit"),
            ("h", "expected a number"),
            ("5y", "unknown unit \"y\""),
            ("-5s", "expected a number"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
            assert!(
                e.ends_with("(accepted units: ms, s, m, h, d, e.g. 90s, 10m, 1h30m)"),
                "{e}"
            );
        }
    }

    #[test]
    fn round_trips() {
        for s in ["1h", "1h30m", "10m", "5s", "1d2h3m4s", "250ms"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
