//! This test binary, run again as a separate OS process: real multi-process tests without
//! a helper binary.
//!
//! A test that needs children starts with
//! `if let Some(role) = child::role() { return child_main(role).await; }`
//! and spawns them with [`spawn`]: the child runs the *same* test function (filtered by
//! its exact name), sees the role in its environment and plays it instead of the parent.
//! Children report what the parent needs with [`report`] (lines marked with
//! [`LINE_PREFIX`], told apart from libtest's own output) and read their parameters
//! from [`param`].
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable that carries a child's role.
pub const ROLE_VAR: &str = "DISTLOCK_TEST_CHILD_ROLE";

/// Prefix of the lines a child reports to its parent.
pub const LINE_PREFIX: &str = "DISTLOCK-CHILD: ";

/// The role of this process, if it was started by [`spawn`].
pub fn role() -> Option<String> {
    std::env::var(ROLE_VAR).ok().filter(|r| !r.is_empty())
}

/// A parameter the parent passed to [`spawn`] (`DISTLOCK_TEST_CHILD_<NAME>`).
pub fn param(name: &str) -> String {
    std::env::var(format!("DISTLOCK_TEST_CHILD_{name}"))
        .unwrap_or_else(|_| panic!("child parameter {name} is missing"))
}

/// Reports one line to the parent.
pub fn report(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{LINE_PREFIX}{line}");
    let _ = out.flush();
}

/// Runs this test binary again as a child that plays `role` in the test `test_name`
/// (the test's function name, as libtest filters it), with `params` as named parameters.
pub fn spawn(test_name: &str, role: &str, params: &[(&str, String)]) -> ChildProcess {
    let exe = std::env::current_exe().expect("path of this test binary");
    let mut cmd = Command::new(exe);
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_VAR, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (name, value) in params {
        cmd.env(format!("DISTLOCK_TEST_CHILD_{name}"), value);
    }
    let mut child = cmd.spawn().expect("spawn a child test process");
    let lines = forward_lines(child.stdout.take().expect("piped stdout"));
    ChildProcess { child, lines }
}

/// A running child and the lines it reported.
pub struct ChildProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildProcess {
    /// The OS process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The next reported line, or a panic if none comes within `limit`.
    pub fn next_line(&self, limit: Duration) -> String {
        self.lines.recv_timeout(limit).unwrap_or_else(|e| {
            panic!("child {} reported nothing within {limit:?}: {e}", self.id())
        })
    }

    /// SIGKILL, now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits for the child to exit (killing it after `limit`) and returns its exit
    /// status and every line it reported that was not read yet.
    pub fn finish(mut self, limit: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for a child") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait for a killed child");
                panic!(
                    "child {} did not finish within {limit:?} ({status})",
                    self.id()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF, which follows the exit.
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            rest.push(line);
        }
        (status, rest)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // A failed test must not leave children behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may have started the line ("test name ... ") before the report.
            if let Some(at) = line.find(LINE_PREFIX)
                && tx.send(line[at + LINE_PREFIX.len()..].to_owned()).is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Nanoseconds on `CLOCK_MONOTONIC`: one clock for every process on this machine, so
/// instants taken in different processes compare directly (unlike `Instant`, which
/// cannot leave its process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    u64::try_from(ts.tv_sec).expect("non-negative seconds") * 1_000_000_000
        + u64::try_from(ts.tv_nsec).expect("non-negative nanoseconds")
}
