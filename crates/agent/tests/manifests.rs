//! Checks of the deployment artifacts:
//! * every document of `deploy/manifests/meshcni.yaml` is a real Kubernetes object: it
//!   deserializes into the `k8s-openapi` type for its kind, and serializing that back yields the
//!   identical tree (k8s-openapi silently drops unknown fields, so a lost field = a typo or an
//!   unknown field);
//! * RBAC is least privilege;
//! * the manifest is the chart rendered with its defaults: every leaf of `values.yaml` is
//!   checked against the manifest field it drives, and none is left unchecked;
//! * the chart templates reference only values that exist, and every value is used (the real
//!   `helm` render is tested in `helm_render.rs`);
//! * every env var the manifests set is a flag of `meshcni-agent`, and the agent accepts them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// All non-empty documents of a multi-document YAML file, as JSON trees.
fn documents(yaml: &str) -> Vec<Value> {
    // Empty and null documents are skipped.
    serde_saphyr::from_multiple::<Value>(yaml).expect("manifest documents are valid YAML")
}

/// Paths where `a` and `b` differ.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => diff(u, v, &p, out),
                    (Some(_), None) => {
                        out.push(format!("{p}: lost in round trip (unknown field?)"))
                    }
                    (None, Some(_)) => out.push(format!("{p}: added by round trip")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff(u, v, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} != {b}")),
    }
}

/// Deserialize strictly: typed, then back, and compare trees.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let name = format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    );
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{name} does not deserialize as its Kubernetes type: {e}"));
    let back = serde_json::to_value(&typed).expect("serialize back");
    let mut d = Vec::new();
    diff(doc, &back, &name, &mut d);
    assert!(
        d.is_empty(),
        "{name} is not a faithful Kubernetes object:\n{}",
        d.join("\n")
    );
    typed
}

/// The manifest's objects, typed.
struct Objects {
    service_account: ServiceAccount,
    config: ConfigMap,
    lifecycle: ConfigMap,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    role: Role,
    role_binding: RoleBinding,
    daemonset: DaemonSet,
    raw: Vec<Value>,
}

fn objects() -> Objects {
    let docs = documents(&read("deploy/manifests/meshcni.yaml"));
    let mut sa = None;
    let mut cms = BTreeMap::new();
    let mut cr = None;
    let mut crb = None;
    let mut role = None;
    let mut rb = None;
    let mut ds = None;
    for d in &docs {
        let kind = d["kind"].as_str().expect("every document has a kind");
        match (d["apiVersion"].as_str().expect("apiVersion"), kind) {
            ("v1", "ServiceAccount") => {
                assert!(sa.is_none(), "one ServiceAccount");
                sa = Some(strict::<ServiceAccount>(d));
            }
            ("v1", "ConfigMap") => {
                let cm = strict::<ConfigMap>(d);
                let name = cm.metadata.name.clone().expect("ConfigMap name");
                assert!(
                    cms.insert(name.clone(), cm).is_none(),
                    "duplicate ConfigMap {name}"
                );
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                assert!(cr.is_none(), "one ClusterRole");
                cr = Some(strict::<ClusterRole>(d));
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                assert!(crb.is_none(), "one ClusterRoleBinding");
                crb = Some(strict::<ClusterRoleBinding>(d));
            }
            ("rbac.authorization.k8s.io/v1", "Role") => {
                assert!(role.is_none(), "one Role");
                role = Some(strict::<Role>(d));
            }
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                assert!(rb.is_none(), "one RoleBinding");
                rb = Some(strict::<RoleBinding>(d));
            }
            ("apps/v1", "DaemonSet") => {
                assert!(ds.is_none(), "one DaemonSet");
                ds = Some(strict::<DaemonSet>(d));
            }
            (api, kind) => panic!("unexpected object {api} {kind} in the plain manifest"),
        }
    }
    let config = cms
        .remove("meshcni-config")
        .expect("ConfigMap meshcni-config");
    let lifecycle = cms
        .remove("meshcni-lifecycle")
        .expect("ConfigMap meshcni-lifecycle");
    assert!(cms.is_empty(), "unexpected ConfigMaps {:?}", cms.keys());
    Objects {
        service_account: sa.expect("ServiceAccount"),
        config,
        lifecycle,
        cluster_role: cr.expect("ClusterRole"),
        binding: crb.expect("ClusterRoleBinding"),
        role: role.expect("Role"),
        role_binding: rb.expect("RoleBinding"),
        daemonset: ds.expect("DaemonSet"),
        raw: docs,
    }
}

fn container(o: &Objects) -> &Container {
    let spec = o.daemonset.spec.as_ref().expect("DaemonSet spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.containers.len(), 1, "one container");
    &pod.containers[0]
}

#[test]
fn every_document_is_a_faithful_kubernetes_object() {
    let o = objects();
    assert_eq!(o.raw.len(), 8);
    // A deliberately misspelled field must be caught by the round trip.
    let mut bad = o
        .raw
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("DaemonSet doc")
        .clone();
    bad["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = Value::from(5);
    let caught = std::panic::catch_unwind(|| strict::<DaemonSet>(&bad));
    assert!(
        caught.is_err(),
        "an unknown field must fail the strict check"
    );
}

#[test]
fn objects_reference_each_other_consistently() {
    let o = objects();
    let ns = o
        .service_account
        .metadata
        .namespace
        .as_deref()
        .expect("SA namespace");
    assert_eq!(ns, "kube-system");
    let sa = o.service_account.metadata.name.as_deref().expect("SA name");
    let subjects = o.binding.subjects.as_ref().expect("binding subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, sa);
    assert_eq!(subjects[0].namespace.as_deref(), Some(ns));
    assert_eq!(o.binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&o.binding.role_ref.name),
        o.cluster_role.metadata.name.as_ref()
    );
    let ds = &o.daemonset;
    assert_eq!(ds.metadata.namespace.as_deref(), Some(ns));
    assert_eq!(ds.metadata.name.as_deref(), Some("meshcni-node"));
    // The Role (get on the agent's own DaemonSet) is bound to the agent's account, in its
    // namespace, and names the DaemonSet the agent is told it runs in.
    assert_eq!(o.role.metadata.namespace.as_deref(), Some(ns));
    assert_eq!(o.role_binding.metadata.namespace.as_deref(), Some(ns));
    assert_eq!(o.role_binding.role_ref.kind, "Role");
    assert_eq!(
        Some(&o.role_binding.role_ref.name),
        o.role.metadata.name.as_ref()
    );
    let rb_subjects = o
        .role_binding
        .subjects
        .as_ref()
        .expect("RoleBinding subjects");
    assert_eq!(rb_subjects.len(), 1);
    assert_eq!(rb_subjects[0].kind, "ServiceAccount");
    assert_eq!(rb_subjects[0].name, sa);
    assert_eq!(rb_subjects[0].namespace.as_deref(), Some(ns));
    assert_eq!(
        env_value(container(&o), "DAEMONSET_NAME").as_deref(),
        ds.metadata.name.as_deref(),
        "the agent's shutdown check must ask for its own DaemonSet"
    );
    let role_rules = o.role.rules.as_ref().expect("Role rules");
    assert_eq!(
        role_rules[0].resource_names.as_deref(),
        Some(&[ds.metadata.name.clone().expect("DaemonSet name")][..]),
        "the Role reads exactly the agent's DaemonSet"
    );
    let spec = ds.spec.as_ref().expect("spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(sa));
    // Selector matches template labels.
    let sel = spec.selector.match_labels.as_ref().expect("matchLabels");
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .expect("template labels");
    for (k, v) in sel {
        assert_eq!(labels.get(k), Some(v), "selector {k}={v} not on template");
    }
    // Every volume mount has a volume; envFrom names our ConfigMap.
    let c = container(&o);
    let vols: BTreeSet<_> = pod
        .volumes
        .as_ref()
        .expect("volumes")
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    for m in c.volume_mounts.as_ref().expect("mounts") {
        assert!(
            vols.contains(m.name.as_str()),
            "mount {} has no volume",
            m.name
        );
    }
    let env_from = c.env_from.as_ref().expect("envFrom");
    assert_eq!(
        env_from[0].config_map_ref.as_ref().map(|r| r.name.as_str()),
        o.config.metadata.name.as_deref()
    );
    // The lifecycle ConfigMap is projected where the agent looks for the marker.
    let lc = pod
        .volumes
        .as_ref()
        .expect("volumes")
        .iter()
        .find(|v| v.name == "meshcni-lifecycle")
        .expect("lifecycle volume");
    assert_eq!(
        lc.config_map.as_ref().map(|c| c.name.as_str()),
        o.lifecycle.metadata.name.as_deref()
    );
    assert_eq!(
        o.lifecycle
            .data
            .as_ref()
            .and_then(|d| d.get("uninstall"))
            .map(String::as_str),
        Some("false"),
        "a fresh install must not be marked for uninstall"
    );
    let mount = c
        .volume_mounts
        .as_ref()
        .expect("mounts")
        .iter()
        .find(|m| m.name == "meshcni-lifecycle")
        .expect("lifecycle mount");
    let marker = env_value(c, "UNINSTALL_MARKER_FILE").expect("UNINSTALL_MARKER_FILE");
    assert_eq!(marker, format!("{}/uninstall", mount.mount_path));
    // Probes point at the readiness port, the metrics port is declared.
    let rp = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness");
    assert_eq!(rp.path.as_deref(), Some("/readyz"));
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

#[test]
fn rbac_is_least_privilege() {
    let o = objects();
    let rules = o.cluster_role.rules.as_ref().expect("rules");
    let mut granted = BTreeSet::new();
    for r in rules {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.as_ref().expect("apiGroups") {
            assert_ne!(g, "*", "wildcard api group");
            for res in r.resources.as_ref().expect("resources") {
                assert_ne!(res, "*", "wildcard resource");
                for v in &r.verbs {
                    assert_ne!(v, "*", "wildcard verb");
                    granted.insert(format!("{g}/{res}:{v}"));
                }
            }
        }
    }
    let expected: BTreeSet<String> = [
        "/pods:get",
        "/pods:list",
        "/pods:watch",
        "/namespaces:get",
        "/namespaces:list",
        "/namespaces:watch",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        granted, expected,
        "default RBAC must be read-only pods/namespaces"
    );

    // In the chart every write verb is inside an `if` on a value.
    let tpl = read("deploy/helm/meshcni/templates/clusterrole.yaml");
    let mut depth = 0i32;
    for line in tpl.lines() {
        let t = line.trim();
        if t.starts_with("{{- if") || t.starts_with("{{ if") {
            depth += 1;
        } else if t.starts_with("{{- end") || t.starts_with("{{ end") {
            depth -= 1;
        }
        if t.starts_with("verbs:") {
            let writes = [
                "create",
                "update",
                "patch",
                "delete",
                "deletecollection",
                "escalate",
                "bind",
                "impersonate",
            ];
            if writes.iter().any(|w| t.contains(&format!("\"{w}\""))) {
                assert!(depth > 0, "ungated write verbs in clusterrole.yaml: {t}");
            }
            assert!(!t.contains("\"*\""), "wildcard verb in clusterrole.yaml");
        }
        assert!(!t.contains("secrets"), "the agent must not read secrets");
    }
    assert_eq!(depth, 0, "unbalanced if/end in clusterrole.yaml");

    // The namespaced Role: exactly `get` on the agent's own DaemonSet (its shutdown check).
    let role_rules = o.role.rules.as_ref().expect("Role rules");
    assert_eq!(role_rules.len(), 1, "one Role rule");
    let r = &role_rules[0];
    assert_eq!(r.api_groups.as_deref(), Some(&["apps".to_string()][..]));
    assert_eq!(
        r.resources.as_deref(),
        Some(&["daemonsets".to_string()][..])
    );
    assert_eq!(r.verbs, ["get"]);
    assert_eq!(
        r.resource_names.as_deref(),
        Some(&["meshcni-node".to_string()][..])
    );
    assert!(r.non_resource_urls.is_none());
}

// ---------------------------------------------------------------------------------------------
// values.yaml ↔ manifest

fn values() -> Value {
    serde_saphyr::from_str(&read("deploy/helm/meshcni/values.yaml")).expect("values.yaml")
}

fn leaves(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                leaves(
                    x,
                    &if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    },
                    out,
                );
            }
        }
        _ => out.push(path.to_string()),
    }
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

/// Records which value paths were checked.
struct Coverage {
    values: Value,
    covered: BTreeSet<String>,
}

impl Coverage {
    fn get(&mut self, path: &str) -> Value {
        let v = at(&self.values, path).clone();
        assert!(
            !v.is_null() || path.ends_with("FileName") || path.ends_with("configDir"),
            "values.yaml has no {path}"
        );
        self.covered.insert(path.to_string());
        v
    }
    fn str(&mut self, path: &str) -> String {
        match self.get(path) {
            Value::String(s) => s,
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }
}

fn to_json<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("to JSON")
}

#[test]
fn manifest_is_the_chart_rendered_with_defaults() {
    let o = objects();
    let mut cov = Coverage {
        values: values(),
        covered: BTreeSet::new(),
    };
    let data = o.config.data.clone().expect("ConfigMap data");
    let cm = |k: &str| data.get(k).cloned();
    let c = container(&o).clone();
    let ds_spec = o.daemonset.spec.clone().expect("spec");
    let pod = ds_spec.template.spec.clone().expect("pod spec");
    let tmeta = ds_spec
        .template
        .metadata
        .clone()
        .expect("template metadata");
    let volume_path = |name: &str| {
        pod.volumes
            .as_ref()
            .expect("volumes")
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let has_volume = |name: &str| {
        pod.volumes
            .as_ref()
            .expect("volumes")
            .iter()
            .any(|v| v.name == name)
    };

    // Image.
    let image = format!("{}/{}:{}", cov.str("hub"), cov.str("image"), cov.str("tag"));
    assert_eq!(c.image.as_deref(), Some(image.as_str()));
    assert_eq!(c.image_pull_policy, Some(cov.str("imagePullPolicy")));

    // Host paths and installer settings.
    assert_eq!(volume_path("cni-bin-dir"), Some(cov.str("cniBinDir")));
    let conf_dir = cov.str("cniConfDir");
    assert_eq!(volume_path("cni-net-dir"), Some(conf_dir.clone()));
    assert_eq!(cm("CNI_NET_DIR"), Some(conf_dir));
    let conf_name = cov.str("cniConfFileName");
    assert_eq!(
        cm("CNI_CONF_NAME"),
        (!conf_name.is_empty()).then_some(conf_name)
    );
    assert_eq!(
        cm("ISTIO_OWNED_CNI_CONFIG"),
        Some(cov.str("istioOwnedCNIConfig"))
    );
    let owned = cov.str("istioOwnedCNIConfigFileName");
    assert_eq!(
        cm("ISTIO_OWNED_CNI_CONFIG_FILENAME"),
        (!owned.is_empty()).then_some(owned)
    );
    let excl: Vec<String> = cov
        .get("excludeNamespaces")
        .as_array()
        .expect("excludeNamespaces list")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect();
    assert_eq!(cm("EXCLUDE_NAMESPACES"), Some(excl.join(",")));
    assert_eq!(cm("CHAINED_CNI_PLUGIN"), Some(cov.str("chained")));
    let provider = cov.str("provider");
    assert_eq!(provider, "default");
    assert!(
        !o.raw
            .iter()
            .any(|d| d["kind"] == "NetworkAttachmentDefinition"),
        "provider=default renders no NetworkAttachmentDefinition"
    );

    // Ambient.
    let ambient = cov.str("ambient.enabled");
    assert_eq!(cm("AMBIENT_ENABLED"), Some(ambient.clone()));
    assert_eq!(
        cm("AMBIENT_REDIRECT_MODE"),
        Some(cov.str("ambient.redirectMode"))
    );
    let dir = cov.str("ambient.configDir");
    let dir = if dir.is_empty() {
        "/etc/ambient-config".to_string()
    } else {
        dir
    };
    assert_eq!(cm("AMBIENT_CONFIG_DIR"), Some(dir));
    let sel_values = cov.get("ambient.enablementSelectors");
    let sel_cm: Value =
        serde_saphyr::from_str(&cm("AMBIENT_ENABLEMENT_SELECTOR").expect("selector"))
            .expect("yaml");
    assert_eq!(sel_cm, sel_values);
    assert_eq!(
        cm("AMBIENT_DNS_CAPTURE"),
        Some(cov.str("ambient.dnsCapture"))
    );
    assert_eq!(
        cm("ENABLE_AMBIENT_DETECTION_RETRY"),
        Some(cov.str("ambient.enableAmbientDetectionRetry"))
    );
    assert_eq!(
        cm("AMBIENT_DETECTION_FAILURE_POLICY"),
        Some(cov.str("ambient.detectionFailurePolicy"))
    );
    // ztunnel identity (issue 8 item 13): settable from the chart, defaults equal to the agent's.
    let defaults = meshcni_agent::cli::AgentArgs::defaults();
    let zt_ns = cov.str("ambient.ztunnelNamespace");
    assert_eq!(zt_ns, defaults.system_namespace);
    assert_eq!(cm("SYSTEM_NAMESPACE"), Some(zt_ns));
    let zt_sa = cov.str("ambient.ztunnelServiceAccount");
    assert_eq!(zt_sa, defaults.ztunnel_service_account);
    assert_eq!(cm("ZTUNNEL_SERVICE_ACCOUNT"), Some(zt_sa));
    // Always the node's network (the agent never needs a CNI ADD of its own).
    assert_eq!(pod.host_network, Some(true));
    // Ambient off ⇒ no ambient mounts, no added capabilities, no netns dir.
    assert_eq!(ambient, "false");
    let _ = cov.str("cniNetnsDir");
    for v in [
        "cni-netns-dir",
        "cni-ambientconfig-dir",
        "host-proc",
        "xtables-lock",
    ] {
        assert!(
            !has_volume(v),
            "ambient volume {v} present with ambient disabled"
        );
    }
    let sc = c.security_context.clone().expect("securityContext");
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert_eq!(caps.add, None, "no capabilities without ambient");
    assert_eq!(
        sc.privileged.map(|b| b.to_string()),
        Some(cov.str("privileged"))
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let seccomp = cov.get("seccompProfile");
    assert_eq!(
        sc.seccomp_profile.as_ref().map(to_json),
        (seccomp != Value::Object(Default::default())).then_some(seccomp)
    );

    // No value or env var for a setting this build does not implement (repair, in-pod knobs).
    for gone in [
        "REPAIR_",
        "AMBIENT_IPV6",
        "AMBIENT_RECONCILE",
        "ALLOW_SWITCH_TO_HOST_NS",
    ] {
        assert!(
            !data.keys().any(|k| k.starts_with(gone)),
            "ConfigMap sets {gone}*"
        );
    }

    // Ports.
    let mport = cov.get("monitoringPort").as_i64().expect("int");
    let rport = cov.get("readinessPort").as_i64().expect("int");
    assert_eq!(cm("MONITORING_PORT"), Some(mport.to_string()));
    assert_eq!(cm("READINESS_PORT"), Some(rport.to_string()));
    let ports: BTreeMap<String, i64> = c
        .ports
        .as_ref()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p.name.clone().expect("port name"),
                i64::from(p.container_port),
            )
        })
        .collect();
    assert_eq!(ports.get("metrics"), Some(&mport));
    assert_eq!(ports.get("readiness"), Some(&rport));
    let annotations = tmeta.annotations.clone().expect("annotations");
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&mport.to_string())
    );
    let probe_port = to_json(
        &c.readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("probe")
            .port,
    );
    assert_eq!(probe_port.as_i64(), Some(rport));

    // Pod scheduling and metadata.
    let fixed_annotations = [
        "sidecar.istio.io/inject",
        "ambient.istio.io/redirection",
        "prometheus.io/scrape",
        "prometheus.io/port",
        "prometheus.io/path",
    ];
    let extra: BTreeMap<_, _> = annotations
        .iter()
        .filter(|(k, _)| !fixed_annotations.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), Value::from(v.clone())))
        .collect();
    assert_eq!(
        Value::Object(extra.into_iter().collect()),
        cov.get("podAnnotations")
    );
    let labels = tmeta.labels.clone().expect("labels");
    let extra: BTreeMap<_, _> = labels
        .iter()
        .filter(|(k, _)| {
            !(k.starts_with("app.kubernetes.io/")
                || [
                    "k8s-app",
                    "sidecar.istio.io/inject",
                    "istio.io/dataplane-mode",
                ]
                .contains(&k.as_str()))
        })
        .map(|(k, v)| (k.clone(), Value::from(v.clone())))
        .collect();
    assert_eq!(
        Value::Object(extra.into_iter().collect()),
        cov.get("podLabels")
    );
    assert_eq!(
        pod.node_selector.as_ref().map(to_json),
        Some(cov.get("nodeSelector"))
    );
    let aff = cov.get("affinity");
    assert_eq!(
        pod.affinity.as_ref().map(to_json),
        (aff != Value::Object(Default::default())).then_some(aff)
    );
    assert_eq!(
        pod.tolerations.as_ref().map(to_json),
        Some(cov.get("tolerations"))
    );
    assert_eq!(pod.priority_class_name, Some(cov.str("priorityClassName")));
    assert_eq!(
        c.resources.as_ref().map(to_json),
        Some(cov.get("resources"))
    );
    assert_eq!(
        ds_spec.update_strategy.as_ref().map(to_json),
        Some(cov.get("updateStrategy"))
    );
    assert_eq!(
        pod.termination_grace_period_seconds,
        cov.get("terminationGracePeriodSeconds").as_i64()
    );
    // values.env = {} ⇒ only the fixed env entries.
    assert_eq!(cov.get("env"), Value::Object(Default::default()));
    let names: Vec<_> = c
        .env
        .as_ref()
        .expect("env")
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "MOUNTED_CNI_NET_DIR",
            "CNI_BIN_DIRS",
            "CNI_AGENT_RUN_DIR",
            "NETNS_DIR",
            "UNINSTALL_MARKER_FILE",
            "NODE_NAME",
            "POD_NAMESPACE",
            "DAEMONSET_NAME"
        ]
    );

    // Uninstall hook: Helm-only; the plain manifest carries only the lifecycle ConfigMap.
    assert_eq!(cov.get("uninstallHook.enabled"), Value::Bool(true));
    assert!(cov.get("uninstallHook.waitSeconds").as_i64().expect("int") >= 60);
    assert!(
        !o.raw.iter().any(|d| d["kind"] == "Job"),
        "hooks are not part of the plain manifest"
    );

    // Node readiness taint: off, so neither variable nor the nodes rule (rbac_is_least_privilege).
    assert_eq!(cov.get("taint.enabled"), Value::Bool(false));
    assert_eq!(cov.str("taint.key"), "cni.istio.io/not-ready");
    assert_eq!(cm("REMOVE_NODE_TAINT"), None);
    assert_eq!(cm("NODE_TAINT_KEY"), None);

    // Globals.
    assert_eq!(cm("LOG_LEVEL"), Some(cov.str("global.logging.level")));
    let json = cov.get("global.logAsJson").as_bool().expect("bool");
    assert_eq!(
        cm("LOG_FORMAT").as_deref(),
        Some(if json { "json" } else { "text" })
    );
    assert_eq!(
        cm("NATIVE_NFTABLES"),
        Some(cov.str("global.nativeNftables"))
    );

    // Repair: off by default (the binary's default too): no REPAIR_* setting, no write
    // permission; its other values only matter when it is on (helm_render.rs checks them).
    assert_eq!(cov.get("repair.enabled"), Value::Bool(false));
    assert!(
        !data.keys().any(|k| k.starts_with("REPAIR_")),
        "repair off renders no REPAIR_* setting"
    );
    for leaf in [
        "repair.repairPods",
        "repair.deletePods",
        "repair.labelPods",
        "repair.brokenPodLabelKey",
        "repair.brokenPodLabelValue",
        "repair.resyncSeconds",
    ] {
        cov.get(leaf);
    }
    assert_eq!(cov.get("repair.repairPods"), Value::Bool(true));

    // Nothing in values.yaml escaped the check.
    let mut all = Vec::new();
    leaves(&cov.values, "", &mut all);
    let unchecked: Vec<_> = all
        .iter()
        .filter(|leaf| {
            !cov.covered
                .iter()
                .any(|c| *leaf == c || leaf.starts_with(&format!("{c}.")))
        })
        .collect();
    assert!(
        unchecked.is_empty(),
        "values not checked against the manifest: {unchecked:?}"
    );
}

/// `.Values.a.b` references in a template.
fn value_refs(tpl: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = tpl;
    while let Some(i) = rest.find(".Values.") {
        let s = &rest[i + ".Values.".len()..];
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
            .unwrap_or(s.len());
        out.insert(s[..end].trim_end_matches('.').to_string());
        rest = &s[end..];
    }
    out
}

#[test]
fn chart_templates_and_values_agree() {
    let values = values();
    let dir = repo().join("deploy/helm/meshcni/templates");
    let mut refs = BTreeSet::new();
    for e in std::fs::read_dir(&dir).expect("templates dir") {
        let p = e.expect("entry").path();
        let text = std::fs::read_to_string(&p).expect("template");
        // Balanced actions: every "{{" closes.
        assert_eq!(
            text.matches("{{").count(),
            text.matches("}}").count(),
            "{}",
            p.display()
        );
        for r in value_refs(&text) {
            assert!(
                !at(&values, &r).is_null() || r.ends_with("FileName") || r.ends_with("configDir"),
                "{} references .Values.{r}, which values.yaml lacks",
                p.display()
            );
            refs.insert(r);
        }
    }
    let mut all = Vec::new();
    leaves(&values, "", &mut all);
    for leaf in all {
        assert!(
            refs.iter()
                .any(|r| leaf == *r || leaf.starts_with(&format!("{r}."))),
            "values.yaml {leaf} is used by no template"
        );
    }
    let chart: Value =
        serde_saphyr::from_str(&read("deploy/helm/meshcni/Chart.yaml")).expect("Chart.yaml");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "meshcni");
    // Version label rendered from Chart.appVersion.
    let o = objects();
    assert_eq!(
        o.daemonset
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/version"))
            .map(String::as_str),
        chart["appVersion"].as_str()
    );
}

#[test]
fn manifest_env_is_understood_by_the_agent() {
    use clap::CommandFactory;
    let o = objects();
    let cmd = meshcni_agent::cli::Cli::command();
    let known: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let mut env: Vec<(String, String)> = Vec::new();
    for (k, v) in o.config.data.clone().expect("data") {
        // Informational, like Istio's CURRENT_AGENT_VERSION.
        if k == "CURRENT_AGENT_VERSION" {
            continue;
        }
        assert!(
            known.contains(&k),
            "ConfigMap sets {k}, which is no meshcni-agent flag"
        );
        env.push((k, v));
    }
    // Set by Kubernetes in every pod (loopback port 1 stands in: nothing is contacted).
    env.extend(in_pod_env());
    for e in container(&o).env.clone().expect("env") {
        assert!(
            known.contains(&e.name),
            "DaemonSet sets {}, which is no meshcni-agent flag",
            e.name
        );
        env.push((
            e.name.clone(),
            e.value.unwrap_or_else(|| "downward-api-value".into()),
        ));
    }
    // The agent parses all of them (values included) without error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .envs(env)
        .arg("check-config")
        .output()
        .expect("run meshcni-agent check-config");
    assert!(
        out.status.success(),
        "agent rejected the manifest's env: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ambient_enabled: false"), "{text}");
    assert!(
        text.contains("exclude_namespaces: [\"kube-system\"]"),
        "{text}"
    );
}

/// What Kubernetes puts into every pod's environment (the API server's service), with a
/// loopback stand-in that nothing listens on.
fn in_pod_env() -> [(String, String); 2] {
    [
        ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
        ("KUBERNETES_SERVICE_PORT".into(), "1".into()),
    ]
}

/// The agent's environment from the plain manifest (ConfigMap + DaemonSet env), with
/// Downward-API values stood in for.
fn manifest_env(o: &Objects) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = o
        .config
        .data
        .clone()
        .expect("data")
        .into_iter()
        .filter(|(k, _)| k != "CURRENT_AGENT_VERSION")
        .chain(in_pod_env())
        .collect();
    for e in container(o).env.clone().expect("env") {
        env.push((
            e.name.clone(),
            e.value.unwrap_or_else(|| "downward-api-value".into()),
        ));
    }
    env
}

/// Safe defaults: with ambient on, the chart renders only a redirect mode the agent has a driver
/// for. The chart's guard (`meshcni.checkRedirectMode`, a `fail` in the DaemonSet template) and
/// the agent's refusal must agree mode for mode: the guard's list of built modes is the agent's
/// `BUILT_REDIRECT_MODES`, and the manifest's environment with ambient switched on is accepted by
/// `check-config` exactly for those modes (and refused, naming the setting, for the others).
#[test]
fn ambient_on_renders_only_built_redirect_modes() {
    let helpers = read("deploy/helm/meshcni/templates/_helpers.tpl");
    let body = helpers
        .split("{{- define \"meshcni.builtRedirectModes\" -}}")
        .nth(1)
        .and_then(|r| r.split("{{- end }}").next())
        .expect("meshcni.builtRedirectModes define");
    let chart_built: BTreeSet<String> = body
        .trim()
        .split(',')
        .map(|m| m.trim().to_string())
        .collect();
    let agent_built: BTreeSet<String> = meshcni_agent::cli::BUILT_REDIRECT_MODES
        .iter()
        .map(|m| m.to_string())
        .collect();
    assert_eq!(
        chart_built, agent_built,
        "chart and agent disagree on built modes"
    );
    let guard = helpers
        .split("{{- define \"meshcni.checkRedirectMode\" -}}")
        .nth(1)
        .expect("meshcni.checkRedirectMode define");
    assert!(
        guard.contains(
            "{{- if and .Values.ambient.enabled (not (has .Values.ambient.redirectMode $built)) }}"
        ) && guard.contains("{{- fail (printf \"ambient.redirectMode=%s is not available"),
        "the guard fails the render for an unbuilt mode with ambient on:\n{guard}"
    );
    let ds = read("deploy/helm/meshcni/templates/daemonset.yaml");
    assert!(
        ds.starts_with("{{- include \"meshcni.checkRedirectMode\" . }}"),
        "the DaemonSet template runs the guard"
    );
    // The chart's defaults: ambient off, redirectMode inpod (Istio's) — rendering is fine.
    let values = values();
    assert_eq!(values["ambient"]["enabled"], Value::Bool(false));
    assert_eq!(values["ambient"]["redirectMode"], "inpod");

    let o = objects();
    for mode in ["inpod", "ebpf", "iptables"] {
        let mut env = manifest_env(&o);
        for (k, v) in env.iter_mut() {
            if k == "AMBIENT_ENABLED" {
                *v = "true".into();
            }
            if k == "AMBIENT_REDIRECT_MODE" {
                *v = mode.into();
            }
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
            .env_clear()
            .envs(env)
            .arg("check-config")
            .output()
            .expect("run meshcni-agent check-config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if chart_built.contains(mode) {
            assert!(out.status.success(), "{mode}: {stderr}");
        } else {
            assert!(!out.status.success(), "{mode} must be refused");
            assert!(
                stderr.contains(&format!("AMBIENT_REDIRECT_MODE={mode}"))
                    && stderr.contains("not available in this build"),
                "{mode}: {stderr}"
            );
        }
    }
}
