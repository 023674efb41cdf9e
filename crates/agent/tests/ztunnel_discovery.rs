//! Which pod is the node's ztunnel, and which netns is its netns.
//!
//! * Trust (issue 8 item 13): only a pod labelled `app=ztunnel` in the system namespace
//!   (`--system-namespace`) running as ztunnel's service account (`--ztunnel-service-account`)
//!   becomes the active ztunnel. A pod in another namespace, or in the system namespace under
//!   another account, is ignored with a warning (and, being an ordinary pod, is enrolled if its
//!   namespace is ambient).
//! * Netns discovery (item 12): without the netns annotation the `iptables` driver scans
//!   `--netns-dir` for the netns of ztunnel's veth peer by identity (the veth's
//!   `IFLA_LINK_NETNSID` against the node netns's id for each candidate), not by interface index;
//!   the node's own netns is skipped by inode, whatever its path. Decoy namespaces whose links
//!   have exactly the indexes of the real peer are never chosen and never written to.
//!
//! Root needed for the netns tests; they fail, never skip, without it. Every netns is a unique
//! `mcni-*` lab netns, deleted on success and failure; the netns dir is a private temp dir.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use meshcni_agent::ambient::{
    FakeDriver, LoopOptions, PodId, Reconciler, RedirectDriver, StatusHandle, ZtunnelInfo,
    policy_from_args,
};
use meshcni_agent::cli::Cli;
use meshcni_agent::modes::iptables::{
    IptablesDriver, IptablesModeConfig, ZTUNNEL_NETNS_ANNOTATION,
};
use meshcni_agent::workloads::{
    SourceUpdate, WorkloadSnapshot, ZtunnelIdentity, active_ztunnel, decode_namespace, decode_pod,
};
use meshcni_testkit::stack::NodeState;
use meshcni_testkit::{Netns, veth};
use serde_json::{Value, json};

// ---- trust ------------------------------------------------------------------------------

fn pod(name: &str, ns: &str, sa: Option<&str>, ip: &str, created: &str, labels: Value) -> Value {
    let mut spec = json!({"nodeName": "node1"});
    if let Some(sa) = sa {
        spec["serviceAccountName"] = json!(sa);
    }
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "labels": labels, "creationTimestamp": created},
        "spec": spec,
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn snapshot(pods: &[Value], namespaces: &[(&str, bool)]) -> WorkloadSnapshot {
    WorkloadSnapshot::from_parts(
        pods.iter().map(|p| decode_pod(p).expect("pod")),
        namespaces.iter().map(|(n, ambient)| {
            let labels = if *ambient {
                json!({"istio.io/dataplane-mode": "ambient"})
            } else {
                json!({})
            };
            decode_namespace(&json!({"metadata": {"name": n, "labels": labels}})).expect("ns")
        }),
    )
}

/// A `tracing` writer into a shared buffer (the reconciler logs on the calling thread).
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn take(&self) -> String {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&std::mem::take(&mut *v)).into_owned()
    }
}

/// One reconcile pass with `args`' policy over `snap`; returns the log and the driver.
struct Run {
    rec: Reconciler,
    driver: FakeDriver,
    log: LogBuf,
}

impl Run {
    fn new(args: &[&str]) -> Run {
        let cli = Cli::try_parse_from(std::iter::once("meshcni-agent").chain(args.iter().copied()))
            .expect("flags");
        let policy = policy_from_args(&cli.args).expect("policy");
        let driver = FakeDriver::new();
        let rec = Reconciler::new(
            Box::new(driver.clone()),
            policy,
            LoopOptions::default(),
            StatusHandle::new(Err("starting".into())),
        );
        Run {
            rec,
            driver,
            log: LogBuf::default(),
        }
    }

    fn pass(&mut self, snap: WorkloadSnapshot) -> String {
        let log = self.log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || log.clone())
            .with_ansi(false)
            .finish();
        let rec = &mut self.rec;
        tracing::subscriber::with_default(subscriber, || {
            rec.update(SourceUpdate::Snapshot(snap));
            rec.reconcile(Instant::now());
        });
        self.log.take()
    }

    fn ztunnel(&self) -> Option<String> {
        self.driver
            .lock()
            .ztunnel
            .as_ref()
            .map(|z| z.pod.name.clone())
    }

    fn enrolled(&self, uid: &str) -> bool {
        self.driver.lock().enrolled.pods.contains_key(uid)
    }
}

const OLD: &str = "2026-01-01T00:00:00Z";
const NEWER: &str = "2026-02-01T00:00:00Z";
const NEWEST: &str = "2026-03-01T00:00:00Z";

#[test]
fn only_the_system_namespace_and_ztunnel_service_account_make_a_ztunnel() {
    let zt = json!({"app": "ztunnel"});
    let real = pod(
        "ztunnel-real",
        "istio-system",
        Some("ztunnel"),
        "10.0.0.250",
        OLD,
        zt.clone(),
    );
    // Newer than the real one, so the old selection (newest Ready app=ztunnel) took them.
    let other_ns = pod(
        "zt-other-ns",
        "evil",
        Some("ztunnel"),
        "10.0.0.66",
        NEWER,
        zt.clone(),
    );
    let other_sa = pod(
        "zt-other-sa",
        "istio-system",
        Some("default"),
        "10.0.0.67",
        NEWEST,
        zt.clone(),
    );
    let no_sa = pod(
        "zt-no-sa",
        "istio-system",
        None,
        "10.0.0.68",
        NEWEST,
        zt.clone(),
    );
    let namespaces = [("istio-system", false), ("evil", true)];

    let mut run = Run::new(&[]);
    let log = run.pass(snapshot(
        &[
            real.clone(),
            other_ns.clone(),
            other_sa.clone(),
            no_sa.clone(),
        ],
        &namespaces,
    ));
    assert_eq!(run.ztunnel().as_deref(), Some("ztunnel-real"), "{log}");
    for (key, reason) in [
        (
            "evil/zt-other-ns",
            r#"namespace "evil", not the system namespace "istio-system""#,
        ),
        (
            "istio-system/zt-other-sa",
            r#"service account "default", not "ztunnel""#,
        ),
        (
            "istio-system/zt-no-sa",
            r#"service account "default", not "ztunnel""#,
        ),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains("ignoring untrusted ztunnel pod") && l.contains(key))
            .unwrap_or_else(|| panic!("no warning for {key}:\n{log}"));
        assert!(line.contains("WARN") && line.contains(reason), "{line}");
    }
    assert!(
        !log.lines()
            .any(|l| l.contains("untrusted") && l.contains("ztunnel-real")),
        "{log}"
    );
    // An impostor in an ambient namespace is an ordinary pod: captured, not exempt.
    assert!(run.enrolled("uid-zt-other-ns"), "{log}");

    // Logged once per pod, not on every pass.
    let again = run.pass(snapshot(
        &[
            real.clone(),
            other_ns.clone(),
            other_sa.clone(),
            no_sa.clone(),
        ],
        &namespaces,
    ));
    assert!(!again.contains("untrusted ztunnel pod"), "{again}");

    // The real one gone: no ztunnel at all (fail closed), the impostors are never chosen.
    let log = run.pass(snapshot(&[other_ns, other_sa, no_sa], &namespaces));
    assert_eq!(run.ztunnel(), None, "{log}");
}

#[test]
fn the_identity_comes_from_the_flags() {
    let zt = json!({"app": "ztunnel"});
    let custom = pod(
        "zt-custom",
        "mesh-system",
        Some("zt-sa"),
        "10.0.0.70",
        OLD,
        zt.clone(),
    );
    let default_place = pod(
        "zt-default",
        "istio-system",
        Some("ztunnel"),
        "10.0.0.71",
        NEWER,
        zt,
    );
    let namespaces = [("istio-system", false), ("mesh-system", false)];
    let mut run = Run::new(&[
        "--system-namespace=mesh-system",
        "--ztunnel-service-account=zt-sa",
    ]);
    let log = run.pass(snapshot(
        &[custom.clone(), default_place.clone()],
        &namespaces,
    ));
    assert_eq!(run.ztunnel().as_deref(), Some("zt-custom"), "{log}");
    assert!(
        log.contains("ignoring untrusted ztunnel pod") && log.contains("istio-system/zt-default"),
        "{log}"
    );

    // Defaults: Istio's chart.
    let cli = Cli::try_parse_from(["meshcni-agent"]).expect("defaults");
    assert_eq!(cli.args.system_namespace, "istio-system");
    assert_eq!(cli.args.ztunnel_service_account, "ztunnel");
    let snap = snapshot(&[custom, default_place], &namespaces);
    let chosen = active_ztunnel(&snap, &ZtunnelIdentity::default()).expect("zt");
    assert_eq!(chosen.pod.name, "zt-default");

    // Values that cannot name a namespace / service account are refused.
    for bad in [
        "--system-namespace=",
        "--system-namespace=Istio_System",
        "--ztunnel-service-account=",
        "--ztunnel-service-account=-zt",
    ] {
        let err = Cli::try_parse_from(["meshcni-agent", bad]).expect_err(bad);
        let flag = bad.split('=').next().unwrap_or(bad);
        assert!(err.to_string().contains(flag), "{bad}: {err}");
    }
}

// ---- netns discovery --------------------------------------------------------------------

const HOST: &str = "10.244.1.1";
const ZT_IP: &str = "10.244.1.5";

/// One link of `ns`: (ifindex, name).
fn ifindex(ns: &Netns, name: &str) -> u32 {
    let out = ns.ip(&["-o", "link", "show", name]).expect("ip link show");
    out.split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex in {out:?}"))
}

/// Everything a driver could write into a netns: iptables of both flavours, nft, ip rules,
/// all routes, links, ipsets, the rp_filter/accept_local sysctls of all/default/every link.
fn state(ns: &Netns) -> String {
    let s = NodeState::capture(ns.path()).expect("capture");
    let mut out = format!(
        "{}{}{}{}{}{}",
        s.iptables_nft, s.iptables_legacy, s.ip_rule, s.routes, s.links, s.ipsets
    );
    out.push_str(&ns.exec_ok("nft", &["list", "ruleset"]).expect("nft"));
    let links = ns.ip(&["-o", "link", "show"]).expect("links");
    let mut keys = vec!["all".to_string(), "default".to_string()];
    for l in links.lines() {
        if let Some(name) = l.split(':').nth(1) {
            keys.push(name.trim().split('@').next().unwrap_or("").to_string());
        }
    }
    for k in keys {
        for s in ["rp_filter", "accept_local"] {
            let key = format!("net.ipv4.conf.{k}.{s}");
            if let Ok(v) = ns.read_sysctl(&key) {
                out.push_str(&format!("{key}={v}\n"));
            }
        }
    }
    out
}

struct DecoyLab {
    node: Netns,
    ztunnel: Netns,
    /// Namespaces holding links with the indexes of the real peer (the "decoys").
    decoys: Vec<Netns>,
    dir: PathBuf,
    tmp: tempfile::TempDir,
}

/// Node netns + ztunnel netns (ptp veth `vzt` ↔ `eth0`, ztunnel at 10.244.1.5) + decoys:
/// * two netns each with a veth pair whose ends have exactly the indexes of `eth0` (in the
///   ztunnel netns) and of `vzt` (in the node netns), i.e. an index-only match;
/// * the node netns itself, under another name in the netns dir, holding a veth at `eth0`'s
///   index whose peer (in a third netns) has `vzt`'s index.
///
/// The netns dir lists the decoys first (`a-…`, `b-…`, `c-…`) and the real one last.
fn decoy_lab() -> DecoyLab {
    let node = Netns::new("dnode").expect("node netns (needs root)");
    node.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
    let ztunnel = Netns::new("dzt").expect("ztunnel netns");
    // Keep the index eth0 will get in the ztunnel netns busy in the node netns while `vzt`
    // is created, so it is free afterwards for the node-alias decoy.
    node.ip(&[
        "link", "add", "hold0", "type", "veth", "peer", "name", "hold1",
    ])
    .expect("placeholder veth");
    veth(&node, "vzt", &ztunnel, "eth0").expect("veth");
    node.ip(&["link", "del", "hold0"]).expect("del placeholder");
    ztunnel
        .add_addr("eth0", &format!("{ZT_IP}/32"))
        .expect("addr");
    ztunnel
        .ip(&["route", "add", HOST, "dev", "eth0", "scope", "link"])
        .expect("gw route");
    ztunnel.add_default_route(HOST).expect("default route");
    node.add_addr("vzt", &format!("{HOST}/32"))
        .expect("host addr");
    node.ip(&[
        "route",
        "add",
        &format!("{ZT_IP}/32"),
        "dev",
        "vzt",
        "scope",
        "link",
    ])
    .expect("route");

    let peer = ifindex(&ztunnel, "eth0").to_string();
    let vzt = ifindex(&node, "vzt").to_string();
    assert_ne!(
        peer, vzt,
        "lab: the two indexes must differ for the node-alias decoy"
    );
    let mut decoys = Vec::new();
    for tag in ["decoy1", "decoy2"] {
        let d = Netns::new(tag).expect("decoy netns");
        d.ip(&[
            "link", "add", "dk", "index", &peer, "type", "veth", "peer", "name", "dv", "index",
            &vzt,
        ])
        .expect("decoy veth with colliding indexes");
        d.ip(&["link", "set", "dk", "up"]).expect("up");
        d.ip(&["link", "set", "dv", "up"]).expect("up");
        decoys.push(d);
    }
    let far = Netns::new("dfar").expect("third netns");
    node.ip(&[
        "link",
        "add",
        "nk",
        "index",
        &peer,
        "type",
        "veth",
        "peer",
        "name",
        "fv",
        "index",
        &vzt,
        "netns",
        far.name(),
    ])
    .expect("node veth with colliding indexes");
    decoys.push(far);

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("netns");
    std::fs::create_dir_all(&dir).expect("netns dir");
    let link = |target: &Path, name: &str| {
        std::os::unix::fs::symlink(target, dir.join(name)).expect("symlink");
    };
    link(decoys[0].path(), "a-decoy1");
    link(decoys[1].path(), "b-decoy2");
    link(node.path(), "c-node-by-another-name");
    link(ztunnel.path(), "z-ztunnel");
    // Not a netns at all: skipped, not fatal.
    std::fs::write(dir.join("d-not-a-netns"), "x").expect("file");
    DecoyLab {
        node,
        ztunnel,
        decoys,
        dir,
        tmp,
    }
}

impl DecoyLab {
    fn driver(&self) -> IptablesDriver {
        IptablesDriver::new(IptablesModeConfig {
            node_netns: self.node.path().to_path_buf(),
            netns_dir: self.dir.clone(),
            state_file: self.tmp.path().join("state/iptables-mode.json"),
            ..IptablesModeConfig::default()
        })
        .expect("driver")
    }

    fn ztunnel_info(&self, annotation: Option<&Path>) -> ZtunnelInfo {
        let mut annotations = BTreeMap::new();
        if let Some(p) = annotation {
            annotations.insert(
                ZTUNNEL_NETNS_ANNOTATION.to_string(),
                p.display().to_string(),
            );
        }
        ZtunnelInfo {
            pod: PodId::new("uid-zt", "istio-system", "ztunnel"),
            ips: vec![ZT_IP.parse::<Ipv4Addr>().expect("ip").into()],
            created: OLD.into(),
            annotations,
        }
    }

    fn decoy_states(&self) -> Vec<String> {
        self.decoys.iter().map(state).collect()
    }
}

fn save(ns: &Netns) -> String {
    ns.exec_ok("iptables-nft-save", &[]).expect("save")
        + &ns.exec_ok("iptables-legacy-save", &[]).expect("save")
}

#[test]
fn netns_scan_matches_the_peer_by_identity_and_leaves_decoys_alone() {
    let lab = decoy_lab();
    let before = lab.decoy_states();
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(None)))
        .expect("install with a scanned netns");
    assert_eq!(
        d.state().ztunnel_netns.as_deref(),
        Some(lab.dir.join("z-ztunnel").as_path()),
        "the real ztunnel netns must be chosen"
    );
    assert_eq!(d.state().ztunnel_eth.as_deref(), Some("eth0"));
    let zsave = save(&lab.ztunnel);
    assert!(zsave.contains("TPROXY --on-port 15001"), "{zsave}");
    assert!(lab.ztunnel.ip(&["link", "show", "pistioin"]).is_ok());
    let after = lab.decoy_states();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(a, b, "decoy netns {} was written to", lab.decoys[i].name());
    }
    d.uninstall().expect("uninstall");
    assert_eq!(lab.decoy_states(), before, "decoys after uninstall");
}

#[test]
fn an_annotation_naming_another_netns_is_refused() {
    let lab = decoy_lab();
    let before = lab.decoy_states();
    let node_before = state(&lab.node);
    for (target, why) in [
        (lab.dir.join("a-decoy1"), "is not the netns of its peer"),
        (
            lab.dir.join("c-node-by-another-name"),
            "is the node's own netns",
        ),
    ] {
        let mut d = lab.driver();
        let err = d
            .ztunnel_changed(Some(&lab.ztunnel_info(Some(&target))))
            .expect_err("a netns that is not the veth peer's");
        assert!(
            err.message.contains(why)
                && err.message.contains(&target.display().to_string())
                && err.message.contains("vzt"),
            "{err}"
        );
    }
    assert_eq!(lab.decoy_states(), before);
    assert_eq!(
        state(&lab.node),
        node_before,
        "nothing installed in the node netns"
    );
    // The right annotation works.
    let mut d = lab.driver();
    d.ztunnel_changed(Some(&lab.ztunnel_info(Some(lab.ztunnel.path()))))
        .expect("install with the annotation");
    assert_eq!(lab.decoy_states(), before);
    d.uninstall().expect("uninstall");
}
