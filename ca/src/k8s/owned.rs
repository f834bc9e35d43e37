//! What the identity controller keeps of the entries it owns, and how it diffs them against
//! what pods should have.
//!
//! It keeps no copy of the entries: per pod, each entry's ID, revision and a digest of the
//! fields it writes. That is what deciding "create, update or leave alone" needs, and about a
//! sixth of the memory of the entries themselves (which live in the store and, for serving,
//! are read from it).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::controller::Desired;
use crate::entries::{Entry, EntryOp, EntrySpec};

/// The digest of an entry's written fields.
type Fields = [u8; 16];

/// One owned entry as the controller remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Entry ID.
    pub id: String,
    /// Revision of its last write.
    pub revision: u64,
    fields: Fields,
}

impl Held {
    /// What is remembered of `e`.
    pub fn of(e: &Entry) -> Self {
        let selectors: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
        Self {
            id: e.id.clone(),
            revision: e.revision,
            fields: digest(
                &e.origin,
                e.spiffe_id.as_str(),
                e.parent_id.as_str(),
                &selectors,
                e.x509_svid_ttl,
                e.jwt_svid_ttl,
                &e.dns_names,
                &e.hint,
                e.admin,
            ),
        }
    }

    /// True if this entry already is what `d` wants.
    pub fn is(&self, d: &Desired) -> bool {
        self.id == d.id && self.fields == desired_fields(&d.origin, &d.spec)
    }
}

fn desired_fields(origin: &str, s: &EntrySpec) -> Fields {
    digest(
        origin,
        &s.spiffe_id,
        &s.parent_id,
        &s.selectors,
        s.x509_svid_ttl,
        s.jwt_svid_ttl,
        &s.dns_names,
        &s.hint,
        s.admin,
    )
}

#[allow(clippy::too_many_arguments)]
fn digest(
    origin: &str,
    spiffe_id: &str,
    parent_id: &str,
    selectors: &[String],
    x509_ttl: u32,
    jwt_ttl: u32,
    dns_names: &[String],
    hint: &str,
    admin: bool,
) -> Fields {
    let mut h = Sha256::new();
    // Length-prefixed, so no two field lists share an encoding.
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(origin.as_bytes());
    field(spiffe_id.as_bytes());
    field(parent_id.as_bytes());
    field(&(selectors.len() as u64).to_be_bytes());
    for s in selectors {
        field(s.as_bytes());
    }
    field(&x509_ttl.to_be_bytes());
    field(&jwt_ttl.to_be_bytes());
    field(&(dns_names.len() as u64).to_be_bytes());
    for d in dns_names {
        field(d.as_bytes());
    }
    field(hint.as_bytes());
    field(&[u8::from(admin)]);
    let mut out = [0; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

/// The owned entries, per pod UID.
#[derive(Debug, Default)]
pub struct Owned {
    pods: HashMap<String, Vec<Held>>,
    count: usize,
}

impl Owned {
    /// Remembers `e` (written for pod `uid`).
    pub fn remember(&mut self, uid: &str, e: &Entry) {
        let held = Held::of(e);
        match self.pods.get_mut(uid) {
            Some(v) => match v.iter_mut().find(|h| h.id == held.id) {
                Some(h) => *h = held,
                None => {
                    v.push(held);
                    self.count += 1;
                }
            },
            None => {
                self.pods.insert(uid.to_owned(), vec![held]);
                self.count += 1;
            }
        }
    }

    /// Forgets entry `id` of pod `uid`.
    pub fn forget(&mut self, uid: &str, id: &str) {
        if let Some(v) = self.pods.get_mut(uid) {
            let before = v.len();
            v.retain(|h| h.id != id);
            self.count -= before - v.len();
            if v.is_empty() {
                self.pods.remove(uid);
            }
        }
    }

    /// The entries of pod `uid`.
    pub fn of(&self, uid: &str) -> &[Held] {
        self.pods.get(uid).map_or(&[], Vec::as_slice)
    }

    /// Pods with at least one entry.
    pub fn pods(&self) -> impl Iterator<Item = &String> {
        self.pods.keys()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The writes that turn `current` (the entries a pod has) into `desired`. Pure.
pub fn diff(current: &[Held], desired: &[Desired]) -> Vec<EntryOp> {
    let mut ops = Vec::new();
    // Deletes first, so a slot freed by one entry can be taken by another in the same batch.
    let mut gone: Vec<&String> = current
        .iter()
        .map(|h| &h.id)
        .filter(|id| !desired.iter().any(|d| &d.id == *id))
        .collect();
    gone.sort();
    for id in gone {
        ops.push(EntryOp::Delete { id: id.clone() });
    }
    for d in desired {
        match current.iter().find(|h| h.id == d.id) {
            None => ops.push(EntryOp::Create {
                id: d.id.clone(),
                spec: d.spec.clone(),
                origin: d.origin.clone(),
            }),
            Some(h) if !h.is(d) => ops.push(EntryOp::Update {
                id: d.id.clone(),
                spec: d.spec.clone(),
                expected_revision: h.revision,
                origin: Some(d.origin.clone()),
            }),
            Some(_) => {}
        }
    }
    ops
}

/// The pod UID an owned entry belongs to (from its `k8s:pod-uid` selector).
pub fn pod_of(e: &Entry) -> String {
    e.selectors
        .iter()
        .find(|s| s.kind() == "k8s" && s.value().starts_with("pod-uid:"))
        .map(|s| s.value()["pod-uid:".len()..].to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Desired {
        Desired {
            id: "k8s-1".into(),
            origin: "k8s/c/default".into(),
            spec: EntrySpec {
                spiffe_id: "spiffe://td/ns/a/sa/b".into(),
                parent_id: "spiffe://td/ward/agent/k8s_psat/c/n1".into(),
                selectors: vec!["k8s:pod-uid:u1".into()],
                ..Default::default()
            },
        }
    }

    fn entry(d: &Desired, revision: u64) -> Entry {
        Entry {
            id: d.id.clone(),
            spiffe_id: ward_spiffe::SpiffeId::new(&d.spec.spiffe_id).unwrap(),
            parent_id: ward_spiffe::SpiffeId::new(&d.spec.parent_id).unwrap(),
            selectors: d
                .spec
                .selectors
                .iter()
                .map(|s| ward_spiffe::Selector::parse(s).unwrap())
                .collect(),
            x509_svid_ttl: d.spec.x509_svid_ttl,
            jwt_svid_ttl: d.spec.jwt_svid_ttl,
            dns_names: d.spec.dns_names.clone(),
            hint: d.spec.hint.clone(),
            admin: d.spec.admin,
            revision,
            created_at: 0,
            origin: d.origin.clone(),
        }
    }

    #[test]
    fn every_written_field_counts_and_nothing_else() {
        let d = desired();
        let held = Held::of(&entry(&d, 3));
        assert!(held.is(&d));
        type Change = Box<dyn Fn(&mut Desired)>;
        let changes: Vec<Change> = vec![
            Box::new(|d| d.origin = "k8s/c/identitypolicy/x".into()),
            Box::new(|d| d.spec.spiffe_id = "spiffe://td/other".into()),
            Box::new(|d| d.spec.parent_id = "spiffe://td/ward/agent/k8s_psat/c/n2".into()),
            Box::new(|d| d.spec.selectors.push("k8s:ns:a".into())),
            Box::new(|d| d.spec.x509_svid_ttl = 60),
            Box::new(|d| d.spec.jwt_svid_ttl = 60),
            Box::new(|d| d.spec.dns_names = vec!["a.svc".into()]),
            Box::new(|d| d.spec.hint = "h".into()),
            Box::new(|d| d.spec.admin = true),
            // Moving text between neighbouring fields is a change too.
            Box::new(|d| {
                d.spec.dns_names = vec!["ab".into()];
                d.spec.hint = String::new();
            }),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut other = d.clone();
            change(&mut other);
            assert!(!held.is(&other), "change {i} went unseen");
            assert!(Held::of(&entry(&other, 4)).is(&other), "change {i}");
        }
        let mut a = d.clone();
        a.spec.dns_names = vec!["a".into(), "b".into()];
        let mut b = d.clone();
        b.spec.dns_names = vec!["ab".into()];
        assert!(!Held::of(&entry(&a, 1)).is(&b));
    }

    #[test]
    fn remember_and_forget_keep_the_count() {
        let d = desired();
        let mut o = Owned::default();
        o.remember("u1", &entry(&d, 1));
        o.remember("u1", &entry(&d, 2));
        assert_eq!((o.len(), o.of("u1")[0].revision), (1, 2));
        let mut d2 = d.clone();
        d2.id = "k8s-2".into();
        o.remember("u1", &entry(&d2, 3));
        o.remember("u2", &entry(&d, 4));
        assert_eq!(o.len(), 3);
        o.forget("u1", "k8s-1");
        o.forget("u1", "k8s-1");
        assert_eq!((o.len(), o.of("u1").len()), (2, 1));
        o.forget("u1", "k8s-2");
        assert!(o.of("u1").is_empty());
        assert_eq!(o.pods().count(), 1);
    }
}
