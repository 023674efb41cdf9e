//! Harness shared by `tests/crash_points.rs` and `examples/crash_bench.rs`: the real
//! `meshcni-agent` binary in `iptables` mode on a one-node lab, killed (SIGKILL) at named crash
//! points (`MESHCNI_CRASH_AT`, see `src/crash.rs`) or at random moments, restarted, and checked.
//!
//! The node has real pods `a`, `b` (namespace `mesh`, ambient) and `out` (namespace `plain`,
//! the traffic source), a ztunnel stand-in, and `n` synthetic pods `s0…`: a veth pair inside the
//! node netns each, with a `/32` route — everything enrollment touches (ipset entry, table-100
//! route, `rp_filter` on the host veth), without the cost of a netns per pod.
//!
//! Before anything runs the operator's non-default sysctls are set (node `all`/`default`
//! `rp_filter=2`, every pod veth `rp_filter=1`, ztunnel netns `all`/`default`/`eth0`
//! `rp_filter=1`) and the node and ztunnel netns are snapshotted
//! (`meshcni_testkit::NetnsSnapshot`): after uninstall both must be byte-identical again.

#![allow(dead_code)] // each includer uses a subset

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshcni_testkit::stack::{
    self as kit, Agent, AgentDirs, DATAPLANE_MODE, namespace_json, pod_json, write_workloads,
    ztunnel_json,
};
use meshcni_testkit::{
    ConnectOpts, MultiNodeLab, NetnsSnapshot, TcpServer, ZtunnelStandIn, connect_text,
};
use serde_json::Value;

pub const NODE: &str = "node1";
pub const PORT: u16 = 8080;
/// The real ambient pods (traffic is checked through them).
pub const REAL: [&str; 2] = ["a", "b"];

/// One pod the agent may enroll: name, IP, host veth.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub name: String,
    pub ip: Ipv4Addr,
    pub veth: String,
}

pub struct CrashLab {
    pub agent_bin: PathBuf,
    pub plugin: PathBuf,
    pub node_ns: PathBuf,
    pub zt_ns: PathBuf,
    /// Real pods first (`a`, `b`), then the synthetic ones.
    pub pods: Vec<PodRef>,
    pub baseline: Vec<(String, PathBuf, NetnsSnapshot)>,
    pub zt: ZtunnelStandIn,
    pub servers: Vec<TcpServer>,
    pub dirs: AgentDirs,
    tmp: tempfile::TempDir,
    round: usize,
    pub lab: MultiNodeLab,
}

fn check_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces, iptables)"
    );
}

/// The synthetic pod `i`: `10.78.<i/200>.<i%200+1>`, host veth `sv<i>` (peer `sp<i>`).
fn synthetic(i: usize) -> PodRef {
    PodRef {
        name: format!("s{i}"),
        ip: Ipv4Addr::new(10, 78, (i / 200) as u8, (i % 200 + 1) as u8),
        veth: format!("sv{i}"),
    }
}

impl CrashLab {
    pub fn new(tag: &str, agent_bin: PathBuf, plugin: PathBuf, synthetic_pods: usize) -> CrashLab {
        check_root();
        let lab = MultiNodeLab::new(tag, &[&["a", "b", "out"]]).expect("lab");
        let node = lab.node(1);
        let node_ns = node.netns.path().to_path_buf();
        let zt_ns = node.ztunnel.netns.path().to_path_buf();
        // Synthetic pods: one `ip -batch` for all veths, routes and operator sysctls.
        let mut batch = String::new();
        let mut pods: Vec<PodRef> = REAL
            .iter()
            .map(|n| {
                let p = lab.pod(n);
                PodRef {
                    name: n.to_string(),
                    ip: p.ip,
                    veth: p.host_veth.clone(),
                }
            })
            .collect();
        for i in 0..synthetic_pods {
            let p = synthetic(i);
            batch.push_str(&format!(
                "link add {} type veth peer name sp{i}\nlink set {} up\nlink set sp{i} up\nroute add {}/32 dev {} scope link\n",
                p.veth, p.veth, p.ip, p.veth
            ));
            pods.push(p);
        }
        if !batch.is_empty() {
            let file = std::env::temp_dir().join(format!("{}.ipbatch", node.netns.name()));
            std::fs::write(&file, &batch).expect("write ip batch");
            node.netns
                .ip(&["-batch", &file.display().to_string()])
                .expect("synthetic pods");
            let _ = std::fs::remove_file(&file);
        }
        // The operator's values, which install changes and uninstall must restore.
        for k in ["all", "default"] {
            node.netns
                .sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "2")
                .expect("sysctl");
            node.ztunnel
                .netns
                .sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "1")
                .expect("sysctl");
        }
        node.ztunnel
            .netns
            .sysctl("net.ipv4.conf.eth0.rp_filter", "1")
            .expect("sysctl");
        let veths: Vec<String> = pods.iter().map(|p| p.veth.clone()).collect();
        node.netns
            .run(move || {
                for v in veths {
                    std::fs::write(format!("/proc/sys/net/ipv4/conf/{v}/rp_filter"), "1")?;
                }
                Ok::<_, std::io::Error>(())
            })
            .expect("enter node")
            .expect("pod veth rp_filter");
        let baseline = [("node", &node_ns), ("ztunnel", &zt_ns)]
            .into_iter()
            .map(|(what, p)| {
                (
                    format!("{what} netns"),
                    p.clone(),
                    NetnsSnapshot::capture(p).expect("snapshot"),
                )
            })
            .collect();
        let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
            .expect("stand-in");
        zt.set_captured(pods.iter().map(|p| IpAddr::V4(p.ip)));
        let servers = REAL
            .iter()
            .map(|n| TcpServer::start(&lab.pod(n).netns, lab.pod(n).addr(PORT)).expect("server"))
            .collect();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = AgentDirs::create(&tmp.path().join("r0"), &plugin).expect("dirs");
        CrashLab {
            agent_bin,
            plugin,
            node_ns,
            zt_ns,
            pods,
            baseline,
            zt,
            servers,
            dirs,
            tmp,
            round: 0,
            lab,
        }
    }

    /// A fresh scratch layout (state dir, workloads file, …) for the next round.
    pub fn next_round(&mut self) {
        self.round += 1;
        self.dirs = AgentDirs::create(
            &self.tmp.path().join(format!("r{}", self.round)),
            &self.plugin,
        )
        .expect("dirs");
    }

    pub fn pod(&self, name: &str) -> &PodRef {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The workloads file: ztunnel, `out` (plain) and `mesh` pods named in `ambient`; every
    /// other pod of the lab is listed in `plain` (known, not ambient).
    pub fn write_workloads(&self, ambient: &[String]) {
        let node = self.lab.node(1);
        let mut pods: Vec<Value> = vec![ztunnel_json(NODE, node.ztunnel.ip, &self.zt_ns)];
        pods.push(pod_json(
            "plain",
            "out",
            NODE,
            Some(self.lab.pod("out").ip),
            &[],
            &[],
        ));
        for p in &self.pods {
            let ns = if ambient.contains(&p.name) {
                "mesh"
            } else {
                "plain"
            };
            pods.push(pod_json(ns, &p.name, NODE, Some(p.ip), &[], &[]));
        }
        let namespaces = vec![
            namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
            namespace_json("plain", &[]),
            namespace_json("istio-system", &[]),
        ];
        write_workloads(&self.dirs.workloads, &namespaces, &pods).expect("workloads");
    }

    /// Start the agent, optionally with `MESHCNI_CRASH_AT=<crash>`.
    pub fn start(&self, crash: Option<&str>) -> Agent {
        let env: Vec<(&str, &str)> = crash.map(|c| ("MESHCNI_CRASH_AT", c)).into_iter().collect();
        Agent::start_with_env(&self.agent_bin, &self.node_ns, NODE, &self.dirs, &env)
            .expect("start agent")
    }

    /// Every violation of "each ambient pod has all three pieces, nothing else has any".
    pub fn violations(&self, ambient: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        let set =
            kit::exec_in(&self.node_ns, "ipset", &["save", "ztunnel-pods-ips"]).unwrap_or_default();
        let t100 = kit::exec_in(
            &self.node_ns,
            "ip",
            &["-4", "route", "show", "table", "100"],
        )
        .unwrap_or_default();
        let veths: Vec<String> = self.pods.iter().map(|p| p.veth.clone()).collect();
        let rp: Vec<String> = meshcni_netx::run_in_netns(&self.node_ns, move || {
            veths
                .iter()
                .map(|v| {
                    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{v}/rp_filter"))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_else(|e| format!("<{e}>"))
                })
                .collect()
        })
        .expect("enter node");
        for (p, rp) in self.pods.iter().zip(rp) {
            let member = set
                .lines()
                .any(|l| l.starts_with(&format!("add ztunnel-pods-ips {} ", p.ip)));
            let route = t100
                .lines()
                .any(|l| l.starts_with(&format!("{} via 192.168.126.2 dev istioin", p.ip)));
            if ambient.contains(&p.name) {
                if !member {
                    out.push(format!("{}: ambient but not in the ipset", p.name));
                }
                if !route {
                    out.push(format!(
                        "{}: ambient but no table-100 route (inbound bypasses ztunnel)",
                        p.name
                    ));
                }
                if rp != "0" {
                    out.push(format!(
                        "{}: ambient but rp_filter={rp} on {}",
                        p.name, p.veth
                    ));
                }
            } else {
                if member {
                    out.push(format!("{}: not ambient but in the ipset", p.name));
                }
                if route {
                    out.push(format!("{}: not ambient but has a table-100 route", p.name));
                }
            }
        }
        out
    }

    /// Wait until there are no violations; returns the time it took or the last violations.
    pub fn converge(&self, ambient: &[String], timeout: Duration) -> Result<Duration, Vec<String>> {
        let started = Instant::now();
        loop {
            let v = self.violations(ambient);
            if v.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `out` → `to`:PORT must go through the stand-in's inbound listener (one hop, 15006).
    pub fn inbound_captured(&self, to: &str) -> Result<(), String> {
        self.zt.take_hops();
        let target = self.lab.pod(to);
        let opts = ConnectOpts {
            payload: b"ping\n".to_vec(),
            timeout: Duration::from_secs(3),
            ..ConnectOpts::default()
        };
        let got = connect_text(&self.lab.pod("out").netns, target.addr(PORT), &opts)
            .map_err(|e| format!("out → {to}: {e}"))?;
        if !got.ends_with("ping\n") {
            return Err(format!("out → {to}: echo {got:?}"));
        }
        let hops = self.zt.take_hops();
        if hops.len() == 1 && hops[0].listener_port == 15006 {
            Ok(())
        } else {
            Err(format!("out → {to}: not through ztunnel inbound: {hops:?}"))
        }
    }

    /// Differences from the pre-agent snapshots: (residue bytes, rendered diff).
    pub fn residue(&self) -> (usize, String) {
        let mut bytes = 0;
        let mut text = String::new();
        for (name, path, before) in &self.baseline {
            let after = NetnsSnapshot::capture(path).expect("snapshot");
            bytes += before.residue_bytes(&after);
            for d in before.diff(&after) {
                text.push_str(&format!("[{name}] {d}"));
            }
        }
        (bytes, text)
    }

    /// `meshcni-agent uninstall` (what an operator runs when the agent is gone).
    pub fn run_uninstall(&self) -> Result<String, String> {
        kit::run_uninstall(&self.agent_bin, &self.node_ns, NODE, &self.dirs)
    }

    /// Marker + SIGTERM: the running agent uninstalls on its way out.
    pub fn uninstall_marker(&self) {
        std::fs::write(&self.dirs.marker, "true").expect("marker");
    }
}

/// Whether `status` is a death by SIGKILL.
pub fn killed(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(9)
}

/// The agent and plugin binaries next to each other (built by the same cargo invocation).
pub fn binaries_near(agent: &Path) -> (PathBuf, PathBuf) {
    let plugin = agent.with_file_name("meshcni");
    assert!(
        plugin.is_file(),
        "the meshcni plugin binary is not next to meshcni-agent at {} — build it too (`cargo build -p meshcni-plugin`)",
        plugin.display()
    );
    (agent.to_path_buf(), plugin)
}
