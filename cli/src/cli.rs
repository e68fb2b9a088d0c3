//! The command line, as one clap definition: parsing, `--help`, the shell completions and
//! the man page all come from it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::duration;
use crate::exit;

const EXAMPLES: &str = "\
Examples:
  # cron: at most one host runs the nightly report; the others exit 75 at once
  distlock run --no-wait --url redis://locks.internal:6379 reports:nightly -- /usr/local/bin/report

  # wait up to 5 minutes for the lock, give up with exit 75 after that
  distlock run --wait 5m deploy:web -- ./deploy.sh

  # a shell pipeline as the command
  distlock run --shell backup -- 'pg_dump app | gzip > /backups/app.sql.gz'

  # three independent primaries (Redlock): held on a majority
  distlock run --url redis://a:6379 --url redis://b:6379 --url redis://c:6379 job -- ./job

  # who holds it, and for how long
  distlock status reports:nightly";

const RUN_AFTER: &str = "\
The command gets DISTLOCK_NAME and, on a single primary, DISTLOCK_FENCING_TOKEN (a number \
that grows with every acquisition of the lock) in its environment: pass the token with its \
writes so the resource can reject a holder that lost the lock.

Exit status: the command's own; 128+N if a signal N killed it; 75 (--conflict-exit-code) \
when another holder has the lock; 79 (--lost-exit-code) when the lease was lost and the \
command was stopped; 2 for bad arguments; 69 when Redis cannot be used; 126/127 when the \
command cannot be run or is not found.";

/// Run a command under a distributed lock on Redis: at most one holder at a time across
/// every machine that shares the Redis server.
#[derive(Debug, Parser)]
#[command(name = "distlock", version, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Where the lock lives and how much to say.
    #[command(flatten)]
    pub global: Global,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Redis URL; repeat it for several independent primaries (Redlock, held on a majority).
    /// redis://[user:password@]host[:port][/db], rediss:// (built with the `tls` feature),
    /// unix:///path/to/socket.
    #[arg(
        long = "url",
        global = true,
        env = "DISTLOCK_URL",
        default_value = "redis://127.0.0.1:6379",
        value_name = "URL"
    )]
    pub urls: Vec<String>,

    /// Prefix of the Redis keys: lock NAME lives at <PREFIX>{NAME}. Every process that
    /// must exclude the others needs the same prefix.
    #[arg(
        long,
        global = true,
        env = "DISTLOCK_PREFIX",
        default_value = distlock::DEFAULT_PREFIX
    )]
    pub prefix: String,

    /// Say nothing on stderr but errors (no "lock is busy" line, no warnings).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Log what the lock does to stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take the lock, run the command while the lease is renewed, release it when the
    /// command exits, and exit with the command's status.
    #[command(after_help = RUN_AFTER)]
    Run(RunArgs),
    /// Tell whether a lock is held and for how long (exit 0 held, 1 free).
    Status(StatusArgs),
    /// Delete a lock's lease whoever holds it (for operators: the holder is not told).
    Release(ReleaseArgs),
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, or write one page per subcommand into a
    /// directory.
    Man {
        /// Write distlock.1, distlock-run.1, ... into this directory instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// `distlock run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lock's name: every process that uses the same name (and prefix) excludes the
    /// others.
    pub name: String,

    /// The command and its arguments (put them after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,

    /// Lease time: a holder that dies keeps the lock at most this long. While the command
    /// runs the lease is renewed about every TTL/3.
    #[arg(long, default_value = "30s", value_parser = duration::parse)]
    pub ttl: Duration,

    /// Wait at most this long for a busy lock, then exit with the conflict code. Without
    /// --wait or --no-wait, wait as long as it takes.
    #[arg(long, value_parser = duration::parse, conflicts_with = "no_wait", value_name = "DURATION")]
    pub wait: Option<Duration>,

    /// One attempt: if another holder has the lock, exit with the conflict code at once.
    #[arg(long, short = 'n')]
    pub no_wait: bool,

    /// Exit status when another holder has the lock (EX_TEMPFAIL by default).
    #[arg(long, default_value_t = exit::CONFLICT, value_name = "N")]
    pub conflict_exit_code: u8,

    /// Exit status when the lease was lost while the command ran and the command was
    /// stopped.
    #[arg(long, default_value_t = exit::LEASE_LOST, value_name = "N")]
    pub lost_exit_code: u8,

    /// Stop renewing after this long: the lease then runs out, and the command is stopped
    /// as for a lost lease.
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    pub max_hold: Option<Duration>,

    /// When the lease is lost the command gets SIGTERM, then SIGKILL after this long.
    #[arg(long, default_value = "5s", value_parser = duration::parse, value_name = "DURATION")]
    pub kill_grace: Duration,

    /// Run the command through `sh -c` (the words after `--` are joined with spaces).
    #[arg(long)]
    pub shell: bool,
}

/// `distlock status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The lock's name.
    pub name: String,

    /// Also print the first characters of the holder's lease token (enough to tell two
    /// holders apart, not enough to release the lease as them).
    #[arg(long)]
    pub show_token: bool,
}

/// `distlock release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The lock's name.
    pub name: String,

    /// Required: this deletes the lease of whoever holds it, who keeps running unaware.
    #[arg(long, required = true)]
    pub force: bool,

    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_the_double_dash_with_its_own_flags() {
        let cli = Cli::try_parse_from([
            "distlock", "run", "--ttl", "2s", "job", "--", "ls", "-l", "--color",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("not run");
        };
        assert_eq!(run.name, "job");
        assert_eq!(run.command, ["ls", "-l", "--color"]);
        assert_eq!(run.ttl, Duration::from_secs(2));
    }

    #[test]
    fn wait_and_no_wait_exclude_each_other() {
        let err = Cli::try_parse_from(["distlock", "run", "--wait", "1s", "-n", "j", "--", "true"])
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn url_repeats_for_several_primaries() {
        let cli = Cli::try_parse_from([
            "distlock",
            "--url",
            "redis://a",
            "--url",
            "redis://b",
            "status",
            "j",
        ])
        .expect("parses");
        assert_eq!(cli.global.urls, ["redis://a", "redis://b"]);
    }

    #[test]
    fn global_options_also_follow_the_subcommand() {
        let cli = Cli::try_parse_from(["distlock", "status", "--url", "redis://b", "-q", "j"])
            .expect("parses");
        assert_eq!(cli.global.urls, ["redis://b"]);
        assert!(cli.global.quiet);
    }
}
