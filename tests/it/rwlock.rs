//! `RwLock`: many readers or one writer; writers are not starved by readers.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions};
use redis::AsyncCommands;
use support::{Baseline, RedisNode, unique_key};

fn readers_key(name: &str) -> String {
    format!("{}rw:{{{name}}}", distlock::DEFAULT_PREFIX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_share_writers_exclude_and_nothing_is_left() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("rw");
    let rw = locks.rw_lock(&name).unwrap();
    let fenced = LockOptions::new().with_fencing(true);
    let mut readers = Vec::new();
    for _ in 0..5 {
        readers.push(rw.read_with(fenced).await.unwrap());
    }
    assert!(rw.try_write().await.unwrap_err().is_held_by_other());
    let last_read_token = readers.iter().filter_map(|r| r.fencing_token()).max();
    for reader in readers {
        reader.release().await.unwrap();
    }
    // The try_write above left an intent that holds new readers back; the writer that
    // comes now takes the lock and clears it.
    let writer = rw.write_with(fenced).await.unwrap();
    assert!(
        writer.fencing_token() > last_read_token,
        "a writer's token is above every earlier grant's"
    );
    assert!(rw.try_read().await.unwrap_err().is_held_by_other());
    assert!(rw.try_write().await.unwrap_err().is_held_by_other());
    writer.extend(Duration::from_secs(20)).await.unwrap();
    writer.release().await.unwrap();
    // The second try_write's intent expires within the intent TTL (2 s at most).
    let opts = LockOptions::new().with_wait(Duration::from_secs(5));
    let reader = rw.read_with(opts).await.unwrap();
    reader.release().await.unwrap();

    let mut raw = node.conn().await;
    for suffix in ["", ":w"] {
        let left: bool = raw
            .exists(format!("{}{suffix}", readers_key(&name)))
            .await
            .unwrap();
        assert!(!left, "no key{suffix} left");
    }
    drop((locks, rw, raw));
    baseline.assert_settled(&node, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_a_writer_with_a_reader_or_another_writer_across_managers() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let name = unique_key("rw-mix");
    let readers_in = Arc::new(AtomicUsize::new(0));
    let writers_in = Arc::new(AtomicUsize::new(0));
    let most_readers = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for m in 0..2 {
        let locks = LockManager::connect(&node.url()).await.unwrap();
        let rw = locks.rw_lock(&name).unwrap();
        for t in 0..4 {
            let (rw, readers_in, writers_in, most_readers) = (
                rw.clone(),
                readers_in.clone(),
                writers_in.clone(),
                most_readers.clone(),
            );
            let writes = (m + t) % 2 == 0 && t < 2;
            tasks.push(tokio::spawn(async move {
                let opts = support::contended(Duration::from_secs(60));
                for _ in 0..12 {
                    if writes {
                        let guard = rw.write_with(opts).await.expect("write");
                        assert_eq!(writers_in.fetch_add(1, Ordering::SeqCst), 0, "two writers");
                        assert_eq!(
                            readers_in.load(Ordering::SeqCst),
                            0,
                            "a writer with readers"
                        );
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        writers_in.fetch_sub(1, Ordering::SeqCst);
                        guard.release().await.expect("release");
                    } else {
                        let guard = rw.read_with(opts).await.expect("read");
                        let now = readers_in.fetch_add(1, Ordering::SeqCst) + 1;
                        most_readers.fetch_max(now, Ordering::SeqCst);
                        assert_eq!(
                            writers_in.load(Ordering::SeqCst),
                            0,
                            "a reader with a writer"
                        );
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        readers_in.fetch_sub(1, Ordering::SeqCst);
                        guard.release().await.expect("release");
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        most_readers.load(Ordering::SeqCst) >= 2,
        "readers did share the lock"
    );
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_gets_in_under_a_constant_stream_of_readers() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let name = unique_key("rw-starve");
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let rw = locks.rw_lock(&name).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    let mut reader_managers = Vec::new();
    // Six readers in three other managers (other processes, as far as the writer's
    // manager knows), each holding 30 ms and coming back at once: the lock is never free
    // of readers unless the server holds new ones back.
    for i in 0..6 {
        if i % 2 == 0 {
            let m = LockManager::connect(&node.url()).await.unwrap();
            reader_managers.push(m.rw_lock(&name).unwrap());
        }
        let (rw, stop) = (reader_managers[i / 2].clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let opts = support::contended(Duration::from_secs(30));
            while !stop.load(Ordering::SeqCst) {
                let guard = rw.read_with(opts).await.expect("read");
                tokio::time::sleep(Duration::from_millis(30)).await;
                guard.release().await.expect("release");
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut waits = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let guard = rw
            .write_with(support::contended(Duration::from_secs(10)))
            .await
            .expect("the writer is not starved");
        waits.push(started.elapsed());
        guard.release().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        reader.await.unwrap();
    }
    let worst = waits.iter().max().unwrap();
    eprintln!("writer waits under 6 constant readers in 3 other managers (30 ms holds): {waits:?}");
    assert!(
        *worst < Duration::from_millis(1000),
        "writer waited {worst:?}"
    );
    drop((locks, rw, reader_managers));
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_read_write_locks_are_typed_errors() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    assert!(matches!(locks.rw_lock(""), Err(Error::InvalidArgument(_))));
    let name = unique_key("rw-type");
    let mut raw = node.conn().await;
    let _: () = raw.set(readers_key(&name), "not readers").await.unwrap();
    let err = locks.rw_lock(&name).unwrap().try_read().await.unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
}
