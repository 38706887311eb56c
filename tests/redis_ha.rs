//! Past one Redis: two proxies on a Sentinel-managed primary or on a Redis
//! Cluster (real processes started here) share answers, the single flight,
//! budgets, rate limits and warm-up leases; a Sentinel failover under a
//! request loop and a dead cluster master cost no client an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use common::{
    TestApp, assert_ledger_equals_bill,
    binary::spawn_binary_on_tls_redis,
    client,
    entries::hashtag_key,
    eventually, hashtag_path, header,
    redis_ha::{MASTER_NAME, RedisCluster, SentinelAuth, Sentinels, with_cluster, with_sentinels},
    redis_server::self_signed_cert,
    spawn_app_with, stampede,
};
use keyapi_proxy::{
    config::{Config, QuestionValue, WarmupConfig},
    redis_conn::{Mode, NodeRole},
};
use redis::AsyncCommands as _;

const LIMITED: &str = "kp_limited_client";

/// The Redis key of `kind` (`entry`, `lock`) for the hashtag `name`.
fn redis_key(kind: &str, name: &str) -> String {
    format!(
        "keyapi-proxy:v1:{kind}:{}",
        hashtag_key(name).path_and_query()
    )
}

/// Runs the first warm-up of `app` once, as of `now`.
async fn run_warmup(app: &TestApp, now: SystemTime) -> keyapi_proxy::warmup::RunReport {
    app.state.warmups()[0].run(app.state.proxy(), now).await
}

/// A warm-up of three questions that only the test starts.
fn warmup() -> WarmupConfig {
    let names = ["w1", "w2", "w3"].map(|n| QuestionValue::Text(n.into()));
    WarmupConfig {
        name: None,
        route: "/v1/tiktok/trending/hashtag/detail".into(),
        every: Some(Duration::from_secs(3600)),
        at: None,
        max_credits_per_day: 100,
        start_delay: Some(Duration::from_secs(3600)),
        pace: Some(Duration::ZERO),
        questions: vec![BTreeMap::from([(
            "hashtag_name".to_owned(),
            QuestionValue::List(names.to_vec()),
        )])],
        questions_file: None,
    }
}

/// A global budget of 20 credits, a client limited to 2 requests a minute
/// (visitors let in beside it), and [`warmup`].
fn shared_limits(c: &mut Config) {
    c.credits.daily_budget = 20;
    let mut limited = client("limited", LIMITED);
    limited.rate_per_minute = Some(2);
    limited.burst = Some(2);
    c.clients = vec![limited];
    c.visitors.allow = true;
    c.warmup = vec![warmup()];
}

/// Two proxies on the Redis that `redis` configures, checked for every
/// shared thing in turn: one warm-up run, one call for 200 cold requests,
/// one rate limit, one budget never exceeded.
async fn two_proxies_share_the_tier(redis: &(dyn Fn(&mut Config) + Sync)) -> (TestApp, TestApp) {
    let config = |c: &mut Config| {
        redis(c);
        shared_limits(c);
    };
    let a = spawn_app_with(config).await;
    let b = a.spawn_replica(config).await;

    let now = SystemTime::now();
    assert_eq!(run_warmup(&a, now).await.warmed, 3);
    assert_eq!(
        run_warmup(&b, now).await.stopped_by,
        Some("another_replica")
    );
    assert_eq!(a.upstream.calls(), 3, "one warm-up run for both");

    let results = stampede(&[&a, &b], 200, |_| hashtag_path("hashtag_name=ufc324"), 4).await;
    assert!(results.iter().all(|(status, ..)| *status == 200));
    assert_eq!(a.upstream.calls(), 4, "one call for 200 cold requests");

    let query = "hashtag_name=ufc324";
    assert_eq!(a.get_hashtag_as(LIMITED, query).await.status(), 200);
    assert_eq!(b.get_hashtag_as(LIMITED, query).await.status(), 200);
    let third = a.get_hashtag_as(LIMITED, query).await.status();
    assert_eq!(third, 429, "the rate limit is shared");

    // 12 credits left: six calls go out (held until all six have), the
    // rest are refused.
    let results = stampede(
        &[&a, &b],
        200,
        |i| hashtag_path(&format!("hashtag_name=cold{i}")),
        10,
    )
    .await;
    assert!(results.iter().all(|(s, ..)| *s == 200 || *s == 429));
    let (_, credits) = assert_ledger_equals_bill(&[&a, &b]).await;
    assert_eq!(
        credits, 20,
        "the shared budget of 20 is spent, never exceeded"
    );
    (a, b)
}

#[tokio::test]
async fn two_proxies_on_sentinels_share_the_tier() {
    let Some(sentinels) = Sentinels::start(Duration::from_secs(1)).await else {
        return;
    };
    let urls = sentinels.urls();
    let (a, _b) = two_proxies_share_the_tier(&with_sentinels(&urls)).await;
    let status = a.state.proxy().redis().unwrap().conn().status();
    assert_eq!(status.mode, Mode::Sentinel);
    let primary = format!("127.0.0.1:{}", sentinels.primary.port);
    assert!(
        status
            .nodes
            .iter()
            .any(|n| n.role == NodeRole::Primary && n.addr == primary && n.answers),
        "{status:?}"
    );
    let ready = a.client.get(a.url("/readyz")).send().await.unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready.text().await.unwrap()).unwrap();
    assert_eq!(ready["redis"]["mode"], "sentinel", "{ready}");
}

/// Managed Redis comes with passwords: the Sentinel's own in its URL, the
/// primary's in `master_password`. Both proxies share the tier through
/// them, and neither password shows in `/stats`, `/readyz` or `/metrics`.
#[tokio::test]
async fn two_proxies_on_password_protected_sentinels_share_the_tier() {
    let auth = SentinelAuth {
        data: "data-pass-5f1c9e",
        sentinel: "sentinel-pass-a73d20",
    };
    let Some(sentinels) = Sentinels::start_with(Duration::from_secs(1), Some(auth), None).await
    else {
        return;
    };
    let urls = sentinels.urls();
    let redis = |c: &mut Config| {
        with_sentinels(&urls)(c);
        c.cache.redis.master_password = Some(auth.data.to_owned().into());
    };
    let (a, b) = two_proxies_share_the_tier(&redis).await;
    assert_no_answer_shows(&[&a, &b], &[auth.data, auth.sentinel]).await;
}

#[tokio::test]
async fn two_proxies_on_a_cluster_share_the_tier_and_spread_its_keys() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let urls = cluster.urls();
    let (a, _b) = two_proxies_share_the_tier(&with_cluster(&urls)).await;
    // The ledger's keys share one slot; the rest spread over the masters.
    let mut holding = 0;
    let mut ledger_keys = Vec::new();
    for i in 0..cluster.nodes.len() {
        let keys = cluster.keys_on(i).await;
        holding += usize::from(!keys.is_empty());
        ledger_keys.extend(keys.into_iter().filter(|k| k.contains("{ledger}")));
    }
    assert!(holding >= 2, "keys spread over the masters");
    assert!(ledger_keys.len() >= 2, "{ledger_keys:?}");
    let stats = a.stats().await;
    assert_eq!(stats["redisTier"]["mode"], "cluster", "{stats}");
    let masters = stats["redisTier"]["nodes"].as_array().unwrap();
    assert_eq!(masters.len(), 3, "{stats}");
}

/// A cluster whose nodes require a password (in every seed URL): both
/// proxies share it, and the password shows nowhere they answer.
#[tokio::test]
async fn two_proxies_on_a_password_protected_cluster_share_the_tier() {
    const PASSWORD: &str = "cluster-pass-0b9e44";
    let Some(cluster) = RedisCluster::start_with(Some(PASSWORD), None).await else {
        return;
    };
    let urls = cluster.urls();
    let (a, b) = two_proxies_share_the_tier(&with_cluster(&urls)).await;
    assert_no_answer_shows(&[&a, &b], &[PASSWORD]).await;
}

/// Managed clusters speak TLS: with `rediss://` seeds the binary (trusting
/// the cluster's certificate through `SSL_CERT_FILE`) reaches every master
/// over TLS, on the TLS ports the cluster names to a TLS client.
#[tokio::test]
async fn a_rediss_cluster_is_reached_over_tls_on_every_master() {
    let Some((dir, cert, key)) = tls_material("cluster") else {
        return;
    };
    let Some(cluster) = RedisCluster::start_with(None, Some((&cert, &key))).await else {
        return;
    };
    let seeds = format!("{:?}", cluster.urls());
    let (_child, addr) = spawn_binary_on_tls_redis(&[("CLUSTER_NODES", &seeds)], &cert).await;
    let nodes = ask_then_list_nodes(addr, 30).await;
    // Read back over the plain ports: every master stored entries sent through TLS.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let keys = cluster.keys_on(i).await;
        let entries = keys.iter().filter(|k| k.contains(":entry:")).count();
        assert!(entries > 0, "master {i} holds no entry: {keys:?}");
        assert!(answers(&nodes, node.served_port(), "master"), "{nodes:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Managed Sentinel setups speak TLS too: from a `rediss://` sentinel URL the
/// binary asks the Sentinel over TLS and reaches the primary it names (by
/// its TLS port) over TLS as well.
#[tokio::test]
async fn rediss_sentinels_lead_to_the_primary_over_tls() {
    let Some((dir, cert, key)) = tls_material("sentinel") else {
        return;
    };
    let tls = Some((cert.as_path(), key.as_path()));
    let Some(sentinels) = Sentinels::start_with(Duration::from_secs(1), None, tls).await else {
        return;
    };
    let seeds = format!("{:?}", sentinels.urls());
    let redis = [("SENTINELS", seeds.as_str()), ("MASTER_NAME", MASTER_NAME)];
    let (_child, addr) = spawn_binary_on_tls_redis(&redis, &cert).await;
    let nodes = ask_then_list_nodes(addr, 5).await;
    // Read back over the primary's plain port: the entries came through TLS.
    let mut conn = sentinels.primary.connection().await;
    let entries: Vec<String> = conn.keys("keyapi-proxy:v1:entry:*").await.unwrap();
    assert_eq!(entries.len(), 5, "{entries:?}");
    let primary = sentinels.primary.served_port();
    assert!(answers(&nodes, primary, "primary"), "{nodes:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A directory of its own for a TLS test of `kind`, with a certificate and
/// key in it: (dir, cert, key); `None` without `openssl`.
fn tls_material(kind: &str) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("keyapi-tls-{kind}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = self_signed_cert(&dir)?;
    Some((dir, cert, key))
}

/// Asks the binary at `addr` `count` new questions (each answered 200),
/// then returns the Redis nodes its `/readyz` lists.
async fn ask_then_list_nodes(addr: SocketAddr, count: usize) -> Vec<serde_json::Value> {
    let http = reqwest::Client::new();
    for i in 0..count {
        let path = hashtag_path(&format!("hashtag_name=tls{i}"));
        let answer = http.get(format!("http://{addr}{path}")).send().await;
        assert_eq!(answer.unwrap().status(), 200);
    }
    let ready = http.get(format!("http://{addr}/readyz")).send().await;
    let ready = ready.unwrap().text().await.unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    ready["redis"]["nodes"].as_array().unwrap().clone()
}

/// Whether `nodes` (from `/readyz`) has `127.0.0.1:<port>` in `role`, answering.
fn answers(nodes: &[serde_json::Value], port: u16, role: &str) -> bool {
    let addr = format!("127.0.0.1:{port}");
    nodes
        .iter()
        .any(|n| n["addr"] == addr.as_str() && n["role"] == role && n["answers"] == true)
}

/// Fails if any of `secrets` is in `/stats`, `/readyz` or `/metrics` of `apps`.
async fn assert_no_answer_shows(apps: &[&TestApp], secrets: &[&str]) {
    for app in apps {
        for path in ["/stats", "/readyz", "/metrics"] {
            let answer = app.client.get(app.url(path)).send().await.unwrap();
            let body = answer.text().await.unwrap();
            for secret in secrets {
                assert!(!body.contains(secret), "{path} shows a Redis password");
            }
        }
    }
}

#[tokio::test]
async fn a_sentinel_failover_under_a_request_loop_costs_no_client_an_error() {
    let down_after = Duration::from_secs(1);
    let Some(mut sentinels) = Sentinels::start(down_after).await else {
        return;
    };
    let urls = sentinels.urls();
    let config = |c: &mut Config| {
        with_sentinels(&urls)(c);
        c.credits.daily_budget = 10_000;
        // While no primary answers, each replica may spend this much alone.
        c.credits.outage_allowance = 2_000;
    };
    let a = Arc::new(spawn_app_with(config).await);
    let b = Arc::new(a.spawn_replica(config).await);
    a.upstream.set_latency(Duration::from_millis(5));

    // Four clients ask new and repeated questions until stopped.
    let running = Arc::new(AtomicBool::new(true));
    let loops: Vec<_> = (0..4)
        .map(|worker| {
            let (app, running) = (if worker % 2 == 0 { &a } else { &b }, &running);
            let (app, running) = (Arc::clone(app), Arc::clone(running));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                let mut i = 0u32;
                while running.load(Ordering::Relaxed) {
                    // Every other question is new (a call), the rest repeat.
                    let query = if i.is_multiple_of(2) {
                        format!("hashtag_name=new{worker}x{i}")
                    } else {
                        format!("hashtag_name=repeat{}", i % 10)
                    };
                    statuses.push(app.get(&query).await.0);
                    i += 1;
                }
                statuses
            })
        })
        .collect();
    let new_primary = format!("127.0.0.1:{}", sentinels.replica.port);
    let uses_new_primary = |app: &TestApp| {
        app.state
            .proxy()
            .redis()
            .unwrap()
            .conn()
            .status()
            .nodes
            .iter()
            .any(|n| n.role == NodeRole::Primary && n.addr == new_primary && n.answers)
    };
    // Let the loop run on the old primary for a moment, then kill it.
    a.upstream.wait_for_calls(20).await;
    let killed = Instant::now();
    sentinels.primary.kill();
    let replica_port = sentinels.replica.port;
    eventually(
        Duration::from_secs(30),
        "the sentinel promotes the replica",
        || async { sentinels.named_primary().await == Some(replica_port) },
    )
    .await;
    let promoted = killed.elapsed();
    eventually(
        Duration::from_secs(30),
        "both proxies use the new primary",
        || async { uses_new_primary(&a) && uses_new_primary(&b) },
    )
    .await;
    let switched = killed.elapsed();
    // Some more traffic on the new primary, then stop.
    let calls = a.upstream.calls();
    a.upstream.wait_for_calls(calls + 20).await;
    running.store(false, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for handle in loops {
        statuses.extend(handle.await.unwrap());
    }
    let errors = statuses.iter().filter(|s| **s != 200).count();
    let (calls, credits) = assert_ledger_equals_bill(&[&a, &b]).await;
    // Every money operation, outage spend included, reaches the new primary.
    for app in [&a, &b] {
        common::redis_server::until_redis_answers(app).await;
        let ledger = app.state.proxy().ledger();
        eventually(
            Duration::from_secs(10),
            "the ledger's pending operations reach Redis",
            || async {
                ledger.spent_today(ledger.global().unwrap()).await;
                ledger.awaiting_redis() == 0
            },
        )
        .await;
    }
    let counted = a
        .state
        .proxy()
        .ledger()
        .spent_today(a.state.proxy().ledger().global().unwrap())
        .await;
    println!(
        "failover: sentinel promoted the replica after {:.2} s; both proxies used it after {:.2} s \
         (down-after-milliseconds {} ms); requests {}, client errors {errors}; calls KeyAPI received \
         {calls}; credits on the ledger {credits}; budget counter on the new primary {counted}",
        promoted.as_secs_f64(),
        switched.as_secs_f64(),
        down_after.as_millis(),
        statuses.len(),
    );
    assert_eq!(errors, 0, "no client saw the failover");
    assert!(
        switched < down_after + Duration::from_secs(5),
        "the proxies followed within down-after + a few seconds: {switched:?}"
    );
    // Replication is asynchronous: a charge the old primary took in its last
    // instant may not have reached the replica; nothing is counted twice.
    assert!(counted <= credits, "{counted} <= {credits}");
    assert!(
        counted >= credits.saturating_sub(2 * 4),
        "{counted} vs {credits}"
    );
}

#[tokio::test]
async fn a_dead_cluster_master_degrades_only_its_slots() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let urls = cluster.urls();
    let config = |c: &mut Config| {
        with_cluster(&urls)(c);
        c.credits.daily_budget = 1_000;
    };
    let a = spawn_app_with(config).await;
    let b = a.spawn_replica(config).await;
    assert_eq!(a.get("hashtag_name=before").await.0, 200);
    // The victim holds neither the ledger's slot nor the test's live question.
    let ledger = cluster.owner("keyapi-proxy:v1:{ledger}:x").await;
    let victim = (0..3).find(|i| *i != ledger).unwrap();
    let mut live = None;
    let mut dead = None;
    for i in 0.. {
        let name = format!("q{i}");
        let entry = cluster.owner(&redis_key("entry", &name)).await;
        let lock = cluster.owner(&redis_key("lock", &name)).await;
        if entry == victim && dead.is_none() {
            dead = Some(name);
        } else if entry != victim && lock != victim && live.is_none() {
            live = Some(name);
        }
        if live.is_some() && dead.is_some() {
            break;
        }
    }
    let (live, dead) = (live.unwrap(), dead.unwrap());
    cluster.nodes[victim].kill();

    let calls = a.upstream.calls();
    assert_eq!(a.get(&format!("hashtag_name={live}")).await.0, 200);
    let (status, headers, _) = b.get(&format!("hashtag_name={live}")).await;
    assert_eq!(status, 200);
    assert!(
        header(&headers, "cache-status").contains("; hit"),
        "{headers:?}"
    );
    assert_eq!(a.upstream.calls(), calls + 1, "the live slots still share");

    assert_eq!(a.get(&format!("hashtag_name={dead}")).await.0, 200);
    assert_eq!(b.get(&format!("hashtag_name={dead}")).await.0, 200);
    assert_eq!(
        a.upstream.calls(),
        calls + 3,
        "the dead master's slots degrade as a Redis outage: each replica pays"
    );
    assert_ledger_equals_bill(&[&a, &b]).await;
    let ledger = a.state.proxy().ledger();
    assert_eq!(
        ledger.spent_today(ledger.global().unwrap()).await,
        2 * a.upstream.calls() as u64,
        "the budget, on a live master, counted every call"
    );
    let victim_addr = format!("127.0.0.1:{}", cluster.nodes[victim].port);
    eventually(
        Duration::from_secs(10),
        "the status shows the dead master",
        || async {
            let status = a.state.proxy().redis().unwrap().conn().status();
            status
                .nodes
                .iter()
                .any(|n| n.addr == victim_addr && !n.answers)
        },
    )
    .await;
}

#[tokio::test]
async fn a_resharded_slot_is_followed_through_ask_and_moved() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let urls = cluster.urls();
    let a = spawn_app_with(with_cluster(&urls)).await;
    let b = a.spawn_replica(with_cluster(&urls)).await;
    let c = a.spawn_replica(with_cluster(&urls)).await;
    // Every proxy has its slot map before the slot moves.
    for app in [&a, &b, &c] {
        assert_eq!(app.get("hashtag_name=warm").await.0, 200);
    }
    assert_eq!(a.get("hashtag_name=moving").await.0, 200);
    let key = redis_key("entry", "moving");
    let slot = cluster.slot(&key).await;
    let from = cluster.owner(&key).await;
    let to = (from + 1) % 3;
    let (from_id, to_id) = (cluster.id(from).await, cluster.id(to).await);
    let setslot = |state: &str, id: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
        cmd
    };
    let mut target = cluster.nodes[to].connection().await;
    let mut source = cluster.nodes[from].connection().await;
    let () = setslot("IMPORTING", &from_id)
        .query_async(&mut target)
        .await
        .unwrap();
    let () = setslot("MIGRATING", &to_id)
        .query_async(&mut source)
        .await
        .unwrap();
    let () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(cluster.nodes[to].port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(&key)
        .query_async(&mut source)
        .await
        .unwrap();
    // Mid-migration the source answers ASK for the moved key.
    let (_, headers, _) = b.get("hashtag_name=moving").await;
    assert!(
        header(&headers, "cache-status").contains("; hit"),
        "{headers:?}"
    );
    for node in &cluster.nodes {
        let mut conn = node.connection().await;
        let () = setslot("NODE", &to_id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // Now the old owner answers MOVED.
    let (_, headers, _) = c.get("hashtag_name=moving").await;
    assert!(
        header(&headers, "cache-status").contains("; hit"),
        "{headers:?}"
    );
    assert_eq!(a.upstream.calls(), 2, "warm and moving, each once");
}
