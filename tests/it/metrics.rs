//! Metrics (feature `metrics`): a recorder local to each test's thread (current-thread
//! runtime, so distlock's background tasks record into it too) checks the numbers of known
//! scenarios.

use crate::support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock::{LockManager, LockOptions, LostReason};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use support::{RedisNode, lease_key, unique_key};

/// Every metric by `name{label=value,...}` (labels sorted).
#[derive(Default)]
struct TestRecorder {
    counters: Mutex<BTreeMap<String, Arc<CounterCell>>>,
    gauges: Mutex<BTreeMap<String, Arc<GaugeCell>>>,
    histograms: Mutex<BTreeMap<String, Arc<HistogramCell>>>,
}

#[derive(Default)]
struct CounterCell(AtomicU64);
#[derive(Default)]
struct GaugeCell(Mutex<f64>);
#[derive(Default)]
struct HistogramCell(Mutex<Vec<f64>>);

impl CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        *self.0.lock().unwrap() += value;
    }
    fn decrement(&self, value: f64) {
        *self.0.lock().unwrap() -= value;
    }
    fn set(&self, value: f64) {
        *self.0.lock().unwrap() = value;
    }
}

impl HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

fn id(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

fn cell<T: Default>(map: &Mutex<BTreeMap<String, Arc<T>>>, key: &Key) -> Arc<T> {
    Arc::clone(map.lock().unwrap().entry(id(key)).or_default())
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(cell(&self.counters, key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(cell(&self.gauges, key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(cell(&self.histograms, key))
    }
}

impl TestRecorder {
    fn counter(&self, id: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(id)
            .map_or(0, |c| c.0.load(Ordering::Relaxed))
    }

    fn gauge(&self, id: &str) -> f64 {
        self.gauges
            .lock()
            .unwrap()
            .get(id)
            .map_or(0.0, |g| *g.0.lock().unwrap())
    }

    fn samples(&self, id: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .unwrap()
            .get(id)
            .map_or_else(Vec::new, |h| h.0.lock().unwrap().clone())
    }

    /// Every counter with its value, for failure messages and exact comparisons.
    fn counters(&self) -> BTreeMap<String, u64> {
        self.counters
            .lock()
            .unwrap()
            .iter()
            .map(|(k, c)| (k.clone(), c.0.load(Ordering::Relaxed)))
            .collect()
    }
}

const HELD: &str = "distlock_held_leases{}";

/// Two acquires, one contended attempt, one timed-out wait, one release and one lease lost
/// to another owner (its key overwritten): every number as expected, the gauge back to 0.
#[tokio::test]
async fn a_known_scenario_gives_known_numbers() {
    let recorder = TestRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let first = unique_key("metrics-a");
    let second = unique_key("metrics-b");

    let guard = locks.lock(&first).await.expect("acquire 1");
    assert_eq!(recorder.gauge(HELD), 1.0);
    assert!(locks.try_lock(&first).await.unwrap_err().is_held_by_other());
    let waited = locks
        .lock_with(
            &first,
            LockOptions::new().with_wait(Duration::from_millis(150)),
        )
        .await
        .expect_err("held");
    assert!(
        matches!(waited, distlock::Error::Timeout { .. }),
        "{waited:?}"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    guard.release().await.expect("release");
    assert_eq!(recorder.gauge(HELD), 0.0);

    let guard = locks.lock(&second).await.expect("acquire 2");
    assert_eq!(recorder.gauge(HELD), 1.0);
    let _: () = redis::cmd("SET")
        .arg(lease_key(&second))
        .arg("somebody-else")
        .query_async(&mut check)
        .await
        .unwrap();
    let err = guard.extend(Duration::from_secs(30)).await.unwrap_err();
    assert!(err.is_lost(), "{err:?}");
    assert_eq!(recorder.gauge(HELD), 0.0, "a lost lease is no longer held");
    // Another extend and the drop find the same loss: it is counted once.
    assert!(
        guard
            .extend(Duration::from_secs(30))
            .await
            .unwrap_err()
            .is_lost()
    );
    drop(guard);

    let expected: BTreeMap<String, u64> = [
        ("distlock_acquire_total{outcome=acquired}", 2),
        ("distlock_acquire_total{outcome=contended}", 1),
        ("distlock_acquire_total{outcome=timeout}", 1),
        ("distlock_lost_total{reason=taken}", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(recorder.counters(), expected);
    assert_eq!(recorder.gauge(HELD), 0.0);

    let acquired = recorder.samples("distlock_wait_seconds{outcome=acquired}");
    assert_eq!(acquired.len(), 2);
    assert_eq!(
        recorder
            .samples("distlock_wait_seconds{outcome=contended}")
            .len(),
        1
    );
    let timed_out = recorder.samples("distlock_wait_seconds{outcome=timeout}");
    assert_eq!(timed_out.len(), 1);
    assert!(timed_out[0] >= 0.15, "waited its budget: {timed_out:?}");
    let released = recorder.samples("distlock_hold_seconds{ended=released}");
    assert_eq!(released.len(), 1);
    assert!(
        released[0] >= 0.15,
        "held while the others waited: {released:?}"
    );
    assert_eq!(
        recorder.samples("distlock_hold_seconds{ended=lost}").len(),
        1
    );

    let _: () = redis::cmd("DEL")
        .arg(lease_key(&second))
        .query_async(&mut check)
        .await
        .unwrap();
}

/// A loss found by the auto-extension task is counted when it is found, once, even
/// though the guard is dropped later.
#[tokio::test]
async fn a_loss_found_in_the_background_is_counted_once() {
    let recorder = TestRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("metrics-bg");
    let options = LockOptions::new()
        .with_ttl(Duration::from_millis(300))
        .with_auto_extend(true);

    let guard = locks.lock_with(&name, options).await.expect("acquire");
    let _: () = redis::cmd("SET")
        .arg(lease_key(&name))
        .arg("somebody-else")
        .query_async(&mut check)
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("found lost");
    assert_eq!(reason, LostReason::Taken);
    support::eventually(Duration::from_secs(1), "the loss is counted", || async {
        recorder.counter("distlock_lost_total{reason=taken}") == 1
    })
    .await;
    assert_eq!(recorder.gauge(HELD), 0.0);
    drop(guard);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(recorder.counter("distlock_lost_total{reason=taken}"), 1);
    assert_eq!(recorder.gauge(HELD), 0.0);
    assert_eq!(
        recorder.samples("distlock_hold_seconds{ended=lost}").len(),
        1
    );

    let _: () = redis::cmd("DEL")
        .arg(lease_key(&name))
        .query_async(&mut check)
        .await
        .unwrap();
}

/// A lease that ran out while its guard lived is counted as expired when the guard goes,
/// and nothing else is.
#[tokio::test]
async fn a_lease_that_ran_out_is_counted_expired_at_the_drop() {
    let recorder = TestRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("metrics-expired");

    let guard = locks
        .lock_with(
            &name,
            LockOptions::new().with_ttl(Duration::from_millis(50)),
        )
        .await
        .expect("acquire");
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(recorder.gauge(HELD), 1.0, "nobody looked yet");
    drop(guard);
    assert_eq!(recorder.counter("distlock_lost_total{reason=expired}"), 1);
    assert_eq!(recorder.gauge(HELD), 0.0);
    assert!(
        recorder
            .samples("distlock_hold_seconds{ended=released}")
            .is_empty()
    );
    assert_eq!(
        recorder.samples("distlock_hold_seconds{ended=lost}").len(),
        1
    );
}
