//! Guards of acquired leases, and taking up a lease the previous holder handed over: its
//! release (fair mode on one primary), or a holder of this manager passing it on (a lock
//! over several primaries).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use super::LockManager;
use crate::guard::LockGuard;
use crate::key::{LockKey, Token};
use crate::lease::Lease;
use crate::metrics::Meter;
use crate::notify::Handoff;
use crate::options::{Checked, Ttl};
use crate::wait::Wait;

impl LockManager {
    /// Fair mode on one primary: the guard of a lease a release handed to this call, if
    /// one was announced for the token of its last attempt answered "queued". The server
    /// wrote it after that attempt ran, until the TTL from then or the end of the queue
    /// entry that attempt set (its entry lease after it ran), whichever comes first: the
    /// belief counts the shorter of TTL and entry lease from the attempt's send time, and
    /// the lease is extended to the full TTL in the background. A handoff whose belief has
    /// already run out is not taken (a later attempt takes the lease up with a fresh TTL).
    pub(super) fn take_handed(
        &self,
        key: &LockKey,
        request: &Checked,
        wait: &Wait<'_>,
        queued_as: &mut Option<(Token, Instant)>,
    ) -> Option<LockGuard> {
        let entry_lease = request.fair?;
        let (token, _) = queued_as.as_ref()?;
        let Handoff {
            token: handed,
            fence,
        } = wait.handed()?;
        if &handed[..] != token.as_bytes() {
            // Handed under an earlier entry's token: the next attempt takes it up by waiter id.
            return None;
        }
        let (token, sent) = queued_as.take()?;
        let px = Ttl::new(request.ttl.as_duration().min(entry_lease)).ok()?;
        let now = Instant::now();
        if now >= px.valid_until(sent) {
            return None;
        }
        let runtime = Handle::try_current().ok();
        let fence = request.fencing.then_some(fence);
        tracing::debug!(
            token = token.short(),
            ?fence,
            "handed the lease by the release"
        );
        let lease = Lease::new(key.clone(), token, fence, px, sent, now);
        let guard = self.guard_for(lease, sent, request.auto_extend, request.max_hold, runtime);
        guard.extend_in_background(request.ttl);
        Some(guard)
    }

    /// The guard of a lease a holder of this manager passed to this call, if one did (see
    /// [`crate::notify::pass`]) and its validity has not run out (then it is released in the
    /// background, and the call attempts on its own).
    pub(super) fn take_passed(
        &self,
        key: &LockKey,
        request: &Checked,
        wait: &Wait<'_>,
    ) -> Option<LockGuard> {
        let passed = wait.passed()?.take_up(Instant::now())?;
        tracing::debug!(
            token = passed.token.short(),
            streak = passed.streak,
            "passed the lease by its holder"
        );
        let lease = Lease::new(
            key.clone(),
            passed.token,
            None,
            passed.ttl,
            passed.sent,
            passed.replied,
        );
        let runtime = Handle::try_current().ok();
        let guard = self.guard_for(
            lease,
            passed.sent,
            request.auto_extend,
            request.max_hold,
            runtime,
        );
        Some(guard.passed_times(passed.streak))
    }

    /// The guard of `lease`, taken by an attempt sent at `sent`; with `auto_extend` (and a
    /// runtime to run in) registered for auto-extension, up to `max_hold`.
    pub(super) fn guard_for(
        &self,
        lease: Lease,
        sent: Instant,
        auto_extend: bool,
        max_hold: Option<Duration>,
        runtime: Option<Handle>,
    ) -> LockGuard {
        let lease = Arc::new(lease);
        let meter = Meter::start(sent);
        let extension = match (&runtime, auto_extend) {
            (Some(runtime), true) => Some(self.shared.auto_extender.register(
                Arc::clone(&lease),
                sent,
                max_hold,
                runtime,
                meter.clone(),
            )),
            _ => None,
        };
        let guard = LockGuard::new(
            lease,
            Arc::clone(&self.shared.store),
            runtime,
            extension,
            meter,
        );
        match &self.shared.notifier {
            Some(notifier) if self.shared.store.passes() => guard.passing(Arc::downgrade(notifier)),
            _ => guard,
        }
    }
}
