//! Waiting for a lock held by another owner: when to try again.
//!
//! [`Wait`] is the strategy of one waiting call ([`lock`](crate::LockManager::lock) and
//! friends). It owns everything the call knows between attempts — the deadline, the
//! backoff delays, the attempt count, the place in this manager's queue of waiters, the
//! last connection error — and answers two questions for the acquire loop: "attempt now?"
//! and "how long to pause after this outcome?". The loop itself stays a few lines:
//! attempt, tell the outcome, pause, repeat.
//!
//! The rules, in one place:
//!
//! - at least one attempt, whatever the budget or attempt limit;
//! - never sleep past the deadline; once the budget or the attempt limit is spent, the call
//!   ends with [`Error::Timeout`] (held by another owner) or, if the last attempt failed on
//!   the connection, with that error;
//! - with release notifications, subscribe first, then attempt at once: that attempt
//!   decides to wait, and any release after it wakes a waiter of this manager. Until the
//!   server confirms the subscription, the waiter polls;
//! - every pause ends by the holder's remaining TTL (an expiry is not announced) and the
//!   deadline; the longest-waiting waiter of the manager (and every waiter that is not
//!   sure to be woken) also retries after a backoff step; the others wait their turn, so a
//!   newcomer does not snatch the lock from the waiter a release is waking;
//! - in fair mode the queue lives in Redis: every attempt queues the caller (or refreshes
//!   its entry), a release wakes only the waiter it names, so a listening waiter waits for
//!   that (no backoff polls), and every pause also ends in time to refresh the entry:
//!   a third of the entry lease after the last attempt.

use std::time::{Duration, Instant};

use crate::backoff::Delays;
use crate::error::Error;
use crate::key::LockKey;
use crate::notify::PassedLease;
use crate::notify::{Handoff, Notifier, Waiter};
use crate::options::Ttl;

/// Waiting past a holder's reported remaining TTL by this much finds the key expired.
const EXPIRY_SLACK: Duration = Duration::from_millis(1);

/// Fair mode: the caller's place in the lock's queue in Redis.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InQueue<'a> {
    /// The id the queue and the release announcements know the caller by.
    pub(crate) id: &'a [u8],
    /// How long the caller's entry lasts unless an attempt refreshes it.
    pub(crate) lease: Duration,
}

impl InQueue<'_> {
    /// When the entry of an attempt sent at `attempted_at` must be refreshed: a third of
    /// its lease later, so a late wake-up or a slow round trip still finds it alive.
    fn refresh_at(&self, attempted_at: Instant) -> Option<Instant> {
        attempted_at.checked_add(self.lease / 3)
    }
}

/// The strategy of one waiting call; see the module docs.
pub(crate) struct Wait<'a> {
    key: &'a LockKey,
    notifier: Option<&'a Notifier>,
    /// Fair mode: the caller's place in the lock's queue in Redis.
    queue: Option<InQueue<'a>>,
    /// Fair mode: the channel the next waiter of this manager is announced on,
    /// `<release channel>:<manager id>`.
    own_channel: Option<Vec<u8>>,
    started: Instant,
    deadline: Instant,
    delays: Delays,
    attempts: u32,
    waiter: Option<Waiter>,
    /// The next turn waits in the queue without an attempt first.
    queued_behind: bool,
    /// The subscription was confirmed before the last attempt: a release after that
    /// attempt is sure to wake a waiter of this manager.
    listening: bool,
    /// When the last attempt was sent.
    attempted_at: Instant,
    /// What the last attempt found: the holder's remaining TTL, if it said.
    held_for: Option<Duration>,
    /// The last attempt failed on the connection (not on a holder).
    failure: Option<Error>,
    /// The TTL this call takes a lease passed by a holder of its manager for, if it takes
    /// one (see [`crate::notify::pass`]).
    passes: Option<Ttl>,
}

impl<'a> Wait<'a> {
    /// A wait for `key` that ends at `deadline`. When callers of this manager already
    /// wait for the key, this one queues behind them: its first turn is a pause. In fair
    /// mode (`queue`) the first turn is an attempt: it takes the caller's place in the
    /// queue in Redis.
    pub(crate) fn new(
        key: &'a LockKey,
        notifier: Option<&'a Notifier>,
        queue: Option<InQueue<'a>>,
        delays: Delays,
        started: Instant,
        deadline: Instant,
    ) -> Self {
        let mut wait = Wait {
            key,
            notifier,
            queue,
            own_channel: notifier
                .filter(|_| queue.is_some())
                .map(|n| [key.released_channel(), b":", n.id()].concat()),
            started,
            deadline,
            delays,
            attempts: 0,
            waiter: None,
            queued_behind: false,
            listening: false,
            attempted_at: started,
            held_for: None,
            failure: None,
            passes: None,
        };
        if let Some(notifier) = notifier
            && queue.is_none()
            && notifier.has_waiters(key.released_channel())
        {
            wait.waiter = notifier.register(key.released_channel());
            wait.queued_behind = wait.waiter.is_some();
        }
        wait
    }

    /// Takes a lease a holder of this manager passes on (see [`crate::notify::pass`]), for `ttl`.
    pub(crate) fn take_passes(&mut self, ttl: Ttl) {
        self.passes = Some(ttl);
        if let Some(waiter) = &self.waiter {
            waiter.offer(ttl);
        }
    }

    /// A lease a holder of this manager passed to this call, if any.
    pub(crate) fn passed(&self) -> Option<PassedLease> {
        self.waiter.as_ref()?.take_passed()
    }

    /// Whether to attempt now; if so, the attempt is counted.
    pub(crate) fn attempt_now(&mut self) -> bool {
        if std::mem::take(&mut self.queued_behind) {
            self.held_for = None;
            self.listening = self.waiter.as_ref().is_some_and(Waiter::listening);
            return false;
        }
        self.listening = self.waiter.as_ref().is_some_and(Waiter::listening);
        self.attempts = self.attempts.saturating_add(1);
        self.attempted_at = Instant::now();
        true
    }

    /// The attempts made so far, this one included (fair mode numbers its attempts so a
    /// late one cannot take over a lease handed to a later one).
    pub(crate) fn attempts(&self) -> u64 {
        u64::from(self.attempts)
    }

    /// Whether an earlier attempt of this call found the lock held (or this call queued
    /// behind other waiters of its manager): the lock is contended.
    pub(crate) fn retrying(&self) -> bool {
        self.attempts > 1 || self.waiter.is_some()
    }

    /// Fair mode on one primary: the last lease a release announced it handed to this
    /// call, if it listens.
    pub(crate) fn handed(&self) -> Option<Handoff> {
        self.waiter.as_ref()?.handed()
    }

    /// Fair mode: whether a release named this call as the next waiter since the last time
    /// this was asked (the attempt about to be made is its turn, as of that release).
    pub(crate) fn named(&self) -> bool {
        self.waiter.as_ref().is_some_and(Waiter::take_named)
    }

    /// The attempt took the lock.
    pub(crate) fn acquired(&self) {
        tracing::debug!(
            attempts = self.attempts,
            waited = ?self.started.elapsed(),
            "acquired"
        );
    }

    /// The attempt found the lock held; `pttl` is the holder's remaining TTL, if known.
    pub(crate) fn held(&mut self, pttl: Option<Duration>) {
        self.held_for = pttl;
        self.failure = None;
    }

    /// The attempt failed on the connection: retried within the budget.
    pub(crate) fn failed(&mut self, error: Error) {
        tracing::debug!(error = %error, "attempt failed on the connection; retrying");
        self.held_for = None;
        self.failure = Some(error);
    }

    /// Pauses until the next attempt is due, or returns the error that ends the call:
    /// the budget or the attempt limit is spent.
    pub(crate) async fn pause(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let delay = match self.delays.next() {
            Some(delay) if now < self.deadline => delay,
            // However the budget or attempt limit is set, one attempt is made.
            _ if self.attempts == 0 => return Ok(()),
            _ => return Err(self.give_up(now)),
        };
        let poll = poll_at(now, delay, self.deadline);
        if self.failure.is_some() {
            // After a failed attempt (a broken link, a failover) the next one waits for the
            // backoff, or for a release heard meanwhile: the lock may be free by then.
            match &self.waiter {
                Some(waiter) => {
                    waiter.sleep(poll).await;
                    waiter.rearm();
                }
                None => tokio::time::sleep_until(poll.into()).await,
            }
            return Ok(());
        }
        if self.waiter.is_none()
            && let Some(notifier) = self.notifier
            && let Some(registered) = notifier.register_as(
                self.own_channel
                    .as_deref()
                    .unwrap_or(self.key.released_channel()),
                self.queue.map(|q| q.id),
            )
        {
            // Subscribe, then try again at once. The subscription is waited for no longer
            // than the poll would be; until it is confirmed, this waiter polls.
            if let Some(ttl) = self.passes {
                registered.offer(ttl);
            }
            let confirmed = registered.until_listening(poll).await;
            self.waiter = Some(registered);
            if confirmed {
                return Ok(());
            }
        }
        let held_until = self
            .held_for
            .and_then(|left| self.attempted_at.checked_add(left + EXPIRY_SLACK));
        if let (Some(waiter), Some(until)) = (&self.waiter, held_until) {
            waiter.note_held_until(until);
        }
        let known_end = held_until.or_else(|| self.waiter.as_ref()?.held_until());
        // In fair mode the pause also ends in time to refresh the caller's queue entry.
        let end = match self.queue.and_then(|q| q.refresh_at(self.attempted_at)) {
            Some(refresh) => self.deadline.min(refresh.max(now)),
            None => self.deadline,
        };
        let bounds = Bounds::new(now, end, poll, known_end);
        tracing::trace!(attempts = self.attempts, ?delay, held_for = ?self.held_for, "held by another owner; waiting");
        match &self.waiter {
            Some(waiter) if self.queue.is_some() && !self.listening => {
                // Fair mode, not yet sure to hear its turn (nobody else may take the lock
                // meanwhile): attempt again as soon as the subscription is confirmed, or at
                // the next poll.
                if !waiter.until_listening(bounds.poll).await {
                    waiter.sleep(bounds.poll).await;
                }
                waiter.rearm();
            }
            Some(waiter) => {
                // In fair mode the release names the waiter whose turn it is: a listening
                // waiter is woken when it is its turn, wherever it is in line.
                let sure_to_be_woken =
                    self.listening && (self.queue.is_some() || !waiter.is_first());
                waiter.sleep(bounds.until(sure_to_be_woken)).await;
                waiter.rearm();
            }
            None => tokio::time::sleep_until(bounds.poll.into()).await,
        }
        Ok(())
    }

    fn give_up(&mut self, now: Instant) -> Error {
        let waited = now.saturating_duration_since(self.started);
        let attempts = self.attempts;
        tracing::debug!(attempts, ?waited, "gave up waiting");
        self.failure.take().unwrap_or_else(|| Error::Timeout {
            key: self.key.display(),
            waited,
            attempts,
        })
    }
}

/// The next backoff step from `now`, never past `deadline`.
fn poll_at(now: Instant, delay: Duration, deadline: Instant) -> Instant {
    now.checked_add(delay).map_or(deadline, |t| t.min(deadline))
}

/// How long one pause may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    /// The end of any pause: the deadline, or the holder's known end if sooner.
    bound: Instant,
    /// The end of a pause that also polls: the next backoff step, within `bound`.
    poll: Instant,
}

impl Bounds {
    fn new(now: Instant, deadline: Instant, poll: Instant, known_end: Option<Instant>) -> Self {
        let mut bound = deadline;
        if let Some(end) = known_end {
            bound = bound.min(end.max(now));
        }
        Bounds {
            bound,
            poll: poll.min(bound),
        }
    }

    /// A waiter sure to be woken by a release waits for it (or the holder's end); any
    /// other waiter also polls.
    fn until(self, sure_to_be_woken: bool) -> Instant {
        if sure_to_be_woken {
            self.bound
        } else {
            self.poll
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn a_poll_never_lands_past_the_deadline() {
        let now = Instant::now();
        assert_eq!(poll_at(now, ms(50), now + ms(10)), now + ms(10));
        assert_eq!(poll_at(now, ms(5), now + ms(10)), now + ms(5));
        assert_eq!(poll_at(now, Duration::MAX, now + ms(10)), now + ms(10));
    }

    #[test]
    fn a_pause_ends_by_the_holders_end_and_the_deadline() {
        let now = Instant::now();
        let b = Bounds::new(now, now + ms(1_000), now + ms(300), Some(now + ms(200)));
        assert_eq!(b.bound, now + ms(200));
        assert_eq!(
            b.poll,
            now + ms(200),
            "the poll never outlasts the holder's end"
        );
        assert_eq!(b.until(true), now + ms(200));
        let b = Bounds::new(now, now + ms(100), now + ms(50), Some(now + ms(200)));
        assert_eq!(b.bound, now + ms(100), "nor the deadline");
    }

    #[test]
    fn only_a_waiter_sure_to_be_woken_skips_the_poll() {
        let now = Instant::now();
        let b = Bounds::new(now, now + ms(1_000), now + ms(20), None);
        assert_eq!(b.until(false), now + ms(20));
        assert_eq!(b.until(true), now + ms(1_000));
    }

    #[test]
    fn a_queue_entry_is_refreshed_at_a_third_of_its_lease() {
        let now = Instant::now();
        let q = InQueue {
            id: b"w",
            lease: ms(900),
        };
        assert_eq!(q.refresh_at(now), Some(now + ms(300)));
    }

    #[test]
    fn a_holder_end_already_past_ends_the_pause_now() {
        let now = Instant::now();
        let b = Bounds::new(now, now + ms(1_000), now + ms(20), Some(now - ms(5)));
        assert_eq!(b.bound, now);
        assert_eq!(b.poll, now);
    }
}
