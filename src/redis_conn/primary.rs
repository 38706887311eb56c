//! One supervised connection to the primary: the configured server, or the
//! one the Sentinels name. A background task connects (through the `redis`
//! crate's Sentinel client in Sentinel mode, which also checks that the node
//! it names says it is a primary), probes the connection every second, and
//! replaces it when it stops answering, when the node is no longer a primary,
//! or when the Sentinels name another one (a failover behind a partition).
//! Callers that see a call fail ask for a probe at once ([`Primary::suspect`]),
//! so a dead connection is noticed within one probe timeout, not when the
//! kernel gives up on it; while none answers, connecting is retried every
//! 100 ms, backing off to every 500 ms.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::future::join_all;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, RedisConnectionInfo, Role, TlsMode,
    aio::MultiplexedConnection,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};
use secrecy::ExposeSecret;
use tokio::{
    sync::{Notify, watch},
    task::AbortHandle,
};

use super::{NodeRole, NodeStatus, Settings, Target, TargetError, addr_of, open};

/// Time between two probes of a healthy connection.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// At most this many probes a second, however many calls fail.
const MIN_PROBE_GAP: Duration = Duration::from_millis(100);
/// First and longest wait between connection attempts while none answers.
const MIN_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_millis(500);

/// How the primary is found.
pub(super) enum Locator {
    /// One fixed server.
    Fixed(Client),
    /// Asked of the sentinels (the crate's client), which are also probed
    /// for status on connections of their own.
    Sentinel {
        client: Box<SentinelClient>,
        master_name: String,
        sentinels: Vec<Watched>,
    },
}

/// A node probed on a connection of its own, kept between probes.
pub(super) struct Watched {
    client: Client,
    conn: Option<MultiplexedConnection>,
}

impl Locator {
    /// Parses the target's URLs (connecting to nothing).
    pub(super) fn new(target: &Target) -> Result<Self, TargetError> {
        match target {
            Target::Server(url) => open(url).map(Self::Fixed).ok_or(TargetError::Url),
            Target::Sentinel {
                sentinels,
                master_name,
                master_username,
                master_password,
            } => {
                let clients = sentinels
                    .iter()
                    .enumerate()
                    .map(|(i, url)| open(url).ok_or(TargetError::Sentinel(i)))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut auth = RedisConnectionInfo::default();
                if let Some(user) = master_username {
                    auth = auth.set_username(user);
                }
                if let Some(password) = master_password {
                    auth = auth.set_password(password.expose_secret());
                }
                let mut node =
                    SentinelNodeConnectionInfo::default().set_redis_connection_info(auth);
                // TLS to the sentinels means TLS to the primary too.
                if clients.iter().any(|c| {
                    matches!(
                        c.get_connection_info().addr(),
                        ConnectionAddr::TcpTls { .. }
                    )
                }) {
                    node = node.set_tls_mode(TlsMode::Secure);
                }
                let infos = clients
                    .iter()
                    .map(|c| c.get_connection_info().clone())
                    .collect();
                let client = SentinelClient::build(
                    infos,
                    master_name,
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|_| TargetError::Sentinel(0))?;
                Ok(Self::Sentinel {
                    client: Box::new(client),
                    master_name: master_name.clone(),
                    sentinels: clients
                        .into_iter()
                        .map(|client| Watched { client, conn: None })
                        .collect(),
                })
            }
            Target::Cluster(_) => Err(TargetError::Cluster),
        }
    }

    /// A connection to the primary.
    async fn connect(&mut self, config: &AsyncConnectionConfig) -> redis::RedisResult<Current> {
        let client = match self {
            Self::Fixed(client) => client.clone(),
            Self::Sentinel { client, .. } => client.async_get_client().await?,
        };
        let conn = client
            .get_multiplexed_async_connection_with_config(config)
            .await?;
        Ok(Current { conn, client })
    }

    /// Whether `current` still answers as the primary (and, with sentinels,
    /// is the one they name), and every node as seen now.
    async fn probe(
        &mut self,
        current: Option<&Current>,
        limit: Duration,
        config: &AsyncConnectionConfig,
    ) -> (bool, Vec<NodeStatus>) {
        match self {
            Self::Fixed(client) => {
                let answers = match current {
                    Some(c) => within(
                        limit,
                        redis::cmd("PING").query_async::<String>(&mut c.conn.clone()),
                    )
                    .await
                    .is_some(),
                    None => false,
                };
                let node = NodeStatus {
                    addr: addr_of(client),
                    role: NodeRole::Primary,
                    answers,
                };
                (answers, vec![node])
            }
            Self::Sentinel {
                master_name,
                sentinels,
                ..
            } => {
                let mut ask = redis::cmd("SENTINEL");
                ask.arg("GET-MASTER-ADDR-BY-NAME").arg(&*master_name);
                let named: Vec<Option<(String, u16)>> = join_all(
                    sentinels
                        .iter_mut()
                        .map(|s| s.query::<Option<(String, u16)>>(&ask, limit, config)),
                )
                .await
                .into_iter()
                .map(Option::flatten)
                .collect();
                let primary = named.iter().flatten().next().cloned();
                let is_primary = match current {
                    Some(c) => matches!(
                        within(
                            limit,
                            redis::cmd("ROLE").query_async::<Role>(&mut c.conn.clone())
                        )
                        .await,
                        Some(Role::Primary { .. })
                    ),
                    None => false,
                };
                let current_addr = current.map(|c| addr_of(&c.client));
                // A sentinel naming another node: a failover we must follow.
                let renamed = named.iter().flatten().any(|(host, port)| {
                    current_addr
                        .as_deref()
                        .is_some_and(|addr| addr != format!("{host}:{port}"))
                });
                let healthy = is_primary && !renamed;
                let mut nodes = Vec::with_capacity(sentinels.len() + 1);
                if let Some(addr) = current_addr
                    .filter(|_| healthy)
                    .or_else(|| primary.map(|(host, port)| format!("{host}:{port}")))
                {
                    nodes.push(NodeStatus {
                        addr,
                        role: NodeRole::Primary,
                        answers: healthy,
                    });
                }
                nodes.extend(sentinels.iter().zip(&named).map(|(s, named)| NodeStatus {
                    addr: addr_of(&s.client),
                    role: NodeRole::Sentinel,
                    answers: named.is_some() || s.conn.is_some(),
                }));
                (healthy, nodes)
            }
        }
    }
}

impl Watched {
    /// Sends `cmd` on this node's own connection (made when missing);
    /// `None` (and the connection dropped) if it does not answer.
    async fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
        limit: Duration,
        config: &AsyncConnectionConfig,
    ) -> Option<T> {
        if self.conn.is_none() {
            self.conn = within(
                limit,
                self.client
                    .get_multiplexed_async_connection_with_config(config),
            )
            .await;
        }
        let reply = within(limit, cmd.query_async(self.conn.as_mut()?)).await;
        if reply.is_none() {
            self.conn = None;
        }
        reply
    }
}

/// `fut`'s answer if it came within `limit`.
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Option<T> {
    tokio::time::timeout(limit, fut).await.ok()?.ok()
}

/// The connection in use and the client it came from (for pub/sub).
#[derive(Clone)]
struct Current {
    conn: MultiplexedConnection,
    client: Client,
}

/// Where the supervisor stands.
#[derive(Clone)]
enum State {
    /// An attempt to connect is under way (or about to be): calls wait for it.
    Connecting,
    Connected(Box<Current>),
    /// The last attempt failed: calls fail at once until the next one.
    Down,
}

/// The supervised connection; its task stops when this is dropped.
pub(super) struct Primary {
    state: watch::Receiver<State>,
    nodes: Arc<RwLock<Vec<NodeStatus>>>,
    suspect: Arc<Notify>,
    task: AbortHandle,
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Primary {
    /// Starts the supervising task (inside the Tokio runtime).
    pub(super) fn start(locator: Locator, settings: &Settings) -> Self {
        let (state_tx, state) = watch::channel(State::Connecting);
        let nodes = Arc::new(RwLock::new(Vec::new()));
        let suspect = Arc::new(Notify::new());
        let limit = settings.probe_timeout();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(limit))
            // Our own timeouts cut each call short; the connection's must not
            // cut a money operation shorter than its own.
            .set_response_timeout(Some(settings.op_timeout.max(settings.ledger_timeout)));
        let supervisor = Supervisor {
            locator,
            state: state_tx,
            nodes: Arc::clone(&nodes),
            suspect: Arc::clone(&suspect),
            limit,
            config,
        };
        let task = tokio::spawn(supervisor.run());
        Self {
            state,
            nodes,
            suspect,
            task: task.abort_handle(),
        }
    }

    /// The connection to send on: the current one, or the one being made
    /// if it comes within `limit`; `None` while no primary answers.
    pub(super) async fn connection(&self, limit: Duration) -> Option<MultiplexedConnection> {
        let mut state = self.state.clone();
        let wait = state.wait_for(|s| !matches!(s, State::Connecting));
        match tokio::time::timeout(limit, wait).await {
            Ok(Ok(state)) => match &*state {
                State::Connected(current) => Some(current.conn.clone()),
                State::Connecting | State::Down => None,
            },
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// A client for the current primary (for a pub/sub connection).
    pub(super) fn client(&self) -> Option<Client> {
        match &*self.state.borrow() {
            State::Connected(current) => Some(current.client.clone()),
            State::Connecting | State::Down => None,
        }
    }

    /// A call failed in a way that puts the connection in doubt: probe now.
    pub(super) fn suspect(&self) {
        self.suspect.notify_one();
    }

    /// Every node as last probed.
    pub(super) fn nodes(&self) -> Vec<NodeStatus> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The task behind a [`Primary`].
struct Supervisor {
    locator: Locator,
    state: watch::Sender<State>,
    nodes: Arc<RwLock<Vec<NodeStatus>>>,
    suspect: Arc<Notify>,
    limit: Duration,
    config: AsyncConnectionConfig,
}

impl Supervisor {
    fn current(&self) -> Option<Current> {
        match &*self.state.borrow() {
            State::Connected(current) => Some((**current).clone()),
            State::Connecting | State::Down => None,
        }
    }

    /// Connects, probes and replaces the connection, for as long as it runs.
    async fn run(mut self) {
        let mut retry = MIN_RETRY;
        loop {
            if self.current().is_none() {
                self.state.send_replace(State::Connecting);
                let next = match tokio::time::timeout(
                    self.limit,
                    self.locator.connect(&self.config),
                )
                .await
                {
                    Ok(Ok(current)) => {
                        tracing::info!(addr = %addr_of(&current.client), "connected to the Redis primary");
                        State::Connected(Box::new(current))
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "no Redis primary yet");
                        State::Down
                    }
                    Err(_) => {
                        tracing::debug!("no Redis primary yet: connecting timed out");
                        State::Down
                    }
                };
                self.state.send_replace(next);
            }
            let current = self.current();
            let (healthy, nodes) = self
                .locator
                .probe(current.as_ref(), self.limit, &self.config)
                .await;
            *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = nodes;
            if let (Some(current), false) = (current, healthy) {
                tracing::warn!(addr = %addr_of(&current.client), "the Redis primary stopped answering as primary; reconnecting");
                self.state.send_replace(State::Connecting);
            }
            if healthy {
                retry = MIN_RETRY;
                tokio::time::sleep(MIN_PROBE_GAP).await;
                tokio::select! {
                    () = self.suspect.notified() => {}
                    () = tokio::time::sleep(PROBE_INTERVAL - MIN_PROBE_GAP) => {}
                }
            } else {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}
