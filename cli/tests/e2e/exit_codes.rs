//! The command's exit status is distlock's.

use crate::support::{Redis, distlock, output};

fn run_sh(redis: &Redis, script: &str) -> crate::support::Finished {
    let mut cmd = distlock(redis);
    cmd.args(["run", "job", "--", "sh", "-c", script]);
    output(cmd)
}

#[test]
fn the_commands_exit_code_passes_through() {
    let redis = Redis::start();
    for code in [0, 3, 42] {
        let done = run_sh(&redis, &format!("exit {code}"));
        assert_eq!(done.code(), code, "{done:?}");
    }
    assert!(!redis.is_locked("job"), "the lock was released");
}

#[test]
fn a_command_killed_by_a_signal_exits_128_plus_the_signal() {
    let redis = Redis::start();
    let killed = run_sh(&redis, "kill -KILL $$");
    assert_eq!(killed.code(), 128 + libc::SIGKILL, "{killed:?}");
    let terminated = run_sh(&redis, "kill -TERM $$");
    assert_eq!(terminated.code(), 128 + libc::SIGTERM, "{terminated:?}");
    assert!(!redis.is_locked("job"));
}

#[test]
fn a_missing_command_exits_127_and_gives_the_lock_back() {
    let redis = Redis::start();
    let mut cmd = distlock(&redis);
    cmd.args(["run", "job", "--", "/nonexistent/distlock-test-command"]);
    let done = output(cmd);
    assert_eq!(done.code(), 127, "{done:?}");
    assert!(done.stderr.contains("cannot run"), "{done:?}");
    assert!(!redis.is_locked("job"));
}

#[test]
fn shell_mode_runs_the_words_through_sh() {
    let redis = Redis::start();
    let mut cmd = distlock(&redis);
    cmd.args([
        "run",
        "--shell",
        "job",
        "--",
        "echo",
        "$DISTLOCK_NAME",
        "|",
        "tr",
        "a-z",
        "A-Z",
    ]);
    let done = output(cmd);
    assert_eq!(done.code(), 0, "{done:?}");
    assert_eq!(done.stdout, "JOB\n");
}
