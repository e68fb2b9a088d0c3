//! Releasing a lease in the background, retried until the server answers: a dropped
//! guard, a release that failed, an abandoned acquire, a passed lease nobody took up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tracing::Instrument;

use super::{LeaseStore, Verdict};
use crate::error::Error;
use crate::key::{LockKey, Token};

/// The first pause between two tries of a background release; doubled per failure.
const RELEASE_RETRY_MIN: Duration = Duration::from_millis(50);
/// The longest pause between two tries of a background release.
const RELEASE_RETRY_MAX: Duration = Duration::from_secs(1);
/// The longest a background release keeps trying, whatever the lease's TTL.
const RELEASE_RETRY_FOR: Duration = Duration::from_secs(300);

/// Hands a compare-and-delete of (`key`, `token`) to `runtime` and returns at once: the one
/// way a lease is released in the background (a dropped guard, a release that failed, an
/// abandoned acquire).
///
/// A release that cannot reach the server is tried again, with a growing pause, until the
/// server answers: a command of this lease held up by a paused server or a slow link may
/// still run after the first try, and a lease nobody releases would block the lock for its
/// whole TTL. The tries stop once `ttl` (at most [`RELEASE_RETRY_FOR`]) has passed: the
/// lease cannot outlive that unless a command of it runs later still; or on an error the
/// server answered. The compare-and-delete never touches another owner's lease.
///
/// `Handle::spawn` neither blocks nor panics; on a runtime that has shut down the task is
/// dropped unrun and the TTL ends the lease.
pub(crate) fn release_in_background(
    runtime: &Handle,
    store: Arc<dyn LeaseStore>,
    key: LockKey,
    token: Token,
    ttl: Duration,
) {
    let span =
        tracing::debug_span!("distlock.background_release", key = %key, token = token.short());
    runtime.spawn(release_retrying(store, key, token, ttl).instrument(span));
}

/// The tries of [`release_in_background`], run where the caller runs them.
pub(crate) async fn release_retrying(
    store: Arc<dyn LeaseStore>,
    key: LockKey,
    token: Token,
    ttl: Duration,
) {
    let mut pause = RELEASE_RETRY_MIN;
    let give_up = Instant::now() + ttl.min(RELEASE_RETRY_FOR);
    loop {
        match store.release_in_background(&key, &token).await {
            Ok(Verdict::Done) => return tracing::debug!("released in the background"),
            Ok(other) => return tracing::debug!(?other, "nothing to release"),
            Err(e) if retryable(&e) && Instant::now() < give_up => {
                tracing::debug!(error = %e, ?pause, "background release failed; retrying");
            }
            Err(e) => {
                return tracing::warn!(error = %e, "background release failed; the TTL will end the lease");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RELEASE_RETRY_MAX);
    }
}

/// Errors after which a background release is worth another try.
fn retryable(e: &Error) -> bool {
    e.is_transient() || e.is_quorum()
}
