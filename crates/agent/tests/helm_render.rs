//! The Helm chart rendered by a real `helm` (v4, built by `scripts/setup.sh` from the
//! `helm.sh/helm/v4` module; path in `MESHCNI_HELM`, default
//! `/opt/meshcni/bin/helm-v4.3.2`):
//! * with its defaults it renders exactly `deploy/manifests/meshcni.yaml` (every object, every
//!   field; the manifest leaves out only the Helm pre-delete hook);
//! * ambient on with a mode without a driver in this build fails the render with a message
//!   naming the setting;
//! * ambient on with the default `inpod`, with `iptables` or with `ebpf` renders a DaemonSet in
//!   the host netns whose environment the agent's `check-config` accepts (inpod and ebpf: host
//!   PID namespace for netns discovery; inpod: the ZDS socket directory mounted; ebpf: the
//!   host's bpffs mounted and CAP_BPF).
//!
//! * every value documented in `values.yaml` (each leaf, enumerated from the file), set to a
//!   non-default value, changes the render exactly where it should and the agent accepts the
//!   rendered environment — or the render fails naming it (a value accepted and ignored fails
//!   the test); `helm lint --strict` passes with all of them set;
//! * `values.schema.json` describes exactly the documented values: a misspelt or undocumented
//!   key, or a value outside its set, fails the render naming it.
//!
//! A missing `helm` fails these tests (never skips them): run `scripts/setup.sh`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

const DEFAULT_HELM: &str = "/opt/meshcni/bin/helm-v4.3.2";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn helm() -> PathBuf {
    let p = std::env::var_os("MESHCNI_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HELM));
    assert!(
        p.is_file(),
        "helm not found at {} (set MESHCNI_HELM or run scripts/setup.sh, which builds it)",
        p.display()
    );
    p
}

fn render(sets: &[&str]) -> Output {
    render_args(sets)
}

/// `helm template` with `--set` for each item, except items starting with `--`, which are passed
/// as flags.
fn render_args(sets: &[&str]) -> Output {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "meshcni"])
        .arg(repo().join("deploy/helm/meshcni"))
        .args(["--namespace", "kube-system", "--no-hooks"]);
    for s in sets {
        if s.starts_with("--") {
            cmd.arg(s);
        } else {
            cmd.args(["--set", s]);
        }
    }
    // No repository config, cache or plugins of the machine's user are read.
    let home = tempfile::tempdir().expect("tempdir");
    cmd.env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"));
    cmd.output().expect("run helm template")
}

fn rendered(sets: &[&str]) -> String {
    let out = render(sets);
    assert!(
        out.status.success(),
        "helm template {sets:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm output is UTF-8")
}

/// `taint.enabled` adds exactly one ClusterRole rule: `get` and `patch` on core `nodes`, no
/// resource names (RBAC cannot name "the pod's own node"; ARCHITECTURE.md), and nothing else
/// changes in the existing rules.
#[test]
fn taint_enabled_grants_exactly_get_and_patch_on_nodes() {
    let key = ("ClusterRole".to_string(), "meshcni".to_string());
    let off = objects(&rendered(&[]))[&key]["rules"].clone();
    let on = objects(&rendered(&["taint.enabled=true"]))[&key]["rules"].clone();
    let (off, on) = (
        off.as_array().expect("rules"),
        on.as_array().expect("rules"),
    );
    assert_eq!(on.len(), off.len() + 1, "{on:?}");
    assert_eq!(&on[..off.len()], &off[..]);
    assert_eq!(
        on[off.len()],
        serde_json::json!({"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]})
    );
}

/// Objects by (kind, name).
fn objects(yaml: &str) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    // Empty and null documents are skipped.
    for v in serde_saphyr::from_multiple::<Value>(yaml).expect("valid YAML") {
        let kind = v["kind"].as_str().expect("kind").to_string();
        let name = v["metadata"]["name"].as_str().expect("name").to_string();
        assert!(
            out.insert((kind.clone(), name.clone()), v).is_none(),
            "{kind}/{name} twice"
        );
    }
    out
}

#[test]
fn chart_defaults_render_exactly_the_plain_manifest() {
    let chart = objects(&rendered(&[]));
    let manifest = objects(
        &std::fs::read_to_string(repo().join("deploy/manifests/meshcni.yaml"))
            .expect("read manifest"),
    );
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        manifest.keys().collect::<Vec<_>>(),
        "same objects"
    );
    for (k, v) in &chart {
        assert_eq!(
            v, &manifest[k],
            "{k:?} differs between helm and the manifest"
        );
    }
}

#[test]
fn ambient_with_an_unbuilt_redirect_mode_fails_the_render_naming_the_setting() {
    // The values schema refuses it first, naming the value and the modes there are.
    let sets = &["ambient.enabled=true", "ambient.redirectMode=tproxy"][..];
    let out = render(sets);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{sets:?} rendered");
    assert!(
        stderr.contains("/ambient/redirectMode") && stderr.contains("'inpod', 'iptables', 'ebpf'"),
        "{sets:?}: {stderr}"
    );
    // With the schema skipped, the template's own check still refuses it by name.
    let mut sets_skip = sets.to_vec();
    sets_skip.push("--skip-schema-validation");
    let out = render_args(&sets_skip);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{sets_skip:?} rendered");
    assert!(
        stderr.contains("ambient.redirectMode=tproxy is not available in this build")
            && stderr.contains("set ambient.redirectMode=inpod"),
        "{sets_skip:?}: {stderr}"
    );
}

#[test]
fn ambient_iptables_renders_a_host_network_agent_the_agent_accepts() {
    ambient_mode_renders_a_host_network_agent_the_agent_accepts("iptables");
}

#[test]
fn ambient_ebpf_renders_a_host_network_agent_with_bpffs_the_agent_accepts() {
    ambient_mode_renders_a_host_network_agent_the_agent_accepts("ebpf");
}

#[test]
fn ambient_inpod_renders_a_host_network_agent_with_the_zds_socket_the_agent_accepts() {
    ambient_mode_renders_a_host_network_agent_the_agent_accepts("inpod");
}

fn ambient_mode_renders_a_host_network_agent_the_agent_accepts(mode: &str) {
    let set_mode = format!("ambient.redirectMode={mode}");
    let objs = objects(&rendered(&["ambient.enabled=true", &set_mode]));
    let ds = objs
        .iter()
        .find(|((kind, _), _)| kind == "DaemonSet")
        .map(|(_, v)| v)
        .expect("a DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        spec["hostNetwork"],
        Value::Bool(true),
        "iptables mode runs in the host netns"
    );
    // The agent's environment: the ConfigMap it loads with envFrom plus literal env entries.
    let mut env: Vec<(String, String)> = Vec::new();
    let container = &spec["containers"][0];
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"].as_str().expect("configMapRef");
        let cm = &objs[&("ConfigMap".to_string(), name.to_string())];
        for (k, v) in cm["data"].as_object().expect("data") {
            env.push((k.clone(), v.as_str().expect("string").to_string()));
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        // Downward-API entries (NODE_NAME, POD_NAMESPACE) get a stand-in value.
        let v = e["value"].as_str().unwrap_or("downward-api-value");
        env.push((e["name"].as_str().expect("name").to_string(), v.to_string()));
    }
    // Set by Kubernetes in every pod (loopback port 1 stands in: nothing is contacted).
    env.push(("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()));
    env.push(("KUBERNETES_SERVICE_PORT".into(), "1".into()));
    let get = |k: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("AMBIENT_ENABLED"), Some("true"));
    assert_eq!(get("AMBIENT_REDIRECT_MODE"), Some(mode));
    let inpod = mode == "inpod";
    let ebpf = mode == "ebpf";
    assert_eq!(
        spec["hostPID"],
        Value::Bool(inpod || ebpf),
        "host PID namespace only for inpod and ebpf"
    );
    let caps: Vec<&str> = container["securityContext"]["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        caps.contains(&"BPF"),
        ebpf,
        "CAP_BPF only for ebpf: {caps:?}"
    );
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(
        mounts.contains(&"/var/run/ztunnel"),
        inpod,
        "the ZDS socket dir is mounted only for inpod: {mounts:?}"
    );
    assert!(mounts.contains(&"/var/run/netns"), "{mounts:?}");
    assert_eq!(
        mounts.contains(&"/sys/fs/bpf"),
        ebpf,
        "the host's bpffs is mounted only for ebpf: {mounts:?}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .envs(env)
        .arg("check-config")
        .output()
        .expect("run meshcni-agent check-config");
    assert!(
        out.status.success(),
        "the rendered environment is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pre-delete hook runs the chart's own image (`meshcni-agent uninstall-hook`), nothing
/// third-party; the removed `uninstallHook.image` value is refused, not silently ignored.
#[test]
fn uninstall_hook_runs_the_meshcni_image_and_the_old_image_value_is_refused() {
    let home = tempfile::tempdir().expect("tempdir");
    let template = |sets: &[&str]| {
        let mut cmd = Command::new(helm());
        cmd.args(["template", "meshcni"])
            .arg(repo().join("deploy/helm/meshcni"))
            .args(["--namespace", "kube-system"])
            .env("HELM_CONFIG_HOME", home.path().join("config"))
            .env("HELM_CACHE_HOME", home.path().join("cache"))
            .env("HELM_DATA_HOME", home.path().join("data"));
        for s in sets {
            cmd.args(["--set", s]);
        }
        cmd.output().expect("run helm template")
    };
    let out = template(&["uninstallHook.waitSeconds=75"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objs = objects(&String::from_utf8(out.stdout).expect("UTF-8"));
    let ds = &objs[&("DaemonSet".to_string(), "meshcni-node".to_string())];
    let agent_image = ds["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    let job = &objs[&("Job".to_string(), "meshcni-uninstall".to_string())];
    let spec = &job["spec"]["template"]["spec"];
    assert_eq!(
        spec.get("initContainers"),
        None,
        "one container does the whole hook"
    );
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], agent_image, "the hook runs the agent's image");
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "uninstall-hook",
            "--configmap=meshcni-lifecycle",
            "--wait-seconds=75"
        ]
    );
    // The agent parses exactly these arguments.
    let parsed = <meshcni_agent::cli::Cli as clap::Parser>::try_parse_from(
        std::iter::once("meshcni-agent").chain(args.iter().copied()),
    )
    .expect("the agent accepts the hook's arguments");
    assert_eq!(
        parsed.command,
        Some(meshcni_agent::cli::Command::UninstallHook(
            meshcni_agent::cli::UninstallHookArgs {
                configmap: "meshcni-lifecycle".into(),
                wait_seconds: 75,
                kubeconfig: String::new(),
            }
        ))
    );
    // The ConfigMap it patches is the one the chart creates and mounts.
    assert!(objs.contains_key(&("ConfigMap".to_string(), "meshcni-lifecycle".to_string())));
    assert_eq!(c["env"][0]["name"], "POD_NAMESPACE");

    let out = template(&["uninstallHook.image=docker.io/bitnami/kubectl:latest"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uninstallHook.image was accepted");
    assert!(
        stderr.contains("uninstallHook.image was removed"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Every documented value, set to a non-default value, changes the render where it should.

/// Where a documented value is tested.
struct ValueCase {
    /// Leaf path in values.yaml (`a.b.c`).
    key: &'static str,
    /// The non-default value, JSON.
    value: &'static str,
    /// Other values (path, JSON) it is tested with; the baseline is rendered with these too.
    context: &'static [(&'static str, &'static str)],
    /// What must happen.
    expect: Expect,
}

enum Expect {
    /// The render differs from the baseline in exactly these places (`Kind/name` for a whole
    /// object added or removed, else `Kind/name` + a JSON pointer prefix) and in each of them.
    Changes(&'static [&'static str]),
    /// The same, against the render of these values instead of the context alone (for values
    /// that are one choice among several, where the context alone is not a valid render).
    ChangesFrom(
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
    ),
}

/// Ambient on with the default redirect mode (inpod).
const AMBIENT: &[(&str, &str)] = &[("ambient.enabled", "true")];

/// Repair on (in-place, the default action).
const REPAIR: &[(&str, &str)] = &[("repair.enabled", "true")];

/// Every value of values.yaml (a leaf = a scalar, a list or an empty map) with a non-default
/// valid value and where its change must show. A value without a case here — a newly added
/// one — fails `every_documented_value_changes_the_render_where_it_should`, and so does a case
/// for a value values.yaml lacks. There are no documented no-ops: every value changes the
/// render.
fn value_cases() -> Vec<ValueCase> {
    use Expect::{Changes, ChangesFrom};
    let c = |key, value, expect| ValueCase {
        key,
        value,
        context: &[],
        expect,
    };
    let amb = |key, value, expect| ValueCase {
        key,
        value,
        context: AMBIENT,
        expect,
    };
    let image = &[
        "DaemonSet/meshcni-node/spec/template/spec/containers/0/image",
        "Job/meshcni-uninstall/spec/template/spec/containers/0/image",
    ][..];
    vec![
        c("hub", r#""registry.example/mesh""#, Changes(image)),
        c("image", r#""meshcni-agent-dev""#, Changes(image)),
        c("tag", r#""0.1.1""#, Changes(image)),
        c(
            "imagePullPolicy",
            r#""Always""#,
            Changes(&[
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/imagePullPolicy",
                "Job/meshcni-uninstall/spec/template/spec/containers/0/imagePullPolicy",
            ]),
        ),
        c(
            "cniBinDir",
            r#""/usr/libexec/cni""#,
            Changes(&["DaemonSet/meshcni-node/spec/template/spec/volumes/0/hostPath/path"]),
        ),
        c(
            "cniConfDir",
            r#""/var/lib/cni/net.d""#,
            Changes(&[
                "ConfigMap/meshcni-config/data/CNI_NET_DIR",
                "DaemonSet/meshcni-node/spec/template/spec/volumes/1/hostPath/path",
            ]),
        ),
        c(
            "cniConfFileName",
            r#""10-calico.conflist""#,
            Changes(&["ConfigMap/meshcni-config/data/CNI_CONF_NAME"]),
        ),
        // The netns paths the plugin hands over (CNI_NETNS) are host paths: the agent sees the
        // directory at the same path and is told where it is.
        amb(
            "cniNetnsDir",
            r#""/run/netns-custom""#,
            Changes(&[
                "DaemonSet/meshcni-node/spec/template/spec/volumes/5/hostPath/path",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/volumeMounts/5/mountPath",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/env/3/value",
            ]),
        ),
        c(
            "istioOwnedCNIConfig",
            "true",
            Changes(&["ConfigMap/meshcni-config/data/ISTIO_OWNED_CNI_CONFIG"]),
        ),
        c(
            "istioOwnedCNIConfigFileName",
            r#""01-mesh.conflist""#,
            Changes(&["ConfigMap/meshcni-config/data/ISTIO_OWNED_CNI_CONFIG_FILENAME"]),
        ),
        c(
            "excludeNamespaces",
            r#"["kube-system", "istio-system"]"#,
            Changes(&["ConfigMap/meshcni-config/data/EXCLUDE_NAMESPACES"]),
        ),
        c(
            "chained",
            "false",
            Changes(&["ConfigMap/meshcni-config/data/CHAINED_CNI_PLUGIN"]),
        ),
        c(
            "provider",
            r#""multus""#,
            Changes(&["NetworkAttachmentDefinition/meshcni"]),
        ),
        c(
            "ambient.enabled",
            "true",
            Changes(&[
                "ConfigMap/meshcni-config/data/AMBIENT_ENABLED",
                "DaemonSet/meshcni-node/spec/template/spec/hostPID",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/securityContext",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/volumeMounts",
                "DaemonSet/meshcni-node/spec/template/spec/volumes",
            ]),
        ),
        amb(
            "ambient.redirectMode",
            r#""iptables""#,
            Changes(&[
                "ConfigMap/meshcni-config/data/AMBIENT_REDIRECT_MODE",
                "DaemonSet/meshcni-node/spec/template/spec/hostPID",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/volumeMounts",
                "DaemonSet/meshcni-node/spec/template/spec/volumes",
            ]),
        ),
        amb(
            "ambient.redirectMode",
            r#""ebpf""#,
            Changes(&[
                "ConfigMap/meshcni-config/data/AMBIENT_REDIRECT_MODE",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/securityContext",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/volumeMounts",
                "DaemonSet/meshcni-node/spec/template/spec/volumes",
            ]),
        ),
        // The agent writes config.json where the host has it: same path inside and outside.
        amb(
            "ambient.configDir",
            r#""/var/lib/ambient-config""#,
            Changes(&[
                "ConfigMap/meshcni-config/data/AMBIENT_CONFIG_DIR",
                "DaemonSet/meshcni-node/spec/template/spec/volumes/4/hostPath/path",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/volumeMounts/4/mountPath",
            ]),
        ),
        amb(
            "ambient.enablementSelectors",
            r#"[{"podSelector": {"matchLabels": {"example.com/mesh": "ambient"}}}]"#,
            Changes(&["ConfigMap/meshcni-config/data/AMBIENT_ENABLEMENT_SELECTOR"]),
        ),
        amb(
            "ambient.dnsCapture",
            "false",
            Changes(&["ConfigMap/meshcni-config/data/AMBIENT_DNS_CAPTURE"]),
        ),
        amb(
            "ambient.enableAmbientDetectionRetry",
            "true",
            Changes(&["ConfigMap/meshcni-config/data/ENABLE_AMBIENT_DETECTION_RETRY"]),
        ),
        amb(
            "ambient.detectionFailurePolicy",
            r#""open""#,
            Changes(&["ConfigMap/meshcni-config/data/AMBIENT_DETECTION_FAILURE_POLICY"]),
        ),
        amb(
            "ambient.ztunnelNamespace",
            r#""istio-ztunnel""#,
            Changes(&["ConfigMap/meshcni-config/data/SYSTEM_NAMESPACE"]),
        ),
        amb(
            "ambient.ztunnelServiceAccount",
            r#""ztunnel-node""#,
            Changes(&["ConfigMap/meshcni-config/data/ZTUNNEL_SERVICE_ACCOUNT"]),
        ),
        c(
            "repair.enabled",
            "true",
            Changes(&[
                "ConfigMap/meshcni-config/data",
                "ClusterRole/meshcni/rules",
                "DaemonSet/meshcni-node/spec/template/spec/hostPID",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/securityContext",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/volumeMounts",
                "DaemonSet/meshcni-node/spec/template/spec/volumes",
            ]),
        ),
        // The three actions are one choice (the render refuses none or two), so each is
        // compared with the default choice (in-place repair), not with the context alone.
        ValueCase {
            key: "repair.repairPods",
            value: "false",
            context: &[("repair.enabled", "true"), ("repair.labelPods", "true")],
            expect: ChangesFrom(
                REPAIR,
                &[
                    "ConfigMap/meshcni-config/data/REPAIR_REPAIR_PODS",
                    "ConfigMap/meshcni-config/data/REPAIR_LABEL_PODS",
                    "ClusterRole/meshcni/rules",
                ],
            ),
        },
        ValueCase {
            key: "repair.deletePods",
            value: "true",
            context: &[
                ("repair.enabled", "true"),
                ("repair.repairPods", "false"),
                ("repair.labelPods", "false"),
            ],
            expect: ChangesFrom(
                REPAIR,
                &[
                    "ConfigMap/meshcni-config/data/REPAIR_REPAIR_PODS",
                    "ConfigMap/meshcni-config/data/REPAIR_DELETE_PODS",
                    "ClusterRole/meshcni/rules",
                ],
            ),
        },
        ValueCase {
            key: "repair.labelPods",
            value: "true",
            context: &[
                ("repair.enabled", "true"),
                ("repair.repairPods", "false"),
                ("repair.deletePods", "false"),
            ],
            expect: ChangesFrom(
                REPAIR,
                &[
                    "ConfigMap/meshcni-config/data/REPAIR_REPAIR_PODS",
                    "ConfigMap/meshcni-config/data/REPAIR_LABEL_PODS",
                    "ClusterRole/meshcni/rules",
                ],
            ),
        },
        ValueCase {
            key: "repair.brokenPodLabelKey",
            value: r#""example.com/uncaptured""#,
            context: REPAIR,
            expect: Changes(&["ConfigMap/meshcni-config/data/REPAIR_BROKEN_POD_LABEL_KEY"]),
        },
        ValueCase {
            key: "repair.brokenPodLabelValue",
            value: r#""yes""#,
            context: REPAIR,
            expect: Changes(&["ConfigMap/meshcni-config/data/REPAIR_BROKEN_POD_LABEL_VALUE"]),
        },
        ValueCase {
            key: "repair.resyncSeconds",
            value: "5",
            context: REPAIR,
            expect: Changes(&["ConfigMap/meshcni-config/data/REPAIR_RESYNC_SECONDS"]),
        },
        c(
            "readinessPort",
            "8001",
            Changes(&[
                "ConfigMap/meshcni-config/data/READINESS_PORT",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/ports/1/containerPort",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/readinessProbe/httpGet/port",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/livenessProbe/httpGet/port",
            ]),
        ),
        c(
            "monitoringPort",
            "15015",
            Changes(&[
                "ConfigMap/meshcni-config/data/MONITORING_PORT",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/ports/0/containerPort",
                "DaemonSet/meshcni-node/spec/template/metadata/annotations/prometheus.io~1port",
            ]),
        ),
        c(
            "podAnnotations",
            r#"{"example.com/owner": "mesh-team"}"#,
            Changes(&[
                "DaemonSet/meshcni-node/spec/template/metadata/annotations/example.com~1owner",
            ]),
        ),
        c(
            "podLabels",
            r#"{"example.com/team": "mesh"}"#,
            Changes(&["DaemonSet/meshcni-node/spec/template/metadata/labels/example.com~1team"]),
        ),
        c(
            "nodeSelector",
            r#"{"kubernetes.io/os": "linux", "example.com/mesh": "true"}"#,
            Changes(&["DaemonSet/meshcni-node/spec/template/spec/nodeSelector/example.com~1mesh"]),
        ),
        c(
            "affinity",
            r#"{"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "example.com/mesh", "operator": "Exists"}]}]}}}"#,
            Changes(&["DaemonSet/meshcni-node/spec/template/spec/affinity"]),
        ),
        c(
            "tolerations",
            r#"[{"key": "example.com/mesh", "operator": "Exists", "effect": "NoSchedule"}]"#,
            Changes(&["DaemonSet/meshcni-node/spec/template/spec/tolerations"]),
        ),
        c(
            "priorityClassName",
            r#""system-cluster-critical""#,
            Changes(&["DaemonSet/meshcni-node/spec/template/spec/priorityClassName"]),
        ),
        c(
            "privileged",
            "true",
            Changes(&[
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/securityContext/privileged",
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/securityContext/allowPrivilegeEscalation",
            ]),
        ),
        c(
            "seccompProfile",
            r#"{"type": "RuntimeDefault"}"#,
            Changes(&[
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/securityContext/seccompProfile",
            ]),
        ),
        c(
            "resources.requests.cpu",
            r#""200m""#,
            Changes(&[
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/resources/requests/cpu",
            ]),
        ),
        c(
            "resources.requests.memory",
            r#""200Mi""#,
            Changes(&[
                "DaemonSet/meshcni-node/spec/template/spec/containers/0/resources/requests/memory",
            ]),
        ),
        // Kubernetes refuses rollingUpdate with type OnDelete: the chart leaves it out.
        c(
            "updateStrategy.type",
            r#""OnDelete""#,
            Changes(&[
                "DaemonSet/meshcni-node/spec/updateStrategy/type",
                "DaemonSet/meshcni-node/spec/updateStrategy/rollingUpdate",
            ]),
        ),
        c(
            "updateStrategy.rollingUpdate.maxUnavailable",
            "2",
            Changes(&["DaemonSet/meshcni-node/spec/updateStrategy/rollingUpdate/maxUnavailable"]),
        ),
        c(
            "terminationGracePeriodSeconds",
            "45",
            Changes(&["DaemonSet/meshcni-node/spec/template/spec/terminationGracePeriodSeconds"]),
        ),
        c(
            "env",
            r#"{"CNI_CONF_GROUP_READ": "true"}"#,
            Changes(&["DaemonSet/meshcni-node/spec/template/spec/containers/0/env"]),
        ),
        // The node readiness taint: the agent's two variables and the nodes rule, together.
        c(
            "taint.enabled",
            "true",
            Changes(&[
                "ConfigMap/meshcni-config/data/REMOVE_NODE_TAINT",
                "ConfigMap/meshcni-config/data/NODE_TAINT_KEY",
                "ClusterRole/meshcni/rules",
            ]),
        ),
        ValueCase {
            key: "taint.key",
            value: r#""example.com/node-not-ready""#,
            context: &[("taint.enabled", "true")],
            expect: Changes(&["ConfigMap/meshcni-config/data/NODE_TAINT_KEY"]),
        },
        c(
            "uninstallHook.enabled",
            "false",
            Changes(&[
                "Job/meshcni-uninstall",
                "ServiceAccount/meshcni-uninstall",
                "Role/meshcni-uninstall",
                "RoleBinding/meshcni-uninstall",
            ]),
        ),
        c(
            "uninstallHook.waitSeconds",
            "75",
            Changes(&["Job/meshcni-uninstall/spec/template/spec/containers/0/args/2"]),
        ),
        c(
            "global.logging.level",
            r#""debug""#,
            Changes(&[
                "ConfigMap/meshcni-config/data/LOG_LEVEL",
                "Job/meshcni-uninstall/spec/template/spec/containers/0/env",
            ]),
        ),
        // The hook logs like the agent.
        c(
            "global.logAsJson",
            "true",
            Changes(&[
                "ConfigMap/meshcni-config/data/LOG_FORMAT",
                "Job/meshcni-uninstall/spec/template/spec/containers/0/env",
            ]),
        ),
        c(
            "global.nativeNftables",
            "true",
            Changes(&["ConfigMap/meshcni-config/data/NATIVE_NFTABLES"]),
        ),
    ]
}

/// `helm template` (hooks included) with values given as JSON (`--set-json`).
fn render_json(sets: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "meshcni"])
        .arg(repo().join("deploy/helm/meshcni"))
        .args(["--namespace", "kube-system"]);
    for (k, v) in sets {
        cmd.arg("--set-json").arg(format!("{k}={v}"));
    }
    let home = tempfile::tempdir().expect("tempdir");
    cmd.env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"));
    cmd.output().expect("run helm template")
}

/// Values that are maps of free keys (label and annotation maps, Kubernetes objects passed
/// through as they are): one value each, set as a whole.
const FREE_MAPS: &[&str] = &[
    "nodeSelector",
    "podAnnotations",
    "podLabels",
    "affinity",
    "seccompProfile",
    "env",
];

/// Leaf paths of values.yaml: scalars, lists, empty maps and [`FREE_MAPS`]; other maps are
/// walked into.
fn value_leaves(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() && !FREE_MAPS.contains(&path) => {
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                value_leaves(x, &p, out);
            }
        }
        _ => out.push(path.to_string()),
    }
}

fn documented_values() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/helm/meshcni/values.yaml"))
        .expect("read values.yaml");
    serde_saphyr::from_str(&text).expect("values.yaml is valid YAML")
}

/// RFC 6901 escaping of one path segment.
fn seg(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

/// Places where two trees differ (JSON pointers under `path`); arrays of different lengths and
/// values of different types count as one change at their own path.
fn changes(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x
                .keys()
                .chain(y.keys())
                .collect::<std::collections::BTreeSet<_>>()
            {
                let p = format!("{path}/{}", seg(k));
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => changes(u, v, &p, out),
                    _ => out.push(p),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                changes(u, v, &format!("{path}/{i}"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(path.to_string()),
    }
}

/// Changes between two renders, as `Kind/name[/pointer]`.
fn render_changes(
    base: &BTreeMap<(String, String), Value>,
    new: &BTreeMap<(String, String), Value>,
) -> Vec<String> {
    let mut out = Vec::new();
    for k in base
        .keys()
        .chain(new.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let p = format!("{}/{}", k.0, k.1);
        match (base.get(k), new.get(k)) {
            (Some(a), Some(b)) => changes(a, b, &p, &mut out),
            _ => out.push(p),
        }
    }
    out
}

fn under(path: &str, prefix: &str) -> bool {
    path == prefix || path.starts_with(&format!("{prefix}/"))
}

/// The agent's environment in a render: its ConfigMap (envFrom) plus the DaemonSet's literal
/// entries, Downward-API values and the in-pod API server variables stood in for.
fn agent_env(objs: &BTreeMap<(String, String), Value>) -> Vec<(String, String)> {
    let ds = &objs[&("DaemonSet".to_string(), "meshcni-node".to_string())];
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let mut env = Vec::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"].as_str().expect("configMapRef");
        let cm = &objs[&("ConfigMap".to_string(), name.to_string())];
        for (k, v) in cm["data"].as_object().expect("data") {
            if k != "CURRENT_AGENT_VERSION" {
                env.push((k.clone(), v.as_str().expect("string").to_string()));
            }
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let v = e["value"].as_str().unwrap_or("downward-api-value");
        env.push((e["name"].as_str().expect("name").to_string(), v.to_string()));
    }
    env.push(("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()));
    env.push(("KUBERNETES_SERVICE_PORT".into(), "1".into()));
    env
}

/// Issue 10: `helm template` with every documented value. Each leaf of values.yaml is set to a
/// non-default valid value (in a context where it applies, e.g. ambient on) and must change the
/// render exactly where the table says — a value the chart accepts and ignores renders like the
/// baseline and fails here — and the agent must accept the environment rendered with it; a
/// value the chart refuses must fail the render with an error naming it. Every leaf has a case,
/// and every case names a leaf.
#[test]
fn every_documented_value_changes_the_render_where_it_should() {
    let values = documented_values();
    let mut leaves = Vec::new();
    value_leaves(&values, "", &mut leaves);
    let cases = value_cases();
    let mut failures = Vec::new();
    for leaf in &leaves {
        if !cases.iter().any(|c| c.key == leaf) {
            failures.push(format!(
                "values.yaml documents {leaf}, but no case sets it and checks its effect"
            ));
        }
    }
    for case in &cases {
        if !leaves.iter().any(|l| l == case.key) {
            failures.push(format!(
                "case for {}, which values.yaml does not document (as a leaf)",
                case.key
            ));
            continue;
        }
        let default = case.key.split('.').fold(&values, |v, k| &v[k]).clone();
        let value: Value = serde_json::from_str(case.value).expect("case value is JSON");
        assert_ne!(
            value, default,
            "{}: the case value is the default",
            case.key
        );
        let mut sets = case.context.to_vec();
        sets.push((case.key, case.value));
        let out = render_json(&sets);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (baseline, places) = match &case.expect {
            Expect::Changes(places) => (case.context, *places),
            Expect::ChangesFrom(baseline, places) => (*baseline, *places),
        };
        if !out.status.success() {
            failures.push(format!(
                "{}={}: render failed: {stderr}",
                case.key, case.value
            ));
            continue;
        }
        let base = render_json(baseline);
        assert!(
            base.status.success(),
            "baseline {:?}: {}",
            baseline,
            String::from_utf8_lossy(&base.stderr)
        );
        let base = objects(&String::from_utf8(base.stdout).expect("UTF-8"));
        let new = objects(&String::from_utf8(out.stdout).expect("UTF-8"));
        let changed = render_changes(&base, &new);
        if changed.is_empty() {
            failures.push(format!(
                "{}={}: accepted and ignored (renders like the default)",
                case.key, case.value
            ));
            continue;
        }
        let stray: Vec<_> = changed
            .iter()
            .filter(|c| !places.iter().any(|p| under(c, p)))
            .collect();
        let missing: Vec<_> = places
            .iter()
            .filter(|p| !changed.iter().any(|c| under(c, p)))
            .collect();
        if !stray.is_empty() || !missing.is_empty() {
            failures.push(format!(
                "{}={}: changed {changed:?}; unexpected {stray:?}; expected but unchanged {missing:?}",
                case.key, case.value
            ));
        }
        // The agent accepts the environment rendered with the value.
        let check = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
            .env_clear()
            .envs(agent_env(&new))
            .arg("check-config")
            .output()
            .expect("run meshcni-agent check-config");
        if !check.status.success() {
            failures.push(format!(
                "{}={}: the agent refuses the rendered environment: {}",
                case.key,
                case.value,
                String::from_utf8_lossy(&check.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `helm lint --strict` with a values file.
fn lint(values: &Value) -> Output {
    let home = tempfile::tempdir().expect("tempdir");
    let file = home.path().join("values.yaml");
    // JSON is YAML.
    std::fs::write(&file, serde_json::to_vec_pretty(values).expect("JSON")).expect("write values");
    Command::new(helm())
        .args(["lint", "--strict"])
        .arg(repo().join("deploy/helm/meshcni"))
        .arg("-f")
        .arg(&file)
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm lint")
}

/// Set `path` (`a.b.c`) in a values tree.
fn put(tree: &mut Value, path: &str, v: Value) {
    let mut at = tree;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        let m = at.as_object_mut().expect("an object on the way");
        at = m
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    at.as_object_mut()
        .expect("an object")
        .insert(parts[parts.len() - 1].to_string(), v);
}

/// Issue 10: `helm lint --strict` with one values file setting every documented value to its
/// non-default value from the table above (with the contexts the cases need, which agree).
#[test]
fn helm_lint_strict_passes_with_every_documented_value_set() {
    let mut all: Vec<(&str, &str)> = Vec::new();
    // A second non-default value of a key already in the file (e.g. another redirect mode) is
    // linted in a file of its own (its context plus that value).
    let mut alternatives = Vec::new();
    let json = |s: &str| serde_json::from_str::<Value>(s).expect("JSON");
    for case in value_cases() {
        let mut sets = case.context.to_vec();
        sets.push((case.key, case.value));
        // A case that sets something (its value or its context) differently from the file
        // so far is rendered on its own.
        if sets
            .iter()
            .any(|(key, value)| all.iter().any(|(k, v)| k == key && json(v) != json(value)))
        {
            alternatives.push(sets);
            continue;
        }
        for (k, v) in sets {
            assert!(
                all.iter().all(|(k2, v2)| k2 != &k || json(v2) == json(v)),
                "two cases set {k} differently"
            );
            all.push((k, v));
        }
    }
    let tree = |sets: &[(&str, &str)]| {
        let mut t = Value::Object(Default::default());
        for (k, v) in sets {
            put(&mut t, k, serde_json::from_str(v).expect("JSON"));
        }
        t
    };
    let mut every = Vec::new();
    value_leaves(&documented_values(), "", &mut every);
    assert!(
        every.iter().all(|l| all.iter().any(|(k, _)| k == l)),
        "every documented value is in the file"
    );
    let values = tree(&all);
    let out = lint(&values);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("funcMap fail"),
        "helm lint --strict with {values}: {}{stderr}",
        String::from_utf8_lossy(&out.stdout),
    );
    for sets in &alternatives {
        let values = tree(sets);
        let out = lint(&values);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("funcMap fail"),
            "helm lint --strict with {values}: {}{stderr}",
            String::from_utf8_lossy(&out.stdout),
        );
    }
}

/// Leaf paths the values schema describes (properties walked into where they have
/// properties; values marked removed left out).
fn schema_leaves(schema: &Value, path: &str, out: &mut Vec<String>) {
    for (k, sub) in schema["properties"].as_object().into_iter().flatten() {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if sub["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("Removed"))
        {
            continue;
        }
        if sub.get("properties").is_some() {
            schema_leaves(sub, &p, out);
        } else {
            out.push(p);
        }
    }
}

/// values.schema.json describes exactly the values documented in values.yaml, and refuses any
/// other key at the chart's own levels: a misspelt value fails the render naming it instead of
/// being accepted and ignored; so does a value outside its set (enums).
#[test]
fn the_values_schema_refuses_undocumented_and_misspelt_values() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/helm/meshcni/values.schema.json"))
            .expect("read values.schema.json"),
    )
    .expect("schema is JSON");
    let mut documented = Vec::new();
    value_leaves(&documented_values(), "", &mut documented);
    let mut described = Vec::new();
    schema_leaves(&schema, "", &mut described);
    documented.sort();
    described.sort();
    assert_eq!(
        described, documented,
        "values.schema.json and values.yaml describe different values"
    );
    for (sets, named) in [
        (
            &[("ambient.redirctMode", r#""iptables""#)][..],
            "redirctMode",
        ),
        (&[("tagg", r#""0.1.1""#)][..], "tagg"),
        // Removed: the agent is always in the node's network namespace.
        (
            &[("ambient.shareHostNetworkNamespace", "false")][..],
            "shareHostNetworkNamespace",
        ),
        (&[("global.logAsJSON", "true")][..], "logAsJSON"),
        (&[("uninstallHook.enable", "false")][..], "enable"),
        (&[("provider", r#""multis""#)][..], "/provider"),
        (
            &[("global.logging.level", r#""verbose""#)][..],
            "/global/logging/level",
        ),
        (
            &[("ambient.detectionFailurePolicy", r#""fail-open""#)][..],
            "/ambient/detectionFailurePolicy",
        ),
        (&[("tag", "1.10")][..], "/tag"),
        (&[("taint.key", r#""Bad Key""#)][..], "/taint/key"),
        // A key without the option would be ignored: refused, naming both values.
        (
            &[("taint.key", r#""example.com/x""#)][..],
            "taint.key is set but taint.enabled is false",
        ),
    ] {
        let out = render_json(sets);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sets:?} rendered");
        assert!(stderr.contains(named), "{sets:?}: {stderr}");
    }
}

/// Repair's RBAC: Events with any action; pods `delete` or `patch` only for the option that
/// needs it (never both, never for the in-place repair).
#[test]
fn repair_rbac_grants_only_what_the_chosen_action_needs() {
    let writes = |sets: &[&str]| -> Vec<String> {
        let objs = objects(&rendered(sets));
        let role = &objs[&("ClusterRole".to_string(), "meshcni".to_string())];
        let mut out = Vec::new();
        for r in role["rules"].as_array().expect("rules") {
            for res in r["resources"].as_array().expect("resources") {
                for v in r["verbs"].as_array().expect("verbs") {
                    let v = v.as_str().unwrap_or("");
                    if !matches!(v, "get" | "list" | "watch") {
                        out.push(format!("{}:{v}", res.as_str().unwrap_or("")));
                    }
                }
            }
        }
        out.sort();
        out
    };
    assert!(writes(&[]).is_empty());
    assert_eq!(writes(&["repair.enabled=true"]), ["events:create"]);
    assert_eq!(
        writes(&[
            "repair.enabled=true",
            "repair.repairPods=false",
            "repair.labelPods=true"
        ]),
        ["events:create", "pods:patch"]
    );
    assert_eq!(
        writes(&[
            "repair.enabled=true",
            "repair.repairPods=false",
            "repair.deletePods=true"
        ]),
        ["events:create", "pods:delete"]
    );
    // Options of a controller that is off grant nothing.
    assert!(writes(&["repair.deletePods=true", "repair.repairPods=false"]).is_empty());
}

/// The repair controller takes exactly one action. The reference takes the first enabled of
/// repair → delete → label and ignores the rest, so `deletePods: true` with the default
/// `repairPods: true` silently repairs in place; here the render refuses it, naming both
/// values, and refuses no action at all.
#[test]
fn repair_with_no_action_or_two_actions_fails_the_render_naming_them() {
    for (sets, says) in [
        (
            &["repair.enabled=true", "repair.deletePods=true"][..],
            "repair.deletePods=true has no effect while repair.repairPods=true",
        ),
        (
            &["repair.enabled=true", "repair.labelPods=true"][..],
            "repair.labelPods=true has no effect while repair.repairPods=true",
        ),
        (
            &[
                "repair.enabled=true",
                "repair.repairPods=false",
                "repair.deletePods=true",
                "repair.labelPods=true",
            ][..],
            "repair.labelPods=true has no effect while repair.deletePods=true",
        ),
        (
            &["repair.enabled=true", "repair.repairPods=false"][..],
            "repair.enabled=true with no action",
        ),
    ] {
        let out = render(sets);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sets:?} rendered");
        assert!(stderr.contains(says), "{sets:?}: {stderr}");
    }
    // Each single action renders.
    for sets in [
        &["repair.enabled=true"][..],
        &[
            "repair.enabled=true",
            "repair.repairPods=false",
            "repair.deletePods=true",
        ][..],
        &[
            "repair.enabled=true",
            "repair.repairPods=false",
            "repair.labelPods=true",
        ][..],
    ] {
        let out = render(sets);
        assert!(
            out.status.success(),
            "{sets:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
