//! Two `distlock run` on one name.

use std::time::Duration;

use crate::support::{Redis, Scratch, distlock, output, start, wait_until};

/// Starts a holder of lock `name` that marks `ready` and keeps the lock for `hold`.
fn holder(redis: &Redis, dir: &Scratch, name: &str, hold: &str) -> crate::support::Running {
    let mut cmd = distlock(redis);
    cmd.args(["run", name, "--", "sh", "-c"]).arg(format!(
        "echo a-begin >> {log}; touch {ready}; sleep {hold}; echo a-end >> {log}",
        log = dir.file("log"),
        ready = dir.file("ready"),
    ));
    let (running, _) = start(cmd);
    wait_until("the first run holds the lock", || dir.exists("ready"));
    running
}

#[test]
fn a_second_run_waits_for_the_first_and_then_runs() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let first = holder(&redis, &dir, "job", "1");

    let mut second = distlock(&redis);
    second
        .args(["run", "job", "--", "sh", "-c"])
        .arg(format!("echo b >> {}", dir.file("log")));
    let second = output(second);
    assert_eq!(second.code(), 0, "{second:?}");
    assert!(second.stderr.contains("waiting"), "{second:?}");
    assert_eq!(dir.read("log"), "a-begin\na-end\nb\n");
    drop(first);
}

#[test]
fn no_wait_on_a_held_lock_exits_with_the_conflict_code_without_running_the_command() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let _first = holder(&redis, &dir, "job", "30");

    let mut busy = distlock(&redis);
    busy.args(["run", "--no-wait", "job", "--", "touch"])
        .arg(dir.file("second-ran"));
    let busy = output(busy);
    assert_eq!(busy.code(), 75, "{busy:?}");
    assert!(busy.stderr.contains("held by another owner"), "{busy:?}");

    let mut custom = distlock(&redis);
    custom
        .args([
            "run",
            "-q",
            "-n",
            "--conflict-exit-code",
            "9",
            "job",
            "--",
            "touch",
        ])
        .arg(dir.file("second-ran"));
    let custom = output(custom);
    assert_eq!(custom.code(), 9, "{custom:?}");
    assert_eq!(custom.stderr, "", "--quiet says nothing about a busy lock");
    assert!(!dir.exists("second-ran"));
}

#[test]
fn a_wait_budget_that_runs_out_exits_with_the_conflict_code() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let _first = holder(&redis, &dir, "job", "30");

    let mut late = distlock(&redis);
    late.args(["run", "--wait", "300ms", "job", "--", "touch"])
        .arg(dir.file("second-ran"));
    let late = output(late);
    assert_eq!(late.code(), 75, "{late:?}");
    assert!(late.took >= Duration::from_millis(300), "{late:?}");
    assert!(!dir.exists("second-ran"));
}
