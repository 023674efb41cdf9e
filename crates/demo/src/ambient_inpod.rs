//! Demo section "ambient mode (inpod redirect)": two nodes of a [`MultiNodeLab`], the real
//! `meshcni-agent` per node (a child process inside the node netns,
//! `--ambient-redirect-mode inpod`, workloads from a local file, its ZDS socket, `--host-proc-dir`
//! and `--netns-dir` in the demo's work dir), and per node the test kit's in-pod ztunnel
//! stand-in ([`InpodZtunnelStandIn`]: a real ZDS client connected to that agent's socket, which
//! enters every pod netns it is handed and listens on 15001/15006/15008 there, its sockets
//! marked 0x539). Pods are started through the real `meshcni` plugin (exec'd with CNI
//! environment, chained after the lab's ptp wiring); the plugin's ADD returns only once the
//! agent wrote the in-pod rules and ztunnel acked the pod. Prints one pod's in-pod rules and the
//! node's probe SNAT, a table of flows with where each was captured (plus a probe-like
//! connection from the node to a captured pod), then uninstalls and shows the nodes and pods
//! are as before.
//!
//! Pods: as the iptables section ([`crate::ambient::PODS`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshcni_testkit::stack::{
    Agent, AgentDirs, NodeState, StackMode, exec_in, grep, pod_json, write_workloads,
};
use meshcni_testkit::ztunnel::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use meshcni_testkit::{
    ConnectOpts, InpodHop, InpodZtunnelConfig, InpodZtunnelStandIn, MultiNodeLab, TcpServer,
};

use crate::ambient::{PODS, PORT, add_pod, namespaces, record_netns, unexpected};
use crate::error::DemoError;
use crate::flows::{Row, table};
use crate::node::Node;
use crate::{SectionEnv, heading, indent};

/// Source of kubelet probes after the node's SNAT (`--host-probe-snat-ip`, left at its default).
const PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// A hop the flow must take: (pod whose in-pod ztunnel listener took it, listener port).
type Hop = (&'static str, u16);

/// (flow, from, to, expected hops in order)
const FLOWS: &[(&str, &str, &str, &[Hop])] = &[
    ("captured→uncaptured", "a", "b", &[("a", OUTBOUND_PORT)]),
    (
        "captured→uncaptured (x-node)",
        "a",
        "e",
        &[("a", OUTBOUND_PORT)],
    ),
    ("uncaptured→captured", "b", "a", &[("a", INBOUND_PORT)]),
    (
        "uncaptured→captured (x-node)",
        "e",
        "a",
        &[("a", INBOUND_PORT)],
    ),
    (
        "captured→captured (same node)",
        "a",
        "d",
        &[("a", OUTBOUND_PORT), ("d", HBONE_PORT)],
    ),
    (
        "captured→captured (x-node)",
        "a",
        "c",
        &[("a", OUTBOUND_PORT), ("c", HBONE_PORT)],
    ),
    ("non-ambient→non-ambient", "b", "e", &[]),
    ("opt-out→non-ambient", "o", "b", &[]),
    ("non-ambient→opt-out", "e", "o", &[]),
];

/// Everything the section runs; dropped in field order (agents first, the lab last).
struct Stack {
    agents: Vec<Agent>,
    ztunnels: Vec<InpodZtunnelStandIn>,
    servers: BTreeMap<&'static str, TcpServer>,
    lab: MultiNodeLab,
}

/// The pod a kit uid (`uid-<name>`) belongs to.
fn pod_of(uid: &str) -> &'static str {
    PODS.iter()
        .map(|p| p.1)
        .find(|name| uid.strip_prefix("uid-") == Some(*name))
        .unwrap_or("?")
}

/// Run the section.
pub fn run(_node: &mut Node, env: &SectionEnv) -> Result<Vec<Row>, DemoError> {
    let agent_bin = env.plugin_dir.join("meshcni-agent");
    let plugin = env.plugin_dir.join("meshcni");
    for (bin, what) in [(&agent_bin, "meshcni-agent"), (&plugin, "meshcni")] {
        if !bin.is_file() {
            return Err(DemoError::Precondition(format!(
                "{what} not found at {} (build the workspace first)",
                bin.display()
            )));
        }
    }
    let node1: Vec<&str> = PODS.iter().filter(|p| p.0 == 1).map(|p| p.1).collect();
    let node2: Vec<&str> = PODS.iter().filter(|p| p.0 == 2).map(|p| p.1).collect();
    let lab = MultiNodeLab::new("inp", &[&node1, &node2])?;
    record_netns(&env.work, &lab)?;
    // Every netns the agents may touch: the nodes (probe SNAT) and the pods (in-pod rules).
    let mut watched: Vec<(String, PathBuf)> = Vec::new();
    for n in &lab.nodes {
        watched.push((format!("node{}", n.index), n.netns.path().to_path_buf()));
    }
    for (_, name, _, _) in PODS {
        watched.push((
            format!("pod {name}"),
            lab.pod(name).netns.path().to_path_buf(),
        ));
    }
    let pre: Vec<NodeState> = watched
        .iter()
        .map(|(_, p)| NodeState::capture(p).map_err(unexpected))
        .collect::<Result<_, _>>()?;
    let mut stack = Stack {
        agents: Vec::new(),
        ztunnels: Vec::new(),
        servers: BTreeMap::new(),
        lab,
    };
    let lab = &stack.lab;
    println!(
        "  2 nodes ({}, {}) on an underlay bridge; per node the test kit's in-pod ztunnel \
         stand-in (InpodZtunnelStandIn, not ztunnel): a real ZDS client of that node's agent \
         that enters each pod netns it is handed and listens on 15001/15006/15008 inside it \
         (sockets marked 0x539)",
        lab.node(1).netns.name(),
        lab.node(2).netns.name()
    );
    for (_, name, _, _) in PODS {
        let pod = lab.pod(name);
        stack
            .servers
            .insert(name, TcpServer::start(&pod.netns, pod.addr(PORT))?);
    }

    heading("meshcni-agent per node (nsenter --net=<node netns>, --ambient-redirect-mode inpod)");
    let mut dirs = Vec::new();
    for n in &lab.nodes {
        let node_name = format!("node{}", n.index);
        let d = AgentDirs::create(&env.work.join(format!("inpod-{node_name}")), &plugin)
            .map_err(unexpected)?;
        let pods: Vec<_> = PODS
            .iter()
            .filter(|p| p.0 == n.index)
            .map(|(_, name, ns, labels)| pod_json(ns, name, &node_name, None, labels, &[]))
            .collect();
        write_workloads(&d.workloads, &namespaces(), &pods).map_err(unexpected)?;
        let started = Instant::now();
        let mut agent = Agent::start_mode(
            &agent_bin,
            n.netns.path(),
            &node_name,
            &d,
            StackMode::Inpod,
            &[],
        )
        .map_err(unexpected)?;
        let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&d.zds_socket))?;
        let (readyz, config) = agent
            .wait_ready(Duration::from_secs(20))
            .map_err(unexpected)?;
        println!(
            "    {node_name}: pid {} ready in {} ms (/readyz on {readyz} in the node netns); ZDS socket {}, ztunnel stand-in connected",
            agent.pid().unwrap_or_default(),
            started.elapsed().as_millis(),
            d.zds_socket.display()
        );
        println!("      {} = {config}", d.ambient_config().display());
        stack.agents.push(agent);
        stack.ztunnels.push(zt);
        dirs.push(d);
    }

    heading("pods: CNI ADD through the meshcni plugin (chained after the lab's ptp wiring)");
    let mut captured = Vec::new();
    for (node, name, ns, labels) in PODS {
        let pod = lab.pod(name);
        let node_name = format!("node{node}");
        let out = add_pod(&plugin, lab, &dirs, &stack.agents, *node, name, ns, labels)?;
        let handed = out.stderr.contains("handed to the node agent");
        let zt = &stack.ztunnels[usize::from(*node) - 1];
        let held = zt.workload(&format!("uid-{name}")).is_some();
        if handed != held {
            return Err(unexpected(format!(
                "{ns}/{name}: handed to the agent: {handed}, held by ztunnel when ADD returned: {held}"
            )));
        }
        if handed {
            captured.push(IpAddr::V4(pod.ip));
        }
        println!(
            "    {node_name} {:<8} {:<12} ADD ok in {:>3} ms: {}",
            format!("{ns}/{name}"),
            pod.ip.to_string(),
            out.took.as_millis(),
            if handed {
                "ambient → in-pod rules + ztunnel acked before ADD returned"
            } else if labels.is_empty() {
                "not ambient → passed through"
            } else {
                "opted out → passed through"
            }
        );
    }
    // The kubelet then reports the pods' IPs: the watch (here the file) catches up.
    for n in &lab.nodes {
        let node_name = format!("node{}", n.index);
        let pods: Vec<_> = PODS
            .iter()
            .filter(|p| p.0 == n.index)
            .map(|(_, name, ns, labels)| {
                pod_json(ns, name, &node_name, Some(lab.pod(name).ip), labels, &[])
            })
            .collect();
        write_workloads(
            &dirs[usize::from(n.index) - 1].workloads,
            &namespaces(),
            &pods,
        )
        .map_err(unexpected)?;
    }
    // ztunnel learns the captured workloads (HBONE destinations) from its control plane; the
    // stand-ins from us.
    for z in &stack.ztunnels {
        z.set_captured(captured.iter().copied());
    }

    show_state(lab, &stack.ztunnels[0])?;

    heading("flows (real TCP; witnesses: in-pod ztunnel stand-ins' records + the server's peer)");
    let mut rows = Vec::new();
    for (flow, from, to, hops) in FLOWS {
        rows.push(run_flow(&stack, flow, from, to, hops)?);
    }
    rows.push(run_probe(&stack, "a")?);
    indent(&table(&rows));

    heading("uninstall: uninstall marker = true, then SIGTERM each agent");
    let agents = std::mem::take(&mut stack.agents);
    let mut statuses = Vec::new();
    for (mut agent, d) in agents.into_iter().zip(&dirs) {
        std::fs::write(&d.marker, "true")
            .map_err(|e| DemoError::io(format!("write {}", d.marker.display()), e))?;
        statuses.push(
            agent
                .terminate(Duration::from_secs(10))
                .map_err(unexpected)?,
        );
    }
    for (i, status) in statuses.iter().enumerate() {
        println!("    node{}: agent exited ({status})", i + 1);
    }
    let mut clean = statuses.iter().all(|s| s.success());
    let mut same = Vec::new();
    for ((what, path), before) in watched.iter().zip(&pre) {
        let after = NodeState::capture(path).map_err(unexpected)?;
        let diff = before.diff(&after);
        if diff.is_empty() {
            same.push(what.clone());
        } else {
            clean = false;
            println!("    {what}: NOT CLEAN:");
            indent(&diff.join("\n"));
        }
    }
    println!(
        "    identical to before the agents (iptables nft+legacy, ip rule, all routes, links, ipsets): {}",
        same.join(", ")
    );
    for (i, z) in stack.ztunnels.iter().enumerate() {
        println!(
            "    node{}: ztunnel stand-in holds {} workload(s) after uninstall",
            i + 1,
            z.workloads().len()
        );
    }
    if !clean || stack.ztunnels.iter().any(|z| !z.workloads().is_empty()) {
        return Err(unexpected("uninstall left state behind (see above)".into()));
    }
    Ok(rows)
}

fn show_state(lab: &MultiNodeLab, zt: &InpodZtunnelStandIn) -> Result<(), DemoError> {
    let pod = lab.pod("a");
    let pns = pod.netns.path();
    let run =
        |ns: &Path, program: &str, args: &[&str]| exec_in(ns, program, args).map_err(unexpected);
    // The rules go in with the netns's own iptables flavour; show the one holding them.
    // (Whole saves only: `iptables-legacy-save -t <table>` would instantiate that table.)
    let mut shown = false;
    for bin in ["iptables-nft-save", "iptables-legacy-save"] {
        let text = run(pns, bin, &[])?;
        if text.contains("ISTIO_") {
            heading(&format!("pod mesh/a ({}): `{bin}` (in-pod rules)", pod.ip));
            indent(&grep(&text, &["*", "ISTIO", "COMMIT"]));
            shown = true;
        }
    }
    if !shown {
        return Err(unexpected(format!(
            "no in-pod rules in pod a's netns {}",
            pns.display()
        )));
    }
    heading(
        "pod mesh/a: `ip rule` and `ip route show table 100` (replies of ztunnel's inbound connections stay local)",
    );
    indent(&grep(&run(pns, "ip", &["rule"])?, &["0x111", "100"]));
    indent(&run(pns, "ip", &["route", "show", "table", "100"])?);
    if let Some(w) = zt.workload("uid-a") {
        heading("pod mesh/a: what the ztunnel stand-in holds for it (from ZDS AddWorkload)");
        let info = w
            .info
            .map(|i| format!("{}/{} (sa {})", i.namespace, i.name, i.service_account))
            .unwrap_or_default();
        let listening: Vec<String> = w.listening.iter().map(ToString::to_string).collect();
        indent(&format!(
            "uid {} {info}, netns dev:ino {}:{}, listening inside the pod on {}",
            w.uid,
            w.netns.0,
            w.netns.1,
            listening.join(" ")
        ));
    }
    let ns = lab.node(1).netns.path();
    for bin in ["iptables-nft-save", "iptables-legacy-save"] {
        let text = run(ns, bin, &[])?;
        if text.contains("ISTIO_POSTRT") {
            heading(&format!(
                "node1: `{bin}` (kubelet probe SNAT — the only rule in the node netns)"
            ));
            indent(&grep(&text, &["*nat", "ISTIO", "COMMIT"]));
        }
    }
    heading("node1: `ipset list istio-inpod-probes-v4` (enrolled pods, comment = pod uid)");
    indent(&grep(
        &run(ns, "ipset", &["list", "istio-inpod-probes-v4"])?,
        &["Name", "Type", "Number", "comment"],
    ));
    Ok(())
}

fn describe(hop: &InpodHop) -> String {
    let pod = pod_of(&hop.uid);
    let node = PODS.iter().find(|p| p.1 == pod).map_or(0, |p| p.0);
    match hop.listener_port {
        HBONE_PORT => format!("node{node}/ztunnel in {pod}:{HBONE_PORT} (HBONE)"),
        p => format!("node{node}/ztunnel in {pod}:{p}"),
    }
}

fn run_flow(
    stack: &Stack,
    flow: &str,
    from: &str,
    to: &str,
    want: &[Hop],
) -> Result<Row, DemoError> {
    let lab = &stack.lab;
    let (f, t) = (lab.pod(from), lab.pod(to));
    for z in &stack.ztunnels {
        z.take_hops();
    }
    let payload = format!("{flow} {from}->{to}\n");
    let opts = ConnectOpts {
        payload: payload.clone().into_bytes(),
        ..Default::default()
    };
    let reply = meshcni_testkit::connect_text(&f.netns, t.addr(PORT), &opts);
    // Hops are recorded as the stand-in handles them; give the last one a moment.
    let deadline = Instant::now() + Duration::from_millis(if want.is_empty() { 50 } else { 2000 });
    let mut got: Vec<InpodHop> = loop {
        let got: Vec<InpodHop> = stack.ztunnels.iter().flat_map(|z| z.hops()).collect();
        if (got.len() >= want.len() && !want.is_empty()) || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Outbound first (15001), then what it led to.
    got.sort_by_key(|h| h.listener_port != OUTBOUND_PORT);
    let seen: Vec<(&str, u16)> = got
        .iter()
        .map(|h| (pod_of(&h.uid), h.listener_port))
        .collect();
    let dst = t.addr(PORT);
    let src = IpAddr::V4(f.ip);
    let (server_peer, reply_ok) = match &reply {
        Ok(text) => {
            let peer: Option<SocketAddr> = text
                .lines()
                .next()
                .and_then(|l| l.split(" peer:").nth(1))
                .and_then(|p| p.trim().parse().ok());
            (
                peer.map_or_else(|| format!("? {text:?}"), |p| p.to_string()),
                peer.is_some_and(|p| p.ip() == src) && text.ends_with(&payload),
            )
        }
        Err(e) => (format!("FAILED: {e}"), false),
    };
    let original_dst = got
        .first()
        .map_or_else(|| "-".to_string(), |h| h.original_dst.to_string());
    let dst_ok = got.iter().all(|h| {
        h.error.is_none()
            && match h.listener_port {
                HBONE_PORT => h.hbone == Some((dst, src)),
                _ => h.original_dst == dst && h.peer.ip() == src,
            }
    });
    let captured_at = if got.is_empty() {
        "— (direct)".to_string()
    } else {
        got.iter().map(describe).collect::<Vec<_>>().join(" → ")
    };
    Ok(Row {
        flow: flow.to_string(),
        from: format!("{from} {}", f.ip),
        to: format!("{to} {dst}"),
        captured_at,
        original_dst,
        server_peer,
        as_expected: reply_ok && dst_ok && seen == want,
    })
}

/// A kubelet-style probe: a TCP connection from a socket of the node itself to a captured pod's
/// app port. The node's `ISTIO_POSTRT` rewrites its source to 169.254.7.127 and the pod's rules
/// let that source through uncaptured, so the app sees the probe address and ztunnel nothing.
fn run_probe(stack: &Stack, to: &str) -> Result<Row, DemoError> {
    let lab = &stack.lab;
    let t = lab.pod(to);
    let node = lab.node_of(t);
    for z in &stack.ztunnels {
        z.take_hops();
    }
    let payload = format!("probe node{}->{to}\n", node.index);
    let opts = ConnectOpts {
        payload: payload.clone().into_bytes(),
        ..Default::default()
    };
    let reply = meshcni_testkit::connect_text(&node.netns, t.addr(PORT), &opts);
    std::thread::sleep(Duration::from_millis(50));
    let got: Vec<InpodHop> = stack.ztunnels.iter().flat_map(|z| z.hops()).collect();
    let probe_src = IpAddr::V4(PROBE_SNAT_V4);
    let (server_peer, reply_ok) = match &reply {
        Ok(text) => {
            let peer: Option<SocketAddr> = text
                .lines()
                .next()
                .and_then(|l| l.split(" peer:").nth(1))
                .and_then(|p| p.trim().parse().ok());
            (
                peer.map_or_else(|| format!("? {text:?}"), |p| p.to_string()),
                peer.is_some_and(|p| p.ip() == probe_src) && text.ends_with(&payload),
            )
        }
        Err(e) => (format!("FAILED: {e}"), false),
    };
    Ok(Row {
        flow: "kubelet-style probe (node→captured)".to_string(),
        from: format!("node{} {}", node.index, node.underlay_ip),
        to: format!("{to} {}", t.addr(PORT)),
        captured_at: if got.is_empty() {
            format!("— (direct; node SNAT to {probe_src})")
        } else {
            got.iter().map(describe).collect::<Vec<_>>().join(" → ")
        },
        original_dst: "-".to_string(),
        server_peer,
        as_expected: reply_ok && got.is_empty(),
    })
}
