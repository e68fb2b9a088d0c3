//! `distlock run`: take the lock, run the command while the lease is renewed, give the lock
//! back when the command exits.
//!
//! The order of events is the contract: the command starts only once the lease is held,
//! and the lease is released only after the command has exited (also when a signal to
//! distlock ended it), so the command never runs outside the lease that distlock knows of.
//! When the lease is lost anyway, the command is stopped: SIGTERM, then SIGKILL after
//! `--kill-grace`.

use std::time::Duration;

use distlock::{Error, LockGuard, LockManager, LockOptions, LostReason};
use tokio::time::{Instant, sleep_until};

use crate::child::{self, LockEnv};
use crate::cli::{Global, RunArgs};
use crate::connect::{self, Say};
use crate::duration;
use crate::exit;
use crate::signals::{self, Signals};

/// How long one `lock_with` call waits before the next one when `run` waits without bound.
/// Any length works; a day keeps every deadline far from overflow.
const WAIT_ROUND: Duration = Duration::from_secs(24 * 60 * 60);

/// Runs `distlock run` and returns its exit status.
pub async fn run(args: RunArgs, global: &Global, signals: &mut Signals) -> u8 {
    let say = Say::new(global.quiet);
    // A fencing token for the command's environment where one exists: on a single
    // primary (over several, none has the guarantee, and asking is an error).
    let mut options = LockOptions::new()
        .with_ttl(args.ttl)
        .with_auto_extend(true)
        .with_fencing(global.urls.len() == 1);
    if let Some(cap) = args.max_hold {
        options = options.with_max_hold(cap);
    }

    let acquire = async {
        let manager = connect::manager(global, options).await?;
        let guard = acquire(&manager, &args, options, &global.urls, &say).await?;
        Ok::<_, Error>((manager, guard))
    };
    let (_manager, guard) = tokio::select! {
        taken = acquire => match taken {
            Ok(taken) => taken,
            Err(e) if e.is_held_by_other() => {
                say.notice(format!("{e}; exiting with {}", args.conflict_exit_code));
                return args.conflict_exit_code;
            }
            Err(e) => {
                say.error(exit::describe(&e, &global.urls));
                return exit::status_of(&e);
            }
        },
        // Dropping the acquire hands a possibly granted lease to a background release.
        signal = signals.next() => return 128 + signal as u8,
    };

    let env = LockEnv {
        name: &args.name,
        fencing_token: guard.fencing_token(),
    };
    let mut child = match child::spawn(&args.command, args.shell, &env) {
        Ok(child) => child,
        Err(e) => {
            say.error(format!("cannot run {}: {e}", args.command.join(" ")));
            release(guard, &say).await;
            return child::spawn_failure_status(&e);
        }
    };
    let pid = child.id();

    let lost = guard.lost();
    tokio::pin!(lost);
    let mut lost_reason: Option<LostReason> = None;
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            signal = signals.next() => {
                if let Some(pid) = pid {
                    signals::send(pid, signal);
                }
            }
            reason = &mut lost, if lost_reason.is_none() => {
                lost_reason = Some(reason);
                say.error(format!(
                    "lease on lock {} lost ({reason:?}: {reason}); stopping the command with SIGTERM, SIGKILL in {}",
                    args.name,
                    duration::format(args.kill_grace),
                ));
                if let Some(pid) = pid {
                    signals::send(pid, libc::SIGTERM);
                }
                kill_at = Some(Instant::now() + args.kill_grace);
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                say.error(format!("the command outlived --kill-grace; sending {}", signals::name(libc::SIGKILL)));
                // start_kill reaps nothing; the next wait() does.
                let _ = child.start_kill();
            }
        }
    };

    let code = match status {
        Ok(status) => child::status_code(status),
        Err(e) => {
            say.error(format!("lost track of the command: {e}"));
            exit::SOFTWARE
        }
    };
    if lost_reason.is_some() {
        // Nothing to give back: the lease is gone.
        return args.lost_exit_code;
    }
    match guard.release().await {
        Ok(()) => code,
        Err(Error::Lost { reason, .. }) => {
            say.error(format!(
                "the lease on lock {} was lost before the command finished ({reason:?}: {reason}); its end ran unprotected",
                args.name
            ));
            args.lost_exit_code
        }
        Err(e) => {
            say.notice(format!(
                "could not release lock {} ({}); it frees itself within --ttl",
                args.name,
                exit::describe(&e, &global.urls)
            ));
            code
        }
    }
}

/// One attempt; when the lock is busy and waiting is allowed, wait (bounded by `--wait`, or
/// round after round without it).
async fn acquire(
    manager: &LockManager,
    args: &RunArgs,
    options: LockOptions,
    urls: &[String],
    say: &Say,
) -> distlock::Result<LockGuard> {
    match manager.try_lock_with(&args.name, options).await {
        Err(Error::Contended { retry_after, .. }) if !args.no_wait => {
            let ends = retry_after
                .map(|d| format!("; its lease ends in {} unless renewed", duration::format(d)))
                .unwrap_or_default();
            say.notice(format!(
                "lock {} is held by another owner{ends}; waiting",
                args.name
            ));
        }
        // A server that is restarting may answer in a moment: waiting allowed, keep trying
        // within the budget (the waiting calls retry connection errors themselves).
        Err(e) if e.is_transient() && !args.no_wait => {
            say.notice(format!("{}; retrying", exit::describe(&e, urls)));
        }
        taken => return taken,
    }
    match args.wait {
        Some(budget) => {
            manager
                .lock_with(&args.name, options.with_wait(budget))
                .await
        }
        None => loop {
            match manager
                .lock_with(&args.name, options.with_wait(WAIT_ROUND))
                .await
            {
                Err(Error::Timeout { .. }) => continue,
                taken => return taken,
            }
        },
    }
}

/// Gives the lock back after the command could not start.
async fn release(guard: LockGuard, say: &Say) {
    if let Err(e) = guard.release().await {
        say.notice(format!("could not release the lock: {e}"));
    }
}
