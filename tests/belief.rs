//! "Belief never exceeds truth": what a guard believes about its lease, checked against the
//! real server, with replies delayed, reordered and lost by a hostile connection
//! (tests/support/hostile.rs). Regression tests for issue 9, and the property test.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::hostile::{Action, HostileConnection};
use support::{RedisNode, unique_key};

// ---------------------------------------------------------------------------------------
// The hostile connection itself: proven against server-side state.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_connection_executes_a_delayed_command_after_a_later_one() {
    let node = RedisNode::start().await;
    let hostile = HostileConnection::connect(&node.client(), 2).await;
    let key = unique_key("hostile:order");
    hostile.set_plan(|cmd| {
        if cmd.has_arg(b"first") {
            Action::pass().via(1).delay_send(Duration::from_millis(300))
        } else {
            Action::pass().via(0)
        }
    });
    let mut slow = hostile.clone();
    let slow_key = key.clone();
    let first = tokio::spawn(async move {
        redis::cmd("RPUSH")
            .arg(&slow_key)
            .arg("first")
            .query_async::<i64>(&mut slow)
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fast = hostile.clone();
    let _: i64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg("second")
        .query_async(&mut fast)
        .await
        .expect("second push");
    first.await.expect("task").expect("first push");
    let mut check = node.conn().await;
    let order: Vec<String> = check.lrange(&key, 0, -1).await.expect("LRANGE");
    assert_eq!(
        order,
        ["second", "first"],
        "the command sent first must run last"
    );
}

#[tokio::test]
async fn hostile_connection_runs_a_command_whose_reply_it_loses() {
    let node = RedisNode::start().await;
    let mut hostile = HostileConnection::connect(&node.client(), 2).await;
    let key = unique_key("hostile:lost");
    hostile.set_plan(|cmd| {
        if cmd.name == "INCR" {
            Action::pass().lose_reply(Duration::from_millis(50))
        } else {
            Action::pass()
        }
    });
    let err = redis::cmd("INCR")
        .arg(&key)
        .query_async::<i64>(&mut hostile)
        .await
        .expect_err("the reply is lost");
    assert!(err.is_timeout(), "a lost reply reads as a timeout: {err:?}");
    let mut check = node.conn().await;
    support::eventually(Duration::from_secs(5), "the INCR ran anyway", || {
        let mut check = check.clone();
        let key = key.clone();
        async move { check.get::<_, Option<i64>>(&key).await.ok().flatten() == Some(1) }
    })
    .await;
    let _: () = check.del(&key).await.expect("DEL");
}

#[tokio::test]
async fn hostile_connection_delays_the_reply_of_an_executed_command() {
    let node = RedisNode::start().await;
    let hostile = HostileConnection::connect(&node.client(), 3).await;
    let key = unique_key("hostile:reply");
    hostile.set_plan(|cmd| {
        if cmd.name == "SET" {
            Action::pass()
                .via(2)
                .delay_reply(Duration::from_millis(600))
        } else {
            Action::pass()
        }
    });
    let started = std::time::Instant::now();
    let set_key = key.clone();
    let mut conn = hostile.clone();
    let set = tokio::spawn(async move {
        redis::cmd("SET")
            .arg(&set_key)
            .arg("v")
            .query_async::<()>(&mut conn)
            .await
    });
    let mut check = node.conn().await;
    support::eventually(
        Duration::from_secs(5),
        "the SET ran before its reply came",
        || {
            let mut check = check.clone();
            let key = key.clone();
            let set = &set;
            async move { check.exists::<_, bool>(&key).await.unwrap_or(false) && !set.is_finished() }
        },
    )
    .await;
    set.await.expect("task").expect("SET");
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(hostile.commands_seen() >= 1);
    let _: () = check.del(&key).await.expect("DEL");
}

#[tokio::test]
async fn baseline_notices_a_leftover_key_connection_and_task() {
    let node = RedisNode::start().await;
    let baseline = support::Baseline::take(&node).await;
    baseline.assert_settled(&node, Duration::from_secs(2)).await;
    // A leftover lease key, a connection with its driver task, a subscribed channel.
    let mut extra = node.conn().await;
    let key = support::lease_key(&unique_key("baseline"));
    let _: () = extra.set(&key, "x").await.expect("SET");
    let mut pubsub = node.client().get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe("distlock-test-channel")
        .await
        .expect("SUBSCRIBE");
    let left = baseline
        .left_behind(&node, Duration::from_millis(200))
        .await
        .expect("leftovers must not pass as settled");
    for what in [
        "lease keys",
        "subscribed channels",
        "client connections",
        "alive runtime tasks",
    ] {
        assert!(left.contains(what), "{what} not named in: {left}");
    }
    let _: () = extra.del(&key).await.expect("DEL");
    drop(extra);
    drop(pubsub);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}
