//! Unit tests of the parent module.

use super::*;

#[test]
fn changed_keys_name_leaves_and_whole_lists() {
    let old = serde_json::json!({"a": {"b": 1, "c": [1]}, "d": 1});
    let new = serde_json::json!({"a": {"b": 2, "c": [1, 2]}, "e": 1});
    assert_eq!(changed_keys(&old, &new), ["a.b", "a.c", "d", "e"]);
    assert!(changed_keys(&old, &old).is_empty());
}

#[test]
fn restart_only_keys_are_seen_and_kept_at_their_running_values() {
    let running = Config::defaults().unwrap();
    let mut new = running.clone();
    new.server.listen = "127.0.0.1:9999".parse().unwrap();
    new.cache.redis.url = Some(String::from("redis://10.0.0.1:6379").into());
    new.upstream.retries += 1;
    let restart = changed_keys(&restart_view(&running), &restart_view(&new));
    assert_eq!(restart, ["cache.redis.url", "server.listen"]);
    let kept = keep_running(new, &running);
    assert_eq!(kept.server.listen, running.server.listen);
    assert!(kept.cache.redis.url.is_none());
    assert_eq!(
        changed_keys(&json(&running), &json(&kept)),
        ["upstream.retries"]
    );
}
