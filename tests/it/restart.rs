//! Redis restarts under load: typed errors while it is gone, reconnection by itself, no
//! overlapping holders across the restart, fencing tokens that keep increasing.

use crate::support;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distlock::{Backoff, Error, LockManager, LockOptions, LostReason};
use support::{Data, NodeOptions, RedisNode, unique_key};

const KEYS: usize = 2;
const TASKS: usize = 12;

/// No single lock call may take longer than this, whatever the server does. The calls
/// themselves are bounded by the wait budget (1 s) plus the command timeout (500 ms) and
/// a reconnect (connect timeout 2 s); 15 s leaves room for a loaded machine and still
/// catches a hang.
const CALL_BOUND: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Tally {
    acquired: AtomicU64,
    redis_errors: AtomicU64,
    timeouts: AtomicU64,
    released: AtomicU64,
    release_redis_errors: AtomicU64,
    release_lost: AtomicU64,
    /// The longest `lock_with` call, in ms: a call in flight while the server is down
    /// waits it out within its budget.
    slowest_lock_ms: AtomicU64,
}

/// What the holders of one key did.
#[derive(Default)]
struct KeyRecord {
    /// (start, end, fencing token) of every critical section.
    sections: Mutex<Vec<(Instant, Instant, u64)>>,
    /// A deliberately non-atomic counter: load, yield, store. Exact only under exclusion.
    counter: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_never_overlap_across_redis_restarts() {
    // Persistent: a restart must not forget a lease it acknowledged, or two holders
    // could overlap legitimately (see the test below for that case).
    let node = RedisNode::start_opts(NodeOptions::default().persistent()).await;
    let locks = LockManager::builder()
        .with_command_timeout(Duration::from_millis(500))
        .with_connect_timeout(Duration::from_secs(2))
        .connect(&node.url())
        .await
        .unwrap();
    let prefix = unique_key("restart");
    let records: Arc<Vec<KeyRecord>> = Arc::new((0..KEYS).map(|_| KeyRecord::default()).collect());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let opts = LockOptions::new()
        .with_fencing(true)
        .with_ttl(Duration::from_secs(3))
        .with_wait(Duration::from_secs(1))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(2))
                .with_cap(Duration::from_millis(50)),
        );

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (locks, records, tally, stop) = (
            locks.clone(),
            Arc::clone(&records),
            Arc::clone(&tally),
            Arc::clone(&stop),
        );
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let k = i % KEYS;
                let called = Instant::now();
                let attempt = tokio::time::timeout(
                    CALL_BOUND,
                    locks.lock_with(format!("{prefix}:{k}"), opts),
                )
                .await
                .expect("lock_with returned within its bound");
                let took = u64::try_from(called.elapsed().as_millis()).unwrap_or(u64::MAX);
                tally.slowest_lock_ms.fetch_max(took, Ordering::Relaxed);
                let guard = match attempt {
                    Ok(guard) => guard,
                    Err(Error::Redis(_)) => {
                        tally.redis_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(Error::Timeout { .. }) => {
                        tally.timeouts.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(other) => panic!("unexpected error {other:?}"),
                };
                let record = &records[k];
                let start = Instant::now();
                let seen = record.counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                record.counter.store(seen + 1, Ordering::SeqCst);
                let end = Instant::now();
                assert!(
                    end < guard.valid_until(),
                    "the section ended within the lease"
                );
                let fence = guard.fencing_token().expect("fence");
                record.sections.lock().unwrap().push((start, end, fence));
                tally.acquired.fetch_add(1, Ordering::Relaxed);
                let released = tokio::time::timeout(CALL_BOUND, guard.release())
                    .await
                    .expect("release returned within its bound");
                match released {
                    Ok(()) => tally.released.fetch_add(1, Ordering::Relaxed),
                    Err(Error::Redis(_)) => {
                        tally.release_redis_errors.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(Error::Lost { .. }) => tally.release_lost.fetch_add(1, Ordering::Relaxed),
                    Err(other) => panic!("unexpected release error {other:?}"),
                };
            }
        }));
    }

    let run = Duration::from_millis(1500);
    tokio::time::sleep(run).await;
    node.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.start_again_with(Data::Keep).await;
    tokio::time::sleep(run).await;
    node.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.start_again_with(Data::Keep).await;
    tokio::time::sleep(run).await;
    let errors_before_last_run = tally.redis_errors.load(Ordering::Relaxed);
    let acquired_before_last_run = tally.acquired.load(Ordering::Relaxed);
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(CALL_BOUND * 2, task)
            .await
            .expect("every task stopped")
            .expect("no task panicked");
    }

    let t = &*tally;
    let acquired = t.acquired.load(Ordering::Relaxed);
    let redis_errors = t.redis_errors.load(Ordering::Relaxed);
    // Waiting calls ride out a short restart within their budget, so the restarts show as
    // failed releases (in flight when the server died) as much as failed waits.
    let felt = redis_errors
        + t.release_redis_errors.load(Ordering::Relaxed)
        + t.release_lost.load(Ordering::Relaxed)
        + t.timeouts.load(Ordering::Relaxed);
    // Or as a call that waited out the 300 ms of downtime: a restart is short enough that
    // waiting calls may ride it out without an error.
    let slowest = t.slowest_lock_ms.load(Ordering::Relaxed);
    assert!(
        felt > 0 || slowest >= 200,
        "the restarts were felt as errors, timeouts or long waits (slowest call {slowest} ms)"
    );
    assert!(
        acquired > acquired_before_last_run,
        "the same manager acquires again after the restarts, by itself"
    );
    for (k, record) in records.iter().enumerate() {
        let mut sections = record.sections.lock().unwrap().clone();
        assert_eq!(
            record.counter.load(Ordering::SeqCst),
            sections.len() as u64,
            "key {k}: the non-atomic counter is exact"
        );
        sections.sort_by_key(|s| s.0);
        for pair in sections.windows(2) {
            assert!(pair[0].1 < pair[1].0, "key {k}: sections overlap: {pair:?}");
            assert!(pair[0].2 < pair[1].2, "key {k}: fences increase: {pair:?}");
        }
    }
    eprintln!(
        "redis restarts (kill, clean stop): {TASKS} tasks, {acquired} sections, 0 overlaps; \
         lock calls failing with a Redis error: {redis_errors} ({} after the restarts settled), \
         waits timed out: {}, releases ok / Redis error / lost: {} / {} / {}",
        redis_errors - errors_before_last_run,
        t.timeouts.load(Ordering::Relaxed),
        t.released.load(Ordering::Relaxed),
        t.release_redis_errors.load(Ordering::Relaxed),
        t.release_lost.load(Ordering::Relaxed),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_keep_increasing_across_a_restart_that_loses_data() {
    let node = RedisNode::start().await;
    let locks = LockManager::builder()
        .with_command_timeout(Duration::from_millis(500))
        .connect(&node.url())
        .await
        .unwrap();
    let name = unique_key("amnesia");
    let opts = LockOptions::new()
        .with_fencing(true)
        .with_ttl(Duration::from_secs(30));
    let before = locks.lock_with(&name, opts).await.unwrap();

    // The server forgets every lease and the fencing counter.
    node.restart(Data::Wipe).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        match locks.try_lock_with(&name, opts).await {
            Ok(guard) => break guard,
            Err(Error::Redis(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("expected the forgotten lock to be free, got {other:?}"),
        }
    };
    // The documented limit: the old holder's lease is gone, a new one exists. The fencing
    // token is what keeps the protected resource safe: it still increases.
    assert!(
        after.fencing_token().unwrap() > before.fencing_token().unwrap(),
        "fences {:?} then {:?}",
        before.fencing_token(),
        after.fencing_token()
    );
    // And the old holder finds out instead of touching the new holder's lease.
    match before.extend(Duration::from_secs(30)).await {
        Err(Error::Lost {
            reason: LostReason::Taken,
            ..
        }) => {}
        other => panic!("expected Lost(Taken), got {other:?}"),
    }
    assert!(!before.is_held());
    match before.release().await {
        Err(Error::Lost {
            reason: LostReason::Taken,
            ..
        }) => {}
        other => panic!("expected Lost(Taken), got {other:?}"),
    }
    assert!(locks.try_lock(&name).await.unwrap_err().is_held_by_other());
    after.release().await.unwrap();
}
