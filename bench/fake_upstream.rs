//! Benchmark upstream: [`keyapi_proxy::demo::FakeUpstream`] as its own process,
//! so `bench/run.sh` can pin it to a CPU and point a release proxy at it.
//!
//! Usage: `bench-fake-upstream LATENCY_MS API_KEY`. Listens on a free loopback
//! port, prints its base URL on stdout, and runs until killed. The number of
//! calls it received is at `GET <base URL>/__fake/calls` (not itself counted).

use std::{io::Write as _, process::ExitCode, time::Duration};

use keyapi_proxy::demo::FakeUpstream;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(latency), Some(key)) = (args.next(), args.next()) else {
        eprintln!("usage: bench-fake-upstream LATENCY_MS API_KEY");
        return ExitCode::FAILURE;
    };
    let Ok(latency) = latency.parse::<u64>() else {
        eprintln!("bench-fake-upstream: LATENCY_MS must be a whole number, got {latency:?}");
        return ExitCode::FAILURE;
    };
    let fake = match FakeUpstream::start(&key, Duration::from_millis(latency)).await {
        Ok(fake) => fake,
        Err(e) => {
            eprintln!("bench-fake-upstream: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", fake.base_url());
    let _ = std::io::stdout().flush();
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}
