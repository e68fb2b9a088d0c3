//! The signals distlock catches (SIGINT, SIGTERM, SIGHUP) and passes on to the command.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The catchable signals that end a job: caught from the start, so that one arriving while
/// distlock connects or waits still lets it give back a lease it may hold.
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers. From here on these signals no longer kill distlock itself.
    pub fn catch() -> std::io::Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal caught, as its number.
    ///
    /// Cancel safe: a signal that arrives while this future is not polled is kept for
    /// the next call.
    pub async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Sends `signal` to process `pid`; a process that is already gone is not an error worth
/// reporting (it is about to be reaped).
pub fn send(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A signal's name for messages, e.g. `SIGTERM`.
pub fn name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGKILL => "SIGKILL".into(),
        n => format!("signal {n}"),
    }
}
