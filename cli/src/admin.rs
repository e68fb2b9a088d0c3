//! `distlock status` and `distlock release --force`: operators' views of a lock.
//!
//! The library has no call to inspect or break another holder's lease (a program should
//! never need one), so these read the keys directly, by the layout the README documents:
//! the lease at `<prefix>{<name>}` (value: the holder's token), the fencing counter at
//! `<prefix>{<name>}:fence`, release notifications on `<prefix>{<name>}:released`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use distlock::redis::{self, AsyncCommands, aio::MultiplexedConnection};
use distlock::{Error, LockOptions};

use crate::cli::{Global, ReleaseArgs, StatusArgs};
use crate::connect::{self, Say};
use crate::duration;
use crate::exit;

/// Status for "held" (status) or "deleted" (release).
const YES: u8 = 0;
/// Status for "free" (status) or "nothing deleted" (release).
const NO: u8 = 1;

/// How many characters of the holder's token `--show-token` prints: enough to tell holders
/// apart, too few to pose as the holder.
const TOKEN_PREFIX_LEN: usize = 8;

/// One node's view of the lock.
struct NodeView {
    url: String,
    /// Remaining lease time; `None` when the lock is free there.
    remaining: Option<Duration>,
    token: Option<String>,
    fence: Option<u64>,
}

/// `distlock status NAME`.
pub async fn status(args: StatusArgs, global: &Global) -> u8 {
    let say = Say::new(global.quiet);
    let views = match inspect(&args.name, global).await {
        Ok(views) => views,
        Err((line, code)) => {
            say.error(line);
            return code;
        }
    };
    let held = held_on_majority(&views);
    println!("lock {}: {}", args.name, if held { "held" } else { "free" });
    for view in &views {
        let mut line = match view.remaining {
            Some(left) => format!(
                "  {}: held, expires in {}",
                view.url,
                duration::format(left)
            ),
            None => format!("  {}: free", view.url),
        };
        if let Some(fence) = view.fence {
            line.push_str(&format!(", last fencing token {fence}"));
        }
        if args.show_token
            && let Some(token) = &view.token
        {
            let prefix: String = token.chars().take(TOKEN_PREFIX_LEN).collect();
            line.push_str(&format!(", holder token {prefix}…"));
        }
        println!("{line}");
    }
    if held { YES } else { NO }
}

/// `distlock release --force NAME`.
pub async fn release(args: ReleaseArgs, global: &Global) -> u8 {
    let say = Say::new(global.quiet);
    let views = match inspect(&args.name, global).await {
        Ok(views) => views,
        Err((line, code)) => {
            say.error(line);
            return code;
        }
    };
    if views.iter().all(|v| v.remaining.is_none()) {
        say.notice(format!("lock {} is free; nothing to release", args.name));
        return NO;
    }
    if !args.yes {
        match confirm(&args.name) {
            Ok(true) => {}
            Ok(false) => {
                say.error("not released");
                return NO;
            }
            Err(line) => {
                say.error(line);
                return exit::USAGE;
            }
        }
    }
    let lease = lease_key(&global.prefix, &args.name);
    let channel = [lease.as_slice(), b":released"].concat();
    let mut deleted = 0;
    for url in &global.urls {
        let result = async {
            let mut conn = open(url).await?;
            let n: u64 = conn.del(&lease).await?;
            // Wake the waiters of every manager at once instead of at their next poll.
            let _: u64 = conn.publish(&channel, "").await?;
            Ok::<_, redis::RedisError>(n)
        }
        .await;
        match result {
            Ok(n) => deleted += n,
            Err(e) => say.error(exit::describe(&Error::Redis(e), std::slice::from_ref(url))),
        }
    }
    if deleted > 0 {
        say.notice(format!(
            "released lock {} (its holder keeps running and will find its lease lost at its next renewal)",
            args.name
        ));
        YES
    } else {
        say.notice(format!("lock {} was free already", args.name));
        NO
    }
}

/// Reads the lock on every node. The error is a line to print and an exit status.
async fn inspect(name: &str, global: &Global) -> Result<Vec<NodeView>, (String, u8)> {
    check_name(name).map_err(|line| (line, exit::USAGE))?;
    // Connecting a manager checks the URLs, the prefix and the servers as `run` would, so
    // `status` fails the same way for the same mistakes.
    connect::manager(global, LockOptions::new())
        .await
        .map_err(|e| (exit::describe(&e, &global.urls), exit::status_of(&e)))?;
    let lease = lease_key(&global.prefix, name);
    let fence = [lease.as_slice(), b":fence"].concat();
    let mut views = Vec::new();
    for url in &global.urls {
        let view = async {
            let mut conn = open(url).await?;
            let pttl: i64 = conn.pttl(&lease).await?;
            let token: Option<String> = conn.get(&lease).await?;
            let fence: Option<u64> = conn.get(&fence).await?;
            Ok::<_, redis::RedisError>(NodeView {
                url: url.clone(),
                remaining: u64::try_from(pttl).ok().map(Duration::from_millis),
                token,
                fence,
            })
        }
        .await
        .map_err(|e| {
            let e = Error::Redis(e);
            (
                exit::describe(&e, std::slice::from_ref(url)),
                exit::status_of(&e),
            )
        })?;
        views.push(view);
    }
    Ok(views)
}

fn held_on_majority(views: &[NodeView]) -> bool {
    let held = views.iter().filter(|v| v.remaining.is_some()).count();
    held > views.len() / 2
}

async fn open(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(distlock::DEFAULT_CONNECT_TIMEOUT))
        .set_response_timeout(Some(distlock::DEFAULT_COMMAND_TIMEOUT));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

fn lease_key(prefix: &str, name: &str) -> Vec<u8> {
    [prefix.as_bytes(), b"{", name.as_bytes(), b"}"].concat()
}

/// The library's rules for lock names, checked here because these commands build keys
/// themselves.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("invalid key: a lock name must not be empty".into());
    }
    if name.len() > distlock::MAX_KEY_LEN {
        return Err(format!(
            "invalid key: a lock name is at most {} bytes",
            distlock::MAX_KEY_LEN
        ));
    }
    if name.starts_with('}') {
        return Err("invalid key: a lock name must not start with `}`".into());
    }
    Ok(())
}

/// Asks on the terminal; refuses to guess when there is none.
fn confirm(name: &str) -> Result<bool, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(
            "release --force asks for confirmation, but stdin is not a terminal; add --yes".into(),
        );
    }
    eprint!(
        "distlock: delete the lease of lock {name}? Its holder keeps running unprotected. [y/N] "
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(held: bool) -> NodeView {
        NodeView {
            url: String::new(),
            remaining: held.then_some(Duration::from_secs(1)),
            token: None,
            fence: None,
        }
    }

    #[test]
    fn a_lock_is_held_only_on_a_majority_of_nodes() {
        assert!(held_on_majority(&[view(true)]));
        assert!(!held_on_majority(&[view(false)]));
        assert!(held_on_majority(&[view(true), view(true), view(false)]));
        assert!(!held_on_majority(&[view(true), view(false), view(false)]));
    }

    #[test]
    fn the_lease_key_follows_the_documented_layout() {
        assert_eq!(lease_key("distlock:", "jobs:x"), b"distlock:{jobs:x}");
    }

    #[test]
    fn names_the_library_would_reject_are_rejected() {
        assert!(check_name("").is_err());
        assert!(check_name("}x").is_err());
        assert!(check_name(&"x".repeat(distlock::MAX_KEY_LEN + 1)).is_err());
        assert!(check_name("jobs:nightly").is_ok());
    }
}
