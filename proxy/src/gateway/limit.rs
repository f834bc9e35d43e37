//! Per-client rate limiting at the gateway (governor's GCRA, keyed by client address). IPv6
//! clients are keyed by their /64, the smallest block one subscriber usually holds — keyed by
//! full address, one client could take a fresh key for every request.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::config::RateLimit;
use crate::listen::client_key;

/// Past this many tracked clients, the state of those back at a full allowance is dropped.
const PRUNE_ABOVE: usize = 10_000;

/// Requests per client address.
#[derive(Debug)]
pub struct ClientLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl ClientLimiter {
    /// A limiter allowing `r`.
    pub fn new(r: RateLimit) -> Self {
        let rate = NonZeroU32::new(r.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = r.burst.and_then(NonZeroU32::new).unwrap_or(rate);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
        }
    }

    /// Admits one request from `ip`, or says how long until the next would be.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let r = self
            .limiter
            .check_key(&client_key(ip))
            .map_err(|n| n.wait_time_from(self.clock.now()));
        if self.limiter.len() > PRUNE_ABOVE {
            self.limiter.retain_recent();
        }
        r
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits_and_others_are_not_affected() {
        let l = ClientLimiter::new(RateLimit {
            requests_per_second: 1,
            burst: Some(3),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            l.check(a).unwrap();
        }
        let wait = l.check(a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        l.check("192.0.2.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let l = ClientLimiter::new(RateLimit {
            requests_per_second: 1,
            burst: Some(1),
        });
        l.check("2001:db8::1".parse().unwrap()).unwrap();
        assert!(l.check("2001:db8::ffff:1".parse().unwrap()).is_err());
        l.check("2001:db8:0:1::1".parse().unwrap()).unwrap();
        assert_eq!(
            crate::listen::client_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(l.tracked(), 2);
    }
}
