//! What one caller of the agent's socket may hold: at most `limits.max_streams_per_caller`
//! streams open at once (Workload API watches, SDS, destination subscriptions), so one
//! workload cannot make the agent hold unbounded state for it. A caller is its pod (the
//! `k8s:pod-uid` selector) where pods are attested, else its Unix user; over the limit a new
//! stream is refused with `RESOURCE_EXHAUSTED`, counted and logged (rate-limited, by the
//! socket's refusal log).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tonic::Status;
use ward_spiffe::SelectorSet;

/// Per-caller limits on the agent's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Streams one caller may have open at once.
    #[serde(default = "default_streams")]
    pub max_streams_per_caller: usize,
}

/// Above what one pod's proxy may hold: 4,096 destination subscriptions (the proxy's own cap)
/// plus its SVID, bundle and policy watches and the application's.
fn default_streams() -> usize {
    5_000
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_streams_per_caller: default_streams(),
        }
    }
}

/// Who a caller is, for its limits: its pod, else its user.
pub fn caller_key(selectors: &SelectorSet) -> String {
    let pick = |kind: &str, prefix: &str| {
        selectors
            .iter()
            .find(|s| s.kind() == kind && s.value().starts_with(prefix))
            .map(|s| format!("{kind}:{}", s.value()))
    };
    pick("k8s", "pod-uid:")
        .or_else(|| pick("unix", "uid:"))
        .unwrap_or_else(|| "unknown".into())
}

/// The streams each caller holds.
#[derive(Debug)]
pub struct StreamSlots {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
    refused: prometheus_client::metrics::counter::Counter,
}

/// One open stream of a caller; its place is given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<StreamSlots>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl StreamSlots {
    /// At most `max` streams per caller; refusals counted in `refused`.
    pub fn new(max: usize, refused: prometheus_client::metrics::counter::Counter) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
            refused,
        })
    }

    /// A place for one more stream of the caller with `selectors`, or why not.
    pub fn acquire(self: &Arc<Self>, selectors: &SelectorSet) -> Result<Slot, Status> {
        let key = caller_key(selectors);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            self.refused.inc();
            return Err(Status::resource_exhausted(format!(
                "caller {key} has {} streams open, the most it may (limits.max_streams_per_caller); close one first",
                self.max
            )));
        }
        *n += 1;
        Ok(Slot {
            slots: self.clone(),
            key,
        })
    }

    /// Streams open now, for `key` (tests, diagnostics).
    pub fn open(&self, key: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

/// `stream`, holding `slot` for as long as it lives.
pub fn hold<S: Stream + Send + 'static>(
    stream: S,
    slot: Slot,
) -> impl Stream<Item = S::Item> + Send {
    stream.map(move |item| {
        let _ = &slot;
        item
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sel(v: &[&str]) -> SelectorSet {
        SelectorSet::new(
            v.iter()
                .map(|s| ward_spiffe::Selector::parse(s).unwrap())
                .collect(),
        )
    }

    #[test]
    fn callers_get_their_own_streams_and_give_them_back() {
        let slots = StreamSlots::new(2, Default::default());
        let pod_a = sel(&["unix:uid:1000", "k8s:pod-uid:a"]);
        let pod_b = sel(&["unix:uid:1000", "k8s:pod-uid:b"]);
        assert_eq!(caller_key(&pod_a), "k8s:pod-uid:a");
        assert_eq!(caller_key(&sel(&["unix:uid:7"])), "unix:uid:7");
        let one = slots.acquire(&pod_a).unwrap();
        let _two = slots.acquire(&pod_a).unwrap();
        let e = slots.acquire(&pod_a).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("k8s:pod-uid:a"), "{e:?}");
        // Another pod of the same user is not affected.
        let _b = slots.acquire(&pod_b).unwrap();
        drop(one);
        assert_eq!(slots.open("k8s:pod-uid:a"), 1);
        slots.acquire(&pod_a).unwrap();
        assert_eq!(slots.refused.get(), 1);
    }
}
