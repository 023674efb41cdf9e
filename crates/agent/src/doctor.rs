//! `meshcni-agent doctor`: proves, read-only, that this node is set up and that every pod that
//! should be captured is (issue 12 item 3). The same report is served as JSON on the
//! monitoring port (`/debug/doctor`).
//!
//! Node checks (each reuses the installer's or driver's own comparison):
//! * `cni-config`: our entry is in the CNI config the runtime uses (the installer's validity
//!   check: first valid file, entry present, owned file complete), exactly as the installer
//!   writes it, once, and after the primary plugin that creates the pod's interface;
//! * `plugin-binary`: every installed plugin binary has the content of its source in the image
//!   (length and content hash, mode 0755 — the installer's `up_to_date`);
//! * `kubeconfig`: the plugin's kubeconfig parses (the plugin's own parser) and names a server;
//! * `ambient-config` (ambient on): the ambient config file exists and names the running mode;
//! * `ambient-enrollment` (ambient on): every pod the driver holds (inpod state file, iptables
//!   set entries, ebpf recorded owners) is a pod on this node — anything else is a leaked
//!   enrollment;
//! * the running mode's node pieces, each by the driver's own comparison: `iptables-node`
//!   (node chains exactly once, ipset, policy rules, routes, tunnels, sysctls, a table-100
//!   route and `rp_filter=0` for exactly the enrolled addresses), `inpod-host-probe` (the
//!   host-probe SNAT rule and sets; members exactly the enrolled pods' addresses),
//!   `ebpf-datapath` (maps pinned, pod programs on exactly the enrolled pods' veths, map
//!   entries exactly the recorded owners'); with ambient off `ambient-leftovers`: nothing of
//!   any mode (chain, set, tunnel, state file, pin dir) on the node.
//!
//! Per pod (from the agent's workload source: the workloads file, else the API server): should
//! it be captured, and why (sidecar injected, ambient by pod or namespace label, opted out,
//! excluded namespace, …) — the plugin's own decision for the sidecar path and the agent's
//! enrollment policy for ambient — and is it:
//! * sidecar pod: its netns (found like the inpod mode finds a running pod's: cgroup in the
//!   host's /proc, else the netns dir by IP) compared with what ADD installs (the plugin's
//!   CHECK comparison);
//! * ambient, `inpod`: recorded in the driver's state file, its recorded netns still the same
//!   namespace, and the in-pod rules equal to what enrollment applies (the driver's check);
//! * ambient, `iptables`: the pod's IPv4 addresses in the node's `ztunnel-pods-ips` set,
//!   owned by its UID (what the driver reads back as its enrollment state);
//! * ambient, `ebpf`: the pod's addresses in the pinned pod map, recorded as its own, pointing
//!   at a host veth with both pod programs attached.
//!
//! A pod that should not be captured but is enrolled is a mismatch too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ambient_config::RedirectMode;
use crate::cli::AgentArgs;
use crate::workloads::{MeshDecision, NamespaceInfo, Workload};

/// One node check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeCheck {
    /// `cni-config`, `plugin-binary`, `kubeconfig` or `ambient-config`.
    pub check: String,
    /// The file it looked at.
    pub path: String,
    pub ok: bool,
    /// What was found (on a mismatch: what differs).
    pub detail: String,
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodCheck {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `sidecar`, `ambient` or `none`.
    pub capture: String,
    /// Whether it should be captured.
    pub should_capture: bool,
    /// Why (or why not).
    pub reason: String,
    /// Whether it is captured as it should be (`None`: not looked at, nothing to capture and
    /// not enrolled).
    pub captured: Option<bool>,
    pub ok: bool,
    /// What was found (on a mismatch: what differs).
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DoctorReport {
    /// No mismatch anywhere.
    pub ok: bool,
    /// The node's name, as the agent takes it.
    pub node: String,
    /// `off` or the running redirect mode.
    pub ambient: String,
    pub node_checks: Vec<NodeCheck>,
    pub pods: Vec<PodCheck>,
}

impl DoctorReport {
    /// Number of mismatches.
    pub fn mismatches(&self) -> usize {
        self.node_checks.iter().filter(|c| !c.ok).count()
            + self.pods.iter().filter(|p| !p.ok).count()
    }

    /// The human table.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "node {}  ambient: {}  {}",
            self.node,
            self.ambient,
            if self.ok {
                "OK".to_string()
            } else {
                format!("{} MISMATCH(ES)", self.mismatches())
            }
        );
        let _ = writeln!(out, "\n{:<4} {:<16} {:<48} DETAIL", "", "CHECK", "PATH");
        for c in &self.node_checks {
            let _ = writeln!(
                out,
                "{:<4} {:<16} {:<48} {}",
                if c.ok { "ok" } else { "FAIL" },
                c.check,
                c.path,
                c.detail
            );
        }
        let _ = writeln!(
            out,
            "\n{:<4} {:<40} {:<8} {:<7} {:<9} {:<40} DETAIL",
            "", "POD", "CAPTURE", "SHOULD", "CAPTURED", "REASON"
        );
        for p in &self.pods {
            let _ = writeln!(
                out,
                "{:<4} {:<40} {:<8} {:<7} {:<9} {:<40} {}",
                if p.ok { "ok" } else { "FAIL" },
                format!("{}/{}", p.namespace, p.name),
                p.capture,
                if p.should_capture { "yes" } else { "no" },
                match p.captured {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                },
                p.reason,
                p.detail
            );
        }
        out
    }
}

/// One pod to check.
#[derive(Debug, Clone)]
pub struct InventoryPod {
    /// The object as the source gave it (the agent's decoder reads phase, conditions,
    /// service account, ... from it).
    pub object: serde_json::Value,
    /// The same, as the plugin reads pods (its decision needs the containers).
    pub pod: meshcni_kube::Pod,
}

/// The pods to check and their namespaces' labels.
#[derive(Debug, Clone, Default)]
pub struct PodInventory {
    pub pods: Vec<InventoryPod>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// Read the agent's workload source once: the workloads file when one is configured, else the
/// API server (pods on this node, all namespaces).
pub fn inventory(args: &AgentArgs) -> Result<PodInventory, String> {
    let node = args.effective_node_name();
    if !args.ambient_workloads_file.is_empty() {
        return inventory_from_file(Path::new(&args.ambient_workloads_file), &node);
    }
    inventory_from_api(args, &node)
}

#[derive(serde::Deserialize)]
struct FileShape {
    #[serde(default)]
    pods: Vec<serde_json::Value>,
    #[serde(default)]
    namespaces: Vec<serde_json::Value>,
}

/// The workloads file (`{"namespaces": [...], "pods": [...]}`, JSON or YAML), checked by the
/// file source's own parser first (so the doctor refuses exactly what the agent refuses).
pub fn inventory_from_file(path: &Path, node: &str) -> Result<PodInventory, String> {
    crate::workloads::file::read_workloads(path, node).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading workloads file {}: {e}", path.display()))?;
    let shape: FileShape = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
    };
    inventory_from_values(shape.pods, shape.namespaces, node)
}

fn inventory_from_values(
    pods: Vec<serde_json::Value>,
    namespaces: Vec<serde_json::Value>,
    node: &str,
) -> Result<PodInventory, String> {
    let mut inv = PodInventory::default();
    for (i, v) in namespaces.into_iter().enumerate() {
        let ns =
            crate::workloads::decode_namespace(&v).map_err(|e| format!("namespaces[{i}]: {e}"))?;
        inv.namespaces.insert(ns.name, ns.labels);
    }
    for (i, v) in pods.into_iter().enumerate() {
        let pod: meshcni_kube::Pod =
            serde_json::from_value(v.clone()).map_err(|e| format!("pods[{i}]: {e}"))?;
        if !pod.spec.node_name.is_empty() && pod.spec.node_name != node {
            continue;
        }
        inv.pods.push(InventoryPod { object: v, pod });
    }
    Ok(inv)
}

/// One list of the pods on `node` and of all namespaces, with the agent's API access.
fn inventory_from_api(args: &AgentArgs, node: &str) -> Result<PodInventory, String> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::{Api, ListParams};
    let access = crate::workloads::kube::AccessConfig::from_args(args).ok_or_else(|| {
        "no workload source: set --ambient-workloads-file, --ambient-kubeconfig, or run in a cluster (KUBERNETES_SERVICE_HOST)".to_string()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime for the API list: {e}"))?;
    let run = async {
        let client = access.client().await?;
        let pods: Api<Pod> = Api::all(client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = pods
            .list(&lp)
            .await
            .map_err(|e| format!("listing the pods on node {node}: {e}"))?;
        let nss: Api<Namespace> = Api::all(client);
        let nss = nss
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing namespaces: {e}"))?;
        let pods = pods
            .items
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("encoding a pod: {e}"))?;
        let nss = nss
            .items
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("encoding a namespace: {e}"))?;
        Ok::<_, String>((pods, nss))
    };
    let (pods, nss) = rt.block_on(run)?;
    inventory_from_values(pods, nss, node)
}

/// Run every check.
pub fn run(args: &AgentArgs, mode: RedirectMode) -> DoctorReport {
    let mut node_checks = node_checks(args, mode);
    let pods = match inventory(args) {
        Ok(inv) => {
            if let Some(c) = enrollment_check(args, mode, &inv) {
                node_checks.push(c);
            }
            pod_checks(args, mode, &inv)
        }
        Err(e) => {
            node_checks.push(NodeCheck {
                check: "workloads".into(),
                path: if args.ambient_workloads_file.is_empty() {
                    "kubernetes API".into()
                } else {
                    args.ambient_workloads_file.clone()
                },
                ok: false,
                detail: format!("cannot read the pods on this node: {e}"),
            });
            Vec::new()
        }
    };
    let ok = node_checks.iter().all(|c| c.ok) && pods.iter().all(|p| p.ok);
    DoctorReport {
        ok,
        node: args.effective_node_name(),
        ambient: if args.ambient_enabled {
            mode.to_string()
        } else {
            "off".into()
        },
        node_checks,
        pods,
    }
}

fn check(check: &str, path: &Path, result: Result<String, String>) -> NodeCheck {
    let (ok, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    NodeCheck {
        check: check.into(),
        path: path.display().to_string(),
        ok,
        detail,
    }
}

/// The node's own pieces.
pub fn node_checks(args: &AgentArgs, mode: RedirectMode) -> Vec<NodeCheck> {
    use meshcni_install::{binaries, cniconfig, conflist};
    let mut out = Vec::new();
    let cfg = match crate::install_bridge::install_config(args) {
        Ok(c) => c,
        Err(e) => {
            out.push(check(
                "cni-config",
                &args.mounted_cni_net_dir,
                Err(format!("invalid installer settings: {e}")),
            ));
            return out;
        }
    };

    // CNI config: the installer's validity check, then our entry exactly as written, once,
    // after the plugin that creates the interface.
    let conf_result = (|| -> Result<(PathBuf, String), (PathBuf, String)> {
        let dir = cfg.mounted_cni_net_dir.clone();
        let path = if cfg.owned_mode() {
            dir.join(cfg.owned_file_name())
        } else {
            cniconfig::resolve_config_path(&cfg, &cniconfig::Wait::no_wait())
                .map_err(|e| (dir.clone(), format!("no CNI config to check: {e}")))?
        };
        cniconfig::check_valid_cni_config(&cfg, &path)
            .map_err(|e| (path.clone(), e.to_string()))?;
        let text = std::fs::read(&path).map_err(|e| (path.clone(), format!("reading: {e}")))?;
        let doc: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| (path.clone(), format!("not JSON: {e}")))?;
        if !cfg.chained_cni_plugin {
            return Ok((path, "standalone config of ours".into()));
        }
        let desired = cniconfig::plugin_config_bytes(&cfg)
            .map_err(|e| e.to_string())
            .and_then(|b| conflist::entry_for_list(&b).map_err(|e| e.to_string()))
            .map_err(|e| (path.clone(), format!("rendering our entry: {e}")))?;
        let owned = cfg.owned_types();
        let types = conflist::plugin_types(&doc);
        if !conflist::entry_is_current(&doc, &desired, &owned) {
            let n = types.iter().filter(|t| owned.matches(t)).count();
            return Err((
                path,
                if n == 1 {
                    format!(
                        "our {} entry differs from what the installer writes",
                        cfg.plugin_type
                    )
                } else {
                    format!("{n} entries of our type (expected exactly 1)")
                },
            ));
        }
        match types.iter().position(|t| owned.matches(t)) {
            Some(0) => Err((
                path,
                format!(
                    "our {} entry is first in the chain: the primary plugin that creates the pod's interface must come before it (chain: {})",
                    cfg.plugin_type,
                    types.join(" → ")
                ),
            )),
            Some(i) => Ok((
                path,
                format!(
                    "entry present and current at position {} of [{}]",
                    i + 1,
                    types.join(", ")
                ),
            )),
            None => Err((path, format!("no {} entry", cfg.plugin_type))),
        }
    })();
    out.push(match conf_result {
        Ok((p, d)) => check("cni-config", &p, Ok(d)),
        Err((p, d)) => check("cni-config", &p, Err(d)),
    });

    // Plugin binaries: each installed copy has its source's content.
    match binaries::scan_sources(&cfg.cni_bin_source_dir, &cfg.cni_bin_names) {
        Err(e) => out.push(check(
            "plugin-binary",
            &cfg.cni_bin_source_dir,
            Err(format!("cannot read the source binaries: {e}")),
        )),
        Ok(sources) => {
            for dir in cfg
                .cni_bin_target_dirs
                .iter()
                .filter(|d| binaries::dir_writable(d))
            {
                for src in &sources {
                    let target = dir.join(&src.name);
                    let r = if binaries::up_to_date(src, &target) {
                        Ok(format!(
                            "same content as {} ({} bytes, hash {:016x})",
                            src.path.display(),
                            src.len,
                            src.hash
                        ))
                    } else {
                        Err(match binaries::hash_file(&target) {
                            Err(e) => format!("cannot read it: {e}"),
                            Ok((len, hash)) => format!(
                                "differs from {} ({len} bytes, hash {hash:016x}; source {} bytes, hash {:016x}; or mode not 0755)",
                                src.path.display(),
                                src.len,
                                src.hash
                            ),
                        })
                    };
                    out.push(check("plugin-binary", &target, r));
                }
            }
        }
    }

    // Kubeconfig of the plugin.
    if cfg.needs_kubeconfig() {
        let kc = cfg.kubeconfig_path();
        let r = meshcni_kube::kubeconfig::ClusterAccess::from_kubeconfig(&kc)
            .map_err(|e| format!("not a usable kubeconfig: {e}"))
            .and_then(|a| {
                if a.server.trim().is_empty() {
                    Err("names no server".to_string())
                } else {
                    Ok(format!("server {}", a.server))
                }
            });
        out.push(check("kubeconfig", &kc, r));
    }

    // Ambient config file.
    if args.ambient_enabled {
        let p = args
            .ambient_config_dir
            .join(crate::ambient_config::AMBIENT_CONFIG_FILE);
        let r = std::fs::read(&p)
            .map_err(|e| format!("cannot read it: {e}"))
            .and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b)
                    .map_err(|e| format!("not JSON: {e}"))
            })
            .and_then(|v| {
                let found = v["redirectMode"].as_str().unwrap_or("").to_string();
                if found == mode.as_str() {
                    Ok(format!(
                        "redirectMode {found}, ztunnelReady {}",
                        v["ztunnelReady"]
                    ))
                } else {
                    Err(format!(
                        "redirectMode is {found:?}, the agent runs {}",
                        mode.as_str()
                    ))
                }
            });
        out.push(check("ambient-config", &p, r));
    }
    out.push(redirect_node_check(args, mode));
    out
}

/// The node's own pieces of the running redirect mode, each compared by the driver's own code
/// (no second model here); with ambient off, that nothing of any mode is on the node.
pub fn redirect_node_check(args: &AgentArgs, mode: RedirectMode) -> NodeCheck {
    let as_result = |problems: Vec<String>, good: String| {
        if problems.is_empty() {
            Ok(good)
        } else {
            Err(problems.join("; "))
        }
    };
    if !args.ambient_enabled {
        return check(
            "ambient-leftovers",
            &args.cni_agent_run_dir,
            as_result(
                ambient_leftovers(args),
                "nothing of an ambient redirect mode on this node".into(),
            ),
        );
    }
    match mode {
        RedirectMode::Iptables => {
            let cfg = crate::modes::iptables_config(args);
            let path = cfg.state_file.clone();
            let r = crate::modes::iptables::IptablesDriver::new(cfg)
                .and_then(|mut d| d.check_node())
                .map_err(|e| e.message)
                .and_then(|p| {
                    as_result(
                        p,
                        "node chains, ipset, ip rules, routes, tunnels and sysctls as the driver writes them".into(),
                    )
                });
            check("iptables-node", &path, r)
        }
        RedirectMode::Inpod => {
            let cfg = crate::modes::inpod_config(args, mode);
            let r = inpod_host_probe(&cfg).and_then(|p| {
                as_result(
                    p,
                    "host-probe SNAT rule and sets in place; set members are exactly the enrolled pods' addresses".into(),
                )
            });
            check("inpod-host-probe", &cfg.state_file, r)
        }
        RedirectMode::Ebpf => {
            let cfg = crate::modes::ebpf_config(args, mode);
            let r = crate::modes::ebpf::inspect_node(&cfg).and_then(|v| {
                as_result(
                    v.problems,
                    format!(
                        "maps pinned; {} address(es) in the pod map, all recorded; pod programs on {} veth(s), none stale",
                        v.map.len(),
                        v.attached.len()
                    ),
                )
            });
            check("ebpf-datapath", &cfg.pin_dir, r)
        }
    }
}

/// The inpod mode's node-netns piece: the host-probe SNAT rule and sets (the driver's
/// `HostProbe`, read-only), and the set members equal to the enrolled pods' addresses.
fn inpod_host_probe(cfg: &crate::modes::inpod::InpodModeConfig) -> Result<Vec<String>, String> {
    use meshcni_netx::inpod::{HostProbe, InpodBackend};
    let kubelet_uid = match cfg.backend {
        InpodBackend::Nftables => cfg.kubelet_uid.or_else(|| {
            meshcni_netx::inpod::find_kubelet_uid(&cfg.proc_root)
                .ok()
                .flatten()
        }),
        InpodBackend::Iptables => None,
    };
    let mut host = HostProbe::open(&cfg.node_netns, &cfg.rules, cfg.backend, kubelet_uid)
        .map_err(|e| format!("host-probe SNAT in the node netns: {e}"))?;
    let mut problems = host
        .check()
        .map_err(|e| format!("reading the host-probe SNAT rule: {e}"))?;
    let state = crate::modes::inpod::state::InpodState::load(&cfg.state_file)
        .map_err(|e| format!("inpod state file {}: {e}", cfg.state_file.display()))?;
    let want: std::collections::BTreeSet<(IpAddr, String)> = state
        .pods
        .iter()
        .flat_map(|(u, p)| p.ips.iter().map(move |ip| (*ip, u.clone())))
        .filter(|(ip, _)| ip.is_ipv4() || cfg.rules.enable_ipv6)
        .collect();
    let have: std::collections::BTreeSet<(IpAddr, String)> = host
        .entries()
        .map_err(|e| format!("listing the host-probe sets: {e}"))?
        .into_iter()
        .collect();
    for (ip, uid) in have.difference(&want) {
        problems.push(format!(
            "host-probe set member {ip} (pod uid {uid:?}) of no enrolled pod (leak)"
        ));
    }
    for (ip, uid) in want.difference(&have) {
        problems.push(format!(
            "enrolled pod uid {uid}: {ip} not in the host-probe set"
        ));
    }
    Ok(problems)
}

/// Ambient off (sidecar only): the node netns holds no chain, set, rule or link of any
/// redirect mode, and the run dir no driver state file, the bpffs no pin dir of ours.
fn ambient_leftovers(args: &AgentArgs) -> Vec<String> {
    use meshcni_rules::ambient_node as an;
    let mut out = Vec::new();
    for f in ["iptables-mode.json", "inpod-mode.json", "ebpf-mode.json"] {
        let p = args.cni_agent_run_dir.join(f);
        if p.exists() {
            out.push(format!("redirect-mode state file {} exists", p.display()));
        }
    }
    if args.ambient_ebpf_pin_dir.exists() {
        out.push(format!(
            "ebpf pin dir {} exists",
            args.ambient_ebpf_pin_dir.display()
        ));
    }
    let here = Path::new("/proc/self/ns/net");
    match meshcni_netx::with_netns(here, meshcni_netx::ipset::names_here).and_then(|r| r) {
        Ok(names) => {
            for n in names {
                if [
                    an::IPSET_NAME,
                    meshcni_rules::inpod::PROBE_SET_V4,
                    meshcni_rules::inpod::PROBE_SET_V6,
                ]
                .contains(&n.as_str())
                {
                    out.push(format!("ipset {n} exists"));
                }
            }
        }
        Err(e) => out.push(format!("listing ipsets: {e}")),
    }
    match meshcni_netx::netlink::Netlink::open(here)
        .and_then(|mut nl| meshcni_netx::tunnel::list_links(&mut nl))
    {
        Ok(links) => {
            for l in links {
                if [an::TUN_IN, an::TUN_OUT].contains(&l.name.as_str()) {
                    out.push(format!("link {} exists", l.name));
                }
            }
        }
        Err(e) => out.push(format!("listing links: {e}")),
    }
    let cfg = crate::modes::iptables_config(args);
    match crate::modes::iptables::IptablesDriver::new(cfg).and_then(|mut d| d.node_save_text()) {
        Ok(save) => {
            for (table, chain, _) in an::NODE_CHAINS {
                if an::chain_exists(&save, table, chain) {
                    out.push(format!("chain {}/{chain} exists", table.name()));
                }
            }
            for chain in meshcni_rules::inpod::host_chain_names() {
                if an::chain_exists(&save, an::XTable::Nat, &chain) {
                    out.push(format!("chain nat/{chain} exists"));
                }
            }
        }
        Err(e) => out.push(format!("reading the node's iptables: {}", e.message)),
    }
    out
}

/// What the plugin runs with: our entry as the installer renders it.
pub fn plugin_conf(args: &AgentArgs) -> Result<meshcni_plugin::config::PluginConf, String> {
    let cfg = crate::install_bridge::install_config(args)?;
    let bytes = meshcni_install::cniconfig::plugin_config_bytes(&cfg).map_err(|e| e.to_string())?;
    let mut v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("our plugin config: {e}"))?;
    if let Some(o) = v.as_object_mut() {
        o.entry("cniVersion").or_insert("1.1.0".into());
        o.entry("name").or_insert("doctor".into());
    }
    let text = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
    meshcni_plugin::config::PluginConf::from_json(&text)
        .map_err(|e| format!("our plugin config: {e}"))
}

/// Enrollment as the running driver recorded it.
enum Enrolled {
    Inpod(BTreeMap<String, crate::modes::inpod::state::PodRecord>),
    /// IPv4 → owner UID in the node's set.
    Iptables(BTreeMap<std::net::Ipv4Addr, String>),
    /// The pinned pod map, its recorded owners and the veths with the pod programs attached
    /// (the driver's own read-back), and whether IPv6 addresses are enrolled.
    Ebpf(Box<crate::modes::ebpf::NodeView>, bool),
    Off,
}

fn enrolled_state(args: &AgentArgs, mode: RedirectMode) -> Result<Enrolled, String> {
    if !args.ambient_enabled {
        return Ok(Enrolled::Off);
    }
    match mode {
        RedirectMode::Inpod => {
            let path = crate::modes::inpod_state_file(args);
            crate::modes::inpod::state::InpodState::load(&path)
                .map(|s| Enrolled::Inpod(s.pods))
                .map_err(|e| format!("inpod state file {}: {e}", path.display()))
        }
        RedirectMode::Iptables => {
            let set = meshcni_rules::ambient_node::IPSET_NAME;
            let entries = meshcni_netx::with_netns(Path::new("/proc/self/ns/net"), |ns| {
                meshcni_netx::ipset::list_here(ns, set)
            })
            .and_then(|r| r)
            .map_err(|e| format!("reading ipset {set}: {e}"))?
            .unwrap_or_default();
            Ok(Enrolled::Iptables(
                entries
                    .into_iter()
                    .map(|e| (e.ip, e.comment.unwrap_or_default()))
                    .collect(),
            ))
        }
        RedirectMode::Ebpf => {
            let cfg = crate::modes::ebpf_config(args, mode);
            crate::modes::ebpf::inspect_node(&cfg)
                .map(|v| Enrolled::Ebpf(Box::new(v), cfg.enable_ipv6))
                .map_err(|e| format!("ebpf datapath: {e}"))
        }
    }
}

/// Ambient on: every enrollment the driver holds belongs to a pod on this node (a record or
/// set entry of a pod that is gone is a leak).
pub fn enrollment_check(
    args: &AgentArgs,
    mode: RedirectMode,
    inv: &PodInventory,
) -> Option<NodeCheck> {
    let known: std::collections::BTreeSet<&str> = inv
        .pods
        .iter()
        .map(|p| p.pod.metadata.uid.as_str())
        .collect();
    let (path, result) = match enrolled_state(args, mode) {
        Ok(Enrolled::Off) => return None,
        Err(e) => (PathBuf::from("-"), Err(e)),
        Ok(Enrolled::Inpod(pods)) => {
            let stale: Vec<String> = pods
                .iter()
                .filter(|(uid, _)| !known.contains(uid.as_str()))
                .map(|(uid, r)| format!("pod uid {uid} ({})", r.key()))
                .collect();
            (
                crate::modes::inpod_state_file(args),
                if stale.is_empty() {
                    Ok(format!("{} enrolled pod(s), all on this node", pods.len()))
                } else {
                    Err(format!(
                        "enrolled but no longer on this node: {}",
                        stale.join(", ")
                    ))
                },
            )
        }
        Ok(Enrolled::Ebpf(view, _)) => {
            let stale: Vec<String> = view
                .owners
                .iter()
                .filter(|(_, uid)| !known.contains(uid.as_str()))
                .map(|(ip, uid)| format!("{ip} (pod uid {uid:?})"))
                .collect();
            (
                crate::modes::ebpf_config(args, mode).state_file,
                if stale.is_empty() {
                    Ok(format!(
                        "{} enrolled address(es), all of pods on this node",
                        view.owners.len()
                    ))
                } else {
                    Err(format!(
                        "enrolled but of no pod on this node: {}",
                        stale.join(", ")
                    ))
                },
            )
        }
        Ok(Enrolled::Iptables(set)) => {
            let stale: Vec<String> = set
                .iter()
                .filter(|(_, uid)| !known.contains(uid.as_str()))
                .map(|(ip, uid)| format!("{ip} (pod uid {uid:?})"))
                .collect();
            (
                PathBuf::from(format!("ipset {}", meshcni_rules::ambient_node::IPSET_NAME)),
                if stale.is_empty() {
                    Ok(format!(
                        "{} enrolled address(es), all of pods on this node",
                        set.len()
                    ))
                } else {
                    Err(format!(
                        "enrolled but of no pod on this node: {}",
                        stale.join(", ")
                    ))
                },
            )
        }
    };
    Some(check("ambient-enrollment", &path, result))
}

/// The per-pod checks.
pub fn pod_checks(args: &AgentArgs, mode: RedirectMode, inv: &PodInventory) -> Vec<PodCheck> {
    let conf = plugin_conf(args);
    let policy = crate::ambient::policy_from_args(args);
    let enrolled = enrolled_state(args, mode);
    let found = find_netns(args, inv.pods.iter());
    let mut out = Vec::new();
    for p in &inv.pods {
        let shared = Shared {
            conf: &conf,
            policy: &policy,
            enrolled: &enrolled,
            found: &found,
        };
        out.push(pod_check(args, mode, p, inv, &shared));
    }
    out
}

/// Every running pod's netns, found in one search (cgroup in the host's /proc, else the netns
/// dir by IP): uid → netns. One search per pod would scan /proc and enter every netns once per
/// pod.
type Found = Result<BTreeMap<String, meshcni_netx::podns::FoundNetns>, String>;

fn find_netns<'a>(args: &AgentArgs, pods: impl Iterator<Item = &'a InventoryPod>) -> Found {
    let ws: Vec<Workload> = pods
        .filter_map(|p| crate::workloads::decode_pod(&p.object).ok())
        .filter(|w| !w.ips.is_empty() && !w.host_network && !w.terminal())
        .collect();
    if ws.is_empty() {
        return Ok(BTreeMap::new());
    }
    let finder =
        meshcni_netx::podns::NetnsFinder::new(&args.host_proc_dir, vec![args.netns_dir.clone()])
            .map_err(|e| format!("cannot search for the pod's netns: {e}"))?;
    let queries: Vec<meshcni_netx::podns::PodNetnsQuery<'_>> = ws
        .iter()
        .map(|w| meshcni_netx::podns::PodNetnsQuery {
            uid: &w.uid,
            ips: &w.ips,
        })
        .collect();
    finder
        .find(&queries)
        .map_err(|e| format!("searching the pod's netns: {e}"))
}

/// [`pod_checks`] for the pods of `inv` named (`namespace/name`) in `keys` only (the repair
/// controller's verdict on the pods it was told about).
pub fn pod_checks_for(
    args: &AgentArgs,
    mode: RedirectMode,
    inv: &PodInventory,
    keys: &std::collections::BTreeSet<String>,
) -> Vec<PodCheck> {
    let conf = plugin_conf(args);
    let policy = crate::ambient::policy_from_args(args);
    let enrolled = enrolled_state(args, mode);
    let chosen: Vec<&InventoryPod> = inv
        .pods
        .iter()
        .filter(|p| {
            keys.contains(&format!(
                "{}/{}",
                p.pod.metadata.namespace, p.pod.metadata.name
            ))
        })
        .collect();
    let found = find_netns(args, chosen.iter().copied());
    let shared = Shared {
        conf: &conf,
        policy: &policy,
        enrolled: &enrolled,
        found: &found,
    };
    chosen
        .into_iter()
        .map(|p| pod_check(args, mode, p, inv, &shared))
        .collect()
}

/// What every pod's check reads, computed once per report.
struct Shared<'a> {
    conf: &'a Result<meshcni_plugin::config::PluginConf, String>,
    policy: &'a Result<crate::workloads::EnrollPolicy, String>,
    enrolled: &'a Result<Enrolled, String>,
    found: &'a Found,
}

fn pod_check(
    args: &AgentArgs,
    mode: RedirectMode,
    item: &InventoryPod,
    inv: &PodInventory,
    shared: &Shared<'_>,
) -> PodCheck {
    use meshcni_plugin::pod::{Decision, PodRef, SkipReason, decide};
    let Shared {
        conf,
        policy,
        enrolled,
        found,
    } = *shared;
    let pod = &item.pod;
    let md = &pod.metadata;
    let mut pc = PodCheck {
        namespace: md.namespace.clone(),
        name: md.name.clone(),
        uid: md.uid.clone(),
        capture: "none".into(),
        should_capture: false,
        reason: String::new(),
        captured: None,
        ok: true,
        detail: String::new(),
    };
    let fail = |mut pc: PodCheck, why: String| {
        pc.ok = false;
        pc.detail = why;
        pc
    };
    let conf = match conf {
        Ok(c) => c,
        Err(e) => return fail(pc, format!("cannot build the plugin's config: {e}")),
    };
    let workload: Workload = match crate::workloads::decode_pod(&item.object) {
        Ok(w) => w,
        Err(e) => return fail(pc, format!("cannot read the pod: {e}")),
    };
    let pod_ref = PodRef {
        namespace: &md.namespace,
        name: &md.name,
    };
    let ns_info = inv
        .namespaces
        .get(&md.namespace)
        .map(|labels| NamespaceInfo {
            name: md.namespace.clone(),
            labels: labels.clone(),
        });
    // Enrolled by the ambient driver?
    let enrolled_now: Option<Result<(), String>> = match enrolled {
        Err(e) => Some(Err(e.clone())),
        Ok(Enrolled::Off) => None,
        Ok(Enrolled::Inpod(pods)) => pods.get(&workload.uid).map(|_| Ok(())),
        Ok(Enrolled::Ebpf(view, _)) => view
            .owners
            .values()
            .any(|uid| *uid == workload.uid)
            .then_some(Ok(())),
        Ok(Enrolled::Iptables(set)) => {
            let mine: Vec<_> = set
                .iter()
                .filter(|(_, uid)| **uid == workload.uid)
                .collect();
            (!mine.is_empty()).then_some(Ok(()))
        }
    };

    // Ambient first (the agent's policy), then the plugin's sidecar decision.
    let ambient_decision = if args.ambient_enabled {
        match policy {
            Ok(p) => Some(crate::workloads::mesh_decision(
                &workload,
                ns_info.as_ref(),
                p,
            )),
            Err(e) => return fail(pc, format!("enrollment policy: {e}")),
        }
    } else {
        None
    };
    if ambient_decision == Some(MeshDecision::In) {
        pc.capture = "ambient".into();
        pc.should_capture = true;
        pc.reason = if workload
            .labels
            .get("istio.io/dataplane-mode")
            .map(String::as_str)
            == Some("ambient")
        {
            "ambient: pod label istio.io/dataplane-mode=ambient".into()
        } else {
            "ambient: selected by an enablement selector (namespace label)".into()
        };
        return ambient_captured(args, mode, pc, &workload, enrolled, found);
    }
    if workload.terminal() {
        pc.reason = format!("terminated (phase {})", workload.phase);
        return match enrolled_now {
            Some(Ok(())) => fail(
                pc,
                "enrolled by the ambient driver although it should not be".into(),
            ),
            _ => pc,
        };
    }
    if ambient_decision == Some(MeshDecision::NoIp) {
        // Selected, but not started yet (no IP): captured once it is, by its ADD.
        pc.capture = "ambient".into();
        pc.should_capture = true;
        pc.reason = "ambient: selected; no pod IP yet (not started)".into();
        return match enrolled_now {
            Some(Ok(())) => ambient_captured(args, mode, pc, &workload, enrolled, found),
            _ => pc,
        };
    }
    match decide(conf, pod_ref, pod) {
        Err(e) => {
            pc.capture = "sidecar".into();
            pc.should_capture = true;
            pc.reason = "sidecar injected".into();
            fail(pc, format!("ADD would fail: {e}"))
        }
        Ok(Decision::Sidecar(cfg)) => {
            pc.capture = "sidecar".into();
            pc.should_capture = true;
            pc.reason = "sidecar injected (sidecar.istio.io/status)".into();
            if workload.ips.is_empty() {
                // No sandbox with an address yet: its ADD captures it.
                pc.reason.push_str("; no pod IP yet (not started)");
                return pc;
            }
            sidecar_captured(args, pc, conf, &workload, *cfg, found)
        }
        Ok(Decision::Skip(skip)) => {
            let opted_out_ambient = workload
                .labels
                .get("istio.io/dataplane-mode")
                .map(String::as_str)
                == Some("none");
            pc.reason = match (&skip, ambient_decision) {
                (SkipReason::ExcludedNamespace(ns), _) => format!("excluded namespace {ns}"),
                (SkipReason::InjectionDisabled { .. }, _) => format!("opted out: {skip}"),
                _ if !workload.has_sidecar && opted_out_ambient => {
                    "opted out: istio.io/dataplane-mode=none".into()
                }
                (_, Some(d)) if !workload.has_sidecar => format!("not in the mesh (ambient: {d})"),
                (_, None) if !workload.has_sidecar => {
                    "not in the mesh (no sidecar; ambient off)".into()
                }
                (other, _) => format!("not captured: {other}"),
            };
            match enrolled_now {
                Some(Ok(())) => fail(
                    pc,
                    "enrolled by the ambient driver although it should not be".into(),
                ),
                Some(Err(e)) if args.ambient_enabled => fail(pc, e),
                _ => pc,
            }
        }
    }
}

fn ambient_captured(
    args: &AgentArgs,
    mode: RedirectMode,
    mut pc: PodCheck,
    w: &Workload,
    enrolled: &Result<Enrolled, String>,
    found: &Found,
) -> PodCheck {
    let enrolled = match enrolled {
        Ok(e) => e,
        Err(e) => {
            pc.ok = false;
            pc.detail = e.clone();
            return pc;
        }
    };
    let result: Result<String, String> = match enrolled {
        Enrolled::Off => Err("ambient is off".into()),
        Enrolled::Inpod(pods) => match pods.get(&w.uid) {
            None => Err(format!(
                "not enrolled (not in the inpod state file {})",
                crate::modes::inpod_state_file(args).display()
            )),
            Some(rec) => inpod_rules(args, mode, &w.uid, rec, found),
        },
        Enrolled::Ebpf(view, ipv6) => ebpf_captured(view, *ipv6, w),
        Enrolled::Iptables(set) => {
            let v4: Vec<std::net::Ipv4Addr> = w
                .ips
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(a) => Some(*a),
                    IpAddr::V6(_) => None,
                })
                .collect();
            let missing: Vec<String> = v4
                .iter()
                .filter(|ip| set.get(ip) != Some(&w.uid))
                .map(|ip| match set.get(ip) {
                    None => format!("{ip} not in {}", meshcni_rules::ambient_node::IPSET_NAME),
                    Some(o) => format!("{ip} enrolled for pod uid {o}"),
                })
                .collect();
            if v4.is_empty() {
                Err("no IPv4 address (the iptables mode is IPv4-only)".into())
            } else if missing.is_empty() {
                Ok(format!(
                    "{} in {}",
                    v4.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    meshcni_rules::ambient_node::IPSET_NAME
                ))
            } else {
                Err(format!("not enrolled: {}", missing.join("; ")))
            }
        }
    };
    match result {
        Ok(d) => {
            pc.captured = Some(true);
            pc.detail = d;
        }
        Err(d) => {
            pc.captured = Some(false);
            pc.ok = false;
            pc.detail = d;
        }
    }
    pc
}

/// An ambient pod in the `ebpf` mode: each of its addresses the mode handles (IPv4; IPv6 when
/// on) is in the pinned pod map, recorded as its own, and points at a host veth with both pod
/// programs attached.
fn ebpf_captured(
    view: &crate::modes::ebpf::NodeView,
    ipv6: bool,
    w: &Workload,
) -> Result<String, String> {
    let ips: Vec<IpAddr> = w
        .ips
        .iter()
        .filter(|ip| ip.is_ipv4() || ipv6)
        .copied()
        .collect();
    if ips.is_empty() {
        return Err("no address the ebpf mode enrolls".into());
    }
    let mut problems = Vec::new();
    for ip in &ips {
        match (view.map.get(ip), view.owners.get(ip)) {
            (None, _) => problems.push(format!("{ip} not in the pod map")),
            (Some(_), Some(o)) if *o != w.uid => {
                problems.push(format!("{ip} enrolled for pod uid {o}"))
            }
            (Some(_), None) => {
                problems.push(format!("{ip} in the pod map without a recorded owner"))
            }
            (Some(e), Some(_)) if !view.attached.contains(&e.host_ifindex) => {
                problems.push(format!(
                    "{ip}: the pod programs are not attached to its veth (ifindex {})",
                    e.host_ifindex
                ))
            }
            _ => {}
        }
    }
    if problems.is_empty() {
        Ok(format!(
            "{} in the pod map, programs attached",
            ips.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ))
    } else {
        Err(format!("not enrolled: {}", problems.join("; ")))
    }
}

fn inpod_rules(
    args: &AgentArgs,
    mode: RedirectMode,
    uid: &str,
    rec: &crate::modes::inpod::state::PodRecord,
    found: &Found,
) -> Result<String, String> {
    let cfg = crate::modes::inpod_config(args, mode);
    // A pod enrolled without a CNI netns path (found by discovery: a label change, a
    // restart) is recorded with an empty path: find its netns again the way the driver does.
    let discovered;
    let path = if rec.netns_path.as_os_str().is_empty() {
        let Some(ns) = found.as_ref().map_err(Clone::clone)?.get(uid) else {
            return Err(format!(
                "enrolled, but its netns is not found (no process of pod uid {uid} in {}, no netns in {} holding {:?})",
                args.host_proc_dir.display(),
                args.netns_dir.display(),
                rec.ips
            ));
        };
        discovered = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&ns.file)
        ));
        &discovered
    } else {
        &rec.netns_path
    };
    match meshcni_netx::podns::netns_id(path) {
        Ok(id) if id == rec.netns_id => {}
        Ok(_) => {
            return Err(format!(
                "recorded netns {} is another namespace now",
                path.display()
            ));
        }
        Err(e) => return Err(format!("recorded netns {}: {e}", path.display())),
    }
    let overrides = meshcni_rules::inpod::PodOverrides::from_annotations(&rec.annotations)
        .map_err(|e| format!("annotation: {e}"))?;
    let diffs = meshcni_netx::inpod::check_inpod(path, &cfg.rules, &overrides, cfg.backend)
        .map_err(|e| format!("reading the in-pod rules in {}: {e}", path.display()))?;
    if diffs.is_empty() {
        Ok(format!(
            "enrolled; in-pod rules in place ({})",
            path.display()
        ))
    } else {
        Err(format!(
            "enrolled, but the in-pod rules differ: {}",
            diffs.join("; ")
        ))
    }
}

fn sidecar_captured(
    args: &AgentArgs,
    mut pc: PodCheck,
    conf: &meshcni_plugin::config::PluginConf,
    w: &Workload,
    cfg: meshcni_rules::sidecar::CaptureConfig,
    found: &Found,
) -> PodCheck {
    let result = (|| -> Result<String, String> {
        let Some(ns) = found.as_ref().map_err(Clone::clone)?.get(&w.uid) else {
            return Err(format!(
                "netns not found (no process of pod uid {} in {}, no netns in {} holding {:?})",
                w.uid,
                args.host_proc_dir.display(),
                args.netns_dir.display(),
                w.ips
            ));
        };
        // The open fd keeps the namespace alive while it is read through /proc.
        let path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&ns.file)
        ));
        let diffs = meshcni_plugin::flow::sidecar_capture_differences(conf, &path, cfg)?;
        if diffs.is_empty() {
            Ok(format!("rules in place ({})", ns.source))
        } else {
            Err(format!(
                "rules differ from what ADD installs: {}",
                diffs.join("; ")
            ))
        }
    })();
    match result {
        Ok(d) => {
            pc.captured = Some(true);
            pc.detail = d;
        }
        Err(d) => {
            pc.captured = Some(false);
            pc.ok = false;
            pc.detail = d;
        }
    }
    pc
}
