//! What the agent knows: the entries it may serve, the workload SVIDs it holds for them, and
//! the bundle. Readers get immutable [`Snapshot`]s over a `watch` channel; the sync loop and the
//! SVID manager are the only writers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use ward_proto::types;
use ward_spiffe::{Bundle, SelectorSet, SpiffeId};
use zeroize::Zeroizing;

/// An entry the agent serves, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedEntry {
    /// Entry ID.
    pub id: String,
    /// SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Selectors a caller must all have.
    pub selectors: SelectorSet,
    /// DNS names (informational; the CA puts them in the certificate).
    pub dns_names: Vec<String>,
    /// Hint.
    pub hint: String,
    /// CA revision of the entry.
    pub revision: u64,
}

impl CachedEntry {
    /// Parses an entry message; `None` if the CA sent something invalid.
    pub fn from_proto(e: &types::Entry) -> Option<Self> {
        let spiffe_id = SpiffeId::new_with_path(&e.spiffe_id).ok()?;
        let selectors = e
            .selectors
            .iter()
            .map(|s| ward_spiffe::Selector::parse(s).ok())
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            id: e.id.clone(),
            spiffe_id,
            selectors: SelectorSet::new(selectors),
            dns_names: e.dns_names.clone(),
            hint: e.hint.clone(),
            revision: e.revision,
        })
    }
}

/// A workload X.509-SVID held for an entry.
#[derive(Clone)]
pub struct WorkloadSvid {
    /// Entry it was issued for.
    pub entry_id: String,
    /// Entry revision it was issued for.
    pub entry_revision: u64,
    /// SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 private key (generated here; never left this node).
    pub key: Arc<Zeroizing<Vec<u8>>>,
    /// Validity start.
    pub not_before: SystemTime,
    /// Expiry.
    pub not_after: SystemTime,
    /// When the manager replaces it.
    pub rotate_at: SystemTime,
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// When to rotate an SVID received at `received` and expiring at `not_after`: at half its
/// remaining life, moved by `jitter` (a fraction in `[-0.1, 0.1]` of that life). Timed from
/// receipt rather than NotBefore because the CA backdates NotBefore for clock skew, which would
/// pull the rotation of short-lived SVIDs forward. Pure.
pub fn rotation_time(received: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let life = not_after.duration_since(received).unwrap_or(Duration::ZERO);
    let f = (0.5 + jitter.clamp(-0.1, 0.1)).max(0.0);
    received + life.mul_f64(f)
}

/// Authorities the CA tainted: everything they signed is replaced at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taints {
    /// DER SubjectPublicKeyInfo of the tainted X.509 signing keys.
    pub x509_keys: Vec<Vec<u8>>,
    /// Key IDs of the tainted JWT authorities.
    pub jwt_key_ids: Vec<String>,
}

impl Taints {
    /// True if a tainted key signed the leaf of `chain` (leaf first). With an intermediate in
    /// the chain its key is compared; a leaf signed directly by a root is checked against each
    /// tainted key's signature.
    pub fn taints_chain<C: AsRef<[u8]>>(&self, chain: &[C]) -> bool {
        if self.x509_keys.is_empty() {
            return false;
        }
        let Some(leaf) = chain.first() else {
            return false;
        };
        match chain.get(1) {
            Some(issuer) => ward_spiffe::x509::spki_der(issuer.as_ref())
                .is_ok_and(|k| self.x509_keys.contains(&k)),
            None => self
                .x509_keys
                .iter()
                .any(|k| ward_spiffe::x509::signed_by(leaf.as_ref(), k)),
        }
    }
}

/// One consistent view of the cache.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Entries by ID.
    pub entries: HashMap<String, Arc<CachedEntry>>,
    /// SVIDs by entry ID.
    pub svids: HashMap<String, Arc<WorkloadSvid>>,
    /// The trust domain's bundle.
    pub bundle: Option<Arc<Bundle>>,
    /// Last CA revision applied.
    pub revision: u64,
    /// True once a first sync update was applied.
    pub synced: bool,
    /// Authorization policies from the CA.
    pub policies: Arc<ward_spiffe::policy::PolicySet>,
    /// Tainted authorities, as of the last bundle.
    pub taints: Arc<Taints>,
    /// Mesh services from the CA.
    pub services: Arc<crate::destinations::ServiceIndex>,
    /// The mesh's egress configuration from the CA (checked when it arrived), as sent on to
    /// local proxies.
    pub egress: Option<Arc<ward_proto::types::EgressConfig>>,
}

impl Snapshot {
    /// The SVID held for `e`, only if it was issued for the entry as it is now (same revision,
    /// so same SPIFFE ID and selectors): after an update, the SVID of the old version must not
    /// reach callers the new version entitles.
    pub fn current_svid(&self, e: &CachedEntry) -> Option<&Arc<WorkloadSvid>> {
        self.svids
            .get(&e.id)
            .filter(|s| s.entry_revision == e.revision && s.spiffe_id == e.spiffe_id)
    }

    /// Entries whose selectors are all among `selectors`, in a stable order.
    pub fn matching(&self, selectors: &SelectorSet) -> Vec<Arc<CachedEntry>> {
        let mut v: Vec<_> = self
            .entries
            .values()
            .filter(|e| e.selectors.is_subset_of(selectors))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.id.cmp(&b.id)));
        v
    }
}

/// The cache: a mutable state behind a lock, published as snapshots.
#[derive(Debug)]
pub struct Cache {
    state: Mutex<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Self {
            state: Mutex::new(Snapshot::default()),
            tx,
        }
    }

    /// Subscribes to snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Applies `f` to the state and publishes the result.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        // SVIDs of entries that are gone go with them.
        let entries = &s.entries;
        let keep: Vec<String> = s
            .svids
            .keys()
            .filter(|k| entries.contains_key(*k))
            .cloned()
            .collect();
        s.svids.retain(|k, _| keep.contains(k));
        self.tx.send_replace(Arc::new(s.clone()));
    }
}

/// Values for the agent's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An entry `id` for `spiffe://td/<id>` requiring `selectors`, at `revision`.
    pub(crate) fn entry(id: &str, selectors: &[&str], revision: u64) -> Arc<CachedEntry> {
        Arc::new(CachedEntry {
            id: id.into(),
            spiffe_id: SpiffeId::new(&format!("spiffe://td/{id}")).unwrap(),
            selectors: selectors
                .iter()
                .map(|s| ward_spiffe::Selector::parse(s).unwrap())
                .collect(),
            dns_names: vec![],
            hint: String::new(),
            revision,
        })
    }

    /// An SVID issued for `e` as it is now, with `chain` and key `<id>-key`, rotating at
    /// `rotate_at`.
    pub(crate) fn svid(
        e: &CachedEntry,
        chain: Vec<Vec<u8>>,
        rotate_at: SystemTime,
    ) -> Arc<WorkloadSvid> {
        Arc::new(WorkloadSvid {
            entry_id: e.id.clone(),
            entry_revision: e.revision,
            spiffe_id: e.spiffe_id.clone(),
            chain,
            key: Arc::new(Zeroizing::new(format!("{}-key", e.id).into_bytes())),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: rotate_at + Duration::from_secs(3600),
            rotate_at,
        })
    }

    /// `selectors` as a caller's set.
    pub(crate) fn caller(selectors: &[&str]) -> SelectorSet {
        selectors
            .iter()
            .map(|s| ward_spiffe::Selector::parse(s).unwrap())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_at_half_life_with_bounded_jitter() {
        let nb = SystemTime::UNIX_EPOCH;
        let na = nb + Duration::from_secs(1000);
        assert_eq!(rotation_time(nb, na, 0.0), nb + Duration::from_secs(500));
        assert_eq!(rotation_time(nb, na, 0.1), nb + Duration::from_secs(600));
        assert_eq!(rotation_time(nb, na, -0.5), nb + Duration::from_secs(400));
        assert_eq!(rotation_time(na, nb, 0.0), na);
    }

    fn ca(name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, Vec<u8>) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_owned());
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        (rcgen::Issuer::new(p, key), der)
    }

    fn leaf(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) -> Vec<u8> {
        let p = rcgen::CertificateParams::new(vec!["w".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        p.signed_by(&key, issuer).unwrap().der().to_vec()
    }

    #[test]
    fn taints_find_the_signer_by_signature_or_intermediate_key() {
        let (r1, r1_der) = ca("one");
        let (r2, r2_der) = ca("two");
        let spki = |d: &[u8]| ward_spiffe::x509::spki_der(d).unwrap();
        let l1 = leaf(&r1);
        let t1 = Taints {
            x509_keys: vec![spki(&r1_der)],
            jwt_key_ids: vec![],
        };
        let t2 = Taints {
            x509_keys: vec![spki(&r2_der)],
            jwt_key_ids: vec![],
        };
        assert!(t1.taints_chain(std::slice::from_ref(&l1)));
        assert!(!t2.taints_chain(std::slice::from_ref(&l1)));
        assert!(!Taints::default().taints_chain(std::slice::from_ref(&l1)));
        assert!(!t1.taints_chain::<Vec<u8>>(&[]));
        // With an intermediate, its key decides.
        let l2 = leaf(&r2);
        assert!(t2.taints_chain(&[l2.clone(), r2_der.clone()]));
        assert!(!t1.taints_chain(&[l2, r2_der]));
        // Garbage is never "signed by" anything.
        assert!(!t1.taints_chain(&[b"junk".to_vec()]));
    }

    #[test]
    fn an_svid_of_an_older_entry_version_is_not_served() {
        let entry = |rev: u64, id: &str| CachedEntry {
            id: "e".into(),
            spiffe_id: SpiffeId::new(id).unwrap(),
            selectors: SelectorSet::new(vec![]),
            dns_names: vec![],
            hint: String::new(),
            revision: rev,
        };
        let mut s = Snapshot::default();
        s.svids.insert(
            "e".into(),
            Arc::new(WorkloadSvid {
                entry_id: "e".into(),
                entry_revision: 1,
                spiffe_id: SpiffeId::new("spiffe://td/admin").unwrap(),
                chain: vec![],
                key: Arc::new(Zeroizing::new(vec![])),
                not_before: SystemTime::UNIX_EPOCH,
                not_after: SystemTime::UNIX_EPOCH,
                rotate_at: SystemTime::UNIX_EPOCH,
            }),
        );
        assert!(s.current_svid(&entry(1, "spiffe://td/admin")).is_some());
        // Updated entry (new revision, new ID, maybe new selectors): not until re-issued.
        assert!(s.current_svid(&entry(2, "spiffe://td/guest")).is_none());
        assert!(s.current_svid(&entry(2, "spiffe://td/admin")).is_none());
    }

    #[test]
    fn matching_is_subset_based() {
        let mk = |id: &str, sel: &[&str]| {
            Arc::new(CachedEntry {
                id: id.into(),
                spiffe_id: SpiffeId::new(&format!("spiffe://td/{id}")).unwrap(),
                selectors: sel
                    .iter()
                    .map(|s| ward_spiffe::Selector::parse(s).unwrap())
                    .collect(),
                dns_names: vec![],
                hint: String::new(),
                revision: 1,
            })
        };
        let mut s = Snapshot::default();
        s.entries.insert("a".into(), mk("a", &["unix:uid:1"]));
        s.entries
            .insert("b".into(), mk("b", &["unix:uid:1", "unix:gid:2"]));
        s.entries.insert("c".into(), mk("c", &["unix:uid:2"]));
        let caller: SelectorSet = ["unix:uid:1", "unix:gid:2", "unix:user:x"]
            .iter()
            .map(|s| ward_spiffe::Selector::parse(s).unwrap())
            .collect();
        let ids: Vec<_> = s.matching(&caller).iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, vec!["a", "b"]);
    }
}
