//! The PROXY protocol v2 header (HAProxy's published format) a sidecar writes at the start of
//! the mTLS tunnel to the egress gateway: which address the application dialled, and from
//! where. Pure encode and decode; the gateway reads it only inside an mTLS connection from an
//! authenticated peer, so it is never taken from an unauthenticated source.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// The addresses a header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// Where the connection came from.
    pub src: SocketAddr,
    /// Where it was going (the address the application dialled).
    pub dst: SocketAddr,
}

/// What the start of a stream holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet.
    More,
    /// A header, and how many bytes it took.
    Header(Addresses, usize),
    /// Not a v2 PROXY header for TCP (with what is wrong).
    Invalid(&'static str),
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it stands for, so that
/// egress rules written for IPv4 networks see one spelling of each address whichever family
/// the header used.
fn canonical(s: SocketAddr) -> SocketAddr {
    match s.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(s, |v4| SocketAddr::new(IpAddr::V4(v4), s.port())),
        IpAddr::V4(_) => s,
    }
}

/// Encodes a `PROXY` command for a TCP connection from `src` to `dst` (both of one family; an
/// IPv4-mapped IPv6 address counts as IPv4).
pub fn encode(a: &Addresses) -> Vec<u8> {
    let (src, dst) = (canonical(a.src), canonical(a.dst));
    let mut out = SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// Decodes the header at the start of `buf`; IPv4-mapped IPv6 addresses come back as IPv4.
pub fn decode(buf: &[u8]) -> Parsed {
    let n = buf.len().min(SIGNATURE.len());
    if buf[..n] != SIGNATURE[..n] {
        return Parsed::Invalid("no PROXY v2 signature");
    }
    if buf.len() < 16 {
        return Parsed::More;
    }
    if buf[12] != 0x21 {
        return Parsed::Invalid("not a v2 PROXY command");
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < 16 + len {
        return Parsed::More;
    }
    let body = &buf[16..16 + len];
    let ip4 = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
    let ip6 = |b: &[u8]| {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[..16]);
        IpAddr::from(o)
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let a = match buf[13] {
        0x11 if len >= 12 => Addresses {
            src: SocketAddr::new(ip4(&body[0..4]), port(&body[8..10])),
            dst: SocketAddr::new(ip4(&body[4..8]), port(&body[10..12])),
        },
        0x21 if len >= 36 => Addresses {
            src: canonical(SocketAddr::new(ip6(&body[0..16]), port(&body[32..34]))),
            dst: canonical(SocketAddr::new(ip6(&body[16..32]), port(&body[34..36]))),
        },
        0x11 | 0x21 => return Parsed::Invalid("PROXY header too short for its addresses"),
        _ => return Parsed::Invalid("not TCP over IPv4 or IPv6"),
    };
    Parsed::Header(a, 16 + len)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_a_header() {
        for (s, d) in [
            ("10.250.1.2:40000", "93.184.216.34:443"),
            ("[fd00::2]:40000", "[2001:db8::1]:443"),
            ("[::ffff:10.0.0.1]:1", "10.0.0.2:2"),
        ] {
            let a = Addresses {
                src: s.parse().unwrap(),
                dst: d.parse().unwrap(),
            };
            let mut bytes = encode(&a);
            let n = bytes.len();
            bytes.extend_from_slice(b"\x16\x03\x01rest");
            let Parsed::Header(got, used) = decode(&bytes) else {
                panic!("{:?}", decode(&bytes))
            };
            assert_eq!(used, n);
            // Mapped addresses come back as IPv4.
            assert_eq!(got.dst.port(), a.dst.port());
            assert_eq!(got.src.port(), a.src.port());
            if a.dst.is_ipv4() {
                assert_eq!(got.dst, a.dst);
            }
            for cut in 0..n {
                assert_eq!(decode(&bytes[..cut]), Parsed::More, "cut at {cut}");
            }
        }
        assert!(matches!(decode(b"GET / HTTP/1.1\r\n"), Parsed::Invalid(_)));
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]); // LOCAL command
        assert!(matches!(decode(&local), Parsed::Invalid(_)));
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(matches!(decode(&short), Parsed::Invalid(_)));
    }

    /// Found by fuzz/proxy_detect: an AF_INET6 header carrying IPv4-mapped addresses decoded
    /// as IPv6, so an egress rule for an IPv4 network did not see the address it names, and
    /// the header re-encoded (as AF_INET) decoded to something else.
    #[test]
    fn mapped_addresses_in_an_inet6_header_decode_as_ipv4() {
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x21, 0x00, 36]);
        let mapped = |v4: [u8; 4]| {
            let mut o = [0u8; 16];
            o[10] = 0xff;
            o[11] = 0xff;
            o[12..].copy_from_slice(&v4);
            o
        };
        bytes.extend_from_slice(&mapped([10, 0, 0, 1]));
        bytes.extend_from_slice(&mapped([93, 184, 216, 34]));
        bytes.extend_from_slice(&40000u16.to_be_bytes());
        bytes.extend_from_slice(&443u16.to_be_bytes());
        let Parsed::Header(a, n) = decode(&bytes) else {
            panic!("{:?}", decode(&bytes))
        };
        assert_eq!(n, bytes.len());
        assert_eq!(a.src, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(a.dst, "93.184.216.34:443".parse().unwrap());
        assert_eq!(decode(&encode(&a)), Parsed::Header(a, 28));
    }
}
