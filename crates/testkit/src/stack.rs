//! The real ambient stack on a lab node, as processes: the `meshcni-agent` binary run inside a
//! node netns in `iptables` redirect mode (workloads from a local file, every host path in a
//! scratch dir), the `meshcni` plugin binary exec'd with CNI environment the way a runtime does,
//! and snapshots of the node netns state an operator would inspect.
//!
//! Used by the demo's ambient section and the agent's full-stack test
//! (`crates/agent/tests/ambient_stack.rs`); errors are `String`s that name the command, file or
//! pod involved.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Namespace label that puts a namespace's pods into ambient.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Pod annotation naming the ztunnel pod's netns (read by the `iptables` driver).
pub const ZTUNNEL_NETNS_ANNOTATION: &str = "meshcni.io/netns-path";
/// The plugin's "node agent unavailable / refused" CNI error code.
pub const CNI_AGENT_FAILED: u64 = 103;

/// Scratch layout for one agent: every "host" path the agent and plugin touch.
#[derive(Debug, Clone)]
pub struct AgentDirs {
    pub root: PathBuf,
    /// `--mounted-cni-net-dir` (holds a primary ptp conflist to chain into).
    pub net_d: PathBuf,
    /// `--cni-bin-dir` (the "image": a copy of the meshcni binary).
    pub image: PathBuf,
    /// `--cni-bin-dirs` (where the agent installs the plugin).
    pub bin: PathBuf,
    /// `--service-account-dir` (token + ca.crt).
    pub sa: PathBuf,
    /// `--cni-agent-run-dir` (pluginevent.sock, iptables-mode.json).
    pub run: PathBuf,
    /// `--ambient-config-dir` (config.json).
    pub ambient: PathBuf,
    /// `--uninstall-marker-file`.
    pub marker: PathBuf,
    /// `--ambient-workloads-file`.
    pub workloads: PathBuf,
    /// The plugin's `pod_metadata_dir` (`pods/<ns>/<name>.json`, `namespaces/<ns>.json`).
    pub meta: PathBuf,
    /// The agent's stderr log.
    pub log: PathBuf,
    /// inpod mode: `--ztunnel-uds-address` (the ZDS socket the ztunnel stand-in connects to).
    pub zds_socket: PathBuf,
    /// inpod mode: `--host-proc-dir`, an empty private dir: netns discovery never scans the
    /// machine's processes (other jobs' namespaces).
    pub proc: PathBuf,
    /// inpod mode: `--netns-dir`, a private dir the test fills with links to its own netns.
    pub netns_dir: PathBuf,
    /// ebpf mode: the mount point of a private bpffs (the caller mounts it; never the host's
    /// `/sys/fs/bpf`); the agent pins under [`AgentDirs::bpf_pin_dir`].
    pub bpffs: PathBuf,
}

impl AgentDirs {
    /// Create the layout under `root` and put a copy of `plugin` (the built `meshcni`) in the
    /// image dir.
    pub fn create(root: &Path, plugin: &Path) -> Result<AgentDirs, String> {
        let d = AgentDirs {
            root: root.to_path_buf(),
            net_d: root.join("net.d"),
            image: root.join("image"),
            bin: root.join("bin"),
            sa: root.join("sa"),
            run: root.join("run"),
            ambient: root.join("ambient"),
            marker: root.join("uninstall-marker"),
            workloads: root.join("workloads.json"),
            meta: root.join("meta"),
            log: root.join("agent.log"),
            zds_socket: root.join("zds").join("ztunnel.sock"),
            proc: root.join("proc"),
            netns_dir: root.join("netns"),
            bpffs: root.join("bpffs"),
        };
        for dir in [
            &d.proc,
            &d.netns_dir,
            &d.bpffs,
            &d.net_d,
            &d.image,
            &d.bin,
            &d.sa,
            &d.meta.join("pods"),
            &d.meta.join("namespaces"),
        ] {
            std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        if !plugin.is_file() {
            return Err(format!(
                "the meshcni plugin binary is missing at {} (build the workspace: `cargo build --workspace`)",
                plugin.display()
            ));
        }
        let image_plugin = d.image.join("meshcni");
        std::fs::copy(plugin, &image_plugin).map_err(|e| {
            format!(
                "copy {} to {}: {e}",
                plugin.display(),
                image_plugin.display()
            )
        })?;
        write(&d.sa.join("token"), "lab-token")?;
        write(
            &d.sa.join("ca.crt"),
            "-----BEGIN CERTIFICATE-----\nbGFi\n-----END CERTIFICATE-----\n",
        )?;
        let primary = json!({"cniVersion": "1.0.0", "name": "lab", "plugins": [
            {"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.77.0.0/16"}}]});
        write(&d.net_d.join("10-lab.conflist"), &primary.to_string())?;
        Ok(d)
    }

    /// `<run>/pluginevent.sock`.
    pub fn socket(&self) -> PathBuf {
        self.run.join("pluginevent.sock")
    }

    /// `<ambient>/config.json`.
    pub fn ambient_config(&self) -> PathBuf {
        self.ambient.join("config.json")
    }

    /// ebpf mode: `--ambient-ebpf-pin-dir` (`<bpffs>/meshcni`).
    pub fn bpf_pin_dir(&self) -> PathBuf {
        self.bpffs.join("meshcni")
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

/// Write `text` to `path` atomically (temp file + rename: what the file source expects).
pub fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    write(&tmp, text)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("rename {} to {}: {e}", tmp.display(), path.display()))
}

/// A Kubernetes-shaped namespace object.
pub fn namespace_json(name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A Kubernetes-shaped pod object on `node`. With `ip`, the pod is Running and Ready with that
/// IP; without, it is Pending (the watch has not seen its IP yet — the CNI event brings it).
pub fn pod_json(
    namespace: &str,
    name: &str,
    node: &str,
    ip: Option<Ipv4Addr>,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> Value {
    let map = |kv: &[(&str, &str)]| -> serde_json::Map<String, Value> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    };
    let status = match ip {
        Some(ip) => json!({"phase": "Running", "podIP": ip.to_string(),
                           "podIPs": [{"ip": ip.to_string()}],
                           "conditions": [{"type": "Ready", "status": "True"}]}),
        None => json!({"phase": "Pending"}),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": pod_uid(name),
                     "labels": map(labels), "annotations": map(annotations),
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
        "status": status
    })
}

/// The uid the kit gives pod `name`.
pub fn pod_uid(name: &str) -> String {
    format!("uid-{name}")
}

/// The ztunnel pod of a node: `app=ztunnel` in `istio-system`, service account `ztunnel` (what
/// the agent trusts by default), Ready, with its IP and netns annotation.
pub fn ztunnel_json(node: &str, ip: Ipv4Addr, netns: &Path) -> Value {
    let mut pod = pod_json(
        "istio-system",
        &format!("ztunnel-{node}"),
        node,
        Some(ip),
        &[("app", "ztunnel")],
        &[(ZTUNNEL_NETNS_ANNOTATION, &netns.display().to_string())],
    );
    pod["spec"]["serviceAccountName"] = Value::from("ztunnel");
    pod
}

/// Write the workloads file (`{"namespaces": [...], "pods": [...]}`) atomically.
pub fn write_workloads(path: &Path, namespaces: &[Value], pods: &[Value]) -> Result<(), String> {
    write_atomic(
        path,
        &json!({"namespaces": namespaces, "pods": pods}).to_string(),
    )
}

/// Put a pod and its namespace where the plugin's `pod_metadata_dir` lookup finds them.
pub fn write_pod_metadata(meta: &Path, pod: &Value, namespace: &Value) -> Result<(), String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let dir = meta.join("pods").join(ns);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    write_atomic(&dir.join(format!("{name}.json")), &pod.to_string())?;
    let ns_name = namespace["metadata"]["name"].as_str().unwrap_or_default();
    write_atomic(
        &meta.join("namespaces").join(format!("{ns_name}.json")),
        &namespace.to_string(),
    )
}

/// A bpffs of our own mounted on a directory (e.g. [`AgentDirs::bpffs`]; never the host's
/// `/sys/fs/bpf`), lazily unmounted on drop.
#[derive(Debug)]
pub struct BpffsMount(PathBuf);

impl BpffsMount {
    /// Mount a bpffs on `dir` (needs root); panics naming the directory when it cannot.
    pub fn mount(dir: &Path) -> BpffsMount {
        nix::mount::mount(
            Some("bpf"),
            dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount a bpffs on {} (root needed): {e}", dir.display()));
        BpffsMount(dir.to_path_buf())
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The ambient redirect mode an [`Agent`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackMode {
    /// Node-level (`--ambient-redirect-mode=iptables`), ztunnel as a watched pod.
    Iptables,
    /// In-pod (`--ambient-redirect-mode=inpod`), ztunnel connects to `dirs.zds_socket`.
    Inpod,
    /// Node-level tc eBPF (`--ambient-redirect-mode=ebpf`), ztunnel as a watched pod; pins
    /// under `dirs.bpf_pin_dir()` (the caller mounts a bpffs on `dirs.bpffs` first).
    Ebpf,
}

impl StackMode {
    pub fn name(self) -> &'static str {
        match self {
            StackMode::Iptables => "iptables",
            StackMode::Inpod => "inpod",
            StackMode::Ebpf => "ebpf",
        }
    }
}

/// The `meshcni-agent` process, running inside a node netns. SIGTERM + reap on drop.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    pub dirs: AgentDirs,
    pub node_netns: PathBuf,
    pub mode: StackMode,
}

impl Agent {
    /// Start `agent_bin` with `setpriv --pdeathsig TERM -- nsenter --net=<node_netns>` (both
    /// exec: the child pid is the agent's; the agent gets SIGTERM if its parent dies without
    /// stopping it, e.g. a killed demo), in iptables mode, with the workloads file and every
    /// path under `dirs`.
    pub fn start(
        agent_bin: &Path,
        node_netns: &Path,
        node_name: &str,
        dirs: &AgentDirs,
    ) -> Result<Agent, String> {
        Agent::start_with_env(agent_bin, node_netns, node_name, dirs, &[])
    }

    /// [`Agent::start`] with extra environment variables (e.g. `MESHCNI_CRASH_AT`).
    pub fn start_with_env(
        agent_bin: &Path,
        node_netns: &Path,
        node_name: &str,
        dirs: &AgentDirs,
        env: &[(&str, &str)],
    ) -> Result<Agent, String> {
        Agent::start_mode(
            agent_bin,
            node_netns,
            node_name,
            dirs,
            StackMode::Iptables,
            env,
        )
    }

    /// [`Agent::start_with_env`] in redirect mode `mode` ([`agent_args_for`]).
    pub fn start_mode(
        agent_bin: &Path,
        node_netns: &Path,
        node_name: &str,
        dirs: &AgentDirs,
        mode: StackMode,
        env: &[(&str, &str)],
    ) -> Result<Agent, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&dirs.log)
            .map_err(|e| format!("open {}: {e}", dirs.log.display()))?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "TERM", "--", "nsenter"])
            .arg(format!("--net={}", node_netns.display()))
            .arg("--")
            .arg(agent_bin)
            .args(agent_args_for(dirs, mode))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NODE_NAME", node_name)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn setpriv … nsenter … {}: {e}", agent_bin.display()))?;
        Ok(Agent {
            child: Some(child),
            dirs: dirs.clone(),
            node_netns: node_netns.to_path_buf(),
            mode,
        })
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.dirs.log).unwrap_or_default()
    }

    /// The monitoring (metrics, `/debug/doctor`) address the agent logged; panics if it has
    /// not logged one yet (call after [`Agent::wait_ready`]).
    pub fn monitoring(&self) -> String {
        monitoring_address(&self.log()).expect("monitoring address logged")
    }

    /// Wait until the agent is ready: `/readyz` answers 200 (address from its log), the
    /// ambient config says `{"ztunnelReady":true,"redirectMode":"<mode>"}` and the plugin
    /// event socket exists. Returns the readiness address and the config text.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(String, String), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "meshcni-agent exited ({status}) before it was ready; log:\n{}",
                    self.log()
                ));
            }
            let last = match self.ready_once() {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "meshcni-agent not ready after {timeout:?}: {last}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn ready_once(&self) -> Result<(String, String), String> {
        let log = self.log();
        let addr = log
            .lines()
            .rev()
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("readiness="))
                    .map(|a| a.trim_matches('"').to_string())
            })
            .ok_or("no `readiness=` address logged yet")?;
        let (status, body) = http_get_in(&self.node_netns, &addr, "/readyz")?;
        if status != 200 {
            return Err(format!("GET /readyz on {addr}: HTTP {status}: {body}"));
        }
        let config = std::fs::read_to_string(self.dirs.ambient_config())
            .map_err(|e| format!("read {}: {e}", self.dirs.ambient_config().display()))?;
        let want = format!(
            r#"{{"ztunnelReady":true,"redirectMode":"{}"}}"#,
            self.mode.name()
        );
        if config != want {
            return Err(format!("ambient config is {config}"));
        }
        if !self.dirs.socket().exists() {
            return Err(format!("{} does not exist", self.dirs.socket().display()));
        }
        Ok((addr, config))
    }

    /// Wait (at most `timeout`) for the agent to exit on its own (e.g. killed at a crash
    /// point); `Ok(None)` if it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err("meshcni-agent is not running".into());
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Ok(Some(status));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(format!("wait for meshcni-agent: {e}")),
            }
        }
    }

    /// `kill -TERM` and wait (at most `timeout`, then SIGKILL). Returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err("meshcni-agent is not running".into());
        };
        signal(&child, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "meshcni-agent did not exit within {timeout:?} of SIGTERM; log:\n{}",
                        self.log()
                    ));
                }
                Err(e) => return Err(format!("wait for meshcni-agent: {e}")),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(&child, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) -> Result<(), String> {
    let pid = i32::try_from(child.id()).map_err(|_| format!("pid {} out of range", child.id()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .map_err(|e| format!("kill -{sig} {pid}: {e}"))
}

/// The agent's flags for `dirs` in iptables mode (also what `meshcni-agent uninstall` needs).
pub fn agent_args(dirs: &AgentDirs) -> Vec<String> {
    agent_args_for(dirs, StackMode::Iptables)
}

/// The agent's flags for `dirs` in redirect mode `mode`.
pub fn agent_args_for(dirs: &AgentDirs, mode: StackMode) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    let mut args = vec![
        format!("--mounted-cni-net-dir={}", p(&dirs.net_d)),
        format!("--cni-net-dir={}", p(&dirs.net_d)),
        format!("--cni-bin-dir={}", p(&dirs.image)),
        format!("--cni-bin-dirs={}", p(&dirs.bin)),
        format!("--service-account-dir={}", p(&dirs.sa)),
        // Only written into the plugin's kubeconfig (the plugin reads pods from
        // `pod_metadata_dir`, the agent from the workloads file); nothing connects to it.
        "--kubernetes-service-host=127.0.0.1".into(),
        "--kubernetes-service-port=6443".into(),
        format!("--cni-agent-run-dir={}", p(&dirs.run)),
        format!("--ambient-config-dir={}", p(&dirs.ambient)),
        format!("--uninstall-marker-file={}", p(&dirs.marker)),
        format!("--ambient-workloads-file={}", p(&dirs.workloads)),
        // The lab node's own xtables lock, not the host's `/run/xtables.lock`.
        format!("--node-xtables-lock={}", p(&dirs.run.join("xtables.lock"))),
        "--ambient-enabled".into(),
        format!("--ambient-redirect-mode={}", mode.name()),
        "--listen-address=127.0.0.1".into(),
        "--readiness-port=0".into(),
        "--monitoring-port=0".into(),
        "--log-level=info".into(),
    ];
    if mode == StackMode::Inpod {
        args.extend([
            format!("--ztunnel-uds-address={}", p(&dirs.zds_socket)),
            format!("--host-proc-dir={}", p(&dirs.proc)),
            format!("--netns-dir={}", p(&dirs.netns_dir)),
        ]);
    }
    if mode == StackMode::Ebpf {
        args.extend([
            format!("--ambient-ebpf-pin-dir={}", p(&dirs.bpf_pin_dir())),
            // Private, empty: netns discovery never scans the machine's processes or netns.
            format!("--host-proc-dir={}", p(&dirs.proc)),
            format!("--netns-dir={}", p(&dirs.netns_dir)),
        ]);
    }
    args
}

/// `meshcni-agent [flags for dirs] uninstall` inside the node netns (what an operator runs to
/// remove meshcni from a node whose agent is gone). Returns the command's stderr (its log).
pub fn run_uninstall(
    agent_bin: &Path,
    node_netns: &Path,
    node_name: &str,
    dirs: &AgentDirs,
) -> Result<String, String> {
    run_uninstall_mode(agent_bin, node_netns, node_name, dirs, StackMode::Iptables)
}

/// [`run_uninstall`] with the flags of redirect mode `mode` ([`agent_args_for`]).
pub fn run_uninstall_mode(
    agent_bin: &Path,
    node_netns: &Path,
    node_name: &str,
    dirs: &AgentDirs,
    mode: StackMode,
) -> Result<String, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node_netns.display()))
        .arg("--")
        .arg(agent_bin)
        .args(agent_args_for(dirs, mode))
        .arg("uninstall")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NODE_NAME", node_name)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawn nsenter … {} uninstall: {e}", agent_bin.display()))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(log)
    } else {
        Err(format!(
            "meshcni-agent uninstall failed ({}):\n{log}",
            out.status
        ))
    }
}

/// `GET path` on `addr` from inside the netns at `netns` (HTTP/1.0, whole reply).
pub fn http_get_in(netns: &Path, addr: &str, path: &str) -> Result<(u16, String), String> {
    let ns = std::fs::File::open(netns).map_err(|e| format!("open {}: {e}", netns.display()))?;
    let addr = addr.to_string();
    let path = path.to_string();
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(u16, String), String> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns {}: {e}", netns.display()))?;
            let mut c = TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            c.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                .map_err(|e| format!("write to {addr}: {e}"))?;
            let mut reply = String::new();
            c.read_to_string(&mut reply)
                .map_err(|e| format!("read from {addr}: {e}"))?;
            let status = reply
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no HTTP status in {reply:?}"))?;
            let body = reply
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Ok((status, body))
        })
        .join()
        .map_err(|_| "readiness probe thread panicked".to_string())?
    })
}

/// What a plugin invocation returned.
#[derive(Debug, Clone)]
pub struct CniOutcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl CniOutcome {
    /// The stdout as JSON (a CNI result, or a CNI error object).
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_str(&self.stdout)
            .map_err(|e| format!("plugin stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

/// `meshcni` ADD for pod `namespace/name` (netns `pod_netns`, IPv4 `ip`) exec'd in the node
/// netns with the CNI environment a runtime sets and a ptp-style prevResult.
pub fn plugin_add(
    plugin: &Path,
    node_netns: &Path,
    pod_netns: &Path,
    namespace: &str,
    name: &str,
    ip: Ipv4Addr,
    dirs: &AgentDirs,
) -> Result<CniOutcome, String> {
    plugin_add_ips(
        plugin,
        node_netns,
        pod_netns,
        namespace,
        name,
        &[IpAddr::V4(ip)],
        dirs,
    )
}

/// The plugin's ADD process for [`plugin_add_ips`], started with its stdin written and
/// closed (a crash test kills it mid-ADD, as a runtime's timeout or a node reboot would).
pub fn plugin_add_spawn(
    plugin: &Path,
    node_netns: &Path,
    pod_netns: &Path,
    namespace: &str,
    name: &str,
    ips: &[IpAddr],
    dirs: &AgentDirs,
) -> Result<Child, String> {
    let ip_entries: Vec<Value> = ips
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(v) => {
                json!({"address": format!("{v}/32"), "gateway": "169.254.1.1", "interface": 1})
            }
            IpAddr::V6(v) => {
                json!({"address": format!("{v}/128"), "gateway": "fe80::1", "interface": 1})
            }
        })
        .collect();
    let mut routes = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        routes.push(json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"}));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        routes.push(json!({"dst": "::/0", "gw": "fe80::1"}));
    }
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "lab",
        "type": "meshcni",
        "ambient_enabled": true,
        "cni_agent_run_dir": dirs.run,
        "pod_metadata_dir": dirs.meta,
        "plugin_log_level": "info",
        "kubernetes": {"exclude_namespaces": ["kube-system", "istio-system"]},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "veth-host", "mac": "02:00:00:00:00:01"},
                {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": pod_netns}
            ],
            "ips": ip_entries,
            "routes": routes,
            "dns": {}
        }
    });
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", node_netns.display()))
        .arg("--")
        .arg(plugin)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("ctr-{name}"))
        .env("CNI_NETNS", pod_netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=ctr-{name};K8S_POD_UID={}",
                pod_uid(name)
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {} for {namespace}/{name}: {e}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(conf.to_string().as_bytes())
            .map_err(|e| format!("write the plugin's stdin for {namespace}/{name}: {e}"))?;
    }
    Ok(child)
}

/// [`plugin_add`] with every address of the pod (IPv4 and IPv6) in the ptp-style
/// prevResult.
pub fn plugin_add_ips(
    plugin: &Path,
    node_netns: &Path,
    pod_netns: &Path,
    namespace: &str,
    name: &str,
    ips: &[IpAddr],
    dirs: &AgentDirs,
) -> Result<CniOutcome, String> {
    let started = Instant::now();
    let child = plugin_add_spawn(plugin, node_netns, pod_netns, namespace, name, ips, dirs)?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for the plugin ({namespace}/{name}): {e}"))?;
    Ok(CniOutcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    })
}

/// Run `program args…` inside the netns at `netns`; stdout on success.
pub fn exec_in(netns: &Path, program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .map_err(|e| format!("spawn nsenter … {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` in {} failed ({}): {}",
            args.join(" "),
            netns.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The node netns state an operator compares: rules of both iptables flavours (counters and
/// comment lines dropped), policy rules, every routing table (IPv6 link-local noise dropped),
/// links, ipsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub iptables_nft: String,
    pub iptables_legacy: String,
    pub ip_rule: String,
    pub routes: String,
    pub links: String,
    pub ipsets: String,
}

impl NodeState {
    /// Snapshot the netns at `netns`.
    pub fn capture(netns: &Path) -> Result<NodeState, String> {
        Ok(NodeState {
            iptables_nft: normalize_save(&exec_in(netns, "iptables-nft-save", &[])?),
            iptables_legacy: normalize_save(&exec_in(netns, "iptables-legacy-save", &[])?),
            ip_rule: exec_in(netns, "ip", &["rule"])?,
            // IPv6 link-local addresses (and their kernel routes) appear on links a second or
            // so after creation (DAD): not ours, and they would make snapshots racy.
            routes: exec_in(netns, "ip", &["route", "show", "table", "all"])?
                .lines()
                .filter(|l| !l.contains("fe80::") && !l.contains("ff00::/8"))
                .map(|l| format!("{l}\n"))
                .collect(),
            links: exec_in(netns, "ip", &["-d", "link", "show"])?,
            ipsets: exec_in(netns, "ipset", &["list"])?,
        })
    }

    /// Field-by-field differences (`name: before → after`), empty when equal.
    pub fn diff(&self, other: &NodeState) -> Vec<String> {
        let pairs = [
            ("iptables-nft-save", &self.iptables_nft, &other.iptables_nft),
            (
                "iptables-legacy-save",
                &self.iptables_legacy,
                &other.iptables_legacy,
            ),
            ("ip rule", &self.ip_rule, &other.ip_rule),
            ("ip route show table all", &self.routes, &other.routes),
            ("ip -d link", &self.links, &other.links),
            ("ipset list", &self.ipsets, &other.ipsets),
        ];
        pairs
            .iter()
            .filter(|(_, a, b)| a != b)
            .map(|(what, a, b)| format!("{what}:\n--- before\n{a}--- after\n{b}"))
            .collect()
    }
}

/// `iptables-save` output without comment lines and with chain counters zeroed.
pub fn normalize_save(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_string(),
        })
        .map(|l| l + "\n")
        .collect()
}

/// Lines of `text` mentioning any of `needles` (for compact operator views).
pub fn grep(text: &str, needles: &[&str]) -> String {
    text.lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The agent's monitoring address in its log (`monitoring=<addr>` on its start-up line; the
/// last one, after a restart).
pub fn monitoring_address(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("monitoring="))
            .map(|a| a.trim_matches('"').to_string())
    })
}

/// The row of pod `key` (`namespace/name`) in a `meshcni-agent doctor --json` report; panics
/// naming the report if there is none.
pub fn doctor_pod<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["pods"]
        .as_array()
        .expect("pods in the doctor report")
        .iter()
        .find(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            ) == key
        })
        .unwrap_or_else(|| panic!("no pod {key} in {report:#}"))
}

/// `<agent_bin> <flags> doctor --json` run in `netns` (as node `node`, with only `PATH` from
/// the environment): (exit success, the report). Panics naming the output if it is not JSON.
pub fn doctor_json<S: AsRef<std::ffi::OsStr>>(
    agent_bin: &Path,
    netns: &Path,
    flags: &[S],
    node: &str,
) -> (bool, Value) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(agent_bin)
        .args(flags)
        .args(["doctor", "--json"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NODE_NAME", node)
        .output()
        .expect("run meshcni-agent doctor");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json is not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}
