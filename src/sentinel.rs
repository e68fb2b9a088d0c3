//! A primary found through Redis Sentinel, followed across failovers (feature `sentinel`).
//!
//! [`SentinelConnection`] is a connection for the single-primary store: it asks the
//! Sentinels for the current primary of a service, connects to it (checking it calls itself
//! primary), and sends every command there. When a command fails in a way a failover
//! explains (the connection broke or timed out, or the server answers `READONLY` because it
//! was demoted to a replica), the next command asks the Sentinels again. A command the
//! server refused as a replica did not run, so it is sent once more to the primary the
//! Sentinels name now; a command whose link broke may have run, so it fails with its
//! (transient) error, which a waiting `lock` retries within its budget.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::Notify;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::error::{Error, Result};

/// A connection to whatever server the Sentinels name as the service's primary now.
#[derive(Clone)]
pub(crate) struct SentinelConnection {
    shared: Arc<Shared>,
}

struct Shared {
    /// Asked for the primary's address; one discovery at a time.
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the primary found last, with the discovery it came from.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// A client for the primary found at connect (for the subscription connection).
    first: Mutex<Option<redis::Client>>,
    /// A client for the primary found last, with the discovery it came from (for
    /// connections of their own: replica-acknowledged calls).
    latest: Mutex<Option<(u64, redis::Client)>>,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    db: i64,
    /// Ends the task that watches the Sentinels' announcements.
    closed: Arc<Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.closed.notify_one();
    }
}

impl SentinelConnection {
    /// Builds the connection and finds the primary once, within `connect_timeout`.
    pub(crate) async fn connect(
        sentinels: Vec<String>,
        service: &str,
        master: Option<redis::RedisConnectionInfo>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self> {
        if sentinels.is_empty() {
            return Err(Error::invalid("url", "no Sentinel URL given"));
        }
        if service.is_empty() {
            return Err(Error::invalid(
                "service",
                "the Sentinel service name is empty",
            ));
        }
        let db = master.as_ref().map_or(0, |m| m.db());
        let node_info =
            master.map(|m| SentinelNodeConnectionInfo::default().set_redis_connection_info(m));
        // `String`: what `build` takes with and without redis-rs' TLS features.
        let service_name: String = service.to_owned();
        let client = SentinelClient::build(
            sentinels.clone(),
            service_name,
            node_info,
            SentinelServerType::Master,
        )
        .map_err(|e| Error::invalid("url", e.to_string()))?;
        let conn = SentinelConnection {
            shared: Arc::new(Shared {
                sentinels: tokio::sync::Mutex::new(client),
                current: Mutex::new(None),
                first: Mutex::new(None),
                latest: Mutex::new(None),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout)),
                connect_timeout,
                db,
                closed: Arc::new(Notify::new()),
            }),
        };
        let watched = sentinels
            .iter()
            .filter_map(|url| redis::Client::open(url.as_str()).ok())
            .collect();
        tokio::spawn(watch_switches(
            Arc::downgrade(&conn.shared),
            Arc::clone(&conn.shared.closed),
            watched,
            service.to_owned(),
            connect_timeout,
        ));
        conn.primary().await.map_err(|e| {
            crate::connect::connect_failed(
                &format!("redis-sentinel://{}/{service}", sentinels.join(",")),
                e,
            )
        })?;
        Ok(conn)
    }

    /// The connection to the current primary, asking the Sentinels when there is none.
    async fn primary(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(found) = self.shared.current().clone() {
            return Ok(found);
        }
        let discover = async {
            let mut sentinels = self.shared.sentinels.lock().await;
            // Another caller may have found it while this one waited for the lock.
            if let Some(found) = self.shared.current().clone() {
                return Ok(found);
            }
            let client = sentinels.async_get_client().await?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&self.shared.config)
                .await?;
            let mut current = self.shared.current();
            let generation = current.as_ref().map_or(0, |(g, _)| g + 1);
            tracing::debug!(
                primary = %client.get_connection_info().addr(),
                "Sentinel named the primary"
            );
            *current = Some((generation, conn.clone()));
            *self
                .shared
                .latest
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some((generation, client.clone()));
            let mut first = self
                .shared
                .first
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if first.is_none() {
                *first = Some(client);
            }
            Ok((generation, conn))
        };
        match tokio::time::timeout(self.shared.connect_timeout, discover).await {
            Ok(found) => found,
            Err(_) => Err(crate::error::timed_out(format!(
                "no primary found through Sentinel within {:?}",
                self.shared.connect_timeout
            ))),
        }
    }

    /// A new connection of its own to the primary the Sentinels name now, without a
    /// response timeout (its user bounds each call), and the discovery it came from.
    pub(crate) async fn open_dedicated(&self) -> redis::RedisResult<(u64, MultiplexedConnection)> {
        let (generation, _) = self.primary().await?;
        let client = self
            .shared
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some((found, client)) = client.filter(|(g, _)| *g == generation) else {
            return Err(crate::error::timed_out(
                "the primary changed while a connection to it was opened",
            ));
        };
        let config = self.shared.config.clone().set_response_timeout(None);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok((found, conn))
    }

    /// The discovery the current primary comes from; `None` while the Sentinels must be
    /// asked again.
    pub(crate) fn primary_generation(&self) -> Option<u64> {
        self.shared.current().as_ref().map(|(g, _)| *g)
    }

    /// A client for the primary the Sentinels named at connect.
    pub(crate) fn primary_client(&self) -> Option<redis::Client> {
        self.shared
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Clients for the replicas the Sentinels list for `service` now (`SENTINEL
    /// REPLICAS`, asked of each Sentinel in turn until one answers, all within `budget`),
    /// with the credentials, database and TLS settings of the primary found at connect;
    /// replicas a Sentinel marks down are left out. Empty when no Sentinel answers in
    /// time. A replica receives every publish of its primary, and one of them is the
    /// primary after a failover: release notifications can listen through them when the
    /// primary is gone.
    pub(crate) async fn replica_clients(
        &self,
        sentinels: &[String],
        service: &str,
        budget: Duration,
    ) -> Vec<redis::Client> {
        tokio::time::timeout(budget, self.list_replicas(sentinels, service))
            .await
            .unwrap_or_default()
    }

    async fn list_replicas(&self, sentinels: &[String], service: &str) -> Vec<redis::Client> {
        let Some(primary) = self.primary_client() else {
            return Vec::new();
        };
        for url in sentinels {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                continue;
            };
            let asked = async {
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&self.shared.config)
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(service)
                    .query_async::<Value>(&mut conn)
                    .await
            };
            let Ok(Ok(listed)) = tokio::time::timeout(self.shared.connect_timeout, asked).await
            else {
                continue;
            };
            let info = primary.get_connection_info();
            return live_replicas(&listed)
                .into_iter()
                .filter_map(|(host, port)| {
                    let addr = match info.addr() {
                        redis::ConnectionAddr::Tcp(..) => redis::ConnectionAddr::Tcp(host, port),
                        redis::ConnectionAddr::TcpTls {
                            insecure,
                            tls_params,
                            ..
                        } => redis::ConnectionAddr::TcpTls {
                            host,
                            port,
                            insecure: *insecure,
                            tls_params: tls_params.clone(),
                        },
                        _ => return None,
                    };
                    redis::Client::open(info.clone().set_addr(addr)).ok()
                })
                .collect();
        }
        Vec::new()
    }

    /// After a failure a failover explains, the next command asks the Sentinels again
    /// (unless a newer discovery replaced this connection already).
    fn check(&self, generation: u64, err: &redis::RedisError) {
        if failover_explains(err) {
            let mut current = self.shared.current();
            if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                tracing::debug!(error = %err, "primary unusable; asking Sentinel again");
                *current = None;
            }
        }
    }
}

impl Shared {
    fn current(&self) -> std::sync::MutexGuard<'_, Option<(u64, MultiplexedConnection)>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Listens to the Sentinels' `+switch-master` announcements (one Sentinel at a time, the
/// next one when its link fails): when one names a new primary for `service`, the
/// connection to the old one is dropped, so the next command asks the Sentinels again.
/// Without this, a demoted primary that still calls itself primary would accept commands
/// until the Sentinels reconfigure it (up to their 10 s `INFO` period), and lose them.
/// Ends when the connection's last clone is dropped.
async fn watch_switches(
    shared: Weak<Shared>,
    closed: Arc<Notify>,
    sentinels: Vec<redis::Client>,
    service: String,
    connect_timeout: Duration,
) {
    let watch = async {
        loop {
            for client in &sentinels {
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe("+switch-master").await?;
                    redis::RedisResult::Ok(pubsub)
                };
                let Ok(Ok(pubsub)) = tokio::time::timeout(connect_timeout, subscribed).await else {
                    continue;
                };
                let mut messages = pubsub.into_on_message();
                while let Some(msg) =
                    std::future::poll_fn(|cx| Pin::new(&mut messages).poll_next(cx)).await
                {
                    // "<service> <old ip> <old port> <new ip> <new port>"
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if payload.split(' ').next() != Some(service.as_str()) {
                        continue;
                    }
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    tracing::info!(switch = %payload, "Sentinel switched the primary");
                    *shared.current() = None;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        () = closed.notified() => {}
        () = watch => {}
    }
}

/// The `(ip, port)` of each replica in a `SENTINEL REPLICAS` reply (an array of field
/// lists, or of maps under RESP3) whose flags say neither down nor disconnected.
fn live_replicas(listed: &Value) -> Vec<(String, u16)> {
    let Value::Array(replicas) = listed else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    replicas
        .iter()
        .filter_map(|replica| {
            let fields: Vec<(String, String)> = match replica {
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
                    .collect(),
                Value::Map(pairs) => pairs
                    .iter()
                    .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                    .collect(),
                _ => return None,
            };
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            let flags = field("flags")?;
            if flags
                .split(',')
                .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
            {
                return None;
            }
            Some((field("ip")?.clone(), field("port")?.parse().ok()?))
        })
        .collect()
}

/// The service name and the primary's credentials from `"mymaster"` or
/// `"redis://user:password@mymaster/db"`.
pub(crate) fn service_and_auth(
    primary: &str,
) -> Result<(String, Option<redis::RedisConnectionInfo>)> {
    if !primary.contains("://") {
        return Ok((primary.to_owned(), None));
    }
    let info = redis::IntoConnectionInfo::into_connection_info(primary).map_err(|e| {
        Error::invalid("url", format!("{}: {e}", crate::connect::redacted(primary)))
    })?;
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, _) => {
            Ok((host.clone(), Some(info.redis_settings().clone())))
        }
        _ => Err(Error::invalid(
            "url",
            format!(
                "{}: the host must be the Sentinel service name",
                crate::connect::redacted(primary)
            ),
        )),
    }
}

/// A server that refused a command because it is not (or no longer has) a primary
/// (`READONLY`, `MASTERDOWN`): the command did not run, so it may be sent elsewhere.
fn refused_as_replica(err: &redis::RedisError) -> bool {
    matches!(
        err.kind(),
        redis::ErrorKind::Server(
            redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
        )
    )
}

/// Failures after which the primary may be another server: the link broke or hung, or the
/// server is a replica now (`READONLY`) or lost its primary (`MASTERDOWN`).
fn failover_explains(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || refused_as_replica(err)
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.primary().await?;
            let result = conn.req_packed_command(cmd).await;
            match &result {
                Err(e) if refused_as_replica(e) => {
                    self.check(generation, e);
                    // Nothing ran: sent once more to the primary the Sentinels name now,
                    // if that is another server.
                    let (now, mut conn) = self.primary().await?;
                    if now == generation {
                        return result;
                    }
                    conn.req_packed_command(cmd).await
                }
                Err(e) => {
                    self.check(generation, e);
                    result
                }
                Ok(_) => result,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.primary().await?;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &result {
                // Not sent again: a pipeline may have run in part.
                self.check(generation, e);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_explains_broken_links_and_demoted_primaries_not_other_answers() {
        let io: redis::RedisError =
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        assert!(failover_explains(&io));
        let read_only = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
        ));
        assert!(failover_explains(&read_only));
        let wrong_type = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!failover_explains(&wrong_type));
    }

    #[test]
    fn replicas_are_read_from_field_lists_or_maps_and_down_ones_left_out() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let replica = |ip: &str, port: &str, flags: &str| {
            Value::Array(
                ["name", "x", "ip", ip, "port", port, "flags", flags]
                    .into_iter()
                    .map(bulk)
                    .collect(),
            )
        };
        let listed = Value::Array(vec![
            replica("10.0.0.2", "6380", "slave"),
            replica("10.0.0.3", "6381", "s_down,slave,disconnected"),
            Value::Map(vec![
                (bulk("ip"), bulk("10.0.0.4")),
                (bulk("port"), bulk("6382")),
                (bulk("flags"), bulk("slave")),
            ]),
            replica("10.0.0.5", "not-a-port", "slave"),
        ]);
        assert_eq!(
            live_replicas(&listed),
            vec![("10.0.0.2".to_owned(), 6380), ("10.0.0.4".to_owned(), 6382)]
        );
        assert!(live_replicas(&Value::Nil).is_empty());
    }

    #[test]
    fn the_primary_is_a_service_name_or_a_url_with_credentials() {
        let (service, auth) = service_and_auth("mymaster").unwrap();
        assert_eq!(service, "mymaster");
        assert!(auth.is_none());
        let (service, auth) = service_and_auth("redis://app:secret@mymaster/2").unwrap();
        assert_eq!(service, "mymaster");
        let auth = auth.unwrap();
        assert_eq!(auth.username(), Some("app"));
        assert_eq!(auth.password(), Some("secret"));
        assert_eq!(auth.db(), 2);
        let err = service_and_auth("redis://app:secret@/2")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
