//! `meshcni-agent uninstall-hook` (the Helm pre-delete hook, run from the meshcni image) against
//! the repository's fake API server: the lifecycle ConfigMap gets `uninstall: "true"` by a JSON
//! merge patch sent with the service account's credentials; refusals fail at once naming the
//! ConfigMap and the cause; transient failures are retried; the hook waits --wait-seconds.

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshcni_testkit::kube_api::{FakeApiServer, FakeRequest, FakeResponse};
use serde_json::{Value, json};

const CM_PATH: &str = "/api/v1/namespaces/mesh-system/configmaps/meshcni-lifecycle";

/// A fake API server holding one ConfigMap that applies merge patches to its `data`; the first
/// `fail_first` PATCHes get `fail_status`.
fn cluster(fail_first: usize, fail_status: u16) -> (FakeApiServer, Arc<Mutex<Value>>) {
    let cm = Arc::new(Mutex::new(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "meshcni-lifecycle", "namespace": "mesh-system"},
        "data": {"uninstall": "false", "other": "kept"}
    })));
    let state = cm.clone();
    let failures = Mutex::new(fail_first);
    let server = FakeApiServer::start(move |req: &FakeRequest| {
        if req.path != CM_PATH {
            return FakeResponse::not_found("configmaps", "other");
        }
        if req.header("authorization") != Some("Bearer hook-token") {
            return FakeResponse::status(401, "Unauthorized", "Unauthorized");
        }
        match req.method.as_str() {
            "GET" => FakeResponse::ok(state.lock().expect("lock").to_string()),
            "PATCH" => {
                {
                    let mut left = failures.lock().expect("lock");
                    if *left > 0 {
                        *left -= 1;
                        return FakeResponse::status(fail_status, "Failure", "try again later");
                    }
                }
                if req.header("content-type") != Some("application/merge-patch+json") {
                    return FakeResponse::status(415, "UnsupportedMediaType", "want merge patch");
                }
                let Ok(patch) = serde_json::from_str::<Value>(&req.body) else {
                    return FakeResponse::status(400, "BadRequest", "patch is not JSON");
                };
                let mut cm = state.lock().expect("lock");
                for (k, v) in patch["data"].as_object().into_iter().flatten() {
                    cm["data"][k] = v.clone();
                }
                FakeResponse::ok(cm.to_string())
            }
            _ => FakeResponse::status(405, "MethodNotAllowed", "no"),
        }
    })
    .expect("start fake API server");
    (server, cm)
}

fn hook(server_kubeconfig: &str, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, server_kubeconfig).expect("write kubeconfig");
    Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .env("POD_NAMESPACE", "mesh-system")
        .args(["uninstall-hook", "--kubeconfig"])
        .arg(&kc)
        .args(extra)
        .output()
        .expect("run meshcni-agent uninstall-hook")
}

#[test]
fn hook_sets_uninstall_true_by_merge_patch_and_waits() {
    let (server, cm) = cluster(0, 0);
    let t = Instant::now();
    let out = hook(
        &server.kubeconfig_yaml("hook-token"),
        &["--wait-seconds", "1"],
    );
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "hook failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cm = cm.lock().expect("lock").clone();
    assert_eq!(cm["data"]["uninstall"], "true");
    assert_eq!(
        cm["data"]["other"], "kept",
        "a merge patch keeps other keys"
    );
    let patches: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].path, CM_PATH);
    assert_eq!(
        serde_json::from_str::<Value>(&patches[0].body).expect("JSON body"),
        json!({"data": {"uninstall": "true"}})
    );
    assert!(
        took >= Duration::from_secs(1),
        "returned before --wait-seconds 1: {took:?}"
    );
}

#[test]
fn transient_failures_are_retried() {
    let (server, cm) = cluster(2, 503);
    let out = hook(
        &server.kubeconfig_yaml("hook-token"),
        &["--wait-seconds", "0"],
    );
    assert!(
        out.status.success(),
        "hook failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cm.lock().expect("lock")["data"]["uninstall"], "true");
    let patches = server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, 3, "two 503s then success");
}

#[test]
fn refusals_fail_at_once_naming_the_configmap_and_cause() {
    // 403: RBAC; named with the chart's Role. Not retried.
    let (server, cm) = cluster(usize::MAX, 403);
    let out = hook(
        &server.kubeconfig_yaml("hook-token"),
        &["--wait-seconds", "0"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("PATCH configmap mesh-system/meshcni-lifecycle answered HTTP 403")
            && err.contains("Role meshcni-uninstall"),
        "{err}"
    );
    assert_eq!(server.requests().len(), 1, "403 is not retried");
    assert_eq!(cm.lock().expect("lock")["data"]["uninstall"], "false");

    // 401: a wrong token.
    let (server, _) = cluster(0, 0);
    let out = hook(&server.kubeconfig_yaml("stale"), &["--wait-seconds", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("HTTP 401") && err.contains("token"), "{err}");

    // 404: another ConfigMap name.
    let (server, _) = cluster(0, 0);
    let out = hook(
        &server.kubeconfig_yaml("hook-token"),
        &["--wait-seconds", "0", "--configmap", "gone"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("configmap mesh-system/gone answered HTTP 404")
            && err.contains("configmap-lifecycle.yaml"),
        "{err}"
    );
}

#[test]
fn without_api_access_or_namespace_the_hook_names_what_is_missing() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .env("POD_NAMESPACE", "mesh-system")
        .args(["uninstall-hook", "--wait-seconds", "0"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("KUBERNETES_SERVICE_HOST"), "{err}");

    let sa = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", "1")
        .env("SERVICE_ACCOUNT_DIR", sa.path())
        .args(["uninstall-hook", "--wait-seconds", "0"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("POD_NAMESPACE is unset") && err.contains("namespace"),
        "{err}"
    );
}
