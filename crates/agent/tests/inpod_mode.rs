//! The `inpod` redirect driver against real namespaces, the real in-pod rules and a ztunnel
//! stand-in that is a real ZDS client (`testkit::InpodZtunnelStandIn`, its own wire codec):
//! enroll → rules in the pod + probe SNAT on the node + netns handed over and acked → traffic
//! captured; nack / no ztunnel → the action fails naming the cause and the pod is left as it
//! was; release → every trace gone; a new driver on the same state file adopts the pods
//! (netns found again, rules re-verified, snapshot served to a reconnecting ztunnel).
//!
//! Root only; every namespace is the test's own (`mcni-*`), removed on success and failure.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use meshcni_agent::enroll::{NetnsId, PodNetns};
use meshcni_agent::modes::inpod::{InpodDriver, InpodModeConfig};
use meshcni_agent::seam::{Action, DriverEvent, DriverEvents, PodId, RedirectDriver};
use meshcni_testkit::multinode::{EchoServer, open_stream, read_line};
use meshcni_testkit::{InpodZtunnelConfig, InpodZtunnelStandIn, MultiNodeLab, Netns};

const WAIT: Duration = Duration::from_secs(10);

fn netns_id(p: &Path) -> NetnsId {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).expect("stat netns");
    NetnsId {
        dev: m.dev(),
        ino: m.ino(),
    }
}

fn pod_netns(ns: &Netns) -> PodNetns {
    PodNetns {
        path: ns.path().to_path_buf(),
        id: netns_id(ns.path()),
    }
}

struct Rig {
    lab: MultiNodeLab,
    dir: tempfile::TempDir,
    events: mpsc::Receiver<DriverEvent>,
    driver: InpodDriver,
}

fn config(lab: &MultiNodeLab, dir: &Path) -> InpodModeConfig {
    InpodModeConfig {
        zds_socket: dir.join("zds/ztunnel.sock"),
        state_file: dir.join("run/inpod-mode.json"),
        node_netns: lab.node(1).netns.path().to_path_buf(),
        // Discovery only in our own namespaces: a private dir, empty proc root.
        proc_root: dir.join("proc"),
        netns_dirs: vec![dir.join("netns")],
        rules: meshcni_rules::inpod::InpodConfig {
            redirect_dns: false,
            enable_ipv6: false,
            ..Default::default()
        },
        ack_timeout: Duration::from_secs(2),
        // Every `actual()` verifies the node's host-probe rules (the agent: every 10 s at most).
        host_rules_check_interval: Duration::ZERO,
        ..InpodModeConfig::default()
    }
}

fn driver(cfg: InpodModeConfig) -> (InpodDriver, mpsc::Receiver<DriverEvent>) {
    let mut d = InpodDriver::new(cfg).expect("driver");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    d.attach(DriverEvents::new(move |ev| {
        if let Ok(t) = tx.lock() {
            let _ = t.send(ev);
        }
    }));
    (d, rx)
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let lab = MultiNodeLab::new(tag, &[&["app", "web"]]).expect("lab");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("proc dir");
        std::fs::create_dir_all(dir.path().join("netns")).expect("netns dir");
        let (driver, events) = driver(config(&lab, dir.path()));
        Rig {
            lab,
            dir,
            events,
            driver,
        }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("zds/ztunnel.sock")
    }

    fn enroll(&self, name: &str) -> Action {
        let p = self.lab.pod(name);
        Action::Enroll {
            pod: PodId::new(&format!("uid-{name}"), "demo", name),
            ips: vec![IpAddr::V4(p.ip)],
            annotations: BTreeMap::new(),
            service_account: "default".into(),
            netns: Some(pod_netns(&p.netns)),
        }
    }

    fn wait_connected(&self) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(DriverEvent::ZtunnelChanged(Some(_))) => return,
                Ok(_) => continue,
                Err(e) => panic!("no ztunnel connected: {e}"),
            }
        }
    }
}

fn exchange(from: &Netns, to: SocketAddr) -> String {
    let mut s = open_stream(from, to, Duration::from_secs(5)).expect("connect");
    let line = read_line(&mut s).expect("greeting");
    use std::io::Write;
    s.write_all(b"ping\n").expect("write");
    let echo = read_line(&mut s).expect("echo");
    assert_eq!(echo.trim_end(), "ping");
    line
}

/// `iptables-save` without its timestamped comment lines.
fn save(ns: &Netns) -> String {
    ns.exec_ok("iptables-save", &[])
        .expect("iptables-save")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn enroll_captures_traffic_and_release_leaves_nothing() {
    let mut rig = Rig::new("inpod-enroll");
    assert!(rig.driver.actual().expect("actual").pods.is_empty());
    let zt =
        InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(rig.socket())).expect("stand-in");
    rig.wait_connected();
    let app_before = save(&rig.lab.pod("app").netns);

    let web = rig.lab.pod("web");
    let server = EchoServer::start(&web.netns, web.addr(8080)).expect("server");
    rig.driver.apply(&rig.enroll("app")).expect("enroll app");
    let held = zt
        .wait_for_workload("uid-app", WAIT)
        .expect("ztunnel holds app");
    assert_eq!(held.netns, {
        let id = netns_id(rig.lab.pod("app").netns.path());
        (id.dev, id.ino)
    });
    let rules = save(&rig.lab.pod("app").netns);
    assert!(
        rules.contains("ISTIO_OUTPUT") && rules.contains("--to-ports 15001"),
        "{rules}"
    );
    let node = save(&rig.lab.node(1).netns);
    assert!(node.contains("istio-inpod-probes-v4"), "{node}");

    // app → web: captured on 15001 inside app's netns, delivered with app's address.
    let greeting = exchange(&rig.lab.pod("app").netns, server.addr());
    assert!(
        greeting.contains(&format!("peer:{}:", rig.lab.pod("app").ip)),
        "{greeting}"
    );
    let hops = zt.wait_for_hops(1, WAIT).expect("a hop");
    assert_eq!(hops[0].uid, "uid-app");
    assert_eq!(hops[0].listener_port, 15001);
    assert_eq!(hops[0].original_dst, server.addr());

    // The enrolled state reports the pod with its netns.
    let actual = rig.driver.actual().expect("actual");
    assert_eq!(
        actual.pods["uid-app"].netns,
        Some(netns_id(rig.lab.pod("app").netns.path()))
    );

    // Re-applying is a no-op at the dataplane (no duplicate rules).
    rig.driver.apply(&rig.enroll("app")).expect("enroll again");
    assert_eq!(save(&rig.lab.pod("app").netns), rules);

    rig.driver
        .apply(&Action::Release {
            pod: PodId::new("uid-app", "demo", "app"),
            ips: vec![IpAddr::V4(rig.lab.pod("app").ip)],
        })
        .expect("release");
    zt.wait_for_no_workload("uid-app", WAIT)
        .expect("ztunnel dropped app");
    assert_eq!(save(&rig.lab.pod("app").netns), app_before);
    let entries = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            rig.lab.node(1).netns.name(),
            "ipset",
            "list",
            "istio-inpod-probes-v4",
        ])
        .output()
        .expect("ipset");
    let listing = String::from_utf8_lossy(&entries.stdout);
    assert!(
        !listing.contains(&rig.lab.pod("app").ip.to_string()),
        "{listing}"
    );
}

#[test]
fn a_nack_or_no_ztunnel_fails_the_enroll_and_leaves_the_pod_as_it_was() {
    let mut rig = Rig::new("inpod-nack");
    rig.driver.actual().expect("actual");
    let app_before = save(&rig.lab.pod("app").netns);

    // No ztunnel connected at all.
    let e = rig
        .driver
        .apply(&rig.enroll("app"))
        .expect_err("no ztunnel");
    assert!(e.message.contains("ztunnel"), "{e}");
    assert_eq!(save(&rig.lab.pod("app").netns), app_before);

    // ztunnel connected but refuses the pod.
    let zt =
        InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(rig.socket())).expect("stand-in");
    rig.wait_connected();
    zt.nack_uid("uid-app", "no certificate for this workload");
    let e = rig.driver.apply(&rig.enroll("app")).expect_err("nacked");
    assert!(
        e.message.contains("no certificate for this workload"),
        "{e}"
    );
    assert_eq!(save(&rig.lab.pod("app").netns), app_before);
    assert!(rig.driver.actual().expect("actual").pods.is_empty());

    // Accepted once ztunnel takes it.
    zt.clear_nack("uid-app");
    rig.driver.apply(&rig.enroll("app")).expect("enrolled");
    zt.wait_for_workload("uid-app", WAIT).expect("held");
}

#[test]
fn a_restarted_driver_adopts_its_pods_and_serves_them_to_a_reconnecting_ztunnel() {
    let mut rig = Rig::new("inpod-restart");
    rig.driver.actual().expect("actual");
    let zt =
        InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(rig.socket())).expect("stand-in");
    rig.wait_connected();
    rig.driver.apply(&rig.enroll("app")).expect("enroll app");
    rig.driver.apply(&rig.enroll("web")).expect("enroll web");
    let rules = save(&rig.lab.pod("app").netns);
    // The state file is written by `flush` (the loop calls it after each apply, once the
    // ADD waiting for it has its answer), not inside the enrollment.
    let state_file = rig.dir.path().join("run/inpod-mode.json");
    let recorded = || std::fs::read_to_string(&state_file).unwrap_or_default();
    assert!(
        !recorded().contains("uid-app"),
        "written before the pass ended"
    );
    rig.driver
        .flush()
        .expect("after the applies, as the loop does");
    assert!(recorded().contains("uid-app") && recorded().contains("uid-web"));

    // The agent goes away (its socket with it); ztunnel keeps its listeners and reconnects.
    let (d2, events) = driver(config(&rig.lab, rig.dir.path()));
    drop(std::mem::replace(&mut rig.driver, d2));
    rig.events = events;
    let actual = rig.driver.actual().expect("adopt");
    assert_eq!(
        actual.pods.keys().cloned().collect::<Vec<_>>(),
        vec!["uid-app".to_string(), "uid-web".to_string()]
    );
    rig.wait_connected();
    zt.wait_for_snapshot(WAIT).expect("snapshot");
    let adds: Vec<_> = zt
        .requests()
        .into_iter()
        .filter(|r| r.connection == zt.connects())
        .filter_map(|r| r.uid)
        .collect();
    assert!(
        adds.contains(&"uid-app".to_string()) && adds.contains(&"uid-web".to_string()),
        "{adds:?}"
    );
    assert_eq!(save(&rig.lab.pod("app").netns), rules, "no duplicate rules");
}

#[test]
fn uninstall_by_a_fresh_process_removes_every_pods_rules_and_the_probe_snat() {
    let mut rig = Rig::new("inpod-uninst");
    let node_before = save(&rig.lab.node(1).netns);
    let app_before = save(&rig.lab.pod("app").netns);
    rig.driver.actual().expect("actual");
    let zt =
        InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(rig.socket())).expect("stand-in");
    rig.wait_connected();
    rig.driver.apply(&rig.enroll("app")).expect("enroll app");
    rig.driver
        .flush()
        .expect("after the apply, as the loop does");
    assert_ne!(save(&rig.lab.pod("app").netns), app_before);
    drop(zt);
    // The agent stops (upgrade-style: everything stays), then `meshcni-agent uninstall` runs
    // in a new process: a driver that never served.
    let (d2, _events) = driver(config(&rig.lab, rig.dir.path()));
    drop(std::mem::replace(&mut rig.driver, d2));
    rig.driver.uninstall().expect("uninstall");
    assert_eq!(save(&rig.lab.pod("app").netns), app_before);
    assert_eq!(save(&rig.lab.node(1).netns), node_before);
    assert!(!rig.dir.path().join("run/inpod-mode.json").exists());
    assert!(!rig.socket().exists());
}

#[test]
fn one_netns_search_serves_every_enrollment_of_a_pass() {
    let mut rig = Rig::new("inpod-batch");
    rig.driver.actual().expect("actual");
    let zt =
        InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(rig.socket())).expect("stand-in");
    rig.wait_connected();
    // Two running pods enrolled by a label change: no CNI netns, found in --netns-dir.
    let links: Vec<_> = ["app", "web"]
        .iter()
        .map(|name| {
            let link = rig.dir.path().join("netns").join(name);
            std::os::unix::fs::symlink(rig.lab.pod(name).netns.path(), &link).expect("link");
            link
        })
        .collect();
    let actions: Vec<Action> = ["app", "web"]
        .iter()
        .map(|name| match rig.enroll(name) {
            Action::Enroll {
                pod,
                ips,
                annotations,
                service_account,
                ..
            } => Action::Enroll {
                pod,
                ips,
                annotations,
                service_account,
                netns: None,
            },
            other => other,
        })
        .collect();
    rig.driver.prepare(&actions).expect("prepare");
    // The search already happened: with the links gone, a per-pod search would find nothing.
    for l in &links {
        std::fs::remove_file(l).expect("unlink");
    }
    for a in &actions {
        rig.driver
            .apply(a)
            .expect("enrolled from the pass's search");
    }
    for name in ["app", "web"] {
        let held = zt
            .wait_for_workload(&format!("uid-{name}"), WAIT)
            .expect("held");
        let id = netns_id(rig.lab.pod(name).netns.path());
        assert_eq!(held.netns, (id.dev, id.ino), "{name}: its own netns");
    }
}

/// Issue 12 item 5 (d): a third party flushes the node netns's iptables. The host-probe SNAT
/// rule (kubelet probes → the SNAT address every pod's rules accept) must come back at the next
/// resync (`actual()`), with the probe set's members kept. Before the fix the driver ensured
/// the rule only when it first opened the node netns: probes of every ambient pod stayed broken
/// until the agent restarted.
#[test]
fn host_probe_snat_flushed_by_a_third_party_is_restored_on_resync() {
    let mut rig = Rig::new("inpod-flush");
    rig.driver.actual().expect("actual");
    let _zt =
        InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(rig.socket())).expect("stand-in");
    rig.wait_connected();
    rig.driver.apply(&rig.enroll("app")).expect("enroll app");
    rig.driver.flush().expect("flush state");
    let node = &rig.lab.node(1).netns;
    let installed = save(node);
    let sets = node.exec_ok("ipset", &["save"]).expect("ipset save");
    for flavor in ["iptables-nft", "iptables-legacy"] {
        let text = node.exec_ok(&format!("{flavor}-save"), &[]).expect("save");
        if text.contains("-j SNAT") {
            for table in ["nat", "mangle", "filter"] {
                let _ = node.exec_ok(flavor, &["-t", table, "-F"]);
                let _ = node.exec_ok(flavor, &["-t", table, "-X"]);
            }
        }
    }
    let flushed = save(node);
    assert!(
        !flushed.contains("-j SNAT"),
        "flush left the rule:\n{flushed}"
    );
    let actual = rig.driver.actual().expect("resync");
    assert_eq!(actual.len(), 1, "the pod stays enrolled: {actual:?}");
    assert_eq!(
        save(node),
        installed,
        "probe SNAT not restored as installed"
    );
    assert_eq!(
        node.exec_ok("ipset", &["save"]).expect("ipset save"),
        sets,
        "probe set members lost"
    );
}
