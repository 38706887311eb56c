//! Snapshot files in hostile directories: a planted symlink (at the temporary
//! name or the target) is never followed, a planted or damaged entry is
//! never served, and intervals that would spin the saver are refused at
//! start-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{os::unix::fs::symlink, path::PathBuf, time::Duration};

use common::{
    TEST_API_KEY, assert_hit,
    entries::{RawEntry, hashtag_key, poisoned, snapshot_file},
    metric, spawn_app_with, test_config,
};
use keyapi_proxy::config::Config;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_snapshot_never_writes_through_a_planted_symlink() {
    let dir = temp_dir("snap-symlink");
    let path = dir.join("cache.snap");
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    symlink(&victim, dir.join("cache.snap.tmp")).unwrap();
    let with_snapshot = |c: &mut Config| c.cache.snapshot_path = Some(path.clone());

    let mut first = spawn_app_with(with_snapshot).await;
    first.get("hashtag_name=ufc324").await;
    first.begin_shutdown().await.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!path.is_symlink() && std::fs::read(&path).unwrap().starts_with(b"KAPSNAP1"));

    // A symlink at the target itself is replaced, not written through.
    std::fs::remove_file(&path).unwrap();
    symlink(&victim, &path).unwrap();
    let mut second = first.spawn_replica(with_snapshot).await;
    second.get("hashtag_name=ufc324").await;
    second.begin_shutdown().await.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!path.is_symlink());

    let third = first.spawn_replica(with_snapshot).await;
    let (status, headers, _) = third.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200);
    assert_hit(&headers);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn poisoned_snapshot_entries_are_never_served_and_are_counted() {
    let dir = temp_dir("snap-poison");
    let path = dir.join("cache.snap");
    let max_body_bytes = 64 * 1024;
    let poison = poisoned(TEST_API_KEY, max_body_bytes);
    let mut records = vec![(
        hashtag_key("good"),
        RawEntry::success("written by hand").encode(),
    )];
    for (i, (_, entry)) in poison.iter().enumerate() {
        records.push((hashtag_key(&format!("p{i}")), entry.encode()));
    }
    std::fs::write(&path, snapshot_file(&records)).unwrap();

    let app = spawn_app_with(|c| {
        c.cache.snapshot_path = Some(path.clone());
        c.upstream.max_body_bytes = max_body_bytes;
    })
    .await;
    assert_eq!(
        app.state.proxy().cache().entry_count(),
        1,
        "only the good one loaded"
    );
    let (_, headers, body) = app.get("hashtag_name=good").await;
    assert_hit(&headers);
    assert!(body.contains("written by hand"), "{body}");
    for (i, (reason, _)) in poison.iter().enumerate() {
        let (status, _, body) = app.get(&format!("hashtag_name=p{i}")).await;
        assert_eq!(status, 200, "{reason}");
        assert!(!body.contains("poison"), "{reason}: {body}");
    }
    assert_eq!(app.upstream.calls(), poison.len());
    let text = app.metrics().await;
    for (reason, _) in &poison {
        let series = format!(
            "keyapi_proxy_cache_entries_rejected_total{{source=\"snapshot\",reason=\"{reason}\"}}"
        );
        let expected = poison.iter().filter(|(r, _)| r == reason).count() as f64;
        assert_eq!(metric(&text, &series), expected, "{series}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn zero_or_tiny_snapshot_intervals_are_refused() {
    for interval in [Duration::ZERO, Duration::from_millis(10)] {
        let mut config = test_config();
        config.cache.snapshot_interval = interval;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("cache.snapshot_interval"), "{error}");
    }
    let out = common::binary::run_binary(
        &["--demo", "serve"],
        &[("KEYAPI_PROXY__CACHE__SNAPSHOT_INTERVAL", "0s")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "one line, no panic: {err}");
}
