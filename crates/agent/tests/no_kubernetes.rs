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
