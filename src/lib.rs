//! Distributed lease locks on Redis.
//!
//! Use distlock when several processes, possibly on several machines, must agree that only
//! one of them does something right now: one worker runs the nightly job, one process
//! rewrites a record, one node leads. Within a single process, a
//! [`tokio::sync::Mutex`] is the right tool; distlock is for when the contenders do not
//! share memory but share a Redis server.
//!
//! A lock is a **lease** on one Redis key: `SET <key> <token> NX PX <ttl>`, with a fresh
//! 122-bit random token (a UUID v4) for every acquisition. Only the holder of the token can extend or
//! release the lease (compare-and-act Lua scripts), and a holder that vanishes loses the
//! lease when its TTL runs out.
//!
//! ```no_run
//! # async fn demo() -> distlock::Result<()> {
//! use std::time::Duration;
//! use distlock::{LockManager, LockOptions};
//!
//! let locks = LockManager::connect("redis://127.0.0.1:6379").await?;
//!
//! // Wait (with backoff, up to the wait budget) for the lock, hold it, give it back.
//! let guard = locks.lock("jobs:nightly").await?;
//! println!("fencing token {:?}", guard.fencing_token());
//! guard.release().await?;
//!
//! // One attempt, no waiting.
//! match locks.try_lock("jobs:nightly").await {
//!     Ok(guard) => drop(guard), // dropping releases in the background
//!     Err(e) if e.is_held_by_other() => println!("someone else is on it"),
//!     Err(e) => return Err(e),
//! }
//!
//! // Custom lease and wait.
//! let opts = LockOptions::new()
//!     .with_ttl(Duration::from_secs(10))
//!     .with_wait(Duration::from_secs(5));
//! let guard = locks.lock_with("jobs:nightly", opts).await?;
//! guard.extend(Duration::from_secs(10)).await?;
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! # Keeping a lease alive
//!
//! With [`LockOptions::with_auto_extend`], the manager's auto-extension task extends the lease about
//! every `ttl/3` while the guard lives (all leases of a manager in one batched call per
//! period). [`LockGuard::lost`] resolves when the lease is gone anyway (taken, expired,
//! Redis unreachable until the deadline, hold-time cap), and
//! [`LockManager::with_lock`] runs a future under an auto-extended lease and cancels it if
//! the lease is lost:
//!
//! ```no_run
//! # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
//! let total = locks
//!     .with_lock("reports:nightly", |lease| async move {
//!         // `lease.fencing_token()` goes with every write to the protected resource.
//!         40 + 2
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees and their limits
//!
//! - **Mutual exclusion while the holder keeps to the lease.** Two guards for one lock
//!   never overlap as long as each holder stops touching the protected resource by its
//!   [`LockGuard::valid_until`]. A process that pauses (GC, swap, a stopped VM) past that
//!   deadline can wake up still believing it holds the lock while someone else does.
//!   A lease lock alone cannot prevent that.
//! - **For correctness, check the fencing token at the resource.** With
//!   [`LockOptions::with_fencing`] (off by default: it costs a Lua acquire), every lease
//!   carries a [`LockGuard::fencing_token`] that is strictly greater than the tokens of all
//!   earlier fenced leases on the same lock. A resource that remembers the highest token it has accepted
//!   and rejects writes with a lower one turns the lease into a safe lock, even across
//!   pauses. distlock hands out the token; the check lives in your resource. The token is
//!   `max(counter + 1, Redis server time in µs)`, so it keeps increasing even if the
//!   counter key is lost, assuming the server clock does not step backwards.
//! - **Nobody releases or extends another's lease.** Release and extend compare the token
//!   first; a stale guard gets [`Error::Lost`] and leaves the current holder alone.
//! - **Validity is measured on the monotonic clock** from just before the acquire was
//!   sent, minus a drift allowance (`ttl/100 + 2 ms`); wall clocks are never trusted.
//! - **One Redis primary.** If that primary fails over to a replica that missed the
//!   latest `SET`, two holders can overlap; the fencing check above still protects the
//!   resource.
//! - **Every call is bounded in time**: by the wait budget, the command timeout
//!   ([`LockManagerBuilder::with_command_timeout`]) and the connect timeout.
//! - **Order among waiters**: first come, first served among the waiters of one manager;
//!   across managers and processes only with [`LockOptions::with_fair`], which queues
//!   waiters in Redis beside the lease (a crashed waiter holds the queue up for at most
//!   its [entry lease](LockOptions::with_queue_lease)).
//!
//! # Several primaries (Redlock)
//!
//! A single Redis primary is a single point of failure for the lock: while it is down,
//! nobody can take the lock. If that matters, run N independent primaries (3 or 5; not
//! replicas of one another, not one Cluster) and build the manager with
//! [`LockManagerBuilder::connect_redlock`] (or [`build_redlock`](LockManagerBuilder::build_redlock)
//! from your own connections). A lock is then held on a majority (`N/2 + 1`) of the nodes and
//! survives the loss of any minority. The guard, waiting, backoff, drop and extension work
//! as for one primary. One thing is added: when a guard ends while another call of the
//! same manager waits for the lock (not in fair mode), the lease is passed to that call on
//! every node at once (one round trip, the key never free in between; at most 4 times in
//! a row, then released for every manager), see [`protocol::PASS`].
//!
//! ```no_run
//! # async fn demo() -> distlock::Result<()> {
//! use std::time::Duration;
//! use distlock::{Error, LockManager};
//!
//! let locks = LockManager::builder()
//!     .with_node_timeout(Duration::from_millis(50))
//!     .connect_redlock(["redis://a:6379", "redis://b:6379", "redis://c:6379"])
//!     .await?;
//! match locks.try_lock("jobs:nightly").await {
//!     Ok(guard) => guard.release().await?,
//!     Err(e) if e.is_held_by_other() => println!("another worker has it"),
//!     Err(Error::Quorum(q)) => eprintln!("too few nodes answered: {q}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```
//!
//! What it assumes:
//!
//! - **Bounded clock drift.** Each node expires the lease by its own clock; the guard's
//!   validity allows for `ttl/100 + 2 ms` of difference between the nodes' clocks and
//!   this process's over one lease. A node whose clock jumps forward can expire a lease
//!   early and let a second owner in.
//! - **A node does not forget a lease while it is held.** A node that crashes and restarts
//!   empty (no persistence) can give the lock to a second owner when it was part of the
//!   bare majority the lease stood on. Keep a restarted node out for at least the longest
//!   TTL in use (delayed restart), or run it with `appendonly yes` and
//!   `appendfsync always`. [`LockGuard::extend`] narrows the window: when it succeeds it
//!   also sets the lease again on the nodes that lost it.
//! - **Independent failures**: each node on its own machine, each URL a different server.
//!
//! Waiting: the manager subscribes on every node, and a release announced by any node it
//! deleted the lease on wakes the longest-waiting waiter of each manager; a waiter counts
//! as listening once subscribed on `N - majority + 1` nodes, so one failed node cannot
//! silence a release. Once contenders have collided on a key, a caller that found it held
//! asks the key's first node alone before the others, so contenders meet there instead of
//! splitting the vote. Waiters of one manager are served first come, first served; across
//! managers, [`LockOptions::with_fair`] keeps the waiter queue on the key's first node (a
//! queue all nodes agreed on would need consensus): waiters are served in arrival order
//! while that node is up, and as without fair mode while it is down; mutual exclusion
//! never depends on the queue.
//!
//! What it does not give: **fencing tokens.** [`LockGuard::fencing_token`] is `None`.
//! Per-node counters grow independently (and failed attempts grow some of them), so no
//! combination of the counters a majority returns is guaranteed to exceed the previous
//! holder's; a counter lost in a restart, or a clock-based floor read from nodes whose
//! clocks differ, makes it worse. Without a token, a holder that pauses past its lease can
//! still write after the next holder started. If the protected resource must be safe
//! against that, take the lock on a single primary and check its fencing token, or use a
//! consensus system (etcd, ZooKeeper) for the token.
//!
//! # Redis or ZooKeeper
//!
//! With the `zookeeper` cargo feature, [`LockManager::connect`] also takes
//! `zk://host1:2181,host2:2181/chroot` URLs (or [`LockManagerBuilder::connect_zookeeper`]):
//! the same calls take locks on a ZooKeeper ensemble, as ephemeral sequential nodes (Apache
//! Curator's `InterProcessMutex` recipe). Waiters queue first come, first served across
//! processes, each watching only its predecessor; the fencing token is the lock node's
//! creation zxid (always present, strictly increasing over the ensemble); a lock survives
//! the failure of any minority of the ensemble. The lease is the ZooKeeper session: the
//! default options' TTL is the session timeout asked for, every lease is kept alive by the
//! manager, and [`LockGuard::valid_until`] is the send time of the last confirmed request
//! (a `sync` through the leader, then a read of the node) plus half the negotiated timeout
//! minus a margin: below the leader's expiry of the session, which learns of a request
//! through its followers' pings. The README compares the two, with measured latencies.
//!
//! ```no_run
//! # async fn demo() -> distlock::Result<()> {
//! // Without the `zookeeper` feature this is an `InvalidArgument`.
//! let locks = distlock::LockManager::connect("zk://127.0.0.1:2181/myapp").await?;
//! let guard = locks.lock("jobs:nightly").await?;
//! assert!(guard.fencing_token().is_some());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! # Dropping a guard
//!
//! A [`LockGuard`] that is dropped without [`LockGuard::release`] hands the release to the
//! tokio runtime it was acquired on and returns immediately. Dropping never blocks and
//! never panics, also outside any runtime. If that runtime has shut down, nothing is sent
//! and the lease ends when its TTL runs out.
//!
//! # Errors
//!
//! One [`enum@Error`] type whose cases ask for different reactions: held by another owner
//! ([`Error::Contended`], [`Error::Timeout`]), lease lost ([`Error::Lost`]), server or
//! network failure ([`Error::Redis`]), too few of several primaries answered
//! ([`Error::Quorum`]), bad input ([`Error::InvalidArgument`]). No input makes distlock
//! panic.
//!
//! # Requirements and cargo features
//!
//! - **tokio**: every call is an `async fn` on tokio's timers; a dropped guard hands its
//!   release to the runtime the lease was taken on.
//! - **Redis 7.0 or later** ([`MIN_REDIS_VERSION`]): [`LockManager::connect`] reads the
//!   version and rejects older servers. Valkey works too (tested on Valkey 9.1).
//! - **Deployments**: one primary, a primary with replicas behind Redis Sentinel (feature
//!   `sentinel`), a Redis Cluster (feature `cluster`), several independent primaries
//!   (Redlock), or a ZooKeeper ensemble (feature `zookeeper`).
//!
//! All cargo features are off by default:
//!
//! | feature | what it adds |
//! |---|---|
//! | `tls` | `rediss://` URLs, through rustls |
//! | `cluster` | `LockManagerBuilder::connect_cluster`: locks on a Redis Cluster |
//! | `sentinel` | `LockManagerBuilder::connect_sentinel`: the primary found through Redis Sentinel, followed across failovers |
//! | `deadpool` | `LockManagerBuilder::build_pool` on a `deadpool_redis::Pool` (see the `pool` module) |
//! | `bb8` | `LockManagerBuilder::build_pool` on a `bb8::Pool<bb8_redis::RedisConnectionManager>` (see the `pool` module) |
//! | `metrics` | counters, histograms and a gauge through the `metrics` facade (below) |
//! | `zookeeper` | `zk://` URLs: locks on a ZooKeeper ensemble |
//!
//! # Metrics
//!
//! With the `metrics` feature, distlock records through the
//! [`metrics`](https://docs.rs/metrics) facade into whatever recorder the application
//! installed (a Prometheus exporter, for instance); with no recorder installed the calls
//! do nothing, and without the feature they are not compiled in.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `distlock_acquire_total` | counter | `outcome`: `acquired`, `contended`, `timeout`, `error` | finished acquire calls: [`LockManager::lock`], [`try_lock`](LockManager::try_lock), their `_with` forms, and the acquire of [`with_lock`](LockManager::with_lock) |
//! | `distlock_wait_seconds` | histogram | `outcome` (as above) | how long each of those calls took |
//! | `distlock_lost_total` | counter | `reason`: `expired`, `taken`, `unreachable`, `max_hold_reached`, `no_quorum`, `not_replicated` | leases lost while held ([`LostReason`]), counted once per lease, when distlock finds the loss (an extend, a release, the auto-extension task, or the drop of a guard whose lease ran out) |
//! | `distlock_hold_seconds` | histogram | `ended`: `released`, `lost` | how long each lease was held: from just before its acquire was sent to its release or drop, or to the moment its loss was found |
//! | `distlock_held_leases` | gauge | none | leases held now: acquired and not yet released, dropped or found lost |
//!
//! No label carries the lock's name: names are unbounded, and so would the series be.
#![deny(missing_docs)]
#![warn(rust_2018_idioms, unreachable_pub)]

mod auto_extend;
mod backoff;
mod builder;
#[cfg(feature = "cluster")]
mod cluster;
mod connect;
mod error;
mod guard;
mod key;
mod lease;
mod manager;
mod metrics;
mod multi;
mod notify;
mod options;
#[cfg(any(feature = "deadpool", feature = "bb8"))]
pub mod pool;
pub mod protocol;
mod redlock;
mod rwlock;
mod semaphore;
#[cfg(feature = "sentinel")]
mod sentinel;
mod store;
mod wait;
#[cfg(feature = "zookeeper")]
mod zookeeper;

pub use backoff::{Backoff, Delays};
pub use builder::{
    DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_NODE_TIMEOUT, DEFAULT_PREFIX,
    LockManagerBuilder,
};
pub use connect::MIN_REDIS_VERSION;
#[cfg(feature = "zookeeper")]
pub use error::ZooKeeperError;
pub use error::{
    Error, InvalidArgument, LostReason, NodeOutcome, NodeReport, QuorumError, QuorumOperation,
    Result,
};
pub use guard::LockGuard;
pub use key::{MAX_KEY_LEN, MAX_PREFIX_LEN};
pub use lease::LeaseHandle;
pub use manager::LockManager;
pub use multi::MultiGuard;
pub use options::{
    LockOptions, MAX_QUEUE_LEASE, MAX_REPLICA_TIMEOUT, MAX_TTL, MIN_QUEUE_LEASE, MIN_TTL, Replicas,
};
pub use rwlock::RwLock;
pub use semaphore::Semaphore;

// `redis` types appear in the public API (`Error::Redis`, `LockManager::new`).
pub use redis;

// The README's code compiles as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
