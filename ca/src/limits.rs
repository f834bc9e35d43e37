//! Per-agent limits on the node API: SVID signings per second, per agent ID (governor's GCRA;
//! a batch counts as many signings as it has CSRs). An agent over its rate gets
//! `RESOURCE_EXHAUSTED` with the wait, the refusal is counted and logged by the node API's
//! refusal layer, and nothing is signed for it.

use std::num::NonZeroU32;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::Limits;
use crate::error::ApiError;

/// Past this many agents tracked, the state of those back at a full allowance is dropped.
const PRUNE_ABOVE: usize = 50_000;

/// Signings per agent.
#[derive(Debug)]
pub struct SigningLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    burst: u32,
}

impl SigningLimiter {
    /// A limiter allowing `l`.
    pub fn new(l: Limits) -> Self {
        let rate = NonZeroU32::new(l.signing_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(l.signing_burst).unwrap_or(rate);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            burst: burst.get(),
        }
    }

    /// Admits `n` signings for `agent`, or refuses them all.
    pub fn admit(&self, agent: &str, n: usize) -> Result<(), ApiError> {
        let Some(count) = u32::try_from(n).ok().and_then(NonZeroU32::new) else {
            return Ok(());
        };
        if self.limiter.len() > PRUNE_ABOVE {
            self.limiter.retain_recent();
        }
        match self.limiter.check_key_n(&agent.to_owned(), count) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(ApiError::ResourceExhausted(format!(
                    "agent {agent} is over its signing rate; try again in {} ms",
                    wait.as_millis().max(1)
                )))
            }
            Err(_) => Err(ApiError::ResourceExhausted(format!(
                "a batch of {n} signings is larger than the burst of {} (limits.signing_burst)",
                self.burst
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_agent_gets_its_burst_then_waits_and_others_do_not() {
        let l = SigningLimiter::new(Limits {
            signing_per_second: 1,
            signing_burst: 10,
            ..Default::default()
        });
        l.admit("spiffe://td/agent/a", 8).unwrap();
        let e = l.admit("spiffe://td/agent/a", 3).unwrap_err();
        assert!(e.to_string().contains("over its signing rate"), "{e}");
        l.admit("spiffe://td/agent/a", 2).unwrap();
        l.admit("spiffe://td/agent/b", 10).unwrap();
        let e = l.admit("spiffe://td/agent/c", 11).unwrap_err();
        assert!(e.to_string().contains("larger than the burst"), "{e}");
        l.admit("spiffe://td/agent/c", 0).unwrap();
    }
}
