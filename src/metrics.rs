//! Lock metrics through the [`metrics`](https://docs.rs/metrics) facade, with the `metrics`
//! feature; without it every function here is an empty inline no-op and [`Meter`] is a
//! zero-sized type, so the call sites cost nothing.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `distlock_acquire_total` | counter | `outcome` = `acquired`, `contended`, `timeout`, `error` | finished `lock`/`try_lock` calls (and the acquire of `with_lock`) |
//! | `distlock_wait_seconds` | histogram | `outcome` (as above) | how long each of those calls took |
//! | `distlock_lost_total` | counter | `reason` = `expired`, `taken`, `unreachable`, `max_hold_reached`, `no_quorum` | leases lost while held (once per lease) |
//! | `distlock_hold_seconds` | histogram | `ended` = `released`, `lost` | how long a lease was held, from its acquire to its release (or drop) or loss |
//! | `distlock_held_leases` | gauge | — | leases held now: acquired, not yet released, dropped or found lost |
//!
//! No label carries the lock's name: names are unbounded, metrics series must not be.

use std::time::Instant;

#[cfg(any(feature = "metrics", test))]
use crate::error::Error;
use crate::error::{LostReason, Result};

/// Finished acquire calls, by `outcome`.
#[cfg(feature = "metrics")]
const ACQUIRE_TOTAL: &str = "distlock_acquire_total";
/// Duration of acquire calls, by `outcome`.
#[cfg(feature = "metrics")]
const WAIT_SECONDS: &str = "distlock_wait_seconds";
/// Leases lost while held, by `reason`.
#[cfg(feature = "metrics")]
const LOST_TOTAL: &str = "distlock_lost_total";
/// How long leases were held, by how they `ended`.
#[cfg(feature = "metrics")]
const HOLD_SECONDS: &str = "distlock_hold_seconds";
/// Leases held now.
#[cfg(feature = "metrics")]
const HELD_LEASES: &str = "distlock_held_leases";

/// The `outcome` label of an acquire call's result.
#[cfg(any(feature = "metrics", test))]
fn outcome<T>(result: &Result<T>) -> &'static str {
    match result {
        Ok(_) => "acquired",
        Err(Error::Contended { .. }) => "contended",
        Err(Error::Timeout { .. }) => "timeout",
        Err(_) => "error",
    }
}

/// The `reason` label of a loss.
#[cfg(any(feature = "metrics", test))]
fn reason(reason: LostReason) -> &'static str {
    match reason {
        LostReason::Expired => "expired",
        LostReason::Taken => "taken",
        LostReason::Unreachable => "unreachable",
        LostReason::MaxHoldReached => "max_hold_reached",
        LostReason::Released => "released",
        LostReason::NoQuorum => "no_quorum",
        LostReason::NotReplicated => "not_replicated",
    }
}

/// Describes every metric (unit and help text) to the installed recorder; once per manager.
#[cfg(feature = "metrics")]
pub(crate) fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(ACQUIRE_TOTAL, "Finished lock acquire calls by outcome");
    metrics::describe_histogram!(
        WAIT_SECONDS,
        Unit::Seconds,
        "Duration of lock acquire calls by outcome"
    );
    metrics::describe_counter!(LOST_TOTAL, "Leases lost while held, by reason");
    metrics::describe_histogram!(
        HOLD_SECONDS,
        Unit::Seconds,
        "How long leases were held, by how they ended"
    );
    metrics::describe_gauge!(HELD_LEASES, "Leases held now");
}

#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn describe() {}

/// The start of a call to time: `None` (no clock read) without the feature.
#[inline(always)]
pub(crate) fn now() -> Option<Instant> {
    cfg!(feature = "metrics").then(Instant::now)
}

/// Counts one finished acquire call that started at `started`.
#[cfg(feature = "metrics")]
pub(crate) fn acquire<T>(result: &Result<T>, started: Option<Instant>) {
    let outcome = outcome(result);
    metrics::counter!(ACQUIRE_TOTAL, "outcome" => outcome).increment(1);
    if let Some(started) = started {
        metrics::histogram!(WAIT_SECONDS, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
    }
}

#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn acquire<T>(result: &Result<T>, started: Option<Instant>) {
    let _ = (result, started);
}

/// The meter of one held lease: counted in [`HELD_LEASES`] from [`start`](Meter::start)
/// until its end, which is recorded once (the first of [`released`](Meter::released),
/// [`lost`](Meter::lost), [`end`](Meter::end) wins), whoever finds it: the guard or the
/// auto-extension task. Clones share the record.
#[derive(Clone, Default)]
pub(crate) struct Meter {
    #[cfg(feature = "metrics")]
    inner: Option<std::sync::Arc<MeterInner>>,
}

#[cfg(feature = "metrics")]
struct MeterInner {
    acquired_at: Instant,
    ended: std::sync::atomic::AtomicBool,
}

#[cfg(feature = "metrics")]
impl Meter {
    /// A lease taken at `acquired_at` (just before its acquire was sent).
    pub(crate) fn start(acquired_at: Instant) -> Self {
        metrics::gauge!(HELD_LEASES).increment(1.0);
        Meter {
            inner: Some(std::sync::Arc::new(MeterInner {
                acquired_at,
                ended: std::sync::atomic::AtomicBool::new(false),
            })),
        }
    }

    /// The first end of this lease; `None` if it was recorded already.
    fn finish(&self) -> Option<f64> {
        let inner = self.inner.as_ref()?;
        if inner.ended.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return None;
        }
        metrics::gauge!(HELD_LEASES).decrement(1.0);
        Some(inner.acquired_at.elapsed().as_secs_f64())
    }

    /// The holder gave the lease up (release, drop).
    pub(crate) fn released(&self) {
        if let Some(held) = self.finish() {
            metrics::histogram!(HOLD_SECONDS, "ended" => "released").record(held);
        }
    }

    /// The lease was found lost for `why`.
    pub(crate) fn lost(&self, why: LostReason) {
        if why == LostReason::Released {
            return self.released();
        }
        if let Some(held) = self.finish() {
            metrics::counter!(LOST_TOTAL, "reason" => reason(why)).increment(1);
            metrics::histogram!(HOLD_SECONDS, "ended" => "lost").record(held);
        }
    }
}

#[cfg(not(feature = "metrics"))]
impl Meter {
    #[inline(always)]
    pub(crate) fn start(acquired_at: Instant) -> Self {
        let _ = acquired_at;
        Meter {}
    }

    #[inline(always)]
    pub(crate) fn released(&self) {}

    #[inline(always)]
    pub(crate) fn lost(&self, why: LostReason) {
        let _ = why;
    }
}

impl Meter {
    /// The guard ends: lost for the reason `lost()` gives, if the lease was found lost;
    /// released otherwise. Without the feature `lost` is not called.
    #[cfg(feature = "metrics")]
    pub(crate) fn end(&self, lost: impl FnOnce() -> Option<LostReason>) {
        if self.inner.is_none() {
            return;
        }
        match lost() {
            Some(why) => self.lost(why),
            None => self.released(),
        }
    }

    #[cfg(not(feature = "metrics"))]
    #[inline(always)]
    pub(crate) fn end(&self, lost: impl FnOnce() -> Option<LostReason>) {
        let _ = lost;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(outcome::<()>(&Ok(())), "acquired");
        let timeout = Error::Timeout {
            key: "k".into(),
            waited: std::time::Duration::ZERO,
            attempts: 1,
        };
        assert_eq!(outcome::<()>(&Err(timeout)), "timeout");
        assert_eq!(reason(LostReason::MaxHoldReached), "max_hold_reached");
    }
}
