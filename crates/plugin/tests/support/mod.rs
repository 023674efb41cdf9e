//! Support for the real-runtime tests (`tests/runtimes.rs`): preconditions, throw-away network
//! namespaces, a CNI plugin directory holding the built `meshcni`, a local pod-metadata
//! directory, and a private containerd.
//!
//! Safety rules these helpers enforce: every netns is created here with a unique `mcni-` name
//! and deleted by a Drop guard (on success and on panic); runtimes run inside a node netns we
//! created (`ip netns exec` / `nsenter --net=`), so bridges, veths and portmap rules never touch
//! the host network. External commands get argument vectors, never a shell.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Reference plugins from Debian's `containernetworking-plugins`.
pub const CNI_PLUGINS_DIR: &str = "/usr/lib/cni";

/// The repository root (for `scripts/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn script(rel: &str) -> PathBuf {
    repo_root().join("scripts").join(rel)
}

/// The CRI client venv's python (`scripts/setup.sh` creates it).
pub fn cri_python() -> PathBuf {
    let venv = std::env::var_os("MESHCNI_CRI_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/meshcni/cri-venv"));
    venv.join("bin/python")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Fails the test (never skips) unless we are root and every listed tool is present.
pub fn require(programs: &[&str], files: &[PathBuf]) {
    let mut missing = Vec::new();
    let uid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if uid != 0 {
        missing.push(format!("root (running as uid {uid})"));
    }
    for p in programs {
        if !on_path(p) {
            missing.push(format!("`{p}` on PATH"));
        }
    }
    for f in files {
        if !f.exists() {
            missing.push(f.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "real-runtime test preconditions not met: missing {}. Run `scripts/setup.sh` as root \
         (installs cnitool, containerd, runc, the reference CNI plugins and the CRI client venv), \
         then run the tests as root.",
        missing.join(", ")
    );
}

/// A name unique to this process and call: `mcni-<pid>-<n>-<tag>`.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "mcni-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (stdin closed) and returns its output; panics only if it cannot start.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// Runs `cmd`, panics with its stderr unless it exits 0, returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
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

pub fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// A network namespace created by the test, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        run_ok(&mut cmd("ip", &["netns", "add", &name]));
        let ns = Netns { name };
        run_ok(&mut cmd("ip", &["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip netns exec <name> program args...` (environment is inherited).
    pub fn exec(&self, program: &str, args: &[&str]) -> Command {
        let mut c = cmd("ip", &["netns", "exec", &self.name, program]);
        c.args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if Path::new(&self.path()).exists() {
            let out = output(&mut cmd("ip", &["netns", "del", &self.name]));
            if !out.status.success() {
                eprintln!(
                    "cleanup: ip netns del {} failed: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Everything `iptables-save` shows in the netns at `netns_path`, for both the nft and the
/// legacy backend (the plugin may use either; a rule in either one is in effect).
pub fn iptables_rules(netns_path: &str) -> String {
    let mut all = String::new();
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let net = format!("--net={netns_path}");
        all.push_str(&format!("# {save}\n"));
        all.push_str(&run_ok(&mut cmd("nsenter", &[&net, save])));
    }
    all
}

/// Asserts the Istio sidecar capture chains are installed (the lines every sidecar capture with
/// the default annotations produces, §2.3 of the reference spec).
pub fn assert_istio_capture(rules: &str, what: &str) {
    for line in [
        ":ISTIO_INBOUND",
        ":ISTIO_REDIRECT",
        ":ISTIO_IN_REDIRECT",
        ":ISTIO_OUTPUT",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert!(
            rules.lines().any(|l| l.starts_with(line)),
            "{what}: expected `{line}` in the pod netns rules, got:\n{rules}"
        );
    }
}

pub fn assert_no_istio(rules: &str, what: &str) {
    assert!(
        !rules.contains("ISTIO"),
        "{what}: expected no ISTIO_* rules, got:\n{rules}"
    );
}

/// A directory usable as CNI_PATH / containerd's `bin_dir`: symlinks to the reference plugins,
/// the recording plugin `cni-log` and the `meshcni` binary under test.
pub fn plugin_dir(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("create plugin dir");
    fs::create_dir_all(dir.join("run")).expect("create agent run dir"); // see conflist()
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        std::os::unix::fs::symlink(Path::new(CNI_PLUGINS_DIR).join(p), bin.join(p))
            .expect("symlink plugin");
    }
    std::os::unix::fs::symlink(script("lib/cni-log"), bin.join("cni-log"))
        .expect("symlink cni-log");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_meshcni"), bin.join("meshcni"))
        .expect("symlink meshcni");
    bin
}

/// The chain every runtime test uses: bridge + host-local → portmap → cni-log (records what
/// meshcni receives) → meshcni (last, so its output is the runtime's final result).
pub fn conflist(version: &str, name: &str, subnet: &str, dir: &Path, metadata_dir: &Path) -> Value {
    serde_json::json!({
        "cniVersion": version,
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
             "ipam": {"type": "host-local", "dataDir": dir.join("ipam"),
                      "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "cni-log", "logDir": dir.join("cni-log")},
            // cni_agent_run_dir: keep the plugin's log file/sockets inside the test dir.
            {"type": "meshcni", "pod_metadata_dir": metadata_dir, "plugin_log_level": "debug",
             "cni_agent_run_dir": dir.join("run")}
        ]
    })
}

/// Calls recorded by `cni-log`, in order.
pub fn recorded_calls(dir: &Path) -> Vec<Value> {
    let path = dir.join("cni-log/calls.jsonl");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad line in {}: {e}: {l}", path.display()))
        })
        .collect()
}

/// A pod as a Kubernetes Pod JSON in the local pod-metadata layout
/// (`pods/<namespace>/<name>.json`, `namespaces/<namespace>.json`).
pub struct PodMeta<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// Sidecar-injected: `sidecar.istio.io/status` annotation and an `istio-proxy` container.
    pub injected: bool,
}

pub fn write_pod_metadata(dir: &Path, pod: &PodMeta<'_>) {
    let mut containers = vec![serde_json::json!({
        "name": "app", "image": "localhost/meshcni-busybox:latest",
        "ports": [{"containerPort": 8080, "protocol": "TCP"}]
    })];
    let mut annotations = serde_json::Map::new();
    let mut init = Vec::new();
    if pod.injected {
        annotations.insert(
            "sidecar.istio.io/status".into(),
            Value::String(
                r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#
                    .into(),
            ),
        );
        init.push(serde_json::json!({
            "name": "istio-validation", "image": "docker.io/istio/proxyv2:1.20.0",
            "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                     "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info",
                     "--run-validation", "--skip-rule-apply"]
        }));
        containers.push(serde_json::json!({
            "name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.20.0",
            "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
            "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}
        }));
    }
    let pod_json = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                     "labels": {"app": pod.name}, "annotations": annotations},
        "spec": {"initContainers": init, "containers": containers}
    });
    let ns_json = serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": pod.namespace, "labels": {"istio-injection": "enabled"}}
    });
    let pods = dir.join("pods").join(pod.namespace);
    fs::create_dir_all(&pods).expect("create pods dir");
    fs::create_dir_all(dir.join("namespaces")).expect("create namespaces dir");
    fs::write(
        pods.join(format!("{}.json", pod.name)),
        pod_json.to_string(),
    )
    .expect("write pod json");
    fs::write(
        dir.join("namespaces")
            .join(format!("{}.json", pod.namespace)),
        ns_json.to_string(),
    )
    .expect("write namespace json");
}

/// Kubelet-style CNI_ARGS.
pub fn k8s_cni_args(namespace: &str, name: &str, uid: &str, infra_id: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID={infra_id};K8S_POD_UID={uid}"
    )
}

/// IPv4 addresses (CIDR) on `dev` in the netns at `netns_path`.
pub fn ipv4_addrs(netns: &Netns, dev: &str) -> Vec<String> {
    let out = output(&mut cmd(
        "ip",
        &["-n", &netns.name, "-j", "-4", "addr", "show", "dev", dev],
    ));
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output is JSON");
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a["local"].as_str()?,
                a["prefixlen"].as_u64()?
            ))
        })
        .collect()
}

/// Directories containerd's shim and runc hard-code under /run/containerd.
const CONTAINERD_FIXED_DIRS: [&str; 5] = [
    "/run/containerd/runc/k8s.io",
    "/run/containerd/runc",
    "/run/containerd/fifo",
    "/run/containerd/s",
    "/run/containerd",
];

/// A private containerd (own root, state, socket, config under `dir`) running inside `node`.
/// Drop: remove leftover sandboxes, stop containerd, unmount leftovers under `dir`, and remove
/// the hard-coded /run/containerd dirs if they did not exist before and are empty.
pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    child: Option<Child>,
    preexisting: BTreeSet<&'static str>,
}

impl Containerd {
    pub fn start(node: &Netns, dir: &Path, bin_dir: &Path, conf_dir: &Path) -> Containerd {
        let preexisting = CONTAINERD_FIXED_DIRS
            .iter()
            .copied()
            .filter(|d| Path::new(d).exists())
            .collect();
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
  sandbox_image = "localhost/meshcni-pause:latest"
  # the sandbox gets oom_score_adj=-998, which needs CAP_SYS_RESOURCE; clamp it instead
  # (without this, where that capability is missing: "runc create failed ... EOF")
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
            .arg(format!("--net={}", node.path()))
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
        loop {
            if c.sock.exists() && output(&mut c.ctr(&["version"])).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up in 30s; log:\n{}",
                c.log()
            );
            sleep(Duration::from_millis(100));
        }
        c
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.sock).args(args);
        c
    }

    /// `scripts/cri-pod.py -r unix://<sock> args...` with the venv python.
    pub fn cri(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cri_python());
        c.arg(script("cri-pod.py"))
            .arg("-r")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args);
        c
    }

    /// Builds an image from /bin/busybox and imports it into the k8s.io namespace.
    pub fn import_busybox_image(&self, name: &str, entrypoint: &[&str], cmd_args: &[&str]) {
        let tar = self
            .dir
            .join(format!("{}.tar", name.replace(['/', ':'], "_")));
        let mut c = Command::new("python3");
        c.arg(script("lib/mk-oci-image.py"))
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

    pub fn sandboxes(&self) -> Vec<String> {
        run_ok(&mut self.cri(&["pods"]))
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.sock.exists() {
                for id in self.sandboxes_best_effort() {
                    let _ = output(&mut self.cri(&["stopp", &id]));
                    let _ = output(&mut self.cri(&["rmp", &id]));
                }
            }
            let pid = child.id().to_string();
            let _ = output(&mut cmd("kill", &["-TERM", &pid]));
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(Duration::from_millis(100));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Snapshot / rootfs mounts normally vanish with the tasks; unmount leftovers (deepest first).
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
            let _ = output(&mut cmd("umount", &["-l", &m]));
        }
        for d in CONTAINERD_FIXED_DIRS {
            if !self.preexisting.contains(d) {
                let _ = fs::remove_dir(d); // only succeeds when empty
            }
        }
    }
}

impl Containerd {
    fn sandboxes_best_effort(&self) -> Vec<String> {
        let out = output(&mut self.cri(&["pods"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect()
    }
}
