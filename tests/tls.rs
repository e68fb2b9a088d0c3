//! TLS (`rediss://`, the `tls` feature) against a `redis-server` serving TLS only, with
//! certificates made for this run.

mod support;

use std::time::{Duration, Instant};

use distlock::{Error, LockManager};
use support::tls::TlsFiles;
use support::{NodeOptions, RedisNode, unique_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_work_over_tls_with_a_trusted_certificate() {
    let files = TlsFiles::generate();
    let node = RedisNode::start_opts(NodeOptions::default().tls(files.clone())).await;
    assert!(node.url().starts_with("rediss://"));

    let conn = redis::aio::ConnectionManager::new(files.client(&node.url()))
        .await
        .expect("a TLS connection trusting the test CA");
    let locks = LockManager::new(conn).unwrap();
    let name = unique_key("tls");
    let guard = locks
        .try_lock_with(&name, distlock::LockOptions::new().with_fencing(true))
        .await
        .unwrap();
    assert!(guard.fencing_token().is_some());
    assert!(locks.try_lock(&name).await.unwrap_err().is_held_by_other());
    guard.extend(Duration::from_secs(10)).await.unwrap();
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_or_a_plain_client_is_refused_in_bounded_time() {
    let node = RedisNode::start_opts(NodeOptions::default().tls(TlsFiles::generate())).await;
    let limit = Duration::from_secs(2);
    let plain = format!("redis://127.0.0.1:{}", node.port());
    // The system's roots do not include the test CA; a plain client speaks no TLS at all.
    for url in [node.url(), plain] {
        let started = Instant::now();
        let result = LockManager::builder()
            .with_connect_timeout(limit)
            .connect(&url)
            .await;
        assert!(matches!(result, Err(Error::Redis(_))), "{url}: {result:?}");
        assert!(
            started.elapsed() < limit + Duration::from_secs(1),
            "{url}: {:?}",
            started.elapsed()
        );
    }
}
