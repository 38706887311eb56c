//! The process's shutdown signal: SIGINT (Ctrl-C) or SIGTERM (`docker stop`).

use std::future::Future;

/// Resolves when the process is asked to stop. The handlers are installed when
/// this is called, not when the future is first polled: a SIGTERM that arrives
/// before the server polls it must not kill the process unsnapshotted.
#[cfg(unix)]
pub(crate) fn signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        match (interrupt, terminate) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => {},
                    _ = terminate.recv() => {},
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGINT/SIGTERM");
                std::future::pending::<()>().await;
            }
        }
        tracing::info!("shutdown signal received; draining in-flight requests");
    }
}

/// Resolves when the process is asked to stop (Ctrl-C).
#[cfg(not(unix))]
pub(crate) fn signal() -> impl Future<Output = ()> {
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("shutdown signal received; draining in-flight requests");
    }
}
