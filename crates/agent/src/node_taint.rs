//! The node readiness taint (`--remove-node-taint`, `REMOVE_NODE_TAINT`; off by default, as in
//! the reference). A node that registers with the taint `cni.istio.io/not-ready` (kubelet
//! `--register-with-taints`, or a node provisioner) keeps pods off it until the mesh's node
//! side is in place. The agent removes that taint from **its own node** once every readiness
//! gate is open — the plugin installed (`install`) and, with ambient on, the ambient config
//! written and the redirect mode up (`ambient-config`, `redirect-mode`) — and never adds it back:
//! nothing in the agent writes a taint. (The reference does this in the control plane, istiod's
//! untaint controller; here the node's own agent does it, so no cluster-wide component needs to
//! see every node.)
//!
//! One removal pass per agent start, on a std thread:
//!
//! 1. wait until the agent is ready (re-checked before every attempt);
//! 2. `GET /api/v1/nodes/<node>`; no taint with the key → done ("not tainted");
//! 3. `PATCH` with a JSON patch (`application/json-patch+json`) of two operations: `test` that
//!    `/spec/taints` is still exactly the list read in 2, then `replace` it with that list
//!    minus the entries with our key. Another writer's change between 2 and 3 (a taint added
//!    or removed, by kubelet, an operator or a controller) makes the `test` fail: the API server
//!    answers 422 (409 on a write conflict), nothing is written, and the agent starts again at 1
//!    with the new list (after a short pause, ≤ 2 s) — so it never drops a taint it has not seen, and touches nothing but
//!    the list entries with its key;
//! 4. transient failures (unreachable, timeout, 429, 5xx) and refusals (401/403/404: RBAC not
//!    yet granted, the node object not there) are logged, counted in
//!    `meshcni_node_taint_api_errors_total{operation,reason}`, and retried with a back-off
//!    (200 ms doubling to 30 s): an untainted node is the only way out of the loop.
//!
//! RBAC cannot restrict an agent to *its own* node (resourceNames are fixed at role-creation
//! time, and a DaemonSet shares one service account over all nodes), so the chart grants `get`
//! and `patch` on `nodes` only when the option is on, and the agent itself only ever names
//! `--node-name` (the Downward API's `spec.nodeName`) in its requests; see ARCHITECTURE.md
//! "Node readiness taint".

use std::time::Duration;

use meshcni_kube::{ApiClient, ClientOptions};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tracing::{error, info, warn};

use crate::cli::AgentArgs;
use crate::readiness::Readiness;
use crate::workloads::kube::AccessConfig;

pub use crate::cli::{DEFAULT_TAINT_KEY, parse_taint_key};

/// Longest back-off between two failed attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Longest wait after a conflict (the taint list changed under us: re-read soon).
pub const CONFLICT_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Labels of `meshcni_node_taint_api_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiErrorLabels {
    /// `get` or `patch`.
    pub operation: &'static str,
    /// `unreachable` (no HTTP answer: connect, TLS, timeout), `access` (the service-account
    /// token or CA could not be read), `http_<status>` for any other non-2xx answer,
    /// `bad_response` (a 2xx that is not a Node).
    pub reason: String,
}

/// The taint remover's metrics.
#[derive(Clone, Debug, Default)]
pub struct TaintMetrics {
    /// `meshcni_node_taint_removed`: 1 once this node is known to carry no taint with the key
    /// (removed by this agent, or found absent), else 0.
    pub untainted: Gauge,
    /// `meshcni_node_taint_removals_total`: successful PATCHes that removed the taint.
    pub removals: Counter,
    /// `meshcni_node_taint_conflicts_total`: PATCHes refused because the taint list changed
    /// since it was read (retried with the new list).
    pub conflicts: Counter,
    /// `meshcni_node_taint_api_errors_total{operation,reason}`.
    pub api_errors: Family<ApiErrorLabels, Counter>,
}

impl TaintMetrics {
    /// Register the series on `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "meshcni_node_taint_removed",
            "1 once this node carries no readiness taint (--node-taint-key): removed by the agent or found absent; 0 before.",
            self.untainted.clone(),
        );
        registry.register(
            "meshcni_node_taint_removals",
            "Readiness taints removed from this node by the agent.",
            self.removals.clone(),
        );
        registry.register(
            "meshcni_node_taint_conflicts",
            "Taint removals refused because the node's taint list changed since it was read (retried).",
            self.conflicts.clone(),
        );
        registry.register(
            "meshcni_node_taint_api_errors",
            "Failed API requests of the readiness-taint removal, by operation and reason (retried).",
            self.api_errors.clone(),
        );
    }
}

/// What one pass found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The taint was there and the PATCH removed it; `kept` other taints are still on the node.
    Removed { kept: usize },
    /// The node carries no taint with the key (any more).
    NotTainted,
}

/// Why one pass did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// The taint list changed between the GET and the PATCH (the `test` op failed: 422, or a
    /// write conflict: 409).
    #[error("the taints of node {node} changed since they were read (HTTP {status}): {message}")]
    Conflict {
        node: String,
        status: u16,
        message: String,
    },
    /// Any other failure, with the metric labels it is counted under.
    #[error("{operation} node {node}: {message}")]
    Api {
        operation: &'static str,
        reason: String,
        node: String,
        message: String,
    },
}

/// The remover's target and access, from the flags.
#[derive(Debug, Clone)]
pub struct TaintRemover {
    pub access: AccessConfig,
    pub node: String,
    pub key: String,
    pub max_backoff: Duration,
}

impl TaintRemover {
    /// `None` when `--remove-node-taint` is off. The flags were validated at start (the option
    /// needs API access: `--ambient-kubeconfig` or KUBERNETES_SERVICE_HOST).
    pub fn from_args(args: &AgentArgs) -> Option<TaintRemover> {
        if !args.remove_node_taint {
            return None;
        }
        Some(TaintRemover {
            access: AccessConfig::from_args(args)?,
            node: args.effective_node_name(),
            key: args.node_taint_key.clone(),
            max_backoff: MAX_BACKOFF,
        })
    }

    /// Run the removal on its own thread: wait for readiness, remove, exit.
    pub fn spawn(
        self,
        readiness: Readiness,
        metrics: TaintMetrics,
    ) -> std::io::Result<std::thread::JoinHandle<Outcome>> {
        std::thread::Builder::new()
            .name("node-taint".into())
            .spawn(move || self.run(&readiness, &metrics))
    }

    /// Until the node is untainted: wait for readiness, then try; back off after failures.
    pub fn run(&self, readiness: &Readiness, metrics: &TaintMetrics) -> Outcome {
        let mut backoff = Duration::from_millis(200);
        let mut waiting_logged = false;
        loop {
            if !readiness.is_ready() {
                if !waiting_logged {
                    info!(node = %self.node, taint = %self.key,
                        closed_gates = %readiness.closed().join(","),
                        "readiness taint: waiting for the agent to be ready before removing it");
                    waiting_logged = true;
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            waiting_logged = false;
            match self.attempt() {
                Ok(outcome) => {
                    metrics.untainted.set(1);
                    match &outcome {
                        Outcome::Removed { kept } => {
                            metrics.removals.inc();
                            info!(node = %self.node, taint = %self.key, other_taints = kept,
                                "readiness taint removed: the node is ready for pods");
                        }
                        Outcome::NotTainted => {
                            info!(node = %self.node, taint = %self.key,
                                "readiness taint: the node does not carry it; nothing to remove");
                        }
                    }
                    return outcome;
                }
                Err(e @ AttemptError::Conflict { .. }) => {
                    // Someone else changed the taints: read them again at once.
                    metrics.conflicts.inc();
                    let wait = backoff.min(CONFLICT_MAX_BACKOFF);
                    warn!(error = %e, retry_in = ?wait,
                        "readiness taint: concurrent update, retrying with the new taint list");
                    std::thread::sleep(wait);
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                Err(e @ AttemptError::Api { .. }) => {
                    if let AttemptError::Api {
                        operation, reason, ..
                    } = &e
                    {
                        metrics
                            .api_errors
                            .get_or_create(&ApiErrorLabels {
                                operation,
                                reason: reason.clone(),
                            })
                            .inc();
                    }
                    error!(error = %e, retry_in = ?backoff,
                        "readiness taint: could not remove it; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
    }

    /// One GET + PATCH pass.
    pub fn attempt(&self) -> Result<Outcome, AttemptError> {
        let api = |operation: &'static str, reason: String, message: String| AttemptError::Api {
            operation,
            reason,
            node: self.node.clone(),
            message,
        };
        // Re-resolved per attempt: a rotated token is picked up.
        let access = self
            .access
            .resolve()
            .map_err(|e| api("get", "access".into(), format!("API server access: {e}")))?;
        let client = ApiClient::new(
            &access,
            ClientOptions {
                connect_timeout: Duration::from_secs(2),
                timeout: Duration::from_secs(10),
            },
        )
        .map_err(|e| api("get", "access".into(), format!("API client: {e}")))?;
        let path = format!("/api/v1/nodes/{}", self.node);
        let (status, body) = client
            .send("GET", &path, "application/json", b"")
            .map_err(|e| api("get", "unreachable".into(), e.to_string()))?;
        if status != 200 {
            return Err(api(
                "get",
                format!("http_{status}"),
                format!("HTTP {status}: {}", status_message(&body)),
            ));
        }
        let node: Value = serde_json::from_str(&body).map_err(|e| {
            api(
                "get",
                "bad_response".into(),
                format!("unreadable JSON: {e}"),
            )
        })?;
        if node["kind"] != "Node" {
            return Err(api(
                "get",
                "bad_response".into(),
                format!("HTTP 200 without a Node: kind {}", node["kind"]),
            ));
        }
        let Some(patch) = removal_patch(&node["spec"]["taints"], &self.key) else {
            return Ok(Outcome::NotTainted);
        };
        let kept = patch[1]["value"].as_array().map_or(0, Vec::len);
        let bytes = serde_json::to_vec(&patch)
            .map_err(|e| api("patch", "bad_response".into(), format!("encoding: {e}")))?;
        let (status, body) = client
            .send("PATCH", &path, "application/json-patch+json", &bytes)
            .map_err(|e| api("patch", "unreachable".into(), e.to_string()))?;
        match status {
            200 => Ok(Outcome::Removed { kept }),
            409 | 422 => Err(AttemptError::Conflict {
                node: self.node.clone(),
                status,
                message: status_message(&body),
            }),
            s => Err(api(
                "patch",
                format!("http_{s}"),
                format!("HTTP {s}: {}", status_message(&body)),
            )),
        }
    }
}

/// The JSON patch that removes every taint with `key` from `taints` (a node's `spec.taints`,
/// `null` when it has none), guarded by a `test` of the whole list; `None` when no taint has
/// the key.
pub fn removal_patch(taints: &Value, key: &str) -> Option<Value> {
    let list = taints.as_array()?;
    if !list.iter().any(|t| t["key"] == key) {
        return None;
    }
    let kept: Vec<Value> = list.iter().filter(|t| t["key"] != key).cloned().collect();
    Some(json!([
        {"op": "test", "path": "/spec/taints", "value": list},
        {"op": "replace", "path": "/spec/taints", "value": kept},
    ]))
}

/// The `message` of a Kubernetes `Status`, else the start of the body.
fn status_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| body.trim().chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_removes_only_our_key_and_tests_the_whole_list() {
        let taints = json!([
            {"key": "a", "effect": "NoSchedule"},
            {"key": DEFAULT_TAINT_KEY, "effect": "NoSchedule"},
            {"key": DEFAULT_TAINT_KEY, "effect": "NoExecute"},
            {"key": "b", "value": "x", "effect": "NoExecute"},
        ]);
        let p = removal_patch(&taints, DEFAULT_TAINT_KEY).expect("tainted");
        assert_eq!(
            p[0],
            json!({"op": "test", "path": "/spec/taints", "value": taints})
        );
        assert_eq!(
            p[1]["value"],
            json!([{"key": "a", "effect": "NoSchedule"}, {"key": "b", "value": "x", "effect": "NoExecute"}])
        );
        assert_eq!(
            removal_patch(&json!([{"key": "a"}]), DEFAULT_TAINT_KEY),
            None
        );
        assert_eq!(removal_patch(&Value::Null, DEFAULT_TAINT_KEY), None);
    }

    #[test]
    fn taint_keys_are_qualified_names() {
        for ok in [DEFAULT_TAINT_KEY, "not-ready", "example.com/a_b.c", "A1"] {
            assert_eq!(parse_taint_key(ok), Ok(ok.to_string()));
        }
        for bad in [
            "",
            "/x",
            "Example.com/x",
            "a/",
            "-a",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(parse_taint_key(bad).is_err(), "{bad:?}");
        }
    }
}
