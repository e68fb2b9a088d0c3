//! SIGINT, SIGTERM and SIGHUP sent to distlock reach the command; the lock is given back
//! only after the command has exited.

use crate::support::{Redis, Scratch, distlock, signal, start, wait_until};

#[test]
fn a_signal_to_distlock_reaches_the_command_and_the_lock_is_released_after_it_exits() {
    let redis = Redis::start();
    for (sig, name) in [
        (libc::SIGTERM, "TERM"),
        (libc::SIGINT, "INT"),
        (libc::SIGHUP, "HUP"),
    ] {
        let dir = Scratch::new();
        let log = dir.file("log");
        // The trap asks distlock itself whether the lock is still held while the command
        // is finishing: it must be (exit 0 of `status`).
        let script = format!(
            "trap 'echo got-{name} >> {log}; \"$DISTLOCK_BIN\" status -q job >/dev/null; \
             echo held-while-finishing=$? >> {log}; exit 0' {name}; \
             touch {ready}; while :; do sleep 0.05; done",
            ready = dir.file("ready"),
        );
        let mut cmd = distlock(&redis);
        cmd.args(["run", "job", "--", "sh", "-c", &script]);
        let (running, started) = start(cmd);
        wait_until("the command runs", || dir.exists("ready"));

        signal(running.id(), sig);
        let done = running.finish(started);
        assert_eq!(done.code(), 0, "the trap's exit status: {done:?}");
        assert_eq!(
            dir.read("log"),
            format!("got-{name}\nheld-while-finishing=0\n"),
            "{done:?}"
        );
        assert!(!redis.is_locked("job"), "released after SIG{name}");
    }
}

#[test]
fn a_command_that_does_not_handle_sigterm_dies_of_it_and_distlock_reports_143() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let mut cmd = distlock(&redis);
    cmd.args(["run", "job", "--", "sh", "-c"])
        .arg(format!("touch {}; exec sleep 30", dir.file("ready")));
    let (running, started) = start(cmd);
    wait_until("the command runs", || dir.exists("ready"));

    signal(running.id(), libc::SIGTERM);
    let done = running.finish(started);
    assert_eq!(done.code(), 128 + libc::SIGTERM, "{done:?}");
    assert!(!redis.is_locked("job"));
}

#[test]
fn a_signal_while_waiting_for_the_lock_ends_distlock_without_running_the_command() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let mut holder = distlock(&redis);
    holder
        .args(["run", "job", "--", "sh", "-c"])
        .arg(format!("touch {}; exec sleep 30", dir.file("ready")));
    let (_holder, _) = start(holder);
    wait_until("the first run holds the lock", || dir.exists("ready"));

    let mut waiter = distlock(&redis);
    waiter
        .args(["run", "job", "--", "touch"])
        .arg(dir.file("waiter-ran"));
    let (waiter, started) = start(waiter);
    wait_until("the waiter catches SIGTERM", || {
        catches(waiter.id(), libc::SIGTERM)
    });
    signal(waiter.id(), libc::SIGTERM);
    let done = waiter.finish(started);
    assert_eq!(done.code(), 128 + libc::SIGTERM, "{done:?}");
    assert!(!dir.exists("waiter-ran"));
}

/// Whether process `pid` has a handler for `sig` (from `/proc/<pid>/status`, `SigCgt`).
fn catches(pid: u32, sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

#[test]
fn a_killed_distlock_takes_its_command_down_with_it() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let mut cmd = distlock(&redis);
    cmd.args(["run", "job", "--", "sh", "-c"]).arg(format!(
        "echo $$ > {pid}.tmp; mv {pid}.tmp {pid}; exec sleep 60",
        pid = dir.file("pid")
    ));
    let (running, started) = start(cmd);
    wait_until("the command runs", || dir.exists("pid"));
    let pid = dir.read("pid").trim().to_owned();

    signal(running.id(), libc::SIGKILL);
    let done = running.finish(started);
    assert_eq!(done.status.code(), None, "killed: {done:?}");
    // Gone, or a zombie waiting for a reaper: either way no longer running.
    wait_until("the command is stopped", || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    });
}
