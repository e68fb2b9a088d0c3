//! Release notifications: waiters sleep until the holder releases, instead of polling.
//!
//! The release script publishes on the lock's channel (`<prefix>{<name>}:released`). One
//! subscription connection per manager, owned by one background task, carries the
//! subscriptions of all its waiters; a message wakes the longest-waiting waiter of that lock
//! in this manager (first come, first served), not all of them. A waiter that loses the race
//! again keeps its place at the front of the queue.
//!
//! Waiters never do network I/O themselves and never wait on a lock held across it: they
//! put themselves in a queue and tell the task which channels are wanted; the task
//! subscribes and unsubscribes, one command at a time, and reports what is confirmed. A
//! waiter that needs the subscription waits for the confirmation only as long as its own
//! bound allows, and polls until then. So a slow or hanging subscription link delays no
//! call past its budget, and a waiter cancelled at any point leaves nothing subscribed: the
//! task unsubscribes every channel nobody waits on.
//!
//! Pub/sub is fire-and-forget, so a notification is only ever a shortcut: every wait is
//! also bounded by the holder's remaining TTL, the backoff policy and the wait budget. A lost
//! connection wakes every waiter (they retry at once); the task reconnects while waiters
//! remain, with a growing pause between failed tries. A server that refuses the
//! subscription for lack of permission (`NOPERM`: Redis 7's default
//! `acl-pubsub-default resetchannels`) turns notifications off for the manager, with one
//! warning; its waiters poll. The connection closes when the manager is dropped, or after a
//! short idle spell with no waiter.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_core::Stream;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::Notify;

/// How long the subscription connection stays open with no waiter before it is closed.
const IDLE_LINGER: Duration = Duration::from_secs(1);

/// The pause after the first failed connection or subscription; doubled per failure.
const RETRY_MIN: Duration = Duration::from_millis(50);

/// The longest pause between two tries to (re)establish the subscription connection.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The pub/sub side of one manager. Dropping it closes the subscription connection and
/// ends its task.
pub(crate) struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    connect_timeout: Duration,
    timeout: Duration,
    state: Mutex<State>,
    /// Wakes the subscription task: the wanted channels changed, or the manager is gone.
    kick: Notify,
    /// Wakes waiters that wait for their channel to be subscribed, on every change of the
    /// subscribed set, of `failures` and of `disabled`.
    changed: Notify,
}

#[derive(Default)]
struct State {
    queues: Queues<Arc<Slot>>,
    /// Channels the server confirmed on the current connection.
    subscribed: HashSet<Box<[u8]>>,
    /// Bumped on every failed connection or subscription: a waiter waiting for its
    /// subscription stops waiting and polls.
    failures: u64,
    /// A subscription task runs.
    task: bool,
    /// The server refused the subscription (`NOPERM`): waiters of this manager poll.
    disabled: bool,
    /// The manager is gone.
    closed: bool,
}

/// One waiting call.
struct Slot {
    wake: Notify,
}

/// A registered waiter: wakes on a release of its lock, or when its bound passes.
pub(crate) struct Waiter {
    inner: Arc<Inner>,
    channel: Box<[u8]>,
    slot: Arc<Slot>,
}

impl Notifier {
    pub(crate) fn new(client: redis::Client, connect_timeout: Duration, timeout: Duration) -> Self {
        Notifier {
            inner: Arc::new(Inner {
                client,
                connect_timeout,
                timeout,
                state: Mutex::new(State::default()),
                kick: Notify::new(),
                changed: Notify::new(),
            }),
        }
    }

    /// Whether callers of this manager already wait for the lock announced on `channel`.
    pub(crate) fn has_waiters(&self, channel: &[u8]) -> bool {
        self.inner.state().queues.has_waiters(channel)
    }

    /// Registers a waiter on `channel` and asks for the channel to be subscribed. Returns at
    /// once, without I/O; [`Waiter::listening`] tells when the subscription is confirmed.
    /// `None` when notifications are off for this manager (the server refused them) or no
    /// tokio runtime runs: the caller polls.
    pub(crate) fn register(&self, channel: &[u8]) -> Option<Waiter> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let slot = Arc::new(Slot {
            wake: Notify::new(),
        });
        {
            let mut state = self.inner.state();
            if state.disabled || state.closed {
                return None;
            }
            // Queued before the subscription is confirmed: a release confirmed after the
            // subscription finds this waiter in the queue.
            state.queues.enqueue(channel, Arc::clone(&slot));
            if !state.task {
                state.task = true;
                runtime.spawn(run(Arc::clone(&self.inner)));
            }
        }
        self.inner.kick.notify_one();
        Some(Waiter {
            inner: Arc::clone(&self.inner),
            channel: channel.into(),
            slot,
        })
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.inner.state().closed = true;
        self.inner.kick.notify_one();
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // No code that can panic runs under this lock; recover from poison anyway.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes the first waiter on `channel`.
    fn wake_one(&self, channel: &[u8]) {
        let slot = self.state().queues.wake_one(channel);
        if let Some(slot) = slot {
            slot.wake.notify_one();
        }
    }

    /// Wakes everyone: the connection is gone and messages may have been missed.
    fn connection_lost(&self, failed: bool) {
        let slots = {
            let mut state = self.state();
            state.subscribed.clear();
            if failed {
                state.failures += 1;
            }
            state.queues.wake_all()
        };
        for slot in slots {
            slot.wake.notify_one();
        }
        self.changed.notify_waiters();
    }
}

/// The subscription task of one manager: owns the connection, keeps the subscribed set
/// equal to the set of channels somebody waits on, and hands each message to the queue.
async fn run(inner: Arc<Inner>) {
    let mut conn: Option<(PubSubSink, PubSubStream)> = None;
    let mut failures: u32 = 0;
    let mut idle_since: Option<Instant> = None;
    loop {
        // Registered before reading the state, so a change in between is not missed.
        let kicked = inner.kick.notified();
        let mut kicked = std::pin::pin!(kicked);
        kicked.as_mut().enable();
        let (wanted, subscribed, closed) = {
            let state = inner.state();
            (
                state.queues.wanted(),
                state.subscribed.clone(),
                state.closed,
            )
        };
        if closed {
            break;
        }
        if wanted.is_empty() {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if conn.is_none() || since.elapsed() >= IDLE_LINGER {
                // Nothing to listen for: close, and end unless a waiter came meanwhile.
                conn = None;
                let mut state = inner.state();
                state.subscribed.clear();
                if state.queues.wanted().is_empty() || state.closed {
                    state.task = false;
                    return;
                }
                continue;
            }
        } else {
            idle_since = None;
        }
        if conn.is_none() && !wanted.is_empty() {
            match connect(&inner).await {
                Ok(opened) => conn = Some(opened),
                Err(e) => {
                    failures += 1;
                    tracing::debug!(error = %e, "no subscription connection; waiters poll");
                    inner.connection_lost(true);
                    pause(&inner, retry_pause(failures)).await;
                    continue;
                }
            }
        }
        if let Some((sink, _)) = conn.as_mut() {
            match reconcile(&inner, sink, &wanted, &subscribed).await {
                Ok(()) => failures = 0,
                Err(Refused::NoPermission(e)) => {
                    tracing::warn!(
                        error = %e,
                        "the server refuses release notifications (no permission on the lock \
                         channels); waiters of this manager poll instead"
                    );
                    conn = None;
                    inner.state().disabled = true;
                    inner.connection_lost(true);
                    break;
                }
                Err(Refused::Failed(e)) => {
                    failures += 1;
                    tracing::debug!(error = %e, "subscription failed; waiters poll");
                    conn = None;
                    inner.connection_lost(true);
                    pause(&inner, retry_pause(failures)).await;
                    continue;
                }
            }
        }
        let linger = idle_since.map(|since| since + IDLE_LINGER);
        let next = async {
            match conn.as_mut() {
                Some((_, stream)) => {
                    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = next => match msg {
                Some(msg) => {
                    if let Ok(channel) = msg.get_channel::<Vec<u8>>() {
                        inner.wake_one(&channel);
                    }
                }
                None => {
                    tracing::debug!("subscription connection closed; waking all waiters");
                    conn = None;
                    inner.connection_lost(false);
                }
            },
            _ = kicked => {}
            _ = sleep_until_opt(linger) => {}
        }
    }
    drop(conn);
    let mut state = inner.state();
    state.subscribed.clear();
    state.task = false;
    let slots = state.queues.wake_all();
    drop(state);
    for slot in slots {
        slot.wake.notify_one();
    }
    inner.changed.notify_waiters();
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn retry_pause(failures: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(RETRY_MAX)
}

/// Sleeps `pause`, or less if the manager is dropped meanwhile.
async fn pause(inner: &Inner, pause: Duration) {
    let until = tokio::time::Instant::now() + pause;
    loop {
        let kicked = inner.kick.notified();
        if inner.state().closed {
            return;
        }
        tokio::select! {
            _ = kicked => {}
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

async fn connect(inner: &Inner) -> redis::RedisResult<(PubSubSink, PubSubStream)> {
    let pubsub = tokio::time::timeout(inner.connect_timeout, inner.client.get_async_pubsub())
        .await
        .map_err(|_| timed_out("could not open the subscription connection in time"))??;
    Ok(pubsub.split())
}

fn timed_out(what: &str) -> redis::RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_owned()).into()
}

enum Refused {
    /// The server refused for lack of permission: asking again will not help.
    NoPermission(redis::RedisError),
    /// Anything else: the connection is dropped and made again.
    Failed(redis::RedisError),
}

/// Subscribes the wanted channels that are not subscribed and unsubscribes the others, one
/// command at a time, each bounded by the command timeout.
async fn reconcile(
    inner: &Inner,
    sink: &mut PubSubSink,
    wanted: &HashSet<Box<[u8]>>,
    subscribed: &HashSet<Box<[u8]>>,
) -> Result<(), Refused> {
    for channel in wanted.difference(subscribed) {
        match tokio::time::timeout(inner.timeout, sink.subscribe(&**channel)).await {
            Ok(Ok(())) => {
                inner.state().subscribed.insert(channel.clone());
                inner.changed.notify_waiters();
            }
            Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                return Err(Refused::NoPermission(e));
            }
            Ok(Err(e)) => return Err(Refused::Failed(e)),
            Err(_) => return Err(Refused::Failed(timed_out("SUBSCRIBE got no answer"))),
        }
    }
    for channel in subscribed.difference(wanted) {
        // Whatever the answer, a channel nobody waits on is not kept: on failure the
        // connection, and with it every subscription, is dropped.
        inner.state().subscribed.remove(channel);
        match tokio::time::timeout(inner.timeout, sink.unsubscribe(&**channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Refused::Failed(e)),
            Err(_) => return Err(Refused::Failed(timed_out("UNSUBSCRIBE got no answer"))),
        }
    }
    Ok(())
}

impl Waiter {
    /// Whether the server has confirmed the subscription of this waiter's channel: a
    /// release published from now on wakes a waiter of this lock in this manager.
    pub(crate) fn listening(&self) -> bool {
        self.inner.state().subscribed.contains(&self.channel)
    }

    /// Waits until [`listening`](Self::listening), and returns `true`; or returns `false`
    /// at `until`, or as soon as a subscription attempt fails or notifications are off.
    pub(crate) async fn until_listening(&self, until: Instant) -> bool {
        let failures = self.inner.state().failures;
        loop {
            let changed = self.inner.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.inner.state();
                if state.subscribed.contains(&self.channel) {
                    return true;
                }
                if state.disabled || state.closed || state.failures != failures {
                    return false;
                }
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(until.into()) => return false,
            }
        }
    }

    /// Sleeps until a release notification or `until`, whichever comes first.
    /// Returns `true` if woken by a notification.
    pub(crate) async fn wait(&self, until: Instant) -> bool {
        tokio::select! {
            _ = self.slot.wake.notified() => true,
            _ = tokio::time::sleep_until(until.into()) => false,
        }
    }

    /// Whether this waiter is the longest-waiting one of its lock in this manager.
    pub(crate) fn is_first(&self) -> bool {
        self.inner
            .state()
            .queues
            .is_first(&self.channel, |s| Arc::ptr_eq(s, &self.slot))
    }

    /// Shares what a failed attempt learned: the holder's lease runs until `until`.
    pub(crate) fn note_held_until(&self, until: Instant) {
        self.inner
            .state()
            .queues
            .note_held_until(&self.channel, until);
    }

    /// When the holder's lease runs out, as last reported by a waiter of this lock.
    pub(crate) fn held_until(&self) -> Option<Instant> {
        self.inner.state().queues.held_until(&self.channel)
    }

    /// Back in the queue before the next attempt, at the front if a notification woke it:
    /// it has waited longest. Must precede the attempt, or a release between the attempt
    /// and the next wait is missed. No I/O: a lost subscription is made again by the task.
    pub(crate) fn rearm(&self) {
        self.inner
            .state()
            .queues
            .rearm(&self.channel, |s| Arc::ptr_eq(s, &self.slot));
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let (passed_on, idle) = {
            let mut state = self.inner.state();
            let passed_on = state
                .queues
                .remove(&self.channel, |s| Arc::ptr_eq(s, &self.slot));
            (passed_on, !state.queues.has_waiters(&self.channel))
        };
        // A notification this waiter took but did not use belongs to the next one.
        if let Some(next) = passed_on {
            next.wake.notify_one();
        }
        if idle {
            // The task unsubscribes the channel nobody waits on.
            self.inner.kick.notify_one();
        }
    }
}

/// The waiters of each lock in this manager, in arrival order: plain data, every change
/// made under one lock, so a notification is handed over atomically.
///
/// Each registered waiter is in exactly one of two places: `waiting` (in line) or `woken`
/// (handed a notification it has not yet acted on). A waiter that leaves while woken hands
/// its notification to the next in line, so a release is never lost to a cancelled waiter.
struct Queues<T> {
    channels: HashMap<Box<[u8]>, Queue<T>>,
}

struct Queue<T> {
    waiting: VecDeque<T>,
    woken: Vec<T>,
    /// When the current holder's lease runs out unless extended, as last reported.
    held_until: Option<Instant>,
}

impl<T> Default for Queues<T> {
    fn default() -> Self {
        Queues {
            channels: HashMap::new(),
        }
    }
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            waiting: VecDeque::new(),
            woken: Vec::new(),
            held_until: None,
        }
    }
}

impl<T: Clone> Queues<T> {
    /// A new waiter joins at the back.
    fn enqueue(&mut self, channel: &[u8], slot: T) {
        self.channels
            .entry(channel.into())
            .or_default()
            .waiting
            .push_back(slot);
    }

    /// Hands a notification to the first waiter in line, if any; the caller wakes it.
    fn wake_one(&mut self, channel: &[u8]) -> Option<T> {
        let queue = self.channels.get_mut(channel)?;
        let slot = queue.waiting.pop_front()?;
        queue.woken.push(slot.clone());
        Some(slot)
    }

    /// Hands a notification to every waiter in line; the caller wakes them.
    fn wake_all(&mut self) -> Vec<T> {
        let mut all = Vec::new();
        for queue in self.channels.values_mut() {
            let drained: Vec<T> = queue.waiting.drain(..).collect();
            queue.woken.extend(drained.iter().cloned());
            all.extend(drained);
        }
        all
    }

    /// The waiter matching `is` acted (it is about to attempt): back in line, at the front
    /// if it had been handed a notification.
    fn rearm(&mut self, channel: &[u8], is: impl Fn(&T) -> bool) {
        let Some(queue) = self.channels.get_mut(channel) else {
            return;
        };
        if let Some(i) = queue.woken.iter().position(&is) {
            let slot = queue.woken.swap_remove(i);
            queue.waiting.push_front(slot);
        }
    }

    /// The waiter matching `is` leaves. If it held an unused notification, the next in
    /// line is handed it and returned, for the caller to wake.
    fn remove(&mut self, channel: &[u8], is: impl Fn(&T) -> bool) -> Option<T> {
        let queue = self.channels.get_mut(channel)?;
        queue.waiting.retain(|s| !is(s));
        let was_woken = match queue.woken.iter().position(&is) {
            Some(i) => {
                queue.woken.swap_remove(i);
                true
            }
            None => false,
        };
        let next = if was_woken {
            self.wake_one(channel)
        } else {
            None
        };
        if let Some(queue) = self.channels.get(channel)
            && queue.waiting.is_empty()
            && queue.woken.is_empty()
        {
            self.channels.remove(channel);
        }
        next
    }

    fn has_waiters(&self, channel: &[u8]) -> bool {
        self.channels.contains_key(channel)
    }

    fn is_first(&self, channel: &[u8], is: impl Fn(&T) -> bool) -> bool {
        self.channels
            .get(channel)
            .and_then(|q| q.waiting.front())
            .is_some_and(is)
    }

    fn note_held_until(&mut self, channel: &[u8], until: Instant) {
        if let Some(queue) = self.channels.get_mut(channel) {
            queue.held_until = Some(until);
        }
    }

    fn held_until(&self, channel: &[u8]) -> Option<Instant> {
        self.channels.get(channel).and_then(|q| q.held_until)
    }

    /// The channels somebody waits on.
    fn wanted(&self) -> HashSet<Box<[u8]>> {
        self.channels.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet, VecDeque};

    use super::Queues;

    const CH: &[u8] = b"c";
    const WAITERS: u8 = 3;

    /// One step any waiter or the subscription task can take; each is atomic (one lock).
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Waiter `i` registers (then makes its first attempt).
        Register(u8),
        /// A release message arrives.
        Release,
        /// Waiter `i` wakes or times out, rearms and attempts.
        Attempt(u8),
        /// Waiter `i` is dropped (gave up, cancelled, or acquired).
        Drop(u8),
    }

    /// The abstract state: the queue, who is registered, and whether a release is still
    /// owed an attempt (a release happened while waiters were registered, and none of them
    /// has attempted since).
    #[derive(Clone, PartialEq, Eq, Hash, Debug)]
    struct Model {
        waiting: Vec<u8>,
        woken: BTreeSet<u8>,
        registered: BTreeSet<u8>,
        owed: bool,
    }

    fn model_of(q: &Queues<u8>, registered: &BTreeSet<u8>, owed: bool) -> Model {
        let (waiting, woken) = match q.channels.get(CH) {
            Some(queue) => (
                queue.waiting.iter().copied().collect(),
                queue.woken.iter().copied().collect(),
            ),
            None => (Vec::new(), BTreeSet::new()),
        };
        Model {
            waiting,
            woken,
            registered: registered.clone(),
            owed,
        }
    }

    fn queues_of(m: &Model) -> Queues<u8> {
        let mut q = Queues::default();
        if !m.waiting.is_empty() || !m.woken.is_empty() {
            let queue = q.channels.entry(CH.into()).or_default();
            queue.waiting = m.waiting.iter().copied().collect::<VecDeque<_>>();
            queue.woken = m.woken.iter().copied().collect();
        }
        q
    }

    /// Every reachable state of up to three waiters and any number of releases, under
    /// every interleaving of their steps: a release made while waiters are registered is
    /// always followed by an attempt of one of them, or is held by a woken waiter that
    /// will attempt; every registered waiter is in the queue exactly once; nobody is
    /// left in the queue once everyone has left.
    #[test]
    fn no_interleaving_loses_a_release_or_a_waiter() {
        let start = Model {
            waiting: Vec::new(),
            woken: BTreeSet::new(),
            registered: BTreeSet::new(),
            owed: false,
        };
        let mut seen = HashSet::new();
        let mut todo = vec![start];
        while let Some(m) = todo.pop() {
            if !seen.insert(m.clone()) {
                continue;
            }
            // Each registered waiter sits in exactly one place.
            let mut places: Vec<u8> = m.waiting.clone();
            places.extend(m.woken.iter().copied());
            places.sort_unstable();
            let registered: Vec<u8> = m.registered.iter().copied().collect();
            assert_eq!(places, registered, "{m:?}");
            // A release owed an attempt is held by a woken waiter, unless nobody waits.
            if m.owed && !m.registered.is_empty() {
                assert!(!m.woken.is_empty(), "release lost: {m:?}");
            }
            let mut steps = vec![Step::Release];
            for i in 0..WAITERS {
                if m.registered.contains(&i) {
                    steps.push(Step::Attempt(i));
                    steps.push(Step::Drop(i));
                } else {
                    steps.push(Step::Register(i));
                }
            }
            for step in steps {
                let mut q = queues_of(&m);
                let mut registered = m.registered.clone();
                let mut owed = m.owed;
                match step {
                    Step::Register(i) => {
                        q.enqueue(CH, i);
                        registered.insert(i);
                        // Registering precedes an attempt, which sees any earlier release.
                        owed = false;
                    }
                    Step::Release => {
                        let woke = q.wake_one(CH);
                        // Owed unless nobody waits at all, or a woken waiter already
                        // holds an earlier notification (one attempt serves both).
                        owed = !registered.is_empty();
                        if woke.is_none() && q.channels.get(CH).is_none_or(|c| c.woken.is_empty()) {
                            owed = false;
                            assert!(registered.is_empty(), "waiters but none woken: {m:?}");
                        }
                    }
                    Step::Attempt(i) => {
                        q.rearm(CH, |s| *s == i);
                        owed = false;
                    }
                    Step::Drop(i) => {
                        let _next = q.remove(CH, |s| *s == i);
                        registered.remove(&i);
                    }
                }
                if registered.is_empty() {
                    assert!(q.channels.is_empty(), "left behind after {step:?}: {m:?}");
                    owed = false;
                }
                todo.push(model_of(&q, &registered, owed));
            }
        }
        assert!(seen.len() > 50, "explored {} states", seen.len());
    }

    #[test]
    fn a_woken_waiter_that_leaves_hands_its_release_to_the_next() {
        let mut q = Queues::default();
        q.enqueue(CH, 1u8);
        q.enqueue(CH, 2u8);
        assert_eq!(q.wake_one(CH), Some(1));
        assert_eq!(q.remove(CH, |s| *s == 1), Some(2));
        assert_eq!(q.remove(CH, |s| *s == 2), None);
        assert!(!q.has_waiters(CH));
    }

    #[test]
    fn a_woken_waiter_that_loses_again_keeps_the_front() {
        let mut q = Queues::default();
        q.enqueue(CH, 1u8);
        q.enqueue(CH, 2u8);
        assert_eq!(q.wake_one(CH), Some(1));
        q.rearm(CH, |s| *s == 1);
        assert!(q.is_first(CH, |s| *s == 1));
    }
}
