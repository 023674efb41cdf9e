//! End-to-end tests of the `meshcni-agent` binary on temp dirs standing in for the host:
//! readiness after install, metrics (installer counters and plugin reports), SIGTERM leaving the
//! plugin installed, the uninstall paths removing every file of ours, a missing service-account
//! token keeping readiness false with a clear log line, and the idle footprint.
//!
//! Every agent runs inside a network namespace of its own (created per test, `nsenter --net`),
//! and the HTTP probes enter it too: with ambient on the agent runs the iptables redirect mode
//! (the only one built), which programs the namespace it runs in — never the host's.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const PRIMARY: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "bridge": "cni0",
      "ipam": {
        "subnet": "10.22.0.0/16",
        "type": "host-local"
      },
      "type": "bridge"
    }
  ]
}
"#;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio")
        .join(rel)
}

/// Ambient on, with the redirect mode this build has a driver for.
const AMBIENT: [&str; 2] = ["--ambient-enabled", "--ambient-redirect-mode=iptables"];

/// Temp dirs standing in for the node, and the node's (private) network namespace.
struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    netns: meshcni_testkit::Netns,
}

impl Node {
    fn new(with_token: bool) -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let netns = meshcni_testkit::Netns::new("agent").expect("private netns for the agent");
        let n = Node {
            _tmp: tmp,
            root,
            netns,
        };
        for d in [
            "host/etc/cni/net.d",
            "host/opt/cni/bin",
            "image/opt/cni/bin",
            "sa",
            "lifecycle",
        ] {
            fs::create_dir_all(n.root.join(d)).expect("mkdir");
        }
        fs::write(n.net_dir().join("10-bridge.conflist"), PRIMARY).expect("primary");
        // An unrelated plugin that must survive everything.
        fs::write(n.bin_dir().join("bridge"), b"not ours").expect("bridge");
        fs::write(
            n.root.join("image/opt/cni/bin/meshcni"),
            b"\x7fELF meshcni stand-in",
        )
        .expect("src");
        fs::copy(fixture("install/kube-ca.crt"), n.root.join("sa/ca.crt")).expect("ca");
        if with_token {
            n.write_token();
        }
        n
    }
    fn write_token(&self) {
        fs::copy(fixture("install/token-foo"), self.root.join("sa/token")).expect("token");
    }
    fn net_dir(&self) -> PathBuf {
        self.root.join("host/etc/cni/net.d")
    }
    fn bin_dir(&self) -> PathBuf {
        self.root.join("host/opt/cni/bin")
    }
    fn run_dir(&self) -> PathBuf {
        self.root.join("run/meshcni")
    }
    fn ambient_dir(&self) -> PathBuf {
        self.root.join("etc/ambient-config")
    }
    fn marker(&self) -> PathBuf {
        self.root.join("lifecycle/uninstall")
    }
    fn log(&self) -> PathBuf {
        self.root.join("agent.log")
    }

    /// Every file under the host-side dirs, with content.
    fn host_files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for d in ["host", "run", "etc"] {
            walk(&self.root.join(d), &self.root, &mut out);
        }
        out
    }

    fn args(&self) -> Vec<String> {
        let p = |p: PathBuf| p.to_string_lossy().into_owned();
        vec![
            format!("--mounted-cni-net-dir={}", p(self.net_dir())),
            format!("--cni-bin-dir={}", p(self.root.join("image/opt/cni/bin"))),
            format!("--cni-bin-dirs={}", p(self.bin_dir())),
            format!("--service-account-dir={}", p(self.root.join("sa"))),
            format!("--cni-agent-run-dir={}", p(self.run_dir())),
            format!("--ambient-config-dir={}", p(self.ambient_dir())),
            format!("--uninstall-marker-file={}", p(self.marker())),
            "--listen-address=127.0.0.1".into(),
            "--log-level=info".into(),
        ]
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let readiness = free_port();
        let monitoring = free_port();
        let log = fs::File::create(self.log()).expect("log file");
        let child = self
            .command()
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            // Only rendered into the plugin kubeconfig: these tests have no API server, and an
            // agent with ambient on must never reach out to one (loopback, nothing listens).
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", "1")
            .args(self.args())
            .arg(format!("--readiness-port={readiness}"))
            .arg(format!("--monitoring-port={monitoring}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn meshcni-agent");
        Agent {
            child,
            readiness,
            monitoring,
            log: self.log(),
            netns: self.netns.path().to_path_buf(),
        }
    }

    /// `meshcni-agent` inside the node's network namespace.
    fn command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns.path().display()))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_meshcni-agent"));
        c
    }

    fn assert_installed(&self) {
        assert!(
            self.bin_dir().join("meshcni").exists(),
            "plugin binary missing"
        );
        let conf: serde_json::Value = serde_json::from_slice(
            &fs::read(self.net_dir().join("10-bridge.conflist")).expect("conflist"),
        )
        .expect("json");
        let types: Vec<_> = conf["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .map(|p| p["type"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(types, ["bridge", "meshcni"], "our entry is chained last");
        assert!(
            self.run_dir().join("meshcni-kubeconfig").exists(),
            "kubeconfig missing"
        );
    }

    /// The node is back to its initial state: exactly the files we started with.
    fn assert_pristine(&self) {
        let files = self.host_files();
        let names: Vec<_> = files.keys().cloned().collect();
        assert_eq!(
            names,
            [
                "host/etc/cni/net.d/10-bridge.conflist",
                "host/opt/cni/bin/bridge"
            ],
            "files of ours left behind"
        );
        let now: serde_json::Value =
            serde_json::from_slice(&files["host/etc/cni/net.d/10-bridge.conflist"]).expect("json");
        let was: serde_json::Value = serde_json::from_str(PRIMARY).expect("json");
        assert_eq!(now, was, "primary config not restored");
        assert_eq!(files["host/opt/cni/bin/bridge"], b"not ours");
        assert!(!self.run_dir().exists(), "empty run dir left behind");
    }
}

fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.expect("entry").path();
        let meta = fs::symlink_metadata(&p).expect("meta");
        if meta.is_dir() {
            walk(&p, root, out);
        } else {
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            out.insert(rel, fs::read(&p).unwrap_or_default());
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Agent {
    child: Child,
    readiness: u16,
    monitoring: u16,
    log: PathBuf,
    netns: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }
    /// `GET path` on the agent's port, from inside its network namespace.
    fn get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        meshcni_netx::run_in_netns(&self.netns, || Self::get_here(port, path))
            .expect("enter the agent's netns")
    }
    fn get_here(port: u16, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split(' ').nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((code, body))
    }
    fn readyz(&self) -> Option<(u16, String)> {
        self.get(self.readiness, "/readyz")
    }
    fn metrics(&self) -> String {
        self.get(self.monitoring, "/metrics")
            .expect("GET /metrics")
            .1
    }
    fn wait_ready(&mut self, within: Duration) {
        let t = Instant::now();
        loop {
            if let Some((200, _)) = self.readyz() {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("agent exited early ({st}); log:\n{}", self.log_text());
            }
            assert!(
                t.elapsed() < within,
                "not ready within {within:?}: {:?}\nlog:\n{}",
                self.readyz(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// With ambient on but no ztunnel / reachable workload source on this test node, every gate
    /// opens except `redirect-mode`, which says why (ambient enrollment, §3.2).
    fn wait_ready_except_enrollment(&mut self, within: Duration) {
        let t = Instant::now();
        loop {
            if let Some((503, body)) = self.readyz()
                && body.starts_with("not ready: redirect-mode (")
                && !body.contains("), ")
            {
                assert!(!body.contains("has no driver"), "{body}");
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("agent exited early ({st}); log:\n{}", self.log_text());
            }
            assert!(
                t.elapsed() < within,
                "not ready within {within:?}: {:?}\nlog:\n{}",
                self.readyz(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// SIGTERM and wait for a clean exit.
    fn terminate(mut self) -> String {
        kill(Pid::from_raw(self.pid()), Signal::SIGTERM).expect("SIGTERM");
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                assert!(
                    st.success(),
                    "agent exited with {st}; log:\n{}",
                    self.log_text()
                );
                return self.log_text();
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "agent did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `metric{labels} value` → value.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn becomes_ready_serves_metrics_and_sigterm_leaves_the_plugin() {
    let node = Node::new(true);
    let mut agent = node.agent(&AMBIENT);
    assert!(
        !matches!(agent.readyz(), Some((200, _))),
        "must not be ready before installing"
    );
    agent.wait_ready_except_enrollment(Duration::from_secs(20));
    node.assert_installed();
    assert_eq!(
        agent.get(agent.readiness, "/healthz").map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        fs::read_to_string(node.ambient_dir().join("config.json")).expect("ambient config"),
        r#"{"ztunnelReady":false,"redirectMode":"iptables"}"#
    );

    let m = agent.metrics();
    assert!(metric(&m, "meshcni_install_events_total{result=\"success\"}").expect(&m) >= 1.0);
    assert!(metric(&m, "istio_cni_installs_total{result=\"SUCCESS\"}").expect(&m) >= 1.0);
    assert_eq!(metric(&m, "meshcni_install_ready"), Some(1.0));
    assert_eq!(metric(&m, "meshcni_config_reinserts_total"), Some(0.0));
    assert_eq!(metric(&m, "meshcni_enrolled_pods"), Some(0.0));

    // A plugin report arrives through the datagram socket.
    assert!(meshcni_agent::plugin_report::send_report(
        &node.run_dir(),
        "ADD",
        "success",
        0.0042
    ));
    assert!(meshcni_agent::plugin_report::send_report(
        &node.run_dir(),
        "DEL",
        "error",
        0.2
    ));
    let t = Instant::now();
    let m = loop {
        let m = agent.metrics();
        if metric(
            &m,
            "meshcni_cni_requests_total{command=\"DEL\",result=\"error\"}",
        )
        .is_some()
        {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "plugin report not counted:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        metric(
            &m,
            "meshcni_cni_requests_total{command=\"ADD\",result=\"success\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "meshcni_cni_request_duration_seconds_count{command=\"ADD\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "meshcni_cni_request_duration_seconds_bucket{le=\"0.005\",command=\"ADD\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "meshcni_cni_request_duration_seconds_bucket{le=\"0.1\",command=\"DEL\"}"
        ),
        Some(0.0)
    );

    // The keeper puts our entry back when the primary CNI rewrites its config.
    fs::write(node.net_dir().join("10-bridge.conflist"), PRIMARY).expect("rewrite");
    let t = Instant::now();
    while metric(&agent.metrics(), "meshcni_config_reinserts_total") != Some(1.0) {
        assert!(t.elapsed() < Duration::from_secs(10), "no reinsert counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    node.assert_installed();

    let log = agent.terminate();
    assert!(log.contains("leaving the CNI plugin installed"), "{log}");
    node.assert_installed();
    assert!(
        node.ambient_dir().join("config.json").exists(),
        "ambient config kept on upgrade"
    );
    assert!(
        !node.run_dir().join("metrics.sock").exists(),
        "socket removed on exit"
    );
}

#[test]
fn uninstall_marker_makes_sigterm_remove_everything() {
    let node = Node::new(true);
    let mut agent = node.agent(&AMBIENT);
    agent.wait_ready_except_enrollment(Duration::from_secs(20));
    node.assert_installed();
    // "false" (the chart's initial value) is not an uninstall signal …
    fs::write(node.marker(), "false\n").expect("marker");
    // … but the hook's "true" is, read at shutdown time.
    fs::write(node.marker(), "true\n").expect("marker");
    let log = agent.terminate();
    assert!(log.contains("uninstalling the CNI plugin"), "{log}");
    node.assert_pristine();
}

#[test]
fn uninstall_on_exit_flag_removes_everything() {
    let node = Node::new(true);
    let mut agent = node.agent(&["--uninstall-on-exit"]);
    agent.wait_ready(Duration::from_secs(20));
    agent.terminate();
    node.assert_pristine();
}

#[test]
fn uninstall_subcommand_removes_what_a_stopped_agent_left() {
    let node = Node::new(true);
    let mut agent = node.agent(&AMBIENT);
    agent.wait_ready_except_enrollment(Duration::from_secs(20));
    assert_eq!(
        fs::read_to_string(node.ambient_dir().join("config.json")).expect("ambient config"),
        r#"{"ztunnelReady":false,"redirectMode":"iptables"}"#
    );
    agent.terminate();
    node.assert_installed();
    let out = node
        .command()
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(node.args())
        .args(AMBIENT)
        .arg("uninstall")
        .output()
        .expect("run uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.assert_pristine();
}

#[test]
fn missing_token_keeps_readiness_false_with_a_clear_log_line() {
    let node = Node::new(false);
    let agent = node.agent(&[]);
    let t = Instant::now();
    // Give the installer a few passes.
    while t.elapsed() < Duration::from_secs(3) {
        if let Some((code, _)) = agent.readyz() {
            assert_eq!(code, 503, "ready without a service-account token");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = agent.readyz().expect("readyz");
    assert_eq!(code, 503);
    assert!(body.contains("install"), "{body}");
    assert!(body.contains("token"), "readyz should say why: {body}");
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("token") && (l.contains("ERROR") || l.contains("WARN")))
        .unwrap_or_else(|| panic!("no clear log line about the token:\n{log}"));
    assert!(
        line.contains(&node.root.join("sa").to_string_lossy().into_owned()),
        "{line}"
    );
    assert_eq!(metric(&agent.metrics(), "meshcni_install_ready"), Some(0.0));
    assert!(
        metric(
            &agent.metrics(),
            "meshcni_install_events_total{result=\"create_kubeconfig_failure\"}"
        )
        .expect("counter")
            >= 1.0
    );
    // The token appears (projected volume mounted late): the agent becomes ready by itself.
    node.write_token();
    let mut agent = agent;
    agent.wait_ready(Duration::from_secs(20));
    agent.terminate();
}

#[test]
fn json_logs_are_one_object_per_line() {
    let node = Node::new(true);
    let mut agent = node.agent(&["--log-format=json"]);
    agent.wait_ready(Duration::from_secs(20));
    let log = agent.terminate();
    let mut n = 0;
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
        n += 1;
    }
    assert!(n >= 2, "expected start and stop lines:\n{log}");
}

/// Idle footprint: RSS and CPU after a few seconds idle. Bounds are generous for debug builds;
/// the numbers are printed for the report (`cargo test -- --nocapture`).
#[test]
fn idle_footprint() {
    let node = Node::new(true);
    let mut agent = node.agent(&AMBIENT);
    agent.wait_ready_except_enrollment(Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(2));
    let ticks = |pid: i32| -> u64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after = stat.rsplit_once(") ").expect("comm").1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime, stime are fields 14 and 15 (1-based) = index 11, 12 after the comm.
        f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
    };
    let pid = agent.pid();
    let t0 = ticks(pid);
    let idle = Duration::from_secs(5);
    std::thread::sleep(idle);
    let cpu_ticks = ticks(pid) - t0;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let threads: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads");
    let hz = 100.0; // USER_HZ on Linux
    let cpu_pct = cpu_ticks as f64 / hz / idle.as_secs_f64() * 100.0;
    println!("idle: VmRSS {rss_kib} KiB, threads {threads}, CPU {cpu_pct:.2}% over {idle:?}");
    assert!(rss_kib < 64 * 1024, "idle RSS {rss_kib} KiB");
    assert!(cpu_pct < 5.0, "idle CPU {cpu_pct:.2}%");
    agent.terminate();
}

/// Issue 7 item 4: the primary rewrites its config without our entry (and the plugin binary
/// and kubeconfig get damaged) just as the agent is told to stop for an upgrade. The changes
/// are made so that the keeper gets no file event for them (in-place writes through hard links
/// outside the watched directories; the kubeconfig's run dir is not watched), which is what a
/// rewrite racing with the keeper's stop looks like: only the final verify-and-reinsert pass
/// can put them back.
#[test]
fn sigterm_right_after_the_primary_dropped_our_entry_leaves_the_plugin_installed() {
    let node = Node::new(true);
    let mut agent = node.agent(&[]);
    agent.wait_ready(Duration::from_secs(20));
    node.assert_installed();
    let in_place = |target: &Path, link: &str, content: &[u8]| {
        let link = node.root.join(link);
        fs::hard_link(target, &link).expect("hard link");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&link)
            .expect("open through the link");
        f.write_all(content).expect("write in place");
    };
    in_place(
        &node.net_dir().join("10-bridge.conflist"),
        "conflist-link",
        PRIMARY.as_bytes(),
    );
    in_place(&node.bin_dir().join("meshcni"), "bin-link", b"damaged");
    fs::remove_file(node.run_dir().join("meshcni-kubeconfig")).expect("rm kubeconfig");
    let log = agent.terminate();
    assert!(log.contains("leaving the CNI plugin installed"), "{log}");
    node.assert_installed();
    assert_eq!(
        fs::read(node.bin_dir().join("meshcni")).expect("binary"),
        b"\x7fELF meshcni stand-in",
        "damaged plugin binary left behind"
    );
    for part in ["CNI config entry", "plugin binary", "kubeconfig"] {
        assert!(
            log.lines().any(
                |l| l.contains("final check: was missing or changed; put back") && l.contains(part)
            ),
            "no log line about putting back the {part}:\n{log}"
        );
    }
    assert!(
        log.contains("final check done: the CNI plugin is installed"),
        "{log}"
    );
}

/// Issue 7 item 3: `/readyz` and `meshcni_install_ready` say "our entry is not in the file"
/// within 100 ms, also while the keeper waits for the primary's file to come back, and the
/// re-insert latency metric covers the whole time the entry was missing.
#[test]
fn readiness_closes_within_100ms_when_our_entry_goes_and_latency_covers_the_gap() {
    let node = Node::new(true);
    let mut agent = node.agent(&[]);
    agent.wait_ready(Duration::from_secs(20));
    let conf = node.net_dir().join("10-bridge.conflist");
    let t0 = Instant::now();
    fs::remove_file(&conf).expect("the primary deletes its config");
    loop {
        if let Some((503, body)) = agent.readyz() {
            assert!(body.contains("install"), "{body}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "/readyz still 200 {:?} after our entry went away",
            t0.elapsed()
        );
    }
    println!("/readyz closed {:?} after the removal", t0.elapsed());
    assert_eq!(metric(&agent.metrics(), "meshcni_install_ready"), Some(0.0));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        agent.readyz().map(|r| r.0),
        Some(503),
        "ready while the config file is missing"
    );
    let missing_for = t0.elapsed();
    fs::write(&conf, PRIMARY).expect("the primary writes its config again");
    agent.wait_ready(Duration::from_secs(5));
    let gap = t0.elapsed();
    node.assert_installed();
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshcni_install_ready"), Some(1.0));
    assert_eq!(
        metric(&m, "meshcni_config_reinserts_total"),
        Some(1.0),
        "{m}"
    );
    let lat = metric(&m, "meshcni_config_reinsert_latency_seconds").expect(&m);
    assert!(
        lat >= missing_for.as_secs_f64() && lat <= gap.as_secs_f64(),
        "re-insert latency {lat} s does not cover the removal ({missing_for:?} missing, ready again after {gap:?})"
    );
    agent.terminate();
}

/// A primary conflist as an operator writes it: key order, tabs, CRLF, no final newline,
/// characters and numbers a re-rendering would change.
const HAND_WRITTEN: &str = "{\n    \"name\":\"k8s-pod-network\",\n\t\"cniVersion\" : \"0.3.1\",\r\n    \"plugins\": [\n        { \"type\": \"bridge\", \"bridge\": \"cni0\", \"mtu\": 1.5e3,\n          \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.22.0.0/16\"}, \"note\": \"<&>\" },\n\t{\"type\":\"portmap\",\"capabilities\":{\"portMappings\":true}}\n    ]\n}";

/// Issue 7 item 5: uninstall gives back the operator's conflist byte for byte.
#[test]
fn uninstall_gives_back_a_hand_written_primary_byte_for_byte() {
    let node = Node::new(true);
    let conf = node.net_dir().join("10-bridge.conflist");
    fs::write(&conf, HAND_WRITTEN).expect("hand-written primary");
    let mut agent = node.agent(&["--uninstall-on-exit"]);
    agent.wait_ready(Duration::from_secs(20));
    assert_ne!(fs::read_to_string(&conf).expect("read"), HAND_WRITTEN);
    agent.terminate();
    let files = node.host_files();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        [
            "host/etc/cni/net.d/10-bridge.conflist",
            "host/opt/cni/bin/bridge"
        ]
    );
    assert_eq!(
        String::from_utf8_lossy(&files["host/etc/cni/net.d/10-bridge.conflist"]),
        HAND_WRITTEN
    );
    assert!(!node.run_dir().exists(), "run dir left behind");
}

/// Issue 7 item 5: a `.conf` primary that the install turned into a `.conflist` is a `.conf`
/// again after `meshcni-agent uninstall` (another process than the agent that installed).
#[test]
fn uninstall_subcommand_turns_a_converted_conf_back() {
    let node = Node::new(true);
    fs::remove_file(node.net_dir().join("10-bridge.conflist")).expect("rm");
    let conf = node.net_dir().join("10-bridge.conf");
    let single = "{\"cniVersion\": \"0.4.0\", \"name\": \"bridge-net\",\n  \"type\": \"bridge\", \"bridge\": \"cni0\",\n  \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.22.0.0/16\"}}\n\n";
    fs::write(&conf, single).expect("conf primary");
    let mut agent = node.agent(&[]);
    agent.wait_ready(Duration::from_secs(20));
    assert!(!conf.exists(), "converted to a .conflist on install");
    node.assert_installed();
    agent.terminate();
    let out = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .args(node.args())
        .arg("uninstall")
        .output()
        .expect("run uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = node.host_files();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        [
            "host/etc/cni/net.d/10-bridge.conf",
            "host/opt/cni/bin/bridge"
        ]
    );
    assert_eq!(
        String::from_utf8_lossy(&files["host/etc/cni/net.d/10-bridge.conf"]),
        single
    );
    assert!(!node.run_dir().exists(), "run dir left behind");
}

// ---- `kubectl delete -f` without the hook: the --daemonset-name shutdown check ----

const DS_PATH: &str = "/apis/apps/v1/namespaces/kube-system/daemonsets/meshcni-node";

/// A fake API server listening inside a netns; stopped from inside it (its `Drop` wakes its
/// `accept()` by connecting to its loopback address, which exists only there).
struct NetnsApi {
    server: Option<meshcni_testkit::kube_api::FakeApiServer>,
    netns: PathBuf,
}

impl std::ops::Deref for NetnsApi {
    type Target = meshcni_testkit::kube_api::FakeApiServer;
    fn deref(&self) -> &Self::Target {
        self.server.as_ref().expect("running")
    }
}

impl Drop for NetnsApi {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = meshcni_netx::run_in_netns(&self.netns, move || drop(s));
        }
    }
}

/// A fake API server inside the node's netns answering the DaemonSet GET with `answer` (every
/// other path 404).
fn ds_api(node: &Node, answer: meshcni_testkit::kube_api::FakeResponse) -> NetnsApi {
    use meshcni_testkit::kube_api::{FakeApiServer, FakeRequest, FakeResponse};
    let server = meshcni_netx::run_in_netns(node.netns.path(), move || {
        FakeApiServer::start(move |r: &FakeRequest| {
            if r.method == "GET" && r.path == DS_PATH {
                answer.clone()
            } else {
                FakeResponse::not_found("things", &r.path)
            }
        })
    })
    .expect("enter the node's netns")
    .expect("fake API server");
    NetnsApi {
        server: Some(server),
        netns: node.netns.path().to_path_buf(),
    }
}

/// The check's flags against `port` (plain HTTP on the netns' loopback).
fn ds_check_args(port: u16) -> Vec<String> {
    vec![
        "--daemonset-name=meshcni-node".into(),
        "--pod-namespace=kube-system".into(),
        "--kubernetes-service-protocol=http".into(),
        format!("--kubernetes-service-port={port}"),
    ]
}

fn daemonset(deleting: bool) -> String {
    let ts = if deleting {
        r#","deletionTimestamp":"2026-12-06T18:00:00Z""#
    } else {
        ""
    };
    format!(
        r#"{{"kind":"DaemonSet","apiVersion":"apps/v1","metadata":{{"name":"meshcni-node","namespace":"kube-system"{ts}}}}}"#
    )
}

/// Start with the check on, stop with SIGTERM; the log.
fn run_and_stop(node: &Node, port: u16) -> String {
    let args = ds_check_args(port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = node.agent(&args);
    agent.wait_ready(Duration::from_secs(20));
    node.assert_installed();
    agent.terminate()
}

/// Uninstalled, and the primary's conflist is the very bytes it was before the install.
fn assert_removed_byte_for_byte(node: &Node, log: &str) {
    assert!(log.contains("uninstalling the CNI plugin"), "{log}");
    node.assert_pristine();
    assert_eq!(
        fs::read(node.net_dir().join("10-bridge.conflist")).expect("conflist"),
        PRIMARY.as_bytes(),
        "conflist not byte-identical to before the install"
    );
}

#[test]
fn sigterm_with_the_daemonset_gone_removes_the_plugin() {
    use meshcni_testkit::kube_api::FakeResponse;
    let node = Node::new(true);
    let api = ds_api(
        &node,
        FakeResponse::not_found("daemonsets.apps", "meshcni-node"),
    );
    let log = run_and_stop(&node, api.addr().port());
    assert!(log.contains("DaemonSet is gone (404)"), "{log}");
    assert_removed_byte_for_byte(&node, &log);
    let reqs = api.requests();
    assert!(
        reqs.iter().any(|r| r.method == "GET"
            && r.path == DS_PATH
            && r.header("authorization") == Some("Bearer foo")),
        "one GET of the DaemonSet with the service-account token: {reqs:?}"
    );
}

#[test]
fn sigterm_with_the_daemonset_being_deleted_removes_the_plugin() {
    use meshcni_testkit::kube_api::FakeResponse;
    let node = Node::new(true);
    let api = ds_api(&node, FakeResponse::ok(daemonset(true)));
    let log = run_and_stop(&node, api.addr().port());
    assert!(log.contains("is being deleted"), "{log}");
    assert_removed_byte_for_byte(&node, &log);
}

#[test]
fn sigterm_with_the_service_account_refused_removes_the_plugin() {
    use meshcni_testkit::kube_api::FakeResponse;
    let node = Node::new(true);
    // `kubectl delete -f` deletes the ServiceAccount before the DaemonSet: the token is dead.
    let api = ds_api(
        &node,
        FakeResponse::status(401, "Unauthorized", "Unauthorized"),
    );
    let log = run_and_stop(&node, api.addr().port());
    assert!(log.contains("refused the agent's service account"), "{log}");
    assert_removed_byte_for_byte(&node, &log);
}

#[test]
fn sigterm_with_the_daemonset_present_leaves_everything() {
    use meshcni_testkit::kube_api::FakeResponse;
    let node = Node::new(true);
    let api = ds_api(&node, FakeResponse::ok(daemonset(false)));
    let before_stop = {
        let args = ds_check_args(api.addr().port());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut agent = node.agent(&args);
        agent.wait_ready(Duration::from_secs(20));
        let files = node.host_files();
        let log = agent.terminate();
        assert!(log.contains("DaemonSet still exists"), "{log}");
        assert!(log.contains("leaving the CNI plugin installed"), "{log}");
        files
    };
    node.assert_installed();
    let mut after = node.host_files();
    after.remove("run/meshcni/metrics.sock");
    let mut before = before_stop;
    before.remove("run/meshcni/metrics.sock");
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        before, after,
        "an upgrade/restart stop changed the node's files"
    );
}

#[test]
fn sigterm_with_the_api_server_down_removes_the_plugin_within_the_budget() {
    let node = Node::new(true);
    // Nothing listens on port 1 in the node's netns; `terminate` requires the exit within 10 s.
    let log = run_and_stop(&node, 1);
    assert!(log.contains("could not be confirmed"), "{log}");
    assert!(log.contains("shutdown check: retrying"), "{log}");
    assert_removed_byte_for_byte(&node, &log);
}

#[test]
fn daemonset_name_needs_the_api_server_and_namespace() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .args(["--daemonset-name=meshcni-node", "check-config"])
        .output()
        .expect("check-config");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--daemonset-name (DAEMONSET_NAME)")
            && err.contains("--kubernetes-service-host (KUBERNETES_SERVICE_HOST)")
            && err.contains("--pod-namespace (POD_NAMESPACE)"),
        "{err}"
    );
}
