//! Prefix watchers shared by the backends: after a commit, every watcher whose prefix covers a
//! touched key has its counter bumped.

use std::sync::Mutex;

use tokio::sync::watch;

use crate::Watch;

#[derive(Debug, Default)]
pub(crate) struct Notifier {
    watchers: Mutex<Vec<(Vec<u8>, watch::Sender<u64>)>>,
}

impl Notifier {
    pub(crate) fn subscribe(&self, prefix: &[u8]) -> Watch {
        let (tx, rx) = watch::channel(0);
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|(_, tx)| !tx.is_closed());
        w.push((prefix.to_vec(), tx));
        Watch(rx)
    }

    pub(crate) fn notify<'a>(&self, keys: impl Iterator<Item = &'a [u8]> + Clone) {
        let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        for (prefix, tx) in w.iter() {
            if keys.clone().any(|k| k.starts_with(prefix)) {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Wakes every watcher: for a backend that may have missed changes (a compacted watch).
    pub(crate) fn notify_all(&self) {
        let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        for (_, tx) in w.iter() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}
