//! The `tracing` target that marks a span as a trace span, meant for
//! OpenTelemetry and never for log lines. The modules that make such spans
//! (`observe`, the proxy's fetch, the Redis tier) and `telemetry`, which
//! routes them by it, all import it from here, below each of them.

/// The `tracing` target of every span meant for OpenTelemetry.
pub(crate) const TRACE_TARGET: &str = "keyapi_proxy::trace";
