//! `ward-proxy log verify` on arbitrary file contents (a log someone may have edited): never
//! panics; a report that finds nothing broken read every line, and a log it calls closed
//! ends in a signed anchor with nothing unproven.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = ward_proxy::access_log::verify_lines(data, None) else {
        return;
    };
    if r.broken.is_none() {
        let lines = data.split(|b| *b == b'\n').count() - usize::from(data.ends_with(b"\n"));
        assert_eq!(r.lines, lines as u64, "{r:?}");
        assert!(r.unproven <= r.lines);
        if r.closed {
            assert!(r.signed_anchors > 0 && r.unproven == 0, "{r:?}");
        }
    }
});
