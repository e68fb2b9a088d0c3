//! Release notifications: waiters sleep until the holder releases, instead of polling.
//!
//! The release script publishes on the lock's channel (`<prefix>{<name>}:released`). One
//! subscription connection per manager, owned by one background task, carries the
//! subscriptions of all its waiters; a message wakes the longest-waiting waiter of that lock
//! in this manager (first come, first served), not all of them. A waiter that loses the race
//! again keeps its place at the front of the queue. In fair mode the queue that decides
//! lives in Redis, and a release's message names the waiter at its head: that waiter is
//! woken if it waits in this manager, and nobody else is, here or in any other manager.
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
//!
//! A manager over several primaries (Redlock) subscribes on every node, one task and
//! connection per node, all feeding the one queue. A release is announced (payload `~`) by
//! every node it deleted the lease on; the first message wakes one waiter, and the repeats
//! from the other nodes wake nobody while that waiter has yet to act (a repeat that comes
//! after it went back in line, because its attempt came before the release reached enough
//! nodes, wakes it again). A waiter counts as listening once its channel is subscribed on
//! `N - majority + 1` nodes: then every release a majority confirmed is announced by at
//! least one node it listens to, so one failed node cannot silence a release.

mod link;
pub(crate) mod pass;
mod queue;
mod task;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub(crate) use link::Source;
pub(crate) use pass::{PassedLease, pass_on};
use queue::Queues;

/// The pub/sub side of one manager. Dropping it closes the subscription connection and
/// ends its task.
pub(crate) struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    /// This manager's id (16 hex digits): fair mode's releases announce the next waiter on
    /// the lock's channel for its manager, `<channel>:<id>`, so only that manager hears it.
    id: [u8; 16],
    /// One source per node (a single primary has one node, a lock over several primaries
    /// one per primary): the node's subscription connects through the first of its
    /// servers, and through the next after each failure (a primary and its replicas: each
    /// carries every publication), or over a cluster connection (sharded pub/sub).
    sources: Vec<Source>,
    /// On how many nodes a channel must be subscribed for its waiters to be listening.
    need: usize,
    connect_timeout: Duration,
    timeout: Duration,
    state: Mutex<State>,
    /// Wakes a node's subscription task: the wanted channels changed, or the manager is
    /// gone. One per node.
    kicks: Vec<Notify>,
    /// Wakes waiters that wait for their channel to be subscribed, on every change of the
    /// subscribed set, of `failures` and of `disabled`.
    changed: Notify,
}

struct State {
    queues: Queues<Arc<Slot>>,
    /// Per node: the channels the server confirmed on the node's current connection.
    subscribed: Vec<HashSet<Box<[u8]>>>,
    /// Bumped on every failed connection or subscription: a waiter waiting for its
    /// subscription stops waiting and polls, unless enough other nodes can still confirm.
    failures: u64,
    /// Per node: its last connection or subscription attempt failed.
    failed: Vec<bool>,
    /// Per node: the id of the subscription task that runs for it.
    task: Vec<Option<u64>>,
    /// The id the next subscription task gets.
    next_task: u64,
    /// The server refused the subscription (`NOPERM`): waiters of this manager poll.
    disabled: bool,
    /// The manager is gone.
    closed: bool,
}

/// One waiting call.
struct Slot {
    wake: Notify,
    /// Fair mode: the waiter id its lock's queue in Redis knows it by. A release names the
    /// waiter whose turn it is, and only that one is woken.
    id: Option<Box<[u8]>>,
    /// Fair mode on one primary: the last lease a release announced it handed to this
    /// waiter.
    handed: Mutex<Option<Handoff>>,
    /// Fair mode: a release named this waiter since its last attempt.
    named: AtomicBool,
    /// What it offers and receives when a holder of this manager passes it the lease.
    passing: pass::PassingLock,
}

/// A lease a fair-mode release handed to a waiter (announced `<id> <token> <fence>`): the
/// token the waiter's queue entry left, and the fencing token taken for it (`0`: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Handoff {
    pub(crate) token: Box<[u8]>,
    pub(crate) fence: u64,
}

impl Handoff {
    /// Splits a fair-mode announcement into the waiter id and, if it hands a lease over,
    /// the handoff.
    fn parse(payload: &[u8]) -> (&[u8], Option<Handoff>) {
        let mut parts = payload.splitn(3, |&b| b == b' ');
        let id = parts.next().unwrap_or_default();
        let handoff = match (parts.next(), parts.next()) {
            (Some(token), Some(fence)) => std::str::from_utf8(fence)
                .ok()
                .and_then(|f| f.parse().ok())
                .map(|fence| Handoff {
                    token: token.into(),
                    fence,
                }),
            _ => None,
        };
        (id, handoff)
    }
}

/// A registered waiter: wakes on a release of its lock, or when its bound passes.
pub(crate) struct Waiter {
    inner: Arc<Inner>,
    channel: Box<[u8]>,
    slot: Arc<Slot>,
}

impl State {
    fn new(nodes: usize) -> Self {
        State {
            queues: Queues::default(),
            subscribed: vec![HashSet::new(); nodes],
            failures: 0,
            failed: vec![false; nodes],
            task: vec![None; nodes],
            next_task: 0,
            disabled: false,
            closed: false,
        }
    }

    /// On how many nodes `channel` is subscribed.
    fn subscribed_on(&self, channel: &[u8]) -> usize {
        self.subscribed
            .iter()
            .filter(|node| node.contains(channel))
            .count()
    }
}

impl Notifier {
    /// The notifications of a manager on one primary.
    pub(crate) fn new(client: redis::Client, connect_timeout: Duration, timeout: Duration) -> Self {
        Self::over(vec![client], 1, connect_timeout, timeout)
    }

    /// The notifications of a manager whose publications reach every one of `clients`'
    /// servers (a Redis Cluster carries classic pub/sub to all its nodes): one
    /// subscription, through the first client that connects, moved to the next one when
    /// its server fails.
    pub(crate) fn any_of(
        clients: Vec<redis::Client>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Self {
        Self::with_sources(vec![Source::Servers(clients)], 1, connect_timeout, timeout)
    }

    /// The notifications of a manager over the nodes behind `clients`, listening once a
    /// channel is subscribed on `need` of them (at least one, at most all).
    pub(crate) fn over(
        clients: Vec<redis::Client>,
        need: usize,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Self {
        let sources = clients
            .into_iter()
            .map(|c| Source::Servers(vec![c]))
            .collect();
        Self::with_sources(sources, need, connect_timeout, timeout)
    }

    /// The notifications of a manager on a Redis Cluster whose releases are announced
    /// with `SPUBLISH`: one cluster connection subscribes each channel with `SSUBSCRIBE`
    /// on the shard that owns the channel's slot (the lock's), and subscribes it again
    /// where the slot moves.
    #[cfg(feature = "cluster")]
    pub(crate) fn sharded(
        nodes: Vec<redis::ConnectionInfo>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Self {
        Self::with_sources(vec![Source::Shards(nodes)], 1, connect_timeout, timeout)
    }

    fn with_sources(
        sources: Vec<Source>,
        need: usize,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Self {
        let mut id = [0u8; 16];
        let random = uuid::Uuid::new_v4().simple().to_string();
        id.copy_from_slice(&random.as_bytes()[..16]);
        let nodes = sources.len();
        Notifier {
            inner: Arc::new(Inner {
                id,
                need: need.clamp(1, nodes.max(1)),
                sources,
                connect_timeout,
                timeout,
                state: Mutex::new(State::new(nodes)),
                kicks: (0..nodes).map(|_| Notify::new()).collect(),
                changed: Notify::new(),
            }),
        }
    }

    /// This manager's id, for fair mode's waiter ids and channels.
    pub(crate) fn id(&self) -> &[u8] {
        &self.inner.id
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
        self.register_as(channel, None)
    }

    /// [`register`](Self::register) for a waiter of a fair lock, known in the lock's queue
    /// as `id`: a release that names `id` wakes this waiter.
    pub(crate) fn register_as(&self, channel: &[u8], id: Option<&[u8]>) -> Option<Waiter> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let slot = Arc::new(Slot {
            wake: Notify::new(),
            id: id.map(Into::into),
            handed: Mutex::new(None),
            named: AtomicBool::new(false),
            passing: Default::default(),
        });
        {
            let mut state = self.inner.state();
            if state.disabled || state.closed {
                return None;
            }
            // Queued before the subscription is confirmed: a release confirmed after the
            // subscription finds this waiter in the queue.
            state.queues.enqueue(channel, Arc::clone(&slot));
            for node in 0..state.task.len() {
                if state.task[node].is_none() {
                    let id = state.next_task;
                    state.next_task += 1;
                    state.task[node] = Some(id);
                    runtime.spawn(task::run(Arc::clone(&self.inner), node, id));
                }
            }
        }
        self.inner.kick_all();
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
        self.inner.kick_all();
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // No code that can panic runs under this lock; recover from poison anyway.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes every node's subscription task.
    fn kick_all(&self) {
        for kick in &self.kicks {
            kick.notify_one();
        }
    }

    /// Wakes the first waiter on `channel`.
    fn wake_one(&self, channel: &[u8]) {
        let slot = self.state().queues.wake_one(channel);
        if let Some(slot) = slot {
            slot.wake.notify_one();
        }
    }

    /// Wakes every waiter on `channel`: the release was announced for everyone (`*`).
    fn wake_channel(&self, channel: &[u8]) {
        let slots = self.state().queues.wake_channel(channel);
        for slot in slots {
            slot.wake.notify_one();
        }
    }

    /// A release on `channel` named `id` (fair mode): wakes that waiter if it waits here,
    /// with the lease it was `handed`, if any. Nobody else is woken, here or in any other
    /// manager.
    fn wake_id(&self, channel: &[u8], id: &[u8], handed: Option<Handoff>) {
        let slot = self
            .state()
            .queues
            .find(channel, |s| s.id.as_deref() == Some(id));
        if let Some(slot) = slot {
            if handed.is_some() {
                *slot
                    .handed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = handed;
            }
            slot.named.store(true, Ordering::Release);
            slot.wake.notify_one();
        }
    }

    /// A message on `channel`: an empty one wakes this manager's first waiter, one that
    /// names a waiter (fair mode) wakes that waiter only.
    fn on_message(&self, channel: &[u8], payload: &[u8]) {
        if payload.is_empty() {
            self.wake_one(channel);
        } else if payload == b"~" {
            // A release several nodes announce: one waiter acts on it.
            let slot = self.state().queues.wake_one_unless_acting(channel);
            if let Some(slot) = slot {
                slot.wake.notify_one();
            }
        } else if payload == b"*" {
            // A release several waiters can use at once (read permits, a writer's release).
            self.wake_channel(channel);
        } else {
            let (id, handed) = Handoff::parse(payload);
            self.wake_id(channel, id, handed);
        }
    }

    /// `node`'s connection is gone (or could not be made, if `failed`). Wakes everyone if
    /// messages may have been missed (the node had subscriptions) or too few nodes are left
    /// to listen on: a waiter that slept sure of a notification must not sleep on. A node
    /// that never subscribed anything wakes nobody, so one that stays down does not make
    /// the waiters of a manager over several nodes attempt at every retry.
    fn connection_lost(&self, node: usize, failed: bool) {
        let slots = {
            let mut state = self.state();
            let had_subscriptions = state.subscribed.get(node).is_some_and(|s| !s.is_empty());
            if let Some(subscribed) = state.subscribed.get_mut(node) {
                subscribed.clear();
            }
            if failed {
                state.failures += 1;
                if let Some(flag) = state.failed.get_mut(node) {
                    *flag = true;
                }
            }
            let working = state.failed.iter().filter(|failed| !**failed).count();
            if had_subscriptions || working < self.need {
                state.queues.wake_all()
            } else {
                Vec::new()
            }
        };
        for slot in slots {
            slot.wake.notify_one();
        }
        self.changed.notify_waiters();
    }
}

impl Inner {
    /// The server ended `node`'s subscription of `channel` by itself (its slot moved to
    /// another shard): it is no longer subscribed there, and its waiters are woken, since
    /// the release they wait for may have been announced where the slot went. A channel
    /// not marked subscribed (the echo of our own `SUNSUBSCRIBE`) changes nothing.
    fn channel_dropped(&self, node: usize, channel: &[u8]) {
        let slots = {
            let mut state = self.state();
            let was = state
                .subscribed
                .get_mut(node)
                .is_some_and(|subscribed| subscribed.remove(channel));
            if !was {
                return;
            }
            state.queues.wake_channel(channel)
        };
        for slot in slots {
            slot.wake.notify_one();
        }
        self.changed.notify_waiters();
    }
}

impl Waiter {
    /// Whether the server has confirmed the subscription of this waiter's channel: a
    /// release published from now on wakes a waiter of this lock in this manager.
    pub(crate) fn listening(&self) -> bool {
        self.inner.state().subscribed_on(&self.channel) >= self.inner.need
    }

    /// Waits until [`listening`](Self::listening), and returns `true`; or returns `false`
    /// at `until`, as soon as notifications are off, or when a subscription attempt fails
    /// and too few nodes are left to confirm the subscription.
    pub(crate) async fn until_listening(&self, until: Instant) -> bool {
        let failures = self.inner.state().failures;
        loop {
            let changed = self.inner.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.inner.state();
                if state.subscribed_on(&self.channel) >= self.inner.need {
                    return true;
                }
                let working = state.failed.iter().filter(|failed| !**failed).count();
                if state.disabled
                    || state.closed
                    || (state.failures != failures && working < self.inner.need)
                {
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
    pub(crate) async fn sleep(&self, until: Instant) -> bool {
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

    /// Fair mode: whether a release named this waiter since this was last asked (its
    /// next attempt is its turn, as of that release).
    pub(crate) fn take_named(&self) -> bool {
        self.slot.named.swap(false, Ordering::AcqRel)
    }

    /// Fair mode: the last lease a release announced it handed to this waiter.
    pub(crate) fn handed(&self) -> Option<Handoff> {
        self.slot
            .handed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
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
            // The tasks unsubscribe the channel nobody waits on.
            self.inner.kick_all();
        }
    }
}
