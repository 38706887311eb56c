//! Signed visitor tokens (`[[issuers]]`): a valid JWT lets its subject in
//! with limits of its own; a bad, expired or foreign one is a 401 that costs
//! nothing; JWKS keys are fetched when needed, at most once a minute; each
//! subject pays from its own budget (across replicas with Redis), and the
//! state kept per subject is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    pin::pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use common::{
    TestApp, assert_envelope, assert_hit, assert_ledger_equals_bill, assert_stored_miss, client,
    cluster::Cluster,
    header, manual_clock, metric, parts, poll_once, spawn_app_with, spawn_app_with_clock,
    tokens::{
        AFTER_A_MINUTE, HsSecret, JwksServer, claims, ed25519, hs256_issuer, jwks_issuer,
        mint_eddsa, unsigned, with,
    },
};
use keyapi_proxy::{
    clock::Clock as _,
    config::Config,
    digest,
    directives::Ask,
    issuers::Subject,
    ledger::Payer,
    proxy::{Outcome, ProxyError},
};
use redis::AsyncCommands as _;
use serde_json::json;

const SECRET: &str = "a-32-byte-secret-for-hs256-tests!";

/// `GET <route>?hashtag_name=<name>` with `Authorization: Bearer <token>`, read whole.
async fn ask(app: &TestApp, token: &str, name: &str) -> common::Parts {
    parts(
        app.get_hashtag_as(token, &format!("hashtag_name={name}"))
            .await,
    )
    .await
}

/// Asserts a 401 for a signed token, in the envelope, naming `reason` in
/// `tokens_rejected_total`.
async fn assert_refused(app: &TestApp, token: &str, reason: &str) {
    let before = metric(&app.metrics().await, &rejected(reason));
    let response = app
        .hashtag_request(reqwest::Method::GET, "hashtag_name=refused")
        .bearer_auth(token)
        .header("X-Request-Id", "r-jwt")
        .send()
        .await
        .unwrap();
    let (status, headers, body) = parts(response).await;
    assert_eq!(status, 401, "{reason}: {body}");
    assert_eq!(
        header(&headers, "www-authenticate"),
        "Bearer error=\"invalid_token\""
    );
    let message = assert_envelope(&body, 401, "r-jwt");
    assert!(message.contains("signed token"), "{message}");
    let after = metric(&app.metrics().await, &rejected(reason));
    assert_eq!(after, before + 1.0, "counted as {reason}");
}

fn rejected(reason: &str) -> String {
    format!("keyapi_proxy_tokens_rejected_total{{reason=\"{reason}\"}}")
}

#[tokio::test]
async fn a_valid_hs256_token_is_served_and_bad_ones_get_401_at_no_cost() {
    let clock = manual_clock();
    let secret = HsSecret::new(SECRET);
    let app =
        spawn_app_with_clock(clock.clone(), |c| c.issuers = vec![hs256_issuer(&secret)]).await;
    let now = clock.now();
    let valid = claims("visitor-1", now);
    let (status, headers, _) = ask(&app, &secret.mint(&valid), "ufc324").await;
    assert_eq!(status, 200);
    assert!(header(&headers, "cache-status").ends_with("stored"));

    let expired = with(valid.clone(), "exp", json!(now_secs(now) - 120));
    assert_refused(&app, &secret.mint(&expired), "expired").await;
    let foreign_audience = with(valid.clone(), "aud", json!("someone-else"));
    assert_refused(&app, &secret.mint(&foreign_audience), "audience").await;
    let wrong_key = HsSecret::new("another-32-byte-secret-for-tests!");
    assert_refused(&app, &wrong_key.mint(&valid), "signature").await;
    assert_refused(&app, &unsigned(&valid), "malformed").await;
    let foreign_issuer = with(valid.clone(), "iss", json!("https://evil.example/"));
    assert_refused(&app, &secret.mint(&foreign_issuer), "unknown_issuer").await;
    let eddsa = mint_eddsa(&ed25519("a"), "a", &valid);
    assert_refused(&app, &eddsa, "algorithm").await;
    let no_exp = with(valid.clone(), "exp", serde_json::Value::Null);
    assert_refused(&app, &secret.mint(&no_exp), "malformed").await;
    let no_sub = with(valid.clone(), "sub", serde_json::Value::Null);
    assert_refused(&app, &secret.mint(&no_sub), "subject").await;
    let long_sub = with(valid.clone(), "sub", json!("s".repeat(257)));
    assert_refused(&app, &secret.mint(&long_sub), "subject").await;
    let not_yet = with(valid.clone(), "nbf", json!(now_secs(now) + 600));
    assert_refused(&app, &secret.mint(&not_yet), "not_yet_valid").await;

    assert_eq!(app.upstream.calls(), 1, "refused tokens cost nothing");

    // Expiry is read on the app's clock, with a small leeway.
    let token = secret.mint(&valid);
    clock.advance(Duration::from_secs(3600 + 20));
    assert_eq!(
        ask(&app, &token, "ufc324").await.0,
        200,
        "within the leeway"
    );
    clock.advance(Duration::from_secs(20));
    assert_refused(&app, &token, "expired").await;

    // Two requests let in; the subject paid for the first call (the second
    // was served stale and refreshed in the background, the proxy's own call).
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "keyapi_proxy_issuer_requests_total{issuer=\"site\"}"),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_issuer_credits_spent_total{issuer=\"site\"}"
        ),
        2.0
    );
    assert!(!text.contains("visitor-1"), "no subject in the metrics");
    assert_ledger_equals_bill(&[&app]).await;
}

fn now_secs(now: SystemTime) -> u64 {
    keyapi_proxy::clock::unix_secs(now)
}

#[tokio::test]
async fn client_tokens_keep_working_beside_issuers() {
    let secret = HsSecret::new(SECRET);
    let app = spawn_app_with(|c| {
        c.clients = vec![client("team", "kp_team")];
        c.issuers = vec![hs256_issuer(&secret)];
    })
    .await;
    let jwt = secret.mint(&claims("visitor", SystemTime::now()));
    assert_eq!(ask(&app, "kp_team", "one").await.0, 200);
    assert_eq!(ask(&app, &jwt, "two").await.0, 200);
    let (status, headers, _) = parts(app.get_hashtag("hashtag_name=one").await).await;
    assert_eq!(status, 401, "with clients, no token is still refused");
    assert_eq!(header(&headers, "www-authenticate"), "Bearer");
    // Signed tokens never reach KeyAPI.
    for request in app.upstream.requests() {
        for (_, value) in &request.headers {
            assert!(!String::from_utf8_lossy(value.as_bytes()).contains(&jwt));
        }
    }

    // Without issuers, a JWT is just a (wrong) client token.
    let without = spawn_app_with(|c| c.clients = vec![client("team", "kp_team")]).await;
    let (status, headers, body) = ask(&without, &jwt, "one").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(header(&headers, "www-authenticate"), "Bearer");
    assert!(body.contains("client token"), "{body}");
    assert_eq!(without.upstream.calls(), 0);
}

#[tokio::test]
async fn jwks_keys_are_fetched_when_needed_and_at_most_once_a_minute() {
    let clock = manual_clock();
    let (key_a, key_b) = (ed25519("a"), ed25519("b"));
    let jwks = JwksServer::start(&[("a", &key_a)]).await;
    let app = spawn_app_with_clock(clock.clone(), |c| {
        c.issuers = vec![jwks_issuer(&jwks.url())]
    })
    .await;
    let token = |key: &jsonwebtoken::EncodingKey, kid: &str, sub: &str| {
        mint_eddsa(key, kid, &claims(sub, clock.now()))
    };

    assert_eq!(ask(&app, &token(&key_a, "a", "v1"), "one").await.0, 200);
    assert_eq!(ask(&app, &token(&key_a, "a", "v2"), "one").await.0, 200);
    assert_eq!(jwks.fetches(), 1, "fetched once, then cached");
    // Key b's signature under key a's kid does not verify.
    assert_refused(&app, &token(&key_b, "a", "v1"), "signature").await;

    // The issuer rotates to key b; a token naming it makes the proxy fetch
    // again (its last fetch being over a minute old), once.
    jwks.serve(&[("b", &key_b)]);
    clock.advance(AFTER_A_MINUTE);
    assert_eq!(ask(&app, &token(&key_b, "b", "v1"), "two").await.0, 200);
    assert_eq!(ask(&app, &token(&key_b, "b", "v3"), "two").await.0, 200);
    assert_eq!(jwks.fetches(), 2, "refetched once for the new kid");
    assert_refused(&app, &token(&key_a, "a", "v1"), "unknown_key").await;

    // Made-up kids do not make it fetch more than once a minute.
    for i in 0..5 {
        assert_refused(
            &app,
            &token(&key_b, &format!("junk{i}"), "v1"),
            "unknown_key",
        )
        .await;
    }
    assert_eq!(jwks.fetches(), 2, "no fetch within the minute");
    clock.advance(AFTER_A_MINUTE);
    for i in 0..5 {
        assert_refused(
            &app,
            &token(&key_b, &format!("later{i}"), "v1"),
            "unknown_key",
        )
        .await;
    }
    assert_eq!(jwks.fetches(), 3, "one fetch for the next minute's junk");
    assert_eq!(app.upstream.calls(), 2, "refused tokens cost nothing");
    // Keys an hour old are fetched again: a key the issuer removed stops being trusted.
    jwks.serve(&[("a", &key_a)]);
    clock.advance(Duration::from_secs(3600));
    assert_refused(&app, &token(&key_b, "b", "v1"), "unknown_key").await;
    assert_eq!(jwks.fetches(), 4);
    assert_eq!(ask(&app, &token(&key_a, "a", "v1"), "one").await.0, 200);
}

#[tokio::test]
async fn unreachable_keys_are_a_503_not_a_401() {
    let (_held, closed) = common::refusing_addr();
    let app = spawn_app_with(|c| {
        c.issuers = vec![jwks_issuer(&format!("http://{closed}/jwks.json"))];
    })
    .await;
    let token = mint_eddsa(&ed25519("a"), "a", &claims("v1", SystemTime::now()));
    let (status, headers, body) = ask(&app, &token, "one").await;
    assert_eq!(status, 503, "{body}");
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(app.upstream.calls(), 0);
}

/// An issuer whose subjects may each spend `budget` credits a day, on a
/// short TTL with a long stale-if-error window.
fn budgeted(c: &mut Config, secret: &HsSecret, budget: u64) {
    let mut issuer = hs256_issuer(secret);
    issuer.daily_budget = Some(budget);
    c.issuers = vec![issuer];
    c.cache.ttl = Duration::from_secs(60);
    c.cache.stale_while_revalidate = Duration::ZERO;
    c.cache.stale_if_error = Duration::from_secs(3600);
}

#[tokio::test]
async fn a_subject_past_its_budget_gets_stale_or_429_while_another_is_served() {
    let clock = manual_clock();
    let secret = HsSecret::new(SECRET);
    let app = spawn_app_with_clock(clock.clone(), |c| budgeted(c, &secret, 4)).await;
    let alice = secret.mint(&claims("alice", clock.now()));
    let bob = secret.mint(&claims("bob", clock.now()));
    assert_eq!(ask(&app, &alice, "one").await.0, 200);
    assert_eq!(ask(&app, &alice, "two").await.0, 200);
    // Alice's budget (two calls) is spent: a new question is refused...
    let (status, headers, body) = ask(&app, &alice, "three").await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("this token subject's daily credit budget"),
        "{body}"
    );
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() >= 1);
    // ...while hits cost her nothing, and Bob asks new questions.
    assert_hit(&ask(&app, &alice, "one").await.1);
    assert_eq!(ask(&app, &bob, "three").await.0, 200);
    // Past its TTL, her expired answer is served stale instead of refetched.
    clock.advance(Duration::from_secs(61));
    let (status, headers, _) = ask(&app, &alice, "one").await;
    assert_eq!(status, 200);
    let cache_status = header(&headers, "cache-status");
    assert!(cache_status.ends_with("; detail=budget"), "{cache_status}");
    let (_, headers, _) = ask(&app, &bob, "one").await;
    assert_stored_miss(&headers);

    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 4);
    let issuer = &app.state.issuers().issuers()[0];
    let ledger = app.state.proxy().ledger();
    for (sub, spent) in [("alice", 4), ("bob", 4)] {
        let subject = issuer.subject(sub).unwrap();
        let budget = subject.account.budget.as_ref().unwrap();
        assert_eq!(ledger.spent_today(budget).await, spent, "{sub}");
    }
    let text = app.metrics().await;
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_budget_refused_total{scope=\"subject\"}"
        ),
        2.0
    );
    // /stats names both among today's top spenders, by hashed name only.
    let top = app.stats().await["topSpenders"].clone();
    let alice = issuer.subject("alice").unwrap();
    assert_eq!(top[0]["kind"], "subject");
    assert_eq!(top[0]["creditsSpentToday"], 4);
    assert!(top.to_string().contains(&*alice.id), "{top}");
    assert!(!top.to_string().contains("alice"), "{top}");
}

#[tokio::test]
async fn a_subject_out_of_budget_still_joins_another_subjects_fetch_for_free() {
    let secret = HsSecret::new(SECRET);
    let app = spawn_app_with(|c| budgeted(c, &secret, 2)).await;
    let now = SystemTime::now();
    let (rich, broke) = (
        secret.mint(&claims("rich", now)),
        secret.mint(&claims("broke", now)),
    );
    assert_eq!(ask(&app, &broke, "spent").await.0, 200);
    app.upstream.hold();
    let first = app
        .hashtag_request(reqwest::Method::GET, "hashtag_name=shared")
        .bearer_auth(&rich)
        .send();
    let first = tokio::spawn(first);
    app.upstream.wait_for_calls(2).await;
    let joined = app
        .hashtag_request(reqwest::Method::GET, "hashtag_name=shared")
        .bearer_auth(&broke)
        .send();
    let joined = tokio::spawn(joined);
    app.upstream.release();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(joined.await.unwrap().unwrap().status(), 200);
    assert_eq!(ask(&app, &broke, "own").await.0, 429);
    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn a_subject_joining_a_fetch_its_leaders_budget_refused_asks_on_its_own_account() {
    let secret = HsSecret::new(SECRET);
    let app = spawn_app_with(|c| budgeted(c, &secret, 2)).await;
    let now = SystemTime::now();
    let broke = secret.mint(&claims("broke", now));
    assert_eq!(ask(&app, &broke, "spent").await.0, 200);
    let issuers = app.state.issuers();
    let broke = issuers.verify(broke.as_bytes()).await.unwrap();
    let rich = secret.mint(&claims("rich", now));
    let rich = issuers.verify(rich.as_bytes()).await.unwrap();
    let (proxy, route) = (app.state.proxy(), &app.state.routes().routes()[0]);
    let key = route.parse(Some("hashtag_name=shared")).unwrap();
    // The spent subject starts the key's fetch; the other joins it before it runs.
    let payer = |s: &Subject| Payer::Request(Some(Arc::clone(&s.account)));
    let ask = Ask::default();
    let mut leader = pin!(proxy.serve(&key, route, &ask, payer(&broke)));
    assert!(poll_once(leader.as_mut()).await.is_pending());
    let mut follower = pin!(proxy.serve(&key, route, &ask, payer(&rich)));
    assert!(poll_once(follower.as_mut()).await.is_pending());
    match leader.await {
        Err(ProxyError::Budget(refusal)) => assert_eq!(refusal.as_str(), "subject_budget"),
        other => panic!("the spent subject was not refused: {other:?}"),
    }
    match follower.await {
        Ok(Outcome::Cached { entry, .. }) => assert!(!entry.negative),
        other => panic!("the leader's refusal reached the follower: {other:?}"),
    }
    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 2);
    let budget = rich.account.budget.as_ref().unwrap();
    assert_eq!(app.state.proxy().ledger().spent_today(budget).await, 2);
}

#[tokio::test]
async fn each_subject_has_its_own_rate_limit() {
    let clock = manual_clock();
    let secret = HsSecret::new(SECRET);
    let app = spawn_app_with_clock(clock.clone(), |c| {
        let mut issuer = hs256_issuer(&secret);
        issuer.rate_per_minute = Some(2);
        c.issuers = vec![issuer];
    })
    .await;
    let (alice, bob) = (
        secret.mint(&claims("alice", clock.now())),
        secret.mint(&claims("bob", clock.now())),
    );
    assert_eq!(ask(&app, &alice, "one").await.0, 200);
    assert_eq!(ask(&app, &alice, "one").await.0, 200);
    let (status, headers, body) = ask(&app, &alice, "one").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(header(&headers, "retry-after"), "30");
    assert_eq!(ask(&app, &bob, "one").await.0, 200);
    clock.advance(Duration::from_secs(30));
    assert_eq!(ask(&app, &alice, "one").await.0, 200);
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "keyapi_proxy_rate_limited_total{scope=\"subject\"}"),
        1.0
    );
}

#[tokio::test]
async fn subject_state_is_bounded_and_a_flood_does_not_displace_regular_subjects() {
    let secret = HsSecret::new(SECRET);
    let app = spawn_app_with(|c| {
        budgeted(c, &secret, 100);
        c.issuers[0].max_subjects = 50;
    })
    .await;
    let now = SystemTime::now();
    let regular = secret.mint(&claims("regular", now));
    assert_eq!(ask(&app, &regular, "own").await.0, 200);
    for i in 0..1000 {
        let token = secret.mint(&claims(&format!("flood{i}"), now));
        assert_eq!(ask(&app, &token, "same").await.0, 200);
        if i % 20 == 0 {
            assert_eq!(ask(&app, &regular, "same").await.0, 200);
        }
    }
    let issuer = &app.state.issuers().issuers()[0];
    let tracked = issuer.tracked_subjects();
    assert!(tracked <= 50, "{tracked} subjects held for a bound of 50");
    assert!(issuer.subject("flood999").is_some(), "the latest is held");
    let forgotten = (0..1000)
        .filter(|i| issuer.subject(&format!("flood{i}")).is_none())
        .count();
    assert!(forgotten >= 950, "only {forgotten} of the flood forgotten");
    // The regular subject was not displaced: its day's spend is still counted.
    let subject = issuer
        .subject("regular")
        .expect("a regular subject is held");
    let budget = subject.account.budget.as_ref().unwrap();
    assert_eq!(app.state.proxy().ledger().spent_today(budget).await, 2);
    assert_eq!(app.upstream.calls(), 2, "the flood asked one question");
}

#[tokio::test]
async fn a_subjects_budget_holds_across_two_replicas_on_redis() {
    let secret = HsSecret::new(SECRET);
    let Some(Cluster { redis, clock, a, b }) = Cluster::start(|c| budgeted(c, &secret, 4)).await
    else {
        return;
    };
    let now = clock.now();
    let (alice, bob) = (
        secret.mint(&claims("alice", now)),
        secret.mint(&claims("bob", now)),
    );
    let mut served = 0;
    for i in 0..6 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let (status, _, body) = ask(replica, &alice, &format!("q{i}")).await;
        assert!(status == 200 || status == 429, "{status} {body}");
        served += usize::from(status == 200);
    }
    assert_eq!(served, 2, "two calls fit Alice's budget, cluster-wide");
    assert_eq!(ask(&a, &bob, "q2").await.0, 200);
    assert_eq!(ask(&b, &bob, "q3").await.0, 200);
    let (calls, credits) = assert_ledger_equals_bill(&[&a, &b]).await;
    assert_eq!((calls, credits), (4, 8));
    let mut conn = redis.connection().await;
    let day = keyapi_proxy::clock::utc_day(now);
    for sub in ["alice", "bob"] {
        let hash = digest::hex(&digest::sha256(sub.as_bytes())[..16]);
        let key = format!("keyapi-proxy:v1:count:subject:site:{hash}:{day}");
        let count: Option<i64> = conn.get(&key).await.unwrap();
        assert_eq!(count, Some(4), "{sub}'s budget in Redis");
        let ttl: i64 = conn.ttl(&key).await.unwrap();
        assert!(ttl > 0, "{sub}'s counter expires");
    }
}

/// A change that makes a valid configuration invalid.
type Breaks = fn(&mut Config);

#[test]
fn issuer_configuration_is_checked() {
    let secret = HsSecret::new(SECRET);
    let mut config = Config::defaults().unwrap();
    let cases: [(&str, Breaks); 7] = [
        ("1-64 characters", |c| c.issuers[0].name = "a b".into()),
        ("used twice", |c| {
            let mut other = c.issuers[0].clone();
            other.issuer = "https://other.example/".into();
            c.issuers.push(other);
        }),
        ("used by another entry", |c| {
            let mut other = c.issuers[0].clone();
            other.name = "other".into();
            c.issuers.push(other);
        }),
        ("exactly one of", |c| {
            c.issuers[0].jwks_url = Some("https://auth.example/jwks.json".into());
        }),
        ("exactly one of", |c| c.issuers[0].hs256_secret_file = None),
        ("only allowed to a loopback host", |c| {
            c.issuers[0].hs256_secret_file = None;
            c.issuers[0].jwks_url = Some("http://auth.example/jwks.json".into());
        }),
        ("max_subjects", |c| c.issuers[0].max_subjects = 0),
    ];
    for (expected, break_it) in cases {
        config.issuers = vec![hs256_issuer(&secret)];
        assert!(config.validate().is_ok());
        break_it(&mut config);
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(expected), "{error}");
    }
}

#[tokio::test]
async fn a_short_or_missing_secret_stops_start_up_without_quoting_it() {
    let short = HsSecret::new("SHORTSECRET");
    let mut config = common::test_config();
    config.issuers = vec![hs256_issuer(&short)];
    let key = secrecy::SecretString::from(common::TEST_API_KEY);
    let error = keyapi_proxy::app::App::build(config.clone(), key.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("shorter than 32 bytes"), "{error}");
    assert!(!error.contains("SHORTSECRET"), "{error}");
    config.issuers[0].hs256_secret_file = Some("/nonexistent/jwt_secret".into());
    let error = keyapi_proxy::app::App::build(config, key)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("cannot read hs256_secret_file"), "{error}");
}
