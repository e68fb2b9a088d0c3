//! The command run under the lock: how it is started, and how its end becomes an exit status.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::process::{Child, Command};

use crate::exit;

/// What the child sees of the lock.
pub struct LockEnv<'a> {
    /// `DISTLOCK_NAME`.
    pub name: &'a str,
    /// `DISTLOCK_FENCING_TOKEN`, where the backend has one (a single primary).
    pub fencing_token: Option<u64>,
}

/// Starts `words` (or `sh -c "<words>"` with `shell`) with stdin, stdout and stderr inherited.
pub fn spawn(words: &[String], shell: bool, env: &LockEnv<'_>) -> io::Result<Child> {
    let mut command = if shell {
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(words.join(" "));
        sh
    } else {
        let (program, args) = words
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command given"))?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    };
    command.env("DISTLOCK_NAME", env.name);
    match env.fencing_token {
        Some(token) => command.env("DISTLOCK_FENCING_TOKEN", token.to_string()),
        // An inherited token would belong to an outer lock: never let it pass as ours.
        None => command.env_remove("DISTLOCK_FENCING_TOKEN"),
    };
    // If distlock dies without a chance to stop the command (SIGKILL, the OOM killer), the
    // lease runs out within its TTL and another holder may start: the command must not go
    // on unprotected, so the kernel sends it SIGTERM when distlock goes away.
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
    // getppid(2), both async-signal-safe.
    unsafe {
        let parent = libc::getpid();
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
    command.spawn()
}

/// The exit status for a command that could not be started, as shells report it.
pub fn spawn_failure_status(err: &io::Error) -> u8 {
    match err.kind() {
        io::ErrorKind::NotFound => exit::NOT_FOUND,
        _ => exit::CANNOT_EXECUTE,
    }
}

/// The child's exit status as a shell reports it: its code, or 128 + the signal that
/// killed it.
pub fn status_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        // Exit codes are 0..=255 on Unix; `as` keeps the low byte as the kernel does.
        return code as u8;
    }
    match status.signal() {
        Some(signal) => 128u8.wrapping_add(signal as u8),
        None => exit::SOFTWARE,
    }
}
