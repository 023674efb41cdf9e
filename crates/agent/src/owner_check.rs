//! The shutdown check of `--daemonset-name` (`DAEMONSET_NAME`): does the agent's own DaemonSet
//! still exist? It tells a `kubectl delete -f meshcni.yaml` (no Helm hook ran, so no uninstall
//! marker) from an upgrade, a restart or a drain, as Istio's node agent does
//! (`ShouldStopCleanup`, spec §5.5).
//!
//! One `GET /apis/apps/v1/namespaces/<ns>/daemonsets/<name>` with the service-account token,
//! retried for transient failures (transport, timeout, 429, 5xx) within [`BUDGET`] — the
//! kubelet's grace period (the chart's 30 s) must still cover the uninstall itself. The answer
//! becomes a [`DaemonSetState`]; [`crate::lifecycle::decide`] maps it to an action:
//!
//! | answer | state | action |
//! |---|---|---|
//! | 200, no `metadata.deletionTimestamp` | `Present` | leave installed |
//! | 200 with `deletionTimestamp` | `Deleting` | uninstall |
//! | 404 | `Gone` | uninstall |
//! | 401 / 403 | `Refused` | uninstall |
//! | any other answer, or none within the budget | `Unknown` | uninstall |
//!
//! 401/403 mean the DaemonSet's service account or its RBAC is gone — `kubectl delete -f`
//! deletes the ServiceAccount and the roles before the DaemonSet — and then the plugin's
//! kubeconfig carries the same dead token: left in place it would fail every pod ADD that needs
//! a lookup. `Unknown` uninstalls too (the reference's policy: only a DaemonSet positively seen
//! keeps the plugin): see ARCHITECTURE.md "Uninstall without the hook" for the trade-off.

use std::time::{Duration, Instant};

use meshcni_kube::{ApiClient, ClientOptions};

use crate::cli::AgentArgs;
use crate::workloads::kube::AccessConfig;

/// Time allowed for the check, retries included.
pub const BUDGET: Duration = Duration::from_secs(5);

/// What the API server said about the DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonSetState {
    /// It exists and is not being deleted.
    Present,
    /// It exists with this `deletionTimestamp`.
    Deleting(String),
    /// 404.
    Gone,
    /// 401/403, with the server's message.
    Refused { status: u16, message: String },
    /// No usable answer within the budget (what failed last).
    Unknown(String),
}

/// The check's target, from the flags.
#[derive(Debug, Clone)]
pub struct OwnerCheck {
    pub access: AccessConfig,
    pub namespace: String,
    pub name: String,
    pub budget: Duration,
}

impl OwnerCheck {
    /// `None` without `--daemonset-name` (the check is off). The flags were validated at start
    /// (`DAEMONSET_NAME` needs `KUBERNETES_SERVICE_HOST` and `POD_NAMESPACE`).
    pub fn from_args(args: &AgentArgs) -> Option<OwnerCheck> {
        if args.daemonset_name.is_empty() {
            return None;
        }
        Some(OwnerCheck {
            access: AccessConfig::in_cluster(args),
            namespace: args.pod_namespace.clone(),
            name: args.daemonset_name.clone(),
            budget: BUDGET,
        })
    }

    /// `namespace/name`, for logs.
    pub fn target(&self) -> String {
        format!("daemonset {}/{}", self.namespace, self.name)
    }

    /// Ask, retrying transient failures until the budget is spent.
    pub fn query(&self) -> DaemonSetState {
        let deadline = Instant::now() + self.budget;
        let path = format!(
            "/apis/apps/v1/namespaces/{}/daemonsets/{}",
            self.namespace, self.name
        );
        let mut backoff = Duration::from_millis(200);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let last = match self.once(&path, left) {
                Ok(state) => return state,
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left <= backoff {
                return DaemonSetState::Unknown(format!(
                    "GET {}: {last} (no answer within {:?})",
                    self.target(),
                    self.budget
                ));
            }
            tracing::warn!(target_object = %self.target(), error = %last, retry_in = ?backoff,
                "shutdown check: retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One attempt: a final state, or the transient failure to retry.
    fn once(&self, path: &str, left: Duration) -> Result<DaemonSetState, String> {
        let timeout = left.min(Duration::from_secs(3));
        // Re-resolved per attempt: a rotated token is picked up.
        let access = self
            .access
            .resolve()
            .map_err(|e| format!("API server access: {e}"))?;
        let client = ApiClient::new(
            &access,
            ClientOptions {
                connect_timeout: timeout.min(Duration::from_secs(2)),
                timeout,
            },
        )
        .map_err(|e| format!("API client: {e}"))?;
        match client.send("GET", path, "application/json", b"") {
            Ok((status, body)) => Ok(classify(status, &body)),
            Err(e) => Err(e.to_string()),
        }
        .and_then(|s| match s {
            // Transient answers are retried like transport failures.
            DaemonSetState::Unknown(m) => Err(m),
            s => Ok(s),
        })
    }
}

/// The state an answer means (pure). 429/5xx and unreadable 200s are `Unknown`.
pub fn classify(status: u16, body: &str) -> DaemonSetState {
    match status {
        200 => match serde_json::from_str::<serde_json::Value>(body) {
            Ok(v) if v["kind"] == "DaemonSet" => {
                match v["metadata"]["deletionTimestamp"].as_str() {
                    Some(ts) => DaemonSetState::Deleting(ts.to_string()),
                    None => DaemonSetState::Present,
                }
            }
            Ok(_) => DaemonSetState::Unknown("HTTP 200 without a DaemonSet".into()),
            Err(e) => DaemonSetState::Unknown(format!("HTTP 200 with unreadable JSON: {e}")),
        },
        404 => DaemonSetState::Gone,
        401 | 403 => DaemonSetState::Refused {
            status,
            message: message(body),
        },
        _ => DaemonSetState::Unknown(format!("HTTP {status}: {}", message(body))),
    }
}

fn message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().chars().take(256).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_states() {
        assert_eq!(
            classify(200, r#"{"kind":"DaemonSet","metadata":{"name":"d"}}"#),
            DaemonSetState::Present
        );
        assert_eq!(
            classify(
                200,
                r#"{"kind":"DaemonSet","metadata":{"deletionTimestamp":"2026-12-06T18:00:00Z"}}"#
            ),
            DaemonSetState::Deleting("2026-12-06T18:00:00Z".into())
        );
        assert_eq!(classify(404, "{}"), DaemonSetState::Gone);
        assert!(matches!(
            classify(403, r#"{"message":"forbidden: x"}"#),
            DaemonSetState::Refused { status: 403, message } if message == "forbidden: x"
        ));
        assert!(matches!(
            classify(401, ""),
            DaemonSetState::Refused { status: 401, .. }
        ));
        for (s, b) in [(500, "oops"), (429, ""), (200, "not json"), (200, "{}")] {
            assert!(
                matches!(classify(s, b), DaemonSetState::Unknown(_)),
                "{s} {b}"
            );
        }
    }
}
