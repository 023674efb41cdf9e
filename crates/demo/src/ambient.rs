//! Demo section "ambient mode (iptables or ebpf redirect)": two nodes of a [`MultiNodeLab`], a
//! ztunnel stand-in in each node's ztunnel pod, the real `meshcni-agent` running per node (a
//! child process inside the node netns, `--ambient-redirect-mode iptables|ebpf`, workloads from
//! a local file), pods started through the real `meshcni` plugin (exec'd with CNI environment,
//! chained after the lab's ptp wiring). Prints the node state the way an operator inspects it
//! (iptables mode: chains, rules, routes, tunnels, ipset; ebpf mode: the tc programs attached,
//! the pinned links and maps, via `bpftool` scoped to the agent's pin dir and the lab's netns,
//! and proof that no iptables/nft rule, ipset or policy route exists), a table of flows with
//! where each was captured, then uninstalls and shows both netns of each node are as before.
//!
//! In ebpf mode each agent pins under a private bpffs mounted on `<work>/ambient-node<i>/bpffs`
//! (recorded in `<work>/mounts` for the caller's trap; unmounted when the section ends).
//!
//! Pods (namespace `mesh` is labelled `istio.io/dataplane-mode=ambient`, `plain` is not):
//!
//! | node | pod | namespace | note |
//! |---|---|---|---|
//! | 1 | a | mesh | ambient |
//! | 1 | b | plain | not ambient |
//! | 1 | d | mesh | ambient |
//! | 1 | o | mesh | opt-out (`istio.io/dataplane-mode=none`) |
//! | 2 | c | mesh | ambient |
//! | 2 | e | plain | not ambient |

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use meshcni_testkit::ztunnel::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use meshcni_testkit::{ConnectOpts, MultiNodeLab, TcpServer, ZtunnelHop, ZtunnelStandIn};
use serde_json::Value;

use crate::error::DemoError;
use crate::flows::{Row, table};
use crate::node::Node;
use crate::{AmbientMode, SectionEnv};
use crate::{heading, indent};
use meshcni_testkit::NetnsSnapshot;
use meshcni_testkit::stack::{
    Agent, AgentDirs, DATAPLANE_MODE, StackMode, exec_in, grep, namespace_json, plugin_add,
    pod_json, write_pod_metadata, write_workloads, ztunnel_json,
};

pub(crate) const PORT: u16 = 8080;

/// (node, pod, namespace, labels, note)
pub(crate) type PodSpec = (
    u8,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

pub(crate) const PODS: &[PodSpec] = &[
    (1, "a", "mesh", &[]),
    (1, "b", "plain", &[]),
    (1, "d", "mesh", &[]),
    (1, "o", "mesh", &[(DATAPLANE_MODE, "none")]),
    (2, "c", "mesh", &[]),
    (2, "e", "plain", &[]),
];

/// A hop the flow must take: (node index, ztunnel listener port).
type Hop = (u8, u16);

/// CNI ADD of one pod of [`PODS`] through the plugin, as its node's runtime would (its
/// metadata written first). A failed ADD is an error naming the pod, with the agent's log.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_pod(
    plugin: &Path,
    lab: &MultiNodeLab,
    dirs: &[AgentDirs],
    agents: &[Agent],
    node: u8,
    name: &str,
    ns: &str,
    labels: &[(&str, &str)],
) -> Result<meshcni_testkit::stack::CniOutcome, DemoError> {
    let pod = lab.pod(name);
    let d = &dirs[usize::from(node) - 1];
    let obj = pod_json(ns, name, &format!("node{node}"), None, labels, &[]);
    let ns_obj = namespaces()
        .into_iter()
        .find(|n| n["metadata"]["name"] == ns)
        .ok_or_else(|| unexpected(format!("no namespace {ns}")))?;
    write_pod_metadata(&d.meta, &obj, &ns_obj).map_err(unexpected)?;
    let out = plugin_add(
        plugin,
        lab.node(node).netns.path(),
        pod.netns.path(),
        ns,
        name,
        pod.ip,
        d,
    )
    .map_err(unexpected)?;
    if !out.success {
        return Err(unexpected(format!(
            "CNI ADD of {ns}/{name} failed: {}{}\nagent log:\n{}",
            out.stdout,
            out.stderr,
            agents[usize::from(node) - 1].log()
        )));
    }
    Ok(out)
}

/// (flow, from, to, expected hops in order)
const FLOWS: &[(&str, &str, &str, &[Hop])] = &[
    ("captured→uncaptured", "a", "b", &[(1, OUTBOUND_PORT)]),
    (
        "captured→uncaptured (x-node)",
        "a",
        "e",
        &[(1, OUTBOUND_PORT)],
    ),
    ("uncaptured→captured", "b", "a", &[(1, INBOUND_PORT)]),
    (
        "uncaptured→captured (x-node)",
        "e",
        "a",
        &[(1, INBOUND_PORT)],
    ),
    (
        "captured→captured (hairpin)",
        "a",
        "d",
        &[(1, OUTBOUND_PORT), (1, HBONE_PORT)],
    ),
    (
        "captured→captured (HBONE)",
        "a",
        "c",
        &[(1, OUTBOUND_PORT), (2, HBONE_PORT)],
    ),
    ("non-ambient→non-ambient", "b", "e", &[]),
    ("opt-out→non-ambient", "o", "b", &[]),
    ("non-ambient→opt-out", "e", "o", &[]),
];

pub(crate) fn namespaces() -> Vec<Value> {
    vec![
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
        namespace_json("plain", &[]),
        namespace_json("istio-system", &[]),
    ]
}

pub(crate) fn unexpected(e: String) -> DemoError {
    DemoError::Unexpected(e)
}

pub(crate) fn record_netns(work: &Path, lab: &MultiNodeLab) -> Result<(), DemoError> {
    let path = work.join("netns");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| DemoError::io(format!("open {}", path.display()), e))?;
    let mut names = vec![lab.fabric.name().to_string()];
    for n in &lab.nodes {
        names.push(n.netns.name().to_string());
        names.push(n.ztunnel.netns.name().to_string());
        names.extend(n.pods.iter().map(|p| p.netns.name().to_string()));
    }
    for n in names {
        writeln!(f, "{n}").map_err(|e| DemoError::io(format!("write {}", path.display()), e))?;
    }
    Ok(())
}

/// A private bpffs mounted by the demo (ebpf mode); lazily unmounted on drop.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn mount(dir: &Path, work: &Path) -> Result<Bpffs, DemoError> {
        // Recorded first: the caller's trap unmounts it if the demo dies.
        let list = work.join("mounts");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&list)
            .map_err(|e| DemoError::io(format!("open {}", list.display()), e))?;
        writeln!(f, "{}", dir.display())
            .map_err(|e| DemoError::io(format!("write {}", list.display()), e))?;
        nix::mount::mount(
            Some("bpf"),
            dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| unexpected(format!("mount a bpffs on {}: {e}", dir.display())))?;
        Ok(Bpffs(dir.to_path_buf()))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Everything the section runs; dropped in field order (agents first, the lab last).
struct Stack {
    agents: Vec<Agent>,
    bpffs: Vec<Bpffs>,
    ztunnels: Vec<ZtunnelStandIn>,
    servers: BTreeMap<&'static str, TcpServer>,
    lab: MultiNodeLab,
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
    let lab = MultiNodeLab::new("amb", &[&node1, &node2])?;
    record_netns(&env.work, &lab)?;
    let mode = match env.ambient_mode {
        AmbientMode::Ebpf => StackMode::Ebpf,
        _ => StackMode::Iptables,
    };
    // Both netns of each node as they were before the agent: (name, path, snapshot).
    let mut pre: Vec<(String, std::path::PathBuf, NetnsSnapshot)> = Vec::new();
    for n in &lab.nodes {
        for (what, ns) in [("node", &n.netns), ("ztunnel netns", &n.ztunnel.netns)] {
            pre.push((
                format!("node{} {what}", n.index),
                ns.path().to_path_buf(),
                NetnsSnapshot::capture(ns.path()).map_err(unexpected)?,
            ));
        }
    }
    let mut stack = Stack {
        agents: Vec::new(),
        bpffs: Vec::new(),
        ztunnels: Vec::new(),
        servers: BTreeMap::new(),
        lab,
    };
    let lab = &stack.lab;
    println!(
        "  2 nodes ({}, {}) on an underlay bridge; per node a ztunnel pod 10.77.<n>.100 running a \
         ztunnel stand-in (the test kit's ZtunnelStandIn, not ztunnel: 15001/15006/15008)",
        lab.node(1).netns.name(),
        lab.node(2).netns.name()
    );
    for n in &lab.nodes {
        stack.ztunnels.push(ZtunnelStandIn::start(
            &n.ztunnel.netns,
            IpAddr::V4(n.ztunnel.ip),
        )?);
    }
    for (_, name, _, _) in PODS {
        let pod = lab.pod(name);
        stack
            .servers
            .insert(name, TcpServer::start(&pod.netns, pod.addr(PORT))?);
    }

    heading(&format!(
        "meshcni-agent per node (nsenter --net=<node netns>, --ambient-redirect-mode {})",
        mode.name()
    ));
    let mut dirs = Vec::new();
    for n in &lab.nodes {
        let node_name = format!("node{}", n.index);
        let d = AgentDirs::create(&env.work.join(format!("ambient-{node_name}")), &plugin)
            .map_err(unexpected)?;
        let mut pods = vec![ztunnel_json(
            &node_name,
            n.ztunnel.ip,
            n.ztunnel.netns.path(),
        )];
        for (_, name, ns, labels) in PODS.iter().filter(|p| p.0 == n.index) {
            pods.push(pod_json(ns, name, &node_name, None, labels, &[]));
        }
        write_workloads(&d.workloads, &namespaces(), &pods).map_err(unexpected)?;
        if mode == StackMode::Ebpf {
            stack.bpffs.push(Bpffs::mount(&d.bpffs, &env.work)?);
        }
        let started = Instant::now();
        let mut agent = Agent::start_mode(&agent_bin, n.netns.path(), &node_name, &d, mode, &[])
            .map_err(unexpected)?;
        let (readyz, config) = agent
            .wait_ready(Duration::from_secs(20))
            .map_err(unexpected)?;
        println!(
            "    {node_name}: pid {} ready in {} ms (/readyz on {readyz} in the node netns), {} = {config}",
            agent.pid().unwrap_or_default(),
            started.elapsed().as_millis(),
            d.ambient_config().display()
        );
        if mode == StackMode::Ebpf {
            println!(
                "      pins under {} (a private bpffs mounted on {})",
                d.bpf_pin_dir().display(),
                d.bpffs.display()
            );
        }
        stack.agents.push(agent);
        dirs.push(d);
    }

    heading("pods: CNI ADD through the meshcni plugin (chained after the lab's ptp wiring)");
    let mut captured = Vec::new();
    for (node, name, ns, labels) in PODS {
        let pod = lab.pod(name);
        let node_name = format!("node{node}");
        let out = add_pod(&plugin, lab, &dirs, &stack.agents, *node, name, ns, labels)?;
        let handed = out.stderr.contains("handed to the node agent");
        if handed {
            captured.push(IpAddr::V4(pod.ip));
        }
        println!(
            "    {node_name} {:<8} {:<12} ADD ok in {:>3} ms: {}",
            format!("{ns}/{name}"),
            pod.ip.to_string(),
            out.took.as_millis(),
            if handed {
                "ambient → agent captured it before ADD returned"
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
        let mut pods = vec![ztunnel_json(
            &node_name,
            n.ztunnel.ip,
            n.ztunnel.netns.path(),
        )];
        for (_, name, ns, labels) in PODS.iter().filter(|p| p.0 == n.index) {
            pods.push(pod_json(
                ns,
                name,
                &node_name,
                Some(lab.pod(name).ip),
                labels,
                &[],
            ));
        }
        write_workloads(
            &dirs[usize::from(n.index) - 1].workloads,
            &namespaces(),
            &pods,
        )
        .map_err(unexpected)?;
    }
    // ztunnel learns the captured workloads from its control plane; the stand-ins from us.
    for z in &stack.ztunnels {
        z.set_captured(captured.iter().copied());
    }

    let bpf_ids = match mode {
        StackMode::Ebpf => show_ebpf_state(lab, &dirs)?,
        _ => {
            show_node_state(lab, &dirs[0])?;
            Vec::new()
        }
    };

    heading("flows (real TCP; witnesses: ztunnel stand-ins' records + the server's peer)");
    let mut rows = Vec::new();
    for (flow, from, to, hops) in FLOWS {
        rows.push(run_flow(&stack, flow, from, to, hops)?);
    }
    indent(&table(&rows));

    heading("uninstall: uninstall marker = true, then SIGTERM each agent");
    let agents = std::mem::take(&mut stack.agents);
    let mut clean = true;
    for (i, (mut agent, d)) in agents.into_iter().zip(&dirs).enumerate() {
        std::fs::write(&d.marker, "true")
            .map_err(|e| DemoError::io(format!("write {}", d.marker.display()), e))?;
        let status = agent
            .terminate(Duration::from_secs(10))
            .map_err(unexpected)?;
        let n = &lab.nodes[i];
        println!("    node{}: agent exited ({status})", n.index);
        clean &= status.success();
        for (what, path, before) in pre
            .iter()
            .filter(|p| p.0.starts_with(&format!("node{} ", n.index)))
        {
            let after = NetnsSnapshot::capture(path).map_err(unexpected)?;
            let diff = before.diff(&after);
            if diff.is_empty() {
                println!(
                    "      {what}: iptables (nft+legacy), nft ruleset, ip rule, all routes, links, addresses, ipsets, sysctls identical to before the agent"
                );
            } else {
                clean = false;
                println!("      {what}: NOT CLEAN:");
                indent(&diff.join("\n"));
            }
        }
        if let Some(ids) = bpf_ids.get(i) {
            let pins = d.bpf_pin_dir();
            // The kernel frees a program or map after its last reference is dropped (deferred
            // work): give it a moment before calling it left behind.
            let deadline = Instant::now() + Duration::from_secs(3);
            let left = loop {
                let mut left = Vec::new();
                for (kind, set) in [("prog", &ids.progs), ("map", &ids.maps)] {
                    for id in set {
                        if bpf_id_exists(kind, *id)? {
                            left.push(format!("{kind} {id}"));
                        }
                    }
                }
                if left.is_empty() || Instant::now() > deadline {
                    break left;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if pins.exists() || !left.is_empty() {
                clean = false;
                println!(
                    "      NOT CLEAN: pin dir {} exists: {}; still in the kernel: {}",
                    pins.display(),
                    pins.exists(),
                    left.join(", ")
                );
            } else {
                println!(
                    "      pin dir {} removed; programs {:?} and maps {:?} no longer exist in the kernel (`bpftool prog|map show id`)",
                    pins.display(),
                    ids.progs,
                    ids.maps
                );
            }
        }
    }
    let leftovers =
        exec_in(lab.node(1).netns.path(), "ip", &["-br", "link"]).map_err(unexpected)?;
    println!("    node1 `ip -br link` after uninstall:");
    indent(&leftovers);
    if !clean {
        return Err(unexpected("uninstall left state behind (see above)".into()));
    }
    Ok(rows)
}

/// Run `bpftool args…` (in the demo's own netns: what it reads is named by our pin paths or
/// kernel ids, never a listing of the whole machine's programs).
fn bpftool(args: &[&str]) -> Result<String, DemoError> {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .map_err(|e| DemoError::io(format!("run bpftool {}", args.join(" ")), e))?;
    if !out.status.success() {
        return Err(unexpected(format!(
            "bpftool {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the kernel still has the bpf object `kind` (`prog`/`map`) with this id.
fn bpf_id_exists(kind: &str, id: u32) -> Result<bool, DemoError> {
    let out = std::process::Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .map_err(|e| DemoError::io(format!("run bpftool {kind} show id {id}"), e))?;
    Ok(out.status.success())
}

/// `ifindex → name` of the links in `netns`.
fn link_names(netns: &Path) -> Result<BTreeMap<u32, String>, DemoError> {
    let text = exec_in(netns, "ip", &["-o", "link", "show"]).map_err(unexpected)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ": ");
            let index = parts.next()?.trim().parse().ok()?;
            let name = parts.next()?.split('@').next()?.to_string();
            Some((index, name))
        })
        .collect())
}

/// The kernel ids of what one agent holds: its programs (from its pinned links) and its maps.
#[derive(Debug, Default)]
struct BpfIds {
    progs: std::collections::BTreeSet<u32>,
    maps: std::collections::BTreeSet<u32>,
}

/// ebpf mode: what each agent attached and pinned, scoped to its pin dir (links → programs,
/// maps) and the lab's netns (ifindex → device); then that the node netns has no
/// iptables/nft rule, ipset or policy route. Returns each node's program and map ids.
fn show_ebpf_state(lab: &MultiNodeLab, dirs: &[AgentDirs]) -> Result<Vec<BpfIds>, DemoError> {
    let mut all = Vec::new();
    for (n, d) in lab.nodes.iter().zip(dirs) {
        let mut ids = BpfIds::default();
        let pins = d.bpf_pin_dir();
        let links_dir = pins.join("links");
        let mut links: Vec<std::path::PathBuf> = std::fs::read_dir(&links_dir)
            .map_err(|e| DemoError::io(format!("list {}", links_dir.display()), e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        links.sort();
        let node_links = link_names(n.netns.path())?;
        let zt_links = link_names(n.ztunnel.netns.path())?;
        heading(&format!(
            "node{}: tcx links pinned in {} (`bpftool link show pinned <pin>`; device from the pin's ifindex)",
            n.index,
            links_dir.display()
        ));
        for l in &links {
            let name = l
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            // <hook>-<netns inode>-<ifindex>
            let mut parts = name.rsplitn(3, '-');
            let ifindex: u32 = parts.next().and_then(|i| i.parse().ok()).unwrap_or(0);
            let hook = parts.nth(1).unwrap_or("?");
            let (where_, dev) = if hook == "zt-in" {
                ("ztunnel netns", zt_links.get(&ifindex))
            } else {
                ("node netns", node_links.get(&ifindex))
            };
            let text = bpftool(&["link", "show", "pinned", &l.display().to_string()])?;
            let prog = text
                .split_whitespace()
                .skip_while(|w| *w != "prog")
                .nth(1)
                .and_then(|w| w.parse::<u32>().ok());
            if let Some(id) = prog {
                ids.progs.insert(id);
            }
            println!(
                "    {name:<26} {where_} {} ({} of the veth): {}",
                dev.map_or("?", String::as_str),
                if hook == "pod-eg" {
                    "egress"
                } else {
                    "ingress"
                },
                text.trim()
            );
        }
        heading(&format!(
            "node{}: the programs those links run (`bpftool prog show id <id>`)",
            n.index
        ));
        for id in &ids.progs {
            indent(bpftool(&["prog", "show", "id", &id.to_string()])?.trim());
        }
        let maps_dir = pins.join("maps");
        heading(&format!(
            "node{}: maps pinned in {} (`bpftool map show pinned <pin>`, entries from `bpftool -j map dump`)",
            n.index,
            maps_dir.display()
        ));
        for m in [
            meshcni_ebpf::maps::PODS_MAP,
            meshcni_ebpf::maps::ZTUNNEL_MAP,
            meshcni_ebpf::maps::HOST_IPS_MAP,
        ] {
            let path = maps_dir.join(m).display().to_string();
            let show = bpftool(&["map", "show", "pinned", &path])?;
            if let Some(id) = show
                .split(':')
                .next()
                .and_then(|i| i.trim().parse::<u32>().ok())
            {
                ids.maps.insert(id);
            }
            indent(show.trim());
            let dump: Value =
                serde_json::from_str(&bpftool(&["-j", "map", "dump", "pinned", &path])?)
                    .map_err(|e| unexpected(format!("bpftool -j map dump pinned {path}: {e}")))?;
            let entries = dump.as_array().map(Vec::as_slice).unwrap_or_default();
            let keys: Vec<String> = if m == meshcni_ebpf::maps::PODS_MAP {
                entries
                    .iter()
                    .filter_map(|e| hex_bytes(&e["key"]))
                    .filter_map(|k| <[u8; 16]>::try_from(k.as_slice()).ok())
                    .map(|k| meshcni_ebpf::maps::key_addr(k).to_string())
                    .collect()
            } else {
                Vec::new()
            };
            if keys.is_empty() {
                println!("        entries: {}", entries.len());
            } else {
                println!("        entries: {}: {}", entries.len(), keys.join(", "));
            }
        }
        heading(&format!(
            "node{}: `ip rule` in the ztunnel netns (local delivery of the packets bpf_sk_assign steered)",
            n.index
        ));
        indent(&exec_in(n.ztunnel.netns.path(), "ip", &["rule"]).map_err(unexpected)?);
        heading(&format!(
            "node{}: {}",
            n.index,
            d.ambient_config().display()
        ));
        let config = std::fs::read_to_string(d.ambient_config())
            .map_err(|e| DemoError::io(format!("read {}", d.ambient_config().display()), e))?;
        indent(&config);
        all.push(ids);
    }
    heading("no iptables/nft rule, ipset or policy route in either node netns (issue 11 item 4)");
    for n in &lab.nodes {
        let ns = n.netns.path();
        let run = |program: &str, args: &[&str]| exec_in(ns, program, args).map_err(unexpected);
        let rules = |text: String| text.lines().filter(|l| l.starts_with("-A")).count();
        println!(
            "    node{}: iptables-nft-save {} rules, iptables-legacy-save {} rules, `nft list ruleset` {} lines, `ipset list` {} lines, `ip rule`: {}",
            n.index,
            rules(run("iptables-nft-save", &[])?),
            rules(run("iptables-legacy-save", &[])?),
            run("nft", &["list", "ruleset"])?.lines().count(),
            run("ipset", &["list"])?.lines().count(),
            run("ip", &["rule"])?
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(all)
}

/// A `bpftool -j` byte array (`["0x0a", …]`) as bytes.
fn hex_bytes(v: &Value) -> Option<Vec<u8>> {
    v.as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect()
}

fn show_node_state(lab: &MultiNodeLab, d: &AgentDirs) -> Result<(), DemoError> {
    let ns = lab.node(1).netns.path();
    let run = |program: &str, args: &[&str]| exec_in(ns, program, args).map_err(unexpected);
    // The driver uses the node's iptables flavour; show the one holding our chains. (Whole
    // saves only: `iptables-legacy-save -t <table>` would instantiate that table.)
    let mut save_bin = "iptables-nft-save";
    let mut save = String::new();
    for bin in ["iptables-nft-save", "iptables-legacy-save"] {
        let text = run(bin, &[])?;
        if text.contains("ztunnel-") {
            save_bin = bin;
            save = text;
        }
    }
    for table in ["mangle", "nat"] {
        heading(&format!(
            "node1 ambient state: `{save_bin} -t {table}` (ztunnel chains)"
        ));
        indent(&grep(&table_section(&save, table), &["ztunnel"]));
    }
    heading("node1: `ip rule`");
    indent(&run("ip", &["rule"])?);
    for t in ["100", "101", "102"] {
        heading(&format!("node1: `ip route show table {t}`"));
        indent(&run("ip", &["route", "show", "table", t])?);
    }
    heading("node1: `ip -d link show istioin` / `istioout` (tunnels into the ztunnel pod)");
    for l in ["istioin", "istioout"] {
        let text = run("ip", &["-d", "link", "show", l])?;
        let head = text.lines().next().unwrap_or_default().to_string();
        let kind = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("vxlan") || l.starts_with("geneve"))
            .map(|l| l.split(" srcport").next().unwrap_or(l).to_string())
            .unwrap_or_default();
        indent(&format!("{head}\n    {kind}"));
    }
    heading("node1: `ipset list ztunnel-pods-ips`");
    indent(&grep(
        &run("ipset", &["list", "ztunnel-pods-ips"])?,
        &["Name", "Type", "Number", "comment"],
    ));
    heading(&format!("node1: {}", d.ambient_config().display()));
    let config = std::fs::read_to_string(d.ambient_config())
        .map_err(|e| DemoError::io(format!("read {}", d.ambient_config().display()), e))?;
    indent(&config);
    Ok(())
}

/// The `*<table>` … `COMMIT` section of an `iptables-save` output.
fn table_section(save: &str, table: &str) -> String {
    let head = format!("*{table}");
    save.lines()
        .skip_while(|l| *l != head)
        .take_while(|l| *l != "COMMIT")
        .map(|l| format!("{l}\n"))
        .collect()
}

fn describe(hop: &ZtunnelHop, node: u8) -> String {
    match hop.listener_port {
        HBONE_PORT => format!("node{node}/ztunnel:{HBONE_PORT} (HBONE)"),
        p => format!("node{node}/ztunnel:{p}"),
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
    let mut got: Vec<(u8, ZtunnelHop)> = Vec::new();
    loop {
        got.clear();
        for (i, z) in stack.ztunnels.iter().enumerate() {
            let node = u8::try_from(i + 1).unwrap_or(u8::MAX);
            got.extend(z.hops().into_iter().map(|h| (node, h)));
        }
        if got.len() >= want.len() && (!want.is_empty() || Instant::now() > deadline)
            || Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Outbound first (15001), then what it led to.
    got.sort_by_key(|(_, h)| h.listener_port != OUTBOUND_PORT);
    let seen_hops: Vec<Hop> = got.iter().map(|(n, h)| (*n, h.listener_port)).collect();
    let dst = t.addr(PORT);
    let (server_peer, reply_ok) = match &reply {
        Ok(text) => {
            let peer: Option<SocketAddr> = text
                .lines()
                .next()
                .and_then(|l| l.split(" peer:").nth(1))
                .and_then(|p| p.trim().parse().ok());
            (
                peer.map_or_else(|| format!("? {text:?}"), |p| p.to_string()),
                peer.is_some_and(|p| p.ip() == IpAddr::V4(f.ip)) && text.ends_with(&payload),
            )
        }
        Err(e) => (format!("FAILED: {e}"), false),
    };
    let original_dst = match got.first() {
        None => "-".to_string(),
        Some((_, h)) => h.original_dst.to_string(),
    };
    let dst_ok = got.iter().all(|(_, h)| match h.listener_port {
        HBONE_PORT => h.hbone == Some((dst, IpAddr::V4(f.ip))),
        _ => h.original_dst == dst && h.peer.ip() == IpAddr::V4(f.ip),
    });
    let captured_at = if got.is_empty() {
        "— (direct)".to_string()
    } else {
        got.iter()
            .map(|(n, h)| describe(h, *n))
            .collect::<Vec<_>>()
            .join(" → ")
    };
    Ok(Row {
        flow: flow.to_string(),
        from: format!("{from} {}", f.ip),
        to: format!("{to} {}", dst),
        captured_at,
        original_dst,
        server_peer,
        as_expected: reply_ok && dst_ok && seen_hops == want,
    })
}
