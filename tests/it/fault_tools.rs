//! The fault tools themselves do what the fault tests rely on: the proxy's modes and the
//! node's stop, kill, pause and restart, on whichever backend runs.

use crate::support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use support::proxy::{Fault, FaultProxy};
use support::{Data, NodeOptions, RedisNode, unique_key};

async fn connect(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("connected within 5 s")
    .unwrap()
}

/// A PING that gives up after `limit`: `Some(result)` if anything came back.
async fn ping(
    conn: &mut MultiplexedConnection,
    limit: Duration,
) -> Option<redis::RedisResult<String>> {
    tokio::time::timeout(limit, redis::cmd("PING").query_async::<String>(conn))
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_answers_nothing_and_delivers_held_bytes_once_lifted() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let mut conn = connect(&proxy.url()).await;
    assert_eq!(
        ping(&mut conn, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap(),
        "PONG"
    );

    let key = unique_key("held");
    proxy.set(Fault::Blackhole);
    let write = {
        let mut conn = conn.clone();
        let key = key.clone();
        tokio::spawn(async move { conn.set::<_, _, ()>(key, "late").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut direct = node.conn().await;
    let seen: Option<String> = direct.get(&key).await.unwrap();
    assert_eq!(
        seen, None,
        "nothing reached the server through the blackhole"
    );
    assert!(!write.is_finished(), "nothing was answered yet");

    // A new connection is accepted but never answered.
    let client = redis::Client::open(proxy.url()).unwrap();
    let fresh = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await;
    assert!(!matches!(fresh, Ok(Ok(_))), "the handshake got no answer");

    // The client gives up (redis-rs' own 500 ms response timeout), but the request it sent
    // is still on its way, like a packet behind a healed partition.
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
    proxy.set(Fault::Pass);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen: Option<String> = direct.get(&key).await.unwrap();
        if seen.as_deref() == Some("late") {
            break;
        }
        assert!(Instant::now() < deadline, "the held request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_replies_lets_requests_act_and_hides_the_answer() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let mut conn = connect(&proxy.url()).await;
    let key = unique_key("acted");

    proxy.set(Fault::HoldReplies);
    let answered = tokio::time::timeout(
        Duration::from_millis(300),
        conn.set::<_, _, ()>(&key, "done"),
    )
    .await;
    assert!(answered.is_err(), "the reply was held");
    let mut direct = node.conn().await;
    let seen: Option<String> = direct.get(&key).await.unwrap();
    assert_eq!(
        seen.as_deref(),
        Some("done"),
        "the server acted on the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_every_round_trip() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let mut conn = connect(&proxy.url()).await;
    proxy.set(Fault::Latency(Duration::from_millis(100)));
    let started = Instant::now();
    assert_eq!(
        ping(&mut conn, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap(),
        "PONG"
    );
    // 100 ms each way: a round trip can be slower on a loaded machine, never faster.
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

/// Latency is a pipe, not a queue: a request sent while an earlier one is in flight is not
/// held behind that one's delay, as on a link between hosts. Two PINGs 10 ms apart over
/// 400 ms each way: the second is answered about 800 ms after it was sent; a proxy that
/// delays one chunk at a time takes about 1,200 ms (its request waits for the first one's
/// 400 ms, and so does its reply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_chunks_in_flight_together_not_one_after_another() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    // The client's own reply timeout is longer than any wait here.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let conn = redis::Client::open(proxy.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    proxy.set(Fault::Latency(Duration::from_millis(400)));
    let mut first_conn = conn.clone();
    let first = tokio::spawn(async move { ping(&mut first_conn, Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut second_conn = conn.clone();
    let sent = Instant::now();
    let second = ping(&mut second_conn, Duration::from_secs(10)).await;
    let elapsed = sent.elapsed();
    assert_eq!(second.expect("answered").unwrap(), "PONG");
    assert_eq!(first.await.unwrap().expect("answered").unwrap(), "PONG");
    assert!(
        elapsed >= Duration::from_millis(800),
        "the second PING still waited 400 ms each way: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1_000),
        "the second PING waited for the first one's delay: {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_breaks_open_connections_and_cut_refuses_new_ones_until_restored() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let mut conn = connect(&proxy.url()).await;
    assert!(
        ping(&mut conn, Duration::from_secs(5))
            .await
            .unwrap()
            .is_ok()
    );

    proxy.reset_connections();
    let after_reset = ping(&mut conn, Duration::from_secs(5)).await;
    assert!(
        matches!(after_reset, Some(Err(_))),
        "the reset connection fails at once: {after_reset:?}"
    );
    assert!(proxy.stats().resets >= 1);
    // A one-off reset leaves the link up for new connections.
    let mut again = connect(&proxy.url()).await;
    assert!(
        ping(&mut again, Duration::from_secs(5))
            .await
            .unwrap()
            .is_ok()
    );

    proxy.set(Fault::Reset);
    assert!(matches!(
        ping(&mut again, Duration::from_secs(5)).await,
        Some(Err(_))
    ));
    let client = redis::Client::open(proxy.url()).unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("a cut link fails fast, it does not hang");
    assert!(refused.is_err(), "no connection through a cut link");

    proxy.set(Fault::Pass);
    let mut restored = connect(&proxy.url()).await;
    assert!(
        ping(&mut restored, Duration::from_secs(5))
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_the_server_and_resume_answers_what_queued() {
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    node.pause().await;
    let pending = {
        let mut conn = conn.clone();
        tokio::spawn(async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a paused server answers nothing");
    node.resume().await;
    // Generous: on a loaded machine a resumed container can take seconds to be scheduled.
    let answer = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("answered after resume")
        .unwrap();
    assert_eq!(answer.unwrap(), "PONG");
    assert!(
        ping(&mut conn, Duration::from_secs(5))
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_node_keeps_acknowledged_writes_across_kill_unless_wiped() {
    let node = RedisNode::start_opts(NodeOptions::default().persistent()).await;
    let key = unique_key("durable");
    let mut conn = node.conn().await;
    let _: () = conn.set(&key, "kept").await.unwrap();

    node.kill().await;
    let client = redis::Client::open(node.url()).unwrap();
    let down = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("a killed server refuses at once");
    assert!(down.is_err(), "nothing listens after kill");

    node.start_again_with(Data::Keep).await;
    let mut conn = node.conn().await;
    let seen: Option<String> = conn.get(&key).await.unwrap();
    assert_eq!(
        seen.as_deref(),
        Some("kept"),
        "acknowledged write survived SIGKILL"
    );

    node.stop().await;
    node.start_again().await;
    let mut conn = node.conn().await;
    let seen: Option<String> = conn.get(&key).await.unwrap();
    assert_eq!(seen.as_deref(), Some("kept"), "and a clean stop");

    node.restart(Data::Wipe).await;
    let mut conn = node.conn().await;
    let seen: Option<String> = conn.get(&key).await.unwrap();
    assert_eq!(seen, None, "a wiped restart comes back empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_node_comes_back_empty_after_a_restart() {
    let node = RedisNode::start().await;
    let key = unique_key("volatile");
    let mut conn = node.conn().await;
    let _: () = conn.set(&key, "lost").await.unwrap();
    node.restart(Data::Keep).await;
    let mut conn = node.conn().await;
    let seen: Option<String> = conn.get(&key).await.unwrap();
    assert_eq!(seen, None, "without persistence nothing survives");
}
