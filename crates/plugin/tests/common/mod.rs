//! Small shared helpers for the plugin's integration tests: root precondition, throw-away
//! network namespaces (unique `mcni-<pid>-<n>-<tag>` names, deleted by a Drop guard on success
//! and on panic), running the real `meshcni` binary with an explicit environment and stdin, a
//! local pod-metadata directory, and a comparable snapshot of a netns's packet-filter rules.
//!
//! Network safety: only namespaces created here are touched; every command runs inside one of
//! them (`ip netns exec`, `ip -n`). External commands get argument vectors, never a shell.
#![allow(dead_code)] // each test crate uses a different subset

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

/// The plugin binary under test.
pub const MESHCNI: &str = env!("CARGO_BIN_EXE_meshcni");

/// Fails the test (never skips) unless running as root with the listed programs on PATH.
pub fn require_root(programs: &[&str]) {
    let uid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    let mut missing = Vec::new();
    if uid != 0 {
        missing.push(format!("root (running as uid {uid})"));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for p in programs {
        if !std::env::split_paths(&path).any(|d| d.join(p).is_file()) {
            missing.push(format!("`{p}` on PATH"));
        }
    }
    assert!(
        missing.is_empty(),
        "test preconditions not met: missing {}; run the plugin tests as root with iproute2, \
         iptables (nft flavor) and nft installed",
        missing.join(", ")
    );
}

/// `mcni-<pid>-<n>-<tag>`, unique per process and call.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "mcni-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args…` (stdin closed); panics unless it exits 0; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(&cmd)));
    assert!(
        out.status.success(),
        "`{}` failed ({}): {}",
        describe(&cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace created by the test (`ip netns add`, `lo` up); deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A pod-like netns: `eth0` (one end of a veth pair whose peer also stays inside) with
    /// `10.199.0.5/24` and, when `ipv6`, `fd00:199::5/64`, so IPv6 detection sees a global
    /// address.
    pub fn pod(tag: &str, ipv6: bool) -> Netns {
        let ns = Netns::new(tag);
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["link", "set", "peer0", "up"]);
        ns.ip(&["addr", "add", "10.199.0.5/24", "dev", "eth0"]);
        if ipv6 {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                "fd00:199::5/64",
                "dev",
                "eth0",
                "nodad",
            ]);
        }
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> args…`, must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// `ip netns exec <ns> program args…`, must succeed.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// Everything that decides packet filtering in this netns, comparable byte for byte:
    /// `iptables-save`, `ip6tables-save` (both with the timestamped `# Generated`/`# Completed`
    /// lines removed) and `nft list ruleset`.
    pub fn rules(&self) -> String {
        let strip = |s: String| -> String {
            s.lines()
                .filter(|l| !l.starts_with("# Generated") && !l.starts_with("# Completed"))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        format!(
            "## iptables-save\n{}## ip6tables-save\n{}## nft list ruleset\n{}",
            strip(self.exec("iptables-save", &[])),
            strip(self.exec("ip6tables-save", &[])),
            self.exec("nft", &["list", "ruleset"])
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if Path::new(&self.path()).exists() {
            match Command::new("ip")
                .args(["netns", "del", &self.name])
                .stdin(Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cleanup: ip netns del {}: {}",
                    self.name,
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("cleanup: ip netns del {}: {e}", self.name),
            }
        }
    }
}

/// One run of the plugin binary.
#[derive(Debug)]
pub struct PluginRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl PluginRun {
    /// stdout as JSON (panics, showing the run, if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts exit code 1 and a CNI error object with `code`; returns `msg + " " + details`.
    pub fn expect_error(&self, code: u64) -> String {
        assert_eq!(self.code, 1, "expected exit code 1: {self:?}");
        let v = self.json();
        assert_eq!(
            v["code"].as_u64(),
            Some(code),
            "expected CNI error code {code}: {self:?}"
        );
        assert!(
            v["cniVersion"].is_string(),
            "error JSON lacks cniVersion: {v}"
        );
        let msg = v["msg"].as_str().unwrap_or_default();
        assert!(!msg.is_empty(), "error JSON lacks msg: {v}");
        format!("{msg} {}", v["details"].as_str().unwrap_or_default())
    }

    /// Asserts exit code 0.
    pub fn expect_ok(&self) -> &Self {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }
}

/// Runs the plugin with exactly `env` (plus PATH) and `stdin`; kills it after `timeout`.
pub fn run_plugin(env: &[(&str, &str)], stdin: &[u8]) -> PluginRun {
    run_plugin_timeout(env, stdin, Duration::from_secs(60))
}

pub fn run_plugin_timeout(env: &[(&str, &str)], stdin: &[u8], timeout: Duration) -> PluginRun {
    let mut cmd = Command::new(MESHCNI);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {MESHCNI}: {e}"));
    if let Some(mut w) = child.stdin.take() {
        // The plugin may exit before reading (e.g. VERSION); a broken pipe is fine.
        let _ = w.write_all(stdin);
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(timeout).is_err() {
            // Our own child, by pid.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let out: Output = child.wait_with_output().expect("wait for meshcni");
    let _ = tx.send(());
    let _ = watchdog.join();
    PluginRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A pod in the local pod-metadata layout (`pods/<ns>/<name>.json`, `namespaces/<ns>.json`).
pub struct TestPod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Sidecar-injected (`sidecar.istio.io/status` + an `istio-proxy` container).
    pub injected: bool,
    pub annotations: &'a [(&'a str, &'a str)],
}

impl TestPod<'_> {
    /// The Kubernetes Pod JSON.
    pub fn pod_json(&self) -> Value {
        let mut annotations: BTreeMap<String, String> = self
            .annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut containers = vec![serde_json::json!({"name": "app", "image": "app:1",
            "ports": [{"containerPort": 8080, "protocol": "TCP"}]})];
        if self.injected {
            annotations.insert(
                "sidecar.istio.io/status".into(),
                r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"revision":"default"}"#.into(),
            );
            containers.push(serde_json::json!({"name": "istio-proxy", "image": "proxyv2:1.20.0",
                "args": ["proxy", "sidecar"], "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}));
        }
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "uid": format!("uid-{}", self.name), "labels": {"app": self.name},
                         "annotations": annotations},
            "spec": {"containers": containers}
        })
    }

    pub fn namespace_json(&self) -> Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": self.namespace, "labels": {"istio-injection": "enabled"}}})
    }

    /// Writes the pod and its namespace under `dir`.
    pub fn write(&self, dir: &Path) {
        let pods = dir.join("pods").join(self.namespace);
        fs::create_dir_all(&pods).expect("create pods dir");
        fs::create_dir_all(dir.join("namespaces")).expect("create namespaces dir");
        fs::write(
            pods.join(format!("{}.json", self.name)),
            self.pod_json().to_string(),
        )
        .expect("write pod");
        fs::write(
            dir.join("namespaces")
                .join(format!("{}.json", self.namespace)),
            self.namespace_json().to_string(),
        )
        .expect("write namespace");
    }
}

/// Kubelet-style `CNI_ARGS`.
pub fn k8s_args(namespace: &str, name: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID=0123456789abcdef;K8S_POD_UID=uid-{name}"
    )
}

/// A test directory with `run/` (the plugin's agent run dir) and `md/` (pod metadata).
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("run")).expect("create run dir");
        fs::create_dir_all(dir.path().join("md")).expect("create metadata dir");
        Workdir { dir }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.dir.path().join("md")
    }

    /// A plugin config (`cniVersion` 1.0.0 unless `extra` overrides it) reading pods from the
    /// metadata dir; `extra` keys are merged on top.
    pub fn conf(&self, extra: Value) -> Value {
        let mut conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "mcni-test", "type": "meshcni",
            "pod_metadata_dir": self.metadata_dir(), "cni_agent_run_dir": self.run_dir(),
            "prevResult": {"cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
                "ips": [{"address": "10.199.0.5/24", "gateway": "10.199.0.1", "interface": 0}]}
        });
        if let (Some(base), Value::Object(add)) = (conf.as_object_mut(), extra) {
            for (k, v) in add {
                if v.is_null() {
                    base.remove(&k);
                } else {
                    base.insert(k, v);
                }
            }
        }
        conf
    }
}
