//! The `iptables` redirect-mode driver against real network namespaces (root required; the
//! tests fail, never skip, without it). One "node" netns, a "ztunnel" netns and pod netns
//! connected ptp-style (host side `10.244.1.1/32` on every veth, a `/32` route per pod), all
//! created by `meshcni-testkit` with unique names and deleted on drop. The host netns is never
//! touched: the driver is pointed at the lab's node netns.
//!
//! Checked: dataplane state after install/enroll (chains, O(1) rule count, ipset entries with
//! UIDs, routes, tunnels, ztunnel netns TPROXY), agent restart → zero changes, pod release,
//! ztunnel move (with the measured switch window), uninstall → byte-identical node netns,
//! conflict refusal, bad input.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use meshcni_agent::ambient::{Action, ErrorScope, PodId, RedirectDriver, ZtunnelInfo};
use meshcni_agent::modes::iptables::{
    IptablesDriver, IptablesModeConfig, ZTUNNEL_NETNS_ANNOTATION,
};
use meshcni_testkit::{Netns, NetnsSnapshot, veth};

struct NodeLab {
    node: Netns,
    ztunnel: Netns,
    pods: Vec<(Netns, Ipv4Addr, String)>,
    tmp: tempfile::TempDir,
}

const HOST: &str = "10.244.1.1";

/// Plug `ns` into `node` ptp-style: `host_if` (node side) ↔ eth0, pod IP `ip`.
fn plug(node: &Netns, ns: &Netns, host_if: &str, ip: Ipv4Addr) {
    veth(node, host_if, ns, "eth0").expect("veth");
    ns.add_addr("eth0", &format!("{ip}/32")).expect("pod addr");
    ns.ip(&["route", "add", HOST, "dev", "eth0", "scope", "link"])
        .expect("gw route");
    ns.add_default_route(HOST).expect("default route");
    node.add_addr(host_if, &format!("{HOST}/32"))
        .expect("host addr");
    node.ip(&[
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        host_if,
        "scope",
        "link",
    ])
    .expect("pod route");
}

fn lab(pods: usize) -> NodeLab {
    let node = Netns::new("node").expect("node netns");
    node.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
    let ztunnel = Netns::new("zt").expect("ztunnel netns");
    plug(&node, &ztunnel, "vzt", Ipv4Addr::new(10, 244, 1, 5));
    // The operator's values in the ztunnel netns (strict rp_filter): install relaxes them,
    // uninstall must put them back.
    for k in ["all", "default", "eth0"] {
        ztunnel
            .sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "1")
            .expect("ztunnel rp_filter");
    }
    let mut v = Vec::new();
    for i in 0..pods {
        let ns = Netns::new(&format!("pod{i}")).expect("pod netns");
        let ip = Ipv4Addr::new(10, 244, 1, 10 + i as u8);
        plug(&node, &ns, &format!("vp{i}"), ip);
        v.push((ns, ip, format!("uid-{i}")));
    }
    NodeLab {
        node,
        ztunnel,
        pods: v,
        tmp: tempfile::tempdir().expect("tempdir"),
    }
}

/// Full snapshots (see `meshcni_testkit::snapshot`) of the netns a test's driver may touch,
/// taken before the first install.
struct Baseline(Vec<(String, std::path::PathBuf, NetnsSnapshot)>);

impl Baseline {
    fn of(netns: &[&Netns]) -> Baseline {
        Baseline(
            netns
                .iter()
                .map(|n| {
                    let snap = NetnsSnapshot::capture(n.path()).expect("netns snapshot");
                    (n.name().to_string(), n.path().to_path_buf(), snap)
                })
                .collect(),
        )
    }

    /// After uninstall: every netns byte-identical to its baseline.
    fn assert_restored(&self) {
        for (name, path, before) in &self.0 {
            meshcni_testkit::assert_netns_unchanged(
                path,
                before,
                &format!("after uninstall, netns {name}"),
            );
        }
    }
}

impl NodeLab {
    /// Baseline of the node and ztunnel netns (plus `extra`, e.g. a second ztunnel).
    fn baseline(&self, extra: &[&Netns]) -> Baseline {
        let mut all = vec![&self.node, &self.ztunnel];
        all.extend_from_slice(extra);
        Baseline::of(&all)
    }

    fn config(&self) -> IptablesModeConfig {
        IptablesModeConfig {
            node_netns: self.node.path().to_path_buf(),
            netns_dir: self.tmp.path().join("netns"),
            state_file: self.tmp.path().join("state/iptables-mode.json"),
            node_xtables_lock: self.tmp.path().join("xtables.lock"),
            ..IptablesModeConfig::default()
        }
    }

    fn driver(&self) -> IptablesDriver {
        IptablesDriver::new(self.config()).expect("driver")
    }

    fn ztunnel_info(&self, ns: &Netns, ip: &str, explicit: bool) -> ZtunnelInfo {
        let mut annotations = BTreeMap::new();
        if explicit {
            annotations.insert(
                ZTUNNEL_NETNS_ANNOTATION.to_string(),
                ns.path().display().to_string(),
            );
        }
        ZtunnelInfo {
            pod: PodId::new(&format!("zt-{ip}"), "istio-system", "ztunnel"),
            ips: vec![ip.parse().expect("ip")],
            created: "2026-11-26T00:00:00Z".into(),
            annotations,
        }
    }

    fn enroll(&self, i: usize) -> Action {
        let (_, ip, uid) = &self.pods[i];
        Action::Enroll {
            pod: PodId::new(uid, "default", &format!("pod{i}")),
            ips: vec![IpAddr::V4(*ip)],
            annotations: BTreeMap::new(),
            service_account: String::new(),
            netns: None,
        }
    }

    /// Everything the issue asks to compare, plus the sysctls the mode writes.
    fn snapshot(&self) -> String {
        let mut out = String::new();
        for (prog, args) in [
            ("iptables-nft-save", vec![]),
            ("iptables-legacy-save", vec![]),
            ("ip", vec!["rule"]),
            ("ip", vec!["route", "show", "table", "all"]),
            ("ip", vec!["-d", "link"]),
            ("ipset", vec!["list"]),
        ] {
            let text = self.node.exec_ok(prog, &args).expect(prog);
            out.push_str(&format!("## {prog} {}\n", args.join(" ")));
            for l in text.lines().filter(|l| !l.starts_with('#')) {
                out.push_str(l);
                out.push('\n');
            }
        }
        for key in ["all", "default", "vzt", "vp0", "vp1"] {
            for k in ["rp_filter", "accept_local"] {
                let name = format!("net.ipv4.conf.{key}.{k}");
                if let Ok(v) = self.node.read_sysctl(&name) {
                    out.push_str(&format!("{name}={v}\n"));
                }
            }
        }
        out
    }

    /// Both iptables flavors' saves without the timestamped `#` lines.
    fn save(&self, ns: &Netns) -> String {
        let text = ns.exec_ok("iptables-nft-save", &[]).expect("save")
            + &ns
                .exec_ok("iptables-legacy-save", &[])
                .expect("legacy save");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

fn rule_count(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

fn ipset(node: &Netns) -> String {
    node.exec_ok("ipset", &["save", "ztunnel-pods-ips"])
        .expect("ipset save")
}

#[test]
fn install_enroll_restart_release_uninstall_roundtrip() {
    let lab = lab(2);
    // Make rp_filter non-zero so restoring a *previous* value is actually tested.
    lab.node
        .sysctl("net.ipv4.conf.all.rp_filter", "2")
        .expect("rp");
    lab.node
        .sysctl("net.ipv4.conf.vzt.rp_filter", "1")
        .expect("rp");
    let before = lab.snapshot();

    let base = lab.baseline(&[]);
    let mut d = lab.driver();
    assert!(d.actual().expect("actual").is_empty());
    let zt = lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true);
    d.ztunnel_changed(Some(&zt)).expect("install");
    let installed = lab.save(&lab.node);
    assert!(
        installed.contains("-A PREROUTING -j ztunnel-PREROUTING"),
        "{installed}"
    );
    assert!(installed.contains(
        "-i vzt -p tcp -m set --match-set ztunnel-pods-ips dst -m tcp --dport 15008 -j RETURN"
    ));
    let rules_no_pods = rule_count(&installed);

    for i in 0..2 {
        d.apply(&lab.enroll(i)).expect("enroll");
    }
    let set = ipset(&lab.node);
    assert!(
        set.contains("add ztunnel-pods-ips 10.244.1.10 comment \"uid-0\""),
        "{set}"
    );
    assert!(
        set.contains("add ztunnel-pods-ips 10.244.1.11 comment \"uid-1\""),
        "{set}"
    );
    let t100 = lab
        .node
        .ip(&["route", "show", "table", "100"])
        .expect("t100");
    assert!(
        t100.contains("10.244.1.10 via 192.168.126.2 dev istioin src 10.244.1.1"),
        "{t100}"
    );
    assert!(t100.contains("10.244.1.5 dev vzt scope link"), "{t100}");
    assert_eq!(
        rule_count(&lab.save(&lab.node)),
        rules_no_pods,
        "iptables rules are O(1) in pods"
    );
    assert_eq!(
        lab.node
            .read_sysctl("net.ipv4.conf.vp0.rp_filter")
            .expect("rp"),
        "0"
    );

    let rules = lab.node.ip(&["rule"]).expect("rules");
    for want in [
        "100:\tfrom all fwmark 0x200/0x200 goto 32766",
        "101:\tfrom all fwmark 0x100/0x100 lookup 101",
        "102:\tfrom all fwmark 0x40/0x40 lookup 102",
        "103:\tfrom all lookup 100",
    ] {
        assert!(rules.contains(want), "missing `{want}` in\n{rules}");
    }
    let links = lab
        .node
        .ip(&["-d", "link", "show", "istioin"])
        .expect("istioin");
    let kind = if links.contains("geneve") {
        "geneve"
    } else {
        "vxlan"
    };
    assert!(
        links.contains(&format!("{kind} id 1000 remote 10.244.1.5")),
        "{links}"
    );
    // ztunnel side
    let zsave = lab.save(&lab.ztunnel);
    assert!(zsave.contains("-A ztunnel-PREROUTING -i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff"), "{zsave}");
    let zrules = lab.ztunnel.ip(&["rule"]).expect("zt rules");
    assert!(
        zrules.contains("20000:\tfrom all fwmark 0x400/0xfff lookup 100"),
        "{zrules}"
    );
    let zlink = lab
        .ztunnel
        .ip(&["-d", "link", "show", "pistioin"])
        .expect("pistioin");
    assert!(
        zlink.contains(&format!("{kind} id 1000 remote 10.244.1.1")),
        "{zlink}"
    );

    // Agent restart: a fresh driver adopts the state; the same ztunnel → zero changes.
    let state_before_restart = lab.snapshot();
    let zstate = lab.save(&lab.ztunnel);
    drop(d);
    let mut d = lab.driver();
    let actual = d.actual().expect("actual");
    assert_eq!(actual.len(), 2);
    assert_eq!(
        actual.pods["uid-0"].ips,
        vec![IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10))]
    );
    d.ztunnel_changed(Some(&zt)).expect("reconcile");
    assert_eq!(
        lab.snapshot(),
        state_before_restart,
        "reconcile changed the node"
    );
    assert_eq!(
        lab.save(&lab.ztunnel),
        zstate,
        "reconcile changed the ztunnel netns"
    );
    // Idempotent enroll.
    d.apply(&lab.enroll(0)).expect("re-enroll");
    assert_eq!(lab.snapshot(), state_before_restart);

    // ztunnel not ready: fail closed, nothing removed.
    d.ztunnel_changed(None).expect("ztunnel gone");
    assert_eq!(lab.snapshot(), state_before_restart);

    // Release pod 0: its ipset entry and route go.
    d.apply(&Action::Release {
        pod: PodId::new("uid-0", "", ""),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10))],
    })
    .expect("release");
    assert!(!ipset(&lab.node).contains("10.244.1.10"));
    let t100 = lab
        .node
        .ip(&["route", "show", "table", "100"])
        .expect("t100");
    assert!(!t100.contains("10.244.1.10"), "{t100}");
    assert!(t100.contains("10.244.1.11"), "{t100}");

    d.uninstall().expect("uninstall");
    base.assert_restored();
    let after = lab.snapshot();
    assert_eq!(
        after, before,
        "node netns not back to its pre-install state"
    );
    assert!(!lab.config().state_file.exists());
    assert!(
        !lab.save(&lab.ztunnel).contains("ztunnel-"),
        "ztunnel netns chains left"
    );
    assert!(lab.ztunnel.ip(&["link", "show", "pistioin"]).is_err());
}

#[test]
fn ztunnel_move_retargets_without_teardown_and_reports_the_gap() {
    let lab = lab(1);
    // The next ztunnel pod (started later in real life; its netns exists from the start here
    // so that the baseline covers it): new netns, new IP, new veth.
    let zt2 = Netns::new("zt2").expect("zt2");
    plug(&lab.node, &zt2, "vzt2", Ipv4Addr::new(10, 244, 1, 6));
    let base = lab.baseline(&[&zt2]);
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    d.apply(&lab.enroll(0)).expect("enroll");
    let first = d.last_switch();

    // The ztunnel moves to zt2, found by scanning the netns dir.
    let dir = lab.config().netns_dir;
    std::fs::create_dir_all(&dir).expect("netns dir");
    for ns in [&lab.ztunnel, &zt2] {
        std::os::unix::fs::symlink(ns.path(), dir.join(ns.name())).expect("symlink");
    }
    let rules_before = rule_count(&lab.save(&lab.node));
    d.ztunnel_changed(Some(&lab.ztunnel_info(&zt2, "10.244.1.6", false)))
        .expect("move");
    let moved = d.last_switch();
    eprintln!(
        "ztunnel install: total {:?}, switch window {:?}; move: total {:?}, switch window {:?}, tunnels re-created: {}",
        first.total, first.node_switch, moved.total, moved.node_switch, moved.recreated_tunnels
    );
    let save = lab.save(&lab.node);
    assert_eq!(
        rule_count(&save),
        rules_before,
        "no duplicated rule after the move"
    );
    assert!(
        save.contains("! -s 10.244.1.6/32 -i vzt2 -j MARK"),
        "{save}"
    );
    assert!(!save.contains("vzt "), "old veth still referenced:\n{save}");
    let link = lab
        .node
        .ip(&["-d", "link", "show", "istioin"])
        .expect("istioin");
    assert!(link.contains("remote 10.244.1.6"), "{link}");
    let routes = lab
        .node
        .ip(&["route", "show", "table", "all"])
        .expect("routes");
    assert!(
        routes.contains("10.244.1.10 via 192.168.126.2 dev istioin table 100 src 10.244.1.1"),
        "pod route lost:\n{routes}"
    );
    assert!(
        routes.contains("default via 10.244.1.6 dev vzt2 table 102 onlink"),
        "{routes}"
    );
    assert!(
        !routes
            .lines()
            .any(|l| l.contains("dev vzt ") && l.contains("table 10")),
        "stale routes via the old veth:\n{routes}"
    );
    assert!(lab.save(&zt2).contains("TPROXY --on-port 15001"));
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

#[test]
fn foreign_state_is_refused_before_anything_is_installed() {
    let lab = lab(0);
    lab.node
        .ip(&["rule", "add", "priority", "101", "lookup", "200"])
        .expect("foreign rule");
    lab.node
        .exec_ok(
            "iptables-nft",
            &[
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-j",
                "MARK",
                "--set-mark",
                "0x100/0x100",
            ],
        )
        .expect("foreign mark");
    let before = lab.snapshot();
    let base = lab.baseline(&[]);
    let mut d = lab.driver();
    let err = d
        .ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect_err("must refuse");
    assert_eq!(err.scope, ErrorScope::Driver);
    assert!(err.message.contains("priority 101"), "{}", err.message);
    assert!(
        err.message.contains("--set-xmark 0x100/0x100"),
        "{}",
        err.message
    );
    assert_eq!(lab.snapshot(), before, "nothing may be changed on refusal");
    base.assert_restored();
}

#[test]
fn uninstall_on_a_node_this_mode_never_installed_touches_nothing() {
    // Look-alike state of another agent (Istio 1.18–1.20 uses the same chain, ipset and rule
    // names): an uninstall with no state of ours must leave it alone.
    let lab = lab(0);
    lab.node
        .exec_ok(
            "iptables-nft",
            &["-t", "mangle", "-N", "ztunnel-PREROUTING"],
        )
        .expect("foreign chain");
    lab.node
        .exec_ok(
            "iptables-nft",
            &[
                "-t",
                "mangle",
                "-I",
                "PREROUTING",
                "-j",
                "ztunnel-PREROUTING",
            ],
        )
        .expect("foreign jump");
    lab.node
        .ip(&["rule", "add", "priority", "103", "lookup", "100"])
        .expect("foreign rule");
    let before = lab.snapshot();
    let base = lab.baseline(&[]);
    let mut d = lab.driver();
    d.uninstall().expect("uninstall is a no-op");
    assert_eq!(
        lab.snapshot(),
        before,
        "nothing of another agent may be removed"
    );
    base.assert_restored();
}

#[test]
fn bad_input_is_reported_per_pod_or_driver() {
    let lab = lab(1);
    let base = lab.baseline(&[]);
    let mut d = lab.driver();
    // Before any ztunnel: the node state does not exist yet — a per-pod wait, not a driver
    // failure (see `pod_before_ztunnel_waits_per_pod_and_enrolls_when_ztunnel_is_ready`).
    let err = d.apply(&lab.enroll(0)).expect_err("no node state yet");
    assert_eq!(err.scope, ErrorScope::Pod, "{}", err.message);
    assert!(err.message.contains("ztunnel not ready"), "{}", err.message);
    // ztunnel with no route to it.
    let err = d
        .ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.9.9", true)))
        .expect_err("missing ztunnel route");
    assert!(
        err.message.contains("no main-table route to ztunnel"),
        "{}",
        err.message
    );
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    // Pod without a node route (no veth).
    let ghost = Action::Enroll {
        pod: PodId::new("uid-ghost", "default", "ghost"),
        ips: vec!["10.244.1.99".parse().expect("ip")],
        annotations: BTreeMap::new(),
        service_account: String::new(),
        netns: None,
    };
    let err = d.apply(&ghost).expect_err("no route");
    assert_eq!(err.scope, ErrorScope::Pod);
    assert!(
        err.message.contains("default/ghost") && err.message.contains("10.244.1.99"),
        "{}",
        err.message
    );
    // IPv6-only pod.
    let v6 = Action::Enroll {
        pod: PodId::new("uid-v6", "default", "v6"),
        ips: vec!["fd00::1".parse().expect("ip")],
        annotations: BTreeMap::new(),
        service_account: String::new(),
        netns: None,
    };
    assert_eq!(d.apply(&v6).expect_err("v6").scope, ErrorScope::Pod);
    // A UID longer than an ipset comment (non-ASCII around the cut): refused for this pod,
    // no panic, nothing added.
    let long = Action::Enroll {
        pod: PodId::new(
            &format!("{}é{}", "u".repeat(254), "x".repeat(20)),
            "default",
            "long",
        ),
        ips: vec![IpAddr::V4(lab.pods[0].1)],
        annotations: BTreeMap::new(),
        service_account: String::new(),
        netns: None,
    };
    let err = d.apply(&long).expect_err("uid too long");
    assert_eq!(err.scope, ErrorScope::Pod, "{}", err.message);
    assert!(err.message.contains("276 bytes"), "{}", err.message);
    assert!(!ipset(&lab.node).contains("10.244.1.10"));
    // Duplicate IP: a second UID claiming an enrolled IP is refused, the holder kept.
    d.apply(&lab.enroll(0)).expect("enroll");
    let dup = Action::Enroll {
        pod: PodId::new("uid-other", "default", "other"),
        ips: vec![IpAddr::V4(lab.pods[0].1)],
        annotations: BTreeMap::new(),
        service_account: String::new(),
        netns: None,
    };
    let err = d.apply(&dup).expect_err("duplicate");
    assert!(
        err.message.contains("already enrolled for pod uid uid-0"),
        "{}",
        err.message
    );
    assert!(ipset(&lab.node).contains("comment \"uid-0\""));
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

/// Connect from inside `ns` with a transparent socket bound to `src` (as ztunnel does when it
/// keeps the client's source IP), send a line, return the reply.
fn connect_spoofed(
    ns: &Netns,
    src: Ipv4Addr,
    dst: std::net::SocketAddrV4,
) -> std::io::Result<String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    use std::io::{Read, Write};
    ns.run(move || -> std::io::Result<String> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        setsockopt(&fd, sockopt::IpTransparent, &true)?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)),
        )?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(dst))?;
        let mut stream = std::net::TcpStream::from(fd);
        stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        stream.write_all(b"hello\n")?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    })
    .map_err(std::io::Error::other)?
}

#[test]
fn captured_traffic_reaches_the_ztunnel_stand_in_including_same_node_hbone() {
    use meshcni_testkit::{ConnectOpts, ProxyConfig, TransparentProxy, connect_text};
    let lab = lab(2);
    let outside = Netns::new("out").expect("outside netns");
    plug(&lab.node, &outside, "vpx", Ipv4Addr::new(10, 244, 1, 50));
    let proxy = TransparentProxy::start_with(
        &lab.ztunnel,
        &ProxyConfig {
            tcp_ports: vec![15001, 15006, 15008],
            dns_port: None,
        },
    )
    .expect("ztunnel stand-in");
    let base = lab.baseline(&[]);
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    d.apply(&lab.enroll(0)).expect("enroll 0");
    d.apply(&lab.enroll(1)).expect("enroll 1");
    let opts = ConnectOpts::default();
    let sa = |s: &str| -> std::net::SocketAddr { s.parse().expect("addr") };

    // Outbound: pod0 → pod1:80 lands on 15001 with the original destination.
    let r = connect_text(&lab.pods[0].0, sa("10.244.1.11:80"), &opts).expect("outbound");
    assert!(r.starts_with("proxied-by:15001 orig:10.244.1.11:80"), "{r}");
    // Inbound from an uncaptured client: 15006, and HBONE port: 15008.
    let r = connect_text(&outside, sa("10.244.1.10:80"), &opts).expect("inbound");
    assert!(r.starts_with("proxied-by:15006 orig:10.244.1.10:80"), "{r}");
    let r = connect_text(&outside, sa("10.244.1.10:15008"), &opts).expect("inbound hbone");
    assert!(
        r.starts_with("proxied-by:15008 orig:10.244.1.10:15008"),
        "{r}"
    );
    // Same-node captured→captured: ztunnel's own HBONE leg to pod1:15008 hairpins back into
    // its inbound listener, from its own IP and with the client pod's (spoofed) IP.
    let r = connect_text(&lab.ztunnel, sa("10.244.1.11:15008"), &opts).expect("hairpin");
    assert!(
        r.starts_with("proxied-by:15008 orig:10.244.1.11:15008"),
        "{r}"
    );
    let r = connect_spoofed(
        &lab.ztunnel,
        Ipv4Addr::new(10, 244, 1, 10),
        "10.244.1.11:15008".parse().expect("addr"),
    )
    .expect("spoofed hairpin");
    assert!(
        r.starts_with("proxied-by:15008 orig:10.244.1.11:15008"),
        "{r}"
    );
    let peers: Vec<String> = proxy
        .connections()
        .iter()
        .map(|c| format!("{}<-{}", c.listener_port, c.peer))
        .collect();
    assert!(
        peers.iter().any(|p| p.starts_with("15008<-10.244.1.10:")),
        "{peers:?}"
    );
    assert!(
        peers.iter().any(|p| p.starts_with("15001<-10.244.1.10:")),
        "{peers:?}"
    );
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

#[test]
fn without_the_hairpin_same_node_hbone_goes_to_the_pod_like_the_reference() {
    use meshcni_testkit::{ConnectOpts, ProxyConfig, TransparentProxy, connect_text};
    let lab = lab(2);
    let _proxy = TransparentProxy::start_with(
        &lab.ztunnel,
        &ProxyConfig {
            tcp_ports: vec![15001, 15006, 15008],
            dns_port: None,
        },
    )
    .expect("ztunnel stand-in");
    let base = lab.baseline(&[]);
    let mut d = IptablesDriver::new(IptablesModeConfig {
        hairpin: false,
        ..lab.config()
    })
    .expect("driver");
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    d.apply(&lab.enroll(1)).expect("enroll 1");
    let opts = ConnectOpts {
        timeout: std::time::Duration::from_secs(2),
        ..ConnectOpts::default()
    };
    let err = connect_text(
        &lab.ztunnel,
        "10.244.1.11:15008".parse().expect("addr"),
        &opts,
    )
    .expect_err("reference rules deliver ztunnel's HBONE to the pod, which has no 15008");
    assert!(err.to_string().contains("refused"), "{err}");
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

/// Probe pod0 → pod1:80 in a loop while `switch` runs; returns (longest interval without a
/// captured connection, failed attempts, connections that reached pod1 uncaptured).
fn gap_under_traffic(lab: &NodeLab, switch: impl FnOnce()) -> (std::time::Duration, usize, usize) {
    use meshcni_testkit::{ConnectOpts, connect_text};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let stop = AtomicBool::new(false);
    let opts = ConnectOpts {
        timeout: Duration::from_millis(100),
        ..ConnectOpts::default()
    };
    let pod0 = &lab.pods[0].0;
    std::thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut last_ok = Instant::now();
            let mut worst = Duration::ZERO;
            let mut failed = 0;
            let mut leaked = 0;
            while !stop.load(Ordering::SeqCst) {
                let reply = connect_text(pod0, "10.244.1.11:80".parse().expect("addr"), &opts);
                let ok = reply
                    .as_ref()
                    .is_ok_and(|r| r.starts_with("proxied-by:15001"));
                if reply.is_ok() && !ok {
                    leaked += 1;
                }
                if ok {
                    worst = worst.max(last_ok.elapsed());
                    last_ok = Instant::now();
                } else {
                    failed += 1;
                }
            }
            worst = worst.max(last_ok.elapsed());
            (worst, failed, leaked)
        });
        std::thread::sleep(Duration::from_millis(200));
        switch();
        std::thread::sleep(Duration::from_millis(400));
        stop.store(true, Ordering::SeqCst);
        prober.join().expect("prober")
    })
}

#[test]
fn ztunnel_restart_capture_gap_in_place_vs_reference_teardown() {
    use meshcni_testkit::{ProxyConfig, TransparentProxy};
    let lab = lab(2);
    let cfg = ProxyConfig {
        tcp_ports: vec![15001, 15006, 15008],
        dns_port: None,
    };
    let p1 = TransparentProxy::start_with(&lab.ztunnel, &cfg).expect("zt1 stand-in");
    let zt2 = Netns::new("zt2").expect("zt2");
    plug(&lab.node, &zt2, "vzt2", Ipv4Addr::new(10, 244, 1, 6));
    let p2 = TransparentProxy::start_with(&zt2, &cfg).expect("zt2 stand-in");
    let zt3 = Netns::new("zt3").expect("zt3");
    plug(&lab.node, &zt3, "vzt3", Ipv4Addr::new(10, 244, 1, 7));
    let p3 = TransparentProxy::start_with(&zt3, &cfg).expect("zt3 stand-in");
    // A real server in pod1: a connection that bypasses ztunnel reaches it (a leak).
    let _server =
        meshcni_testkit::TcpServer::start(&lab.pods[1].0, "10.244.1.11:80".parse().expect("addr"))
            .expect("pod1 server");

    let base = lab.baseline(&[&zt2, &zt3]);
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    d.apply(&lab.enroll(0)).expect("enroll 0");
    d.apply(&lab.enroll(1)).expect("enroll 1");

    // meshcni: retarget in place (rolling update: the new ztunnel is Ready first).
    let zi2 = lab.ztunnel_info(&zt2, "10.244.1.6", true);
    let (gap, failed, leaked) = gap_under_traffic(&lab, || {
        d.ztunnel_changed(Some(&zi2)).expect("move");
    });
    let window = d.last_switch();
    // Reference behaviour: cleanupNode (everything removed) then rebuild + re-enroll.
    let zi3 = lab.ztunnel_info(&zt3, "10.244.1.7", true);
    let (ref_gap, ref_failed, ref_leaked) = gap_under_traffic(&lab, || {
        d.uninstall().expect("cleanup");
        d.ztunnel_changed(Some(&zi3)).expect("rebuild");
        d.apply(&lab.enroll(0)).expect("enroll 0");
        d.apply(&lab.enroll(1)).expect("enroll 1");
    });
    eprintln!(
        "capture gap on ztunnel change (100 ms probes): in place {gap:?} ({failed} failed, {leaked} uncaptured; switch window {:?}, call {:?}) vs teardown+rebuild {ref_gap:?} ({ref_failed} failed, {ref_leaked} uncaptured)",
        window.node_switch, window.total
    );
    assert!(!p1.connections().is_empty(), "zt1 captured before the move");
    assert!(!p2.connections().is_empty(), "zt2 captured after the move");
    assert!(
        !p3.connections().is_empty(),
        "zt3 captured after the rebuild"
    );
    // The switch never lets a connection reach the pod around ztunnel. (The gap itself is a
    // time on a shared machine: printed above, not asserted — a loaded CI run once measured
    // more than 1 s with 100 ms probes.)
    assert_eq!(
        leaked, 0,
        "in place: {leaked} connections reached pod1 uncaptured"
    );
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

#[test]
fn dns_capture_dnats_pod_dns_to_ztunnel_15053() {
    use meshcni_testkit::{ConnectOpts, ProxyConfig, TransparentProxy, proxy, udp_exchange};
    let lab = lab(1);
    let dns = TransparentProxy::start_with(
        &lab.ztunnel,
        &ProxyConfig {
            tcp_ports: vec![],
            dns_port: Some(15053),
        },
    )
    .expect("dns stand-in");
    let before = lab.snapshot();
    let base = lab.baseline(&[]);
    let mut d = IptablesDriver::new(IptablesModeConfig {
        dns_capture: true,
        ..lab.config()
    })
    .expect("driver");
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    d.apply(&lab.enroll(0)).expect("enroll");
    let save = lab.save(&lab.node);
    assert!(
        save.contains("-A ztunnel-PREROUTING -p udp -m set --match-set ztunnel-pods-ips src -m udp --dport 53 -j DNAT --to-destination 10.244.1.5:15053"),
        "{save}"
    );
    let reply = udp_exchange(
        &lab.pods[0].0,
        // A resolver address inside the lab subnet (no such host: the node DNATs it to ztunnel).
        "10.244.1.53:53".parse().expect("addr"),
        &ConnectOpts {
            payload: proxy::dns_query(7, "example.com"),
            ..ConnectOpts::default()
        },
    )
    .expect("dns answer through ztunnel");
    assert!(!reply.is_empty());
    let q = dns.dns_queries();
    assert!(
        q.iter()
            .any(|q| q.qname.trim_end_matches('.') == "example.com"),
        "{q:?}"
    );
    d.uninstall().expect("uninstall");
    base.assert_restored();
    assert_eq!(lab.snapshot(), before);
}

/// What kube-proxy (iptables mode, 1.29; the pre-1.28 `KUBE-MARK-DROP` 0x8000 chain
/// included) and Calico (marks in 0xffff0000, its own `cali-*` chains) leave in a node's
/// iptables. None of it uses this mode's mark bits (0x370), so none of it may be reported as
/// a conflict.
const KUBE_PROXY_AND_CALICO: &str = r#"*raw
:cali-PREROUTING - [0:0]
:cali-OUTPUT - [0:0]
-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING
-A OUTPUT -m comment --comment "cali:tVnHkvAo15HuiPy0" -j cali-OUTPUT
-A cali-PREROUTING -m comment --comment "cali:XFX5xbM8B9qR10JG" -j MARK --set-xmark 0x0/0xf0000
-A cali-PREROUTING -i cali+ -m comment --comment "cali:EWMPb0zVROM-woQp" -j MARK --set-xmark 0x40000/0x40000
-A cali-PREROUTING -m comment --comment "cali:Ttd4g6i5hA4Z7fBo" -m mark --mark 0x40000/0x40000 -m rpfilter --validmark --invert -j DROP
-A cali-OUTPUT -m comment --comment "cali:njdnLwYeGqBJyh3b" -j MARK --set-xmark 0x0/0xf0000
COMMIT
*mangle
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:cali-PREROUTING - [0:0]
-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING
-A cali-PREROUTING -m comment --comment "cali:6BJqBjBC7crtA-7-" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A cali-PREROUTING -m comment --comment "cali:KX7AGNd6rMcDUai6" -m mark --mark 0x10000/0x10000 -j ACCEPT
COMMIT
*filter
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
:cali-FORWARD - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "cali:wUHhoiAYhphO9Mso" -j cali-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FIREWALL -m comment --comment "kubernetes firewall for dropping marked packets" -m mark --mark 0x8000/0x8000 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A cali-FORWARD -m comment --comment "cali:vjrMJCRpqwy5oRoX" -j MARK --set-xmark 0x0/0xe0000
-A cali-FORWARD -m comment --comment "cali:A_sPAO0mcxbT9mOV" -m mark --mark 0x0/0x10000 -j ACCEPT
COMMIT
*nat
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-DROP - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-IT2ZTR26TO4XFPTO -s 172.18.0.2/32 -m comment --comment "default/kubernetes:https" -j KUBE-MARK-MASQ
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p tcp -m comment --comment "default/kubernetes:https" -m tcp -j DNAT --to-destination 172.18.0.2:6443
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-NPX46M4PTMTKRN6Y ! -s 10.244.0.0/16 -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-MARK-MASQ
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment "default/kubernetes:https -> 172.18.0.2:6443" -j KUBE-SEP-IT2ZTR26TO4XFPTO
COMMIT
"#;

/// A normal kube-proxy + Calico node (rules in either iptables flavour) is not a conflict:
/// the driver installs, enrolls, leaves every foreign rule as it was, and uninstalls back to
/// the exact pre-install state.
#[test]
fn kube_proxy_and_calico_rules_are_not_conflicts() {
    for restore in ["iptables-nft-restore", "iptables-legacy-restore"] {
        let lab = lab(1);
        let rules = lab.tmp.path().join("kube-proxy.rules");
        std::fs::write(&rules, KUBE_PROXY_AND_CALICO).expect("write rules");
        lab.node
            .exec_ok(restore, &[&rules.to_string_lossy()])
            .unwrap_or_else(|e| panic!("{restore}: {e}"));
        let foreign_before = lab.save(&lab.node);
        let foreign_lines: Vec<&str> = foreign_before
            .lines()
            .filter(|l| l.starts_with("-A "))
            .collect();
        assert!(foreign_lines.len() > 30, "{foreign_before}");
        // Legacy chains count packets (the lab's own IPv4 traffic); compare without counters.
        let snapshot = || {
            lab.snapshot()
                .lines()
                .map(|l| match l.find(" [") {
                    Some(i) if l.starts_with(':') => format!("{}\n", &l[..i]),
                    _ => format!("{l}\n"),
                })
                .collect::<String>()
        };
        let before = snapshot();
        if restore.contains("legacy") {
            // x_tables cannot unregister a table from a netns: the empty `mangle` table the
            // ztunnel rules bring into existence would stay. On a legacy node the ztunnel
            // pod's netns is assumed to have it already (as here), so the comparison is exact.
            lab.ztunnel
                .exec_ok("iptables-legacy", &["-t", "mangle", "-S"])
                .expect("instantiate legacy mangle in the ztunnel netns");
        }

        let base = lab.baseline(&[]);
        let mut d = lab.driver();
        d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
            .unwrap_or_else(|e| panic!("{restore}: a kube-proxy/Calico node was refused: {e}"));
        d.apply(&lab.enroll(0)).expect("enroll");
        let installed = lab.save(&lab.node);
        assert!(
            installed.contains("-A PREROUTING -j ztunnel-PREROUTING"),
            "{restore}: {installed}"
        );
        for l in &foreign_lines {
            assert!(installed.contains(l), "{restore}: foreign rule lost: {l}");
        }
        d.uninstall().expect("uninstall");
        base.assert_restored();
        assert_eq!(snapshot(), before, "{restore}: not back to pre-install");
    }
}

/// An ambient pod known before any ztunnel was ever Ready on the node (fresh node, or ambient
/// switched on in a running cluster): the node state does not exist yet, so the pod cannot be
/// enrolled. That is a per-pod wait (loop contract 6, Istio §7.7: readiness does not need
/// ztunnel), not a driver failure: the `redirect-mode` gate stays open, and the pass that
/// sees the ztunnel become Ready installs the node state and enrolls the pod at once, instead
/// of sitting out a driver-wide back-off first.
#[test]
fn pod_before_ztunnel_waits_per_pod_and_enrolls_when_ztunnel_is_ready() {
    use meshcni_agent::ambient::{LoopOptions, Reconciler, StatusHandle};
    use meshcni_agent::workloads::{EnrollPolicy, SourceUpdate, decode_namespace, decode_pod};
    use serde_json::json;
    use std::time::{Duration, Instant};

    let lab = lab(1);
    let base = lab.baseline(&[]);
    let status = StatusHandle::new(Err("starting".into()));
    let mut rec = Reconciler::new(
        Box::new(lab.driver()),
        EnrollPolicy::default(),
        LoopOptions {
            resync: Duration::from_secs(600),
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
            debounce: Duration::from_millis(1),
            ..LoopOptions::default()
        },
        status.clone(),
    );
    let pod = |name: &str, ns: &str, uid: &str, ip: &str, labels: serde_json::Value, ann| {
        decode_pod(&json!({
            "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels,
                         "annotations": ann, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "node-1"},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod")
    };
    let app = pod(
        "app",
        "default",
        "uid-0",
        "10.244.1.10",
        json!({}),
        json!({}),
    );
    let mut zt = pod(
        "ztunnel",
        "istio-system",
        "uid-zt",
        "10.244.1.5",
        json!({"app": "ztunnel"}),
        json!({ZTUNNEL_NETNS_ANNOTATION: lab.ztunnel.path().display().to_string()}),
    );
    zt.service_account = "ztunnel".into();
    let namespaces = ["default", "istio-system"]
        .iter()
        .map(|n| {
            let labels = if *n == "default" {
                json!({"istio.io/dataplane-mode": "ambient"})
            } else {
                json!({})
            };
            decode_namespace(&json!({"metadata": {"name": n, "labels": labels}}))
                .expect("namespace")
        })
        .collect();
    rec.update(SourceUpdate::Namespaces(namespaces));
    rec.update(SourceUpdate::Pods(vec![app.clone()]));

    let t0 = Instant::now();
    let r = rec.reconcile(t0);
    assert_eq!(r.blocked, None, "{r:?}");
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].1.scope, ErrorScope::Pod, "{r:?}");
    assert_eq!(
        status.probe(),
        Ok(()),
        "no ztunnel yet must not close the redirect-mode gate"
    );

    rec.update(SourceUpdate::Pods(vec![app, zt]));
    let r = rec.reconcile(t0 + Duration::from_millis(50));
    assert_eq!(r.blocked, None, "ztunnel change held back: {r:?}");
    assert_eq!(r.applied.len(), 1, "{r:?}");
    assert!(ipset(&lab.node).contains("10.244.1.10 comment \"uid-0\""));
    assert_eq!(status.probe(), Ok(()));
    let mut d = lab.driver();
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

/// Pod veths come and go (every sandbox gets a new one). The previous `rp_filter` of each pod
/// veth is remembered for uninstall; once the veth is gone the entry must be forgotten, or the
/// state (and the state file rewritten on every enroll) grows with every pod ever enrolled.
#[test]
fn remembered_sysctls_of_vanished_pod_veths_are_forgotten() {
    let lab = lab(2);
    // A CNI that sets strict rp_filter on its pod veths (Calico's Felix does).
    for v in ["vp0", "vp1"] {
        lab.node
            .sysctl(&format!("net.ipv4.conf.{v}.rp_filter"), "1")
            .expect("rp_filter");
    }
    // Pod 0's veth is deleted below: compared without it (its link, route and sysctls).
    let base = NetnsSnapshot::capture(lab.node.path()).expect("snapshot");
    let zbase = lab.baseline(&[]);
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    d.apply(&lab.enroll(0)).expect("enroll 0");
    d.apply(&lab.enroll(1)).expect("enroll 1");
    let key = |v: &str| format!("net/ipv4/conf/{v}/rp_filter");
    let has = |d: &IptablesDriver, v: &str| {
        d.state()
            .sysctls
            .keys()
            .any(|k| k.replace('.', "/").ends_with(&key(v)))
    };
    assert!(has(&d, "vp0") && has(&d, "vp1"), "{:?}", d.state().sysctls);

    // Pod 0's sandbox goes: its veth is deleted, the pod released.
    lab.node.ip(&["link", "del", "vp0"]).expect("del veth");
    d.apply(&Action::Release {
        pod: PodId::new("uid-0", "", ""),
        ips: vec![IpAddr::V4(lab.pods[0].1)],
    })
    .expect("release");
    d.actual().expect("actual (resync)");
    assert!(
        !has(&d, "vp0"),
        "vanished veth still remembered: {:?}",
        d.state().sysctls
    );
    assert!(has(&d, "vp1"), "{:?}", d.state().sysctls);
    let file = std::fs::read_to_string(&lab.config().state_file).expect("state file");
    assert!(!file.contains("vp0"), "{file}");
    // A restarted agent reads the pruned state; uninstall still restores the live veth.
    drop(d);
    let mut d = lab.driver();
    assert!(!has(&d, "vp0") && has(&d, "vp1"));
    d.uninstall().expect("uninstall");
    let after = NetnsSnapshot::capture(lab.node.path()).expect("snapshot");
    base.without("vp0").assert_same(
        &after.without("vp0"),
        "node after uninstall (pod 0's veth deleted)",
    );
    // The ztunnel netns is untouched by the veth deletion: compared whole.
    zbase.0[1..].iter().for_each(|(name, path, before)| {
        meshcni_testkit::assert_netns_unchanged(path, before, name);
    });
    assert_eq!(
        lab.node
            .read_sysctl("net.ipv4.conf.vp1.rp_filter")
            .expect("rp"),
        "1"
    );
}

/// Run `ipset`/`ip` inside the node netns (building half-enrolled state by hand).
fn node_cmd(lab: &NodeLab, prog: &str, args: &[&str]) {
    lab.node
        .exec_ok(prog, args)
        .unwrap_or_else(|e| panic!("{prog} {args:?}: {e}"));
}

fn table100(lab: &NodeLab) -> String {
    lab.node
        .ip(&["route", "show", "table", "100"])
        .expect("table 100")
}

/// A pod's table-100 route into the inbound tunnel, as enrollment writes it.
fn add_inbound_route(lab: &NodeLab, ip: &str) {
    node_cmd(
        lab,
        "ip",
        &[
            "route",
            "add",
            ip,
            "via",
            "192.168.126.2",
            "dev",
            "istioin",
            "table",
            "100",
            "src",
            "10.244.1.1",
        ],
    );
}

/// Issue 8 items 1 and 2: an agent killed between the steps of an enroll leaves a pod in the
/// ipset without its table-100 route (inbound bypasses ztunnel) or without `rp_filter=0` on
/// its veth; a release cut short leaves a route without a set member. A restarted agent (and
/// every resync) must read every piece and complete or clean each pod.
#[test]
fn half_enrolled_pods_are_repaired_on_start_and_on_resync() {
    let lab = lab(3);
    for v in ["vp0", "vp1", "vp2"] {
        lab.node
            .sysctl(&format!("net.ipv4.conf.{v}.rp_filter"), "1")
            .expect("operator rp_filter");
    }
    let base = lab.baseline(&[]);
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    drop(d);
    // What a killed agent leaves: pod 0 only in the ipset (killed after `ipset add`); pod 1
    // in the ipset with its route but without the sysctl (killed after the route); a route
    // for pod 2 without a set member (killed in the middle of a release).
    node_cmd(
        &lab,
        "ipset",
        &["add", "ztunnel-pods-ips", "10.244.1.10", "comment", "uid-0"],
    );
    node_cmd(
        &lab,
        "ipset",
        &["add", "ztunnel-pods-ips", "10.244.1.11", "comment", "uid-1"],
    );
    for ip in ["10.244.1.11", "10.244.1.12"] {
        add_inbound_route(&lab, ip);
    }

    let mut d = lab.driver();
    let actual = d.actual().expect("actual");
    assert_eq!(actual.len(), 2, "{actual:?}");
    let t100 = table100(&lab);
    for ip in ["10.244.1.10", "10.244.1.11"] {
        assert!(
            t100.contains(&format!(
                "{ip} via 192.168.126.2 dev istioin src 10.244.1.1"
            )),
            "enrolled pod {ip} has no inbound route after restart:\n{t100}"
        );
    }
    assert!(!t100.contains("10.244.1.12"), "orphan route kept:\n{t100}");
    for v in ["vp0", "vp1"] {
        assert_eq!(
            lab.node
                .read_sysctl(&format!("net.ipv4.conf.{v}.rp_filter"))
                .expect("rp"),
            "0",
            "{v}: rp_filter of an enrolled pod's veth not set"
        );
    }
    assert_eq!(
        lab.node
            .read_sysctl("net.ipv4.conf.vp2.rp_filter")
            .expect("rp"),
        "1",
        "vp2 is not enrolled"
    );
    let r = d.repairs();
    assert_eq!((r.routes, r.sysctls, r.orphan_routes), (1, 2, 1), "{r:?}");

    // Drift on a running agent: the next resync (`actual()`) repairs it again.
    lab.node
        .ip(&["route", "del", "10.244.1.10", "table", "100"])
        .expect("del route");
    lab.node
        .sysctl("net.ipv4.conf.vp1.rp_filter", "1")
        .expect("rp");
    d.actual().expect("resync");
    assert!(
        table100(&lab).contains("10.244.1.10 via"),
        "{}",
        table100(&lab)
    );
    assert_eq!(
        lab.node
            .read_sysctl("net.ipv4.conf.vp1.rp_filter")
            .expect("rp"),
        "0"
    );
    // Between resyncs the loop's node check (`verify_node`) restores a deleted pod route and
    // removes an orphan one too.
    lab.node
        .ip(&["route", "del", "10.244.1.10", "table", "100"])
        .expect("del route");
    add_inbound_route(&lab, "10.244.1.12");
    let before = d.repairs();
    RedirectDriver::verify_node(&mut d).expect("node check");
    let t100 = table100(&lab);
    assert!(t100.contains("10.244.1.10 via"), "{t100}");
    assert!(!t100.contains("10.244.1.12"), "orphan route kept:\n{t100}");
    let after = d.repairs();
    assert_eq!(
        (after.routes, after.orphan_routes),
        (before.routes + 1, before.orphan_routes + 1),
        "{after:?}"
    );

    // The operator's values (1) come back on uninstall, including the veths repaired above.
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

/// Issue 8 item 3: the previous value of a sysctl must be on disk before the sysctl is
/// changed. With the state file unwritable, an enroll must fail *without* touching the pod
/// veth's `rp_filter` (old code wrote it first and lost the operator's value).
#[test]
fn a_sysctl_is_remembered_durably_before_it_is_written() {
    let lab = lab(1);
    lab.node
        .sysctl("net.ipv4.conf.vp0.rp_filter", "2")
        .expect("operator rp_filter");
    let base = lab.baseline(&[]);
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    // The state file's temp path is a directory: no state write can succeed.
    let tmp = lab.config().state_file.with_extension("tmp");
    std::fs::create_dir_all(tmp.join("blocker")).expect("blocker dir");
    let err = d.apply(&lab.enroll(0)).expect_err("state not writable");
    assert!(
        err.message.contains("cannot write state file"),
        "{}",
        err.message
    );
    assert_eq!(
        lab.node
            .read_sysctl("net.ipv4.conf.vp0.rp_filter")
            .expect("rp"),
        "2",
        "rp_filter was changed although its previous value could not be saved"
    );
    std::fs::remove_dir_all(&tmp).expect("remove blocker");
    d.apply(&lab.enroll(0)).expect("enroll");
    let file = std::fs::read_to_string(&lab.config().state_file).expect("state file");
    assert!(file.contains(r#"vp0/rp_filter":"2""#), "{file}");
    assert_eq!(
        lab.node
            .read_sysctl("net.ipv4.conf.vp0.rp_filter")
            .expect("rp"),
        "0"
    );
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

/// Issue 8 item 17: enrolling N pods in one reconcile pass writes the state file once (it
/// used to be rewritten after every pod: O(n²) bytes).
#[test]
fn one_state_write_per_reconcile_pass_however_many_pods() {
    const N: usize = 20;
    let lab = lab(N);
    for i in 0..N {
        // Strict rp_filter on every pod veth: every enroll changes (and remembers) a value.
        lab.node
            .sysctl(&format!("net.ipv4.conf.vp{i}.rp_filter"), "1")
            .expect("rp");
    }
    let base = lab.baseline(&[]);
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    let (writes_before, _) = d.state_writes();
    let actions: Vec<Action> = (0..N).map(|i| lab.enroll(i)).collect();
    d.prepare(&actions).expect("prepare");
    for a in &actions {
        d.apply(a).expect("enroll");
    }
    let (writes, _) = d.state_writes();
    assert_eq!(
        writes - writes_before,
        1,
        "state file writes for {N} pods in one pass"
    );
    let pod_keys = d
        .state()
        .sysctls
        .keys()
        .filter(|k| k.contains("/vp"))
        .count();
    assert_eq!(pod_keys, N, "{:?}", d.state().sysctls);
    for i in 0..N {
        assert_eq!(
            lab.node
                .read_sysctl(&format!("net.ipv4.conf.vp{i}.rp_filter"))
                .expect("rp"),
            "0"
        );
    }
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

/// Legacy iptables everywhere this test's driver goes, with the x_tables tables it will use
/// already instantiated (x_tables cannot unregister a table from a netns, so a byte-for-byte
/// comparison needs them there from the start, as on a real legacy node).
fn legacy_lab() -> NodeLab {
    let lab = lab(0);
    for t in ["filter", "mangle", "nat"] {
        lab.node
            .exec_ok("iptables-legacy", &["-t", t, "-S"])
            .expect("legacy table");
    }
    lab.ztunnel
        .exec_ok("iptables-legacy", &["-t", "mangle", "-S"])
        .expect("legacy table");
    lab
}

fn legacy_config(
    lab: &NodeLab,
    wait_secs: u32,
    timeout: std::time::Duration,
) -> IptablesModeConfig {
    let mut cfg = lab.config();
    cfg.iptables.force = Some(meshcni_netx::IptablesFlavor::Legacy);
    cfg.iptables.wait_secs = wait_secs;
    cfg.iptables.timeout = timeout;
    cfg
}

fn hold_lock(path: &std::path::Path) -> nix::fcntl::Flock<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("open lock file");
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock")
}

/// Issue 8 item 18: node netns restores take the node's xtables lock (the global
/// `/run/xtables.lock` by default; a test lock here), so on legacy nodes they serialise with
/// kube-proxy. While another writer holds it, the restore waits `--wait` seconds and fails
/// naming the lock; once released, the install goes through.
#[test]
fn node_restores_serialise_on_the_node_xtables_lock() {
    let lab = legacy_lab();
    let base = lab.baseline(&[]);
    let cfg = legacy_config(&lab, 1, std::time::Duration::from_secs(60));
    let lock = hold_lock(&cfg.node_xtables_lock);
    let mut d = IptablesDriver::new(cfg.clone()).expect("driver");
    let zt = lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true);
    let err = d
        .ztunnel_changed(Some(&zt))
        .expect_err("the node lock is held by another writer");
    assert!(err.message.contains("xtables lock"), "{}", err.message);
    assert!(
        err.message.contains("iptables-legacy-restore"),
        "{}",
        err.message
    );
    drop(lock);
    d.ztunnel_changed(Some(&zt))
        .expect("install once the lock is free");
    let save = lab.node.exec_ok("iptables-legacy-save", &[]).expect("save");
    assert!(save.contains("-j ztunnel-PREROUTING"), "{save}");
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

/// Issue 8 item 18: every child process has a time limit. A restore stuck behind a held
/// lock (legacy `--wait=30`) is killed at the driver's timeout with an error naming it.
#[test]
fn a_stuck_node_restore_is_killed_at_its_timeout() {
    let lab = legacy_lab();
    let base = lab.baseline(&[]);
    let cfg = legacy_config(&lab, 30, std::time::Duration::from_secs(1));
    let lock = hold_lock(&cfg.node_xtables_lock);
    let mut d = IptablesDriver::new(cfg).expect("driver");
    let zt = lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true);
    let err = d.ztunnel_changed(Some(&zt)).expect_err("must time out");
    assert!(
        err.message.contains("timed out after 1s"),
        "{}",
        err.message
    );
    drop(lock);
    d.ztunnel_changed(Some(&zt)).expect("install");
    d.uninstall().expect("uninstall");
    base.assert_restored();
}

/// Issue 12 item 5 (d): a third party flushes the node netns's iptables (an operator's
/// `iptables -t nat -F`, a firewall reload that drops foreign chains). The enrolled pods would
/// bypass ztunnel silently; the next resync (`actual()`) must find the node rules gone and put
/// them back in one restore, exactly as installed, and leave them alone when intact. (Before
/// the fix `actual()` checked routes and sysctls only: the rules stayed gone until a ztunnel
/// change.)
#[test]
fn node_rules_flushed_by_a_third_party_are_restored_on_resync() {
    let lab = lab(1);
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(&lab.ztunnel, "10.244.1.5", true)))
        .expect("install");
    d.apply(&lab.enroll(0)).expect("enroll");
    let installed = no_counters(&lab.save(&lab.node));
    assert!(
        installed.contains("-A PREROUTING -j ztunnel-PREROUTING"),
        "{installed}"
    );
    flush_node_iptables(&lab.node);
    let flushed = no_counters(&lab.save(&lab.node));
    assert!(
        !flushed.contains("ztunnel-"),
        "flush left rules:\n{flushed}"
    );
    let before = d.repairs().node_rules;
    let actual = d.actual().expect("resync");
    assert_eq!(actual.len(), 1, "the pod stays enrolled: {actual:?}");
    assert_eq!(
        no_counters(&lab.save(&lab.node)),
        installed,
        "node rules not restored exactly as installed"
    );
    assert_eq!(d.repairs().node_rules, before + 1);
    // Intact: the next resync runs nothing.
    d.actual().expect("resync");
    assert_eq!(d.repairs().node_rules, before + 1);
    assert_eq!(no_counters(&lab.save(&lab.node)), installed);
    // The loop's node check between resyncs (`verify_node`) does the same: flushed again,
    // restored by it alone; intact, it runs nothing.
    flush_node_iptables(&lab.node);
    assert!(!no_counters(&lab.save(&lab.node)).contains("ztunnel-"));
    RedirectDriver::verify_node(&mut d).expect("node check");
    assert_eq!(no_counters(&lab.save(&lab.node)), installed);
    assert_eq!(d.repairs().node_rules, before + 2);
    RedirectDriver::verify_node(&mut d).expect("node check");
    assert_eq!(d.repairs().node_rules, before + 2);
    d.uninstall().expect("uninstall");
}

/// What `iptables -F; iptables -X` per table does to the flavor the driver wrote in `ns`
/// (touching the other would create its tables).
fn flush_node_iptables(ns: &Netns) {
    for flavor in ["iptables-nft", "iptables-legacy"] {
        let save = ns.exec_ok(&format!("{flavor}-save"), &[]).expect("save");
        if !save.contains("ztunnel-") {
            continue;
        }
        for table in ["nat", "mangle", "filter"] {
            let _ = ns.exec_ok(flavor, &["-t", table, "-F"]);
            let _ = ns.exec_ok(flavor, &["-t", table, "-X"]);
        }
    }
}

/// A save with every `[packets:bytes]` counter zeroed (traffic in the netns moves them).
fn no_counters(save: &str) -> String {
    save.lines()
        .map(|l| match (l.find(" ["), l.ends_with(']')) {
            (Some(i), true) if l.starts_with(':') => format!("{} [0:0]\n", &l[..i]),
            _ => format!("{l}\n"),
        })
        .collect()
}
