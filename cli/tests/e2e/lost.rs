//! A lease lost while the command runs: the command is stopped (SIGTERM, then SIGKILL after
//! the grace period), distlock exits 79 and says why on stderr.

use std::time::Duration;

use distlock::redis;

use crate::support::{Redis, Scratch, distlock, lease_key, start, wait_until};

/// Starts `run` on lock `job` with `flags` and a command that marks `ready`, then runs
/// `script` (which should outlive the test unless stopped).
fn run_until_ready(
    redis: &Redis,
    dir: &Scratch,
    flags: &[&str],
    script: &str,
) -> (crate::support::Running, std::time::Instant) {
    let mut cmd = distlock(redis);
    cmd.arg("run")
        .args(flags)
        .args(["job", "--", "sh", "-c"])
        .arg(format!("touch {}; {script}", dir.file("ready")));
    let (running, started) = start(cmd);
    wait_until("the command runs", || dir.exists("ready"));
    (running, started)
}

#[test]
fn a_lease_deleted_by_an_operator_stops_the_command_with_the_lost_code() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let (running, started) = run_until_ready(
        &redis,
        &dir,
        &["--ttl", "1500ms", "--kill-grace", "5s"],
        "exec sleep 60",
    );

    let _: u64 = redis::cmd("DEL")
        .arg(lease_key("job"))
        .query(&mut redis.admin())
        .expect("DEL");
    let done = running.finish(started);
    assert_eq!(done.code(), 79, "{done:?}");
    assert!(done.stderr.contains("Expired"), "{done:?}");
    // `sleep 60` did not run out: the command was stopped.
    assert!(done.took < Duration::from_secs(30), "{done:?}");
}

#[test]
fn redis_paused_past_the_ttl_stops_the_command_with_the_lost_code() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let (running, started) = run_until_ready(
        &redis,
        &dir,
        &["--ttl", "1s", "--kill-grace", "5s"],
        "exec sleep 60",
    );

    redis.pause();
    let done = running.finish(started);
    redis.resume();
    assert_eq!(done.code(), 79, "{done:?}");
    assert!(done.stderr.contains("Unreachable"), "{done:?}");
    assert!(done.took < Duration::from_secs(30), "{done:?}");
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let (running, started) = run_until_ready(
        &redis,
        &dir,
        &["--ttl", "1s", "--kill-grace", "1s"],
        "trap '' TERM; while :; do sleep 0.05; done",
    );

    let _: u64 = redis::cmd("DEL")
        .arg(lease_key("job"))
        .query(&mut redis.admin())
        .expect("DEL");
    let done = running.finish(started);
    assert_eq!(done.code(), 79, "{done:?}");
    assert!(done.stderr.contains("SIGKILL"), "{done:?}");
}

#[test]
fn the_hold_cap_stops_the_command_like_a_lost_lease() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let (running, started) = run_until_ready(
        &redis,
        &dir,
        &["--ttl", "1s", "--max-hold", "1s", "--lost-exit-code", "99"],
        "exec sleep 60",
    );
    let done = running.finish(started);
    assert_eq!(done.code(), 99, "{done:?}");
    assert!(done.stderr.contains("MaxHoldReached"), "{done:?}");
    // The lease is believed gone at the cap minus the clock-drift allowance (ttl/100 + 2 ms),
    // counted from before the acquire was sent: a little under 1 s after readiness.
    assert!(done.took >= Duration::from_millis(900), "{done:?}");
}
