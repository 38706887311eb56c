//! The `keyapi-proxy` binary itself: run once for its output, or serving
//! `--demo` (its built-in fake KeyAPI) on a free port.

use std::{
    net::SocketAddr,
    process::{Output, Stdio},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// The binary, with none of the test environment's `KEYAPI_*` variables (so
/// a developer's own key or settings cannot leak into a test).
pub fn proxy_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keyapi-proxy"));
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYAPI_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs the binary with `args` and `env` to the end; its output.
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> Output {
    proxy_command()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs")
}

/// The binary in `--demo` mode on a free port, its descriptor limit set to
/// `nofile` when given; returns it and its address.
pub async fn spawn_binary(nofile: Option<u64>, env: &[(&str, &str)]) -> (Child, SocketAddr) {
    spawn_binary_with(nofile, env, &[]).await
}

/// [`spawn_binary`] with its Redis tier set by `redis`, pairs of a
/// `[cache.redis]` key in capitals (`URL`, `SENTINELS`, `MASTER_NAME`,
/// `CLUSTER_NODES`) and its value, over TLS with `cert` trusted: the
/// system's trust store, extended for it the standard way (`SSL_CERT_FILE`).
pub async fn spawn_binary_on_tls_redis(
    redis: &[(&str, &str)],
    cert: &std::path::Path,
) -> (Child, SocketAddr) {
    let vars: Vec<(String, &str)> = redis
        .iter()
        .map(|(key, value)| (format!("KEYAPI_PROXY__CACHE__REDIS__{key}"), *value))
        .collect();
    let mut env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    // A debug build's first TLS handshakes can take longer than the default 50 ms.
    env.push(("KEYAPI_PROXY__CACHE__REDIS__OP_TIMEOUT", "2s"));
    env.push(("SSL_CERT_FILE", cert.to_str().expect("a UTF-8 path")));
    spawn_binary(None, &env).await
}

/// [`spawn_binary`] with more command-line arguments (`--config <file>`).
pub async fn spawn_binary_with(
    nofile: Option<u64>,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Child, SocketAddr) {
    let mut cmd = Command::from(proxy_command());
    cmd.arg("--demo")
        .args(args)
        .env("KEYAPI_PROXY__SERVER__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(limit) = nofile {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(rest) = line.split("http://").nth(1) {
            let addr = rest.split('/').next().unwrap().parse().unwrap();
            return (child, addr);
        }
    }
    panic!("the demo printed no address");
}
