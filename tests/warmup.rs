//! Warm-up: a run prefetches exactly the questions that would not stay fresh
//! until the next run, through the same single flight as clients, within its
//! allowance and the global budget, stopping for a failing KeyAPI; replicas
//! on one Redis warm once; `warmup --dry-run` shows the questions and cost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    pin::pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{
    TestApp, assert_hit, assert_ledger_equals_bill, assert_stored_miss, binary::run_binary,
    cluster::Cluster, metric, parts, poll_once, spawn_app_with, spawn_app_with_clock,
};
use keyapi_proxy::{
    clock::{Clock, ManualClock},
    config::{Config, QuestionValue, WarmupConfig},
    demo::FakeMode,
    directives::Ask,
    ledger::Payer,
    proxy::Outcome,
    warmup::RunReport,
};

const ROUTE: &str = "/v1/tiktok/trending/hashtag/detail";
const DAY: u64 = 24 * 3600;

fn text(value: &str) -> QuestionValue {
    QuestionValue::Text(value.into())
}

fn list(values: &[&str]) -> QuestionValue {
    QuestionValue::List(values.iter().map(|v| text(v)).collect())
}

/// A warm-up of `questions`, every hour, never started by its schedule
/// during a test (the tests run it themselves), calls not paced.
fn warmup(questions: Vec<BTreeMap<String, QuestionValue>>, allowance: u64) -> WarmupConfig {
    WarmupConfig {
        name: None,
        route: ROUTE.into(),
        every: Some(Duration::from_secs(3600)),
        at: None,
        max_credits_per_day: allowance,
        start_delay: Some(Duration::from_secs(3600)),
        pace: Some(Duration::ZERO),
        questions,
        questions_file: None,
    }
}

fn question(pairs: &[(&str, QuestionValue)]) -> BTreeMap<String, QuestionValue> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Answers fresh for 2 h, warmed every hour.
fn two_hour_ttl(c: &mut Config) {
    c.routes[0].ttl = Some(Duration::from_secs(2 * 3600));
    c.routes[0].ttl_by = None;
}

async fn run(app: &TestApp, now: SystemTime) -> RunReport {
    app.state.warmups()[0].run(app.state.proxy(), now).await
}

#[tokio::test]
async fn a_run_warms_exactly_the_questions_that_would_go_stale() {
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(20_000 * DAY),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| {
        two_hour_ttl(c);
        c.warmup = vec![warmup(
            vec![question(&[
                ("hashtag_name", text("ufc324")),
                ("period", list(&["7", "30"])),
                ("region", list(&["US", "all_regions"])),
            ])],
            100,
        )];
    })
    .await;
    // A client already asked one of them.
    assert_eq!(app.get("hashtag_name=ufc324&region=us").await.0, 200);
    let report = run(&app, clock.now()).await;
    assert_eq!((report.warmed, report.skipped_fresh), (3, 1));
    assert_eq!(app.upstream.calls(), 4);
    // Everything stays fresh past the next run: nothing to do.
    let report = run(&app, clock.now()).await;
    assert_eq!((report.warmed, report.skipped_fresh), (0, 4));
    // 61 minutes later every answer expires before the run after next.
    clock.advance(Duration::from_secs(61 * 60));
    let report = run(&app, clock.now()).await;
    assert_eq!(report.warmed, 4);
    assert_eq!(app.upstream.calls(), 8);
    // Clients are answered from the warmed cache.
    let (_, headers, _) = app.get("hashtag_name=UFC324&period=30").await;
    assert_hit(&headers);
    assert_ledger_equals_bill(&[&app]).await;
    let text = app.metrics().await;
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_credits_spent_by_total{payer=\"warmup\"}"
        ),
        14.0
    );
}

#[tokio::test]
async fn a_run_and_clients_share_one_call() {
    let app = spawn_app_with(|c| {
        // A just-stored answer stays fresh past the next run.
        two_hour_ttl(c);
        let mut mlb = warmup(vec![question(&[("hashtag_name", text("mlb"))])], 100);
        mlb.name = Some("mlb".into());
        c.warmup = vec![
            warmup(
                vec![question(&[("hashtag_name", list(&["nba", "nfl"]))])],
                100,
            ),
            mlb,
        ];
    })
    .await;
    let run_in_task = |index: usize| {
        let state = app.state.clone();
        tokio::spawn(async move {
            let now = state.clock().now();
            state.warmups()[index].run(state.proxy(), now).await
        })
    };
    // A client asks while the run's call is at KeyAPI: one call between them.
    app.upstream.hold();
    let running = run_in_task(0);
    app.upstream.wait_for_calls(1).await;
    let client = app.spawn_get_hashtag("hashtag_name=NBA");
    app.upstream.release();
    assert_eq!(client.await.unwrap().0, 200);
    assert_eq!(running.await.unwrap().warmed, 2);
    assert_eq!(app.upstream.calls(), 2);

    // A run meeting a client's call joins it (or, arriving just after,
    // finds its answer fresh): either way it pays nothing.
    app.upstream.hold();
    let client = app.spawn_get_hashtag("hashtag_name=mlb");
    app.upstream.wait_for_calls(3).await;
    let running = run_in_task(1);
    app.upstream.release();
    let (_, headers, _) = client.await.unwrap();
    assert_stored_miss(&headers);
    let report = running.await.unwrap();
    assert_eq!(report.warmed, 0);
    assert_eq!(report.joined + report.skipped_fresh, 1);
    assert_eq!(app.upstream.calls(), 3);
    assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test]
async fn the_allowance_stops_a_run_part_way_and_the_next_day_resumes() {
    // One hour before 00:00 UTC.
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(20_000 * DAY - 3600),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| {
        two_hour_ttl(c);
        c.warmup = vec![warmup(
            vec![question(&[(
                "hashtag_name",
                list(&["a", "b", "c", "d", "e"]),
            )])],
            4,
        )];
    })
    .await;
    let report = run(&app, clock.now()).await;
    assert_eq!(report.warmed, 2);
    assert_eq!(report.stopped_by, Some("warmup_allowance"));
    assert_eq!(app.upstream.calls(), 2);
    let report = run(&app, clock.now()).await;
    assert_eq!((report.warmed, report.skipped_fresh), (0, 2));
    assert_eq!(app.upstream.calls(), 2, "the allowance holds");

    clock.advance(Duration::from_secs(3600));
    let report = run(&app, clock.now()).await;
    assert_eq!((report.warmed, report.skipped_fresh), (2, 2));
    assert_eq!(report.stopped_by, Some("warmup_allowance"));
    assert_eq!(app.upstream.calls(), 4);
    let stats = app.client.get(app.url("/stats")).send().await.unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats.text().await.unwrap()).unwrap();
    let warmup = &stats["warmups"][0];
    assert_eq!(warmup["name"], format!("warmup:{ROUTE}"));
    assert_eq!(warmup["creditsSpentToday"], 4);
    assert_eq!(warmup["lastRun"]["warmed"], 2);
    assert_eq!(warmup["questions"], 5);
    assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test]
async fn clients_joining_a_fetch_the_allowance_refused_retry_on_their_own_account() {
    let app = spawn_app_with(|c| {
        c.credits.daily_budget = 100;
        // 1 credit cannot pay a 2-credit call: the warm-up's fetch is refused.
        c.warmup = vec![warmup(
            vec![question(&[("hashtag_name", text("shared"))])],
            1,
        )];
    })
    .await;
    let (proxy, route) = (app.state.proxy(), &app.state.routes().routes()[0]);
    let key = route.parse(Some("hashtag_name=shared")).unwrap();
    let ask = Ask::default();
    // The run starts the key's fetch and two clients join it before it runs.
    let mut run = pin!(app.state.warmups()[0].run(proxy, app.state.clock().now()));
    assert!(poll_once(run.as_mut()).await.is_pending());
    let mut first = pin!(proxy.serve(&key, route, &ask, Payer::Request(None)));
    assert!(poll_once(first.as_mut()).await.is_pending());
    let mut second = pin!(proxy.serve(&key, route, &ask, Payer::Request(None)));
    assert!(poll_once(second.as_mut()).await.is_pending());
    let report = run.await;
    assert_eq!(report.stopped_by, Some("warmup_allowance"));
    // Not the warm-up's refusal: one call, on the clients' (global) account.
    for served in [first.await, second.await] {
        match served {
            Ok(Outcome::Cached { entry, .. }) => assert!(!entry.negative),
            other => panic!("the warm-up's refusal reached a client: {other:?}"),
        }
    }
    assert_eq!(app.upstream.calls(), 1);
    assert_ledger_equals_bill(&[&app]).await;
    let stats = app.client.get(app.url("/stats")).send().await.unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats.text().await.unwrap()).unwrap();
    assert_eq!(stats["warmups"][0]["creditsSpentToday"], 0, "{stats}");
}

#[tokio::test]
async fn a_failing_upstream_stops_the_run_at_the_open_circuit() {
    let app = spawn_app_with(|c| {
        c.upstream.breaker_failures = 2;
        c.upstream.retries = 0;
        c.warmup = vec![warmup(
            vec![question(&[(
                "hashtag_name",
                list(&["a", "b", "c", "d", "e", "f"]),
            )])],
            100,
        )];
    })
    .await;
    app.upstream.set_mode(FakeMode::Status(500));
    let report = run(&app, app.state.clock().now()).await;
    assert_eq!(report.failed, 2);
    assert_eq!(report.stopped_by, Some("circuit_open"));
    assert_eq!(app.upstream.calls(), 2);
    assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test]
async fn two_replicas_on_one_redis_warm_once() {
    let config = |c: &mut Config| {
        c.warmup = vec![warmup(
            vec![question(&[("hashtag_name", list(&["x", "y", "z"]))])],
            100,
        )];
    };
    let Some(cluster) = Cluster::start(config).await else {
        return;
    };
    let Cluster { clock, a, b, .. } = &cluster;
    let now = clock.now();
    assert_eq!(run(a, now).await.warmed, 3);
    let report = run(b, now).await;
    assert_eq!(report.stopped_by, Some("another_replica"));
    assert_eq!(a.upstream.calls(), 3);
    // B's clients are answered from what A warmed, through Redis.
    let (status, headers, _) = b.get("hashtag_name=y").await;
    assert_eq!(status, 200);
    assert_hit(&headers);
    assert_eq!(a.upstream.calls(), 3);
}

#[tokio::test]
async fn an_every_warm_up_runs_shortly_after_start_up() {
    let app = spawn_app_with(|c| {
        let mut soon = warmup(vec![question(&[("hashtag_name", list(&["p", "q"]))])], 100);
        soon.start_delay = None;
        c.warmup = vec![soon];
    })
    .await;
    app.upstream.wait_for_calls(2).await;
    app.state.proxy().idle().await;
    let (_, headers, _) = parts(app.get_hashtag("hashtag_name=q").await).await;
    assert_hit(&headers);
}

#[test]
fn dry_run_prints_the_normalized_questions_and_the_cost() {
    let dir = std::env::temp_dir().join(format!("keyapi-warmup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("questions.csv");
    std::fs::write(&csv, "hashtag_name,region\nnba,us\n#NBA,US\n").unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[warmup]]\nroute = \"{ROUTE}\"\nat = \"00:30\"\nmax_credits_per_day = 200\n\
             questions_file = \"{}\"\n  [[warmup.questions]]\n  hashtag_name = \"#UFC324\"\n  \
             period = [\"7\", \"30\"]\n  [[warmup.questions]]\n  hashtag_name = \"ufc324\"\n",
            csv.display()
        ),
    )
    .unwrap();
    let out = run_binary(
        &["--config", config.to_str().unwrap(), "warmup", "--dry-run"],
        &[],
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("daily at 00:30 UTC")
            && stdout.contains("3 questions x 2 credits = 6 credits"),
        "{stdout}"
    );
    for key in [
        "?period=7&region=all_regions&hashtag_name=ufc324",
        "?period=30&region=all_regions&hashtag_name=ufc324",
        "?period=7&region=US&hashtag_name=nba",
    ] {
        assert!(stdout.contains(key), "{key} in {stdout}");
    }

    // A bad question refuses to start, naming its line.
    std::fs::write(&csv, "hashtag_name,period\nnba,7\nnba,8\n").unwrap();
    let out = run_binary(
        &["--config", config.to_str().unwrap(), "warmup", "--dry-run"],
        &[],
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(stderr.contains("line 3"), "{stderr}");
    assert!(stderr.contains("\"period\""), "{stderr}");

    // A misspelt column refuses to start, in one line naming it and the file.
    std::fs::write(&csv, "hashtag_name,regoin\nnba,us\n").unwrap();
    for command in [&["warmup", "--dry-run"][..], &["check-config"]] {
        let mut args = vec!["--config", config.to_str().unwrap()];
        args.extend(command);
        let out = run_binary(&args, &[]);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{command:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{command:?}: {stderr}");
        assert!(
            stderr.contains("questions.csv: column \"regoin\" is not a parameter of this route"),
            "{command:?}: {stderr}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}
