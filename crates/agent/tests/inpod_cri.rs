//! Ambient `inpod` through a real container runtime: containerd 1.6's CRI plugin (driven by
//! `scripts/cri-pod.py`, a kubelet-like CRI client) creates pod sandboxes on a node whose CNI
//! conflist the real `meshcni-agent` (inpod mode, no Kubernetes: workloads from a file, pod
//! metadata from a directory) chained the real `meshcni` plugin into, with the in-pod ztunnel
//! stand-in (a real ZDS client) connected to the agent's socket.
//!
//! * `RunPodSandbox` of a pod in an ambient namespace returns only after ztunnel acked the pod
//!   (the stand-in holds its UID, with the sandbox's own netns, when the call returns) and the
//!   in-pod rules are in the sandbox netns;
//! * the first connection of the pod's first container (busybox `nc` to a server in the node
//!   netns, made by the container's command as it starts) goes through ztunnel's 15001;
//! * `StopPodSandbox` + `RemovePodSandbox` (CNI DEL twice, as under kubelet) succeed and change
//!   nothing for ztunnel (Istio semantics: the pod watch releases ambient pods); removing the
//!   pod from the workloads releases it (ztunnel gets `DelWorkload`, the state file and the
//!   node's probe ipset forget it);
//! * a pod ztunnel refuses (nack) fails `RunPodSandbox` with ztunnel's message, and one it never
//!   answers fails it naming the missing ack; containerd tears those sandboxes down.
//!
//! Root and the tools `scripts/setup.sh` installs (containerd, runc, the reference plugins, the
//! CRI client venv, a static busybox) are required: missing ones fail the test (never skip).
//! Everything runs inside a node netns this test creates (`mcni-*`); the agent's
//! `--host-proc-dir` and `--netns-dir` are private empty dirs (it never scans the machine).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshcni_testkit::multinode::EchoServer;
use meshcni_testkit::stack::{
    Agent, AgentDirs, DATAPLANE_MODE, StackMode, exec_in, namespace_json, pod_json, pod_uid,
    write_pod_metadata, write_workloads,
};
use meshcni_testkit::zds_client::RequestKind;
use meshcni_testkit::{AckOutcome, InpodZtunnelConfig, InpodZtunnelStandIn, Netns};
use serde_json::{Value, json};

const NODE: &str = "node1";
const WAIT: Duration = Duration::from_secs(20);
const CNI_PLUGINS_DIR: &str = "/usr/lib/cni";
const SUBNET: &str = "10.250.21.0/24";
const GATEWAY: &str = "10.250.21.1";
const SERVER_PORT: u16 = 18081;
const PAUSE_IMAGE: &str = "localhost/meshcni-pause:latest";
const BUSYBOX_IMAGE: &str = "localhost/meshcni-busybox:latest";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cri_python() -> PathBuf {
    std::env::var_os("MESHCNI_CRI_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/meshcni/cri-venv"))
        .join("bin/python")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Fails (never skips) unless root and every tool is present.
fn require() {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for p in [
        "ip",
        "nsenter",
        "setpriv",
        "containerd",
        "containerd-shim-runc-v2",
        "ctr",
        "runc",
        "python3",
        "umount",
        "jq",
        "iptables-save",
        "ipset",
    ] {
        if !on_path(p) {
            missing.push(format!("`{p}` on PATH"));
        }
    }
    let mut files: Vec<PathBuf> = ["bridge", "host-local", "portmap", "loopback"]
        .iter()
        .map(|p| Path::new(CNI_PLUGINS_DIR).join(p))
        .collect();
    files.push("/bin/busybox".into());
    files.push(cri_python());
    for f in files {
        if !f.exists() {
            missing.push(f.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "containerd CRI test preconditions not met: missing {}. Run `scripts/setup.sh` as root.",
        missing.join(", ")
    );
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Directories containerd's shim and runc hard-code under /run/containerd.
const CONTAINERD_FIXED_DIRS: [&str; 5] = [
    "/run/containerd/runc/k8s.io",
    "/run/containerd/runc",
    "/run/containerd/fifo",
    "/run/containerd/s",
    "/run/containerd",
];

/// A private containerd (own root, state, socket and config under `dir`) inside the node
/// netns, reading CNI configs from `conf_dir` and plugins from `bin_dir`. Drop: remove
/// leftover sandboxes, stop it, unmount leftovers under `dir`, remove the fixed
/// /run/containerd dirs if they did not exist before and are empty.
struct Containerd {
    dir: PathBuf,
    sock: PathBuf,
    child: Option<Child>,
    preexisting: BTreeSet<&'static str>,
}

impl Containerd {
    fn start(node: &Path, dir: &Path, bin_dir: &Path, conf_dir: &Path) -> Containerd {
        let preexisting = CONTAINERD_FIXED_DIRS
            .iter()
            .copied()
            .filter(|d| Path::new(d).exists())
            .collect();
        for d in ["root", "state", "opt"] {
            fs::create_dir_all(dir.join(d)).expect("create containerd dir");
        }
        let sock = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            opt = dir.join("opt").display(),
            bin = bin_dir.display(),
            conf = conf_dir.display(),
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).expect("write containerd config");
        let log = fs::File::create(dir.join("containerd.log")).expect("create containerd.log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", node.display()))
            .arg("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let c = Containerd {
            dir: dir.to_path_buf(),
            sock,
            child: Some(child),
            preexisting,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(c.sock.exists() && output(&mut c.ctr(&["version"])).status.success()) {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up in 30s; log:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.sock).args(args);
        c
    }

    fn cri(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cri_python());
        c.arg(repo_root().join("scripts/cri-pod.py"))
            .arg("-r")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args);
        c
    }

    /// An image made of /bin/busybox (applets linked), imported into the k8s.io namespace.
    fn import_busybox_image(&self, name: &str, entrypoint: &[&str], cmd_args: &[&str]) {
        let tar = self
            .dir
            .join(format!("{}.tar", name.replace(['/', ':'], "_")));
        let mut c = Command::new("python3");
        c.arg(repo_root().join("scripts/lib/mk-oci-image.py"))
            .args(["--busybox", "/bin/busybox", "--name", name, "-o"])
            .arg(&tar)
            .arg("--entrypoint")
            .args(entrypoint)
            .arg("--cmd")
            .args(cmd_args);
        run_ok(&mut c);
        let tar = tar.display().to_string();
        run_ok(&mut self.ctr(&["-n", "k8s.io", "images", "import", &tar]));
    }

    fn sandboxes(&self) -> Vec<String> {
        let out = output(&mut self.cri(&["pods"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect()
    }

    fn inspect(&self, id: &str) -> Value {
        let out = run_ok(&mut self.cri(&["inspectp", id]));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("inspectp {id}: bad JSON ({e}): {out}"))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.sock.exists() {
                for id in self.sandboxes() {
                    let _ = output(&mut self.cri(&["stopp", &id]));
                    let _ = output(&mut self.cri(&["rmp", &id]));
                }
            }
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let prefix = format!("{}/", self.dir.display());
        let mut mounts: Vec<String> = fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&prefix))
            .map(String::from)
            .collect();
        mounts.sort_by(|a, b| b.cmp(a));
        for m in mounts {
            let _ = output(Command::new("umount").args(["-l", &m]));
        }
        for d in CONTAINERD_FIXED_DIRS {
            if !self.preexisting.contains(d) {
                let _ = fs::remove_dir(d); // only succeeds when empty
            }
        }
    }
}

fn namespaces() -> Vec<Value> {
    vec![
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
        namespace_json("istio-system", &[]),
    ]
}

fn binaries() -> (PathBuf, PathBuf) {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"));
    let plugin = agent.with_file_name("meshcni");
    assert!(
        plugin.is_file(),
        "meshcni plugin binary missing at {} (cargo build --workspace)",
        plugin.display()
    );
    (agent, plugin)
}

fn calls(dir: &Path) -> Vec<Value> {
    let path = dir.join("cni-log/calls.jsonl");
    fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count(dir: &Path, command: &str, id: &str) -> usize {
    calls(dir)
        .iter()
        .filter(|c| c["command"] == command && c["env"]["CNI_CONTAINERID"] == id)
        .count()
}

fn netns_identity(path: &str) -> (u64, u64) {
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    (m.dev(), m.ino())
}

#[test]
fn containerd_cri_ambient_pod_is_acked_before_sandbox_ready_and_first_connection_captured() {
    require();
    let (agent_bin, plugin) = binaries();
    // /var/tmp, not /tmp: overlayfs snapshots need a real filesystem (tmpfs /tmp on some hosts).
    let tmp = tempfile::Builder::new()
        .prefix("mcni-inpod-cri-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let w = tmp.path();
    let node = Netns::new("cri").expect("node netns");
    let dirs = AgentDirs::create(&w.join("agent"), &plugin).expect("agent dirs");

    // The node's primary CNI (what containerd would run without meshcni): bridge + host-local
    // → portmap → cni-log (records each call and passes prevResult on). The agent chains
    // meshcni in after it, and containerd reads this very directory.
    fs::remove_file(dirs.net_d.join("10-lab.conflist")).expect("drop the kit's ptp primary");
    let primary = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": w.join("ipam"),
                      "ranges": [[{"subnet": SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "cni-log", "logDir": w.join("cni-log")}
        ]
    });
    let conflist = dirs.net_d.join("10-k8s.conflist");
    fs::write(&conflist, primary.to_string()).expect("write primary conflist");
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        std::os::unix::fs::symlink(Path::new(CNI_PLUGINS_DIR).join(p), dirs.bin.join(p))
            .expect("symlink reference plugin");
    }
    std::os::unix::fs::symlink(
        repo_root().join("scripts/lib/cni-log"),
        dirs.bin.join("cni-log"),
    )
    .expect("symlink cni-log");

    // Workloads: the pods are Pending (no IP) until the runtime created them, as under kubelet.
    let web = pod_json("mesh", "web", NODE, None, &[], &[]);
    let denied = pod_json("mesh", "denied", NODE, None, &[], &[]);
    write_workloads(
        &dirs.workloads,
        &namespaces(),
        &[web.clone(), denied.clone()],
    )
    .expect("workloads");
    for pod in [&web, &denied] {
        write_pod_metadata(&dirs.meta, pod, &namespaces()[0]).expect("pod metadata");
    }

    let meta = dirs.meta.display().to_string();
    let mut agent = Agent::start_mode(
        &agent_bin,
        node.path(),
        NODE,
        &dirs,
        StackMode::Inpod,
        &[("POD_METADATA_DIR", meta.as_str())],
    )
    .expect("start agent");
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&dirs.zds_socket))
        .expect("ztunnel stand-in");
    let (_, config) = agent.wait_ready(WAIT).expect("agent ready");
    assert_eq!(config, r#"{"ztunnelReady":true,"redirectMode":"inpod"}"#);
    let merged: Value =
        serde_json::from_str(&fs::read_to_string(&conflist).expect("read conflist"))
            .expect("conflist JSON");
    let last = merged["plugins"]
        .as_array()
        .and_then(|p| p.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["type"], "meshcni", "agent chained meshcni: {merged}");
    assert_eq!(last["ambient_enabled"], true, "{merged}");
    assert_eq!(last["pod_metadata_dir"], meta.as_str(), "{merged}");

    let ctr = Containerd::start(node.path(), &w.join("containerd"), &dirs.bin, &dirs.net_d);
    ctr.import_busybox_image(PAUSE_IMAGE, &["/bin/sleep"], &["2147483647"]);
    ctr.import_busybox_image(BUSYBOX_IMAGE, &["/bin/sh"], &[]);
    let server_addr = format!("0.0.0.0:{SERVER_PORT}").parse().expect("addr");
    let server = EchoServer::start(&node, server_addr).expect("server in the node netns");

    // 1. RunPodSandbox: CNI ADD through the chain; meshcni hands the pod to the agent, which
    //    answers only after the in-pod rules are in and ztunnel acked.
    let uid = pod_uid("web");
    let out = output(&mut ctr.cri(&[
        "runp",
        "--name",
        "web",
        "--namespace",
        "mesh",
        "--uid",
        &uid,
    ]));
    assert!(
        out.status.success(),
        "RunPodSandbox web failed: {}\nagent log:\n{}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log(),
        ctr.log()
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let held = zt
        .workload(&uid)
        .unwrap_or_else(|| panic!("ztunnel does not hold {uid} when RunPodSandbox returned"));
    let st = ctr.inspect(&id);
    assert_eq!(st["state"], "SANDBOX_READY", "{st}");
    let netns_path = st["netns"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        held.netns,
        netns_identity(&netns_path),
        "ztunnel got the sandbox's netns ({netns_path})"
    );
    let info = held.info.clone().expect("workload info");
    assert_eq!(
        (info.namespace.as_str(), info.name.as_str()),
        ("mesh", "web")
    );
    let pod_ip = st["ip"].as_str().unwrap_or_default().to_string();
    assert!(
        pod_ip.starts_with("10.250.21."),
        "sandbox IP {pod_ip}: {st}"
    );
    assert_eq!(count(w, "ADD", &id), 1, "one ADD for {id}");
    let adds: Vec<_> = zt
        .requests()
        .into_iter()
        .filter(|r| r.uid.as_deref() == Some(uid.as_str()) && r.kind == Some(RequestKind::Add))
        .collect();
    assert_eq!(adds.len(), 1, "one AddWorkload for {uid}: {adds:?}");
    assert_eq!(adds[0].fd_count, 1, "{adds:?}");
    assert_eq!(adds[0].outcome, AckOutcome::Ack, "{adds:?}");
    let rules = exec_in(Path::new(&netns_path), "iptables-save", &[]).expect("iptables-save");
    for (chain, target) in [
        ("-A ISTIO_OUTPUT ", "-j REDIRECT --to-ports 15001"),
        ("-A ISTIO_PRERT ", "-j REDIRECT --to-ports 15006"),
    ] {
        assert!(
            rules
                .lines()
                .any(|l| l.starts_with(chain) && l.contains("0x539/0xfff") && l.ends_with(target)),
            "in-pod rule `{chain}… {target}` missing in {netns_path}:\n{rules}"
        );
    }
    let probes = exec_in(node.path(), "ipset", &["list", "istio-inpod-probes-v4"])
        .expect("probe ipset in the node netns");
    assert!(probes.contains(&pod_ip), "{probes}");
    // The kubelet reports the pod Running with its IP; the workloads catch up.
    let web_running = pod_json(
        "mesh",
        "web",
        NODE,
        Some(pod_ip.parse().expect("pod ip")),
        &[],
        &[],
    );
    write_workloads(
        &dirs.workloads,
        &namespaces(),
        &[web_running.clone(), denied.clone()],
    )
    .expect("workloads");

    // 2. The pod's first connection: its container's command connects to a server outside
    //    the pod (node netns, via the bridge gateway) as it starts.
    zt.take_hops();
    let target = format!("{GATEWAY}:{SERVER_PORT}");
    let script =
        format!("echo first | nc -w 5 {GATEWAY} {SERVER_PORT} > /tmp/first 2>&1; sleep 3600");
    let cid = run_ok(&mut ctr.cri(&[
        "create-start",
        &id,
        "--image",
        BUSYBOX_IMAGE,
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]))
    .trim()
    .to_string();
    let hops = zt
        .wait_for_hops(1, WAIT)
        .unwrap_or_else(|e| panic!("no ztunnel hop for the container's connection: {e}"));
    assert_eq!(hops[0].listener_port, 15001, "{hops:?}");
    assert_eq!(hops[0].original_dst.to_string(), target, "{hops:?}");
    assert_eq!(hops[0].peer.ip().to_string(), pod_ip, "{hops:?}");
    assert_eq!(hops[0].uid, uid, "{hops:?}");
    let deadline = Instant::now() + WAIT;
    let first = loop {
        let out = output(&mut ctr.cri(&["exec", &cid, "--", "/bin/cat", "/tmp/first"]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("peer:") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "container never got the greeting: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        first.contains(&format!("peer:{pod_ip}:")),
        "server saw the pod's own address (ztunnel connects from inside the pod): {first}"
    );
    assert_eq!(
        server.accepted(),
        1,
        "exactly one connection reached the server"
    );

    // 3. A pod ztunnel refuses: RunPodSandbox fails with ztunnel's reason, nothing stays.
    let denied_uid = pod_uid("denied");
    zt.nack_uid(&denied_uid, "refused by the test's ztunnel");
    let out = output(&mut ctr.cri(&[
        "runp",
        "--name",
        "denied",
        "--namespace",
        "mesh",
        "--uid",
        &denied_uid,
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "RunPodSandbox denied must fail");
    assert!(
        err.contains("refused by the test's ztunnel"),
        "the CRI error names ztunnel's reason: {err}"
    );
    assert!(zt.workload(&denied_uid).is_none());
    assert_eq!(
        ctr.sandboxes(),
        vec![id.clone()],
        "only web's sandbox exists"
    );

    // 4. StopPodSandbox + RemovePodSandbox: CNI DEL twice. ztunnel keeps the pod until the
    //    pod watch (here: the workloads) says it is gone — Istio's semantics.
    run_ok(&mut ctr.cri(&["stopp", &id]));
    run_ok(&mut ctr.cri(&["rmp", &id]));
    assert!(
        count(w, "DEL", &id) >= 2,
        "StopPodSandbox and RemovePodSandbox each reach DEL: {:?}",
        calls(w)
    );
    assert!(!Path::new(&netns_path).exists(), "{netns_path} removed");
    assert!(zt.workload(&uid).is_some(), "DEL alone does not release");
    let state = fs::read_to_string(dirs.run.join("inpod-mode.json")).expect("state file");
    assert!(state.contains(&uid), "{state}");

    write_workloads(&dirs.workloads, &namespaces(), &[]).expect("workloads");
    zt.wait_for_no_workload(&uid, WAIT)
        .unwrap_or_else(|e| panic!("not released: {e}\nagent log:\n{}", agent.log()));
    let deadline = Instant::now() + WAIT;
    loop {
        let state = fs::read_to_string(dirs.run.join("inpod-mode.json")).unwrap_or_default();
        let probes =
            exec_in(node.path(), "ipset", &["list", "istio-inpod-probes-v4"]).expect("probe ipset");
        if !state.contains(&uid) && !probes.contains(&pod_ip) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "released pod still recorded: state {state}\nprobes {probes}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dels: Vec<_> = zt
        .requests()
        .into_iter()
        .filter(|r| r.uid.as_deref() == Some(uid.as_str()) && r.kind == Some(RequestKind::Del))
        .collect();
    assert_eq!(dels.len(), 1, "one DelWorkload for {uid}: {dels:?}");

    // 5. A ztunnel that never answers: RunPodSandbox waits for the ack and fails when the
    //    agent's ack timeout expires, naming it; no sandbox stays.
    let slow = pod_json("mesh", "slow", NODE, None, &[], &[]);
    write_workloads(&dirs.workloads, &namespaces(), std::slice::from_ref(&slow))
        .expect("workloads");
    write_pod_metadata(&dirs.meta, &slow, &namespaces()[0]).expect("pod metadata");
    zt.set_never_ack(true);
    let slow_uid = pod_uid("slow");
    let out = output(&mut ctr.cri(&[
        "runp",
        "--name",
        "slow",
        "--namespace",
        "mesh",
        "--uid",
        &slow_uid,
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "RunPodSandbox slow must fail");
    assert!(
        err.contains(&format!("did not acknowledge pod {slow_uid}")),
        "the CRI error names the missing ack: {err}"
    );
    let slow_adds: Vec<_> = zt
        .requests()
        .into_iter()
        .filter(|r| r.uid.as_deref() == Some(slow_uid.as_str()) && r.kind == Some(RequestKind::Add))
        .collect();
    assert!(
        !slow_adds.is_empty() && slow_adds.iter().all(|r| r.outcome == AckOutcome::NoAck),
        "{slow_adds:?}"
    );
    assert!(ctr.sandboxes().is_empty(), "{:?}", ctr.sandboxes());
    zt.set_never_ack(false);

    drop(ctr);
    agent
        .terminate(Duration::from_secs(10))
        .expect("stop agent");
}
