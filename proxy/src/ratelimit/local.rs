//! Local (per-process) GCRA limiting with `governor`: lock-free per check (DashMap shard
//! locks only), bounded memory under a flood of distinct keys.
//!
//! Memory bound: keys are 64-bit keyed hashes (SipHash with a per-process random key, so
//! clients cannot aim collisions), a sweeper drops keys whose state is back to "fresh"
//! (`retain_recent`), and past `max_keys` new traffic is folded into 1024 shared overflow
//! buckets until the sweeper catches up. The key count is refreshed every 256 checks, so the
//! cap holds to within a few hundred keys.

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::rule::RateLimitRule;

/// Result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed; `remaining` more fit in the burst right now; the bucket is full again after
    /// `reset`.
    Allowed {
        /// Remaining burst capacity.
        remaining: u32,
        /// Time until the bucket is full again.
        reset: Duration,
    },
    /// Over the limit; retry after this long.
    Limited {
        /// Earliest time the next request would be allowed.
        retry_after: Duration,
    },
}

type Limiter = RateLimiter<u64, DashMapStateStore<u64>, DefaultClock, StateInformationMiddleware>;

const OVERFLOW_BUCKETS: u64 = 1024;
/// Overflow keys live in their own space of the (otherwise hashed) key domain.
const OVERFLOW_TAG: u64 = 0xffff_ffff_ffff_0000;

/// A keyed local limiter for one rule.
pub struct LocalLimiter {
    limiter: Limiter,
    hasher: std::collections::hash_map::RandomState,
    clock: DefaultClock,
    max_keys: usize,
    interval: Duration,
    burst: u32,
    approx_len: AtomicUsize,
    checks: AtomicU64,
    sweep_requested: AtomicBool,
}

impl LocalLimiter {
    /// A limiter for `rule`'s rate and burst.
    pub fn new(rule: &RateLimitRule) -> LocalLimiter {
        let interval = rule.rate.interval().max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(rule.burst).unwrap_or(NonZeroU32::MIN);
        // `with_period` only fails for a zero period, excluded above.
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        LocalLimiter {
            limiter: RateLimiter::dashmap(quota).with_middleware::<StateInformationMiddleware>(),
            hasher: std::collections::hash_map::RandomState::new(),
            clock: DefaultClock::default(),
            max_keys: rule.max_keys.max(1),
            interval,
            burst: burst.get(),
            approx_len: AtomicUsize::new(0),
            checks: AtomicU64::new(0),
            sweep_requested: AtomicBool::new(false),
        }
    }

    /// Checks (and counts) one request with this key.
    pub fn check(&self, key: &str) -> Outcome {
        let mut k = self.hasher.hash_one(key);
        if k >= OVERFLOW_TAG {
            k &= !OVERFLOW_TAG;
        }
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(256)
        {
            self.approx_len.store(self.limiter.len(), Ordering::Relaxed);
        }
        if self.approx_len.load(Ordering::Relaxed) >= self.max_keys {
            self.sweep_requested.store(true, Ordering::Relaxed);
            k = OVERFLOW_TAG | (k % OVERFLOW_BUCKETS);
        }
        match self.limiter.check_key(&k) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Outcome::Allowed {
                    remaining,
                    reset: self.interval * (self.burst - remaining.min(self.burst)),
                }
            }
            Err(not_until) => Outcome::Limited {
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        }
    }

    /// Drops keys whose state is indistinguishable from a fresh one, frees memory, and
    /// returns the number of keys left.
    pub fn sweep(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let n = self.limiter.len();
        self.approx_len.store(n, Ordering::Relaxed);
        self.sweep_requested.store(false, Ordering::Relaxed);
        n
    }

    /// Whether a check found the key cap reached since the last sweep.
    pub fn sweep_requested(&self) -> bool {
        self.sweep_requested.load(Ordering::Relaxed)
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;
    use crate::ratelimit::rule::*;

    fn rule(rate: &str, burst: u32, max_keys: usize) -> RateLimitRule {
        RateLimitRule {
            name: "t".into(),
            key: vec![],
            rate: Rate::parse(rate).unwrap(),
            burst,
            scope: RateLimitScope::default(),
            action: RateLimitAction::Block,
            store: RateLimitStore::Local,
            headers_always: false,
            max_keys,
        }
    }

    #[test]
    fn burst_then_limited_per_key() {
        let l = LocalLimiter::new(&rule("1/min", 3, 1000));
        for i in (0..3).rev() {
            assert!(matches!(l.check("a"), Outcome::Allowed { remaining, .. } if remaining == i));
        }
        match l.check("a") {
            Outcome::Limited { retry_after } => assert!(retry_after > Duration::from_secs(50)),
            o => panic!("{o:?}"),
        }
        assert!(
            matches!(l.check("b"), Outcome::Allowed { .. }),
            "keys are independent"
        );
    }

    #[test]
    fn key_count_stays_bounded_under_a_flood() {
        let l = LocalLimiter::new(&rule("10/s", 10, 5000));
        for i in 0..200_000 {
            l.check(&format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255));
        }
        // At most the cap, plus the keys added between two length refreshes, plus overflow.
        assert!(
            l.len() <= 5000 + 256 + OVERFLOW_BUCKETS as usize,
            "{}",
            l.len()
        );
        assert!(l.sweep_requested());
    }
}
