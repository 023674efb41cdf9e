//! Enrollment benchmark of the `iptables` redirect mode (root; creates its own namespaces).
//!
//! Two identical labs are built: a node netns, a ztunnel netns (ptp veth), and N pods whose
//! host sides are N real veths in the node netns (`vp<i>`, each with its `/32` route) whose
//! peers all live in one shared "pods" netns (N pod netns would only slow the setup; the node
//! side — the only side the mode touches — is the same as with real pods).
//!
//! * **meshcni**: `IptablesDriver::ztunnel_changed` (install) then N `apply(Enroll)`.
//! * **baseline**: the same state applied the way the reference does it (spec §3.3–§3.7):
//!   one `iptables` exec per chain/jump/rule, `ip` execs for links/addresses/rules/routes,
//!   `ipset create`, and per pod `ipset add` + `bash -c "ip route show … | wc -l"` +
//!   `ip route add` + rp_filter file writes.
//!
//! Reported: install time, total and per-pod enrollment time, iptables rule counts before and
//! after enrolling (must not grow with pods), and the speed-up.
//!
//! Run: `cargo run -p meshcni-agent --example enroll_bench [-- <pods>]` (default 200).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use meshcni_agent::ambient::{Action, PodId, RedirectDriver, ZtunnelInfo};
use meshcni_agent::modes::iptables::{
    IptablesDriver, IptablesModeConfig, ZTUNNEL_NETNS_ANNOTATION,
};
use meshcni_rules::ambient_node as an;
use meshcni_testkit::{Netns, veth};

const HOST: &str = "10.244.1.1";
const ZIP: &str = "10.244.1.5";

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 2 + (i / 250) as u8, 1 + (i % 250) as u8)
}

struct Lab {
    node: Netns,
    zt: Netns,
    _pods: Netns,
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lab(tag: &str, pods: usize) -> Lab {
    let node = Netns::new(&format!("{tag}node")).expect("node");
    node.sysctl("net.ipv4.ip_forward", "1").expect("fwd");
    let zt = Netns::new(&format!("{tag}zt")).expect("zt");
    veth(&node, "vzt", &zt, "eth0").expect("veth");
    zt.add_addr("eth0", &format!("{ZIP}/32")).expect("addr");
    zt.ip(&["route", "add", HOST, "dev", "eth0", "scope", "link"])
        .expect("r");
    zt.add_default_route(HOST).expect("default");
    node.add_addr("vzt", &format!("{HOST}/32")).expect("addr");
    node.ip(&[
        "route",
        "add",
        &format!("{ZIP}/32"),
        "dev",
        "vzt",
        "scope",
        "link",
    ])
    .expect("r");
    let podns = Netns::new(&format!("{tag}pods")).expect("pods");
    let mut batch = String::new();
    for i in 0..pods {
        batch.push_str(&format!(
            "link add vp{i} type veth peer name e{i} netns {}\nlink set vp{i} up\nroute add {}/32 dev vp{i} scope link\n",
            podns.name(),
            pod_ip(i)
        ));
    }
    let file = std::env::temp_dir().join(format!("mcni-bench-{}-{tag}.batch", std::process::id()));
    std::fs::write(&file, batch).expect("batch file");
    run(
        "ip",
        &["-n", node.name(), "-batch", &file.display().to_string()],
    );
    let _ = std::fs::remove_file(&file);
    Lab {
        node,
        zt,
        _pods: podns,
    }
}

fn rule_count(ns: &Netns) -> usize {
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .map(|p| {
            ns.exec_ok(p, &[])
                .expect("save")
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
        })
        .sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// meshcni: install + N enrollments through the driver.
fn bench_driver(pods: usize) -> (Duration, Duration, usize, usize) {
    let lab = lab("m", pods);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut d = IptablesDriver::new(IptablesModeConfig {
        node_netns: lab.node.path().to_path_buf(),
        netns_dir: tmp.path().join("netns"),
        state_file: tmp.path().join("state.json"),
        ..IptablesModeConfig::default()
    })
    .expect("driver");
    let zt = ZtunnelInfo {
        pod: PodId::new("zt", "istio-system", "ztunnel"),
        ips: vec![ZIP.parse().expect("ip")],
        created: String::new(),
        annotations: BTreeMap::from([(
            ZTUNNEL_NETNS_ANNOTATION.to_string(),
            lab.zt.path().display().to_string(),
        )]),
    };
    let t = Instant::now();
    d.ztunnel_changed(Some(&zt)).expect("install");
    let install = t.elapsed();
    let before = rule_count(&lab.node);
    let t = Instant::now();
    for i in 0..pods {
        d.apply(&Action::Enroll {
            pod: PodId::new(&format!("uid-{i}"), "bench", &format!("pod-{i}")),
            ips: vec![IpAddr::V4(pod_ip(i))],
            annotations: BTreeMap::new(),
            service_account: String::new(),
            netns: None,
        })
        .expect("enroll");
    }
    let enroll = t.elapsed();
    let after = rule_count(&lab.node);
    let enrolled = d.actual().expect("actual").len();
    assert_eq!(enrolled, pods, "every pod enrolled");
    d.uninstall().expect("uninstall");
    (install, enroll, before, after)
}

/// The reference's way: one exec per rule / object.
fn bench_baseline(pods: usize) -> (Duration, Duration, usize, usize) {
    let lab = lab("b", pods);
    let n = lab.node.name().to_string();
    let z = lab.zt.name().to_string();
    let ipt = "iptables-nft";
    let cfg = an::NodeConfig {
        ztunnel_veth: "vzt".into(),
        ztunnel_ip: ZIP.parse().expect("ip"),
        host_ip: HOST.parse().expect("ip"),
        tunnel_port: 4789,
        dns_capture: false,
        hairpin: false,
    };
    // Commands run from a thread inside the netns (fork inherits it): the exec cost of the
    // reference running in the node netns, without `ip netns exec` overhead.
    let npath = lab.node.path().to_path_buf();
    let zpath = lab.zt.path().to_path_buf();
    let in_ns = |ns: &str, prog: &str, args: &[&str]| {
        let path = if ns == n { &npath } else { &zpath };
        meshcni_netx::run_in_netns(path, || run(prog, args)).expect("enter netns");
    };
    let write = |ns: &Netns, key: &str| ns.sysctl(key, "0").expect("sysctl");
    let t = Instant::now();
    in_ns(
        &n,
        "ipset",
        &["create", "ztunnel-pods-ips", "hash:ip", "comment"],
    );
    for cmd in an::reference_iptables_commands(&cfg) {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        in_ns(&n, ipt, &args);
    }
    for k in ["default", "all", "vzt"] {
        write(&lab.node, &format!("net.ipv4.conf.{k}.rp_filter"));
    }
    for (name, vni, addr) in [
        ("istioin", "1000", "192.168.126.1/30"),
        ("istioout", "1001", "192.168.127.1/30"),
    ] {
        run(
            "ip",
            &[
                "-n", &n, "link", "add", name, "type", "vxlan", "id", vni, "remote", ZIP,
                "dstport", "4789",
            ],
        );
        run("ip", &["-n", &n, "addr", "add", addr, "dev", name]);
        run("ip", &["-n", &n, "link", "set", name, "up"]);
    }
    for r in an::node_routes(&cfg) {
        let args = an::route_args(&r);
        let mut v = vec!["-n", n.as_str(), "route", "add"];
        v.extend(args.iter().map(String::as_str));
        run("ip", &v);
    }
    for r in an::node_ip_rules() {
        let args = an::ip_rule_args(&r);
        let mut v = vec!["-n", n.as_str(), "rule", "add"];
        v.extend(args.iter().map(String::as_str));
        run("ip", &v);
    }
    // ztunnel netns (§3.5)
    for (name, vni, addr) in [
        ("pistioin", "1000", "192.168.126.2/30"),
        ("pistioout", "1001", "192.168.127.2/30"),
    ] {
        run(
            "ip",
            &[
                "-n", &z, "link", "add", name, "type", "vxlan", "id", vni, "remote", HOST,
                "dstport", "4789",
            ],
        );
        run("ip", &["-n", &z, "addr", "add", addr, "dev", name]);
        run("ip", &["-n", &z, "link", "set", name, "up"]);
    }
    let zcfg = an::ZtunnelConfig {
        ztunnel_ip: cfg.ztunnel_ip,
        host_ip_by_route: cfg.host_ip,
        eth: "eth0".into(),
        hairpin: false,
    };
    for r in an::ztunnel_ip_rules() {
        let args = an::ip_rule_args(&r);
        let mut v = vec!["-n", z.as_str(), "rule", "add"];
        v.extend(args.iter().map(String::as_str));
        run("ip", &v);
    }
    for r in an::ztunnel_routes(&zcfg) {
        let args = an::route_args(&r);
        let mut v = vec!["-n", z.as_str(), "route", "add"];
        v.extend(args.iter().map(String::as_str));
        run("ip", &v);
    }
    for c in an::ztunnel_chains(&zcfg) {
        for r in &c.rules {
            let mut v = vec!["-t", c.table.name(), "-A", c.hook];
            v.extend(r.split_whitespace());
            in_ns(&z, ipt, &v);
        }
    }
    let install = t.elapsed();
    let before = rule_count(&lab.node);
    let t = Instant::now();
    for i in 0..pods {
        let ip = pod_ip(i).to_string();
        in_ns(
            &n,
            "ipset",
            &[
                "add",
                "ztunnel-pods-ips",
                &ip,
                "comment",
                &format!("uid-{i}"),
            ],
        );
        let spec = format!("table 100 {ip}/32 via 192.168.126.2 dev istioin src {HOST}");
        let out = meshcni_netx::run_in_netns(&npath, || {
            Command::new("bash")
                .args(["-c", &format!("ip route show {spec} | wc -l")])
                .output()
                .expect("bash")
        })
        .expect("enter netns");
        assert!(out.status.success());
        if String::from_utf8_lossy(&out.stdout).trim() != "1" {
            let mut v = vec!["-n", n.as_str(), "route", "add"];
            v.extend(spec.split_whitespace());
            run("ip", &v);
        }
        for k in ["default", "all", &format!("vp{i}")] {
            write(&lab.node, &format!("net.ipv4.conf.{k}.rp_filter"));
        }
    }
    let enroll = t.elapsed();
    let after = rule_count(&lab.node);
    (install, enroll, before, after)
}

fn main() {
    let pods: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let (mi, me, mb, ma) = bench_driver(pods);
    let (bi, be, bb, ba) = bench_baseline(pods);
    println!("pods: {pods}");
    println!(
        "meshcni : install {:8.1} ms | enroll total {:8.1} ms, per pod {:6.3} ms | iptables rules before/after enroll: {mb}/{ma}",
        ms(mi),
        ms(me),
        ms(me) / pods as f64
    );
    println!(
        "baseline: install {:8.1} ms | enroll total {:8.1} ms, per pod {:6.3} ms | iptables rules before/after enroll: {bb}/{ba}",
        ms(bi),
        ms(be),
        ms(be) / pods as f64
    );
    println!(
        "speed-up: enroll {:.1}x, install {:.1}x, install+enroll {:.1}x",
        ms(be) / ms(me),
        ms(bi) / ms(mi),
        (ms(bi) + ms(be)) / (ms(mi) + ms(me))
    );
}
