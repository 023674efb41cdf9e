//! Shared helpers of the installer integration tests: fixture paths and mapping a case's
//! `settings` object onto `InstallConfig`.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use meshcni_install::{InstallConfig, KeeperTuning};
use serde_json::Value;

pub fn fixtures(corpus: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio")
        .join(corpus)
}

pub fn load_cases(corpus: &str) -> Value {
    let p = fixtures(corpus).join("cases.json");
    serde_json::from_slice(&fs::read(&p).expect("read cases.json")).expect("parse cases.json")
}

pub fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

pub fn b(v: &Value, k: &str) -> Option<bool> {
    v.get(k).and_then(Value::as_bool)
}

/// Product defaults overlaid with a case's settings, for the Istio fixtures (plugin type
/// `istio-cni`). Paths the case leaves as placeholders are filled by the caller.
pub fn config_from_settings(defaults: &Value, settings: &Value, conf_dir: &Path) -> InstallConfig {
    let get = |k: &str| settings.get(k).or_else(|| defaults.get(k));
    let gs = |k: &str| get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let gb = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
    InstallConfig {
        mounted_cni_net_dir: conf_dir.to_path_buf(),
        cni_conf_name: gs("cni_conf_name"),
        chained_cni_plugin: get("chained_cni_plugin")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        cni_agent_run_dir: gs("cni_agent_run_dir").into(),
        plugin_log_level: gs("plugin_log_level"),
        pod_namespace: gs("pod_namespace"),
        ambient_enabled: gb("ambient_enabled"),
        ambient_enablement_selector: gs("ambient_enablement_selector"),
        exclude_namespaces: gs("exclude_namespaces"),
        native_nftables: gb("native_nftables"),
        enable_ambient_detection_retry: gb("enable_ambient_detection_retry"),
        istio_owned_cni_config: gb("istio_owned_cni_config"),
        istio_owned_cni_config_filename: gs("istio_owned_cni_config_filename"),
        cni_conf_group_read: gb("cni_conf_group_read"),
        k8s_service_protocol: gs("k8s_service_protocol"),
        k8s_service_host: gs("k8s_service_host"),
        k8s_service_port: gs("k8s_service_port"),
        skip_tls_verify: gb("skip_tls_verify"),
        kubeconfig_mode: get("kubeconfig_mode")
            .and_then(Value::as_str)
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(0o600),
        plugin_type: "istio-cni".into(),
        plugin_name: "istio-cni".into(),
        replace_plugin_types: vec![],
        kubecfg_file_name: "istio-cni-kubeconfig".into(),
        cni_bin_names: vec![],
        keeper: KeeperTuning::default(),
        ..InstallConfig::default()
    }
}

/// Copy fixture files into `dir` (mode 0644), `name -> fixture path relative to corpus`.
pub fn populate(dir: &Path, corpus: &str, files: Option<&Value>) {
    if let Some(Value::Object(m)) = files {
        for (name, src) in m {
            let src = fixtures(corpus).join(src.as_str().expect("fixture name"));
            let dst = dir.join(name);
            fs::copy(&src, &dst).expect("copy fixture");
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
    }
}

/// Write inline files (`{"text": …}` or `{"hex": …}`).
pub fn populate_inline(dir: &Path, files: Option<&Value>) {
    if let Some(Value::Object(m)) = files {
        for (name, spec) in m {
            let bytes = if let Some(t) = s(spec, "text") {
                t.as_bytes().to_vec()
            } else if let Some(h) = s(spec, "hex") {
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                    .collect()
            } else if let Some(t) = spec.as_str() {
                t.as_bytes().to_vec()
            } else {
                panic!("bad inline file spec {spec}");
            };
            fs::write(dir.join(name), bytes).expect("write inline");
        }
    }
}

/// Snapshot of a directory: sorted (name, bytes).
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

pub fn trimmed(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect("utf8").trim()
}
