//! The binary's start-up contract: configuration layering, key sources,
//! refusals, and the healthcheck subcommand.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;

use common::{
    binary::{proxy_command, run_binary as run},
    spawn_app,
};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_key_names_both_variables() {
    for args in [&["check-config"][..], &["serve"][..]] {
        let out = run(args, &[]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("KEYAPI_API_KEY ") && err.contains("KEYAPI_API_KEY_FILE"),
            "{err}"
        );
    }
}

#[test]
fn defaults_file_and_env_are_layered() {
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"0.0.0.0:9000\"\nopen = true\n[cache]\nttl = \"5m\"\n",
    )
    .unwrap();
    let out = run(
        &["--config", file.to_str().unwrap(), "check-config"],
        &[
            ("KEYAPI_API_KEY", "k"),
            ("KEYAPI_PROXY__CACHE__TTL", "2h"),
            (
                "KEYAPI_PROXY__SERVER__TRUSTED_PROXIES",
                r#"["10.0.0.0/8", "192.0.2.7"]"#,
            ),
        ],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains(r#"trusted_proxies = ["10.0.0.0/8", "192.0.2.7/32"]"#),
        "a list from the environment: {text}"
    );
    assert!(
        text.contains("listen = \"0.0.0.0:9000\""),
        "file wins over defaults: {text}"
    );
    assert!(text.contains("ttl = \"2h\""), "env wins over file: {text}");
    assert!(
        text.contains("request_timeout = \"10s\""),
        "defaults remain: {text}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn key_file_is_accepted() {
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-keyfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("key");
    std::fs::write(&file, "sk-from-file\n").unwrap();
    let out = run(
        &["check-config"],
        &[("KEYAPI_API_KEY_FILE", file.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let both = run(
        &["check-config"],
        &[
            ("KEYAPI_API_KEY_FILE", file.to_str().unwrap()),
            ("KEYAPI_API_KEY", "x"),
        ],
    );
    assert!(!both.status.success());
    assert!(stderr(&both).contains("only one"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn invalid_configuration_is_refused() {
    let cases = [
        (
            "KEYAPI_PROXY__UPSTREAM__BASE_URL",
            "http://api.keyapi.ai",
            "loopback",
        ),
        (
            "KEYAPI_PROXY__UPSTREAM__BASE_URL",
            "ftp://127.0.0.1",
            "scheme",
        ),
        ("KEYAPI_PROXY__CREDITS__PER_CALL", "0", "per_call"),
        ("KEYAPI_PROXY__CACHE__TTL", "soon", "ttl"),
        ("KEYAPI_PROXY__CACHE__TLL", "1h", "tll"),
        (
            "KEYAPI_PROXY__SERVER__TRUSTED_PROXIES",
            r#"["10.0.0.0/8", "10.0.0.0/33"]"#,
            "\"10.0.0.0/33\" is neither a cidr",
        ),
        (
            "KEYAPI_PROXY__SERVER__ALLOWED_HOSTS",
            r#"["localhost:8080"]"#,
            "\"localhost:8080\" is not a host",
        ),
        (
            "KEYAPI_PROXY__SERVER__CLIENT_ADDR_HEADER",
            "x-real-ip",
            "client_addr_header",
        ),
        (
            "KEYAPI_PROXY__ROUTES",
            r#"[{path = "/v1/x", params = [{name = "a", kind = "colour"}]}]"#,
            "found `colour`, expected `one of `one_of`, `int`, `region`, `hashtag`, `text``",
        ),
        (
            "KEYAPI_PROXY__ROUTES",
            r#"[{path = "/v1/x", freshness = "weekly"}]"#,
            "found `weekly`, expected ``fixed` or `daily``",
        ),
    ];
    for (name, value, hint) in cases {
        let out = run(&["check-config"], &[("KEYAPI_API_KEY", "k"), (name, value)]);
        assert!(!out.status.success(), "{name}={value} accepted");
        let err = stderr(&out);
        assert!(err.to_lowercase().contains(hint), "{name}={value}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    let missing = run(
        &["--config", "/nonexistent.toml", "check-config"],
        &[("KEYAPI_API_KEY", "k")],
    );
    assert!(stderr(&missing).contains("does not exist"));
    let local = run(
        &["check-config"],
        &[
            ("KEYAPI_API_KEY", "k"),
            ("KEYAPI_PROXY__UPSTREAM__BASE_URL", "http://127.0.0.1:9"),
        ],
    );
    assert!(local.status.success(), "plain http to loopback is allowed");
}

#[tokio::test]
async fn healthcheck_subcommand_probes_a_running_proxy() {
    let app = spawn_app().await;
    let url = app.url("/healthz");
    let ok = tokio::task::spawn_blocking(move || run(&["healthcheck", "--url", &url], &[]))
        .await
        .unwrap();
    assert!(ok.status.success(), "{}", stderr(&ok));
    let down = tokio::task::spawn_blocking(|| {
        run(&["healthcheck", "--url", "http://127.0.0.1:9/healthz"], &[])
    })
    .await
    .unwrap();
    assert!(!down.status.success());
}

/// Starts `serve --demo` listening on `listen` and returns its log lines up
/// to and including "listening", then stops it.
fn startup_log(listen: &str, config: Option<&std::path::Path>, env: &[(&str, &str)]) -> String {
    use std::io::{BufRead, BufReader};
    let mut cmd = proxy_command();
    cmd.env_remove("RUST_LOG");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let mut child = cmd
        .args(["--demo", "serve"])
        .env("KEYAPI_PROXY__SERVER__LISTEN", listen)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut log = String::new();
    for line in BufReader::new(stdout).lines().take(50) {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("listening") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    log
}

#[test]
fn an_open_proxy_on_a_public_address_needs_server_open() {
    let refused = run(
        &["--demo", "serve"],
        &[("KEYAPI_PROXY__SERVER__LISTEN", "0.0.0.0:0")],
    );
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("[[clients]]") && err.contains("server.open = true"),
        "says how to fix it: {err}"
    );

    let warning = "anyone who can reach this port spends your KeyAPI credits";
    let public = startup_log("0.0.0.0:0", None, &[("KEYAPI_PROXY__SERVER__OPEN", "true")]);
    assert!(public.contains(warning), "{public}");
    let loopback = startup_log("127.0.0.1:0", None, &[]);
    assert!(loopback.contains("listening"), "{loopback}");
    assert!(!loopback.contains(warning), "{loopback}");

    let dir = std::env::temp_dir().join(format!("keyapi-proxy-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("clients.toml");
    let hash = keyapi_proxy::digest::hex(&keyapi_proxy::digest::sha256(b"kp_x"));
    std::fs::write(
        &file,
        format!("[[clients]]\nid = \"a\"\ntoken_sha256 = \"{hash}\"\n"),
    )
    .unwrap();
    let guarded = startup_log("0.0.0.0:0", Some(&file), &[]);
    assert!(guarded.contains("listening"), "{guarded}");
    assert!(!guarded.contains(warning), "{guarded}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `deploy/kubernetes/base`: the ConfigMap's `config.toml` passes `check-config` with what
/// the Deployment adds (the key as a file, `secret.example.yaml`'s client hashes), and the
/// pod's termination timeline holds: `drain_delay` outlasts the readiness probe's period
/// times its failure threshold (the endpoint is gone before the listener closes), and
/// `drain_delay + shutdown_grace` leaves time for the final snapshot before the kubelet's
/// SIGKILL at `terminationGracePeriodSeconds`.
#[test]
fn the_kubernetes_configuration_is_valid_and_drains_before_the_kill() {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base");
    let read = |name: &str| std::fs::read_to_string(base.join(name)).unwrap();
    let secret = read("secret.example.yaml");
    let clients = secret
        .lines()
        .find_map(|line| line.trim().strip_prefix("clients: "))
        .expect("secret.example.yaml has a clients entry")
        .trim_matches('\'');
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("keyapi_key");
    std::fs::write(&key, "sk-mounted\n").unwrap();

    let out = run(
        &[
            "--config",
            base.join("config.toml").to_str().unwrap(),
            "check-config",
        ],
        &[
            ("KEYAPI_API_KEY_FILE", key.to_str().unwrap()),
            ("KEYAPI_PROXY__CLIENTS", clients),
        ],
    );
    std::fs::remove_dir_all(dir).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let effective: toml::Table = toml::from_str(&stdout(&out)).unwrap();
    let server = effective["server"].as_table().unwrap();
    let duration = |name: &str| {
        humantime_serde::re::humantime::parse_duration(server[name].as_str().unwrap())
            .unwrap()
            .as_secs()
    };
    let (drain_delay, shutdown_grace) = (duration("drain_delay"), duration("shutdown_grace"));

    let deployment = read("deployment.yaml");
    // The first `name: N` at or after the line holding `after` (a YAML field of the Deployment).
    let field = |after: &str, name: &str| -> u64 {
        deployment
            .lines()
            .skip_while(|line| !line.contains(after))
            .find_map(|line| line.trim().strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("deployment.yaml: no {name} after {after}"))
            .parse()
            .unwrap()
    };
    let kill_after = field(
        "terminationGracePeriodSeconds",
        "terminationGracePeriodSeconds",
    );
    let probe_period = field("readinessProbe:", "periodSeconds");
    let probe_failures = field("readinessProbe:", "failureThreshold");
    assert!(
        drain_delay > probe_period * probe_failures,
        "drain_delay {drain_delay}s must outlast the readiness probe ({probe_period}s x {probe_failures})"
    );
    let snapshot_margin = 5;
    assert!(
        drain_delay + shutdown_grace + snapshot_margin <= kill_after,
        "drain_delay {drain_delay}s + shutdown_grace {shutdown_grace}s + {snapshot_margin}s for \
         the final snapshot must fit in terminationGracePeriodSeconds {kill_after}"
    );
}
