//! The subscription task of one manager: the only code that talks to the subscription
//! connection.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Inner;
use super::link::{Event, Link, Source};
use crate::error::timed_out;

/// How long the subscription connection stays open with no waiter before it is closed.
const IDLE_LINGER: Duration = Duration::from_secs(1);

/// The pause after the first failed connection or subscription; doubled per failure.
const RETRY_MIN: Duration = Duration::from_millis(50);

/// The longest pause between two tries to (re)establish the subscription connection.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The subscription task of one node of a manager: owns the node's connection, keeps its
/// subscribed set equal to the set of channels somebody waits on, and hands each message
/// to the queue.
pub(super) async fn run(inner: Arc<Inner>, node: usize, id: u64) {
    // However the task ends, even dropped unfinished with its runtime, the next waiter
    // starts a new one.
    let _running = Running(Arc::clone(&inner), node, id);
    let mut conn: Option<Link> = None;
    let mut failures: u32 = 0;
    // Which of the node's clients the next connection goes through: moved on after every
    // failure or lost connection (with one client, always that one).
    let mut through: usize = 0;
    let mut idle_since: Option<Instant> = None;
    loop {
        // Registered before reading the state, so a change in between is not missed.
        let kicked = inner.kicks[node].notified();
        let mut kicked = std::pin::pin!(kicked);
        kicked.as_mut().enable();
        let (wanted, subscribed, closed) = {
            let state = inner.state();
            (
                state.queues.wanted(),
                state.subscribed[node].clone(),
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
                state.subscribed[node].clear();
                if state.queues.wanted().is_empty() || state.closed {
                    // Cleared under the same lock as the decision: a waiter registering
                    // from now on starts a new task.
                    state.task[node] = None;
                    return;
                }
                continue;
            }
        } else {
            idle_since = None;
        }
        if conn.is_none() && !wanted.is_empty() {
            match connect(&inner, node, through).await {
                Ok(opened) => conn = Some(opened),
                Err(e) => {
                    failures += 1;
                    through = through.wrapping_add(1);
                    tracing::debug!(error = %e, "no subscription connection; waiters poll");
                    inner.connection_lost(node, true);
                    pause(&inner, node, retry_pause(&inner, node, failures)).await;
                    continue;
                }
            }
        }
        if let Some(link) = conn.as_mut() {
            match reconcile(&inner, node, link, &wanted, &subscribed).await {
                Ok(()) => {
                    failures = 0;
                    inner.state().failed[node] = false;
                }
                Err(Refused::NoPermission(e)) => {
                    tracing::warn!(
                        error = %e,
                        "the server refuses release notifications (no permission on the lock \
                         channels); waiters of this manager poll instead"
                    );
                    conn = None;
                    inner.state().disabled = true;
                    inner.connection_lost(node, true);
                    break;
                }
                Err(Refused::Failed(e)) => {
                    failures += 1;
                    through = through.wrapping_add(1);
                    tracing::debug!(error = %e, "subscription failed; waiters poll");
                    conn = None;
                    inner.connection_lost(node, true);
                    pause(&inner, node, retry_pause(&inner, node, failures)).await;
                    continue;
                }
            }
        }
        let linger = idle_since.map(|since| since + IDLE_LINGER);
        let next = async {
            match conn.as_mut() {
                Some(link) => link.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = next => match event {
                Event::Message(channel, payload) => inner.on_message(&channel, &payload),
                Event::Dropped(channel) => {
                    tracing::debug!("the server ended a sharded subscription; subscribing again");
                    inner.channel_dropped(node, &channel);
                }
                Event::Nothing => {}
                Event::Closed => {
                    tracing::debug!("subscription connection closed; waking all waiters");
                    conn = None;
                    through = through.wrapping_add(1);
                    inner.connection_lost(node, false);
                }
            },
            _ = kicked => {}
            _ = sleep_until_opt(linger) => {}
        }
    }
    drop(conn);
    let mut state = inner.state();
    state.subscribed[node].clear();
    if state.task[node] == Some(id) {
        state.task[node] = None;
    }
    let slots = state.queues.wake_all();
    drop(state);
    for slot in slots {
        slot.wake.notify_one();
    }
    inner.changed.notify_waiters();
}

/// Clears the node's "a task runs" mark when this task ends or is dropped, unless a newer
/// task has taken it over already.
struct Running(Arc<Inner>, usize, u64);

impl Drop for Running {
    fn drop(&mut self) {
        let Running(inner, node, id) = self;
        let mut state = inner.state();
        if state.task[*node] == Some(*id) {
            state.task[*node] = None;
            state.subscribed[*node].clear();
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The pause after `failures` failures in a row: doubling from [`RETRY_MIN`], at most
/// [`RETRY_MAX`], or the source's own cap if lower (a cluster's, whose connection follows
/// a failover by itself).
fn retry_pause(inner: &Inner, node: usize, failures: u32) -> Duration {
    let cap = inner
        .sources
        .get(node)
        .and_then(Source::retry_cap)
        .map_or(RETRY_MAX, |cap| cap.min(RETRY_MAX));
    RETRY_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(cap)
}

/// Sleeps `pause`, or less if the manager is dropped meanwhile.
async fn pause(inner: &Inner, node: usize, pause: Duration) {
    let until = tokio::time::Instant::now() + pause;
    loop {
        let kicked = inner.kicks[node].notified();
        if inner.state().closed {
            return;
        }
        tokio::select! {
            _ = kicked => {}
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

/// Opens the node's subscription link through its place number `through` (modulo how
/// many it has), within the connect timeout.
async fn connect(inner: &Inner, node: usize, through: usize) -> redis::RedisResult<Link> {
    let Some(source) = inner.sources.get(node) else {
        return Err(timed_out("no subscription source for this node"));
    };
    tokio::time::timeout(
        inner.connect_timeout,
        source.open(through % source.len(), inner.timeout),
    )
    .await
    .map_err(|_| timed_out("could not open the subscription connection in time"))?
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
    node: usize,
    link: &mut Link,
    wanted: &HashSet<Box<[u8]>>,
    subscribed: &HashSet<Box<[u8]>>,
) -> Result<(), Refused> {
    for channel in wanted.difference(subscribed) {
        match tokio::time::timeout(inner.timeout, link.subscribe(channel)).await {
            Ok(Ok(())) => {
                inner.state().subscribed[node].insert(channel.clone());
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
        inner.state().subscribed[node].remove(channel);
        match tokio::time::timeout(inner.timeout, link.unsubscribe(channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Refused::Failed(e)),
            Err(_) => return Err(Refused::Failed(timed_out("UNSUBSCRIBE got no answer"))),
        }
    }
    Ok(())
}
