//! `ward-proxy inject` on arbitrary YAML streams: never panics; what it accepts it accepts
//! again unchanged (injection is idempotent).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ward_proxy::inject::{Options, inject};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let o = Options {
        image: "ward-proxy:fuzz".into(),
        default_policy: Default::default(),
        socket_dir: "/run/ward".into(),
        mode: Default::default(),
        egress_gateway: None,
    };
    if let Ok(out) = inject(s, &o) {
        let again = inject(&out, &o).expect("injected output is accepted again");
        assert_eq!(again, out, "injection is idempotent");
    }
});
