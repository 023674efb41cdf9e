//! Prometheus metrics served on the monitoring port.
//!
//! | metric | type | source |
//! |---|---|---|
//! | `meshcni_install_events_total{result}` | counter | installer counters, read at scrape time |
//! | `istio_cni_installs_total{result}` | counter | same values under Istio's name and labels |
//! | `meshcni_install_ready` / `istio_cni_install_ready` | gauge | installer ready flag |
//! | `meshcni_config_reinserts_total` | counter | installer: our entry put back after removal |
//! | `meshcni_config_reinsert_latency_seconds` | gauge | installer: removal → re-insert time of the last re-insert |
//! | `meshcni_config_reinsert_latency_max_seconds` | gauge | installer: the longest such time since start |
//! | `meshcni_cni_requests_total{command,result}` | counter | plugin reports (`plugin_report`) |
//! | `meshcni_cni_request_duration_seconds{command}` | histogram | plugin reports |
//! | `meshcni_plugin_reports_malformed_total` | counter | datagrams that failed to parse |
//! | `meshcni_enrolled_pods` | gauge | enrollment: pods currently enrolled |
//! | `meshcni_ztunnel_connected` | gauge | 1 while the node's ztunnel is available (inpod: a ZDS connection that received its snapshot), else 0 |
//! | `meshcni_cni_events_total{result}` | counter | `POST /cmdadd` answers (`cni_events`): `captured`, `bad_request`, `not_found`, `not_selected`, `no_ztunnel`, `driver_error`, `not_synced`, `timeout`, `unavailable`, `superseded`, `reserved_ip`, `bad_netns` |
//! | `meshcni_cni_event_duration_seconds` | histogram | time to answer a `POST /cmdadd` |
//! | `meshcni_workload_refusals_total{reason}` | counter | workload input refused: `duplicate_uid`, `reserved_ip`, `file_incomplete`, `file_limit`, `file_invalid` |
//! | `meshcni_workloads_file_parses_total` | counter | workloads-file parses (only changed content is parsed) |
//! | `meshcni_repair_total{result,reason}` | counter | repair controller (`repair`): `result` = `repaired`, `failed`, `labelled`, `deleted`; `reason` = `sidecar_not_captured`, `ambient_not_enrolled`, `ambient_drifted` |
//! | `meshcni_repair_duration_seconds` | histogram | repair: from the pod first seen uncaptured to the doctor's verdict "captured" |
//!
//! Installer-derived series are produced by a [`Collector`] that reads the installer when
//! scraped, so there is no copy to keep in sync.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::installer::NodeInstaller;
use crate::plugin_report::NormalizedReport;

/// Buckets for CNI request durations: 0.5 ms … 10 s (ADD with ambient enrollment can wait on
/// ztunnel; sidecar ADD is a few ms).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub command: &'static str,
    pub result: &'static str,
}

/// Labels of `meshcni_cni_events_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub command: &'static str,
}

/// The server's metrics: `meshcni_cni_events_total{result}` and
/// `meshcni_cni_event_duration_seconds` (registered in `crate::metrics`).
#[derive(Clone, Debug)]
pub struct CniEventMetrics {
    pub events: Family<EventLabels, Counter>,
    pub duration: Histogram,
}

/// Labels of `meshcni_workload_refusals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RefusalLabels {
    /// `duplicate_uid`, `reserved_ip`, `file_incomplete`, `file_limit`, `file_invalid`.
    pub reason: &'static str,
}

/// Counters of the workload sources and the enrollment loop's input checks (registered in
/// this module; a default value counts into handles nobody scrapes).
#[derive(Clone, Debug, Default)]
pub struct WorkloadMetrics {
    /// `meshcni_workload_refusals_total{reason}`: input refused (a pod, an IP, a file version).
    pub refusals: prometheus_client::metrics::family::Family<
        RefusalLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// `meshcni_workloads_file_parses_total`: times the workloads file's content was parsed
    /// (only a changed content is parsed).
    pub file_parses: prometheus_client::metrics::counter::Counter,
}

impl WorkloadMetrics {
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&RefusalLabels { reason }).inc();
    }

    pub fn refusals_of(&self, reason: &'static str) -> u64 {
        self.refusals.get_or_create(&RefusalLabels { reason }).get()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Labels of `meshcni_repair_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    /// `repaired`, `failed`, `labelled`, `deleted`.
    pub result: &'static str,
    /// `sidecar_not_captured`, `ambient_not_enrolled`, `ambient_drifted`.
    pub reason: &'static str,
}

/// The repair controller's metrics (registered in this module).
#[derive(Clone, Debug)]
pub struct RepairMetrics {
    pub total: Family<RepairLabels, Counter>,
    /// Detected uncaptured → captured, seconds.
    pub duration: Histogram,
}

impl Default for RepairMetrics {
    fn default() -> Self {
        RepairMetrics {
            total: Family::default(),
            duration: duration_histogram(),
        }
    }
}

impl RepairMetrics {
    pub fn count(&self, result: &'static str, reason: &'static str) {
        self.total
            .get_or_create(&RepairLabels { result, reason })
            .inc();
    }
}

/// Handles to the agent-owned metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    pub cni_requests: Family<RequestLabels, Counter>,
    pub cni_request_duration: Family<CommandLabels, Histogram, fn() -> Histogram>,
    pub malformed_reports: Counter,
    pub enrolled_pods: Gauge,
    /// 1 while the node's ztunnel is there for the redirect mode (a Ready trusted pod; for
    /// inpod a ZDS connection that received its snapshot), else 0.
    pub ztunnel_connected: Gauge,
    /// Plugin events (`POST /cmdadd`) by answer.
    pub cni_events: Family<EventLabels, Counter>,
    pub cni_event_duration: Histogram,
    /// Workload input refusals and workloads-file parses.
    pub workloads: WorkloadMetrics,
    /// The repair controller's counts and detect→captured times.
    pub repair: RepairMetrics,
}

impl AgentMetrics {
    /// The handles the plugin event server records into.
    pub fn cni_event_metrics(&self) -> CniEventMetrics {
        CniEventMetrics {
            events: self.cni_events.clone(),
            duration: self.cni_event_duration.clone(),
        }
    }

    /// Record one plugin report.
    pub fn record(&self, r: &NormalizedReport) {
        self.cni_requests
            .get_or_create(&RequestLabels {
                command: r.command,
                result: r.result,
            })
            .inc();
        self.cni_request_duration
            .get_or_create(&CommandLabels { command: r.command })
            .observe(r.seconds);
    }
}

/// Reads the installer at scrape time.
struct InstallCollector {
    installer: Arc<dyn NodeInstaller>,
}

impl std::fmt::Debug for InstallCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InstallCollector")
    }
}

impl Collector for InstallCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.installer.counters();
        let ready = i64::from(self.installer.is_ready());
        {
            let mut fam = encoder.encode_descriptor(
                "meshcni_install_events",
                "Install passes of the CNI plugin by result.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (label, _, v) in c.rows() {
                let labels = [("result", label)];
                ConstCounter::new(v).encode(fam.encode_family(&labels)?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "istio_cni_installs",
                "Install passes by result (Istio-compatible name and labels).",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (_, label, v) in c.rows() {
                let labels = [("result", label)];
                ConstCounter::new(v).encode(fam.encode_family(&labels)?)?;
            }
        }
        for (name, help) in [
            (
                "meshcni_install_ready",
                "1 when the plugin, its config and kubeconfig are installed and valid.",
            ),
            (
                "istio_cni_install_ready",
                "Istio-compatible alias of meshcni_install_ready.",
            ),
        ] {
            let g = ConstGauge::new(ready);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let r = ConstCounter::new(c.config_reinserts);
        r.encode(encoder.encode_descriptor(
            "meshcni_config_reinserts",
            "Times the meshcni entry was put back into the CNI config after something removed it.",
            None,
            r.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "meshcni_config_reinsert_latency_seconds",
                "How long the meshcni entry was missing from the CNI config before the last \
                 re-insert (from its removal to the completed re-insert; 0 before any).",
                c.last_reinsert_latency,
            ),
            (
                "meshcni_config_reinsert_latency_max_seconds",
                "The longest time the meshcni entry was missing before a re-insert since start.",
                c.max_reinsert_latency,
            ),
        ] {
            let g = ConstGauge::new(v.map_or(0.0, |d| d.as_secs_f64()));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// Build the registry with every metric registered.
pub fn build_registry(installer: Arc<dyn NodeInstaller>) -> (Registry, AgentMetrics) {
    let mut registry = Registry::default();
    let metrics = AgentMetrics {
        cni_requests: Family::default(),
        cni_request_duration: Family::new_with_constructor(duration_histogram),
        malformed_reports: Counter::default(),
        enrolled_pods: Gauge::default(),
        ztunnel_connected: Gauge::default(),
        cni_events: Family::default(),
        cni_event_duration: duration_histogram(),
        workloads: WorkloadMetrics::default(),
        repair: RepairMetrics::default(),
    };
    registry.register(
        "meshcni_cni_requests",
        "CNI requests handled by the meshcni plugin, as reported by the plugin.",
        metrics.cni_requests.clone(),
    );
    registry.register(
        "meshcni_cni_request_duration_seconds",
        "Duration of CNI requests handled by the meshcni plugin, as reported by the plugin.",
        metrics.cni_request_duration.clone(),
    );
    registry.register(
        "meshcni_plugin_reports_malformed",
        "Datagrams on the plugin metrics socket that could not be parsed.",
        metrics.malformed_reports.clone(),
    );
    registry.register(
        "meshcni_enrolled_pods",
        "Pods currently enrolled in ambient redirection on this node.",
        metrics.enrolled_pods.clone(),
    );
    registry.register(
        "meshcni_ztunnel_connected",
        "1 while this node's ztunnel is available to the redirect mode (inpod: connected to the ZDS socket with its snapshot sent), else 0.",
        metrics.ztunnel_connected.clone(),
    );
    registry.register(
        "meshcni_cni_events",
        "Ambient pods handed over by the plugin (POST /cmdadd), by answer.",
        metrics.cni_events.clone(),
    );
    registry.register(
        "meshcni_cni_event_duration_seconds",
        "Time the agent took to answer a POST /cmdadd from the plugin.",
        metrics.cni_event_duration.clone(),
    );
    registry.register(
        "meshcni_workload_refusals",
        "Workload input refused by reason: duplicate_uid, reserved_ip (a pod claiming the node's or ztunnel's address), file_incomplete, file_limit, file_invalid.",
        metrics.workloads.refusals.clone(),
    );
    registry.register(
        "meshcni_workloads_file_parses",
        "Times the workloads file's content was parsed (unchanged content is not parsed again).",
        metrics.workloads.file_parses.clone(),
    );
    registry.register(
        "meshcni_repair",
        "Pods the repair controller found not captured as they should be, by result and reason.",
        metrics.repair.total.clone(),
    );
    registry.register(
        "meshcni_repair_duration_seconds",
        "Repair: time from a pod first seen uncaptured to the doctor's verdict that it is captured.",
        metrics.repair.duration.clone(),
    );
    registry.register_collector(Box::new(InstallCollector { installer }));
    (registry, metrics)
}

/// Render the registry in OpenMetrics text.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installer::InstallCounters;

    struct Fake;
    impl NodeInstaller for Fake {
        fn is_ready(&self) -> bool {
            true
        }
        fn counters(&self) -> InstallCounters {
            InstallCounters {
                success: 3,
                copy_binaries_failure: 1,
                create_kubeconfig_failure: 0,
                create_cni_config_failure: 2,
                config_reinserts: 5,
                last_reinsert_latency: Some(std::time::Duration::from_millis(3)),
                max_reinsert_latency: Some(std::time::Duration::from_millis(1500)),
            }
        }
        fn stop(&self) {}
        fn last_error(&self) -> Option<String> {
            None
        }
        fn uninstall(&self) -> Result<(), String> {
            Ok(())
        }
        fn verify_and_repair(&self) -> Vec<meshcni_install::RepairStep> {
            Vec::new()
        }
    }

    #[test]
    fn exposes_every_series() {
        let (reg, m) = build_registry(Arc::new(Fake));
        m.record(&NormalizedReport {
            command: "ADD",
            result: "success",
            seconds: 0.003,
        });
        m.cni_event_metrics()
            .events
            .get_or_create(&EventLabels { result: "captured" })
            .inc();
        m.cni_event_metrics().duration.observe(0.02);
        let text = render(&reg).expect("render");
        for line in [
            "meshcni_install_events_total{result=\"success\"} 3",
            "meshcni_install_events_total{result=\"create_cni_config_failure\"} 2",
            "istio_cni_installs_total{result=\"SUCCESS\"} 3",
            "istio_cni_installs_total{result=\"COPY_BINARIES_FAILURE\"} 1",
            "meshcni_install_ready 1",
            "istio_cni_install_ready 1",
            "meshcni_config_reinserts_total 5",
            "meshcni_config_reinsert_latency_seconds 0.003",
            "meshcni_config_reinsert_latency_max_seconds 1.5",
            "meshcni_cni_requests_total{command=\"ADD\",result=\"success\"} 1",
            "meshcni_cni_request_duration_seconds_count{command=\"ADD\"} 1",
            "meshcni_cni_request_duration_seconds_bucket{le=\"0.005\",command=\"ADD\"} 1",
            "meshcni_enrolled_pods 0",
            "meshcni_ztunnel_connected 0",
            "meshcni_plugin_reports_malformed_total 0",
            "meshcni_cni_events_total{result=\"captured\"} 1",
            "meshcni_cni_event_duration_seconds_count 1",
            "meshcni_workloads_file_parses_total 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
