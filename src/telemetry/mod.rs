//! Telemetry: pdgate's log ([`logs`]: text or JSON lines on stderr), the metrics registry (always on: `GET /metrics` on the API port) and, when an
//! OTLP endpoint is configured, one span per decision and the metrics exported over OTLP/gRPC.
//!
//! Nothing here is process-global: each [`Telemetry`] owns its tracer and meter providers, so
//! several sidecars in one process (the tests) export to their own collectors, and a sidecar
//! without an endpoint pays one branch per call for tracing.
//!
//! Spans are made with the OpenTelemetry API directly, not through `tracing`: a call's span is
//! parented on the caller's W3C `traceparent` ([`TraceContextPropagator`]), carries the
//! decision as attributes, and its context replaces the `traceparent` forwarded upstream.
//! Spans never carry data-subject ids: the audit log, not the tracing backend, is where those
//! are kept.
//!
//! The SDK's batch span processor and periodic metric reader run on threads of their own;
//! their flush and shutdown block, so [`Telemetry::shutdown`] runs them on the blocking pool.

pub mod audit_export;
pub mod logs;
pub mod metrics;
pub mod process;
pub mod upstream;

use crate::decision::{Decision, Request};
use http::{HeaderMap, HeaderName, HeaderValue};
use metrics::Metrics;
use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::sync::Arc;
use std::time::Duration;

/// Telemetry settings (`[telemetry]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// An OTLP/gRPC collector, `http://HOST:PORT`; `None`: nothing is exported and no spans
    /// are made.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// How often metrics are exported.
    pub metrics_interval: Duration,
    /// Export every audit record, once written, to the collector as a log record
    /// ([`audit_export`]); needs `otlp_endpoint`.
    pub export_audit: bool,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            metrics_interval: DEFAULT_METRICS_INTERVAL,
            export_audit: false,
        }
    }
}

pub const DEFAULT_SERVICE_NAME: &str = "pdgate";
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for `{endpoint}` cannot be built: {message}")]
    Exporter { endpoint: String, message: String },
}

/// The metrics registry and, with OTLP on, the tracer and the exporters.
pub struct Telemetry {
    metrics: Arc<Metrics>,
    otel: Option<Otel>,
    /// With `export_audit`: the audit export, finished by [`Telemetry::shutdown`].
    audit_export: std::sync::Mutex<Option<audit_export::AuditExport>>,
}

/// What exists only with OTLP on. The providers own the exporter threads; they are stopped by
/// [`Telemetry::shutdown`] (or, failing that, when the last tracer and meter are dropped).
struct Otel {
    tracer: SdkTracer,
    latency: Histogram<f64>,
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
}

/// The span of one decision (a call through the data plane, a Check, an Envoy check). It ends
/// when dropped: the data plane keeps it in the response body, so that it covers the whole
/// call, stream included.
pub struct CallSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl Telemetry {
    /// Metrics only: no spans, nothing exported.
    pub fn metrics_only(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            otel: None,
            audit_export: std::sync::Mutex::default(),
        }
    }

    /// Starts exporting `audit`'s records when `settings` asks for it (`export_audit`, with
    /// an endpoint). Inside a tokio runtime.
    pub fn with_audit_export(
        self,
        settings: &TelemetrySettings,
        audit: &crate::audit::AuditLog,
    ) -> Result<Self, TelemetryError> {
        let (true, Some(endpoint)) = (settings.export_audit, &settings.otlp_endpoint) else {
            return Ok(self);
        };
        let export = audit_export::AuditExport::start(
            audit,
            endpoint,
            &settings.service_name,
            self.metrics.audit_export_stats(),
        )?;
        *self
            .audit_export
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(export);
        Ok(self)
    }

    /// Starts the OTLP exporters when `settings` names an endpoint. Must run inside a tokio
    /// runtime: the exporters' gRPC channels live on it.
    pub fn start(
        settings: &TelemetrySettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TelemetryError> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(Self::metrics_only(metrics));
        };
        let failed = |e: &dyn std::fmt::Display| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            message: e.to_string(),
        };
        // The exporters' channels spawn their connection tasks: outside a runtime that would
        // panic, so it is refused here instead.
        tokio::runtime::Handle::try_current().map_err(|e| failed(&e))?;
        use opentelemetry_otlp::WithExportConfig as _;
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| failed(&e))?;
        let exported_metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| failed(&e))?;
        // The environment's resource detectors stay (OTEL_RESOURCE_ATTRIBUTES adds the pod's
        // attributes, say); the configured service name wins over OTEL_SERVICE_NAME.
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        let tracer_provider = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(spans)
            .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(
                PeriodicReader::builder(exported_metrics)
                    .with_interval(settings.metrics_interval)
                    .build(),
            )
            .build();
        let tracer = tracer_provider.tracer("pdgate");
        let latency = metrics::register(&metrics, &meter_provider.meter("pdgate"));
        Ok(Self {
            metrics,
            audit_export: std::sync::Mutex::default(),
            otel: Some(Otel {
                tracer,
                latency,
                tracer_provider,
                meter_provider,
            }),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether spans are made (OTLP is on).
    pub fn tracing(&self) -> bool {
        self.otel.is_some()
    }

    /// Starts the span of a decision for the RPC `rpc_method` (`pkg.Service/Method`),
    /// parented on the `traceparent` in `parent` (a new trace without one). `None` when OTLP
    /// is off: nothing is allocated then.
    pub fn start_span(&self, parent: &HeaderMap, rpc_method: &str) -> Option<CallSpan> {
        let otel = self.otel.as_ref()?;
        let parent = TraceContextPropagator::new().extract(&Headers(parent));
        let span = otel
            .tracer
            .span_builder(rpc_method.to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.method", rpc_method.to_owned()),
            ])
            .start_with_context(&otel.tracer, &parent);
        Some(CallSpan { span })
    }

    /// Counts a decision in the metrics: `purpose` is the label value (see
    /// [`metrics`]), `latency` the time since the call arrived.
    pub fn record_decision(&self, decision: &Decision, purpose: &str, latency: Duration) {
        let first = decision.reasons.first().map(|r| r.code);
        self.metrics
            .record_decision(decision.allowed, purpose, first, latency);
        if let Some(otel) = &self.otel {
            otel.latency.record(latency.as_secs_f64(), &[]);
        }
    }

    /// Exports what is still buffered and stops the exporters; later spans are dropped. Call
    /// it once the servers have stopped.
    pub async fn shutdown(&self) {
        let export = self
            .audit_export
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(export) = export {
            export.finish().await;
        }
        let Some(otel) = &self.otel else {
            return;
        };
        let tracer_provider = otel.tracer_provider.clone();
        let meter_provider = otel.meter_provider.clone();
        // Both block until their exporter threads have sent everything (the SDK gives up
        // after 5 s each), so they run on the blocking pool, side by side: a collector that
        // does not answer delays the exit by 5 s, not 10.
        let spans = tokio::task::spawn_blocking(move || tracer_provider.shutdown());
        let metrics = tokio::task::spawn_blocking(move || meter_provider.shutdown());
        let (spans, metrics) = tokio::join!(spans, metrics);
        for (what, result) in [("spans", spans), ("metrics", metrics)] {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "{what} not fully exported at shutdown"),
                Err(e) => tracing::warn!(error = %e, "{what}: exporter shutdown did not finish"),
            }
        }
    }
}

impl CallSpan {
    /// Records the decision as attributes: `pdgate.decision` (`allow`/`deny`),
    /// `pdgate.reasons`, `pdgate.caller`, `pdgate.purpose`, `pdgate.action`,
    /// `pdgate.categories`, `pdgate.policy_version`, `pdgate.decision_id`, `pdgate.cache_hit`
    /// and, when the decision is about a method of the protected service, `pdgate.method`; an
    /// allow that minimizes adds `pdgate.minimized` (the categories cleared from responses).
    /// A denial sets `rpc.grpc.status_code` 7 (`PERMISSION_DENIED`).
    pub fn record_decision(
        &mut self,
        decision: &Decision,
        request: &Request,
        method: Option<&str>,
    ) {
        use opentelemetry::trace::Span as _;
        // The caller's sampling decision holds: an unsampled span records nothing, so building
        // the attributes would be wasted.
        if !self.span.is_recording() {
            return;
        }
        let strings = |values: &mut dyn Iterator<Item = String>| {
            Value::Array(Array::String(values.map(StringValue::from).collect()))
        };
        let mut attributes = vec![
            KeyValue::new(
                "pdgate.decision",
                if decision.allowed { "allow" } else { "deny" },
            ),
            KeyValue::new(
                "pdgate.reasons",
                strings(&mut decision.reasons.iter().map(|r| r.code.as_str().to_owned())),
            ),
            KeyValue::new("pdgate.caller", request.caller.clone()),
            KeyValue::new("pdgate.purpose", request.purpose.clone()),
            KeyValue::new("pdgate.action", request.action.clone()),
            KeyValue::new(
                "pdgate.categories",
                strings(&mut request.categories.iter().cloned()),
            ),
            KeyValue::new("pdgate.decision_id", decision.decision_id.to_string()),
            KeyValue::new("pdgate.cache_hit", decision.cache_hit),
        ];
        if let Some(version) = decision.policy_version {
            attributes.push(KeyValue::new("pdgate.policy_version", version.to_string()));
        }
        if let Some(method) = method {
            attributes.push(KeyValue::new("pdgate.method", method.to_owned()));
        }
        if !decision.minimized.is_empty() {
            attributes.push(KeyValue::new(
                "pdgate.minimized",
                strings(&mut decision.minimized.iter().cloned()),
            ));
        }
        if !decision.allowed {
            attributes.push(KeyValue::new(
                "rpc.grpc.status_code",
                i64::from(tonic::Code::PermissionDenied as i32),
            ));
        }
        self.span.set_attributes(attributes);
    }

    /// Records what a response left out, once it has ended: `pdgate.fields_cleared` (fields of
    /// minimized categories), `pdgate.unknown_fields` (fields the descriptors do not know,
    /// dropped) and, on a stream of records, `pdgate.records_dropped`.
    pub fn record_response(
        &mut self,
        fields_cleared: u64,
        unknown_fields: u64,
        records_dropped: Option<u64>,
    ) {
        use opentelemetry::trace::Span as _;
        if !self.span.is_recording() {
            return;
        }
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let mut attributes = vec![
            KeyValue::new("pdgate.fields_cleared", count(fields_cleared)),
            KeyValue::new("pdgate.unknown_fields", count(unknown_fields)),
        ];
        if let Some(dropped) = records_dropped {
            attributes.push(KeyValue::new("pdgate.records_dropped", count(dropped)));
        }
        self.span.set_attributes(attributes);
    }

    /// Records the status of an answer pdgate gave itself (malformed metadata, an upstream
    /// that cannot be reached, a deadline). Codes that are the server's failure mark the span
    /// as an error, as OpenTelemetry's gRPC conventions say.
    pub fn record_status(&mut self, code: tonic::Code, message: &str) {
        use opentelemetry::trace::Span as _;
        self.span.set_attribute(KeyValue::new(
            "rpc.grpc.status_code",
            i64::from(code as i32),
        ));
        if matches!(
            code,
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        ) {
            self.span.set_status(Status::error(message.to_owned()));
        }
    }

    /// The span's trace id and span id, lowercase hex (for the audit record).
    pub fn ids(&self) -> Option<(String, String)> {
        let context = self.context();
        context.is_valid().then(|| {
            (
                context.trace_id().to_string(),
                context.span_id().to_string(),
            )
        })
    }

    /// Sets `traceparent` (and `tracestate`) in `headers` to this span, so that the upstream
    /// continues the trace as pdgate's child.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let context = Context::new().with_remote_span_context(self.context().clone());
        TraceContextPropagator::new().inject_context(&context, &mut HeadersMut(headers));
    }

    fn context(&self) -> &SpanContext {
        use opentelemetry::trace::Span as _;
        self.span.span_context()
    }
}

/// An `http::HeaderMap` as the propagator reads it.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// An `http::HeaderMap` as the propagator writes it.
struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            return;
        };
        // The propagator writes `tracestate` even when there is none; an empty header would
        // only be noise upstream.
        if value.is_empty() {
            self.0.remove(name);
        } else if let Ok(value) = HeaderValue::from_str(&value) {
            self.0.insert(name, value);
        }
    }
}
