//! Logging and traces.
//!
//! Logging: `RUST_LOG` filter (default `info`), pretty or JSON lines on stdout.
//!
//! Traces (`[telemetry]`, off while `otlp_endpoint` is unset): spans of the target
//! [`TRACE_TARGET`] go to an OpenTelemetry layer only, never into log lines, and
//! log events never into spans. Finished spans are queued (bounded) and a task
//! exports them in batches as OTLP protobuf over HTTP, with the proxy's own
//! `reqwest` client; when the queue is full or an export fails, spans are dropped
//! and counted in `keyapi_proxy_trace_spans_dropped_total`, so a slow or dead
//! collector never holds a request. Off, no layer is installed and no span is made.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use opentelemetry::{Context, trace::TracerProvider as _};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor},
};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
    time::Instant,
};
use tracing_subscriber::{
    EnvFilter, Layer, filter::FilterExt, filter::filter_fn, layer::SubscriberExt, reload,
    util::SubscriberInitExt,
};

use crate::{
    config::{LogFormat, TelemetryConfig},
    metrics::{self, SpanLoss},
    spans::TRACE_TARGET,
};

/// Finished spans waiting for export at most; beyond, new ones are dropped.
const QUEUE_SPANS: usize = 2048;
/// Spans sent in one export at most.
const BATCH_SPANS: usize = 512;
/// How long a batch waits to fill once its first span is queued.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// One export's time limit (connect, send, answer); the queue keeps filling meanwhile.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the final flush at shutdown may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TelemetryError {
    #[error("telemetry: cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("telemetry: cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The running exporter; [`flush`](Tracing::flush) it on shutdown.
pub(crate) struct Tracing {
    stop: Arc<Notify>,
    exporter: JoinHandle<()>,
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports what is queued (bounded by a short timeout), then stops.
    pub(crate) async fn flush(self) {
        self.stop.notify_one();
        if tokio::time::timeout(FLUSH_TIMEOUT, self.exporter)
            .await
            .is_err()
        {
            tracing::warn!("trace export did not finish at shutdown; queued spans dropped");
        }
        // Our processor holds nothing more; this only marks the provider shut.
        let _ = self.provider.shutdown();
    }
}

/// Replaces the running log filter (see [`set_log_level`]).
type Refilter = Box<dyn Fn(EnvFilter) -> Result<(), reload::Error> + Send + Sync>;

/// The installed subscriber's filter, for a configuration reload to replace.
static LOG_FILTER: OnceLock<Refilter> = OnceLock::new();

/// The log filter `level` (`log.level`) asks for; unset, `RUST_LOG`'s, else `info`.
fn log_filter(level: Option<&str>) -> EnvFilter {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).ok(),
        None => EnvFilter::try_from_default_env().ok(),
    };
    filter.unwrap_or_else(|| EnvFilter::new("info"))
}

/// `filter` with trace spans (Redis, upstream) off at their callsites: the
/// plain subscriber never makes them.
fn without_trace_spans(filter: EnvFilter) -> EnvFilter {
    match format!("{TRACE_TARGET}=off").parse() {
        Ok(off) => filter.add_directive(off),
        Err(_) => filter,
    }
}

/// Keeps `handle` for [`set_log_level`]; `adjust` is applied to each new filter.
fn keep_refilter<S: 'static>(
    handle: reload::Handle<EnvFilter, S>,
    adjust: fn(EnvFilter) -> EnvFilter,
) {
    let _ = LOG_FILTER.set(Box::new(move |filter| handle.reload(adjust(filter))));
}

/// Puts the log filter `level` asks for in use (a reload changed `log.level`).
/// The reload layer rebuilds the callsites' cached interest, so a log call
/// that stays off costs what it cost before.
pub(crate) fn set_log_level(level: Option<&str>) {
    if let Some(refilter) = LOG_FILTER.get()
        && let Err(error) = refilter(log_filter(level))
    {
        tracing::warn!(%error, "log.level could not be changed");
    }
}

/// Installs the global subscriber (logs, and traces when configured). Call
/// once, from `serve`, inside the Tokio runtime.
pub(crate) fn init(
    format: LogFormat,
    level: Option<&str>,
    telemetry: &TelemetryConfig,
) -> Result<Option<Tracing>, TelemetryError> {
    let filter = log_filter(level);
    let Some(endpoint) = &telemetry.otlp_endpoint else {
        // Off: the plain fmt subscriber with its global filter, as before
        // traces existed. The layered registry below costs a hit about 1,100
        // instructions and 2 allocations more (callgrind), even unused.
        let filter = without_trace_spans(filter);
        let result = match format {
            LogFormat::Pretty => {
                let builder = tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_filter_reloading();
                keep_refilter(builder.reload_handle(), without_trace_spans);
                builder.try_init()
            }
            LogFormat::Json => {
                let builder = tracing_subscriber::fmt()
                    .json()
                    .flatten_event(true)
                    .with_env_filter(filter)
                    .with_filter_reloading();
                keep_refilter(builder.reload_handle(), without_trace_spans);
                builder.try_init()
            }
        };
        if let Err(e) = result {
            eprintln!("logging was already initialised: {e}");
        }
        return Ok(None);
    };
    let (filter, handle) = reload::Layer::new(filter);
    keep_refilter(handle, |filter| filter);
    // Even at RUST_LOG=trace, trace spans stay out of log lines.
    let logs_only = filter.and(filter_fn(|meta| meta.target() != TRACE_TARGET));
    let fmt = tracing_subscriber::fmt::layer();
    let fmt = match format {
        LogFormat::Pretty => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let (traces, tracing) = otel_layer(endpoint, telemetry.sample_ratio)?;
    let result = tracing_subscriber::registry()
        .with(fmt.with_filter(logs_only))
        .with(traces)
        .try_init();
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
    Ok(Some(tracing))
}

/// The OpenTelemetry layer (trace spans only) and its exporter task.
fn otel_layer<S>(
    endpoint: &str,
    sample_ratio: f64,
) -> Result<(Box<dyn Layer<S> + Send + Sync>, Tracing), TelemetryError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpClient(client))
        .with_endpoint(endpoint)
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let resource = Resource::builder()
        .with_service_name("keyapi-proxy")
        .build();
    exporter.set_resource(&resource);
    let (queue, queued) = mpsc::channel(QUEUE_SPANS);
    let stop = Arc::new(Notify::new());
    let task = tokio::spawn(export_batches(queued, exporter, Arc::clone(&stop)));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor { queue })
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("keyapi-proxy");
    // Only our fields: no source locations, threads, targets or busy/idle times.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_level(false)
        .with_tracked_inactivity(false)
        .with_filter(filter_fn(|meta| meta.target() == TRACE_TARGET))
        .boxed();
    let tracing = Tracing {
        stop,
        exporter: task,
        provider,
    };
    Ok((layer, tracing))
}

/// Hands each finished span to the export task without waiting: a full
/// queue drops the span (and counts it) rather than hold the request.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            metrics::trace_spans_dropped(SpanLoss::QueueFull, 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: batches of up to [`BATCH_SPANS`], sent at most
/// [`BATCH_DELAY`] after their first span, one export at a time. On `stop`,
/// exports what is queued and ends.
async fn export_batches(
    mut queued: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    stop: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(BATCH_SPANS);
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            span = queued.recv() => match span {
                Some(span) => { batch.push(span); false }
                None => true,
            },
            () = stop.notified() => true,
        };
        if stopping {
            while let Ok(span) = queued.try_recv() {
                batch.push(span);
            }
            export(&exporter, &mut batch, &mut failing).await;
            return;
        }
        let deadline = Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_SPANS {
            match tokio::time::timeout_at(deadline, queued.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        export(&exporter, &mut batch, &mut failing).await;
    }
}

/// Sends `batch` (emptied); a failed or late export drops and counts its
/// spans. The collector's state is logged when it changes, not per batch.
async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    failing: &mut bool,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::replace(batch, Vec::with_capacity(BATCH_SPANS));
    let count = spans.len() as u64;
    let sent = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await;
    let error = match sent {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
    };
    match error {
        None if *failing => {
            *failing = false;
            tracing::info!("trace export to the OTLP collector works again");
        }
        None => {}
        Some(error) => {
            metrics::trace_spans_dropped(SpanLoss::ExportFailed, count);
            if !*failing {
                *failing = true;
                tracing::warn!(%error, "trace export to the OTLP collector failed; spans are dropped until it works");
            }
        }
    }
}

/// The exporter's HTTP client: our own `reqwest` (the exporter's built-in
/// one would pull in a second `reqwest` version).
#[derive(Debug)]
struct OtlpClient(reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        let mut answer = http::Response::new(body);
        *answer.status_mut() = status;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}
