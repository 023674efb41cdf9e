//! `meshcni-agent` on a host without Kubernetes: `--pod-metadata-dir` (and
//! `--pod-metadata-default-namespace`) reach the plugin entry the agent installs, and the
//! install needs no service account or API server (the plugin never reads a kubeconfig then):
//! the agent becomes ready with no token anywhere and writes no kubeconfig.
//!
//! The agent runs in a network namespace of its own (`nsenter --net`); needs root and nsenter.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const PRIMARY: &str = r#"{"cniVersion":"1.0.0","name":"podman","plugins":[{"type":"bridge","bridge":"cni-podman0","ipam":{"type":"host-local","subnet":"10.88.0.0/16"}}]}"#;
const READINESS_PORT: u16 = 18000;

fn readyz(netns: &Path) -> Option<(u16, String)> {
    meshcni_netx::run_in_netns(netns, || {
        let mut s = TcpStream::connect(("127.0.0.1", READINESS_PORT)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split(' ').nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    })
    .expect("enter the agent's netns")
}

#[test]
fn pod_metadata_dir_is_installed_without_a_service_account() {
    let netns = meshcni_testkit::Netns::new("nok8s").expect("private netns");
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path();
    for d in ["net.d", "image", "bin", "run"] {
        fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    fs::write(r.join("net.d/87-podman.conflist"), PRIMARY).expect("primary");
    fs::write(r.join("image/meshcni"), b"\x7fELF stand-in").expect("plugin");
    let p = |rel: &str| r.join(rel).display().to_string();
    let log = r.join("agent.log");
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.path().display()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("POD_METADATA_DIR", "/var/lib/meshcni/pods")
        .env("POD_METADATA_DEFAULT_NAMESPACE", "demo")
        .args([
            format!("--mounted-cni-net-dir={}", p("net.d")),
            format!("--cni-net-dir={}", p("net.d")),
            format!("--cni-bin-dir={}", p("image")),
            format!("--cni-bin-dirs={}", p("bin")),
            format!("--cni-agent-run-dir={}", p("run")),
            // No service account anywhere.
            format!("--service-account-dir={}", p("no-such-sa")),
            format!("--uninstall-marker-file={}", p("marker")),
            "--listen-address=127.0.0.1".into(),
            format!("--readiness-port={READINESS_PORT}"),
            "--monitoring-port=0".into(),
            "--log-level=info".into(),
        ])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn meshcni-agent");
    let log_text = || fs::read_to_string(&log).unwrap_or_default();

    let t = Instant::now();
    loop {
        if let Some((200, _)) = readyz(netns.path()) {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("agent exited ({st}):\n{}", log_text());
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!(
                "not ready without a service account: {:?}\n{}",
                readyz(netns.path()),
                log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let conf: serde_json::Value =
        serde_json::from_slice(&fs::read(r.join("net.d/87-podman.conflist")).expect("conflist"))
            .expect("json");
    let ours = conf["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .find(|p| p["type"] == "meshcni")
        .unwrap_or_else(|| panic!("our entry chained into the primary: {conf}"));
    assert_eq!(ours["pod_metadata_dir"], "/var/lib/meshcni/pods", "{ours}");
    assert_eq!(ours["pod_metadata_default_namespace"], "demo", "{ours}");
    assert!(
        !r.join("run/meshcni-kubeconfig").exists(),
        "no kubeconfig without Kubernetes"
    );
    assert!(r.join("bin/meshcni").exists(), "plugin binary installed");

    kill(
        Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let st = child.wait().expect("wait");
    assert!(st.success(), "agent exit {st}:\n{}", log_text());
}

/// The whole operator flow on a podman host: `meshcni-agent` (as the installer, no Kubernetes)
/// chains the real `meshcni` plugin into podman's CNI network, and a container started by
/// podman 4.3 (CNI backend, `K8S_POD_NAME` only) whose metadata file says "sidecar-injected" is
/// captured: an outbound connection from inside it lands on its `:15001`.
///
/// Isolation as in `crates/plugin/tests/podman.rs`: private containers.conf, storage and
/// runroot, a busybox rootfs instead of an image, podman and the agent inside a node netns.
/// Lazily unmounts every mount below a directory (deepest first) when dropped.
struct UnmountUnder(std::path::PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
            return;
        };
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| Path::new(m).starts_with(&self.0))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = std::process::Command::new("umount")
                .args(["-l", m])
                .status();
        }
    }
}

#[test]
fn agent_installs_into_podman_and_podman_captures() {
    let missing: Vec<&str> = ["podman", "runc", "conmon", "nsenter", "umount"]
        .into_iter()
        .filter(|t| {
            !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .any(|d| d.join(t).is_file())
        })
        .collect();
    assert!(
        missing.is_empty() && Path::new("/bin/busybox").exists(),
        "missing {missing:?} or /bin/busybox: run scripts/setup.sh as root"
    );
    let plugin = Path::new(env!("CARGO_BIN_EXE_meshcni-agent")).with_file_name("meshcni");
    assert!(
        plugin.exists(),
        "{} not built (cargo build -p meshcni-plugin)",
        plugin.display()
    );
    let node = meshcni_testkit::Netns::new("podagent").expect("node netns");
    let tmp = tempfile::Builder::new()
        .prefix("mcni-podagent-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    // Dropped before `tmp`: podman's storage leaves its overlay dir mounted, which made the
    // temp dir's removal fail silently (left in /var/tmp).
    let _unmount = UnmountUnder(tmp.path().to_path_buf());
    let r = tmp.path();
    for d in [
        "net.d",
        "image",
        "bin",
        "run",
        "ipam",
        "meta/pods/default",
        "storage",
        "runroot",
        "tmp",
    ] {
        fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    let p = |rel: &str| r.join(rel).display().to_string();
    let net = format!("mcni-{}-podagent", std::process::id());
    let primary = serde_json::json!({
        "cniVersion": "1.0.0", "name": net,
        "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "dataDir": p("ipam"),
                     "ranges": [[{"subnet": "10.250.13.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]
    });
    fs::write(r.join("net.d/87-podman.conflist"), primary.to_string()).expect("primary");
    fs::copy(&plugin, r.join("image/meshcni")).expect("plugin into the image dir");
    // Sidecar-injected pod "web" in the default namespace (podman passes no namespace).
    fs::write(
        r.join("meta/pods/default/web.json"),
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default",
                "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"}},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy",
                "args": ["proxy", "sidecar"],
                "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}]}})
        .to_string(),
    )
    .expect("metadata");

    let log = r.join("agent.log");
    let mut agent = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args([
            format!("--mounted-cni-net-dir={}", p("net.d")),
            format!("--cni-net-dir={}", p("net.d")),
            format!("--cni-bin-dir={}", p("image")),
            format!("--cni-bin-dirs={}", p("bin")),
            format!("--cni-agent-run-dir={}", p("run")),
            format!("--service-account-dir={}", p("no-such-sa")),
            format!("--uninstall-marker-file={}", p("marker")),
            format!("--pod-metadata-dir={}", p("meta")),
            "--listen-address=127.0.0.1".into(),
            format!("--readiness-port={READINESS_PORT}"),
            "--monitoring-port=0".into(),
            "--log-level=debug".into(),
        ])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn meshcni-agent");
    let t = Instant::now();
    while !matches!(readyz(node.path()), Some((200, _))) {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = agent.kill();
            panic!(
                "agent not ready:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // podman, configured privately, inside the node netns.
    let rootfs = r.join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
        fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
    }
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
    for a in ["sh", "nc", "sleep", "cat", "echo", "netstat", "grep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).expect("applet");
    }
    fs::write(
        r.join("containers.conf"),
        format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n\
             network_config_dir = \"{}\"\ndefault_network = \"{net}\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
            p("bin"),
            p("net.d")
        ),
    )
    .expect("containers.conf");
    let runc_root_existed = Path::new("/run/runc").exists();
    let podman = |args: &[&str]| {
        Command::new("nsenter")
            .arg(format!("--net={}", node.path().display()))
            .arg("--")
            .arg("podman")
            .args([
                "--root",
                &p("storage"),
                "--runroot",
                &p("runroot"),
                "--tmpdir",
                &p("tmp"),
            ])
            .args(args)
            .env("CONTAINERS_CONF", r.join("containers.conf"))
            .stdin(Stdio::null())
            .output()
            .expect("run podman")
    };
    let rootfs_s = rootfs.display().to_string();
    let started = podman(&[
        "run",
        "-d",
        "--name",
        "web",
        "--rootfs",
        &rootfs_s,
        "/bin/sleep",
        "600",
    ]);
    let probe = podman(&[
        "exec",
        "web",
        "/bin/sh",
        "-c",
        // Connect once the listener is up (it may start late under load).
        "nc -l -p 15001 > /tmp/got & \
         i=0; while [ $i -lt 50 ] && ! netstat -ltn | grep -q ':15001 '; do sleep 0.1; i=$((i+1)); done; \
         echo hello-mesh | nc -w 2 10.250.13.1 9; echo rc=$?; \
         i=0; while [ $i -lt 20 ] && [ ! -s /tmp/got ]; do sleep 0.1; i=$((i+1)); done; \
         echo got=$(cat /tmp/got)",
    ]);
    // Clean up podman before asserting.
    let _ = podman(&["rm", "-a", "-f", "-t", "0"]);
    let prefix = format!("{}/", r.display());
    let mut mounts: Vec<String> = fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(String::from)
        .collect();
    mounts.sort_by(|a, b| b.cmp(a));
    for m in mounts {
        let _ = Command::new("umount").args(["-l", &m]).status();
    }
    if !runc_root_existed {
        let _ = fs::remove_dir("/run/runc");
    }
    let _ = kill(
        Pid::from_raw(i32::try_from(agent.id()).expect("pid")),
        Signal::SIGTERM,
    );
    let _ = agent.wait();

    assert!(
        started.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let seen = String::from_utf8_lossy(&probe.stdout);
    assert!(
        seen.contains("rc=0") && seen.contains("got=hello-mesh"),
        "the container started through the agent-installed chain must be captured:\n{seen}\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}
