//! The ledger equals the bill: for any traffic, `credits_spent_total` is the
//! price times the calls the fake KeyAPI received, and every budget moved by
//! exactly what its calls cost. Each scenario of the ledger issue ends with
//! that check; the last test mixes them at random (its seed is printed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{
    TestApp, assert_hit, assert_ledger_equals_bill, assert_stored_miss, booked, client,
    cluster::Cluster,
    entries::hashtag_key,
    hang_up, hashtag_path, header, join, let_expire, manual_clock, metric, parts, raw_request,
    raw_request_as,
    redis_server::{RedisServer, until_redis_answers, with_redis},
    relay::SlowRelay,
    spawn_app_with, spawn_app_with_clock, stampede,
    tokens::{HsSecret, claims, hs256_issuer},
    visitors,
};
use keyapi_proxy::{
    cache::codec,
    clock::{self, Clock as _, ManualClock},
    config::Config,
    demo::FakeMode,
};
use redis::AsyncCommands as _;

const TOKEN: &str = "kp_ledger_dash";

/// The global budget's count of today, read from the ledger itself (`/stats`
/// shows the same, recomputed at most once a second).
async fn global_spent_today(app: &TestApp) -> u64 {
    let ledger = app.state.proxy().ledger();
    ledger.spent_today(ledger.global().unwrap()).await
}

/// Redis's replies, when the relay makes them late, come after every timeout
/// [`behind_relay`] sets; Redis still applies each command on time.
const SLOW: Duration = Duration::from_millis(600);

/// The Redis tier through `relay`, with short timeouts (money operations
/// 250 ms) so that a [`SLOW`] Redis misses them all.
fn behind_relay(c: &mut Config, relay: &SlowRelay) {
    with_redis(&relay.redis_url())(c);
    c.cache.redis.op_timeout = Duration::from_millis(100);
    c.cache.redis.ledger_timeout = Duration::from_millis(250);
}

/// A budget's counter of today as Redis holds it (0 when absent).
async fn redis_count(redis: &RedisServer, name: &str) -> i64 {
    redis_count_on(redis, name, clock::utc_day(SystemTime::now())).await
}

/// A budget's counter of UTC day `day` as Redis holds it (0 when absent).
async fn redis_count_on(redis: &RedisServer, name: &str, day: u64) -> i64 {
    let mut conn = redis.connection().await;
    let count: Option<i64> = conn
        .get(format!("keyapi-proxy:v1:count:{name}:{day}"))
        .await
        .unwrap();
    count.unwrap_or(0)
}

/// Lets each of `apps` send Redis the money operations it holds (each look
/// at a budget sends them first) until Redis has confirmed them all; the
/// first tries may still meet replies delayed before Redis turned fast.
async fn until_redis_confirms(apps: &[&TestApp]) {
    for app in apps {
        until_redis_answers(app).await;
    }
    for _ in 0..20 {
        for app in apps {
            global_spent_today(app).await;
        }
        if apps
            .iter()
            .all(|app| app.state.proxy().ledger().awaiting_redis() == 0)
        {
            return;
        }
    }
    panic!("Redis never confirmed the ledger's pending operations");
}

/// Asserts that each budget's counter in Redis holds exactly `credits`.
async fn assert_redis_budgets(redis: &RedisServer, names: &[&str], credits: u64) {
    for name in names {
        assert_eq!(
            redis_count(redis, name).await,
            i64::try_from(credits).unwrap(),
            "budget {name} in Redis = price x calls KeyAPI received"
        );
    }
}

/// A budget to watch, and one upstream call at a time with a queue of
/// `queue_timeout` for the rest.
fn one_upstream_slot(c: &mut Config, queue_timeout: Duration) {
    c.credits.daily_budget = 1000;
    c.upstream.max_in_flight = 1;
    c.upstream.queue_timeout = queue_timeout;
}

/// Short TTL with a long stale-if-error window; single attempts.
fn short_ttl(c: &mut Config, ttl: Duration) {
    c.cache.ttl = ttl;
    c.cache.stale_while_revalidate = Duration::ZERO;
    c.cache.stale_if_error = Duration::from_secs(3600);
    c.upstream.retries = 0;
}

#[tokio::test]
async fn a_disconnect_storm_of_cold_requests_costs_only_the_calls_made() {
    let app = spawn_app_with(|c| c.credits.daily_budget = 1000).await;
    app.upstream.set_latency(Duration::from_millis(30));
    let mut storm = Vec::new();
    for i in 0..40u64 {
        // Each client hangs up 10-50 ms after sending a cold question.
        let request = app
            .hashtag_request(reqwest::Method::GET, &format!("hashtag_name=storm{i}"))
            .timeout(Duration::from_millis(10 + i % 5 * 10));
        storm.push(tokio::spawn(request.send()));
    }
    for request in storm {
        let _ = request.await.unwrap();
    }
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    assert!(calls <= 40);
    assert_eq!(
        global_spent_today(&app).await,
        credits,
        "the budget moved as the bill"
    );
    // The budget was not drained for nothing: new questions are still answered.
    app.upstream.set_latency(Duration::ZERO);
    assert_eq!(app.get("hashtag_name=after").await.0, 200);
}

#[tokio::test]
async fn a_queued_call_is_not_paid_for_a_client_that_has_gone() {
    let app = spawn_app_with(|c| {
        one_upstream_slot(c, Duration::from_secs(10));
        c.upstream.request_timeout = Duration::from_secs(10);
    })
    .await;
    app.upstream.hold();
    let first = app.spawn_get_hashtag("hashtag_name=first");
    app.upstream.wait_for_calls(1).await;
    // A second question queues for the one upstream slot, its credits
    // reserved, and its client leaves before the slot frees.
    let client = raw_request(&app, "hashtag_name=queued").await;
    let reserved = async {
        while global_spent_today(&app).await < 4 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reserved)
        .await
        .expect("the second fetch reserves its credits");
    hang_up(client).await;
    app.upstream.release();
    assert_eq!(first.await.unwrap().0, 200);
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 1, "the queued call is not made for nobody");
    assert_eq!(
        global_spent_today(&app).await,
        credits,
        "reservation given back"
    );

    // The fetch gave its key up: the next client's question is asked anew.
    assert_eq!(app.get("hashtag_name=queued").await.0, 200);
    assert_eq!(assert_ledger_equals_bill(&[&app]).await.0, 2);
}

#[tokio::test]
async fn our_own_refusals_cost_nothing() {
    let app = spawn_app_with(|c| one_upstream_slot(c, Duration::from_millis(20))).await;
    app.upstream.set_latency(Duration::from_millis(300));
    let handles = (0..40)
        .map(|i| app.spawn_get_hashtag(&format!("hashtag_name=burst{i}")))
        .collect();
    let results = join(handles).await;
    let refused = results.iter().filter(|(status, ..)| *status == 503).count();
    assert!(
        refused >= 30,
        "the cap refused most of the burst: {refused}"
    );
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls as usize, 40 - refused);
    assert_eq!(global_spent_today(&app).await, credits);
}

#[tokio::test]
async fn twenty_waiters_on_one_failing_call_pay_for_one_call() {
    let app = spawn_app_with(|c| {
        c.credits.daily_budget = 1000;
        c.upstream.breaker_failures = 1000;
    })
    .await;
    app.upstream.set_mode(FakeMode::Status(500));
    for (status, _, body) in
        stampede(&[&app], 20, |_| hashtag_path("hashtag_name=failing"), 1).await
    {
        assert_eq!(status, 502, "{body}");
    }
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(global_spent_today(&app).await, credits);
    assert!(calls <= 2, "waiters share the failed call: {calls}");
}

#[tokio::test]
async fn connection_refused_costs_nothing_and_keeps_the_budget() {
    // A port nobody listens on: KeyAPI is never reached.
    let (_held, closed) = common::refusing_addr();
    let app = spawn_app_with(|c| {
        c.upstream.base_url = format!("http://{closed}");
        c.upstream.retries = 1;
        c.upstream.breaker_failures = 1000;
        c.credits.daily_budget = 6;
    })
    .await;
    for i in 0..4 {
        let (status, _, body) = app.get(&format!("hashtag_name=refused{i}")).await;
        assert_eq!(status, 502, "unreachable, not out of budget: {body}");
    }
    assert_eq!(booked(&app), 0);
    assert_eq!(global_spent_today(&app).await, 0);
}

#[tokio::test]
async fn past_its_windows_an_entry_is_refetched_only_within_budget_then_served_stale() {
    let ttl = Duration::from_millis(300);
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        short_ttl(c, ttl);
        c.credits.daily_budget = 4;
    })
    .await;
    let (status, headers, first) = app.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    assert_stored_miss(&headers);
    let_expire(&clock, ttl);
    // Past the TTL (inside stale-if-error): refetched, and charged.
    let (_, headers, _) = app.get("hashtag_name=ufc324").await;
    assert_stored_miss(&headers);
    assert_eq!(global_spent_today(&app).await, 4);
    let_expire(&clock, ttl);
    // The budget cannot afford a third call: the stale copy answers.
    let (status, headers, stale) = app.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    let cache_status = header(&headers, "cache-status");
    assert!(
        cache_status.starts_with("keyapi-proxy; fwd=stale; ttl="),
        "{cache_status}"
    );
    assert!(cache_status.ends_with("; detail=budget"), "{cache_status}");
    assert_eq!(stale.len(), first.len());
    // A question with no stale copy is refused.
    assert_eq!(app.get("hashtag_name=other").await.0, 429);
    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 2);
    assert_eq!(global_spent_today(&app).await, 4);
    let ledger = app.state.proxy().ledger();
    assert_eq!(ledger.refused_today(ledger.global().unwrap()), 2);
}

#[tokio::test]
async fn background_refreshes_are_charged_to_the_global_budget_not_the_client() {
    let ttl = Duration::from_millis(1000);
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        let mut dash = client("dash", TOKEN);
        dash.daily_budget = Some(100);
        c.clients = vec![dash];
        c.credits.daily_budget = 100;
        c.cache.ttl = ttl;
        c.cache.stale_while_revalidate = Duration::from_secs(600);
        c.cache.refresh_ahead = 0.5;
        c.cache.refresh_ahead_min_hits = 1;
    })
    .await;
    let get = |query: &'static str| {
        let app = &app;
        async move { parts(app.get_hashtag_as(TOKEN, query).await).await }
    };
    assert_eq!(get("hashtag_name=ahead").await.0, 200);
    assert_eq!(get("hashtag_name=behind").await.0, 200);
    // Past half its TTL, a hit on a hot entry starts a refresh-ahead.
    clock.advance(ttl / 2);
    assert_hit(&get("hashtag_name=ahead").await.1);
    app.state.proxy().idle().await;
    // Past its TTL, an entry is served stale and revalidated in the background.
    let_expire(&clock, ttl / 2);
    let (_, headers, _) = get("hashtag_name=behind").await;
    assert!(header(&headers, "cache-status").ends_with("detail=stale-while-revalidate"));
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 4);
    let text = app.metrics().await;
    let by = |payer: &str| {
        metric(
            &text,
            &format!("keyapi_proxy_credits_spent_by_total{{payer=\"{payer}\"}}"),
        )
    };
    assert_eq!(
        (by("request"), by("refresh_ahead"), by("revalidate")),
        (4.0, 2.0, 2.0)
    );
    let stats = app.stats().await;
    assert_eq!(stats["creditsSpentToday"], credits, "{stats}");
    assert_eq!(stats["clients"][0]["creditsSpentToday"], 4, "{stats}");
    assert_eq!(stats["clients"][0]["creditsSpent"], 4, "{stats}");
}

#[tokio::test]
async fn a_budget_never_refuses_a_request_that_joins_another_fetch() {
    let app = spawn_app_with(|c| {
        let mut broke = client("broke", "kp_broke");
        broke.daily_budget = Some(1);
        c.clients = vec![broke, client("rich", TOKEN)];
    })
    .await;
    // "broke" cannot afford a call; "rich" can, and "broke" may join its fetch.
    app.upstream.hold();
    let rich = app
        .hashtag_request(reqwest::Method::GET, "hashtag_name=shared")
        .bearer_auth(TOKEN)
        .send();
    let rich = tokio::spawn(rich);
    app.upstream.wait_for_calls(1).await;
    let broke = app
        .hashtag_request(reqwest::Method::GET, "hashtag_name=shared")
        .bearer_auth("kp_broke")
        .send();
    let broke = tokio::spawn(broke);
    app.upstream.release();
    assert_eq!(rich.await.unwrap().unwrap().status(), 200);
    assert_eq!(broke.await.unwrap().unwrap().status(), 200);
    // Its own question is refused.
    let response = app.get_hashtag_as("kp_broke", "hashtag_name=own").await;
    assert_eq!(response.status(), 429);
    assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test]
async fn two_replicas_never_exceed_a_shared_budget_under_200_concurrent_cold_requests() {
    let Some(cluster) = Cluster::start(|c| c.credits.daily_budget = 20).await else {
        return;
    };
    let Cluster { a, b, .. } = &cluster;
    a.upstream.set_latency(Duration::from_millis(20));
    let handles = (0..200)
        .map(|i| {
            let replica = if i % 2 == 0 { &a } else { &b };
            replica.spawn_get_hashtag(&format!("hashtag_name=cold{i}"))
        })
        .collect();
    let results = join(handles).await;
    let answered = results.iter().filter(|(s, ..)| *s == 200).count();
    let refused = results.iter().filter(|(s, ..)| *s == 429).count();
    assert_eq!(answered + refused, 200);
    let (calls, credits) = assert_ledger_equals_bill(&[a, b]).await;
    assert_eq!(calls as usize, answered);
    assert!(
        credits <= 20,
        "real spend {credits} within the budget of 20"
    );
    assert_eq!(credits, 20, "and the budget was used");
    assert_eq!(global_spent_today(a).await, credits);
}

#[tokio::test]
async fn a_refusal_seen_by_one_replica_keeps_the_good_answer_and_is_paid_once() {
    let ttl = Duration::from_millis(300);
    let Some(Cluster { redis, clock, a, b }) = Cluster::start(|c| short_ttl(c, ttl)).await else {
        return;
    };
    assert_eq!(a.get("hashtag_name=ufc324").await.0, 200);
    let_expire(&clock, ttl);
    // KeyAPI now refuses the question; replica B asks first.
    a.upstream.set_mode(FakeMode::Status(404));
    assert_eq!(b.get("hashtag_name=ufc324").await.0, 404);
    let key = hashtag_key("ufc324");
    let mut conn = redis.connection().await;
    let raw: Vec<u8> = conn
        .get(format!("keyapi-proxy:v1:entry:{key}"))
        .await
        .unwrap();
    let shared = codec::decode(&bytes::Bytes::from(raw)).unwrap();
    assert!(shared.negative, "Redis remembers the refusal");
    assert!(
        shared.kept().is_some_and(|kept| !kept.negative),
        "and keeps the good answer with it"
    );
    // Replica A answers the refusal without paying, and keeps its good
    // (stale) copy for when the refusal is over.
    assert_eq!(a.get("hashtag_name=ufc324").await.0, 404);
    assert_eq!(
        a.upstream.calls(),
        2,
        "one call for the refusal, cluster-wide"
    );
    let held = a
        .state
        .proxy()
        .cache()
        .get(&key, a.state.clock().now())
        .unwrap();
    assert!(held.negative && held.kept().is_some_and(|kept| !kept.negative));
    assert_ledger_equals_bill(&[&a, &b]).await;
}

#[tokio::test]
async fn while_the_shared_ledger_is_down_replicas_spend_only_their_outage_allowance() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let strict = |c: &mut Config| {
        with_redis(&redis.url())(c);
        c.cache.redis.op_timeout = Duration::from_millis(200);
        c.credits.daily_budget = 100;
    };
    let a = spawn_app_with(strict).await;
    let b = a.spawn_replica(|c| {
        strict(c);
        c.credits.outage_allowance = 4;
    });
    let b = b.await;
    assert_eq!(a.get("hashtag_name=before").await.0, 200);
    redis.kill();
    // Cached answers still flow; new questions wait for the ledger.
    assert_eq!(a.get("hashtag_name=before").await.0, 200);
    let (status, headers, body) = a.get("hashtag_name=during").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("ledger"), "{body}");
    assert_eq!(header(&headers, "retry-after"), "5");
    // A replica with an allowance spends that much, no more.
    assert_eq!(b.get("hashtag_name=one").await.0, 200);
    assert_eq!(b.get("hashtag_name=two").await.0, 200);
    assert_eq!(b.get("hashtag_name=three").await.0, 503);
    redis.restart().await;
    until_redis_answers(&b).await;
    // Its outage spend is added to the shared count once Redis answers again.
    let mut spent = 0;
    for _ in 0..20 {
        spent = global_spent_today(&b).await;
        if spent == 4 {
            break;
        }
    }
    assert_eq!(spent, 4, "outage spend recorded in Redis");
    assert_ledger_equals_bill(&[&a, &b]).await;
}

#[tokio::test]
async fn with_redis_slower_than_the_ledger_timeout_each_budget_moves_once_per_call() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let relay = SlowRelay::start(redis.port).await;
    let config = |c: &mut Config, outage_allowance: u64| {
        behind_relay(c, &relay);
        one_upstream_slot(c, Duration::from_secs(10));
        c.upstream.request_timeout = Duration::from_secs(10);
        c.credits.outage_allowance = outage_allowance;
        let mut dash = client("dash", TOKEN);
        dash.daily_budget = Some(100);
        c.clients = vec![dash];
    };
    let a = spawn_app_with(|c| config(c, 0)).await;
    let b = a.spawn_replica(|c| config(c, 4)).await;
    let get = |app: &TestApp, query: String| {
        let request = app
            .hashtag_request(reqwest::Method::GET, &format!("hashtag_name={query}"))
            .bearer_auth(TOKEN);
        async move { parts(request.send().await.unwrap()).await }
    };
    assert_eq!(get(&a, "fast_a".into()).await.0, 200);
    assert_eq!(get(&b, "fast_b".into()).await.0, 200);

    // Redis applies every charge and cancellation at once; its replies come
    // after the ledger timeout.
    relay.set_delay(SLOW);
    for i in 0..2 {
        let (status, headers, body) = get(&a, format!("slow_a{i}")).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("ledger"), "{body}");
        assert_eq!(header(&headers, "retry-after"), "5");
    }
    // B spends its outage allowance (two calls), then refuses too.
    assert_eq!(get(&b, "slow_b0".into()).await.0, 200);
    assert_eq!(get(&b, "slow_b1".into()).await.0, 200);
    assert_eq!(get(&b, "slow_b2".into()).await.0, 503);
    relay.set_delay(Duration::ZERO);
    until_redis_confirms(&[&a, &b]).await;
    let (calls, credits) = assert_ledger_equals_bill(&[&a, &b]).await;
    assert_eq!(calls, 4, "the 503s made no call");
    // Charges whose replies were late were cancelled by their ids, and B's
    // outage spend was recorded once: the refusals left nothing behind.
    assert_redis_budgets(&redis, &["global", "client:dash"], credits).await;

    // A charge taken while Redis is fast is given back while it is slow: the
    // refund is applied at once, confirmed late, and sent again by its id.
    a.upstream.hold();
    let first = tokio::spawn(get(&a, "first".into()));
    a.upstream.wait_for_calls(5).await;
    let queued = raw_request_as(&a, TOKEN, "hashtag_name=queued").await;
    let global = a.state.proxy().ledger().global().unwrap();
    let reserved = async {
        while global.reserved() < 4 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reserved)
        .await
        .expect("the queued call reserves its credits");
    let stats = a.stats().await;
    assert_eq!(stats["creditsReserved"], 4, "{stats}");
    assert_eq!(stats["creditsSpentToday"], credits, "{stats}");
    relay.set_delay(SLOW);
    hang_up(queued).await;
    a.upstream.release();
    assert_eq!(first.await.unwrap().0, 200);
    a.state.proxy().idle().await;
    assert!(
        a.state.proxy().ledger().awaiting_redis() > 0,
        "the refund awaits Redis"
    );
    relay.set_delay(Duration::ZERO);
    until_redis_confirms(&[&a, &b]).await;
    let (calls, credits) = assert_ledger_equals_bill(&[&a, &b]).await;
    assert_eq!(calls, 5, "the queued call is not made for nobody");
    assert_redis_budgets(&redis, &["global", "client:dash"], credits).await;
    eprintln!(
        "slow Redis ({SLOW:?} per reply, ledger timeout 250 ms): {calls} calls KeyAPI received, \
         credits_spent_total {credits}, Redis budgets global {} and client:dash {}",
        redis_count(&redis, "global").await,
        redis_count(&redis, "client:dash").await
    );
}

#[tokio::test]
async fn outage_spend_on_both_sides_of_midnight_reaches_each_days_counter() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let day = 24 * 3600;
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(20_000 * day - 1),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| {
        with_redis(&redis.url())(c);
        c.cache.redis.op_timeout = Duration::from_millis(200);
        c.credits.daily_budget = 100;
        c.credits.outage_allowance = 4;
    })
    .await;
    assert_eq!(app.get("hashtag_name=before").await.0, 200);
    redis.kill();
    // One outage call on the last second of day 19,999, two on day 20,000
    // (the allowance is per day).
    assert_eq!(app.get("hashtag_name=late").await.0, 200);
    clock.advance(Duration::from_secs(1));
    assert_eq!(app.get("hashtag_name=early").await.0, 200);
    assert_eq!(app.get("hashtag_name=early2").await.0, 200);
    assert_eq!(app.get("hashtag_name=early3").await.0, 503);
    redis.restart().await;
    until_redis_confirms(&[&app]).await;
    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 4);
    // Each day's debt reached that day's counter; neither was dropped (the
    // restarted Redis keeps no data, so the call before the outage is gone).
    assert_eq!(redis_count_on(&redis, "global", 19_999).await, 2);
    assert_eq!(redis_count_on(&redis, "global", 20_000).await, 4);
    assert_eq!(global_spent_today(&app).await, 4);
}

#[tokio::test]
async fn a_refresh_in_flight_at_sigterm_is_stored_in_the_snapshot_and_paid_once() {
    let dir = std::env::temp_dir().join(format!("keyapi-ledger-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cache.snap");
    let ttl = Duration::from_millis(500);
    let config = |c: &mut Config| {
        c.cache.snapshot_path = Some(path.clone());
        c.cache.ttl = ttl;
        c.cache.stale_while_revalidate = Duration::from_secs(600);
    };
    let clock = manual_clock();
    let mut first = spawn_app_with_clock(clock.clone(), config).await;
    assert_eq!(first.get("hashtag_name=ufc324").await.0, 200);
    let_expire(&clock, ttl);
    // KeyAPI takes its time over the refresh.
    first.upstream.set_latency(Duration::from_millis(300));
    let (_, headers, _) = first.get("hashtag_name=ufc324").await;
    assert!(header(&headers, "cache-status").ends_with("detail=stale-while-revalidate"));
    first.upstream.wait_for_calls(2).await;
    // SIGTERM while KeyAPI is working on the refresh.
    first.begin_shutdown().await.unwrap();
    assert_ledger_equals_bill(&[&first]).await;

    let second = first.spawn_replica_with_clock(clock, config).await;
    let (status, headers, _) = second.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    let cache_status = header(&headers, "cache-status");
    assert!(
        cache_status.contains("; hit;") && !cache_status.contains("stale"),
        "the refreshed answer survived the restart: {cache_status}"
    );
    second.state.proxy().idle().await;
    assert_eq!(second.upstream.calls(), 2, "the refresh was paid once");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Faults, disconnects, concurrency, budgets and background refreshes mixed
/// at random. `LEDGER_SEED=<n>` replays a run.
#[tokio::test]
async fn the_ledger_equals_the_bill_for_random_traffic() {
    random_traffic(None).await;
}

/// The same, with the budgets in a Redis whose replies are late at random:
/// on time, slower than the cache's op timeout, or slower than the ledger's.
#[tokio::test]
async fn the_ledger_equals_the_bill_for_random_traffic_with_a_slow_redis() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    random_traffic(Some(&redis)).await;
}

/// Credits one replica may spend per budget and day while the slow Redis
/// does not answer in time (in the randomized test).
const RANDOM_OUTAGE_ALLOWANCE: u64 = 4;

/// Freshness directives a third of the random requests carry.
const RANDOM_DIRECTIVES: [&str; 6] = [
    "only-if-cached",
    "no-cache",
    "max-age=0",
    "min-fresh=1",
    "max-stale",
    "max-stale=0, only-if-cached",
];

/// Subjects of the signed visitor tokens in the randomized test, and the
/// budget each may spend per day.
const RANDOM_SUBJECTS: [&str; 2] = ["subject-x", "subject-y"];
const RANDOM_SUBJECT_BUDGET: u64 = 10;

/// Visitors (no token, by `X-Forwarded-For` in mixed mode) in the randomized
/// test, and the budget each may spend per day.
const RANDOM_VISITORS: [&str; 2] = ["198.51.100.1", "2001:db8:7::1"];
const RANDOM_VISITOR_BUDGET: u64 = 8;

/// Random rounds of traffic from clients, token subjects and visitors, then the ledger
/// checked against the bill and every budget (in `redis` too, reached
/// through a relay, when given).
async fn random_traffic(redis: Option<&RedisServer>) {
    let seed = std::env::var("LEDGER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("ledger randomized test: LEDGER_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let relay = match redis {
        Some(redis) => Some(SlowRelay::start(redis.port).await),
        None => None,
    };
    let secret = HsSecret::new("a-32-byte-secret-for-the-ledger!!");
    // Entries age, and stale windows open and close, by this clock.
    let clock = manual_clock();
    let jwts = RANDOM_SUBJECTS.map(|sub| secret.mint(&claims(sub, clock.now())));
    let tokens = [
        "kp_rand_a",
        "kp_rand_b",
        "kp_rand_c",
        jwts[0].as_str(),
        jwts[1].as_str(),
    ];
    let app = spawn_app_with_clock(clock.clone(), |c| {
        let mut issuer = hs256_issuer(&secret);
        issuer.daily_budget = Some(RANDOM_SUBJECT_BUDGET);
        c.issuers = vec![issuer];
        let mut a = client("a", tokens[0]);
        a.daily_budget = Some(12);
        let mut b = client("b", tokens[1]);
        b.daily_budget = Some(1000);
        // c may refresh: its no-cache and max-age refetch fresh copies.
        let mut refresher = client("c", tokens[2]);
        refresher.refresh = true;
        c.clients = vec![a, b, refresher];
        visitors(c, RANDOM_VISITOR_BUDGET);
        c.visitors.allow = true;
        c.credits.daily_budget = 60;
        c.cache.ttl = Duration::from_millis(250);
        c.cache.stale_while_revalidate = Duration::from_millis(150);
        c.cache.stale_if_error = Duration::from_secs(60);
        c.cache.refresh_ahead = 0.5;
        c.cache.refresh_ahead_min_hits = 1;
        c.upstream.retries = 1;
        c.upstream.retry_backoff = Duration::from_millis(5);
        c.upstream.request_timeout = Duration::from_millis(300);
        c.upstream.max_in_flight = 3;
        c.upstream.queue_timeout = Duration::from_millis(40);
        c.upstream.breaker_failures = 1000;
        if let Some(relay) = &relay {
            behind_relay(c, relay);
            c.credits.outage_allowance = RANDOM_OUTAGE_ALLOWANCE;
        }
    })
    .await;
    let modes = [
        FakeMode::Normal,
        FakeMode::Normal,
        FakeMode::Normal,
        FakeMode::Status(500),
        FakeMode::Status(503),
        FakeMode::Status(404),
        FakeMode::Garbage,
        FakeMode::Hang,
    ];
    // On time (twice as likely), past the cache's op timeout, past the ledger's.
    let redis_delays = [
        Duration::ZERO,
        Duration::ZERO,
        Duration::from_millis(150),
        SLOW,
    ];
    for round in 0..8 {
        app.upstream
            .script((0..rng.usize(0..8)).map(|_| modes[rng.usize(..modes.len())].clone()));
        app.upstream
            .set_latency(Duration::from_millis(rng.u64(0..40)));
        if let Some(relay) = &relay {
            // At least one round past every timeout.
            let delay = match round {
                1 => SLOW,
                _ => redis_delays[rng.usize(..redis_delays.len())],
            };
            relay.set_delay(delay);
        }
        let mut round = Vec::new();
        for _ in 0..rng.usize(10..40) {
            let caller = rng.usize(..tokens.len() + RANDOM_VISITORS.len());
            let query = format!("hashtag_name=k{}&period=30", rng.u8(0..10));
            let request = app.hashtag_request(reqwest::Method::GET, &query);
            let mut request = match tokens.get(caller) {
                Some(token) => request.bearer_auth(token),
                None => request.header("X-Forwarded-For", RANDOM_VISITORS[caller - tokens.len()]),
            };
            if rng.u8(..3) == 0 {
                let directives = RANDOM_DIRECTIVES[rng.usize(..RANDOM_DIRECTIVES.len())];
                request = request.header("Cache-Control", directives);
            }
            if rng.bool() {
                // This client hangs up early.
                request = request.timeout(Duration::from_millis(rng.u64(5..80)));
            }
            round.push(tokio::spawn(request.send()));
        }
        for request in round {
            if let Ok(response) = request.await.unwrap() {
                assert!(
                    [200, 404, 429, 502, 503, 504].contains(&response.status().as_u16()),
                    "{}",
                    response.status()
                );
            }
        }
        clock.advance(Duration::from_millis(rng.u64(0..300)));
    }
    // The outage allowance may be spent on top of a budget while Redis is slow.
    let mut allowance = 0;
    if let Some(relay) = &relay {
        relay.set_delay(Duration::ZERO);
        app.state.proxy().idle().await;
        until_redis_confirms(&[&app]).await;
        allowance = RANDOM_OUTAGE_ALLOWANCE;
    }
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    let stats = app.stats().await;
    assert_eq!(
        stats["creditsSpentToday"], credits,
        "global budget: {stats}"
    );
    assert!(
        credits <= 60 + allowance,
        "real spend within the global budget"
    );
    let mut by_clients = 0;
    for client in stats["clients"].as_array().unwrap() {
        let charged = client["creditsSpent"].as_u64().unwrap();
        if let Some(today) = client["creditsSpentToday"].as_u64() {
            assert_eq!(today, charged, "client budget: {client}");
            assert!(today <= client["dailyBudget"].as_u64().unwrap() + allowance);
            if let Some(redis) = redis {
                let name = format!("client:{}", client["id"].as_str().unwrap());
                assert_redis_budgets(redis, &[&name], charged).await;
            }
        }
        by_clients += charged;
    }
    if let Some(redis) = redis {
        assert_redis_budgets(redis, &["global"], credits).await;
    }
    let text = app.metrics().await;
    let by_subjects = metric(
        &text,
        "keyapi_proxy_issuer_credits_spent_total{issuer=\"site\"}",
    ) as u64;
    // Each subject's budget (in Redis, when given) moved by what its calls cost.
    let issuer = &app.state.issuers().issuers()[0];
    let mut subjects_today = Vec::new();
    for sub in RANDOM_SUBJECTS {
        let today = match issuer.subject(sub) {
            Some(subject) => {
                let budget = subject.account.budget.as_ref().unwrap();
                app.state.proxy().ledger().spent_today(budget).await
            }
            None => 0,
        };
        assert!(today <= RANDOM_SUBJECT_BUDGET + allowance, "{sub}: {today}");
        subjects_today.push(today);
    }
    assert_eq!(
        subjects_today.iter().sum::<u64>(),
        by_subjects,
        "subject budgets: {subjects_today:?}"
    );
    // So did each visitor's (in Redis too, when given).
    let by_visitors = metric(&text, "keyapi_proxy_visitor_credits_spent_total") as u64;
    let mut visitors_today = Vec::new();
    for addr in RANDOM_VISITORS {
        let today = match app.state.visitors().peek(addr.parse().unwrap()) {
            Some(visitor) => {
                let budget = visitor.account.budget.as_ref().unwrap();
                let today = app.state.proxy().ledger().spent_today(budget).await;
                // What its calls that reached KeyAPI cost, tallied as they settled.
                let charged = visitor.account.spent.on(clock::utc_day(SystemTime::now()));
                assert_eq!(today, charged, "visitor budget {addr}");
                if let Some(redis) = redis {
                    assert_redis_budgets(redis, &[&visitor.id], charged).await;
                }
                today
            }
            None => 0,
        };
        assert!(
            today <= RANDOM_VISITOR_BUDGET + allowance,
            "{addr}: {today}"
        );
        visitors_today.push(today);
    }
    assert_eq!(
        visitors_today.iter().sum::<u64>(),
        by_visitors,
        "visitor budgets: {visitors_today:?}"
    );
    let background = metric(
        &text,
        "keyapi_proxy_credits_spent_by_total{payer=\"revalidate\"}",
    ) + metric(
        &text,
        "keyapi_proxy_credits_spent_by_total{payer=\"refresh_ahead\"}",
    );
    assert_eq!(
        by_clients + by_subjects + by_visitors + background as u64,
        credits,
        "every credit has a payer"
    );
    eprintln!(
        "ledger randomized test: seed {seed}: {calls} calls received, {credits} credits on the \
         ledger; global budget {credits}/60; clients {}; subjects {subjects_today:?}; \
         visitors {visitors_today:?}; background {background}; Redis: {}",
        stats["clients"],
        match redis {
            Some(redis) => format!(
                "global {}, client:a {}, client:b {}",
                redis_count(redis, "global").await,
                redis_count(redis, "client:a").await,
                redis_count(redis, "client:b").await
            ),
            None => "none".into(),
        }
    );
}
