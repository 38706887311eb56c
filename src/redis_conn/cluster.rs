//! Cluster mode: the `redis` crate's async cluster connection routes each
//! command to the master owning its key's slot, follows `MOVED` and `ASK`,
//! and reconnects to nodes by itself. A master that dies fails only the
//! commands for its slots (with `cluster-require-full-coverage no` on the
//! servers; otherwise Redis itself refuses every slot until it is covered).
//!
//! Beside it, a task lists the nodes every second (`CLUSTER NODES`, asked of
//! any node) and pings each by address, for status and for the masters a
//! purge must scan.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::future::join_all;
use redis::{
    Client, Cmd, RedisResult, Value,
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::{RoutingInfo, SingleNodeRoutingInfo},
};
use secrecy::{ExposeSecret, SecretString};
use tokio::task::AbortHandle;

use super::{NodeRole, NodeStatus, Settings, TargetError, open};

/// Time between two listings of the nodes.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Tries (each on a random node) to list the nodes.
const LIST_TRIES: usize = 3;

/// The cluster client and a client per seed node (for pub/sub), parsed only.
pub(super) fn client(
    nodes: &[SecretString],
    settings: &Settings,
) -> Result<(ClusterClient, Vec<Client>), TargetError> {
    let seeds = nodes
        .iter()
        .map(open)
        .collect::<Option<Vec<_>>>()
        .filter(|seeds| !seeds.is_empty())
        .ok_or(TargetError::Cluster)?;
    let client = ClusterClient::builder(nodes.iter().map(|url| url.expose_secret().to_owned()))
        // A redirect (`MOVED`, `ASK`) or a refreshed slot map takes a retry;
        // our own timeout ends the call long before many of them.
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .connection_timeout(settings.probe_timeout())
        .response_timeout(settings.op_timeout.max(settings.ledger_timeout))
        .build()
        .map_err(|_| TargetError::Cluster)?;
    Ok((client, seeds))
}

/// The cluster connection, its seeds and the nodes as last probed.
pub(super) struct Cluster {
    conn: ClusterConnection,
    seeds: Vec<Client>,
    next_seed: AtomicUsize,
    nodes: Arc<RwLock<Vec<NodeStatus>>>,
    task: AbortHandle,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cluster {
    /// Connects in the background (never blocks on Redis) and starts probing.
    pub(super) fn start(nodes: &[SecretString], settings: &Settings) -> Result<Self, TargetError> {
        let (client, seeds) = client(nodes, settings)?;
        let limit = settings.probe_timeout();
        let config = ClusterConfig::new()
            .set_connection_timeout(limit)
            .set_response_timeout(settings.op_timeout.max(settings.ledger_timeout));
        let conn = client.get_pending_async_connection_with_config(config);
        let statuses = Arc::new(RwLock::new(Vec::new()));
        let task = tokio::spawn(watch(conn.clone(), Arc::clone(&statuses), limit));
        Ok(Self {
            conn,
            seeds,
            next_seed: AtomicUsize::new(0),
            nodes: statuses,
            task: task.abort_handle(),
        })
    }

    /// The connection to send on (it routes by key).
    pub(super) fn connection(&self) -> ClusterConnection {
        self.conn.clone()
    }

    /// The next seed node's client, round robin.
    pub(super) fn next_seed(&self) -> Client {
        let i = self.next_seed.fetch_add(1, Ordering::Relaxed) % self.seeds.len();
        self.seeds[i].clone()
    }

    /// Every node as last probed.
    pub(super) fn nodes(&self) -> Vec<NodeStatus> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The masters that answered the last probe, as `(host, port)`.
    pub(super) fn masters(&self) -> Vec<(String, u16)> {
        self.nodes()
            .into_iter()
            .filter(|n| n.role == NodeRole::Master && n.answers)
            .filter_map(|n| split_addr(&n.addr))
            .collect()
    }

    /// Sends `cmd` to the node at `addr` (for commands without a key, like SCAN).
    pub(super) fn on_node(
        &self,
        addr: &(String, u16),
        cmd: Cmd,
    ) -> impl Future<Output = RedisResult<Value>> + use<> {
        on_node(self.conn.clone(), addr, cmd)
    }
}

fn on_node(
    mut conn: ClusterConnection,
    (host, port): &(String, u16),
    cmd: Cmd,
) -> impl Future<Output = RedisResult<Value>> + use<> {
    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.clone(),
        port: *port,
    });
    async move { conn.route_command(cmd, routing).await }
}

/// Lists and pings the nodes every [`PROBE_INTERVAL`], for as long as it runs.
async fn watch(conn: ClusterConnection, nodes: Arc<RwLock<Vec<NodeStatus>>>, limit: Duration) {
    loop {
        if let Some(listed) = list_nodes(&conn, limit).await {
            let pings = listed.iter().map(|(addr, _)| {
                let ping = on_node(conn.clone(), addr, redis::cmd("PING"));
                async move { matches!(tokio::time::timeout(limit, ping).await, Ok(Ok(_))) }
            });
            let answers = join_all(pings).await;
            let probed = listed
                .into_iter()
                .zip(answers)
                .map(|((addr, role), answers)| NodeStatus {
                    addr: format!("{}:{}", addr.0, addr.1),
                    role,
                    answers,
                })
                .collect();
            *nodes.write().unwrap_or_else(|e| e.into_inner()) = probed;
        } else {
            // No node answers: keep the list, none of them answers.
            for node in nodes.write().unwrap_or_else(|e| e.into_inner()).iter_mut() {
                node.answers = false;
            }
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// The cluster's nodes (`CLUSTER NODES` from any node that answers).
async fn list_nodes(
    conn: &ClusterConnection,
    limit: Duration,
) -> Option<Vec<((String, u16), NodeRole)>> {
    for _ in 0..LIST_TRIES {
        let mut conn = conn.clone();
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let listed = conn.route_command(redis::cmd("CLUSTER").arg("NODES").clone(), routing);
        if let Ok(Ok(value)) = tokio::time::timeout(limit, listed).await
            && let Ok(text) = redis::from_redis_value::<String>(value)
        {
            return Some(parse_nodes(&text));
        }
    }
    None
}

/// `<id> <ip:port@cport[,hostname]> <flags> …` lines → address and role.
fn parse_nodes(text: &str) -> Vec<((String, u16), NodeRole)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let addr = fields.nth(1)?.split(['@', ',']).next()?;
            let flags = fields.next()?;
            let role = if flags.split(',').any(|f| f == "master") {
                NodeRole::Master
            } else {
                NodeRole::Replica
            };
            Some((split_addr(addr)?, role))
        })
        .collect()
}

/// `host:port` → its parts; `None` for an address the node does not know yet.
fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    (!host.is_empty()).then(|| Some((host.to_owned(), port.parse().ok()?)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_give_addresses_and_roles() {
        let text = "07c3 127.0.0.1:30004@31004,node-d slave e7d1 0 1426238317239 4 connected\n\
                    67ed 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922\n\
                    e7d1 :30001@31001 myself,master - 0 0 1 connected 0-5460\n";
        assert_eq!(
            parse_nodes(text),
            vec![
                (("127.0.0.1".to_owned(), 30004), NodeRole::Replica),
                (("127.0.0.1".to_owned(), 30002), NodeRole::Master),
            ]
        );
    }
}
