//! `keyapi-proxy` command line: parse the arguments, run, exit. Everything
//! else is in the library ([`keyapi_proxy::cli`]).

use std::process::ExitCode;

use clap::Parser;
use keyapi_proxy::cli::{self, Cli};

/// mimalloc: fewer instructions per hit and less fragmentation between
/// long-lived cached bodies and short-lived request buffers (docs/architecture.md, "Smaller pieces").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    cli::run(Cli::parse()).await
}
