//! Visitors (`[visitors]`): a caller without a token is known by its address
//! cut to a prefix, and pays from a budget of its own beside the global one
//! (across replicas with Redis); spending it leaves other visitors served;
//! a forwarding header from an untrusted peer buys no new identity; the
//! state kept per visitor is bounded; with `[[clients]]` a tokenless caller
//! is let in only in mixed mode (`visitors.allow`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use common::{
    assert_hit, assert_ledger_equals_bill, client, cluster::Cluster, header, manual_clock, metric,
    parts, spawn_app_with, spawn_app_with_clock, visitors,
};
use keyapi_proxy::{caller::ClientAddr, clock::Clock as _, config::Config, digest};
use redis::AsyncCommands as _;

/// Two calls (4 credits) per visitor per day; an hour of stale-if-error so
/// an expired answer can be served past the budget.
fn budgeted(c: &mut Config) {
    visitors(c, 4);
    c.cache.ttl = Duration::from_secs(60);
    c.cache.stale_while_revalidate = Duration::ZERO;
    c.cache.stale_if_error = Duration::from_secs(3600);
}

/// Today's spend of the visitor at `addr`, from its budget on the ledger.
async fn spent_today(app: &common::TestApp, addr: &str) -> u64 {
    let visitor = app.state.visitors().peek(addr.parse().unwrap()).unwrap();
    let budget = visitor.account.budget.as_ref().unwrap();
    app.state.proxy().ledger().spent_today(budget).await
}

#[tokio::test]
async fn a_visitor_past_its_budget_gets_stale_or_429_while_another_is_served() {
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), budgeted).await;
    let (script, reader) = ("203.0.113.7", "198.51.100.20");
    assert_eq!(app.ask_as_visitor(script, "one").await.0, 200);
    assert_eq!(app.ask_as_visitor(script, "two").await.0, 200);
    // The script's budget (two calls) is spent: a new question is refused...
    let (status, headers, body) = app.ask_as_visitor(script, "three").await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("this visitor's daily credit budget"),
        "{body}"
    );
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() >= 1);
    // ...hits past the budget are still served, and another visitor asks new questions.
    let (status, headers, _) = app.ask_as_visitor(script, "one").await;
    assert_eq!(status, 200);
    assert_hit(&headers);
    assert_eq!(app.ask_as_visitor(reader, "three").await.0, 200);
    // Past its TTL, the script's expired answer is served stale instead of refetched.
    clock.advance(Duration::from_secs(61));
    let (status, headers, _) = app.ask_as_visitor(script, "two").await;
    assert_eq!(status, 200);
    let cache_status = header(&headers, "cache-status");
    assert!(cache_status.ends_with("; detail=budget"), "{cache_status}");

    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 3);
    assert_eq!(spent_today(&app, script).await, 4);
    assert_eq!(spent_today(&app, reader).await, 2);
    let text = app.metrics().await;
    let refused = "keyapi_proxy_budget_refused_total{scope=\"visitor\"}";
    assert_eq!(metric(&text, refused), 2.0);
    assert_eq!(metric(&text, "keyapi_proxy_visitor_requests_total"), 6.0);
    assert_eq!(
        metric(&text, "keyapi_proxy_visitor_credits_spent_total"),
        6.0
    );
    assert!(!text.contains("203.0.113"), "no address in the metrics");
    // /stats shows today's top spenders by prefix, most first.
    let top = &app.stats().await["topSpenders"];
    assert_eq!(top[0]["kind"], "visitor");
    assert_eq!(top[0]["label"], "203.0.113.7/32");
    assert_eq!(top[0]["creditsSpentToday"], 4);
    assert_eq!(top[1]["label"], "198.51.100.20/32");
    assert_eq!(top.as_array().unwrap().len(), 2);
    let page = app.client.get(app.url("/")).send().await.unwrap();
    let page = page.text().await.unwrap();
    assert!(page.contains("Top spenders today"), "{page}");
    assert!(page.contains("visitor 203.0.113.7/32"), "{page}");
}

#[tokio::test]
async fn a_spoofed_forwarding_header_from_an_untrusted_peer_gains_nothing() {
    let app = spawn_app_with(|c| {
        budgeted(c);
        c.server.trusted_proxies = Vec::new();
    })
    .await;
    // Each request claims a new address; all come from 127.0.0.1, one visitor.
    let mut served = Vec::new();
    for i in 0..4 {
        served.push(
            app.ask_as_visitor(&format!("203.0.113.{i}"), &format!("q{i}"))
                .await
                .0,
        );
    }
    assert_eq!(served, [200, 200, 429, 429]);
    assert_eq!(app.state.visitors().tracked(), 1);
    assert_eq!(spent_today(&app, "127.0.0.1").await, 4);
    assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test]
async fn the_addresses_of_one_ipv6_64_are_one_visitor() {
    let app = spawn_app_with(budgeted).await;
    let same_64 = ["2001:db8:1:2::1", "2001:db8:1:2:ffff:1:2:3"];
    assert_eq!(app.ask_as_visitor(same_64[0], "a").await.0, 200);
    assert_eq!(app.ask_as_visitor(same_64[1], "b").await.0, 200);
    // The /64's budget is spent, whichever of its addresses asks.
    assert_eq!(app.ask_as_visitor(same_64[1], "c").await.0, 429);
    assert_eq!(app.ask_as_visitor("2001:db8:1:3::1", "c").await.0, 200);
    assert_eq!(app.state.visitors().tracked(), 2);
    assert_eq!(spent_today(&app, same_64[0]).await, 4);
}

#[tokio::test]
async fn each_visitor_has_its_own_rate_limit() {
    let app = spawn_app_with(|c| {
        visitors(c, 0);
        c.visitors.rate_per_minute = 2;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(app.ask_as_visitor("203.0.113.1", "same").await.0, 200);
    }
    let (status, headers, _) = app.ask_as_visitor("203.0.113.1", "same").await;
    assert_eq!(status, 429);
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(app.ask_as_visitor("203.0.113.2", "same").await.0, 200);
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "keyapi_proxy_rate_limited_total{scope=\"visitor\"}"),
        1.0
    );
    assert_eq!(app.upstream.calls(), 1, "hits are not charged");
}

#[tokio::test]
async fn a_hundred_thousand_visitors_keep_the_state_bounded() {
    let app = spawn_app_with(|c| {
        visitors(c, 10);
        c.visitors.max_tracked = 1000;
    })
    .await;
    let visitors = app.state.visitors();
    let regular = ClientAddr::direct(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    visitors.visitor(Some(regular));
    for i in 0..100_000u32 {
        let [_, b, c, d] = i.to_be_bytes();
        let addr = IpAddr::V4(Ipv4Addr::new(10, b, c, d));
        visitors.visitor(Some(ClientAddr::direct(addr)));
        if i % 50 == 0 {
            visitors.visitor(Some(regular));
        }
        assert!(visitors.tracked() <= 1000);
    }
    let tracked = visitors.tracked();
    assert!(
        tracked <= 1000,
        "{tracked} visitors held for a bound of 1000"
    );
    assert!(
        visitors.peek(regular.ip()).is_some(),
        "a visitor that keeps coming back is not displaced by the flood"
    );
}

#[tokio::test]
async fn with_clients_a_caller_without_a_token_is_a_visitor_only_in_mixed_mode() {
    for allow in [false, true] {
        let app = spawn_app_with(|c| {
            visitors(c, 4);
            c.clients = vec![client("team", "kp_team")];
            c.visitors.allow = allow;
        })
        .await;
        let expected = if allow { 200 } else { 401 };
        assert_eq!(app.ask_as_visitor("203.0.113.5", "open").await.0, expected);
        // A wrong token is never taken for a visitor; a right one is a client.
        let wrong = parts(app.get_hashtag_as("kp_wrong", "hashtag_name=open").await).await;
        assert_eq!(wrong.0, 401);
        let team = parts(app.get_hashtag_as("kp_team", "hashtag_name=team").await).await;
        assert_eq!(team.0, 200);
        assert_eq!(app.state.visitors().tracked(), usize::from(allow));
    }
}

#[tokio::test]
async fn a_visitors_budget_holds_across_two_replicas_on_redis() {
    let Some(Cluster { redis, clock, a, b }) = Cluster::start(budgeted).await else {
        return;
    };
    let (script, reader) = ("203.0.113.7", "198.51.100.20");
    let mut served = 0;
    for i in 0..6 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let (status, _, body) = replica.ask_as_visitor(script, &format!("q{i}")).await;
        assert!(status == 200 || status == 429, "{status} {body}");
        served += usize::from(status == 200);
    }
    assert_eq!(
        served, 2,
        "two calls fit the visitor's budget, cluster-wide"
    );
    assert_eq!(a.ask_as_visitor(reader, "q2").await.0, 200);
    assert_eq!(b.ask_as_visitor(reader, "q3").await.0, 200);
    let (calls, credits) = assert_ledger_equals_bill(&[&a, &b]).await;
    assert_eq!((calls, credits), (4, 8));
    let mut conn = redis.connection().await;
    let day = keyapi_proxy::clock::utc_day(clock.now());
    for addr in [script, reader] {
        let prefix = format!("{addr}/32");
        let hash = digest::hex(&digest::sha256(prefix.as_bytes())[..16]);
        let key = format!("keyapi-proxy:v1:count:visitor:{hash}:{day}");
        let count: Option<i64> = conn.get(&key).await.unwrap();
        assert_eq!(count, Some(4), "{addr}'s budget in Redis");
        let ttl: i64 = conn.ttl(&key).await.unwrap();
        assert!(ttl > 0, "{addr}'s counter expires");
    }
}

/// The closing note's figure (`cargo test --test visitors -- --nocapture`):
/// a script asking 1,000 random hashtags as one visitor spends at most that
/// visitor's budget, while a second visitor's new questions are answered.
#[tokio::test]
async fn a_script_of_a_thousand_random_hashtags_spends_only_its_own_budget() {
    const VISITOR_BUDGET: u64 = 20;
    let app = spawn_app_with(|c| {
        visitors(c, VISITOR_BUDGET);
        c.credits.daily_budget = 200;
    })
    .await;
    let (script, reader) = ("203.0.113.66", "198.51.100.7");
    let mut rng = fastrand::Rng::with_seed(24);
    let (mut answered, mut refused) = (0, 0);
    let mut reader_answered = 0;
    for i in 0..1000 {
        let tag: String = (0..10).map(|_| rng.alphanumeric()).collect();
        match app.ask_as_visitor(script, &tag).await.0 {
            200 => answered += 1,
            429 => refused += 1,
            other => panic!("script got {other}"),
        }
        if i % 100 == 0 {
            let (status, _, body) = app.ask_as_visitor(reader, &format!("reader{i}")).await;
            assert_eq!(status, 200, "the second visitor is answered: {body}");
            reader_answered += 1;
        }
    }
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    let script_spent = spent_today(&app, script).await;
    let reader_spent = spent_today(&app, reader).await;
    assert!(script_spent <= VISITOR_BUDGET);
    assert_eq!(reader_spent, 2 * reader_answered);
    assert_eq!(credits, script_spent + reader_spent);
    println!(
        "1,000 random hashtags from visitor {script} (budget {VISITOR_BUDGET} credits/day, \
         global 200): {answered} answered, {refused} refused with 429; visitor {reader}: \
         {reader_answered} new questions, all answered. KeyAPI calls: {calls}; credits on the \
         ledger: {credits}; spent by {script}: {script_spent}; by {reader}: {reader_spent}."
    );
}

#[test]
fn visitor_configuration_is_checked() {
    let mut config = Config::defaults().unwrap();
    assert!(config.validate().is_ok());
    config.visitors.ipv6_prefix = 0;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("visitors.ipv4_prefix"), "{error}");
    config.visitors.ipv6_prefix = 64;
    config.visitors.max_tracked = 0;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("visitors.max_tracked"), "{error}");
}
