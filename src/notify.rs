//! Release notifications: waiters sleep until the holder releases, instead of polling.
//!
//! The release script publishes on the lock's channel (`<prefix>{<name>}:released`). One
//! pub/sub connection per manager carries the subscriptions of all its waiters; a message
//! wakes the longest-waiting waiter of that lock in this manager (first come, first
//! served), not all of them. A waiter that loses the race again keeps its place at the
//! front of the queue.
//!
//! Pub/sub is fire-and-forget, so a notification is only ever a shortcut: every wait is
//! also bounded by the holder's remaining TTL, the backoff policy and the wait budget. A
//! lost connection wakes every waiter (they retry at once) and is re-established by the
//! next waiter that needs it. A channel is unsubscribed when nobody waits on it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_core::Stream;
use redis::aio::PubSubSink;
use tokio::sync::Notify;

use crate::error::{Error, Result};

/// Waiters per channel.
type Queues = HashMap<Box<[u8]>, Queue>;

/// The waiters of one lock in this manager, in arrival order, and what the last failed
/// attempt among them learned about the holder's lease.
#[derive(Default)]
struct Queue {
    slots: VecDeque<Arc<Slot>>,
    /// When the current holder's lease runs out unless extended, as last reported.
    held_until: Option<Instant>,
}

/// The pub/sub side of one manager.
pub(crate) struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    connect_timeout: Duration,
    timeout: Duration,
    /// Who waits on which channel, in arrival order.
    waiters: Mutex<Queues>,
    /// The subscription connection and its subscribed channels. An async mutex: changes to
    /// the subscription set are sent one at a time, in order.
    conn: tokio::sync::Mutex<Conn>,
}

#[derive(Default)]
struct Conn {
    sink: Option<PubSubSink>,
    /// Bumped whenever the connection is replaced, so a reader task of an old connection
    /// does not tear down a new one.
    generation: u64,
    subscribed: HashSet<Box<[u8]>>,
}

/// One waiting call.
struct Slot {
    wake: Notify,
    /// Set when this slot was handed a notification it has not yet acted on.
    woken: AtomicBool,
}

/// A registered waiter: wakes on a release of its lock, or when its bound passes.
pub(crate) struct Waiter {
    inner: Arc<Inner>,
    channel: Box<[u8]>,
    slot: Arc<Slot>,
}

impl Notifier {
    /// Whether callers of this manager already wait for the lock announced on `channel`.
    pub(crate) fn has_waiters(&self, channel: &[u8]) -> bool {
        self.inner.has_waiters(channel)
    }

    pub(crate) fn new(client: redis::Client, connect_timeout: Duration, timeout: Duration) -> Self {
        Notifier {
            inner: Arc::new(Inner {
                client,
                connect_timeout,
                timeout,
                waiters: Mutex::new(HashMap::new()),
                conn: tokio::sync::Mutex::new(Conn::default()),
            }),
        }
    }

    /// Registers a waiter on `channel`, subscribing first if this manager is not yet
    /// subscribed. When this returns `Ok`, every later release of the lock wakes a waiter.
    pub(crate) async fn register(&self, channel: &[u8]) -> Result<Waiter> {
        let slot = Arc::new(Slot {
            wake: Notify::new(),
            woken: AtomicBool::new(false),
        });
        // Queue first, then make sure of the subscription: a release confirmed after the
        // subscription finds this waiter in the queue.
        self.inner.enqueue(channel, Arc::clone(&slot), false);
        let waiter = Waiter {
            inner: Arc::clone(&self.inner),
            channel: channel.into(),
            slot,
        };
        self.inner.subscribe(channel).await?;
        Ok(waiter)
    }
}

impl Inner {
    fn waiters(&self) -> MutexGuard<'_, Queues> {
        // No code that can panic runs under this lock; recover from poison anyway.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enqueue(&self, channel: &[u8], slot: Arc<Slot>, front: bool) {
        let mut waiters = self.waiters();
        let queue = &mut waiters.entry(channel.into()).or_default().slots;
        if !queue.iter().any(|s| Arc::ptr_eq(s, &slot)) {
            if front {
                queue.push_front(slot);
            } else {
                queue.push_back(slot);
            }
        }
    }

    /// Wakes the first waiter on `channel`; it leaves the queue until it waits again.
    fn wake_one(&self, channel: &[u8]) {
        let slot = self
            .waiters()
            .get_mut(channel)
            .and_then(|q| q.slots.pop_front());
        if let Some(slot) = slot {
            slot.woken.store(true, Ordering::Release);
            slot.wake.notify_one();
        }
    }

    /// Wakes everyone: the connection is gone and messages may have been missed.
    fn wake_all(&self) {
        let all: Vec<Arc<Slot>> = self
            .waiters()
            .values_mut()
            .flat_map(|queue| queue.slots.drain(..))
            .collect();
        for slot in all {
            slot.woken.store(true, Ordering::Release);
            slot.wake.notify_one();
        }
    }

    fn has_waiters(&self, channel: &[u8]) -> bool {
        self.waiters()
            .get(channel)
            .is_some_and(|q| !q.slots.is_empty())
    }

    async fn subscribe(self: &Arc<Self>, channel: &[u8]) -> Result<()> {
        let mut conn = self.conn.lock().await;
        if conn.subscribed.contains(channel) {
            return Ok(());
        }
        if conn.sink.is_none() {
            self.connect(&mut conn).await?;
        }
        let Some(sink) = conn.sink.as_mut() else {
            return Err(timeout_error("no subscription connection"));
        };
        match tokio::time::timeout(self.timeout, sink.subscribe(channel)).await {
            Ok(Ok(())) => {
                conn.subscribed.insert(channel.into());
                Ok(())
            }
            Ok(Err(e)) => {
                conn.sink = None;
                Err(Error::Redis(e))
            }
            Err(_) => {
                conn.sink = None;
                Err(timeout_error("SUBSCRIBE got no answer"))
            }
        }
    }

    async fn connect(self: &Arc<Self>, conn: &mut Conn) -> Result<()> {
        let pubsub = tokio::time::timeout(self.connect_timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| timeout_error("could not open the subscription connection"))??;
        let (sink, stream) = pubsub.split();
        conn.generation += 1;
        conn.sink = Some(sink);
        conn.subscribed.clear();
        tokio::spawn(read(Arc::downgrade(self), stream, conn.generation));
        Ok(())
    }

    /// Drops the subscription of `channel` if nobody waits on it any more.
    async fn unsubscribe_if_idle(&self, channel: Box<[u8]>) {
        let mut conn = self.conn.lock().await;
        if self.has_waiters(&channel) || !conn.subscribed.contains(&channel) {
            return;
        }
        conn.subscribed.remove(&channel);
        if let Some(sink) = conn.sink.as_mut()
            && tokio::time::timeout(self.timeout, sink.unsubscribe(&*channel))
                .await
                .is_err()
        {
            conn.sink = None;
        }
    }
}

fn timeout_error(what: &str) -> Error {
    Error::Redis(std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_owned()).into())
}

/// Reads messages until the connection ends, then wakes every waiter.
async fn read(
    inner: std::sync::Weak<Inner>,
    mut stream: redis::aio::PubSubStream,
    generation: u64,
) {
    while let Some(msg) = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Ok(channel) = msg.get_channel::<Vec<u8>>() {
            inner.wake_one(&channel);
        }
    }
    let Some(inner) = inner.upgrade() else {
        return;
    };
    tracing::debug!("subscription connection closed; waking all waiters");
    {
        let mut conn = inner.conn.lock().await;
        if conn.generation == generation {
            conn.sink = None;
            conn.subscribed.clear();
        }
    }
    inner.wake_all();
}

impl Waiter {
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
            .waiters()
            .get(&self.channel)
            .and_then(|q| q.slots.front())
            .is_some_and(|first| Arc::ptr_eq(first, &self.slot))
    }

    /// Shares what a failed attempt learned: the holder's lease runs until `until`.
    pub(crate) fn note_held_until(&self, until: Instant) {
        if let Some(queue) = self.inner.waiters().get_mut(&self.channel) {
            queue.held_until = Some(until);
        }
    }

    /// When the holder's lease runs out, as last reported by a waiter of this lock.
    pub(crate) fn held_until(&self) -> Option<Instant> {
        self.inner
            .waiters()
            .get(&self.channel)
            .and_then(|q| q.held_until)
    }

    /// Back in the queue before the next attempt, at the front if a notification woke it:
    /// it has waited longest. Must precede the attempt, or a release between the attempt
    /// and the next wait is missed. Re-subscribes if the connection was lost; if that
    /// fails, the waiter falls back on its time bounds.
    pub(crate) async fn rearm(&self) {
        let woken = self.slot.woken.swap(false, Ordering::AcqRel);
        self.inner
            .enqueue(&self.channel, Arc::clone(&self.slot), woken);
        if let Err(e) = self.inner.subscribe(&self.channel).await {
            tracing::debug!(error = %e, "no release notifications; waiting on time bounds");
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        {
            let mut waiters = self.inner.waiters();
            if let Some(queue) = waiters.get_mut(&self.channel) {
                queue.slots.retain(|s| !Arc::ptr_eq(s, &self.slot));
                if queue.slots.is_empty() {
                    waiters.remove(&self.channel);
                }
            }
        }
        // A notification this waiter took but did not use belongs to the next one.
        if self.slot.woken.load(Ordering::Acquire) {
            self.inner.wake_one(&self.channel);
        }
        if !self.inner.has_waiters(&self.channel)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let inner = Arc::clone(&self.inner);
            let channel = self.channel.clone();
            runtime.spawn(async move { inner.unsubscribe_if_idle(channel).await });
        }
    }
}
