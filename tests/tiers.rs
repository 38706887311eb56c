//! Scale-out and restarts: a Redis tier shared by replicas (one upstream call
//! per question across the cluster, a cluster-wide fetch lock, Redis faults
//! invisible to clients) and the snapshot that survives a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use common::{
    TEST_API_KEY, assert_ledger_equals_bill, client,
    entries::{RawEntry, hashtag_key, poisoned},
    header, join, metric,
    redis_server::{RedisServer, with_redis},
    spawn_app_with, spawn_app_with_clock,
};
use keyapi_proxy::{cache::codec, clock::ManualClock, config::Config, demo::FakeMode};
use redis::AsyncCommands;

const KEY: &str =
    "/v1/tiktok/trending/hashtag/detail?period=7&region=all_regions&hashtag_name=ufc324";

#[tokio::test]
async fn two_replicas_pay_once_for_200_concurrent_cold_requests() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let a = spawn_app_with(with_redis(&redis.url())).await;
    let b = a.spawn_replica(with_redis(&redis.url())).await;
    a.upstream.hold();
    let handles = (0..200)
        .map(|i| {
            let replica = if i % 2 == 0 { &a } else { &b };
            replica.spawn_get_hashtag("hashtag_name=ufc324")
        })
        .collect();
    a.upstream.wait_for_calls(1).await;
    a.upstream.release();
    let results = join(handles).await;
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
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let a = spawn_app_with(with_redis(&redis.url())).await;
    let b = a.spawn_replica(with_redis(&redis.url())).await;
    let (_, stored, body_a) = a.get("hashtag_name=ufc324").await;
    assert_eq!(
        header(&stored, "cache-status"),
        "keyapi-proxy; fwd=uri-miss; stored"
    );
    let (status, hit, body_b) = b.get("hashtag_name=%23UFC324").await;
    assert_eq!(status, 200);
    assert!(header(&hit, "cache-status").starts_with("keyapi-proxy; hit; ttl="));
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
    assert_eq!(
        header(&headers, "cache-status"),
        "keyapi-proxy; fwd=uri-miss; stored"
    );
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
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let a = spawn_app_with(with_redis(&redis.url())).await;
    let b = a.spawn_replica(with_redis(&redis.url())).await;
    a.get("hashtag_name=before").await;
    assert!(
        b.get("hashtag_name=before").await.1["cache-status"]
            .to_str()
            .unwrap()
            .contains("; hit;")
    );

    redis.kill();
    for i in 0..20 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let (status, _, body) = replica.get(&format!("hashtag_name=down{i}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("\"hashtag_name\":\"down{i}\"")));
    }
    assert!(!a.state.proxy().redis().unwrap().is_up());
    let errors = metric(&a.metrics().await, "keyapi_proxy_redis_errors_total");
    assert!(errors >= 1.0, "Redis failures are counted: {errors}");
    for path in ["/readyz", "/healthz"] {
        let ready = a.client.get(a.url(path)).send().await.unwrap();
        assert_eq!(ready.status(), 200, "{path} stays OK without Redis");
    }
    let stats = a.client.get(a.url("/stats")).send().await.unwrap();
    assert!(stats.text().await.unwrap().contains("\"redis\":\"down\""));

    redis.restart().await;
    // The replicas reconnect in the background; poll the observable outcome.
    let mut shared = false;
    for i in 0..100 {
        let query = format!("hashtag_name=after{i}");
        a.get(&query).await;
        let (_, headers, _) = b.get(&query).await;
        if header(&headers, "cache-status").contains("; hit;") {
            shared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(shared, "sharing resumed after Redis came back");
    assert!(a.state.proxy().redis().unwrap().is_up());
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
    assert_eq!(
        header(&headers, "cache-status"),
        "keyapi-proxy; fwd=uri-miss; stored"
    );
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

    let mut first = spawn_app_with(with_snapshot).await;
    let (_, _, body) = first.get("hashtag_name=ufc324").await;
    // Let a whole second pass so the restored Age is visibly the original one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    first.begin_shutdown().await.unwrap();
    assert!(path.exists(), "written on graceful shutdown");

    let second = first.spawn_replica(with_snapshot).await;
    let (status, headers, restored) = second.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    assert!(header(&headers, "cache-status").contains("; hit;"));
    assert!(
        header(&headers, "age").parse::<u64>().unwrap() >= 1,
        "original Age kept"
    );
    assert_eq!(restored, body);
    assert_eq!(second.upstream.calls(), 1, "the restart spent nothing");

    // A damaged snapshot is skipped, not fatal.
    std::fs::write(&path, b"KAPSNAP1\xff\xff\xff\xffgarbage").unwrap();
    let third = first.spawn_replica(with_snapshot).await;
    let (status, headers, _) = third.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "cache-status"),
        "keyapi-proxy; fwd=uri-miss; stored"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_admin_purge_reaches_every_replica() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let with_admin = |c: &mut Config| {
        with_redis(&redis.url())(c);
        let mut ops = client("ops", "kp_ops");
        ops.admin = true;
        c.clients = vec![ops, client("user", "kp_user")];
    };
    let a = spawn_app_with(with_admin).await;
    let b = a.spawn_replica(with_admin).await;
    let get = |app: &common::TestApp| {
        app.hashtag_request(reqwest::Method::GET, "hashtag_name=ufc324")
            .bearer_auth("kp_user")
            .send()
    };
    get(&a).await.unwrap();
    let old_body = get(&b).await.unwrap().text().await.unwrap();
    assert_eq!(a.upstream.calls(), 1);
    // Both replicas follow purges on a pub/sub channel; wait until they listen.
    let mut conn = redis.connection().await;
    for _ in 0..200 {
        let (_, listeners): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("keyapi-proxy:v1:purge")
            .query_async(&mut conn)
            .await
            .unwrap();
        if listeners >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

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
    let mut refreshed = false;
    for _ in 0..100 {
        if get(&b).await.unwrap().text().await.unwrap() != old_body {
            refreshed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refreshed, "the purge reached B's memory");
    // A refills from the entry B just stored in Redis, not from KeyAPI.
    let response = get(&a).await.unwrap();
    let cache_status = header(response.headers(), "cache-status").to_owned();
    assert!(cache_status.contains("; hit;"), "{cache_status}");
    assert_eq!(a.upstream.calls(), 2, "one refetch for the cluster");

    assert_eq!(purge("?all=true").await.unwrap().status(), 200);
    let keys: Vec<String> = conn.keys("keyapi-proxy:v1:entry:*").await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn credit_budgets_hold_across_replicas() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    // 4 credits a day = two upstream calls for the whole cluster.
    let budget = |c: &mut Config| {
        with_redis(&redis.url())(c);
        c.credits.daily_budget = 4;
    };
    let a = spawn_app_with(budget).await;
    let b = a.spawn_replica(budget).await;
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
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    // Two requests a minute (burst 2) for the whole cluster.
    let limited = |c: &mut Config| {
        with_redis(&redis.url())(c);
        c.rate_limit.per_minute = 2;
        c.rate_limit.burst = 2;
    };
    let a = spawn_app_with(limited).await;
    let b = a.spawn_replica(limited).await;
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
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (ttl, negative_ttl) = (Duration::from_secs(600), Duration::from_secs(60));
    let config = |c: &mut Config| {
        with_redis(&redis.url())(c);
        c.cache.ttl = ttl;
        c.cache.stale_while_revalidate = Duration::ZERO;
        c.cache.negative_ttl = negative_ttl;
        c.upstream.retries = 0;
    };
    // One clock for the cluster, moved by hand.
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let a = spawn_app_with_clock(clock.clone(), config).await;
    let b = a.spawn_replica_with_clock(clock.clone(), config).await;
    let (_, _, good) = a.get("hashtag_name=ufc324").await;
    assert!(header(&b.get("hashtag_name=ufc324").await.1, "cache-status").contains("; hit; "));
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
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let max_body_bytes = 64 * 1024;
    let config = |c: &mut Config| {
        with_redis(&redis.url())(c);
        c.upstream.max_body_bytes = max_body_bytes;
    };
    let a = spawn_app_with(config).await;
    let b = a.spawn_replica(config).await;
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
    assert!(header(&headers, "cache-status").contains("; hit; "));
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
