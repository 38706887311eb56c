//! Running for months (issue 26): the configuration file, the environment and
//! the key file are read again on `POST /admin/reload` and `SIGHUP`; an
//! invalid configuration changes nothing; a valid one applies at once (new
//! clients, route TTLs, removed routes) while what needs a restart is
//! reported and kept; the key file replaced by a rename is used by the next
//! call; a key KeyAPI revokes while a call is in flight is retried once with
//! the new one; and a load of hits and misses through 20 reloads and 3 key
//! rotations sees no error and no extra upstream call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{
    LiveFiles, TEST_API_KEY, TestApp, assert_envelope, header, metric, parts, spawn_from_files,
};
use keyapi_proxy::{clock::SystemClock, demo::FakeUpstream, digest, route::HASHTAG_DETAIL_PATH};
use serde_json::Value;

const ADMIN: &str = "kp_live_admin";
const TEAM: &str = "kp_live_team";
const LIST: &str = "/v1/tiktok/trending/hashtag/list";

/// `[[clients]]` tables: (id, token, extra lines).
fn clients(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(id, token, extra)| {
            let hash = digest::hex(&digest::sha256(token.as_bytes()));
            format!("\n[[clients]]\nid = \"{id}\"\ntoken_sha256 = \"{hash}\"\n{extra}\n")
        })
        .collect()
}

/// The admin client alone.
fn admin_only() -> String {
    clients(&[("ops", ADMIN, "admin = true")])
}

/// Hashtag detail with `ttl` (its `hashtag_name` only), and, when `list`,
/// the hashtag list route (`page`, 1 credit).
fn routes(ttl: &str, list: bool) -> String {
    let mut text = format!(
        "\n[[routes]]\npath = \"{HASHTAG_DETAIL_PATH}\"\nttl = \"{ttl}\"\n\
         [[routes.params]]\nname = \"hashtag_name\"\nkind = \"hashtag\"\ndefault = \"ufc324\"\n"
    );
    if list {
        text.push_str(&format!(
            "\n[[routes]]\npath = \"{LIST}\"\ncredits = 1\n\
             [[routes.params]]\nname = \"page\"\nkind = \"int\"\nmin = 1\nmax = 50\ndefault = \"1\"\n"
        ));
    }
    text
}

/// A fake KeyAPI and a proxy reading the files of `test` (configured by
/// `body`, after `[upstream]`), which it reloads on request.
async fn start(test: &str, body: &str) -> (LiveFiles, Arc<FakeUpstream>, TestApp) {
    let files = LiveFiles::new(test);
    let upstream = FakeUpstream::start(TEST_API_KEY, Duration::ZERO);
    let upstream = Arc::new(upstream.await.unwrap());
    files.write_config(&upstream, body);
    let app = spawn_from_files(&files, Arc::clone(&upstream), Arc::new(SystemClock)).await;
    (files, upstream, app)
}

/// `POST /admin/reload` as `token`: the status and the body as JSON.
async fn reload(app: &TestApp, token: &str) -> (u16, Value) {
    let request = app
        .client
        .post(app.url("/admin/reload"))
        .header("X-Request-Id", "reload-test")
        .bearer_auth(token);
    let (status, _, body) = parts(request.send().await.unwrap()).await;
    (status, serde_json::from_str(&body).unwrap())
}

/// `GET /readyz`'s `apiKey.generation`.
async fn key_generation(app: &TestApp) -> u64 {
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    let ready: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    ready["apiKey"]["generation"].as_u64().unwrap()
}

/// Waits (at most 10 s) until the proxy uses key number `generation`.
async fn await_key(app: &TestApp, generation: u64) {
    let what = format!("the proxy picks up key {generation}");
    common::eventually(Duration::from_secs(10), &what, || async {
        key_generation(app).await == generation
    })
    .await;
}

#[tokio::test]
async fn a_reload_adding_a_client_lets_it_in_at_once_and_keeps_the_others_and_the_cache() {
    let (files, upstream, app) = start("add-client", &admin_only()).await;
    let (status, headers, _) = parts(app.get_hashtag_as(ADMIN, "hashtag_name=nba").await).await;
    assert_eq!(status, 200);
    assert!(header(&headers, "cache-status").ends_with("stored"));
    let (status, _, _) = parts(app.get_hashtag_as(TEAM, "hashtag_name=nba").await).await;
    assert_eq!(status, 401, "not configured yet");

    let both = clients(&[
        ("ops", ADMIN, "admin = true"),
        ("team", TEAM, "daily_budget = 100"),
    ]);
    files.write_config(&upstream, &both);
    let (status, report) = reload(&app, ADMIN).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "applied", "{report}");
    assert_eq!(
        report["applied"],
        serde_json::json!(["clients"]),
        "{report}"
    );
    assert_eq!(report["restartNeeded"], serde_json::json!([]));
    assert_eq!(report["keyRotated"], false);

    for token in [TEAM, ADMIN] {
        let (status, headers, _) = parts(app.get_hashtag_as(token, "hashtag_name=nba").await).await;
        assert_eq!(status, 200);
        assert!(
            header(&headers, "cache-status").contains("; hit;"),
            "the cache is kept"
        );
    }
    assert_eq!(upstream.calls(), 1);
    // The same file again: nothing to apply.
    let (status, report) = reload(&app, ADMIN).await;
    assert_eq!(
        (status, &report["outcome"]),
        (200, &Value::from("unchanged"))
    );
    let metrics = app.metrics().await;
    for (outcome, count) in [("applied", 1.0), ("unchanged", 1.0), ("rejected", 0.0)] {
        let series = format!("keyapi_proxy_config_reloads_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric(&metrics, &series), count, "{series}");
    }
    // Only an admin may reload.
    let (status, body) = reload(&app, TEAM).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn an_invalid_configuration_is_rejected_whole_and_the_running_one_kept() {
    let (files, upstream, app) = start("invalid", &admin_only()).await;

    // A valid new client next to an invalid one: neither applies.
    let bad = clients(&[
        ("ops", ADMIN, "admin = true"),
        ("team", TEAM, ""),
        ("bad id", "kp_other", ""),
    ]);
    files.write_config(&upstream, &bad);
    let (status, body) = reload(&app, ADMIN).await;
    assert_eq!(status, 422, "{body}");
    let message = assert_envelope(&body.to_string(), 422, "reload-test");
    assert!(message.contains("nothing changed"), "{message}");
    assert!(message.contains("clients: id \"bad id\""), "{message}");
    // Not even TOML: rejected too.
    files.write_config(&upstream, "[[clients]\n");
    let (status, body) = reload(&app, ADMIN).await;
    assert_eq!(status, 422, "{body}");
    // A key file that holds no usable key: rejected, the key kept.
    files.write_config(&upstream, &admin_only());
    files.replace_key("has a space");
    let (status, body) = reload(&app, ADMIN).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("KEYAPI_API_KEY_FILE"),
        "{body}"
    );
    assert!(!body.to_string().contains("has a space"), "{body}");
    files.replace_key(TEST_API_KEY);

    let (status, _, _) = parts(app.get_hashtag_as(TEAM, "hashtag_name=nba").await).await;
    assert_eq!(status, 401, "the rejected file's client was not let in");
    let (status, _, _) = parts(app.get_hashtag_as(ADMIN, "hashtag_name=nba").await).await;
    assert_eq!(status, 200, "the running configuration still serves");
    let stats = app.stats().await;
    assert_eq!(stats["reloads"]["rejected"], 3, "{stats}");
    assert_eq!(stats["reloads"]["last"]["outcome"], "rejected");
    let metrics = app.metrics().await;
    let rejected = r#"keyapi_proxy_config_reloads_total{outcome="rejected"}"#;
    assert_eq!(metric(&metrics, rejected), 3.0);
    assert_eq!(stats["apiKey"]["generation"], 1, "{stats}");
}

#[tokio::test]
async fn restart_only_keys_are_reported_and_keep_their_running_values() {
    let (files, upstream, app) = start("restart-only", &admin_only()).await;
    let body = format!(
        "retries = 0\n\n[cache]\nmax_bytes = 1000000\n{}",
        clients(&[("ops", ADMIN, "admin = true"), ("team", TEAM, "")])
    );
    files.write_config(&upstream, &body);
    let text = std::fs::read_to_string(&files.config).unwrap();
    std::fs::write(&files.config, text.replace("127.0.0.1:0", "127.0.0.1:1")).unwrap();
    let (status, report) = reload(&app, ADMIN).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["restartNeeded"],
        serde_json::json!(["cache.max_bytes", "server.listen"])
    );
    assert_eq!(
        report["applied"],
        serde_json::json!(["clients", "upstream.retries"])
    );
    // Still on its port, and the new client is in.
    let (status, _, _) = parts(app.get_hashtag_as(TEAM, "hashtag_name=nba").await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_route_ttl_change_applies_to_new_entries_and_a_removed_route_drops_its_own() {
    let body = format!("{}{}", admin_only(), routes("1h", true));
    let (files, upstream, app) = start("routes", &body).await;
    app.get_hashtag_as(ADMIN, "hashtag_name=before").await;
    let list = |page: u32| {
        app.client
            .get(app.url(&format!("{LIST}?page={page}")))
            .bearer_auth(ADMIN)
            .send()
    };
    assert_eq!(list(2).await.unwrap().status(), 200);
    assert_eq!(app.state.proxy().cache().entries().len(), 2);

    files.write_config(
        &upstream,
        &format!("{}{}", admin_only(), routes("2h", false)),
    );
    let (status, report) = reload(&app, ADMIN).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["applied"], serde_json::json!(["routes"]), "{report}");
    assert_eq!(list(2).await.unwrap().status(), 404, "the route is gone");
    let (_, headers, _) = parts(app.get_hashtag_as(ADMIN, "hashtag_name=before").await).await;
    assert!(
        header(&headers, "cache-status").contains("; hit;"),
        "an unchanged key is kept"
    );
    app.get_hashtag_as(ADMIN, "hashtag_name=after").await;
    let listing = app
        .client
        .get(app.url("/admin/cache"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let listing: Value = serde_json::from_str(&listing.text().await.unwrap()).unwrap();
    let ttl = |name: &str| {
        let entries = listing["entries"].as_array().unwrap();
        let entry = entries.iter().find(|e| e["params"]["hashtag_name"] == name);
        entry.unwrap()["ttlSecs"].as_u64().unwrap()
    };
    assert!(
        (3500..=3600).contains(&ttl("before")),
        "stored under the old TTL"
    );
    assert!(
        (7100..=7200).contains(&ttl("after")),
        "stored under the new TTL"
    );
    assert_eq!(
        listing["count"], 2,
        "the removed route's entry was dropped: {listing}"
    );
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test]
async fn the_key_file_replaced_by_a_rename_is_used_by_the_next_call() {
    let (files, upstream, app) = start("rotation", &admin_only()).await;
    app.get_hashtag_as(ADMIN, "hashtag_name=one").await;

    const NEW_KEY: &str = "sk-live-ROTATED-0011223344556677";
    files.replace_key(NEW_KEY);
    await_key(&app, 2).await;
    upstream.set_key(NEW_KEY);
    let (status, headers, body) = parts(app.get_hashtag_as(ADMIN, "hashtag_name=two").await).await;
    assert_eq!(status, 200, "{body}");
    assert!(header(&headers, "cache-status").ends_with("stored"));
    let sent = upstream.requests();
    let last = sent.last().unwrap().headers["authorization"]
        .to_str()
        .unwrap();
    assert_eq!(last, format!("Bearer {NEW_KEY}"));
    assert_eq!((upstream.calls(), upstream.rejected()), (2, 0));
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "keyapi_proxy_api_key_rotations_total"),
        1.0
    );
    // Neither key shows anywhere.
    for text in [metrics, app.stats().await.to_string()] {
        assert!(!text.contains("ROTATED") && !text.contains("TESTKEY"));
    }
}

#[tokio::test]
async fn a_key_revoked_while_its_call_is_in_flight_is_retried_once_with_the_new_key() {
    let (files, upstream, app) = start("revoked", &admin_only()).await;
    // The call goes out with the first key and waits at KeyAPI...
    upstream.hold();
    let in_flight = {
        let request = app.hashtag_request(reqwest::Method::GET, "hashtag_name=held");
        tokio::spawn(async move { parts(request.bearer_auth(ADMIN).send().await.unwrap()).await })
    };
    upstream.wait_for_calls(1).await;
    // ...while the key is rotated and KeyAPI revokes the old one.
    const NEW_KEY: &str = "sk-live-ROTATED-8899aabbccddeeff";
    files.replace_key(NEW_KEY);
    await_key(&app, 2).await;
    upstream.set_key(NEW_KEY);
    upstream.release();
    let (status, headers, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(header(&headers, "cache-status").ends_with("stored"));
    assert_eq!(
        (upstream.calls(), upstream.rejected()),
        (2, 1),
        "one retry, once"
    );
    let metrics = app.metrics().await;
    let rejected = "keyapi_proxy_upstream_key_rejected_after_rotation_total";
    assert_eq!(metric(&metrics, rejected), 1.0);
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    let ready: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(
        ready["apiKey"]["lastRejectedAfterRotation"], true,
        "{ready}"
    );
    // The refusal was not cached: the answer is the retried call's.
    let (_, headers, _) = parts(app.get_hashtag_as(ADMIN, "hashtag_name=held").await).await;
    assert!(header(&headers, "cache-status").contains("; hit;"));
    // A rejected key that is still the current one is not retried.
    upstream.set_key("sk-live-SOMEONE-ELSES");
    let (status, _, _) = parts(app.get_hashtag_as(ADMIN, "hashtag_name=other").await).await;
    assert_eq!(status, 502);
    assert_eq!((upstream.calls(), upstream.rejected()), (3, 2));
    common::assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_and_misses_through_20_reloads_and_3_rotations_see_no_error_and_pay_no_question_twice()
{
    let (files, upstream, app) = start("load", &admin_only()).await;
    let app = Arc::new(app);
    let stop = Arc::new(AtomicBool::new(false));
    let (requests, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let (app, stop) = (Arc::clone(&app), Arc::clone(&stop));
            let (requests, errors) = (Arc::clone(&requests), Arc::clone(&errors));
            tokio::spawn(async move {
                let mut asked = HashSet::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Mostly hits on a few hot names, and a new name now and then.
                    let name = match n % 4 {
                        0 => format!("new_{worker}_{n}"),
                        hot => format!("hot{hot}"),
                    };
                    n += 1;
                    let query = format!("hashtag_name={name}");
                    let (status, _, body) = parts(app.get_hashtag_as(ADMIN, &query).await).await;
                    requests.fetch_add(1, Ordering::Relaxed);
                    if status != 200 {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("error answer {status}: {body}");
                    }
                    asked.insert(name);
                }
                asked
            })
        })
        .collect();
    let mut rotations = 0;
    for round in 1..=20 {
        // Each reload changes something live: a client's limit, alternately.
        let limit = if round % 2 == 0 {
            "rate_per_minute = 100000"
        } else {
            ""
        };
        let body = clients(&[("ops", ADMIN, "admin = true"), ("team", TEAM, limit)]);
        files.write_config(&upstream, &body);
        let (status, report) = reload(&app, ADMIN).await;
        assert_eq!(
            (status, &report["outcome"]),
            (200, &Value::from("applied")),
            "{report}"
        );
        if round % 6 == 0 {
            // The harshest rotation: the secret is replaced and KeyAPI
            // revokes the old key at the same moment. Calls already sent
            // with it are refused and retried once with the new one.
            rotations += 1;
            let key = format!("sk-live-ROUND{round}-0123456789abcdef");
            files.replace_key(&key);
            upstream.set_key(&key);
            await_key(&app, rotations + 1).await;
        }
        // The load's own time between reloads (the test's pace, not a wait
        // for the proxy): each configuration serves some hits and misses.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut asked = HashSet::new();
    for worker in workers {
        asked.extend(worker.await.unwrap());
    }
    app.state.proxy().idle().await;
    let (requests, errors) = (
        requests.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    let (calls, rejected) = (upstream.calls(), upstream.rejected());
    let hits = app.state.metrics().totals().hits;
    println!(
        "zero-error reload run: {requests} requests ({hits} hits), {errors} errors, {calls} upstream \
         calls for {} distinct questions ({rejected} refused for a revoked key, each retried once), \
         20 reloads, {rotations} key rotations",
        asked.len()
    );
    assert_eq!(rotations, 3);
    assert_eq!(errors, 0);
    assert!(requests > asked.len(), "hits as well as misses");
    // No question was paid for twice: the only calls beyond one per question
    // are those KeyAPI refused for the key it had just revoked.
    assert_eq!(calls - rejected, asked.len());
    assert!(
        rejected <= 8 * 3,
        "at most one refused call per worker and rotation"
    );
    common::assert_ledger_equals_bill(&[&app]).await;
}

/// A reload that changes a client's entry while one of its calls is in
/// flight: the new entry's budget goes on with the old one's count, so the
/// call in progress shows as reserved there and settles there.
#[tokio::test]
async fn a_call_in_flight_across_a_reload_settles_on_the_budget_in_use() {
    let entries = |budget: &str| clients(&[("ops", ADMIN, "admin = true"), ("team", TEAM, budget)]);
    let (files, upstream, app) = start("in-flight", &entries("daily_budget = 100")).await;
    let team = |stats: &Value| {
        let clients = stats["clients"].as_array().unwrap();
        let team = clients.iter().find(|c| c["id"] == "team").unwrap();
        (
            team["creditsSpentToday"].clone(),
            team["creditsReserved"].clone(),
        )
    };
    upstream.hold();
    let call = app.get_hashtag_as(TEAM, "hashtag_name=inflight");
    let across = async {
        common::eventually(
            Duration::from_secs(10),
            "the call reaches KeyAPI",
            || async { upstream.calls() == 1 },
        )
        .await;
        files.write_config(&upstream, &entries("daily_budget = 50"));
        let (status, report) = reload(&app, ADMIN).await;
        assert_eq!((status, &report["outcome"]), (200, &Value::from("applied")));
        let during = team(&app.stats().await);
        upstream.release();
        during
    };
    let (answer, during) = tokio::join!(call, across);
    assert_eq!(answer.status(), 200);
    assert_eq!(
        during,
        (Value::from(0), Value::from(2)),
        "in flight, on the new entry"
    );
    // The fetch task settles just after the answer is sent.
    common::eventually(Duration::from_secs(10), "the call settles", || async {
        team(&app.stats().await) == (Value::from(2), Value::from(0))
    })
    .await;
    common::assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test]
async fn sighup_reloads_the_binary() {
    let files = LiveFiles::new("sighup");
    std::fs::write(&files.config, "[rate_limit]\nper_minute = 0\n").unwrap();
    let config = files.config.to_str().unwrap();
    let (child, addr) = common::binary::spawn_binary_with(None, &[], &["--config", config]).await;
    let stats = || async move {
        let body = reqwest::get(format!("http://{addr}/stats")).await.unwrap();
        serde_json::from_str::<Value>(&body.text().await.unwrap()).unwrap()
    };
    assert_eq!(stats().await["reloads"]["applied"], 0);
    std::fs::write(&files.config, "[rate_limit]\nper_minute = 100000\n").unwrap();
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    common::eventually(Duration::from_secs(10), "SIGHUP reloads", || async {
        stats().await["reloads"]["applied"] == 1
    })
    .await;
    let reloaded = stats().await;
    let last = &reloaded["reloads"]["last"];
    assert_eq!(
        last["applied"],
        serde_json::json!(["rate_limit.per_minute"]),
        "{last}"
    );
    // The process lives on.
    assert_eq!(stats().await["reloads"]["applied"], 1);
}

#[tokio::test]
async fn a_key_file_written_in_place_is_read_again_too() {
    let (files, upstream, app) = start("in-place", &admin_only()).await;
    // As a bind-mounted Docker secret changes: the same file, new contents.
    std::fs::write(&files.key, "sk-live-INPLACE-0123456789\n").unwrap();
    await_key(&app, 2).await;
    upstream.set_key("sk-live-INPLACE-0123456789");
    let (status, _, body) = parts(app.get_hashtag_as(ADMIN, "hashtag_name=nba").await).await;
    assert_eq!(status, 200, "{body}");
}

/// `log.level` changes on a reload, and wins over `RUST_LOG`: at `warn` the
/// reload's own `info` line is not written; after a reload to `info` it is.
#[tokio::test]
async fn a_reload_changes_the_log_level() {
    use tokio::io::{AsyncBufReadExt as _, BufReader};

    let files = LiveFiles::new("loglevel");
    std::fs::write(&files.config, "[log]\nlevel = \"warn\"\n").unwrap();
    let mut cmd = tokio::process::Command::from(common::binary::proxy_command());
    cmd.args(["--demo", "--config", files.config.to_str().unwrap()])
        .env("KEYAPI_PROXY__SERVER__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr: std::net::SocketAddr = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the demo's address");
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
        seen.push(line);
    };
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    let reloads = |outcome: &'static str| async move {
        let body = reqwest::get(format!("http://{addr}/stats")).await.unwrap();
        let stats: Value = serde_json::from_str(&body.text().await.unwrap()).unwrap();
        stats["reloads"][outcome].clone()
    };
    // Serving (and so handling SIGHUP) before the first signal.
    assert_eq!(reloads("unchanged").await, 0);
    // An unchanged reload at `warn`: done (counted), its info line filtered out.
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    common::eventually(Duration::from_secs(10), "the first reload", || async {
        reloads("unchanged").await == 1
    })
    .await;
    std::fs::write(&files.config, "[log]\nlevel = \"info\"\n").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let reloaded = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the proxy runs");
            if line.contains("configuration reloaded") {
                return line;
            }
            seen.push(line);
        }
    });
    let line = reloaded
        .await
        .expect("the info line after the level changed");
    assert!(line.contains("log.level"), "{line}");
    assert!(
        !seen.iter().any(|l| l.contains("configuration reloaded")),
        "a reload was logged at warn: {seen:?}"
    );
}
