//! Scale-out and restarts: a Redis tier shared by replicas (one upstream call
//! per question across the cluster, a cluster-wide fetch lock, Redis faults
//! invisible to clients) and the snapshot that survives a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    TEST_API_KEY, TestApp, assert_hit, assert_ledger_equals_bill, assert_stored_miss, client,
    cluster::Cluster,
    entries::{RawEntry, hashtag_key, poisoned},
    eventually, hashtag_path, header, manual_clock, metric, metric_sum,
    redis_server::{RedisServer, with_redis},
    spawn_app_with, spawn_app_with_clock, stampede,
};
use keyapi_proxy::{cache::codec, config::Config, demo::FakeMode};
use redis::AsyncCommands;

const KEY: &str =
    "/v1/tiktok/trending/hashtag/detail?period=7&region=all_regions&hashtag_name=ufc324";

/// How long a replica may take to see what Redis or another replica did.
const WITHIN: Duration = Duration::from_secs(5);

#[tokio::test]
async fn two_replicas_pay_once_for_200_concurrent_cold_requests() {
    let Some(Cluster { redis, a, b, .. }) = Cluster::start(|_| {}).await else {
        return;
    };
    let results = stampede(&[&a, &b], 200, |_| hashtag_path("hashtag_name=ufc324"), 1).await;
    assert!(results.iter().all(|(status, _, _)| *status == 200));
    let first = &results[0].2;
    assert!(
        results.iter().all(|(_, _, body)| body == first),
        "identical bodies"
    );
    assert_eq!(a.upstream.calls(), 1, "one call for the whole cluster");
    let mut conn = redis.connection().await;
    let lock: bool = conn
        .exists(format!("keyapi-proxy:v1:lock:{KEY}"))
        .await
        .unwrap();
    assert!(!lock, "the lock was released by its owner");
}

#[tokio::test]
async fn an_entry_stored_by_one_replica_is_a_hit_on_another() {
    let Some(Cluster { redis, a, b, .. }) = Cluster::start(|_| {}).await else {
        return;
    };
    let (_, stored, body_a) = a.get("hashtag_name=ufc324").await;
    assert_stored_miss(&stored);
    let (status, hit, body_b) = b.get("hashtag_name=%23UFC324").await;
    assert_eq!(status, 200);
    assert_hit(&hit);
    assert_eq!(body_a, body_b);
    assert_eq!(a.upstream.calls(), 1);
    // The value in Redis is our versioned format with a TTL.
    let mut conn = redis.connection().await;
    let ttl: i64 = conn
        .pttl(format!("keyapi-proxy:v1:entry:{KEY}"))
        .await
        .unwrap();
    assert!(
        ttl > 3_600_000,
        "Redis TTL covers the stale windows: {ttl} ms"
    );
}

#[tokio::test]
async fn a_crashed_lock_holder_blocks_a_key_only_until_the_lock_expires() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let lock_ttl = Duration::from_millis(600);
    let a = spawn_app_with(|c| {
        with_redis(&redis.url())(c);
        c.upstream.request_timeout = Duration::from_millis(300);
        c.upstream.queue_timeout = Duration::from_millis(200);
        c.cache.redis.lock_ttl = Some(lock_ttl);
        c.cache.redis.lock_wait = Some(Duration::from_secs(30));
    })
    .await;
    // A replica took the lock and died: nobody will release it.
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg(format!("keyapi-proxy:v1:lock:{KEY}"))
        .arg("crashed-replica")
        .arg("PX")
        .arg(lock_ttl.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, headers, _) = a.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    assert_stored_miss(&headers);
    assert_eq!(a.upstream.calls(), 1);
    let pttl: i64 = conn
        .pttl(format!("keyapi-proxy:v1:lock:{KEY}"))
        .await
        .unwrap();
    assert_eq!(
        pttl, -2,
        "the lock is gone (expired, then taken and released)"
    );
}

#[tokio::test]
async fn redis_outage_is_invisible_to_clients_and_sharing_resumes() {
    let Some(Cluster {
        mut redis, a, b, ..
    }) = Cluster::start(|_| {}).await
    else {
        return;
    };
    a.get("hashtag_name=before").await;
    assert_hit(&b.get("hashtag_name=before").await.1);

    redis.kill();
    for i in 0..20 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let (status, _, body) = replica.get(&format!("hashtag_name=down{i}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("\"hashtag_name\":\"down{i}\"")));
    }
    assert!(!a.state.proxy().redis().unwrap().conn().is_up());
    let errors = metric_sum(&a.metrics().await, "keyapi_proxy_redis_errors_total");
    assert!(errors >= 1.0, "Redis failures are counted: {errors}");
    for path in ["/readyz", "/healthz"] {
        let ready = a.client.get(a.url(path)).send().await.unwrap();
        assert_eq!(ready.status(), 200, "{path} stays OK without Redis");
    }
    let stats = a.client.get(a.url("/stats")).send().await.unwrap();
    assert!(stats.text().await.unwrap().contains("\"redis\":\"down\""));

    redis.restart().await;
    // The replicas reconnect in the background; poll the observable outcome.
    let (a, b) = (&a, &b);
    let mut tries = 0;
    eventually(WITHIN, "sharing resumed after Redis came back", || {
        tries += 1;
        let query = format!("hashtag_name=after{tries}");
        async move {
            a.get(&query).await;
            let (_, headers, _) = b.get(&query).await;
            header(&headers, "cache-status").contains("; hit;")
        }
    })
    .await;
    assert!(a.state.proxy().redis().unwrap().conn().is_up());
}

/// How long until a question `a` stores is a hit on `b` again (sharing
/// works), asking a new question at each try.
async fn until_sharing(a: &TestApp, b: &TestApp, tag: &str) -> Duration {
    let started = std::time::Instant::now();
    let mut tries = 0;
    eventually(WITHIN, "sharing resumes", || {
        tries += 1;
        let query = format!("hashtag_name={tag}{tries}");
        async move {
            a.get(&query).await;
            let (_, headers, _) = b.get(&query).await;
            header(&headers, "cache-status").contains("; hit;")
        }
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn replicas_started_before_redis_share_within_seconds_of_its_start() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    redis.kill();
    let a = spawn_app_with(with_redis(&redis.url())).await;
    let b = a.spawn_replica(with_redis(&redis.url())).await;
    for i in 0..4 {
        assert_eq!(a.get(&format!("hashtag_name=early{i}")).await.0, 200);
    }
    redis.restart().await;
    let took = until_sharing(&a, &b, "late").await;
    println!(
        "started before Redis: sharing {:.2} s after Redis started",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(2),
        "sharing resumed after {took:?}"
    );
}

/// With no traffic no call fails, yet `/stats` must not keep saying "up":
/// the connection's own probes notice that Redis went away, and that it came back.
#[tokio::test]
async fn an_idle_replica_reports_redis_down_and_up_again() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let app = spawn_app_with(with_redis(&redis.url())).await;
    let reported = |up: bool, what: &'static str| {
        let app = &app;
        eventually(Duration::from_secs(10), what, move || async move {
            app.stats().await["redisTier"]["up"] == up
        })
    };
    reported(true, "Redis up").await;
    redis.kill();
    reported(false, "Redis reported down").await;
    redis.restart().await;
    reported(true, "Redis reported up again").await;
}

#[tokio::test]
async fn a_connection_that_stops_answering_is_replaced_within_seconds() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let relay = common::relay::SlowRelay::start(redis.port).await;
    let a = spawn_app_with(with_redis(&relay.redis_url())).await;
    let b = a.spawn_replica(with_redis(&relay.redis_url())).await;
    until_sharing(&a, &b, "before").await;
    // No reset, no answer: only a timeout can tell (the kernel would take
    // many minutes to give up on the connection).
    relay.stall_existing();
    let took = until_sharing(&a, &b, "after").await;
    println!(
        "silent connection: sharing {:.2} s after it stalled",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(5),
        "a new connection took over after {took:?}"
    );
}

#[tokio::test]
async fn a_garbage_value_under_our_key_is_a_miss() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let a = spawn_app_with(with_redis(&redis.url())).await;
    let mut conn = redis.connection().await;
    let entry_key = format!("keyapi-proxy:v1:entry:{KEY}");
    let _: () = conn
        .set(&entry_key, "{\"code\":0,\"data\":\"not ours\"}")
        .await
        .unwrap();
    let (status, headers, body) = a.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    assert_stored_miss(&headers);
    assert!(!body.contains("not ours"));
    assert_eq!(a.upstream.calls(), 1);
    let raw: Vec<u8> = conn.get(&entry_key).await.unwrap();
    assert!(raw.starts_with(b"KAPE"), "replaced by a valid entry");
}

#[tokio::test]
async fn a_snapshot_carries_the_cache_across_a_restart() {
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cache.snap");
    let with_snapshot = |c: &mut Config| c.cache.snapshot_path = Some(path.clone());

    let clock = manual_clock();
    let mut first = spawn_app_with_clock(clock.clone(), with_snapshot).await;
    let (_, _, body) = first.get("hashtag_name=ufc324").await;
    // Time passes across the restart: the restored Age counts from the original store.
    clock.advance(Duration::from_secs(5));
    first.begin_shutdown().await.unwrap();
    assert!(path.exists(), "written on graceful shutdown");

    let second = first
        .spawn_replica_with_clock(clock.clone(), with_snapshot)
        .await;
    let (status, headers, restored) = second.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    assert_hit(&headers);
    assert_eq!(header(&headers, "age"), "5", "original Age kept");
    assert_eq!(restored, body);
    assert_eq!(second.upstream.calls(), 1, "the restart spent nothing");

    // A damaged snapshot is skipped, not fatal.
    std::fs::write(&path, b"KAPSNAP1\xff\xff\xff\xffgarbage").unwrap();
    let third = first.spawn_replica_with_clock(clock, with_snapshot).await;
    let (status, headers, _) = third.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    assert_stored_miss(&headers);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_admin_purge_reaches_every_replica() {
    let with_admin = |c: &mut Config| {
        let mut ops = client("ops", "kp_ops");
        ops.admin = true;
        c.clients = vec![ops, client("user", "kp_user")];
    };
    let Some(Cluster { redis, a, b, .. }) = Cluster::start(with_admin).await else {
        return;
    };
    let get = |app: &common::TestApp| {
        app.hashtag_request(reqwest::Method::GET, "hashtag_name=ufc324")
            .bearer_auth("kp_user")
            .send()
    };
    get(&a).await.unwrap();
    let old_body = get(&b).await.unwrap().text().await.unwrap();
    assert_eq!(a.upstream.calls(), 1);
    // Both replicas follow purges on a pub/sub channel; wait until they listen.
    let conn = redis.connection().await;
    eventually(WITHIN, "both replicas subscribe to purges", || {
        let mut conn = conn.clone();
        async move {
            let (_, listeners): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("keyapi-proxy:v1:purge")
                .query_async(&mut conn)
                .await
                .unwrap();
            listeners >= 2
        }
    })
    .await;
    let mut conn = conn;

    let purge = |query: &'static str| {
        a.client
            .delete(a.url(&format!("/admin/cache{query}")))
            .bearer_auth("kp_ops")
            .send()
    };
    assert_eq!(purge("?hashtag_name=ufc324").await.unwrap().status(), 200);
    let exists: bool = conn
        .exists(format!("keyapi-proxy:v1:entry:{KEY}"))
        .await
        .unwrap();
    assert!(!exists, "gone from Redis too");
    // B dropped its memory copy too (the message arrives asynchronously).
    eventually(WITHIN, "the purge reached B's memory", || async {
        get(&b).await.unwrap().text().await.unwrap() != old_body
    })
    .await;
    // A refills from the entry B just stored in Redis, not from KeyAPI.
    assert_hit(get(&a).await.unwrap().headers());
    assert_eq!(a.upstream.calls(), 2, "one refetch for the cluster");

    assert_eq!(purge("?all=true").await.unwrap().status(), 200);
    let keys: Vec<String> = conn.keys("keyapi-proxy:v1:entry:*").await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn credit_budgets_hold_across_replicas() {
    // 4 credits a day = two upstream calls for the whole cluster.
    let Some(cluster) = Cluster::start(|c| c.credits.daily_budget = 4).await else {
        return;
    };
    let Cluster { a, b, .. } = &cluster;
    assert_eq!(a.get("hashtag_name=one").await.0, 200);
    assert_eq!(b.get("hashtag_name=two").await.0, 200);
    // Each replica alone has spent only 2 of 4; together the budget is gone.
    let (status, headers, body) = a.get("hashtag_name=three").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("budget"), "{body}");
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(a.upstream.calls(), 2);
    // Hits are still served by either replica.
    assert_eq!(b.get("hashtag_name=one").await.0, 200);
    let stats = a.client.get(a.url("/stats")).send().await.unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats.text().await.unwrap()).unwrap();
    assert_eq!(stats["creditsSpentToday"], 4, "{stats}");
}

#[tokio::test]
async fn rate_limits_hold_across_replicas() {
    // Two requests a minute (burst 2) for the whole cluster.
    let limited = |c: &mut Config| {
        c.rate_limit.per_minute = 2;
        c.rate_limit.burst = 2;
    };
    let Some(cluster) = Cluster::start(limited).await else {
        return;
    };
    let Cluster { a, b, .. } = &cluster;
    assert_eq!(a.get("hashtag_name=one").await.0, 200);
    assert_eq!(b.get("hashtag_name=one").await.0, 200);
    // Each replica alone has seen one request; together the burst is used up.
    let (status, headers, body) = a.get("hashtag_name=one").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate limit"), "{body}");
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
}

#[tokio::test]
async fn a_refusal_after_a_stale_success_is_paid_once_for_the_cluster() {
    let (ttl, negative_ttl) = (Duration::from_secs(600), Duration::from_secs(60));
    let config = |c: &mut Config| {
        c.cache.ttl = ttl;
        c.cache.stale_while_revalidate = Duration::ZERO;
        c.cache.negative_ttl = negative_ttl;
        c.upstream.retries = 0;
    };
    let Some(Cluster { redis, clock, a, b }) = Cluster::start(config).await else {
        return;
    };
    let (_, _, good) = a.get("hashtag_name=ufc324").await;
    assert_hit(&b.get("hashtag_name=ufc324").await.1);
    clock.advance(ttl + Duration::from_secs(1));

    a.upstream.set_mode(FakeMode::Status(404));
    assert_eq!(a.get("hashtag_name=ufc324").await.0, 404);
    for replica in [&a, &b, &a, &b, &b] {
        let (status, headers, _) = replica.get("hashtag_name=ufc324").await;
        assert_eq!(status, 404);
        let cache_status = header(&headers, "cache-status");
        assert!(cache_status.ends_with("detail=negative"), "{cache_status}");
    }
    assert_eq!(
        a.upstream.calls(),
        2,
        "the refusal was paid once, cluster-wide"
    );
    let mut conn = redis.connection().await;
    let raw: Vec<u8> = conn
        .get(format!("keyapi-proxy:v1:entry:{KEY}"))
        .await
        .unwrap();
    let shared = codec::decode(&bytes::Bytes::from(raw)).unwrap();
    assert!(shared.negative && shared.kept().is_some_and(|kept| !kept.negative));

    // The refusal over, each replica's stale copy answers for a failing KeyAPI.
    clock.advance(negative_ttl);
    a.upstream.set_mode(FakeMode::Status(500));
    for replica in [&a, &b] {
        let (status, headers, body) = replica.get("hashtag_name=ufc324").await;
        assert_eq!((status, &body), (200, &good));
        assert!(header(&headers, "cache-status").ends_with("detail=stale-if-error"));
    }
    assert_ledger_equals_bill(&[&a, &b]).await;
}

#[tokio::test]
async fn poisoned_redis_entries_are_never_served_and_are_counted() {
    let max_body_bytes = 64 * 1024;
    let config = |c: &mut Config| c.upstream.max_body_bytes = max_body_bytes;
    let Some(Cluster { redis, a, b, .. }) = Cluster::start(config).await else {
        return;
    };
    let conn = redis.connection().await;
    let write = |name: &str, entry: &RawEntry| {
        let (key, value) = (
            format!("keyapi-proxy:v1:entry:{}", hashtag_key(name)),
            entry.encode(),
        );
        let mut conn = conn.clone();
        async move { conn.set::<_, _, ()>(key, value).await.unwrap() }
    };
    // Laid out by hand, a good entry is served: the layout is the codec's.
    write("good", &RawEntry::success("written by hand")).await;
    let (status, headers, body) = b.get("hashtag_name=good").await;
    assert_eq!(status, 200);
    assert_hit(&headers);
    assert!(body.contains("written by hand"), "{body}");
    assert_eq!(a.upstream.calls(), 0);

    let poison = poisoned(TEST_API_KEY, max_body_bytes);
    for (i, (_, entry)) in poison.iter().enumerate() {
        write(&format!("p{i}"), entry).await;
    }
    for (i, (reason, _)) in poison.iter().enumerate() {
        let replica = if i % 2 == 0 { &a } else { &b };
        let (status, headers, body) = replica.get(&format!("hashtag_name=p{i}")).await;
        assert_eq!(status, 200, "{reason}");
        assert_eq!(
            header(&headers, "cache-status"),
            "keyapi-proxy; fwd=uri-miss; stored",
            "{reason}"
        );
        assert!(!body.contains("poison"), "{reason}: {body}");
    }
    assert_eq!(
        a.upstream.calls(),
        poison.len(),
        "each poisoned key was fetched"
    );
    let (text_a, text_b) = (a.metrics().await, b.metrics().await);
    for (reason, _) in &poison {
        let series = format!(
            "keyapi_proxy_cache_entries_rejected_total{{source=\"redis\",reason=\"{reason}\"}}"
        );
        let rejected = metric(&text_a, &series) + metric(&text_b, &series);
        assert!(rejected >= 1.0, "{series} = {rejected}");
    }
}
