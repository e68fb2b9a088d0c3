//! The integration suite in one binary: every module runs against real Redis servers
//! started by `support` (Docker containers or `redis-server` processes; see
//! `tests/support/mod.rs`). The binaries that must stay separate are beside it: the
//! multi-process tests (`processes`, which re-run their own binary as child processes), the
//! soak (`soak`, ignored unless asked for) and TLS (`tls`, behind the `tls` feature).

#[path = "../support/mod.rs"]
mod support;

mod auto_extend;
mod belief;
mod cancellation;
#[cfg(feature = "cluster")]
mod cluster;
#[cfg(feature = "cluster")]
mod cluster_failover;
#[cfg(feature = "cluster")]
mod cluster_reshard;
mod drop;
mod failures;
mod fair;
mod fair_hostile;
mod fault_tools;
mod fencing;
mod hostile;
mod layers;
mod lock;
#[cfg(feature = "metrics")]
mod metrics;
mod multi;
mod mutual_exclusion;
mod notify;
mod notify_faults;
mod partition;
#[cfg(all(feature = "deadpool", feature = "bb8"))]
mod pools;
mod primitive_belief;
mod primitive_cancellation;
mod redlock;
mod redlock_fair;
mod redlock_notify;
mod redlock_pass;
mod replicas;
#[cfg(feature = "sentinel")]
mod replicas_failover;
mod restart;
mod rwlock;
mod security;
mod semaphore;
#[cfg(feature = "sentinel")]
mod sentinel;
