//! The balance stage: which endpoint of a destination gets the next request (HTTP) or
//! connection (TCP). Power of two choices over a peak-EWMA latency estimate times the requests
//! in flight (Linkerd's balancer), or round-robin (a config switch, the benchmark's baseline);
//! failure accrual ejects an endpoint after consecutive failures, with a growing back-off;
//! draining (terminating) endpoints are used only when nothing else is.
//!
//! The choice is a plain function of the endpoints' state, `now` and a random source.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ward_spiffe::SpiffeId;

/// The estimate before any response was seen (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast the estimate forgets (Linkerd's default decay).
pub const DECAY: Duration = Duration::from_secs(10);
/// Consecutive failures that eject an endpoint.
pub const FAILURES_TO_EJECT: u32 = 3;
/// First ejection; doubles on every further one, up to [`MAX_EJECTION`].
pub const MIN_EJECTION: Duration = Duration::from_secs(1);
/// Longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(30);
/// What a failure counts as in the latency estimate, so a failing endpoint loses the choice
/// before failure accrual ejects it.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// How a destination's endpoints are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    /// Power of two choices over peak-EWMA load.
    #[default]
    P2c,
    /// In turn (the baseline).
    RoundRobin,
}

/// Peak-EWMA: the latest latency when it is above the average, an exponentially decaying
/// average otherwise.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    cost_ns: f64,
    stamp: Instant,
    samples: u32,
}

impl PeakEwma {
    /// A new estimate at `now`, starting from `initial` (the default, or what the
    /// destination's other endpoints cost, so a new endpoint gets its share at once).
    pub fn new(now: Instant, initial: Duration) -> Self {
        Self {
            cost_ns: initial.as_nanos() as f64,
            stamp: now,
            samples: 0,
        }
    }

    /// Records `rtt` at `now`. The first response is not counted: it paid for the new
    /// connection's TCP and TLS handshakes, which say nothing about the endpoint's load. The
    /// second replaces the starting estimate; after that a peak is taken at once and a lower
    /// value pulls the estimate toward it by how much time passed since the last update
    /// (tower's and Linkerd's rule).
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        if !rtt.is_zero() && self.samples < 2 {
            self.samples += 1;
            if self.samples == 2 {
                self.cost_ns = rtt.as_nanos() as f64;
            }
            self.stamp = self.stamp.max(now);
            return;
        }
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.cost_ns {
            self.cost_ns = rtt;
        } else {
            let dt = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let decay = (-dt / DECAY.as_nanos() as f64).exp();
            self.cost_ns = self.cost_ns * decay + rtt * (1.0 - decay);
        }
        self.stamp = self.stamp.max(now);
    }

    /// The estimate at `now`, in nanoseconds: it decays toward zero while nothing is observed,
    /// so an endpoint that was slow once gets tried again. Before the first response it is the
    /// default.
    pub fn cost(&mut self, now: Instant) -> f64 {
        if self.samples >= 2 {
            self.observe(Duration::ZERO, now);
        }
        self.cost_ns
    }
}

#[derive(Debug)]
struct Health {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// One endpoint and what the balancer knows about it; kept across destination updates for as
/// long as the endpoint stays listed.
#[derive(Debug)]
pub struct EndpointState {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `addr` as text (the pool key).
    pub addr_text: String,
    /// IDs it must present.
    pub ids: Vec<SpiffeId>,
    /// Pod name, for logs.
    pub pod: Option<String>,
    draining: std::sync::atomic::AtomicBool,
    ewma: Mutex<PeakEwma>,
    pending: AtomicU32,
    health: Mutex<Health>,
}

impl EndpointState {
    /// A fresh endpoint whose latency estimate starts at `initial`.
    pub fn new(
        addr: SocketAddr,
        ids: Vec<SpiffeId>,
        pod: Option<String>,
        now: Instant,
        initial: Duration,
    ) -> Self {
        Self {
            addr,
            addr_text: addr.to_string(),
            ids,
            pod,
            draining: false.into(),
            ewma: Mutex::new(PeakEwma::new(now, initial)),
            pending: AtomicU32::new(0),
            health: Mutex::new(Health {
                consecutive_failures: 0,
                ejections: 0,
                ejected_until: None,
            }),
        }
    }

    /// Marks it draining (terminating) or not.
    pub fn set_draining(&self, d: bool) {
        self.draining.store(d, Ordering::Relaxed);
    }

    /// Whether it is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Load: latency estimate × (requests in flight + 1).
    pub fn load(&self, now: Instant) -> f64 {
        let c = self
            .ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cost(now);
        c * f64::from(self.pending.load(Ordering::Relaxed) + 1)
    }

    /// The current latency estimate, in nanoseconds (metrics, admin view).
    pub fn ewma_ns(&self, now: Instant) -> f64 {
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cost(now)
    }

    /// Requests in flight.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Consecutive failures so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .consecutive_failures
    }

    /// Whether failure accrual has it out of rotation at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ejected_until
            .is_some_and(|t| now < t)
    }

    /// Starts a request: counted in flight until the guard is dropped.
    pub fn start(self: &std::sync::Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records a response (any status) after `rtt`.
    pub fn succeeded(&self, rtt: Duration, now: Instant) {
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(rtt, now);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.consecutive_failures = 0;
        if h.ejected_until.is_some_and(|t| now >= t) {
            h.ejected_until = None;
            h.ejections = 0;
        }
    }

    /// Records a failure (no connection, no response); returns true when this ejected it.
    pub fn failed(&self, now: Instant) -> bool {
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(FAILURE_PENALTY, now);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.consecutive_failures += 1;
        if h.consecutive_failures < FAILURES_TO_EJECT || h.ejected_until.is_some_and(|t| now < t) {
            return false;
        }
        let backoff = MIN_EJECTION
            .saturating_mul(1 << h.ejections.min(5))
            .min(MAX_EJECTION);
        h.ejections += 1;
        h.ejected_until = Some(now + backoff);
        h.consecutive_failures = 0;
        true
    }
}

/// A request in flight on an endpoint.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints a choice may take: not ejected and not draining; if none, the draining ones;
/// if none, every endpoint (an all-ejected set still gets tried rather than failing fast).
fn eligible(
    eps: &[std::sync::Arc<EndpointState>],
    now: Instant,
    skip: &[SocketAddr],
) -> Vec<usize> {
    let usable = |e: &EndpointState| !skip.contains(&e.addr);
    let mut v: Vec<usize> = (0..eps.len())
        .filter(|&i| usable(&eps[i]) && !eps[i].ejected(now) && !eps[i].draining())
        .collect();
    if v.is_empty() {
        v = (0..eps.len())
            .filter(|&i| usable(&eps[i]) && !eps[i].ejected(now))
            .collect();
    }
    if v.is_empty() {
        v = (0..eps.len()).filter(|&i| usable(&eps[i])).collect();
    }
    v
}

/// Picks an endpoint, leaving out `skip` (endpoints a retry already tried). `rand` gives
/// uniform indices below its argument; `turn` is the round-robin counter.
pub fn pick(
    how: Balancer,
    eps: &[std::sync::Arc<EndpointState>],
    now: Instant,
    skip: &[SocketAddr],
    turn: &AtomicUsize,
    rand: &mut dyn FnMut(usize) -> usize,
) -> Option<usize> {
    let v = eligible(eps, now, skip);
    match (how, v.len()) {
        (_, 0) => None,
        (_, 1) => Some(v[0]),
        (Balancer::RoundRobin, n) => Some(v[turn.fetch_add(1, Ordering::Relaxed) % n]),
        (Balancer::P2c, n) => {
            let a = rand(n);
            let mut b = rand(n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (v[a], v[b]);
            Some(if eps[a].load(now) <= eps[b].load(now) {
                a
            } else {
                b
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    fn ep(port: u16, now: Instant) -> Arc<EndpointState> {
        Arc::new(EndpointState::new(
            SocketAddr::from(([10, 0, 0, 1], port)),
            vec![SpiffeId::new("spiffe://t/x").unwrap()],
            None,
            now,
            DEFAULT_RTT,
        ))
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0, DEFAULT_RTT);
        assert!((e.cost(t0) - 30e6).abs() < 1.0);
        e.observe(Duration::from_millis(80), t0);
        assert!(
            (e.cost(t0) - 30e6).abs() < 1.0,
            "the first response (handshakes) is not counted"
        );
        e.observe(Duration::from_millis(5), t0);
        assert!(
            (e.cost(t0) - 5e6).abs() < 1.0,
            "the second replaces the start"
        );
        e.observe(Duration::from_millis(100), t0);
        assert!((e.cost(t0) - 100e6).abs() < 1.0, "a peak is taken at once");
        e.observe(Duration::from_millis(1), t0 + Duration::from_secs(10));
        let c = e.cost(t0 + Duration::from_secs(10));
        // 100 ms × e^-1 + 1 ms × (1 - e^-1)
        assert!(
            (c - 37.42e6).abs() < 0.1e6,
            "a low sample pulls it down with the decay: {c}"
        );
        // Idle: decays toward zero.
        let idle = e.cost(t0 + Duration::from_secs(20));
        assert!((idle - c * (-1f64).exp()).abs() < 1e3, "{idle}");
    }

    #[test]
    fn p2c_prefers_the_lighter_of_two_and_skips_ejected_and_draining() {
        let t0 = Instant::now();
        let (fast, slow) = (ep(1, t0), ep(2, t0));
        // Long enough after the start that the samples outweigh the default estimate.
        let now = t0 + Duration::from_secs(30);
        for _ in 0..2 {
            fast.succeeded(Duration::from_millis(1), now);
            slow.succeeded(Duration::from_millis(20), now);
        }
        let eps = vec![fast.clone(), slow.clone()];
        let turn = AtomicUsize::new(0);
        let mut seq = [0usize, 0, 1, 0].into_iter().cycle();
        let mut rand = |n: usize| seq.next().unwrap() % n;
        for _ in 0..10 {
            assert_eq!(
                pick(Balancer::P2c, &eps, now, &[], &turn, &mut rand),
                Some(0)
            );
        }
        // Requests in flight raise the load.
        let _g: Vec<_> = (0..30).map(|_| fast.start()).collect();
        assert_eq!(
            pick(Balancer::P2c, &eps, now, &[], &turn, &mut rand),
            Some(1)
        );
        drop(_g);
        // Round-robin ignores load.
        let rr: Vec<_> = (0..4)
            .map(|_| pick(Balancer::RoundRobin, &eps, now, &[], &turn, &mut rand).unwrap())
            .collect();
        assert_eq!(rr, [0, 1, 0, 1]);
        // Ejection after consecutive failures, with a back-off; then back in.
        assert!(!fast.failed(now) && !fast.failed(now));
        assert!(fast.failed(now));
        assert!(fast.ejected(now));
        assert_eq!(
            pick(Balancer::P2c, &eps, now, &[], &turn, &mut rand),
            Some(1)
        );
        let later = now + MIN_EJECTION;
        assert!(!fast.ejected(later));
        fast.succeeded(Duration::from_millis(1), later);
        // A retry skips what it tried.
        assert_eq!(
            pick(Balancer::P2c, &eps, later, &[fast.addr], &turn, &mut rand),
            Some(1)
        );
        // Draining endpoints only when nothing else is.
        slow.set_draining(true);
        assert_eq!(
            pick(Balancer::P2c, &eps, later, &[], &turn, &mut rand),
            Some(0)
        );
        assert_eq!(
            pick(Balancer::P2c, &eps, later, &[fast.addr], &turn, &mut rand),
            Some(1)
        );
        assert_eq!(pick(Balancer::P2c, &[], later, &[], &turn, &mut rand), None);
    }

    #[test]
    fn ejections_back_off() {
        let now = Instant::now();
        let e = ep(1, now);
        for _ in 0..3 {
            e.failed(now);
        }
        assert!(e.ejected(now + Duration::from_millis(900)));
        let t1 = now + Duration::from_secs(1);
        for _ in 0..3 {
            e.failed(t1);
        }
        assert!(
            e.ejected(t1 + Duration::from_millis(1900)),
            "twice as long the second time"
        );
        assert!(!e.ejected(t1 + Duration::from_secs(2)));
    }
}
