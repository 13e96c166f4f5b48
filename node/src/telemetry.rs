//! OpenTelemetry traces, when an OTLP endpoint is configured: the spans of
//! the node's log are exported over OTLP/gRPC (plain `http://`; a
//! collector runs beside the node) with a batch processor. The spans:
//! `rpc` (every API call), `commit` (a snapshot made durable and recorded),
//! `forwarded_command` (a leader proposing a follower's command),
//! `replicate` (sending a snapshot to one replica over QUIC),
//! `store_replica` (a replica storing it), `acquire_lease`, `job` (one
//! run of a leased job) and `sink_write`. W3C trace context crosses every
//! hop as a `traceparent`: from clients in gRPC metadata, to the leader
//! with a forwarded command, to replicas in the QUIC request of a
//! manifest, and from the submitting call into its job's record
//! (`bitclone_raft::context`).

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// A tracer provider exporting to `endpoint`, sampling `ratio` of new
/// traces and following the caller's choice for the rest.
pub fn provider(endpoint: &str, ratio: f64, node_id: u64) -> anyhow::Result<SdkTracerProvider> {
    if !(0.0..=1.0).contains(&ratio) {
        anyhow::bail!("the trace sample ratio {ratio} is not between 0 and 1");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| anyhow::anyhow!("the OTLP exporter for {endpoint}: {e}"))?;
    let resource = Resource::builder()
        .with_service_name("bitclone")
        .with_attribute(KeyValue::new("service.instance.id", node_id.to_string()))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource)
        .build())
}
