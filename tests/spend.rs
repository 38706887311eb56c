//! Spend history (issue 26): three days moved on the app's clock, two clients
//! (one with a budget it runs out of) and a warm-up; each day's figures per
//! payer, each day's total equal to that day's increase of
//! `credits_spent_total`, the CSV checked line by line — in memory, in the
//! snapshot file across a restart, and in Redis across two replicas.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use common::{
    TestApp, booked, client, parts, plain_ttl,
    redis_server::{RedisServer, with_redis},
    spawn_app_with_clock,
};
use keyapi_proxy::{
    clock::{self, ManualClock},
    config::{Config, QuestionValue, WarmupConfig},
    route::HASHTAG_DETAIL_PATH,
};
use serde_json::Value;

const OPS: &str = "kp_spend_ops";
const TEAM_A: &str = "kp_spend_team_a";
const TEAM_B: &str = "kp_spend_team_b";
const DAY: u64 = 24 * 3600;
/// The first day of the story (2024-10-04), at 10:00 UTC.
const FIRST_DAY: u64 = 20_000;

fn manual_clock() -> Arc<ManualClock> {
    let start = UNIX_EPOCH + Duration::from_secs(FIRST_DAY * DAY + 10 * 3600);
    Arc::new(ManualClock::new(start))
}

/// An admin, team-a, team-b (4 credits a day: two calls), and the warm-up
/// `morning` (two questions), whose schedule never comes round in a test.
fn configure(c: &mut Config) {
    plain_ttl(c, Duration::from_secs(3600));
    let mut ops = client("ops", OPS);
    ops.admin = true;
    let mut team_b = client("team-b", TEAM_B);
    team_b.daily_budget = Some(4);
    c.clients = vec![ops, client("team-a", TEAM_A), team_b];
    let names = QuestionValue::List(vec![
        QuestionValue::Text("w1".into()),
        QuestionValue::Text("w2".into()),
    ]);
    c.warmup = vec![WarmupConfig {
        name: Some("morning".into()),
        route: HASHTAG_DETAIL_PATH.into(),
        every: None,
        at: Some("23:59".into()),
        max_credits_per_day: 100,
        start_delay: None,
        pace: Some(Duration::ZERO),
        questions: vec![BTreeMap::from([("hashtag_name".to_owned(), names)])],
        questions_file: None,
    }];
}

async fn ask(app: &TestApp, token: &str, name: &str) -> u16 {
    let query = format!("hashtag_name={name}");
    parts(app.get_hashtag_as(token, &query).await).await.0
}

/// Day `day`'s traffic: team-a (on `a`) asks one question twice; team-b (on
/// `b`) asks two of its own, a third its budget refuses, and team-a's (a
/// hit); the warm-up (on `a`) fetches its two questions.
async fn one_day(a: &TestApp, b: &TestApp, day: u64) {
    assert_eq!(ask(a, TEAM_A, &format!("a{day}")).await, 200);
    assert_eq!(ask(a, TEAM_A, &format!("a{day}")).await, 200);
    assert_eq!(ask(b, TEAM_B, &format!("b{day}")).await, 200);
    assert_eq!(ask(b, TEAM_B, &format!("b{day}x")).await, 200);
    assert_eq!(ask(b, TEAM_B, &format!("b{day}y")).await, 429);
    assert_eq!(ask(b, TEAM_B, &format!("a{day}")).await, 200);
    let now = a.state.clock().now();
    let report = a.state.warmups()[0].run(a.state.proxy(), now).await;
    assert_eq!(report.warmed, 2, "{report:?}");
}

/// Runs [`one_day`] on `a` and `b` for each of `days`, moving the clock a
/// day after each; returns each day's increase of `credits_spent_total`
/// over `apps` (every replica once).
async fn run_days(
    (a, b): (&TestApp, &TestApp),
    apps: &[&TestApp],
    days: std::ops::Range<u64>,
    manual: &ManualClock,
) -> Vec<u64> {
    let booked_all = || apps.iter().map(|app| booked(app)).sum::<u64>();
    let mut increases = Vec::new();
    for day in days {
        let before = booked_all();
        one_day(a, b, day).await;
        for app in apps {
            app.state.proxy().idle().await;
        }
        increases.push(booked_all() - before);
        manual.advance(Duration::from_secs(DAY));
    }
    increases
}

/// What every day holds: (payer, spent, calls, saved, refusals).
const EXPECTED: [(&str, u64, u64, u64, u64); 3] = [
    ("client:team-a", 2, 1, 2, 0),
    ("client:team-b", 4, 2, 2, 1),
    ("warmup:morning", 4, 2, 0, 0),
];

/// `GET /admin/spend<query>` as the admin, with `accept`.
async fn spend(app: &TestApp, query: &str, accept: &str) -> (u16, String) {
    let response = app
        .client
        .get(app.url(&format!("/admin/spend{query}")))
        .bearer_auth(OPS)
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    let (status, _, body) = parts(response).await;
    (status, body)
}

/// The request id an envelope carries.
fn header_id(body: &str) -> String {
    let envelope: Value = serde_json::from_str(body).unwrap();
    envelope["requestId"].as_str().unwrap().to_owned()
}

/// The three days' range as a query.
fn three_days() -> String {
    let (from, to) = (clock::utc_date(FIRST_DAY), clock::utc_date(FIRST_DAY + 2));
    format!("?from={from}&to={to}")
}

/// Checks the JSON history of the three days against [`EXPECTED`] and each
/// day's total against `increases` (that day's `credits_spent_total` rise).
fn check_json(body: &str, increases: &[u64]) {
    let history: Value = serde_json::from_str(body).unwrap();
    let days = history["days"].as_array().unwrap();
    assert_eq!(days.len(), 3, "{history}");
    for (i, day) in days.iter().enumerate() {
        assert_eq!(day["day"], clock::utc_date(FIRST_DAY + i as u64));
        let payers = day["payers"].as_array().unwrap();
        let got: Vec<(String, u64, u64, u64, u64)> = payers
            .iter()
            .map(|p| {
                let n = |f: &str| p[f].as_u64().unwrap();
                let payer = p["payer"].as_str().unwrap().to_owned();
                (
                    payer,
                    n("creditsSpent"),
                    n("calls"),
                    n("creditsSaved"),
                    n("refusals"),
                )
            })
            .collect();
        let expected: Vec<_> = EXPECTED
            .iter()
            .map(|(p, a, b, c, d)| ((*p).to_owned(), *a, *b, *c, *d))
            .collect();
        assert_eq!(got, expected, "day {i}");
        assert_eq!(
            day["total"]["creditsSpent"], increases[i],
            "day {i} = the ledger's increase"
        );
        assert_eq!(day["total"]["creditsSaved"], 4);
        assert_eq!(day["total"]["refusals"], 1);
    }
}

/// The CSV of the three days, line by line.
fn check_csv(csv: &str) {
    let mut expected = vec!["day,payer,credits_spent,calls,credits_saved,refusals".to_owned()];
    for day in 0..3 {
        let date = clock::utc_date(FIRST_DAY + day);
        for (payer, spent, calls, saved, refused) in EXPECTED {
            expected.push(format!("{date},{payer},{spent},{calls},{saved},{refused}"));
        }
    }
    assert_eq!(csv.lines().collect::<Vec<_>>(), expected);
}

#[tokio::test]
async fn in_memory_three_days_two_clients_and_a_warm_up_agree_with_the_ledger() {
    let manual = manual_clock();
    let app = spawn_app_with_clock(manual.clone(), configure).await;
    let increases = run_days((&app, &app), &[&app], 0..3, &manual).await;
    assert_eq!(increases, [10, 10, 10]);
    let (status, body) = spend(&app, &three_days(), "application/json").await;
    assert_eq!(status, 200, "{body}");
    check_json(&body, &increases);
    let (status, csv) = spend(&app, &format!("{}&format=csv", three_days()), "*/*").await;
    assert_eq!(status, 200);
    check_csv(&csv);
    let (_, by_accept) = spend(&app, &three_days(), "text/csv").await;
    assert_eq!(by_accept, csv, "Accept: text/csv answers the same CSV");
    println!(
        "spend history, GET /admin/spend{}&format=csv:\n{csv}",
        three_days()
    );
    // By default the last 30 days to today (the fourth, still empty).
    let (_, body) = spend(&app, "", "application/json").await;
    let history: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(history["days"].as_array().unwrap().len(), 30);
    assert_eq!(history["to"], clock::utc_date(FIRST_DAY + 3));
    common::assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test]
async fn bad_queries_are_a_400_and_only_admins_read_the_history() {
    let app = spawn_app_with_clock(manual_clock(), configure).await;
    for (query, hint) in [
        ("?from=2024-02-30", "\"from\" must be a date like"),
        ("?to=yesterday", "\"to\" must be a date like"),
        (
            "?from=2024-10-04&to=2024-10-01",
            "\"from\" must be a day on or before to",
        ),
        ("?format=xml", "\"format\" must be json or csv"),
        ("?from=2024-10-01&from=2024-10-02", "more than once"),
        ("?day=2024-10-01", "it takes from, to"),
    ] {
        let (status, body) = spend(&app, query, "application/json").await;
        assert_eq!(status, 400, "{query}: {body}");
        let message = common::assert_envelope(&body, 400, &header_id(&body));
        assert!(message.contains(hint), "{query}: {message}");
    }
    // Days outside what is kept (long ago, or after today) are no mistake: none is kept.
    for query in ["?from=2000-01-01&to=2000-01-02", "?from=2999-01-01"] {
        let (status, body) = spend(&app, query, "application/json").await;
        assert_eq!(status, 200, "{query}: {body}");
        let history: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(history["days"], serde_json::json!([]), "{query}: {body}");
    }
    let response = app
        .client
        .get(app.url("/admin/spend"))
        .bearer_auth(TEAM_A)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn the_snapshot_file_keeps_the_history_across_a_restart() {
    let dir = std::env::temp_dir().join(format!("keyapi-spend-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cache.snap");
    let with_snapshot = |c: &mut Config| {
        configure(c);
        c.cache.snapshot_path = Some(path.clone());
    };
    let manual = manual_clock();
    let mut first = spawn_app_with_clock(manual.clone(), with_snapshot).await;
    let mut increases = run_days((&first, &first), &[&first], 0..2, &manual).await;
    first.begin_shutdown().await.unwrap();

    let second = first
        .spawn_replica_with_clock(manual.clone(), with_snapshot)
        .await;
    increases.extend(run_days((&second, &second), &[&second], 2..3, &manual).await);
    let (status, body) = spend(&second, &three_days(), "application/json").await;
    assert_eq!(status, 200, "{body}");
    check_json(&body, &increases);
    let (_, csv) = spend(&second, &format!("{}&format=csv", three_days()), "*/*").await;
    check_csv(&csv);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn redis_keeps_one_history_for_two_replicas() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let url = redis.url();
    let shared = |c: &mut Config| {
        configure(c);
        with_redis(&url)(c);
    };
    let manual = manual_clock();
    let a = spawn_app_with_clock(manual.clone(), shared).await;
    let b = a.spawn_replica_with_clock(manual.clone(), shared).await;
    // team-a and the warm-up on replica a, team-b on replica b.
    let increases = run_days((&a, &b), &[&a, &b], 0..3, &manual).await;
    assert_eq!(increases, [10, 10, 10]);
    // Each replica's counts reach Redis within seconds, and before its own reads.
    b.state.spend().flush().await;
    let (status, from_a) = spend(&a, &three_days(), "application/json").await;
    assert_eq!(status, 200, "{from_a}");
    check_json(&from_a, &increases);
    let (_, from_b) = spend(&b, &three_days(), "application/json").await;
    assert_eq!(from_a, from_b, "one history for the cluster");
    let (_, csv) = spend(&b, &format!("{}&format=csv", three_days()), "*/*").await;
    check_csv(&csv);
    common::assert_ledger_equals_bill(&[&a, &b]).await;
}
