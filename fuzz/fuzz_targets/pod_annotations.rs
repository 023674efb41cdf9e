//! Fuzz target: Pod → skip decision and sidecar capture config
//! (`meshcni_plugin::pod::{sidecar_skip_reason, capture_config_from_pod}`): the annotation, env
//! and securityContext parsing behind the sidecar redirect (spec §1.7).
//!
//! Input: a Kubernetes Pod as JSON; anything that is not a Pod is read as `key=value` lines
//! applied as annotations to a sidecar-injected template pod (mutations of annotation values
//! then reach the parsers instead of dying in the JSON decoder).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshcni_kube::Pod;

const TEMPLATE: &str = include_str!("../seeds/pod_annotations/default.json");

fn pod_from(data: &[u8]) -> Option<Pod> {
    if let Ok(pod) = serde_json::from_slice::<Pod>(data) {
        return Some(pod);
    }
    let mut pod: Pod = serde_json::from_str(TEMPLATE).ok()?;
    for line in String::from_utf8_lossy(data).lines() {
        if let Some((k, v)) = line.split_once('=') {
            pod.metadata
                .annotations
                .insert(k.to_string(), v.to_string());
        }
    }
    Some(pod)
}

fuzz_target!(|data: &[u8]| {
    if let Some(pod) = pod_from(data) {
        // Errors (invalid annotation values) are expected; panics are bugs.
        let _ = meshcni_plugin::pod::sidecar_skip_reason(&pod);
        let _ = meshcni_plugin::pod::capture_config_from_pod(&pod);
    }
});
