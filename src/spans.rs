//! The `tracing` target that marks a span for OpenTelemetry (and keeps it
//! out of log lines): a leaf, so the lowest layers (the Redis connection)
//! can make spans without importing `telemetry`, which sits above them.

/// The `tracing` target of every span meant for OpenTelemetry.
pub(crate) const TRACE_TARGET: &str = "keyapi_proxy::trace";
