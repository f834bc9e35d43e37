//! Kubernetes token checks: a TokenReview status from the API server and the claims of a
//! service-account token (offline mode), as JSON: never panics; what is accepted names a
//! service account of the allow list.
#![no_main]
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let allow = vec!["ward:ward-agent".to_owned()];
    if let Ok(st) = serde_json::from_slice::<TokenReviewStatus>(data)
        && let Ok(s) = ward_ca::k8s::psat::check_review(&st, "ward-ca", &allow)
    {
        assert_eq!(
            (s.namespace.as_str(), s.service_account.as_str()),
            ("ward", "ward-agent")
        );
    }
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        if let Ok(s) = ward_ca::k8s::psat::check_claims(
            &claims,
            "https://kubernetes.default.svc",
            "ward-ca",
            &allow,
            now,
        ) {
            assert_eq!(
                (s.namespace.as_str(), s.service_account.as_str()),
                ("ward", "ward-agent")
            );
        }
    }
});
