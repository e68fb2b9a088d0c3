//! Backoff between acquire attempts: exponential growth with full jitter.
//!
//! [`Backoff`] is a small `Copy` policy; [`Backoff::delays`] turns it into an iterator of
//! delays. Nothing here sleeps or talks to Redis: the waiting loop in
//! [`LockManager::lock`](crate::LockManager::lock) takes delays from the iterator and never
//! sleeps past the caller's wait budget.
//!
//! The n-th delay (n = 0, 1, …) is drawn uniformly from
//! `[0, min(cap, base * factor^n)]` ("full jitter"), which spreads competing waiters out
//! instead of letting them retry in lock step.
//!
//! ```
//! use std::time::Duration;
//! use distlock::Backoff;
//!
//! let policy = Backoff::new()
//!     .with_base(Duration::from_millis(10))
//!     .with_factor(2.0)
//!     .with_cap(Duration::from_millis(40))
//!     .with_jitter(false)
//!     .with_max_attempts(5);
//! let delays: Vec<Duration> = policy.delays().collect();
//! // Five attempts are separated by four delays.
//! assert_eq!(delays, [10, 20, 40, 40].map(Duration::from_millis));
//! ```

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::error::{Error, Result};

/// An exponential backoff policy with full jitter, a cap and an optional attempt limit.
///
/// Defaults: base 10 ms, factor 2, cap 500 ms, jitter on, no attempt limit (the wait
/// budget of [`LockOptions::with_wait`](crate::LockOptions::with_wait) bounds the wait instead).
///
/// The setters are `const fn`s and do not validate; a policy that cannot be used (a zero
/// base, a factor below 1 or not finite, a cap below the base, a limit of zero attempts) is
/// rejected with [`Error::InvalidArgument`] when a lock call uses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    cap: Duration,
    max_attempts: Option<u32>,
    jitter: bool,
    seed: Option<u64>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// The default policy: base 10 ms, factor 2, cap 500 ms, jitter on, no attempt limit.
    pub const fn new() -> Self {
        Backoff {
            base: Duration::from_millis(10),
            factor: 2.0,
            cap: Duration::from_millis(500),
            max_attempts: None,
            jitter: true,
            seed: None,
        }
    }

    /// The ceiling of the first delay.
    pub const fn with_base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// How much the ceiling grows from one delay to the next (at least 1).
    pub const fn with_factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// The largest ceiling any delay can have.
    pub const fn with_cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// The most acquire attempts one waiting call makes; the iterator then yields
    /// `attempts - 1` delays (a delay sits between two attempts).
    pub const fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// No attempt limit: only the wait budget ends the wait (the default).
    pub const fn without_max_attempts(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// Full jitter on (the default) or off. Off, every delay is exactly its ceiling,
    /// which makes waiters that collided once collide again; use it for tests.
    pub const fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Draw the jitter from a generator seeded with `seed`, so the sequence of delays is
    /// reproducible. Without a seed, every [`delays`](Self::delays) call is seeded afresh.
    pub const fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The ceiling of the first delay.
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The growth factor.
    pub const fn factor(&self) -> f64 {
        self.factor
    }

    /// The largest ceiling.
    pub const fn cap(&self) -> Duration {
        self.cap
    }

    /// The attempt limit, if any.
    pub const fn max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// The ceiling of delay number `n` (0-based): `min(cap, base * factor^n)`, without jitter.
    pub fn ceiling(&self, n: u32) -> Duration {
        let exp = i32::try_from(n).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        match Duration::try_from_secs_f64(secs) {
            Ok(d) if d < self.cap => d,
            // Overflowed, not finite, or past the cap.
            _ => self.cap,
        }
    }

    /// The delays between attempts, as an iterator. Pure: it neither sleeps nor does I/O.
    pub fn delays(&self) -> Delays {
        let rng = match self.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        Delays {
            policy: *self,
            n: 0,
            rng,
        }
    }

    /// Rejects a policy that would spin hot or never end.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.base.is_zero() {
            return Err(Error::invalid("backoff", "base must be above zero"));
        }
        if !self.factor.is_finite() || self.factor < 1.0 {
            return Err(Error::invalid(
                "backoff",
                format!("factor must be finite and at least 1, got {}", self.factor),
            ));
        }
        if self.cap < self.base {
            return Err(Error::invalid(
                "backoff",
                format!("cap {:?} is below base {:?}", self.cap, self.base),
            ));
        }
        if self.max_attempts == Some(0) {
            return Err(Error::invalid("backoff", "max_attempts must be at least 1"));
        }
        Ok(())
    }
}

impl IntoIterator for Backoff {
    type Item = Duration;
    type IntoIter = Delays;

    fn into_iter(self) -> Delays {
        self.delays()
    }
}

/// The delays of a [`Backoff`] policy; made by [`Backoff::delays`].
#[derive(Debug, Clone)]
pub struct Delays {
    policy: Backoff,
    n: u32,
    rng: SmallRng,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let n = self.n;
        if self
            .policy
            .max_attempts
            .is_some_and(|max| n.saturating_add(1) >= max)
        {
            return None;
        }
        let ceiling = self.policy.ceiling(self.n);
        self.n = self.n.saturating_add(1);
        if !self.policy.jitter {
            return Some(ceiling);
        }
        let top = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(self.rng.random_range(0..=top)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn without_jitter_delays_double_up_to_the_cap() {
        let policy = Backoff::new()
            .with_base(ms(5))
            .with_cap(ms(60))
            .with_jitter(false)
            .with_max_attempts(7);
        let delays: Vec<_> = policy.delays().collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60].map(ms));
    }

    #[test]
    fn max_attempts_of_one_yields_no_delay() {
        let policy = Backoff::new().with_max_attempts(1);
        assert_eq!(policy.delays().next(), None);
    }

    #[test]
    fn without_limit_the_iterator_keeps_yielding_the_cap() {
        let policy = Backoff::new().with_jitter(false);
        let last = policy.delays().nth(10_000);
        assert_eq!(last, Some(policy.cap()));
    }

    #[test]
    fn factor_one_gives_a_constant_ceiling() {
        let policy = Backoff::new()
            .with_base(ms(7))
            .with_factor(1.0)
            .with_jitter(false);
        assert!(policy.delays().take(50).all(|d| d == ms(7)));
    }

    #[test]
    fn huge_exponents_saturate_at_the_cap_without_panicking() {
        let policy = Backoff::new()
            .with_base(Duration::MAX)
            .with_factor(f64::MAX)
            .with_cap(Duration::MAX);
        assert_eq!(policy.ceiling(u32::MAX), Duration::MAX);
        // Jitter draws within [0, u64::MAX ns] even though the cap is larger.
        assert!(policy.delays().next().is_some());
    }

    #[test]
    fn same_seed_gives_the_same_jittered_sequence() {
        let policy = Backoff::new().with_seed(42);
        let a: Vec<_> = policy.delays().take(20).collect();
        let b: Vec<_> = policy.delays().take(20).collect();
        assert_eq!(a, b);
        let other: Vec<_> = policy.with_seed(43).delays().take(20).collect();
        assert_ne!(a, other);
    }

    #[test]
    fn jitter_spreads_delays_over_the_whole_range() {
        // With full jitter, 1000 draws under a 100 ms ceiling land in both the lower and
        // the upper tenth of the range (the chance of missing either is ~2 * 0.9^1000).
        let policy = Backoff::new()
            .with_base(ms(100))
            .with_factor(1.0)
            .with_cap(ms(100))
            .with_seed(7);
        let delays: Vec<_> = policy.delays().take(1000).collect();
        assert!(delays.iter().any(|d| *d < ms(10)));
        assert!(delays.iter().any(|d| *d > ms(90)));
    }

    #[test]
    fn validate_rejects_unusable_policies() {
        let bad = [
            Backoff::new().with_base(Duration::ZERO),
            Backoff::new().with_factor(0.5),
            Backoff::new().with_factor(f64::NAN),
            Backoff::new().with_factor(f64::INFINITY),
            Backoff::new().with_base(ms(100)).with_cap(ms(10)),
            Backoff::new().with_max_attempts(0),
        ];
        for policy in bad {
            match policy.validate() {
                Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "backoff"),
                other => panic!("{policy:?} accepted: {other:?}"),
            }
        }
        assert!(Backoff::new().validate().is_ok());
    }

    proptest! {
        #[test]
        fn every_delay_lies_within_zero_and_its_ceiling(
            base_us in 1u64..10_000_000,
            factor in 1.0f64..16.0,
            cap_extra_us in 0u64..100_000_000,
            seed in any::<u64>(),
        ) {
            let base = Duration::from_micros(base_us);
            let cap = base + Duration::from_micros(cap_extra_us);
            let policy = Backoff::new()
                .with_base(base)
                .with_factor(factor)
                .with_cap(cap)
                .with_seed(seed);
            for (n, delay) in policy.delays().take(64).enumerate() {
                let ceiling = policy.ceiling(n as u32);
                prop_assert!(delay <= ceiling, "delay {delay:?} above ceiling {ceiling:?}");
                prop_assert!(ceiling <= cap);
            }
        }

        #[test]
        fn ceilings_never_shrink(
            base_us in 1u64..10_000_000,
            factor in 1.0f64..16.0,
            cap_extra_us in 0u64..100_000_000,
        ) {
            let base = Duration::from_micros(base_us);
            let policy = Backoff::new()
                .with_base(base)
                .with_factor(factor)
                .with_cap(base + Duration::from_micros(cap_extra_us));
            for n in 0..200u32 {
                prop_assert!(policy.ceiling(n) <= policy.ceiling(n + 1));
            }
        }

        #[test]
        fn the_iterator_yields_max_attempts_minus_one_delays(attempts in 1u32..500) {
            let policy = Backoff::new().with_max_attempts(attempts);
            prop_assert_eq!(policy.delays().count(), attempts as usize - 1);
        }
    }
}
