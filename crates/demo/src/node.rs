//! The throw-away node: a node network namespace in which `cnitool` runs a real CNI chain
//! (`bridge`+`host-local` → `portmap` → `meshcni`) for pods whose metadata sits in a local
//! pod-metadata directory (the plugin's `pod_metadata_dir`), one netns per pod.
//!
//! Everything lives in namespaces created here (`mcni-<pid>-<n>-<tag>`, listed in
//! `<work>/netns` so `scripts/demo.sh` can remove them even if the demo is killed) and in the
//! work directory; the host network is never touched. [`Node::teardown`] (also run on drop)
//! DELs every pod through `cnitool`, then the namespaces go.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use meshcni_testkit::Netns;
use serde_json::{Value, json};

use crate::error::DemoError;

/// The pod network (inside the node netns only).
pub const SUBNET: &str = "10.88.0.0/24";
/// The node's bridge.
pub const BRIDGE: &str = "mesh0";
/// Where `cnitool` keeps its result cache (global; our entries carry our network name).
const CNITOOL_CACHE: &str = "/var/lib/cni/results";

/// A pod as the injector (or not) left it.
#[derive(Debug, Clone)]
pub struct PodDef {
    pub namespace: &'static str,
    pub name: &'static str,
    /// `sidecar.istio.io/status` + an `istio-proxy` container.
    pub injected: bool,
    pub annotations: Vec<(&'static str, String)>,
    /// `istio-proxy` env.
    pub proxy_env: Vec<(&'static str, &'static str)>,
    /// One-line description for the pod table.
    pub note: &'static str,
}

impl PodDef {
    pub fn injected(name: &'static str, note: &'static str) -> PodDef {
        PodDef {
            namespace: "bookinfo",
            name,
            injected: true,
            annotations: Vec::new(),
            proxy_env: Vec::new(),
            note,
        }
    }

    pub fn plain(name: &'static str, note: &'static str) -> PodDef {
        PodDef {
            injected: false,
            ..PodDef::injected(name, note)
        }
    }

    pub fn annotate(mut self, key: &'static str, value: impl Into<String>) -> PodDef {
        self.annotations.push((key, value.into()));
        self
    }

    pub fn env(mut self, name: &'static str, value: &'static str) -> PodDef {
        self.proxy_env.push((name, value));
        self
    }

    /// The Kubernetes Pod object.
    fn pod_json(&self) -> Value {
        let mut annotations = serde_json::Map::new();
        let mut containers =
            vec![json!({"name": "app", "image": format!("example/{}:1", self.name)})];
        if self.injected {
            annotations.insert(
                "sidecar.istio.io/status".into(),
                json!(r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"revision":"default"}"#),
            );
            let env: Vec<Value> = self
                .proxy_env
                .iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect();
            containers.push(json!({
                "name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.0",
                "args": ["proxy", "sidecar"], "env": env,
                "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}
            }));
        }
        for (k, v) in &self.annotations {
            annotations.insert((*k).into(), json!(v));
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": format!("uid-{}", self.name),
                         "labels": {"app": self.name}, "annotations": annotations},
            "spec": {"containers": containers}
        })
    }
}

/// A pod the node started: its netns and what the chain said about it.
#[derive(Debug)]
pub struct Pod {
    pub def: PodDef,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// `ips[0].address` as the final CNI result (meshcni's output) had it.
    pub cidr: String,
    pub gateway: String,
    pub cni_version: String,
    /// What meshcni decided, from its own log line on stderr.
    pub decision: String,
    added: bool,
}

/// The node: work dir, node netns, conflist, pods.
#[derive(Debug)]
pub struct Node {
    work: PathBuf,
    net: String,
    cni_path: String,
    pods: Vec<Pod>,
    /// Declared last: dropped after the pods (whose DEL runs inside it).
    node: Netns,
}

impl Node {
    /// Create the node netns and write the conflist (cniVersion 1.0.0) into `work`.
    pub fn new(work: &Path, plugin_dir: &Path, cni_plugins: &Path) -> Result<Node, DemoError> {
        for d in ["net.d", "meta/namespaces", "ipam", "run"] {
            let p = work.join(d);
            fs::create_dir_all(&p)
                .map_err(|e| DemoError::io(format!("create {}", p.display()), e))?;
        }
        let node = Netns::new("node")?;
        record_netns(work, node.name())?;
        let net = format!("mcni-demo-{}", std::process::id());
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": net,
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "dataDir": work.join("ipam"),
                          "ranges": [[{"subnet": SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "meshcni", "pod_metadata_dir": work.join("meta"),
                 "cni_agent_run_dir": work.join("run"), "plugin_log_level": "info"}
            ]
        });
        let file = work.join("net.d/10-meshcni-demo.conflist");
        let text = serde_json::to_string_pretty(&conflist)
            .map_err(|e| DemoError::Unexpected(format!("serialize conflist: {e}")))?;
        fs::write(&file, text)
            .map_err(|e| DemoError::io(format!("write {}", file.display()), e))?;
        Ok(Node {
            work: work.to_path_buf(),
            net,
            cni_path: format!("{}:{}", plugin_dir.display(), cni_plugins.display()),
            pods: Vec::new(),
            node,
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.node
    }

    pub fn network_name(&self) -> &str {
        &self.net
    }

    pub fn conflist_path(&self) -> PathBuf {
        self.work.join("net.d/10-meshcni-demo.conflist")
    }

    /// The pod called `name` (the demo only asks for pods it started).
    pub fn pod(&self, name: &str) -> Result<&Pod, DemoError> {
        self.pods
            .iter()
            .find(|p| p.def.name == name)
            .ok_or_else(|| DemoError::Unexpected(format!("no pod {name} on the node")))
    }

    /// Write the pod's metadata, create its netns and run `cnitool add` for it.
    pub fn start_pod(&mut self, def: PodDef) -> Result<&Pod, DemoError> {
        let pods_dir = self.work.join("meta/pods").join(def.namespace);
        fs::create_dir_all(&pods_dir)
            .map_err(|e| DemoError::io(format!("create {}", pods_dir.display()), e))?;
        let pod_file = pods_dir.join(format!("{}.json", def.name));
        fs::write(&pod_file, def.pod_json().to_string())
            .map_err(|e| DemoError::io(format!("write {}", pod_file.display()), e))?;
        let ns_file = self
            .work
            .join("meta/namespaces")
            .join(format!("{}.json", def.namespace));
        let ns_json = json!({"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": def.namespace, "labels": {"istio-injection": "enabled"}}});
        fs::write(&ns_file, ns_json.to_string())
            .map_err(|e| DemoError::io(format!("write {}", ns_file.display()), e))?;

        let ns = Netns::new(def.name)?;
        record_netns(&self.work, ns.name())?;
        let out = self.cnitool("add", &def, ns.path())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result: Value = serde_json::from_str(&stdout).map_err(|e| {
            DemoError::Unexpected(format!(
                "cnitool add for {} printed no CNI result ({e}): {stdout}",
                def.name
            ))
        })?;
        let cidr = result["ips"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ip: Ipv4Addr = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                DemoError::Unexpected(format!(
                    "no IPv4 address in the CNI result for {}: {result}",
                    def.name
                ))
            })?;
        let decision = plugin_decision(&String::from_utf8_lossy(&out.stderr));
        self.pods.push(Pod {
            gateway: result["ips"][0]["gateway"]
                .as_str()
                .unwrap_or("-")
                .to_string(),
            cni_version: result["cniVersion"].as_str().unwrap_or("?").to_string(),
            def,
            ns,
            ip,
            cidr,
            decision,
            added: true,
        });
        self.pods
            .last()
            .ok_or_else(|| DemoError::Unexpected("pod list empty after push".into()))
    }

    /// `cnitool <op> <net> <netns>` inside the node netns, with kubelet-like `CNI_ARGS`.
    fn cnitool(&self, op: &str, def: &PodDef, netns: &Path) -> Result<Output, DemoError> {
        let netns = netns.display().to_string();
        let args = [
            "netns",
            "exec",
            self.node.name(),
            "cnitool",
            op,
            &self.net,
            &netns,
        ];
        let out = Command::new("ip")
            .args(args)
            .env("NETCONFPATH", self.work.join("net.d"))
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID=uid-{}",
                    def.namespace, def.name, def.name
                ),
            )
            .stdin(Stdio::null())
            .output()
            .map_err(|e| DemoError::io(format!("spawn `ip {}`", args.join(" ")), e))?;
        if !out.status.success() {
            return Err(DemoError::Command {
                command: format!("ip {} (pod {}/{})", args.join(" "), def.namespace, def.name),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(out)
    }

    /// DEL every pod (reverse order), delete the pod namespaces, drop our cnitool cache
    /// entries. Returns one line per pod. Idempotent.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(mut pod) = self.pods.pop() {
            if pod.added {
                let line = match self.cnitool("del", &pod.def, pod.ns.path()) {
                    Ok(_) => format!("cnitool del {:<12} ok", pod.def.name),
                    Err(e) => format!("cnitool del {:<12} FAILED: {e}", pod.def.name),
                };
                pod.added = false;
                lines.push(line);
            }
            drop(pod); // deletes the pod netns
        }
        if let Ok(entries) = fs::read_dir(CNITOOL_CACHE) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{}-", self.net))
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        lines
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for line in self.teardown() {
            if line.contains("FAILED") {
                eprintln!("{line}");
            }
        }
    }
}

/// Append a namespace name to `<work>/netns` (read by `scripts/demo.sh`'s cleanup trap).
fn record_netns(work: &Path, name: &str) -> Result<(), DemoError> {
    let path = work.join("netns");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| DemoError::io(format!("open {}", path.display()), e))?;
    writeln!(f, "{name}").map_err(|e| DemoError::io(format!("write {}", path.display()), e))
}

/// meshcni's decision from its JSON log lines on stderr (libcni passes plugin stderr through).
fn plugin_decision(stderr: &str) -> String {
    for line in stderr.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let f = &v["fields"];
        match f["message"].as_str() {
            Some("sidecar capture applied") => {
                let flavor = f["flavor"].as_str().unwrap_or_default();
                let flavor = flavor.trim_start_matches("Some(").trim_end_matches(')');
                return format!(
                    "sidecar capture applied ({}{})",
                    f["backend"].as_str().unwrap_or("?").to_lowercase(),
                    if flavor.is_empty() || flavor == "None" {
                        String::new()
                    } else {
                        format!("-{}", flavor.to_lowercase())
                    }
                );
            }
            Some("not capturing") => {
                return format!("not capturing: {}", f["reason"].as_str().unwrap_or("?"));
            }
            _ => {}
        }
    }
    "(no decision logged)".into()
}

/// Run `program args…` inside `ns` and return stdout (fails on a non-zero exit).
pub fn exec_in(ns: &Netns, program: &str, args: &[&str]) -> Result<String, DemoError> {
    Ok(ns.exec_ok(program, args)?)
}
