//! Bad flags and bad URLs: one line on stderr, exit 2, no lock taken, nothing run.

use crate::support::{Redis, Scratch, distlock, free_port, output};

fn assert_rejected(redis: &Redis, dir: &Scratch, args: &[&str], says: &str, code: i32) {
    let mut cmd = distlock(redis);
    cmd.args(args).arg(dir.file("ran"));
    let done = output(cmd);
    assert_eq!(done.code(), code, "{args:?}: {done:?}");
    assert_eq!(
        done.stderr.lines().count(),
        1,
        "{args:?}: one line: {done:?}"
    );
    assert!(done.stderr.starts_with("distlock: "), "{done:?}");
    assert!(done.stderr.contains(says), "{args:?}: {done:?}");
    assert!(!dir.exists("ran"), "{args:?} ran the command");
    assert!(!redis.is_locked("job"), "{args:?} took the lock");
}

#[test]
fn bad_flags_print_one_line_exit_2_and_take_no_lock() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--bogus", "job", "--", "touch"], "--bogus"),
        (
            &["run", "--ttl", "5x", "job", "--", "touch"],
            "unknown unit",
        ),
        (&["run", "--ttl", "30", "job", "--", "touch"], "no unit"),
        (
            &["run", "--wait", "1s", "--no-wait", "job", "--", "touch"],
            "cannot be used with",
        ),
        (&["run", "--ttl", "1ms", "job", "--", "touch"], "ttl"),
        (&["run", "", "--", "touch"], "lock name"),
        (&["frobnicate", "job", "--", "touch"], "frobnicate"),
    ];
    for (args, says) in cases {
        assert_rejected(&redis, &dir, args, says, 2);
    }
}

#[test]
fn a_bad_url_prints_one_line_exit_2_and_takes_no_lock() {
    let redis = Redis::start();
    let dir = Scratch::new();
    for url in [
        "nope://127.0.0.1",
        "redis://127.0.0.1:99999",
        "rediss://127.0.0.1",
    ] {
        assert_rejected(
            &redis,
            &dir,
            &["--url", url, "run", "job", "--", "touch"],
            "--url",
            2,
        );
    }
}

#[test]
fn an_unreachable_server_prints_one_line_with_a_hint_and_exits_69() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let url = format!("redis://127.0.0.1:{}", free_port());
    assert_rejected(
        &redis,
        &dir,
        &["--url", &url, "run", "job", "--", "touch"],
        "cannot reach Redis",
        69,
    );
}

#[test]
fn a_missing_command_is_a_usage_error() {
    let redis = Redis::start();
    let done = output({
        let mut cmd = distlock(&redis);
        cmd.args(["run", "job"]);
        cmd
    });
    assert_eq!(done.code(), 2, "{done:?}");
    assert_eq!(done.stderr.lines().count(), 1, "{done:?}");
}

#[test]
fn help_shows_examples_and_completions_and_man_page_are_generated() {
    let redis = Redis::start();
    let run = |args: &[&str]| {
        let mut cmd = distlock(&redis);
        cmd.args(args);
        output(cmd)
    };
    let help = run(&["--help"]);
    assert_eq!(help.code(), 0);
    assert!(help.stdout.contains("Examples:"), "{help:?}");
    let completions = run(&["completions", "bash"]);
    assert_eq!(completions.code(), 0);
    assert!(completions.stdout.contains("distlock"), "{completions:?}");
    let man = run(&["man"]);
    assert_eq!(man.code(), 0);
    assert!(man.stdout.contains(".TH distlock"), "{man:?}");
}
