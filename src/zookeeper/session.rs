//! The manager's ZooKeeper session: one at a time, opened again after it expires.
//!
//! A lease on ZooKeeper is the session's: every lock node is ephemeral, so the server
//! deletes it when the session ends (closed, or expired after the negotiated timeout without
//! a request from this client). A session that expired is never resumed; the next call that
//! needs one opens a new session (and the leases of the old one are lost).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use zookeeper_client as zk;

use crate::error::{Error, Result, ZooKeeperError};

/// `zk://host1:2181,host2:2181/chroot` parsed: the connect string and the chroot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) hosts: String,
    pub(crate) chroot: Option<String>,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("zk://").ok_or_else(|| {
            Error::invalid(
                "url",
                "a ZooKeeper URL starts with `zk://` (zk://host:port,.../chroot)",
            )
        })?;
        let (hosts, chroot) = match rest.find('/') {
            Some(at) => (&rest[..at], Some(&rest[at..])),
            None => (rest, None),
        };
        if hosts.is_empty() || hosts.split(',').any(|h| h.trim().is_empty()) {
            return Err(Error::invalid(
                "url",
                "a ZooKeeper URL lists at least one host:port, separated by commas",
            ));
        }
        let chroot = match chroot.map(|c| c.trim_end_matches('/')) {
            None | Some("") => None,
            Some(c) => {
                if c.split('/')
                    .skip(1)
                    .any(|s| s.is_empty() || s == "." || s == "..")
                {
                    return Err(Error::invalid("url", format!("bad chroot `{c}`")));
                }
                Some(c.to_owned())
            }
        };
        Ok(Target {
            hosts: hosts.to_owned(),
            chroot,
        })
    }
}

/// A ZooKeeper client error as distlock's error: the connection and the session are
/// transient (a later call reconnects or opens a new session), the rest is what the server
/// answered.
pub(crate) fn zk_error(e: zk::Error) -> Error {
    let transient = connection_lost(&e)
        || matches!(
            e,
            zk::Error::Timeout
                | zk::Error::NoHosts
                | zk::Error::SessionExpired
                | zk::Error::SessionMoved
                | zk::Error::Throttled
                | zk::Error::ClientClosed
        );
    Error::ZooKeeper(ZooKeeperError::new(transient, e.to_string()))
}

/// The connection broke under a request: its outcome is unknown. The client reports a
/// broken connection as `ConnectionLoss`, or, for a request caught by the socket's own
/// error (reset, broken pipe), as a custom error carrying the I/O error.
pub(crate) fn connection_lost(e: &zk::Error) -> bool {
    matches!(e, zk::Error::ConnectionLoss | zk::Error::Custom(_))
}

/// No answer within `limit`.
pub(crate) fn no_answer(what: &str, limit: Duration) -> Error {
    Error::ZooKeeper(ZooKeeperError::new(
        true,
        format!("no answer from ZooKeeper to {what} within {limit:?}"),
    ))
}

/// Runs `call` under `limit`.
pub(crate) async fn bounded<T>(
    what: &str,
    limit: Duration,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(out) => out,
        Err(_) => Err(no_answer(what, limit)),
    }
}

/// The current session and how to open the next.
pub(crate) struct Sessions {
    target: Target,
    session_timeout: Duration,
    connect_timeout: Duration,
    current: Mutex<Option<zk::Client>>,
    /// One reconnect at a time: callers that need a session wait for the one being opened
    /// (bounded by the connect timeout).
    opening: tokio::sync::Mutex<()>,
    /// The negotiated timeout of the last session opened, in milliseconds.
    negotiated_ms: AtomicU64,
}

fn terminal(state: zk::SessionState) -> bool {
    matches!(
        state,
        zk::SessionState::Expired | zk::SessionState::Closed | zk::SessionState::AuthFailed
    )
}

impl Sessions {
    /// Opens the first session (so a bad address fails at connect, not at the first lock).
    pub(crate) async fn open(
        target: Target,
        session_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let sessions = Sessions {
            target,
            session_timeout,
            connect_timeout,
            current: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            negotiated_ms: AtomicU64::new(
                u64::try_from(session_timeout.as_millis()).unwrap_or(u64::MAX),
            ),
        };
        sessions.client().await?;
        Ok(sessions)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<zk::Client>> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current session, if it is not over (it may be disconnected for now).
    pub(crate) fn live(&self) -> Option<zk::Client> {
        self.slot()
            .as_ref()
            .filter(|client| !terminal(client.state()))
            .cloned()
    }

    /// The negotiated session timeout of the current (or last) session.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.negotiated_ms.load(Ordering::Relaxed))
    }

    /// The current session, or a new one if it expired or was closed.
    pub(crate) async fn client(&self) -> Result<zk::Client> {
        if let Some(client) = self.live() {
            return Ok(client);
        }
        let _opening = self.opening.lock().await;
        if let Some(client) = self.live() {
            return Ok(client);
        }
        let client = bounded("connect", self.connect_timeout, self.connect()).await?;
        let negotiated = u64::try_from(client.session_timeout().as_millis()).unwrap_or(u64::MAX);
        self.negotiated_ms.store(negotiated, Ordering::Relaxed);
        tracing::debug!(
            session = %client.session_id(),
            timeout_ms = negotiated,
            "ZooKeeper session opened"
        );
        *self.slot() = Some(client.clone());
        Ok(client)
    }

    async fn connect(&self) -> Result<zk::Client> {
        let client = zk::Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_connection_timeout(self.connect_timeout)
            .connect(&self.target.hosts)
            .await
            .map_err(|e| match e {
                zk::Error::NoHosts | zk::Error::Timeout => Error::ZooKeeper(ZooKeeperError::new(
                    true,
                    format!(
                        "could not open a session on ZooKeeper at {}: {e}",
                        self.target.hosts
                    ),
                )),
                other => zk_error(other),
            })?;
        let Some(chroot) = &self.target.chroot else {
            return Ok(client);
        };
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        client.mkdir(chroot, &persistent).await.map_err(zk_error)?;
        client
            .chroot(chroot.as_str())
            .map_err(|_| Error::invalid("url", format!("bad chroot `{chroot}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("zk://a:2181,b:2181/app/locks").unwrap();
        assert_eq!(t.hosts, "a:2181,b:2181");
        assert_eq!(t.chroot.as_deref(), Some("/app/locks"));
        let t = Target::parse("zk://127.0.0.1:2181/").unwrap();
        assert_eq!(t.chroot, None);
        for bad in [
            "redis://a",
            "zk://",
            "zk://a,,b",
            "zk:///x",
            "zk://a/b//c",
            "zk://a/..",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
