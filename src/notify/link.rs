//! One subscription link of a node: classic pub/sub on one server, or sharded pub/sub over
//! a Redis Cluster connection (`SSUBSCRIBE` on each channel's shard).

use std::pin::Pin;

use futures_core::Stream;
use redis::aio::{PubSubSink, PubSubStream};

/// Where a node's subscription connects.
pub(crate) enum Source {
    /// Servers that carry the same publications (one server, or the nodes of a cluster for
    /// classic pub/sub, or a primary and its replicas): the subscription goes through one
    /// of them, and moves to the next after a failure.
    Servers(Vec<redis::Client>),
    /// A Redis Cluster, listened to with `SSUBSCRIBE`: each channel on the shard that owns
    /// its slot, through one cluster connection that follows the slots.
    #[cfg(feature = "cluster")]
    Shards(Vec<redis::ConnectionInfo>),
}

/// The longest pause between two tries of a sharded link (see [`Source::retry_cap`]).
#[cfg(feature = "cluster")]
const SHARDED_RETRY_CAP: std::time::Duration = std::time::Duration::from_millis(250);

/// An open subscription link.
pub(super) enum Link {
    Plain(PubSubSink, PubSubStream),
    #[cfg(feature = "cluster")]
    Sharded(
        redis::cluster_async::ClusterConnection,
        tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    ),
}

/// What the link delivered.
pub(super) enum Event {
    /// A message on a channel.
    Message(Vec<u8>, Vec<u8>),
    /// The server ended the subscription of this channel by itself (a sharded channel whose
    /// slot moved to another node): messages may have been missed, and the channel must
    /// be subscribed again, where its slot now lives.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    Dropped(Vec<u8>),
    /// The link is gone (or one of a cluster's node links is): messages may have been
    /// missed.
    Closed,
    /// Nothing a waiter cares about (a confirmation, a reply to our own unsubscribe).
    Nothing,
}

impl Source {
    /// How many places the subscription can go through, tried in turn after failures.
    pub(super) fn len(&self) -> usize {
        match self {
            Source::Servers(clients) => clients.len().max(1),
            #[cfg(feature = "cluster")]
            Source::Shards(_) => 1,
        }
    }

    /// The longest pause between two tries to open the link or subscribe, if this source
    /// has one of its own (`None`: the notifier's own cap). A cluster's subscription fails
    /// while a failover or a slot move is under way (its channel's primary is gone, or not
    /// yet known): it is tried again soon, since the new owner answers as soon as the
    /// cluster knows it.
    pub(super) fn retry_cap(&self) -> Option<std::time::Duration> {
        match self {
            Source::Servers(_) => None,
            #[cfg(feature = "cluster")]
            Source::Shards(_) => Some(SHARDED_RETRY_CAP),
        }
    }

    /// Opens a link through place `at` (modulo [`len`](Self::len)).
    pub(super) async fn open(
        &self,
        at: usize,
        command_timeout: std::time::Duration,
    ) -> redis::RedisResult<Link> {
        #[cfg(not(feature = "cluster"))]
        let _ = command_timeout;
        match self {
            Source::Servers(clients) => {
                let Some(client) = clients.get(at % clients.len().max(1)) else {
                    return Err(crate::error::timed_out("no server to subscribe on"));
                };
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok(Link::Plain(sink, stream))
            }
            #[cfg(feature = "cluster")]
            Source::Shards(nodes) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .response_timeout(command_timeout)
                    .build()?;
                let conn = client.get_async_connection().await?;
                Ok(Link::Sharded(conn, rx))
            }
        }
    }
}

impl Link {
    /// Subscribes `channel`; `Ok` once the server confirmed it.
    pub(super) async fn subscribe(&mut self, channel: &[u8]) -> redis::RedisResult<()> {
        match self {
            Link::Plain(sink, _) => sink.subscribe(channel).await,
            #[cfg(feature = "cluster")]
            Link::Sharded(conn, _) => conn.ssubscribe(channel).await,
        }
    }

    /// Unsubscribes `channel`.
    pub(super) async fn unsubscribe(&mut self, channel: &[u8]) -> redis::RedisResult<()> {
        match self {
            Link::Plain(sink, _) => sink.unsubscribe(channel).await,
            #[cfg(feature = "cluster")]
            Link::Sharded(conn, _) => conn.sunsubscribe(channel).await,
        }
    }

    /// The next thing the link delivers.
    pub(super) async fn next(&mut self) -> Event {
        match self {
            Link::Plain(_, stream) => {
                match std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await {
                    Some(msg) => match msg.get_channel::<Vec<u8>>() {
                        Ok(channel) => Event::Message(channel, msg.get_payload_bytes().to_vec()),
                        Err(_) => Event::Nothing,
                    },
                    None => Event::Closed,
                }
            }
            #[cfg(feature = "cluster")]
            Link::Sharded(_, pushes) => match pushes.recv().await {
                Some(push) => sharded_event(push),
                None => Event::Closed,
            },
        }
    }
}

/// What a push of a sharded link means to the waiters.
#[cfg(feature = "cluster")]
fn sharded_event(push: redis::PushInfo) -> Event {
    let mut data = push.data.into_iter();
    let channel = match data.next() {
        Some(redis::Value::BulkString(channel)) => channel,
        _ => Vec::new(),
    };
    match push.kind {
        redis::PushKind::SMessage => match data.next() {
            Some(redis::Value::BulkString(payload)) => Event::Message(channel, payload),
            _ => Event::Nothing,
        },
        redis::PushKind::SUnsubscribe => Event::Dropped(channel),
        redis::PushKind::Disconnection => Event::Closed,
        _ => Event::Nothing,
    }
}

#[cfg(all(test, feature = "cluster"))]
mod tests {
    use super::{Event, sharded_event};
    use redis::{PushInfo, PushKind, Value};

    fn push(kind: PushKind, data: &[&[u8]]) -> PushInfo {
        PushInfo {
            kind,
            data: data.iter().map(|d| Value::BulkString(d.to_vec())).collect(),
        }
    }

    #[test]
    fn sharded_pushes_are_read_as_messages_drops_and_losses() {
        assert!(matches!(
            sharded_event(push(PushKind::SMessage, &[b"ch", b"id"])),
            Event::Message(c, p) if c == b"ch" && p == b"id"
        ));
        assert!(matches!(
            sharded_event(push(PushKind::SMessage, &[b"ch", b""])),
            Event::Message(c, p) if c == b"ch" && p.is_empty()
        ));
        assert!(matches!(
            sharded_event(push(PushKind::SUnsubscribe, &[b"ch"])),
            Event::Dropped(c) if c == b"ch"
        ));
        assert!(matches!(
            sharded_event(push(PushKind::Disconnection, &[])),
            Event::Closed
        ));
        assert!(matches!(
            sharded_event(push(PushKind::SSubscribe, &[b"ch"])),
            Event::Nothing
        ));
        assert!(matches!(
            sharded_event(push(PushKind::Message, &[b"ch", b""])),
            Event::Nothing
        ));
    }
}
