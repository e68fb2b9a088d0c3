//! Replica acknowledgement of a lease's writes (`WAIT`): the setting and its checks.

use std::time::Duration;

use crate::error::{Error, Result};

/// The longest [`LockOptions::with_replicas`](crate::LockOptions::with_replicas) timeout accepted: 60 s. `WAIT` holds its
/// connection and the acquire for that long when replicas lag.
pub const MAX_REPLICA_TIMEOUT: Duration = Duration::from_secs(60);

/// Replica acknowledgement of a lease's writes: `n` replicas within `timeout` (set with
/// [`LockOptions::with_replicas`](crate::LockOptions::with_replicas) or [`LockManagerBuilder::with_replicas`](crate::LockManagerBuilder::with_replicas)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    count: u32,
    timeout: Duration,
}

impl Replicas {
    pub(crate) const fn new(count: u32, timeout: Duration) -> Self {
        Replicas { count, timeout }
    }

    /// How many replicas must acknowledge.
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// How long the primary waits for them (`WAIT`'s timeout).
    pub const fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `WAIT`'s timeout in whole milliseconds (at least 1: `WAIT n 0` would block forever).
    pub(crate) fn timeout_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Checked: at least one replica, a timeout between 1 ms and
    /// [`MAX_REPLICA_TIMEOUT`], shorter than the lease's `ttl`.
    pub(crate) fn check(self, ttl: Duration) -> Result<Self> {
        if self.count == 0 {
            return Err(Error::invalid(
                "replicas",
                "at least one replica must acknowledge (leave the option off for none)",
            ));
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > MAX_REPLICA_TIMEOUT {
            return Err(Error::invalid(
                "replicas",
                format!(
                    "a replica timeout is between 1 ms and {MAX_REPLICA_TIMEOUT:?}, got {:?}",
                    self.timeout
                ),
            ));
        }
        if self.timeout >= ttl {
            return Err(Error::invalid(
                "replicas",
                format!(
                    "a replica timeout of {:?} is not shorter than the lease TTL {ttl:?}: the \
                     lease could end before its acknowledgement",
                    self.timeout
                ),
            ));
        }
        Ok(self)
    }
}

/// Whether a lock call asks for replica acknowledgement: as its manager does (the
/// default), or its own choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplicaChoice {
    Manager,
    Off,
    On(Replicas),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{LockOptions, MAX_TTL};

    fn what(err: Error) -> &'static str {
        match err {
            Error::InvalidArgument(arg) => arg.what(),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn replica_acknowledgement_is_checked() {
        let ms = Duration::from_millis;
        let opts = LockOptions::new().with_ttl(Duration::from_secs(1));
        assert_eq!(opts.check(false).unwrap().replicas, None);
        let on = opts.with_replicas(2, ms(100));
        assert_eq!(on.check(false).unwrap().replicas, on.replicas());
        for bad in [
            opts.with_replicas(0, ms(100)),
            opts.with_replicas(1, Duration::ZERO),
            opts.with_replicas(1, Duration::from_micros(999)),
            opts.with_replicas(1, ms(1_000)),
            opts.with_ttl(MAX_TTL)
                .with_replicas(1, MAX_REPLICA_TIMEOUT + ms(1)),
        ] {
            assert_eq!(what(bad.check(false).unwrap_err()), "replicas");
        }
        let manager = on.replicas();
        assert_eq!(opts.replicas_or(manager), manager);
        assert_eq!(opts.without_replicas().replicas_or(manager), None);
        let mine = opts.with_replicas(1, ms(50));
        assert_eq!(mine.replicas_or(manager), mine.replicas());
    }
}
