//! Highly available Redis set up by a test from real processes: a Sentinel
//! watching a primary and its replica, or a three-master Redis Cluster made
//! with `redis-cli --cluster create`. Each waits for its own signal (the
//! replica's link, the sentinel's view, `cluster_state:ok`), never a fixed sleep.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use keyapi_proxy::config::Config;
use redis::AsyncCommands as _;

use super::{
    eventually,
    redis_server::{Guard, RedisServer, available},
};

/// The name the test Sentinel monitors.
pub const MASTER_NAME: &str = "keyapi";

/// A fresh directory for one setup's files.
fn scratch_dir(kind: &str, port: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyapi-{kind}-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One reply of `cmd` on `server`, or `None` if it does not answer.
async fn ask<T: redis::FromRedisValue>(server: &RedisServer, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(server.url()).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    cmd.query_async(&mut conn).await.ok()
}

/// A primary, its replica, and one Sentinel watching them.
pub struct Sentinels {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinel: RedisServer,
    dir: PathBuf,
}

/// Passwords of a protected Sentinel setup, as managed Redis gives them.
#[derive(Clone, Copy)]
pub struct SentinelAuth {
    /// `requirepass` of the primary and the replica (and `masterauth`).
    pub data: &'static str,
    /// The Sentinel's own `requirepass`.
    pub sentinel: &'static str,
}

impl Sentinels {
    /// Starts all three; the Sentinel declares the primary down after
    /// `down_after` without an answer. Returns once the replica is in sync
    /// and the Sentinel knows it (so it can promote it).
    pub async fn start(down_after: Duration) -> Option<Self> {
        Self::start_with(down_after, None, None).await
    }

    /// [`Sentinels::start`], every process requiring a password when `auth`
    /// says, and also speaking TLS with `tls` (certificate, key) when given:
    /// replication and the Sentinel's checks go over TLS, and the Sentinel
    /// names the primary by its TLS port.
    pub async fn start_with(
        down_after: Duration,
        auth: Option<SentinelAuth>,
        tls: Option<(&Path, &Path)>,
    ) -> Option<Self> {
        // Both data nodes require the password and give it to their primary:
        // either may be the replica after a failover.
        let guard = Guard {
            password: auth.map(|a| a.data),
            tls,
            links: "--tls-replication",
        };
        let start_data_node = |args| RedisServer::start_guarded(args, guard);
        let primary = start_data_node(Vec::new()).await?;
        let dir = scratch_dir("sentinel", primary.port);
        // The replica stores the primary's snapshot in its `--dir`.
        let replica = start_data_node(vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.served_port().to_string(),
            "--dir".into(),
            dir.display().to_string(),
        ])
        .await?;
        eventually(Duration::from_secs(20), "the replica syncs", || async {
            let info: Option<String> = ask(&replica, redis::cmd("INFO").arg("replication")).await;
            info.is_some_and(|i| i.contains("master_link_status:up"))
        })
        .await;
        let config = dir.join("sentinel.conf");
        let down_ms = down_after.as_millis();
        let mut lines = format!(
            "sentinel monitor {MASTER_NAME} 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds {MASTER_NAME} {down_ms}\n\
             sentinel failover-timeout {MASTER_NAME} {}\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            primary.served_port(),
            down_ms * 4
        );
        if let Some(auth) = auth {
            lines += &format!(
                "sentinel auth-pass {MASTER_NAME} {}\nrequirepass {}\n",
                auth.data, auth.sentinel
            );
        }
        let sentinel_tls_port = tls.map(|(cert, key)| {
            let port = super::redis_server::free_port();
            let (cert, key) = (cert.display(), key.display());
            lines += &format!(
                "tls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\n\
                 tls-ca-cert-file {cert}\ntls-auth-clients no\ntls-replication yes\n"
            );
            port
        });
        std::fs::write(&config, lines).unwrap();
        let mut sentinel = RedisServer::start_sentinel(config)
            .await?
            .requiring(auth.map(|a| a.sentinel));
        sentinel.tls_port = sentinel_tls_port;
        let setup = Self {
            primary,
            replica,
            sentinel,
            dir,
        };
        let replica_port = setup.replica.served_port().to_string();
        eventually(
            Duration::from_secs(20),
            "the sentinel sees the replica",
            || async {
                let replicas: Option<Vec<std::collections::HashMap<String, String>>> = ask(
                    &setup.sentinel,
                    redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME),
                )
                .await;
                replicas.unwrap_or_default().iter().any(|r| {
                    r.get("port") == Some(&replica_port)
                        && r.get("flags").is_some_and(|f| f == "slave")
                        && r.get("master-link-status").is_some_and(|s| s == "ok")
                })
            },
        )
        .await;
        Some(setup)
    }

    /// The sentinels as a proxy is configured with them (with the
    /// Sentinel's own password, when it has one; `rediss://` with TLS).
    pub fn urls(&self) -> Vec<String> {
        vec![self.sentinel.served_url()]
    }

    /// The primary's port as the Sentinel names it.
    pub async fn named_primary(&self) -> Option<u16> {
        let named: Option<(String, u16)> = ask(
            &self.sentinel,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME),
        )
        .await;
        named.map(|(_, port)| port)
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        self.sentinel.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Config adjustment: Sentinel mode with `sentinels` (`master_name` [`MASTER_NAME`]).
pub fn with_sentinels(sentinels: &[String]) -> impl Fn(&mut Config) + '_ {
    move |c: &mut Config| {
        c.cache.redis.sentinels = sentinels.iter().map(|u| u.clone().into()).collect();
        c.cache.redis.master_name = Some(MASTER_NAME.into());
        c.cache.redis.op_timeout = Duration::from_millis(500);
    }
}

/// Three masters (no replicas) forming one Redis Cluster; a master that
/// dies leaves its slots uncovered while the others serve theirs
/// (`cluster-require-full-coverage no`).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts the nodes, joins them, and returns once every node says
    /// `cluster_state:ok` with all 16384 slots served.
    pub async fn start() -> Option<Self> {
        Self::start_with(None, None).await
    }

    /// [`RedisCluster::start`], every node requiring `password` when given,
    /// and also speaking TLS with `tls` (certificate, key) when given: on its
    /// [`RedisServer::tls_port`] and on the cluster bus (`tls-cluster`), so
    /// the cluster names TLS ports to TLS clients and plain ones to the rest.
    pub async fn start_with(password: Option<&str>, tls: Option<(&Path, &Path)>) -> Option<Self> {
        if !available("redis-cli") {
            return None;
        }
        let dir = scratch_dir("cluster", super::redis_server::free_port());
        let mut nodes = Vec::new();
        for i in 0..3 {
            let args = vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                dir.join(format!("nodes-{i}.conf")).display().to_string(),
                "--cluster-node-timeout".into(),
                "1000".into(),
                "--cluster-require-full-coverage".into(),
                "no".into(),
                "--dir".into(),
                dir.display().to_string(),
            ];
            let guard = Guard {
                password,
                tls,
                links: "--tls-cluster",
            };
            let node = RedisServer::start_guarded(args, guard).await?;
            nodes.push(node);
        }
        let created = tokio::process::Command::new("redis-cli")
            .args(password.iter().flat_map(|p| ["-a", p, "--no-auth-warning"]))
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .status()
            .await
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes, dir };
        eventually(Duration::from_secs(30), "the cluster is ok", || async {
            for node in &cluster.nodes {
                let info: Option<String> = ask(node, redis::cmd("CLUSTER").arg("INFO")).await;
                let ok = info.is_some_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384")
                });
                if !ok {
                    return false;
                }
            }
            true
        })
        .await;
        Some(cluster)
    }

    /// Seed URLs as a proxy is configured with them (`rediss://` on the
    /// nodes' TLS ports when they speak TLS).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::served_url).collect()
    }

    /// The slot of `key`.
    pub async fn slot(&self, key: &str) -> u16 {
        ask(
            &self.nodes[0],
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(key),
        )
        .await
        .expect("CLUSTER KEYSLOT")
    }

    /// The index (in [`RedisCluster::nodes`]) of the master serving `key`: the
    /// one node that answers for it (the others redirect with `MOVED`).
    pub async fn owner(&self, key: &str) -> usize {
        for (i, node) in self.nodes.iter().enumerate() {
            let found: Option<u64> = ask(node, redis::cmd("EXISTS").arg(key)).await;
            if found.is_some() {
                return i;
            }
        }
        panic!("no node serves {key}");
    }

    /// Every key on node `i`.
    pub async fn keys_on(&self, i: usize) -> Vec<String> {
        let mut conn = self.nodes[i].connection().await;
        conn.keys("*").await.unwrap()
    }

    /// Node `i`'s cluster id.
    pub async fn id(&self, i: usize) -> String {
        ask(&self.nodes[i], redis::cmd("CLUSTER").arg("MYID"))
            .await
            .unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Config adjustment: cluster mode with `nodes` as seeds.
pub fn with_cluster(nodes: &[String]) -> impl Fn(&mut Config) + '_ {
    move |c: &mut Config| {
        c.cache.redis.cluster_nodes = nodes.iter().map(|u| u.clone().into()).collect();
        c.cache.redis.op_timeout = Duration::from_millis(500);
    }
}
