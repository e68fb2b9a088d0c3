//! Opening connections to a server: which URLs can be used, and what is checked on the
//! server before a manager relies on it.

use redis::aio::ConnectionLike;

use crate::error::{Error, Result};

/// Opens a client for `url`, or says why it cannot be used.
///
/// `rediss://` needs this crate's `tls` feature: without it the URL is rejected here, even
/// when another crate of the application turned on redis-rs' TLS (rustls would panic on
/// the first connection for want of a crypto provider). With it, rustls' `ring` provider is
/// installed as the process default unless the application installed one already.
pub(crate) fn open_client(url: &str) -> Result<redis::Client> {
    let tls = url
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss:/"));
    if tls {
        #[cfg(not(feature = "tls"))]
        return Err(Error::invalid(
            "url",
            "rediss:// needs distlock's `tls` cargo feature",
        ));
        #[cfg(feature = "tls")]
        {
            // `Err` means a provider is installed already: the application's choice stands.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    }
    redis::Client::open(url).map_err(|e| Error::invalid("url", e.to_string()))
}

/// The oldest Redis accepted by [`LockManagerBuilder::connect`](crate::LockManagerBuilder::connect):
/// the acquire is `SET key token NX PX ttl GET`, and `NX` with `GET` came in 7.0 (Valkey
/// reports a compatible version too).
pub const MIN_REDIS_VERSION: (u32, u32) = (7, 0);

/// What `INFO` tells about a server that matters to leases: its version (rejected below
/// [`MIN_REDIS_VERSION`]), whether it is a cluster node (rejected unless `cluster`: a
/// single-primary manager would get `MOVED` for most keys) and its eviction policy (warned
/// about once when it may evict lease keys). A server that does not allow `INFO` is taken as it is.
pub(crate) async fn check_server<C: ConnectionLike + Send>(
    conn: &mut C,
    url: &str,
    cluster: bool,
) -> Result<()> {
    let info: String = match redis::cmd("INFO").query_async(conn).await {
        Ok(info) => info,
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
            return Ok(());
        }
        Err(e) => {
            tracing::debug!(error = %e, "INFO not available; server not checked");
            return Ok(());
        }
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    if let Some(version) = field("redis_version") {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if found < MIN_REDIS_VERSION {
            return Err(Error::invalid(
                "url",
                format!(
                    "{} runs Redis {version}; distlock needs Redis {}.{} or later",
                    redacted(url),
                    MIN_REDIS_VERSION.0,
                    MIN_REDIS_VERSION.1
                ),
            ));
        }
    }
    if !cluster && field("cluster_enabled") == Some("1") {
        return Err(Error::invalid(
            "url",
            format!(
                "{} is a Redis Cluster node: connect with LockManager::builder().connect_cluster(..) \
                 (cargo feature `cluster`), which sends each lock to the primary of its slot",
                redacted(url)
            ),
        ));
    }
    if let Some(policy) = field("maxmemory_policy")
        && evicts_leases(policy)
    {
        tracing::warn!(
            policy,
            "the server may evict keys under memory pressure (maxmemory-policy {policy}): an \
             evicted lease lets a second owner in; use noeviction (or volatile-* with no other \
             keys that expire) for lock data"
        );
    }
    Ok(())
}

/// The error of a failed connection to `url`: the server's or the system's error, with the
/// URL (password redacted) and the likely cause. The error keeps its kind, so
/// [`Error::is_transient`] and redis-rs' `is_connection_refusal()` still answer as before.
pub(crate) fn connect_failed(url: &str, err: redis::RedisError) -> Error {
    let detail = match likely_cause(&err) {
        Some(hint) => format!(
            "could not connect to Redis at {}: {err} ({hint})",
            redacted(url)
        ),
        None => format!("could not connect to Redis at {}: {err}", redacted(url)),
    };
    let io_kind = if err.is_connection_refusal() {
        Some(std::io::ErrorKind::ConnectionRefused)
    } else if err.is_timeout() {
        Some(std::io::ErrorKind::TimedOut)
    } else if err.is_io_error() {
        Some(
            std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .map_or(std::io::ErrorKind::Other, std::io::Error::kind),
        )
    } else {
        None
    };
    Error::Redis(match io_kind {
        Some(kind) => std::io::Error::new(kind, detail).into(),
        None => redis::RedisError::from((err.kind(), "could not connect to Redis", detail)),
    })
}

/// What a failed connection most likely means, in words a user can act on.
fn likely_cause(err: &redis::RedisError) -> Option<&'static str> {
    let text = err.to_string();
    if err.is_connection_refusal() {
        Some("nothing listens at that address: is the Redis server running, on that host and port?")
    } else if err.is_timeout() {
        Some("no answer in time: check the host and port, a firewall, or a paused server")
    } else if text.contains("lookup") || text.contains("resolve") {
        Some("the host name does not resolve")
    } else if err.kind() == redis::ErrorKind::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("invalid username-password")
    {
        Some("the server refused the credentials: check the user and password in the URL")
    } else if text.contains("tls") || text.contains("TLS") || text.contains("certificate") {
        Some("the TLS handshake failed: check the certificate and that the server speaks TLS")
    } else {
        None
    }
}

/// Whether a `maxmemory-policy` can evict a lease key (a key with a TTL).
fn evicts_leases(policy: &str) -> bool {
    policy.starts_with("allkeys-") || policy.starts_with("volatile-")
}

/// `url` with its password, if any, replaced by `***`: fit for errors and logs.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_errors_or_logs() {
        assert_eq!(redacted("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redacted("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redacted("redis://secret@h"), "redis://***@h");
        assert_eq!(redacted("redis://h:6379"), "redis://h:6379");
        assert_eq!(redacted("not a url"), "not a url");
    }

    #[test]
    fn connect_errors_name_the_url_and_the_cause_and_keep_their_kind() {
        let refused: redis::RedisError =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused").into();
        let err = connect_failed("redis://u:secret@127.0.0.1:1/0", refused);
        let text = err.to_string();
        assert!(text.contains("redis://u:***@127.0.0.1:1/0"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("is the Redis server running"), "{text}");
        assert!(
            err.is_transient(),
            "a refused connection stays transient: {text}"
        );
        let Error::Redis(inner) = &err else {
            panic!("not a Redis error: {err:?}")
        };
        assert!(inner.is_connection_refusal(), "{text}");

        let auth = redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        let err = connect_failed("redis://h:1", auth);
        assert!(
            err.to_string().contains("check the user and password"),
            "{err}"
        );
        assert!(!err.is_transient(), "{err}");
    }

    #[test]
    fn evicting_policies_are_the_allkeys_and_volatile_ones() {
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-ttl",
        ] {
            assert!(evicts_leases(policy), "{policy}");
        }
        assert!(!evicts_leases("noeviction"));
    }
}
