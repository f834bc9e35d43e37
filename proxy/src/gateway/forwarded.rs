//! The forwarding headers the gateway sends on: whatever the client sent in `Forwarded`,
//! `X-Forwarded-*` and `X-Real-IP` is dropped (a client could otherwise claim any address), and
//! the gateway's own view — the connection's address, the scheme and the host asked for — is set
//! in both the standard (RFC 7239) and the de facto forms.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderValue};

/// Headers a client may not set.
const SPOOFABLE: [&str; 6] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "forwarded",
];

/// Replaces the forwarding headers of a request from `client` over `proto` for `host`.
pub fn set(h: &mut HeaderMap, client: IpAddr, proto: &'static str, host: Option<&str>) {
    for n in SPOOFABLE {
        h.remove(n);
    }
    let client = client.to_canonical();
    if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    let node = match client {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("\"[{a}]\""),
    };
    let mut fwd = format!("for={node};proto={proto}");
    if let Some(host) = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    }) {
        if let Ok(v) = HeaderValue::from_str(host) {
            h.insert("x-forwarded-host", v);
        }
        fwd.push_str(&format!(";host=\"{host}\""));
    }
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        h.insert(FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn client_copies_are_replaced_by_what_the_gateway_saw() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.insert("x-real-ip", HeaderValue::from_static("10.0.0.1"));
        h.insert("forwarded", HeaderValue::from_static("for=10.0.0.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        set(
            &mut h,
            "203.0.113.7".parse().unwrap(),
            "https",
            Some("shop.example.com"),
        );
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["203.0.113.7"]
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.7;proto=https;host=\"shop.example.com\""
        );
        assert!(h.get("x-real-ip").is_none());
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn ipv6_is_quoted_and_mapped_ipv4_unmapped() {
        let mut h = HeaderMap::new();
        set(&mut h, "2001:db8::7".parse().unwrap(), "http", None);
        assert_eq!(h["forwarded"], "for=\"[2001:db8::7]\";proto=http");
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
        set(&mut h, "::ffff:198.51.100.1".parse().unwrap(), "http", None);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1");
        assert!(h.get("x-forwarded-host").is_none());
    }
}
