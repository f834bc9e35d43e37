//! Rate limiting for log lines a peer can cause (refusals, protocol errors): an operator sees
//! the first lines of each kind with their reasons, a flood cannot fill the disk, and the next
//! line that gets through says how many like it were held back.
//!
//! Fixed windows: per window, at most `per_key` lines for one key and `total` lines in all.
//! The decision is a plain function of the state and the `now` passed in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many distinct keys are tracked per window; lines of further keys share the
/// overflow count.
const MAX_KEYS: usize = 256;

#[derive(Debug, Default)]
struct State {
    start: Option<Instant>,
    total: u32,
    keys: HashMap<String, Counts>,
    overflow: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    emitted: u32,
    suppressed: u64,
}

/// A limiter for one family of log lines.
#[derive(Debug)]
pub struct LogLimiter {
    window: Duration,
    per_key: u32,
    total: u32,
    state: Mutex<State>,
}

impl LogLimiter {
    /// At most `per_key` lines per key and `total` lines in all per `window`.
    pub fn new(window: Duration, per_key: u32, total: u32) -> Self {
        Self {
            window,
            per_key,
            total,
            state: Mutex::new(State::default()),
        }
    }

    /// The default for refusal and protocol-error lines: 3 per key and 20 in all per 10 s.
    pub fn for_refusals() -> Self {
        Self::new(Duration::from_secs(10), 3, 20)
    }

    /// Whether a line for `key` may be written now: `Some(n)` with the number of lines of this
    /// key (and of keys that did not fit the table) held back since the last one written.
    pub fn admit(&self, key: &str) -> Option<u64> {
        self.admit_at(key, Instant::now())
    }

    /// [`admit`](Self::admit) at a given instant.
    pub fn admit_at(&self, key: &str, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let rolled = match s.start {
            Some(start) => now.saturating_duration_since(start) >= self.window,
            None => true,
        };
        if rolled {
            s.start = Some(now);
            s.total = 0;
            // Keys with held-back lines keep their count for their next line.
            s.keys.retain(|_, c| {
                c.emitted = 0;
                c.suppressed > 0
            });
        }
        let full = s.keys.len() >= MAX_KEYS && !s.keys.contains_key(key);
        if full {
            if s.total < self.total {
                s.total += 1;
                return Some(std::mem::take(&mut s.overflow));
            }
            s.overflow += 1;
            return None;
        }
        let (per_key, total_left) = (self.per_key, s.total < self.total);
        let c = s.keys.entry(key.to_owned()).or_default();
        if c.emitted < per_key && total_left {
            c.emitted += 1;
            let n = std::mem::take(&mut c.suppressed);
            s.total += 1;
            Some(n + std::mem::take(&mut s.overflow))
        } else {
            c.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key_and_in_all_and_reports_what_was_held_back() {
        let l = LogLimiter::new(Duration::from_secs(10), 2, 3);
        let t0 = Instant::now();
        assert_eq!(l.admit_at("a", t0), Some(0));
        assert_eq!(l.admit_at("a", t0), Some(0));
        assert_eq!(l.admit_at("a", t0), None);
        assert_eq!(l.admit_at("a", t0), None);
        assert_eq!(l.admit_at("b", t0), Some(0));
        // The window's total is spent: even a new key waits.
        assert_eq!(l.admit_at("c", t0), None);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(l.admit_at("a", t1), Some(2));
        assert_eq!(l.admit_at("c", t1), Some(1));
        assert_eq!(l.admit_at("b", t1), Some(0));
    }

    #[test]
    fn a_flood_writes_a_bounded_number_of_lines() {
        let l = LogLimiter::for_refusals();
        let t0 = Instant::now();
        let mut written = 0;
        for i in 0..10_000u64 {
            let at = t0 + Duration::from_millis(i); // 1,000 per second for 10 s
            if l.admit_at(&format!("peer-{}", i % 500), at).is_some() {
                written += 1;
            }
        }
        assert_eq!(written, 20);
        // More keys than the table holds share the overflow count.
        let l = LogLimiter::new(Duration::from_secs(10), 1, 1000);
        for i in 0..MAX_KEYS {
            assert!(l.admit_at(&i.to_string(), t0).is_some());
        }
        assert_eq!(l.admit_at("new", t0), Some(0));
    }
}
