//! `distlock`: run a command under a distributed lease lock on Redis.
//!
//! `distlock run [OPTIONS] <NAME> -- <command> [args…]` takes the lock, runs the command
//! while the lease is renewed, releases it when the command exits and exits with the
//! command's status: `flock(1)` across machines, for cron jobs and scripts. See
//! [`exit`] for the exit statuses and the README's "Command line" section for recipes.

mod admin;
mod child;
mod cli;
mod connect;
mod duration;
mod exit;
mod generate;
mod run;
mod signals;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use crate::cli::{Cli, Command};
use crate::signals::Signals;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    logging(cli.global.quiet, cli.global.verbose);
    ExitCode::from(dispatch(cli))
}

fn dispatch(cli: Cli) -> u8 {
    let Cli { command, global } = cli;
    let say = connect::Say::new(global.quiet);
    match command {
        Command::Completions { shell } => {
            generate::completions(shell);
            return 0;
        }
        Command::Man { out_dir } => {
            return match generate::man(out_dir.as_deref()) {
                Ok(()) => 0,
                Err(e) => {
                    say.error(format!("cannot write the man page: {e}"));
                    exit::SOFTWARE
                }
            };
        }
        _ => {}
    }
    // One thread: the command is spawned from it, which the parent-death signal of
    // `child::spawn` relies on (it fires when the spawning thread ends).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            say.error(format!("cannot start the async runtime: {e}"));
            return exit::SOFTWARE;
        }
    };
    let code = runtime.block_on(async {
        let mut signals = match Signals::catch() {
            Ok(signals) => signals,
            Err(e) => {
                say.error(format!("cannot install signal handlers: {e}"));
                return exit::SOFTWARE;
            }
        };
        match command {
            Command::Run(args) => run::run(args, &global, &mut signals).await,
            Command::Status(args) => admin::status(args, &global).await,
            Command::Release(args) => admin::release(args, &global).await,
            Command::Completions { .. } | Command::Man { .. } => exit::SOFTWARE,
        }
    });
    // Nothing left to wait for: the lease was released (or is gone) before block_on ended.
    runtime.shutdown_background();
    code
}

/// Usage errors in one line (clap's own report spans several); `--help` and `--version`
/// print as clap prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("bad arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let subcommand = std::env::args()
        .skip(1)
        .find(|a| ["run", "status", "release", "completions", "man"].contains(&a.as_str()))
        .map(|a| format!(" {a}"))
        .unwrap_or_default();
    eprintln!("distlock: {first} (see 'distlock{subcommand} --help')");
    ExitCode::from(exit::USAGE)
}

/// Library warnings always (unless `--quiet`), more with each `-v`.
fn logging(quiet: bool, verbose: u8) {
    use tracing_subscriber::filter::LevelFilter;
    let level = match (quiet, verbose) {
        (true, _) => return,
        (false, 0) => LevelFilter::WARN,
        (false, 1) => LevelFilter::INFO,
        (false, 2) => LevelFilter::DEBUG,
        (false, _) => LevelFilter::TRACE,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
