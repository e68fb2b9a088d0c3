//! Lock names, the Redis keys they map to, and lease tokens.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result, display_key};

/// The longest lock name accepted, in bytes. Lock names are identifiers, not payloads;
/// a longer one is rejected with [`Error::InvalidArgument`] before anything is sent.
pub const MAX_KEY_LEN: usize = 1024;

/// The longest key prefix accepted, in bytes.
pub const MAX_PREFIX_LEN: usize = 256;

/// The Redis keys of one lock.
///
/// Layout: `<prefix>{<name>}` for the lease, `<prefix>{<name>}:fence` for the fencing
/// counter, the pub/sub channel `<prefix>{<name>}:released` for release notifications, and
/// in fair mode the waiter queue `<prefix>{<name>}:q` with its entry expiries `...:qx`. The braces make `<name>` the Redis Cluster hash tag, so every key a script
/// touches for one lock lives in one slot. A name that itself contains braces still maps
/// all its keys to one slot: they share everything up to the suffix.
#[derive(Clone)]
pub(crate) struct LockKey {
    /// `<lease>:fence<lease>:released`, where `<lease>` is `<prefix>{<name>}`: all names of
    /// one lock in one allocation.
    buf: Arc<[u8]>,
    prefix_len: usize,
    lease_len: usize,
    /// Fair mode: waiters queue in Redis (`<lease>:q`, `<lease>:qx`) and releases name the
    /// next waiter.
    queued: bool,
}

const FENCE_SUFFIX: &[u8] = b":fence";
const RELEASED_SUFFIX: &[u8] = b":released";
const QUEUE_SUFFIX: &[u8] = b":q";
const QUEUE_EXPIRY_SUFFIX: &[u8] = b":qx";
const QUEUE_HANDOFF_SUFFIX: &[u8] = b":qh";

impl LockKey {
    pub(crate) fn new(prefix: &[u8], name: &[u8]) -> Result<Self> {
        if name.is_empty() {
            return Err(Error::invalid("key", "a lock name must not be empty"));
        }
        if name.len() > MAX_KEY_LEN {
            return Err(Error::invalid(
                "key",
                format!(
                    "a lock name is at most {MAX_KEY_LEN} bytes, got {}",
                    name.len()
                ),
            ));
        }
        if name.first() == Some(&b'}') {
            // `<prefix>{}...`: Redis Cluster would hash the whole key for an empty hash tag,
            // and the lease, the fence counter and the channel would land in different slots.
            return Err(Error::invalid(
                "key",
                "a lock name must not start with `}` (it would leave the Redis Cluster hash tag empty)",
            ));
        }
        let lease_len = prefix.len() + name.len() + 2;
        // Written on the stack, then copied into the `Arc` at its final size: one
        // allocation per lock name. The builder checks the prefix's length; a longer one is
        // refused here too rather than overflowing the buffer.
        const MAX: usize = 2 * (MAX_PREFIX_LEN + MAX_KEY_LEN + 2) + 16;
        let len = 2 * lease_len + FENCE_SUFFIX.len() + RELEASED_SUFFIX.len();
        if len > MAX {
            return Err(Error::invalid(
                "prefix",
                format!("a key prefix is at most {MAX_PREFIX_LEN} bytes"),
            ));
        }
        let mut stack = [0u8; MAX];
        let mut at = 0;
        for part in [
            prefix,
            b"{",
            name,
            b"}",
            FENCE_SUFFIX,
            prefix,
            b"{",
            name,
            b"}",
            RELEASED_SUFFIX,
        ] {
            stack[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let buf: Arc<[u8]> = Arc::from(&stack[..at]);
        Ok(LockKey {
            buf,
            prefix_len: prefix.len(),
            lease_len,
            queued: false,
        })
    }

    /// This lock in fair mode: its waiters queue in Redis beside the lease.
    pub(crate) fn queued(mut self) -> Self {
        self.queued = true;
        self
    }

    /// Whether this lock is used in fair mode.
    pub(crate) fn is_queued(&self) -> bool {
        self.queued
    }

    /// Fair mode: the sorted set of waiter ids, by arrival.
    pub(crate) fn queue(&self) -> Vec<u8> {
        [self.lease(), QUEUE_SUFFIX].concat()
    }

    /// Fair mode: the hash of each waiter's entry expiry (server ms).
    pub(crate) fn queue_expiry(&self) -> Vec<u8> {
        [self.lease(), QUEUE_EXPIRY_SUFFIX].concat()
    }

    /// Fair mode on one primary: the hash of handoff terms (waiter id → the token, TTL,
    /// fence counter TTL, entry lease and attempt number a release would hand over) and of
    /// leases handed over (token → waiter id, fencing token and attempt number).
    pub(crate) fn queue_handoff(&self) -> Vec<u8> {
        [self.lease(), QUEUE_HANDOFF_SUFFIX].concat()
    }

    /// The name the caller gave.
    pub(crate) fn name(&self) -> &[u8] {
        &self.buf[self.prefix_len + 1..self.lease_len - 1]
    }

    /// The Redis key holding the lease.
    pub(crate) fn lease(&self) -> &[u8] {
        &self.buf[..self.lease_len]
    }

    /// The Redis key holding the fencing counter.
    pub(crate) fn fence(&self) -> &[u8] {
        &self.buf[..self.lease_len + FENCE_SUFFIX.len()]
    }

    /// The pub/sub channel a release of this lock is announced on.
    pub(crate) fn released_channel(&self) -> &[u8] {
        &self.buf[self.lease_len + FENCE_SUFFIX.len()..]
    }

    /// Printable, shortened name for errors.
    pub(crate) fn display(&self) -> String {
        display_key(self.name())
    }
}

/// Printable, shortened name for logs, formatted only when a log line is written.
impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

pub(crate) fn validate_prefix(prefix: &[u8]) -> Result<()> {
    // A `{` in the prefix starts the hash tag there; an empty tag (`{}`) would make Redis
    // Cluster hash each whole key, splitting one lock's keys over several slots.
    if let Some(open) = prefix.iter().position(|&b| b == b'{')
        && prefix.get(open + 1) == Some(&b'}')
    {
        return Err(Error::invalid(
            "prefix",
            "a key prefix must not contain an empty hash tag `{}`",
        ));
    }
    if prefix.len() > MAX_PREFIX_LEN {
        return Err(Error::invalid(
            "prefix",
            format!(
                "a key prefix is at most {MAX_PREFIX_LEN} bytes, got {}",
                prefix.len()
            ),
        ));
    }
    Ok(())
}

/// The secret that proves ownership of one lease: 122 random bits from the operating
/// system's CSPRNG (a UUID v4: 128 bits of which 6 are fixed version and variant bits), fresh for every acquisition, stored as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Token([u8; 32]);

impl Token {
    pub(crate) fn generate() -> Self {
        let mut out = [0u8; 32];
        uuid::Uuid::new_v4().simple().encode_lower(&mut out);
        Token(out)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The first 8 hex digits: enough to tell leases apart in logs, useless to an attacker.
    pub(crate) fn short(&self) -> &str {
        // The bytes are ASCII hex digits written by `encode_lower`.
        std::str::from_utf8(&self.0[..8]).unwrap_or("????????")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag_of_the_name() {
        let key = LockKey::new(b"app:", b"jobs:nightly").unwrap();
        assert_eq!(key.lease(), b"app:{jobs:nightly}");
        assert_eq!(key.fence(), b"app:{jobs:nightly}:fence");
        assert_eq!(key.released_channel(), b"app:{jobs:nightly}:released");
        assert_eq!(key.name(), b"jobs:nightly");
        let key = key.queued();
        assert_eq!(key.queue(), b"app:{jobs:nightly}:q");
        assert_eq!(key.queue_expiry(), b"app:{jobs:nightly}:qx");
    }

    #[test]
    fn empty_and_oversized_names_are_rejected() {
        for name in [Vec::new(), vec![b'x'; MAX_KEY_LEN + 1]] {
            match LockKey::new(b"p:", &name) {
                Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "key"),
                other => panic!("accepted a name of {} bytes: {other:?}", name.len()),
            }
        }
        assert!(LockKey::new(b"p:", &[b'x'; MAX_KEY_LEN]).is_ok());
    }

    #[test]
    fn names_and_prefixes_that_leave_an_empty_hash_tag_are_rejected() {
        for name in [&b"}"[..], b"}x", b"}{y}"] {
            match LockKey::new(b"p:", name) {
                Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "key"),
                other => panic!("accepted {name:?}: {other:?}"),
            }
        }
        assert!(validate_prefix(b"app{}:").is_err());
        // A closing brace later in the name still leaves a non-empty tag.
        assert!(LockKey::new(b"p:", b"x}").is_ok());
        assert!(validate_prefix(b"app{x}:").is_ok());
    }

    #[test]
    fn binary_names_are_kept_byte_for_byte() {
        let name = [0u8, 0xff, b'{', b'\n', b'}'];
        let key = LockKey::new(b"", &name).unwrap();
        assert_eq!(key.name(), name);
        assert_eq!(key.lease(), b"{\0\xff{\n}}");
    }

    #[test]
    fn tokens_are_32_hex_digits_and_distinct() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.short().len(), 8);
    }
}
