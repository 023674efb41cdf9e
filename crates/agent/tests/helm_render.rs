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
    let mut cmd = Command::new(helm());
    cmd.args(["template", "meshcni"])
        .arg(repo().join("deploy/helm/meshcni"))
        .args(["--namespace", "kube-system", "--no-hooks"]);
    for s in sets {
        cmd.args(["--set", s]);
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
    let sets = &["ambient.enabled=true", "ambient.redirectMode=tproxy"][..];
    let out = render(sets);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{sets:?} rendered");
    assert!(
        stderr.contains("ambient.redirectMode=tproxy is not available in this build")
            && stderr.contains("set ambient.redirectMode=inpod"),
        "{sets:?}: {stderr}"
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
