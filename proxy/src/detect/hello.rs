//! The server name of a TLS ClientHello, read without terminating TLS (egress matches it).
//! Pure over bytes: [`server_name`] takes what has arrived so far — one or more TLS records,
//! the handshake message possibly split across them (RFC 8446 §5.1) — and says whether it is a
//! ClientHello, which name it asks for, or that more bytes are needed.

/// The largest ClientHello accepted (the handshake message, reassembled from its records).
pub const MAX_HELLO: usize = 16 * 1024;

/// What the first bytes of a TLS connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet.
    More,
    /// A ClientHello, with its `host_name` server name if it has one.
    ClientHello(Option<String>),
    /// Not a ClientHello, or a malformed one (with what is wrong).
    Invalid(&'static str),
}

/// Reads big-endian fields off a slice; `None` when it runs out.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let n = match len_bytes {
            1 => self.u8()?,
            2 => self.u16()?,
            _ => self.u24()?,
        };
        self.take(n)
    }
}

/// The handshake bytes carried by the records in `buf`, as far as they have arrived, and
/// whether a record was cut short.
fn handshake_bytes(buf: &[u8]) -> Result<(Vec<u8>, bool), &'static str> {
    let mut out = Vec::new();
    let mut r = Reader(buf);
    while !r.0.is_empty() {
        if r.0.len() < 5 {
            return Ok((out, true));
        }
        let Some(h) = r.take(5) else {
            return Ok((out, true));
        };
        if h[0] != 0x16 {
            return Err("not a TLS handshake record");
        }
        if h[1] != 0x03 {
            return Err("not a TLS record version");
        }
        let len = usize::from(h[3]) << 8 | usize::from(h[4]);
        if len == 0 || len > 16 * 1024 {
            return Err("TLS record length out of range");
        }
        match r.take(len) {
            Some(frag) => out.extend_from_slice(frag),
            None => {
                out.extend_from_slice(r.0);
                return Ok((out, true));
            }
        }
    }
    Ok((out, false))
}

/// Parses the ClientHello at the start of `buf` (raw TLS records).
pub fn server_name(buf: &[u8]) -> Hello {
    let (hs, _) = match handshake_bytes(buf) {
        Ok(x) => x,
        Err(e) => return Hello::Invalid(e),
    };
    let mut r = Reader(&hs);
    let (Some(kind), Some(len)) = (r.u8(), r.u24()) else {
        return Hello::More;
    };
    if kind != 1 {
        return Hello::Invalid("the first handshake message is not a ClientHello");
    }
    if len > MAX_HELLO {
        return Hello::Invalid("ClientHello larger than 16 KiB");
    }
    let Some(body) = r.take(len) else {
        return Hello::More;
    };
    match parse_body(body) {
        Some(x) => x,
        None => Hello::Invalid("malformed ClientHello"),
    }
}

fn parse_body(body: &[u8]) -> Option<Hello> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec(1)?; // legacy_session_id
    r.vec(2)?; // cipher_suites
    r.vec(1)?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(Hello::ClientHello(None));
    }
    let mut exts = Reader(r.vec(2)?);
    if !r.0.is_empty() {
        return None;
    }
    let mut name = None;
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec(2)?;
        if kind != 0 {
            continue;
        }
        if name.is_some() {
            return Some(Hello::Invalid("two server_name extensions"));
        }
        // server_name (RFC 6066 §3): a list of (type, name); one host_name at most.
        let mut list = Reader(data);
        let mut names = Reader(list.vec(2)?);
        if !list.0.is_empty() {
            return None;
        }
        while !names.0.is_empty() {
            let t = names.u8()?;
            let n = names.vec(2)?;
            if t != 0 {
                continue;
            }
            if name.is_some() {
                return Some(Hello::Invalid("two host names in server_name"));
            }
            let Ok(s) = std::str::from_utf8(n) else {
                return Some(Hello::Invalid("server name is not text"));
            };
            if s.is_empty() || !s.is_ascii() {
                return Some(Hello::Invalid("server name is empty or not ASCII"));
            }
            name = Some(s.to_owned());
        }
    }
    Some(Hello::ClientHello(name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A ClientHello as a real client writes it (rustls), for `name`.
    fn real_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(
            Arc::new(cfg),
            rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_name_of_a_real_client_hello_at_every_split() {
        let hello = real_hello("api.example.com");
        assert_eq!(
            server_name(&hello),
            Hello::ClientHello(Some("api.example.com".into()))
        );
        for cut in 0..hello.len() {
            assert_eq!(server_name(&hello[..cut]), Hello::More, "cut at {cut}");
        }
        // The same handshake message split over two records.
        let body = &hello[5..];
        let (a, b) = body.split_at(100);
        let mut two = Vec::new();
        for frag in [a, b] {
            two.extend_from_slice(&[0x16, 0x03, 0x01]);
            two.extend_from_slice(&(frag.len() as u16).to_be_bytes());
            two.extend_from_slice(frag);
        }
        assert_eq!(
            server_name(&two),
            Hello::ClientHello(Some("api.example.com".into()))
        );
        // No SNI (an IP address as the server name: rustls sends none).
        let ip = real_hello("192.0.2.1");
        assert_eq!(server_name(&ip), Hello::ClientHello(None));
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(
            server_name(b"GET / HTTP/1.1\r\n"),
            Hello::Invalid("not a TLS handshake record")
        );
        assert!(matches!(
            server_name(&[0x16, 0x03, 0x01, 0x00, 0x00]),
            Hello::Invalid(_)
        ));
        // A ServerHello (type 2).
        assert!(matches!(
            server_name(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]),
            Hello::Invalid(_)
        ));
        // Hand-made ClientHellos around the server_name extension.
        let sni = |name: &[u8]| {
            let mut e = vec![0x00, 0x00];
            let list_len = 3 + name.len();
            e.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
            e.extend_from_slice(&(list_len as u16).to_be_bytes());
            e.push(0);
            e.extend_from_slice(&(name.len() as u16).to_be_bytes());
            e.extend_from_slice(name);
            e
        };
        assert_eq!(
            server_name(&made(&sni(b"x.example"))),
            Hello::ClientHello(Some("x.example".into()))
        );
        let mut twice = sni(b"a.example");
        twice.extend(sni(b"b.example"));
        assert_eq!(
            server_name(&made(&twice)),
            Hello::Invalid("two server_name extensions")
        );
        assert!(matches!(server_name(&made(&sni(b""))), Hello::Invalid(_)));
        assert!(matches!(
            server_name(&made(&sni("é.example".as_bytes()))),
            Hello::Invalid(_)
        ));
        // An extension whose length runs past the message.
        let mut short = sni(b"x.example");
        short[3] += 10;
        assert_eq!(
            server_name(&made(&short)),
            Hello::Invalid("malformed ClientHello")
        );
    }

    /// A ClientHello record with these extensions.
    fn made(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }
}
