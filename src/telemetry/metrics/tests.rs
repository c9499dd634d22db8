use super::*;
use crate::audit::AuditSettings;

fn registry() -> (Metrics, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (audit, _writer, _) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
    (Metrics::new(Arc::default(), audit), dir)
}

fn has_line(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing `{line}` in\n{text}"
    );
}

#[test]
fn decisions_are_counted_by_label_and_rendered_in_text_format() {
    let (m, _dir) = registry();
    let ms = Duration::from_millis;
    m.record_decision(true, "service.billing", None, ms(0));
    m.record_decision(true, "service.billing", None, ms(3));
    m.record_decision(
        false,
        "marketing.email",
        Some(ReasonCode::ConsentRequired),
        ms(30),
    );
    m.record_decision(
        false,
        PURPOSE_UNKNOWN,
        Some(ReasonCode::AuditUnavailable),
        ms(9000),
    );
    let text = m.render_prometheus();
    for line in [
        "pdgate_decisions_total{decision=\"allow\",purpose=\"service.billing\",reason=\"\"} 2",
        "pdgate_decisions_total{decision=\"deny\",purpose=\"marketing.email\",reason=\"CONSENT_REQUIRED\"} 1",
        "pdgate_decisions_total{decision=\"deny\",purpose=\"(unknown)\",reason=\"AUDIT_UNAVAILABLE\"} 1",
        // `le` as Go clients write it (Prometheus compares bounds as numbers).
        "pdgate_decision_latency_seconds_bucket{le=\"5e-05\"} 1",
        "pdgate_decision_latency_seconds_bucket{le=\"0.005\"} 2",
        "pdgate_decision_latency_seconds_bucket{le=\"0.05\"} 3",
        "pdgate_decision_latency_seconds_bucket{le=\"2.5\"} 3",
        "pdgate_decision_latency_seconds_bucket{le=\"+Inf\"} 4",
        "pdgate_decision_latency_seconds_sum 9.033",
        "pdgate_decision_latency_seconds_count 4",
        "# TYPE pdgate_audit_queue_depth gauge",
        "pdgate_policy_reloads_total 0",
        "pdgate_decision_cache_hits_total 0",
        "pdgate_shadow_differences_total{active=\"allow\",shadow=\"deny\"} 0",
    ] {
        has_line(&text, line);
    }
    // Every sample line is `name{labels} value` or `name value` with a numeric value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample: {line}");
    }
}

#[test]
fn upstream_codes_shed_calls_and_tls_reloads_are_counted() {
    let (m, _dir) = registry();
    m.record_upstream(tonic::Code::Ok);
    m.record_upstream(tonic::Code::Unavailable);
    m.record_upstream(tonic::Code::Unavailable);
    m.record_shed();
    m.record_tls_reload(true);
    m.record_tls_reload(false);
    m.record_tls_reload(false);
    let text = m.render_prometheus();
    has_line(&text, "pdgate_upstream_responses_total{code=\"OK\"} 1");
    has_line(
        &text,
        "pdgate_upstream_responses_total{code=\"UNAVAILABLE\"} 2",
    );
    // Every code is there from the start.
    has_line(
        &text,
        "pdgate_upstream_responses_total{code=\"DATA_LOSS\"} 0",
    );
    has_line(&text, "pdgate_calls_shed_total 1");
    has_line(&text, "pdgate_tls_reloads_total 1");
    has_line(&text, "pdgate_tls_reload_failures_total 2");
    assert_eq!(
        GRPC_CODES[tonic::Code::Unauthenticated as usize],
        "UNAUTHENTICATED"
    );
}

#[test]
fn slots_registry_reads_and_build_are_reported() {
    let (m, _dir) = registry();
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    let _held = slots.clone().try_acquire_many_owned(3).unwrap();
    m.watch_call_slots(slots, 8);
    let reads = Arc::new(ReadStats::default());
    reads.reads.fetch_add(5, Ordering::Relaxed);
    reads.failures.fetch_add(1, Ordering::Relaxed);
    m.report_registry_reads(reads);
    let text = m.render_prometheus();
    has_line(&text, "pdgate_calls_in_flight 3");
    has_line(&text, "pdgate_calls_in_flight_limit 8");
    has_line(&text, "pdgate_registry_reads_total 5");
    has_line(&text, "pdgate_registry_read_failures_total 1");
    let build = text
        .lines()
        .find(|l| l.starts_with("pdgate_build_info{"))
        .unwrap_or_else(|| panic!("no build info in\n{text}"));
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.ends_with(" 1"),
        "{build}"
    );
}
