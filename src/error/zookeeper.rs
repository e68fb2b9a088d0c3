//! The error of a ZooKeeper call (`zookeeper` feature), as distlock reports it.

use std::fmt;

/// A ZooKeeper request failed: the connection (lost, timed out, no server reachable), the
/// session (expired), or the server's answer (no permission, a bad path, ...).
///
/// [`is_transient`](Self::is_transient) tells the first kind apart: waiting calls retry
/// those within their budget, like a Redis connection error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZooKeeperError {
    transient: bool,
    detail: String,
}

impl ZooKeeperError {
    pub(crate) fn new(transient: bool, detail: impl Into<String>) -> Self {
        ZooKeeperError {
            transient,
            detail: detail.into(),
        }
    }

    /// Whether a later try may succeed: the connection was lost or timed out, no server
    /// answered, or the session expired (the next call opens a new one).
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// What failed, in words.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for ZooKeeperError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for ZooKeeperError {}
