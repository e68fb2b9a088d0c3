//! Auto-extension: one background task per manager extends all of its leases in batches.
//!
//! Each registered lease is due for auto-extension a third of the way from the last command that
//! set its TTL to the deadline that command leaves (about `ttl / 3` after it was sent); an
//! explicit extend with another TTL moves the schedule, and auto-extensions reuse its TTL. When the earliest lease falls due, the task extends it together with every lease
//! due within the next auto-extension period, in one `extend_many` call (one round trip and one
//! Lua call per thousand leases on a single primary). Renewing a little early costs
//! little and pulls leases into the same batch, so a thousand leases settle into one
//! round trip per tick instead of a thousand.
//!
//! An auto-extension that finds the key gone or held by another token marks the lease lost at
//! once. An auto-extension that cannot reach the server is retried every tenth of the TTL; if none
//! succeeds, the lease's own deadline makes it lost ([`LostReason::Unreachable`]), so a
//! slow or stuck auto-extension never delays the loss past the validity deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::error::{Error, LostReason, Result};
use crate::lease::{Lease, OpId};
use crate::metrics::Meter;
use crate::options::{Replicas, Ttl};
use crate::store::{Extension, LeaseStore, Verdict};

/// The auto-extension task of one manager (started on demand, gone when nothing is registered).
#[derive(Clone)]
pub(crate) struct AutoExtender {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn LeaseStore>,
    registry: Mutex<Registry>,
    /// Wakes the task when a lease is registered (it may be due before the current sleep).
    wake: Notify,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    /// The id of the running task, if one runs.
    running: Option<u64>,
    next_task: u64,
}

struct Entry {
    lease: Arc<Lease>,
    /// After a failed auto-extension: no retry before this instant.
    not_before: Option<Instant>,
    /// The end of the hold-time cap, if any: auto-extensions never extend the lease past it.
    hold_until: Option<Instant>,
    /// When the lease was taken: how long it was held, for the log line of a loss.
    acquired_at: Instant,
    /// Metrics of the lease: a loss found here is counted here.
    meter: Meter,
}

/// Registration of one lease with the auto-extension task; dropping it stops the auto-extension.
pub(crate) struct AutoExtension {
    inner: Weak<Inner>,
    id: u64,
}

impl AutoExtension {
    /// The lease's TTL or deadline changed outside the auto-extension task (an explicit extend):
    /// plan again.
    pub(crate) fn reschedule(&self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.wake.notify_one();
        }
    }
}

impl Drop for AutoExtension {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let entry = inner.registry().entries.remove(&self.id);
            if let Some(entry) = entry {
                entry.lease.set_auto_extended(false);
            }
            // Plan again: with nothing left to extend the task ends now, and with it its
            // hold on the connection, instead of at the next auto-extension it had planned.
            inner.wake.notify_one();
        }
    }
}

/// A third of the TTL: the auto-extension period.
fn period(ttl: Ttl) -> Duration {
    ttl.as_duration() / 3
}

impl AutoExtender {
    pub(crate) fn new(store: Arc<dyn LeaseStore>) -> Self {
        AutoExtender {
            inner: Arc::new(Inner {
                store,
                registry: Mutex::new(Registry::default()),
                wake: Notify::new(),
            }),
        }
    }

    /// Keeps `lease` alive until the returned ticket is dropped, for at most `max_hold`
    /// after `acquired_at`. Starts the task on `runtime` if it is not running.
    pub(crate) fn register(
        &self,
        lease: Arc<Lease>,
        acquired_at: Instant,
        max_hold: Option<Duration>,
        runtime: &Handle,
        meter: Meter,
    ) -> AutoExtension {
        lease.set_auto_extended(true);
        let entry = Entry {
            not_before: None,
            hold_until: max_hold.and_then(|hold| acquired_at.checked_add(hold)),
            acquired_at,
            lease,
            meter,
        };
        let mut registry = self.inner.registry();
        let id = registry.next_id;
        registry.next_id += 1;
        registry.entries.insert(id, entry);
        if registry.running.is_some() {
            self.inner.wake.notify_one();
        } else {
            let task = registry.next_task;
            registry.next_task += 1;
            registry.running = Some(task);
            let inner = Arc::clone(&self.inner);
            runtime
                // A span of its own, not a child of whichever call started the task.
                .spawn(
                    run(inner, task)
                        .instrument(tracing::debug_span!(parent: None, "distlock.auto_extend")),
                );
        }
        AutoExtension {
            inner: Arc::downgrade(&self.inner),
            id,
        }
    }
}

impl Inner {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // No code that can panic runs under this lock; recover from poison anyway.
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Clears `running` when the task ends, including when its runtime shuts down and drops
/// it, so the next registration starts a new task.
struct RunningFlag(Arc<Inner>, u64);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        let mut registry = self.0.registry();
        if registry.running == Some(self.1) {
            registry.running = None;
        }
    }
}

/// What one pass over the registry decided.
enum Plan {
    /// Nothing registered: the task ends.
    Stop,
    /// Nothing due: sleep until then (or until woken).
    Sleep(Instant),
    /// Extend these now.
    Extend(Vec<Item>),
}

/// One lease in an auto-extension batch.
struct Item {
    id: u64,
    lease: Arc<Lease>,
    extension: Extension,
    /// The final auto-extension under a hold-time cap: the lease is no longer registered.
    last: bool,
    /// This auto-extension as a command of its lease (see [`Lease::begin_extend`]).
    op: Option<OpId>,
}

impl Entry {
    fn due(&self) -> Instant {
        let at = self.lease.extend_due();
        self.not_before.map_or(at, |t| t.max(at))
    }
}

async fn run(inner: Arc<Inner>, task: u64) {
    let flag = RunningFlag(inner, task);
    let inner = &flag.0;
    loop {
        // Created before reading the registry, so a registration in between is not missed.
        let woken = inner.wake.notified();
        match plan(inner) {
            Plan::Stop => return,
            Plan::Sleep(until) => {
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
            }
            Plan::Extend(batch) => extend_batch(inner, batch).await,
        }
    }
}

fn plan(inner: &Inner) -> Plan {
    plan_at(&mut inner.registry(), Instant::now())
}

/// What to do at `now`, given the registered leases: the task's whole decision, without
/// I/O (unit-tested below).
fn plan_at(registry: &mut Registry, now: Instant) -> Plan {
    // Leases that are gone need no auto-extension. One found gone here ran out without a
    // successful extension (a release or drop is the guard's business, not logged).
    registry.entries.retain(|_, e| match e.lease.lost() {
        None => true,
        Some(LostReason::Released) => false,
        Some(reason) => {
            e.meter.lost(reason);
            tracing::warn!(
                key = %e.lease.key,
                %reason,
                held_for = ?now.saturating_duration_since(e.acquired_at),
                "lease lost in the background"
            );
            false
        }
    });
    if registry.entries.is_empty() {
        // Cleared here, under the lock, so a concurrent `register` starts a new task.
        registry.running = None;
        return Plan::Stop;
    }
    let Some((first_due, first_ttl)) = registry
        .entries
        .values()
        .map(|e| (e.due(), e.lease.state().ttl))
        .min_by_key(|(due, _)| *due)
    else {
        return Plan::Stop;
    };
    if first_due > now {
        return Plan::Sleep(first_due);
    }
    // Coalesce: extend, with the lease that fell due, every lease due within the next
    // period (the shorter of its own and the due lease's), so leases drift into one
    // batch and stay there; none is auto-extended more than one of its own periods early.
    let window = period(first_ttl);
    let mut batch = Vec::new();
    let mut capped = Vec::new();
    for (&id, entry) in &registry.entries {
        let ttl = entry.lease.state().ttl;
        if entry.due() > now + window.min(period(ttl)) {
            continue;
        }
        // Under a hold-time cap, the auto-extension that reaches the cap is the last one: it
        // gives exactly the hold time left, and auto-extension stops.
        let mut last = false;
        let ttl = match entry.hold_until {
            Some(until) if until.saturating_duration_since(now) <= ttl.as_duration() => {
                capped.push(id);
                match Ttl::new(until.saturating_duration_since(now)) {
                    Ok(left) => {
                        last = true;
                        left
                    }
                    // Less than a millisecond left: let the lease run out.
                    Err(_) => continue,
                }
            }
            _ => ttl,
        };
        let extension = Extension {
            key: entry.lease.key.clone(),
            token: entry.lease.token,
            ttl,
        };
        batch.push(Item {
            id,
            lease: Arc::clone(&entry.lease),
            extension,
            last,
            op: None,
        });
    }
    for id in capped {
        if let Some(entry) = registry.entries.remove(&id) {
            tracing::debug!(
                key = %entry.lease.key,
                "hold-time cap reached; auto-extension stops"
            );
            entry.lease.hold_capped();
            entry.lease.set_auto_extended(false);
        }
    }
    if batch.is_empty() {
        // Only capped leases were due; plan again.
        return Plan::Sleep(now);
    }
    Plan::Extend(batch)
}

async fn extend_batch(inner: &Inner, mut batch: Vec<Item>) {
    let sent = Instant::now();
    // Each auto-extension counts as a command of its lease from before it is sent (see
    // `Lease::begin_extend`); a lease lost meanwhile is not auto-extended.
    batch.retain_mut(|item| {
        item.op = item.lease.begin_extend(item.extension.ttl, sent, false);
        item.op.is_some()
    });
    if batch.is_empty() {
        return;
    }
    let extensions: Vec<Extension> = batch.iter().map(|item| item.extension.clone()).collect();
    let replicas: Vec<Option<Replicas>> = batch.iter().map(|item| item.lease.replicas).collect();
    let results = extend_grouped(inner.store.as_ref(), &extensions, &replicas).await;
    let done = Instant::now();
    let mut registry = inner.registry();
    let mut failed = 0usize;
    let mut first_error: Option<String> = None;
    for (item, result) in batch.into_iter().zip(results) {
        let Item {
            id,
            lease,
            extension,
            last,
            op,
        } = item;
        let Some(op) = op else { continue };
        let entry = registry.entries.get_mut(&id);
        // Released or dropped meanwhile: its guard owns the outcome now. (A released
        // lease is marked lost, so a late success cannot revive it either way.)
        if entry.is_none() && !last {
            lease.abandon_extend(op);
            continue;
        }
        match result {
            Ok(Verdict::Done) => {
                if lease.replicas.is_some() {
                    lease.set_short_of_replicas(false);
                }
                if !lease.confirm_extend(op) {
                    if let Some(entry) = registry.entries.remove(&id) {
                        entry
                            .meter
                            .lost(lease.lost().unwrap_or(LostReason::Expired));
                    }
                } else if let Some(entry) = entry {
                    entry.not_before = None;
                }
            }
            Ok(Verdict::Lost(reason)) if reason != LostReason::NoQuorum => {
                lease.mark_lost(reason);
                if let Some(entry) = registry.entries.remove(&id) {
                    entry.meter.lost(lease.lost().unwrap_or(reason));
                    tracing::warn!(
                        key = %lease.key,
                        %reason,
                        held_for = ?done.saturating_duration_since(entry.acquired_at),
                        "lease lost in the background"
                    );
                }
            }
            // Too few nodes of a multi-primary lease confirmed this round: like an
            // unreachable server, retried until the lease's own deadline decides.
            // A replica-acknowledged lease extended on the primary but acknowledged by too
            // few replicas: as unconfirmed (a promoted replica may have the old expiry),
            // retried, and lost as `NotReplicated` if the deadline comes first.
            Ok(Verdict::Lost(_)) | Err(_) => {
                if lease.replicas.is_some() {
                    lease.set_short_of_replicas(matches!(result, Err(Error::NotReplicated { .. })));
                }
                failed += 1;
                if first_error.is_none() {
                    first_error = Some(match &result {
                        Err(e) => e.to_string(),
                        Ok(_) => "no majority of the nodes confirmed".to_owned(),
                    });
                }
                lease.abandon_extend(op);
                if let Some(entry) = entry {
                    entry.not_before = Some(
                        done + (extension.ttl.as_duration() / 10).max(Duration::from_millis(5)),
                    );
                }
            }
        }
    }
    tracing::trace!(leases = extensions.len(), failed, elapsed = ?done - sent, "extended");
    if failed > 0 {
        tracing::warn!(
            failed,
            error = first_error.as_deref().unwrap_or_default(),
            "lease extensions failed; retrying until each lease's deadline"
        );
    }
}

/// `extend_many` of `batch`, the leases that wait for replicas apart (one call per
/// acknowledgement setting, the calls sent together): one result per lease, in order.
async fn extend_grouped(
    store: &dyn LeaseStore,
    batch: &[Extension],
    replicas: &[Option<Replicas>],
) -> Vec<Result<Verdict>> {
    if replicas.iter().all(Option::is_none) {
        return store.extend_many(batch).await;
    }
    let mut groups: Vec<(Option<Replicas>, Vec<usize>)> = Vec::new();
    for (at, setting) in replicas.iter().enumerate() {
        match groups.iter_mut().find(|(s, _)| s == setting) {
            Some((_, members)) => members.push(at),
            None => groups.push((*setting, vec![at])),
        }
    }
    let calls = groups.iter().map(|(setting, members)| {
        let slice: Vec<Extension> = members.iter().map(|&i| batch[i].clone()).collect();
        async move {
            match setting {
                Some(replicas) => store.extend_many_replicated(&slice, *replicas).await,
                None => store.extend_many(&slice).await,
            }
        }
    });
    let answers = crate::redlock::join_all(calls.collect()).await;
    let mut out: Vec<Option<Result<Verdict>>> = batch.iter().map(|_| None).collect();
    for ((_, members), results) in groups.iter().zip(answers) {
        for (&at, result) in members.iter().zip(results) {
            out[at] = Some(result);
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::unexpected_reply("no answer for a lease"))))
        .collect()
}

#[cfg(test)]
mod tests;
