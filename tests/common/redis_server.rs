//! A real `redis-server` per test, on a free port, from the binary on PATH.
//! Missing binary: the test says so loudly and is skipped — unless
//! `KEYAPI_REQUIRE_REDIS=1` (set by CI), where it fails.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use keyapi_proxy::config::Config;

/// Config adjustment: the Redis tier at `url`.
pub fn with_redis(url: &str) -> impl Fn(&mut Config) + '_ {
    move |c: &mut Config| {
        c.cache.redis.url = Some(url.to_owned().into());
        // Generous under a loaded CI machine; still far below any client timeout.
        c.cache.redis.op_timeout = Duration::from_secs(1);
    }
}

/// Waits until `app`'s own Redis connection answers (it reconnects in the
/// background, within a second or so): pings through it until one answers.
pub async fn until_redis_answers(app: &super::TestApp) {
    let redis = app.state.proxy().redis().expect("a Redis tier");
    super::eventually(
        Duration::from_secs(10),
        "the app reconnects to Redis",
        || async {
            let pong: Option<String> = redis.conn().query("PING", &redis::cmd("PING")).await;
            pong.is_some()
        },
    )
    .await;
}

/// A running `redis-server`, killed on drop.
pub struct RedisServer {
    pub port: u16,
    /// `requirepass`, when started with [`RedisServer::start_with_password`].
    password: Option<String>,
    /// The TLS port, when started with [`RedisServer::start_with_tls`].
    pub tls_port: Option<u16>,
    /// Arguments beyond port, bind and persistence.
    extra_args: Vec<String>,
    /// A Sentinel's configuration file (then it runs with `--sentinel`).
    sentinel_config: Option<PathBuf>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server, or `None` (after a loud message) if the binary is missing.
    pub async fn start() -> Option<Self> {
        Self::start_with_args(Vec::new()).await
    }

    /// Starts a server that requires `password` (`--requirepass`).
    pub async fn start_with_password(password: &str) -> Option<Self> {
        let guard = Guard {
            password: Some(password),
            tls: None,
            links: "--tls-replication",
        };
        Self::start_guarded(Vec::new(), guard).await
    }

    /// Starts a server that also speaks TLS on [`RedisServer::tls_port`], with
    /// this PEM certificate (which clients must trust) and key.
    pub async fn start_with_tls(cert: &Path, key: &Path) -> Option<Self> {
        let guard = Guard {
            password: None,
            tls: Some((cert, key)),
            links: "--tls-replication",
        };
        Self::start_guarded(Vec::new(), guard).await
    }

    /// Starts a server with `args` beyond port, bind and persistence (a
    /// replica, a cluster node), or `None` if the binary is missing.
    pub async fn start_with_args(args: Vec<String>) -> Option<Self> {
        Self::spawn(None, args).await
    }

    /// Starts a Sentinel (`redis-server <config> --sentinel`) whose
    /// configuration file (which it rewrites) is `config`.
    pub async fn start_sentinel(config: PathBuf) -> Option<Self> {
        Self::spawn(Some(config), Vec::new()).await
    }

    async fn spawn(sentinel_config: Option<PathBuf>, extra_args: Vec<String>) -> Option<Self> {
        if !available("redis-server") {
            return None;
        }
        let mut server = Self {
            port: free_port(),
            password: None,
            tls_port: None,
            extra_args,
            sentinel_config,
            child: None,
        };
        server.restart().await;
        Some(server)
    }

    /// This server as one that requires `password` (given to it in its
    /// arguments or configuration file): its [`RedisServer::url`] carries it.
    pub fn requiring(mut self, password: Option<&str>) -> Self {
        self.password = password.map(str::to_owned);
        self
    }

    /// `redis://127.0.0.1:<port>`, with the password when there is one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The port a proxy is given: the TLS one when the server speaks TLS.
    pub fn served_port(&self) -> u16 {
        self.tls_port.unwrap_or(self.port)
    }

    /// [`RedisServer::url`], but `rediss://` on the TLS port when the server
    /// speaks TLS: what a proxy is configured with.
    pub fn served_url(&self) -> String {
        match self.tls_port {
            Some(port) => match &self.password {
                Some(password) => format!("rediss://:{password}@127.0.0.1:{port}"),
                None => format!("rediss://127.0.0.1:{port}"),
            },
            None => self.url(),
        }
    }

    /// Kills the server (like a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on the same port; returns once it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        let port = self.port;
        let extra_args = self.extra_args.clone();
        let sentinel_config = self.sentinel_config.clone();
        let child = tokio::task::spawn_blocking(move || {
            let mut command = Command::new("redis-server");
            // A Sentinel logs no "Ready" line: its first monitored master is the signal.
            let ready = match &sentinel_config {
                Some(config) => {
                    command.arg(config).arg("--sentinel");
                    "+monitor master"
                }
                None => {
                    command.args(["--save", "", "--appendonly", "no"]);
                    "Ready to accept connections"
                }
            };
            let mut child = command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--loglevel", "notice"])
                .args(&extra_args)
                .stdout(Stdio::piped())
                .spawn()
                .expect("redis-server starts");
            let stdout = child.stdout.take().expect("piped stdout");
            // The server's own readiness line is the signal, not a sleep.
            let ready = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|line| line.contains(ready));
            assert!(ready, "redis-server on port {port} did not become ready");
            child
        })
        .await
        .expect("redis start task");
        self.child = Some(child);
    }

    /// A plain connection for arranging and inspecting state.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }
}

/// How a server guards itself: a password (`requirepass`, and `masterauth`
/// toward its primary), and TLS beside its plain port with this certificate
/// and key, `links` (`--tls-replication`, `--tls-cluster`) putting its links
/// to other servers on TLS too.
#[derive(Clone, Copy)]
pub struct Guard<'a> {
    pub password: Option<&'a str>,
    pub tls: Option<(&'a Path, &'a Path)>,
    pub links: &'a str,
}

impl RedisServer {
    /// A server started with `args` beyond port, bind and persistence, and
    /// guarded by `guard`; `None` if the binary is missing.
    pub async fn start_guarded(mut args: Vec<String>, guard: Guard<'_>) -> Option<Self> {
        if let Some(password) = guard.password {
            args.extend(["--requirepass", password, "--masterauth", password].map(str::to_owned));
        }
        let tls_port = guard.tls.map(|(cert, key)| {
            let port = free_port();
            args.extend(tls_args(cert, key, port));
            args.extend([guard.links.to_owned(), "yes".to_owned()]);
            port
        });
        let mut server = Self::start_with_args(args).await?.requiring(guard.password);
        server.tls_port = tls_port;
        Some(server)
    }
}

/// Arguments that make a server also speak TLS on `tls_port`, with this
/// certificate (its own CA too) and key, not asking clients for theirs.
fn tls_args(cert: &Path, key: &Path, tls_port: u16) -> Vec<String> {
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &cert,
        "--tls-auth-clients",
        "no",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A self-signed certificate for 127.0.0.1 in `dir` (cert, key); `None`
/// (after a loud message) without the `openssl` command.
pub fn self_signed_cert(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        // A server certificate, not a CA: webpki refuses a CA as the end entity.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        // Client use too: cluster nodes present it to each other on the bus.
        .args(["-addext", "extendedKeyUsage=serverAuth,clientAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!(
            "\n*** SKIPPED: openssl is not on PATH; it makes the TLS test's certificate ***\n"
        );
    }
    made.then_some((cert, key))
}

/// Whether `program` runs; a loud skip without it, a failure under
/// `KEYAPI_REQUIRE_REDIS=1` (set by CI).
pub fn available(program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("KEYAPI_REQUIRE_REDIS").is_none(),
            "{program} is required (KEYAPI_REQUIRE_REDIS is set) but not on PATH"
        );
        eprintln!(
            "\n*** SKIPPED: {program} is not on PATH; install it to run the Redis tests ***\n"
        );
    }
    found
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
