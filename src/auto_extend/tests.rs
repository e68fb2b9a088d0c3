//! The auto-extension task's planning, without I/O.
//!
//! A unit test module (`#[cfg(test)]`): its `unwrap`s and `panic!`s fail a test on bad
//! constants or an unexpected plan; no caller's input reaches them.

use super::*;
use crate::key::{LockKey, Token};

fn ttl(ms: u64) -> Ttl {
    Ttl::new(Duration::from_millis(ms)).unwrap()
}

fn lease(name: &str, ms: u64, sent: Instant) -> Arc<Lease> {
    let key = LockKey::new(b"t:", name.as_bytes()).unwrap();
    Arc::new(Lease::new(
        key,
        Token::generate(),
        None,
        ttl(ms),
        sent,
        sent,
    ))
}

fn registry(leases: &[(Arc<Lease>, Option<Instant>)]) -> Registry {
    let mut registry = Registry::default();
    for (lease, hold_until) in leases {
        lease.set_auto_extended(true);
        let id = registry.next_id;
        registry.next_id += 1;
        registry.entries.insert(
            id,
            Entry {
                lease: Arc::clone(lease),
                not_before: None,
                hold_until: *hold_until,
                acquired_at: Instant::now(),
                meter: Meter::default(),
            },
        );
    }
    registry
}

fn names(plan: &Plan) -> Vec<String> {
    match plan {
        Plan::Extend(batch) => {
            let mut names: Vec<String> = batch
                .iter()
                .map(|item| String::from_utf8_lossy(item.lease.key.name()).into_owned())
                .collect();
            names.sort();
            names
        }
        _ => Vec::new(),
    }
}

#[test]
fn nothing_registered_stops_the_task() {
    let mut registry = Registry {
        running: Some(0),
        ..Registry::default()
    };
    assert!(matches!(plan_at(&mut registry, Instant::now()), Plan::Stop));
    assert_eq!(
        registry.running, None,
        "a later registration starts a new task"
    );
}

#[test]
fn a_lease_is_extended_a_third_of_its_ttl_after_it_was_sent() {
    let sent = Instant::now();
    let mut registry = registry(&[(lease("a", 3_000, sent), None)]);
    match plan_at(&mut registry, sent) {
        Plan::Sleep(until) => assert_eq!(until, sent + Duration::from_secs(1)),
        _ => panic!("nothing is due yet"),
    }
    let due = sent + Duration::from_secs(1);
    assert_eq!(names(&plan_at(&mut registry, due)), ["a"]);
}

#[test]
fn leases_due_within_one_period_ride_in_the_same_batch() {
    let sent = Instant::now();
    let mut registry = registry(&[
        (lease("a", 3_000, sent), None),
        (lease("b", 3_000, sent + Duration::from_millis(500)), None),
        (lease("c", 30_000, sent), None),
    ]);
    // At a's due time, b is due within a's period (1 s): extended early, together.
    // c is due 9 s later: left alone.
    let plan = plan_at(&mut registry, sent + Duration::from_secs(1));
    assert_eq!(names(&plan), ["a", "b"]);
}

#[test]
fn the_extension_that_reaches_the_hold_cap_is_the_last_and_gives_only_what_is_left() {
    let sent = Instant::now();
    let a = lease("a", 3_000, sent);
    let cap = sent + Duration::from_millis(2_000);
    let mut registry = registry(&[(Arc::clone(&a), Some(cap))]);
    let now = sent + Duration::from_secs(1);
    match plan_at(&mut registry, now) {
        Plan::Extend(batch) => {
            assert_eq!(batch.len(), 1);
            assert!(batch[0].last);
            assert_eq!(
                batch[0].extension.ttl,
                ttl(1_000),
                "exactly the hold time left"
            );
        }
        _ => panic!("due"),
    }
    assert!(registry.entries.is_empty(), "no longer registered");
    assert!(a.state().hold_capped);
}

#[test]
fn lost_leases_are_dropped_from_the_registry() {
    let sent = Instant::now();
    let a = lease("a", 3_000, sent);
    let mut registry = registry(&[(Arc::clone(&a), None)]);
    a.mark_lost(crate::error::LostReason::Taken);
    assert!(matches!(plan_at(&mut registry, sent), Plan::Stop));
}

#[test]
fn a_failed_extension_is_retried_no_sooner_than_its_pause() {
    let sent = Instant::now();
    let mut registry = registry(&[(lease("a", 3_000, sent), None)]);
    let retry = sent + Duration::from_millis(1_300);
    for entry in registry.entries.values_mut() {
        entry.not_before = Some(retry);
    }
    match plan_at(&mut registry, sent + Duration::from_secs(1)) {
        Plan::Sleep(until) => assert_eq!(until, retry),
        _ => panic!("not before the retry pause"),
    }
}
