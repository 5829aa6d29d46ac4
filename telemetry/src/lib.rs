//! Telemetry every camelid binary sets up the same way: logs on stderr filtered by `CAMELID_LOG` (default `info`),
//! the spans of reconciles and requests, exported over OTLP/HTTP when an endpoint is given (`--otlp-endpoint` or
//! the standard `OTEL_EXPORTER_OTLP_ENDPOINT`), and the signal that starts a graceful shutdown.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The environment variable that filters logs and spans (`info`, `camelid_operator=debug,warn`, ...).
pub const LOG_ENV: &str = "CAMELID_LOG";

/// Flags every binary takes (flatten them into its clap parser).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Export spans to this OTLP/HTTP collector (e.g. `http://otel-collector:4318`); off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
}

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing spans to the OTLP collector: {e}");
        }
    }
}

/// Installs the global subscriber for `service` (the OTLP `service.name`). Call it once, before starting an
/// async runtime (the OTLP client runs on its own thread). An exporter that cannot be built is reported and
/// skipped: telemetry never stops a binary from starting.
pub fn init(service: &'static str, args: &TelemetryArgs) -> Telemetry {
    let filter = || EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter());
    let (provider, problem) = match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => match exporter(service, endpoint) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(format!("OTLP export to {endpoint} is off: {e}"))),
        },
        None => (None, None),
    };
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(filter())
    });
    let installed = tracing_subscriber::registry().with(logs).with(spans).try_init();
    if installed.is_err() {
        eprintln!("warning: a tracing subscriber was already installed; keeping it");
    }
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    } else if provider.is_some() {
        tracing::info!(service, "exporting spans over OTLP");
    }
    Telemetry { provider }
}

fn exporter(service: &'static str, endpoint: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before it kills a pod).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch for SIGTERM ({e}); only Ctrl-C stops this process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, () = term => {} }
}
