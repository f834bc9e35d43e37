//! Leadership of a named singleton among the processes that share a store ([`Store::elect`]).
//!
//! On an embedded store there is one process, which leads at once. On etcd, candidates race to
//! create `leader/<name>` bound to a lease they keep alive; the holder leads until it stops
//! renewing (it dies, or loses the cluster), and then the key vanishes with the lease and
//! another candidate takes it. A leader that cannot renew steps down *before* its lease can
//! have expired, and every store write of singleton work carries [`Leadership::fence`], a
//! condition that holds only while the key still names this candidate: a deposed leader
//! that has not noticed yet still cannot clobber what its successor writes.

use tokio::sync::watch;

use crate::Condition;

/// Where leadership of `name` is recorded (under the store's own key space).
pub fn leader_key(name: &str) -> Vec<u8> {
    format!("leader/{name}").into_bytes()
}

/// This process's standing in one election.
#[derive(Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    fence: Condition,
    _campaign: Option<AbortOnDrop>,
    /// The sole leader's sender, kept so the channel stays open.
    _sole: Option<watch::Sender<bool>>,
    resign: Option<watch::Sender<bool>>,
}

#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Leadership {
    /// The only process: leads for ever; the fence is a key nobody writes.
    pub(crate) fn sole(name: &str) -> Self {
        let (tx, rx) = watch::channel(true);
        Self {
            rx,
            fence: Condition {
                key: leader_key(name),
                expected: None,
            },
            _campaign: None,
            _sole: Some(tx),
            resign: None,
        }
    }

    pub(crate) fn campaigning(
        name: &str,
        candidate: &str,
        rx: watch::Receiver<bool>,
        resign: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self {
            rx,
            fence: Condition {
                key: leader_key(name),
                expected: Some(candidate.as_bytes().to_vec()),
            },
            _campaign: Some(AbortOnDrop(task)),
            _sole: None,
            resign: Some(resign),
        }
    }

    /// Whether this process leads now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Follows the standing (true while leading). Dropping the [`Leadership`] ends the
    /// campaign: the receiver then reports a closed channel.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// Steps down and gives the lease back, so another candidate leads at once rather than
    /// after the lease lapses (a clean shutdown). Waits until it is done, at most 2 s.
    pub async fn resign(&self) {
        if let Some(r) = &self.resign {
            let _ = r.send(true);
            let mut rx = self.rx.clone();
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), rx.wait_for(|l| !*l)).await;
            // The lease revoke follows the step-down; give it a moment.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// A batch condition that holds only while this process leads.
    pub fn fence(&self) -> Condition {
        self.fence.clone()
    }
}
