//! What the proxy reads before it knows the protocol: HTTP/TCP sniffing, the TLS ClientHello's
//! server name, and PROXY protocol v2 headers — never panic; a header decoded says how many
//! bytes it took, within the input, and one encoded decodes to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ward_proxy::detect::{self, proxy_header};

fuzz_target!(|data: &[u8]| {
    let _ = detect::classify(data);
    let _ = detect::hello::server_name(data);
    if let proxy_header::Parsed::Header(a, n) = proxy_header::decode(data) {
        assert!(n <= data.len());
        let again = proxy_header::encode(&a);
        match proxy_header::decode(&again) {
            proxy_header::Parsed::Header(b, m) => {
                assert_eq!(m, again.len());
                assert_eq!(format!("{a:?}"), format!("{b:?}"));
            }
            other => panic!("an encoded header does not decode: {other:?}"),
        }
    }
});
