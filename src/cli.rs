//! The command line: `serve` (the default, optionally `--demo`),
//! `check-config`, `hash-token` and `healthcheck`. `main.rs` only parses the
//! arguments and calls [`run`].

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use secrecy::SecretString;

use crate::{
    access,
    app::{self, App, Origin},
    clock::SystemClock,
    config::{self, Config},
    demo::FakeUpstream,
    route::HASHTAG_DETAIL_PATH,
    shutdown, telemetry,
};

/// Caching, single-flight proxy for KeyAPI's paid endpoints.
#[derive(Debug, Parser)]
#[command(name = "keyapi-proxy", version, about)]
pub struct Cli {
    /// TOML file overriding the built-in defaults (see config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Start a built-in fake KeyAPI on loopback and proxy to it (no key needed).
    #[arg(long)]
    demo: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Serve,
    /// Print the effective configuration (key redacted); exit 1 if it is invalid.
    CheckConfig,
    /// Print a new random client token and its SHA-256 (for a `[[clients]]` entry).
    HashToken,
    /// Print each warm-up's normalized questions and what a full run costs.
    Warmup {
        /// Only print; never call KeyAPI (required: warm-ups run inside `serve`).
        #[arg(long)]
        dry_run: bool,
    },
    /// Probe /healthz of a running proxy; exit 0 when healthy (for Docker HEALTHCHECK).
    Healthcheck {
        /// Full URL to probe; defaults to the configured listen address.
        #[arg(long)]
        url: Option<String>,
    },
}

/// Runs what the command line asks for.
pub async fn run(cli: Cli) -> ExitCode {
    if matches!(cli.command, Some(Command::HashToken)) {
        return hash_token();
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => check_config(&config, cli.demo),
        Command::Healthcheck { url } => healthcheck(&config, url).await,
        Command::Serve => serve(config, cli.config, cli.demo).await,
        Command::HashToken => hash_token(),
        Command::Warmup { dry_run } => warmup(&config, dry_run),
    }
}

fn hash_token() -> ExitCode {
    match access::new_token() {
        Ok((token, hash)) => {
            println!(
                "token:        {token}\ntoken_sha256: {hash}\n\n\
                 # Give the token to the client; put only the hash in the configuration:\n\
                 [[clients]]\nid = \"CHANGE-ME\"\ntoken_sha256 = \"{hash}\""
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("no randomness available: {e}")),
    }
}

fn warmup(config: &Config, dry_run: bool) -> ExitCode {
    if !dry_run {
        return fail(&"warm-ups run inside `serve`; use `warmup --dry-run` to see what they ask");
    }
    let plans = match app::compile(config) {
        Ok((_, plans)) => plans,
        Err(e) => return fail(&e),
    };
    if plans.is_empty() {
        println!("no [[warmup]] configured");
    }
    for plan in &plans {
        println!(
            "{} ({}, at most {} credits a day): {} questions x {} credits = {} credits for a full run",
            plan.name,
            plan.schedule,
            plan.allowance,
            plan.keys.len(),
            plan.route.credits(),
            plan.full_run_credits()
        );
        for key in &plan.keys {
            println!("  {key}");
        }
    }
    ExitCode::SUCCESS
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("keyapi-proxy: {error}");
    ExitCode::FAILURE
}

fn check_config(config: &Config, demo: bool) -> ExitCode {
    if let Err(e) = app::compile(config) {
        return fail(&e);
    }
    let key = if demo {
        Ok("demo key")
    } else {
        config::api_key_from_env().map(|_| "[redacted]")
    };
    let tree = match toml::to_string(config) {
        Ok(tree) => tree,
        Err(e) => return fail(&e),
    };
    match key {
        Ok(shown) => {
            println!("api_key = \"{shown}\"\n\n{tree}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("api_key = \"[missing]\"\n\n{tree}");
            fail(&e)
        }
    }
}

async fn healthcheck(config: &Config, url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let mut addr = config.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}/healthz")
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build();
    let healthy = match client {
        Ok(client) => client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success()),
        Err(_) => false,
    };
    if healthy {
        ExitCode::SUCCESS
    } else {
        fail(&format!("{url} is not healthy"))
    }
}

async fn serve(mut config: Config, config_file: Option<PathBuf>, demo: bool) -> ExitCode {
    let tracing = match telemetry::init(
        config.log.format,
        config.log.level.as_deref(),
        &config.telemetry,
    ) {
        Ok(tracing) => tracing,
        Err(e) => return fail(&e),
    };
    let mut _fake = None;
    let mut origin = Origin {
        config_file,
        ..Origin::default()
    };
    let api_key = if demo {
        const DEMO_KEY: &str = "demo-key-not-a-secret";
        let fake = match FakeUpstream::start(DEMO_KEY, Duration::from_millis(150)).await {
            Ok(fake) => fake,
            Err(e) => return fail(&format!("cannot start the demo upstream: {e}")),
        };
        config.upstream.base_url = fake.base_url();
        origin.base_url = Some(fake.base_url());
        _fake = Some(fake);
        SecretString::from(DEMO_KEY)
    } else {
        origin.key_file = config::api_key_file_from_env();
        match config::api_key_from_env() {
            Ok(key) => key,
            Err(e) => return fail(&e),
        }
    };
    let app = match App::build_from(origin, config, api_key, Arc::new(SystemClock)).await {
        Ok(app) => app,
        Err(e) => return fail(&e),
    };
    if demo {
        println!(
            "demo: built-in fake KeyAPI (~150 ms per call). Try:\n  curl -i 'http://{}{HASHTAG_DETAIL_PATH}?hashtag_name=ufc324&region=US'",
            app.local_addr()
        );
    }
    app.run_until(shutdown::signal()).await;
    if let Some(tracing) = tracing {
        tracing.flush().await;
    }
    ExitCode::SUCCESS
}
