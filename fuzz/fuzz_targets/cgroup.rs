//! `/proc/<pid>/cgroup` lines (pod and container of a workload): never panics; a pod UID found
//! is one the text holds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(pc) = ward_agent::k8s::parse_cgroup(s) {
        let uid = pc.pod_uid.replace('-', "_");
        assert!(
            s.contains(&pc.pod_uid) || s.contains(&uid),
            "{pc:?} not in {s:?}"
        );
    }
});
