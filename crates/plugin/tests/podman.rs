//! podman (4.3, Debian bookworm) with its CNI network backend driving the built `meshcni`
//! binary, as on a host without Kubernetes. podman passes `CNI_ARGS=IgnoreUnknown=1;
//! K8S_POD_NAME=<container name>` and no namespace; pod metadata comes from a local
//! `pod_metadata_dir`, and such a container is looked up in `pod_metadata_default_namespace`
//! (default `default`).
//!
//! * a container with a sidecar-injected metadata file (`default/web`) is captured: the netns
//!   podman created for it holds the Istio chains, and from inside it a TCP connection to the
//!   bridge gateway's port 9 (nothing listens there) lands on a listener on `:15001` in the
//!   container — the outbound REDIRECT works;
//! * a container without a metadata file (`plain`) starts, uncaptured: no chains, and the same
//!   connection is refused by the gateway;
//! * a container whose metadata file is invalid fails to start, and podman's error names the file.
//!
//! Isolation: a private `containers.conf` (`CONTAINERS_CONF`: CNI backend, our plugin and
//! config dirs), private `--root`/`--runroot`/`--tmpdir` under a temp dir, no image (the
//! container runs from a busybox rootfs directory, `--rootfs`), and podman runs inside a node
//! netns created here (`nsenter --net`), so the bridge and veths podman's CNI plugins create
//! never touch the host network. Each container's netns is created (and removed) by podman.
//!
//! Needs root, podman, runc, conmon, busybox and the reference CNI plugins (`scripts/setup.sh`
//! installs them); missing ones fail the test.

#[allow(dead_code)] // the support module serves runtimes.rs too
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

const SUBNET: &str = "10.250.12.0/24";
const GATEWAY: &str = "10.250.12.1";

/// podman with a private configuration and storage, run inside `node`.
struct Podman {
    dir: PathBuf,
    node: String,
    runc_root_existed: bool,
}

impl Podman {
    fn new(dir: &Path, node: &Netns, plugin_bin: &Path, conf_dir: &Path, net: &str) -> Podman {
        let conf = format!(
            r#"[containers]
# podman's default (nofile=1048576) needs CAP_SYS_RESOURCE to raise the hard limit, which some
# sandboxes lack (setrlimit EPERM in the runtime).
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
network_config_dir = "{conf}"
default_network = "{net}"

[engine]
# crun 1.8 refuses cgroup "hybrid" hosts; runc copes.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"#,
            bin = plugin_bin.display(),
            conf = conf_dir.display(),
        );
        fs::write(dir.join("containers.conf"), conf).expect("write containers.conf");
        for d in ["storage", "runroot", "tmp"] {
            fs::create_dir_all(dir.join(d)).expect("create podman dir");
        }
        Podman {
            dir: dir.to_path_buf(),
            node: node.path(),
            runc_root_existed: Path::new("/run/runc").exists(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.node))
            .arg("--")
            .arg("podman")
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c
    }

    /// `podman run -d --name <name> --rootfs <rootfs> /bin/sleep 600`.
    fn start(&self, name: &str, rootfs: &Path) -> std::process::Output {
        let rootfs = rootfs.display().to_string();
        output(&mut self.cmd(&[
            "run",
            "-d",
            "--name",
            name,
            "--rootfs",
            &rootfs,
            "/bin/sleep",
            "600",
        ]))
    }

    fn exec(&self, name: &str, script: &str) -> String {
        run_ok(&mut self.cmd(&["exec", name, "/bin/sh", "-c", script]))
    }

    /// The netns podman created for the container.
    fn netns(&self, name: &str) -> String {
        run_ok(&mut self.cmd(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
            name,
        ]))
        .trim()
        .to_string()
    }

    fn remove(&self, name: &str) {
        run_ok(&mut self.cmd(&["rm", "-f", "-t", "0", name]));
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = output(&mut self.cmd(&["rm", "-a", "-f", "-t", "0"]));
        // Leftover mounts under our dir (deepest first), then runc's default state root if
        // podman's runc created it and it is empty.
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
        if !self.runc_root_existed {
            let _ = fs::remove_dir("/run/runc");
        }
    }
}

/// A busybox rootfs directory (no image, no registry).
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
        fs::create_dir_all(root.join(d)).expect("create rootfs dir");
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "nc", "sleep", "cat", "echo", "ip", "netstat", "grep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .expect("symlink applet");
    }
    root
}

/// From inside the container: listen on :15001, connect to the gateway's port 9 once the
/// listener is up, print what the listener received. Captured: `rc=0 got=<probe>`; uncaptured:
/// refused by the gateway, `got=`.
fn probe_script(probe: &str) -> String {
    format!(
        "nc -l -p 15001 > /tmp/got & \
         i=0; while [ $i -lt 50 ] && ! netstat -ltn | grep -q ':15001 '; do sleep 0.1; i=$((i+1)); done; \
         echo {probe} | nc -w 2 {GATEWAY} 9; echo rc=$?; \
         i=0; while [ $i -lt 100 ] && [ ! -s /tmp/got ]; do sleep 0.1; i=$((i+1)); done; \
         echo got=$(cat /tmp/got); kill %1 2>/dev/null; true"
    )
}

#[test]
fn podman_cni_backend_captures_by_container_name() {
    require(
        &[
            "podman",
            "runc",
            "conmon",
            "nsenter",
            "ip",
            "umount",
            "iptables-nft-save",
            "iptables-legacy-save",
        ],
        &[
            Path::new(CNI_PLUGINS_DIR).join("bridge"),
            Path::new(CNI_PLUGINS_DIR).join("host-local"),
            Path::new(CNI_PLUGINS_DIR).join("portmap"),
            "/bin/busybox".into(),
        ],
    );
    let tmp = tempfile::Builder::new()
        .prefix("mcni-podman-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let w = tmp.path();
    let node = Netns::new("podnode");
    let bin = plugin_dir(w);
    let conf_dir = w.join("net.d");
    fs::create_dir_all(&conf_dir).expect("create net.d");
    let net = unique("podman");
    let meta = w.join("meta");
    let conf = conflist("1.0.0", &net, SUBNET, w, &meta);
    fs::write(conf_dir.join("10-meshcni.conflist"), conf.to_string()).expect("write conflist");
    let rootfs = busybox_rootfs(w);
    let podman = Podman::new(w, &node, &bin, &conf_dir, &net);

    // 1. Sidecar-injected metadata in the default namespace: captured.
    write_pod_metadata(
        &meta,
        &PodMeta {
            namespace: "default",
            name: "web",
            uid: "66666666-6666-4666-8666-666666666666",
            injected: true,
        },
    );
    let out = podman.start("web", &rootfs);
    assert!(
        out.status.success(),
        "podman run web failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = recorded_calls(w);
    let add = calls
        .iter()
        .rev()
        .find(|c| c["command"] == "ADD")
        .expect("an ADD reached the chain");
    let args = add["env"]["CNI_ARGS"].as_str().unwrap_or_default();
    assert!(
        args.split(';').any(|a| a == "K8S_POD_NAME=web") && !args.contains("K8S_POD_NAMESPACE"),
        "podman's CNI_ARGS: {args}"
    );
    let netns = podman.netns("web");
    assert!(
        netns.starts_with("/run/netns/") && Path::new(&netns).exists(),
        "podman's netns for web: {netns:?}"
    );
    assert_eq!(
        add["env"]["CNI_NETNS"].as_str(),
        Some(netns.as_str()),
        "the ADD was for the netns podman created"
    );
    assert_istio_capture(&iptables_rules(&netns), "podman container default/web");
    let seen = podman.exec("web", &probe_script("hello-mesh"));
    assert!(
        seen.contains("rc=0") && seen.contains("got=hello-mesh"),
        "outbound TCP from the captured container must reach :15001:\n{seen}"
    );
    podman.remove("web");
    assert!(!Path::new(&netns).exists(), "podman removed its netns");

    // 2. No metadata file: not a mesh pod; starts, uncaptured.
    let out = podman.start("plain", &rootfs);
    assert!(
        out.status.success(),
        "a container without a metadata file must start:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let netns = podman.netns("plain");
    assert_no_istio(&iptables_rules(&netns), "podman container plain");
    let seen = podman.exec("plain", &probe_script("not-captured"));
    let line = |key: &str| {
        seen.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("rc=") != "rc=0" && line("got=") == "got=",
        "uncaptured: the gateway refuses port 9, nothing reaches :15001:\n{seen}"
    );
    podman.remove("plain");

    // 3. An invalid metadata file: the container does not start; the error names the file.
    let bad = meta.join("pods/default/broken.json");
    fs::write(&bad, "{\"spec\": [").expect("write bad metadata");
    let out = podman.start("broken", &rootfs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "broken metadata must fail the start");
    assert!(
        stderr.contains(&bad.display().to_string()),
        "podman's error must name {}: {stderr}",
        bad.display()
    );
    let _ = output(&mut podman.cmd(&["rm", "-f", "-t", "0", "broken"]));
}
