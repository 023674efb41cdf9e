//! `meshcni-agent uninstall-hook`: the Helm chart's pre-delete hook, run from the meshcni image
//! itself (no third-party kubectl image).
//!
//! It does what [`crate::lifecycle`] asks of an uninstall: set `uninstall: "true"` in the
//! lifecycle ConfigMap (`meshcni-lifecycle` in the hook's namespace) with a JSON merge patch,
//! check that the server's answer carries it, then wait `--wait-seconds` so the kubelet has
//! projected the new value into every agent pod (`/etc/meshcni/lifecycle/uninstall`) before
//! Helm deletes the DaemonSet; the agents then remove the plugin on SIGTERM.
//!
//! The API server is reached in-cluster (service-account token and CA, `KUBERNETES_SERVICE_HOST`
//! / `_PORT`, the agent's own flags) or through `--kubeconfig`. Transient failures (transport,
//! timeouts, 429, 5xx) are retried with backoff; 401/403/404 and any other answer fail at once
//! with an error naming the ConfigMap, the namespace and the server's message.

use std::path::Path;
use std::time::Duration;

use meshcni_kube::{ApiClient, ClientOptions, KubeError};

use crate::cli::{AgentArgs, UninstallHookArgs};
use crate::workloads::kube::AccessConfig;

/// The key the agents read (the marker file's name) and the value that means "uninstall".
pub const UNINSTALL_KEY: &str = "uninstall";

/// A failed hook run; every message names the ConfigMap and what failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("uninstall-hook: {0}")]
    Config(String),
    #[error("uninstall-hook: PATCH configmap {namespace}/{name}: {source}")]
    Transport {
        namespace: String,
        name: String,
        source: KubeError,
    },
    #[error("uninstall-hook: PATCH configmap {namespace}/{name} answered HTTP {status}: {message}")]
    Rejected {
        namespace: String,
        name: String,
        status: u16,
        message: String,
    },
    #[error(
        "uninstall-hook: configmap {namespace}/{name} after the patch has {key}={found:?}, not \"true\""
    )]
    NotApplied {
        namespace: String,
        name: String,
        key: &'static str,
        found: Option<String>,
    },
}

/// Everything one run needs (resolved from the flags).
#[derive(Debug, Clone)]
pub struct HookPlan {
    pub access: AccessConfig,
    pub namespace: String,
    pub configmap: String,
    pub wait: Duration,
    /// Attempts for transient failures, and the first backoff (doubled each time, max 8 s).
    pub attempts: u32,
    pub backoff: Duration,
}

impl HookPlan {
    /// From the agent's flags (in-cluster access, namespace) and the subcommand's own.
    pub fn from_args(args: &AgentArgs, hook: &UninstallHookArgs) -> Result<HookPlan, HookError> {
        let access = if !hook.kubeconfig.is_empty() {
            AccessConfig::Kubeconfig(hook.kubeconfig.clone().into())
        } else if !args.kubernetes_service_host.is_empty() {
            AccessConfig::in_cluster(args)
        } else {
            return Err(HookError::Config(
                "no API server: set --kubeconfig or run in a pod (KUBERNETES_SERVICE_HOST)".into(),
            ));
        };
        let namespace = if !args.pod_namespace.is_empty() {
            args.pod_namespace.clone()
        } else {
            namespace_from_sa(&args.service_account_dir)?
        };
        crate::cli::parse_dns_label(&namespace)
            .map_err(|e| HookError::Config(format!("namespace: {e}")))?;
        if !is_configmap_name(&hook.configmap) {
            return Err(HookError::Config(format!(
                "--configmap {:?} is not a ConfigMap name (lowercase RFC 1123 subdomain)",
                hook.configmap
            )));
        }
        Ok(HookPlan {
            access,
            namespace,
            configmap: hook.configmap.clone(),
            wait: Duration::from_secs(hook.wait_seconds),
            attempts: 6,
            backoff: Duration::from_millis(500),
        })
    }
}

fn is_configmap_name(s: &str) -> bool {
    crate::cli::parse_dns_subdomain(s).is_ok()
}

fn namespace_from_sa(dir: &Path) -> Result<String, HookError> {
    let p = dir.join("namespace");
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            HookError::Config(format!(
                "namespace unknown: POD_NAMESPACE is unset and {} cannot be read: {e}",
                p.display()
            ))
        })
}

/// Patch, verify, wait.
pub fn run(plan: &HookPlan) -> Result<(), HookError> {
    set_uninstall(plan)?;
    tracing::info!(
        configmap = %format!("{}/{}", plan.namespace, plan.configmap),
        wait_seconds = plan.wait.as_secs(),
        "uninstall signalled; waiting for the kubelet to project it into the agent pods"
    );
    std::thread::sleep(plan.wait);
    tracing::info!("uninstall-hook done");
    Ok(())
}

/// The merge patch with retries for transient failures; checks the answer.
pub fn set_uninstall(plan: &HookPlan) -> Result<(), HookError> {
    let (ns, name) = (plan.namespace.clone(), plan.configmap.clone());
    let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
    let patch = serde_json::json!({ "data": { UNINSTALL_KEY: "true" } }).to_string();
    let mut backoff = plan.backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt >= plan.attempts.max(1);
        // Re-resolved on every attempt: a rotated service-account token is picked up.
        let client = plan
            .access
            .resolve()
            .map_err(|e| HookError::Config(format!("API server access: {e}")))
            .and_then(|access| {
                ApiClient::new(&access, ClientOptions::default())
                    .map_err(|e| HookError::Config(format!("API client: {e}")))
            })?;
        let err = match client.send(
            "PATCH",
            &path,
            "application/merge-patch+json",
            patch.as_bytes(),
        ) {
            Ok((status, body)) if (200..300).contains(&status) => {
                return check_applied(&ns, &name, &body);
            }
            Ok((status, body)) => {
                let e = HookError::Rejected {
                    namespace: ns.clone(),
                    name: name.clone(),
                    status,
                    message: status_message(status, &body),
                };
                if !(status == 429 || status >= 500) {
                    return Err(e);
                }
                e
            }
            Err(source) => {
                let retry = source.is_retryable();
                let e = HookError::Transport {
                    namespace: ns.clone(),
                    name: name.clone(),
                    source,
                };
                if !retry {
                    return Err(e);
                }
                e
            }
        };
        if last {
            return Err(err);
        }
        tracing::warn!(error = %err, attempt, retry_in = ?backoff, "uninstall-hook: retrying");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(8));
    }
}

fn check_applied(ns: &str, name: &str, body: &str) -> Result<(), HookError> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| HookError::Rejected {
        namespace: ns.into(),
        name: name.into(),
        status: 200,
        message: format!("the answer is not a ConfigMap: {e}"),
    })?;
    let found = v["data"][UNINSTALL_KEY].as_str().map(str::to_string);
    if found.as_deref() == Some("true") {
        Ok(())
    } else {
        Err(HookError::NotApplied {
            namespace: ns.into(),
            name: name.into(),
            key: UNINSTALL_KEY,
            found,
        })
    }
}

/// The Status object's message, with a hint for the usual causes.
fn status_message(status: u16, body: &str) -> String {
    let msg = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            let t = body.trim();
            if t.is_empty() {
                "(empty body)".into()
            } else {
                t.chars().take(512).collect()
            }
        });
    match status {
        401 => format!("{msg} (the hook's service-account token was refused)"),
        403 => format!(
            "{msg} (the hook's service account needs get+patch on this ConfigMap: the chart's Role meshcni-uninstall)"
        ),
        404 => format!(
            "{msg} (the chart creates it: templates/configmap-lifecycle.yaml; was it deleted?)"
        ),
        _ => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_must_carry_the_key() {
        assert!(check_applied("ns", "cm", r#"{"data":{"uninstall":"true"}}"#).is_ok());
        let e = check_applied("ns", "cm", r#"{"data":{"uninstall":"false"}}"#)
            .expect_err("false is not applied")
            .to_string();
        assert!(
            e.contains("configmap ns/cm") && e.contains("\"false\""),
            "{e}"
        );
        let e = check_applied("ns", "cm", "<html>")
            .expect_err("not JSON")
            .to_string();
        assert!(e.contains("not a ConfigMap"), "{e}");
    }

    #[test]
    fn status_messages_name_the_cause() {
        let forbidden = r#"{"kind":"Status","message":"configmaps \"x\" is forbidden"}"#;
        let m = status_message(403, forbidden);
        assert!(m.starts_with("configmaps \"x\" is forbidden") && m.contains("meshcni-uninstall"));
        assert_eq!(status_message(500, ""), "(empty body)");
    }
}
