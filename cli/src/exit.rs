//! Exit statuses, and the one-line messages for errors that end the program.
//!
//! | status | meaning |
//! |---|---|
//! | the command's | the command ran under the lock and exited with it |
//! | 128 + N | the command was killed by signal N (as shells report it), or distlock was
//! |   | stopped by signal N before the command started |
//! | 2 | bad arguments: unknown flag, bad duration, bad URL, unusable lock name; nothing taken |
//! | 69 | Redis could not be used: unreachable, wrong password, a server error |
//! | 70 | an internal error (please report it) |
//! | 75 | another holder has the lock (`--conflict-exit-code`) |
//! | 79 | the lease was lost while the command ran; the command was stopped (`--lost-exit-code`) |
//! | 126 | the command could not be executed |
//! | 127 | the command was not found |

use distlock::Error;
use distlock::redis::{ErrorKind, ServerErrorKind};

/// Bad arguments; clap uses the same status for usage errors.
pub const USAGE: u8 = 2;
/// `EX_UNAVAILABLE`: Redis could not be used.
pub const UNAVAILABLE: u8 = 69;
/// `EX_SOFTWARE`: a bug of ours.
pub const SOFTWARE: u8 = 70;
/// `EX_TEMPFAIL`: another holder has the lock; try again later.
pub const CONFLICT: u8 = 75;
/// The lease was lost while the command ran. Outside the sysexits range (64–78) and below
/// the shells' 126–255, so it is not mistaken for either.
pub const LEASE_LOST: u8 = 79;
/// The command exists but could not be executed (as shells report it).
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found (as shells report it).
pub const NOT_FOUND: u8 = 127;

/// The status for an error of connecting or acquiring that is not contention.
pub fn status_of(err: &Error) -> u8 {
    match err {
        Error::InvalidArgument(_) => USAGE,
        Error::Contended { .. } | Error::Timeout { .. } => CONFLICT,
        _ => UNAVAILABLE,
    }
}

/// One line: what went wrong and what to do about it.
pub fn describe(err: &Error, urls: &[String]) -> String {
    let url = urls.join(", ");
    match err {
        Error::InvalidArgument(arg) if arg.what() == "url" && arg.detail().contains("tls") => {
            format!(
                "bad --url {url}: {}; this distlock was built without TLS: cargo install distlock-cli --features tls",
                arg.detail()
            )
        }
        Error::InvalidArgument(arg) if arg.what() == "url" => {
            format!(
                "bad --url {url}: {}; expected redis://[user:password@]host[:port][/db]",
                arg.detail()
            )
        }
        Error::InvalidArgument(arg) => format!("invalid {}: {}", arg.what(), arg.detail()),
        Error::Redis(e) => describe_redis(e, &url),
        Error::Quorum(q) => {
            let mut line = format!(
                "only {} of {} Redis nodes answered, {} needed",
                q.confirmed(),
                q.nodes().len(),
                q.needed()
            );
            for (node, why) in q.failures() {
                line.push_str(&format!("; {node}: {why}"));
            }
            line
        }
        other => other.to_string(),
    }
}

fn describe_redis(e: &distlock::redis::RedisError, url: &str) -> String {
    let text = flatten(&e.to_string());
    if e.kind() == ErrorKind::AuthenticationFailed
        || e.code()
            .is_some_and(|c| matches!(c, "WRONGPASS" | "NOAUTH"))
    {
        return format!(
            "Redis at {url} refused the credentials ({text}); put user and password in the URL: redis://user:password@host:6379"
        );
    }
    if e.code() == Some("WRONGTYPE") {
        return format!(
            "the lock's key at {url} holds a value of another type ({text}); choose another lock name or --prefix"
        );
    }
    if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) {
        return format!(
            "Redis at {url} denied a command ({text}); the user needs EVALSHA, SCRIPT, SET, PEXPIRE, DEL, PUBLISH and SUBSCRIBE"
        );
    }
    if e.is_connection_refusal() || e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        return format!(
            "cannot reach Redis at {url} ({text}); check that the server runs and --url points at it"
        );
    }
    format!("Redis at {url} answered with an error: {text}")
}

/// Error texts from the network layer can span lines; the contract is one line.
fn flatten(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contention_maps_to_the_conflict_status_and_server_failures_do_not() {
        let busy = Error::Contended {
            key: "k".into(),
            retry_after: None,
        };
        assert_eq!(status_of(&busy), CONFLICT);
        let down = Error::Redis(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        assert_eq!(status_of(&down), UNAVAILABLE);
    }

    #[test]
    fn an_unreachable_server_is_described_in_one_line_with_a_hint() {
        let down = Error::Redis(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        let line = describe(&down, &["redis://127.0.0.1:1".into()]);
        assert!(
            line.contains("cannot reach Redis at redis://127.0.0.1:1"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn flatten_joins_lines() {
        assert_eq!(flatten("a\n  b\tc"), "a b c");
    }
}
