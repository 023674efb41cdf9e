//! The real ambient stack at scale, for benchmarks and the ztunnel-restart dataplane test: the
//! `meshcni-agent` binary in a lab node netns (`iptables` mode, workloads from a file), a
//! ztunnel stand-in, two real pods (`a` in an ambient namespace, `n` in a plain one, each
//! serving TCP), and any number of "bulk" pods: host veths in the node netns (peers in one
//! shared netns) with a `/32` route each, which is all the node side of enrollment touches.
//!
//! Measured from outside the agent: wall time until the node's ipset holds every pod, the
//! agent's CPU (`/proc/<pid>/stat` utime+stime) and memory (`VmRSS`, `VmHWM`), idle CPU, and a
//! ztunnel restart seen on the dataplane ([`crate::probe`]). Errors are `String`s naming what
//! failed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::probe::{Probe, Prober};
use crate::stack::{
    self, Agent, AgentDirs, DATAPLANE_MODE, namespace_json, pod_json, write_workloads, ztunnel_json,
};
use crate::{MultiNodeLab, Netns, TcpServer, ZtunnelStandIn};

/// Node name in the workloads file.
pub const NODE: &str = "node1";
/// Port the real pods serve on.
pub const PORT: u16 = 8080;

/// IP of bulk pod `i` (`10.201.<i/250>.<1 + i%250>`: up to 62,500 pods).
pub fn bulk_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, (i / 250) as u8, 1 + (i % 250) as u8)
}

/// Agent CPU time (user + system) from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    let after = stat
        .rsplit_once(") ")
        .ok_or_else(|| format!("malformed /proc/{pid}/stat"))?
        .1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no field {i} in /proc/{pid}/stat"))
    };
    // utime and stime: fields 14 and 15 (1-based) = 11 and 12 after the comm.
    let ticks = tick(11)? + tick(12)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / hz.max(1)))
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    let field = |name: &str| -> Result<u64, String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Enrolling a batch of pods.
#[derive(Debug, Clone)]
pub struct EnrollReport {
    pub pods: usize,
    /// From writing the workloads file to the ipset holding every pod.
    pub wall: Duration,
    /// Agent CPU in that window.
    pub cpu: Duration,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// An idle window.
#[derive(Debug, Clone)]
pub struct IdleReport {
    pub window: Duration,
    pub cpu: Duration,
    pub rss_kib: u64,
    pub threads: u64,
}

impl IdleReport {
    pub fn cpu_percent(&self) -> f64 {
        self.cpu.as_secs_f64() / self.window.as_secs_f64() * 100.0
    }
}

/// One direction of probing during a ztunnel restart.
#[derive(Debug, Clone)]
pub struct DirectionReport {
    pub name: &'static str,
    pub probes: Vec<Probe>,
    /// When the old stand-in stopped, on the probes' clock.
    pub restart_at: Duration,
    /// Probes answered through the old / the new ztunnel stand-in.
    pub via_old: usize,
    pub via_new: usize,
    /// Answered by the server with no stand-in having accepted them: uncaptured.
    pub escaped: Vec<Probe>,
    /// Not answered (refused, reset, timed out), in all / started within the gap.
    pub failed: usize,
    pub failed_in_gap: usize,
    /// Answered only after `slow` (first SYN lost, TCP retransmitted), all / within the gap.
    /// Outside the gap these are the loaded machine dropping SYNs (accept backlogs), not the
    /// dataplane switch.
    pub delayed: usize,
    pub delayed_in_gap: usize,
    /// The dataplane gap: from the start of the last probe answered promptly through the old
    /// ztunnel to the start of the first probe answered promptly through the new one. No new
    /// connection started in between got through promptly.
    pub gap: Option<Duration>,
    /// Largest and 99th-percentile distance between consecutive probe starts.
    pub max_spacing: Duration,
    pub p99_spacing: Duration,
}

/// A ztunnel restart (old stand-in stopped, new ztunnel pod in the workloads file).
#[derive(Debug, Clone)]
pub struct RestartReport {
    /// From stopping the old stand-in to the agent logging the new ztunnel.
    pub agent_switch: Option<Duration>,
    pub directions: Vec<DirectionReport>,
}

/// See the module docs.
pub struct AmbientBenchLab {
    pub lab: MultiNodeLab,
    pub bulk: Netns,
    pub dirs: AgentDirs,
    pub agent: Agent,
    pub ztunnel: Option<ZtunnelStandIn>,
    /// The workloads file's pods except bulk pods (ztunnel first).
    base_pods: Vec<Value>,
    bulk_pods: usize,
    _servers: Vec<TcpServer>,
    _tmp: TempDir,
}

/// A temp dir removed on drop (no `tempfile` dependency here).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn namespaces() -> Vec<Value> {
    vec![
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
        namespace_json("plain", &[]),
        namespace_json("istio-system", &[]),
    ]
}

impl AmbientBenchLab {
    /// Build the lab (`bulk` host veths created up front, not yet in the workloads file),
    /// start the agent with the ztunnel and pods `a`, `n`, wait until it is ready and `a` is
    /// enrolled.
    pub fn start(agent_bin: &Path, plugin: &Path, tag: &str, bulk: usize) -> Result<Self, String> {
        let lab = MultiNodeLab::new(tag, &[&["a", "n"]]).map_err(|e| e.to_string())?;
        let node = lab.node(1);
        let bulk_ns = Netns::new(&format!("{tag}bulk")).map_err(|e| e.to_string())?;
        if bulk > 0 {
            let mut batch = String::new();
            for i in 0..bulk {
                batch.push_str(&format!(
                    "link add bv{i} type veth peer name be{i} netns {}\nlink set bv{i} up\nroute add {}/32 dev bv{i} scope link\n",
                    bulk_ns.name(),
                    bulk_ip(i)
                ));
            }
            let file =
                std::env::temp_dir().join(format!("mcni-{}-{tag}-bulk.batch", std::process::id()));
            std::fs::write(&file, batch).map_err(|e| format!("write {}: {e}", file.display()))?;
            let out = Command::new("ip")
                .args(["-n", node.netns.name(), "-batch"])
                .arg(&file)
                .output()
                .map_err(|e| format!("spawn ip -batch: {e}"))?;
            let _ = std::fs::remove_file(&file);
            if !out.status.success() {
                return Err(format!(
                    "ip -n {} -batch ({bulk} veths): {}",
                    node.netns.name(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let zt = &node.ztunnel;
        let stand_in =
            ZtunnelStandIn::start(&zt.netns, IpAddr::V4(zt.ip)).map_err(|e| e.to_string())?;
        stand_in.set_captured([IpAddr::V4(lab.pod("a").ip)]);
        let servers = vec![
            TcpServer::start(&lab.pod("a").netns, lab.pod("a").addr(PORT))
                .map_err(|e| e.to_string())?,
            TcpServer::start(&lab.pod("n").netns, lab.pod("n").addr(PORT))
                .map_err(|e| e.to_string())?,
        ];
        let root = std::env::temp_dir().join(format!("mcni-{}-{tag}-agent", std::process::id()));
        std::fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
        let tmp = TempDir(root.clone());
        let dirs = AgentDirs::create(&root, plugin)?;
        let base_pods = vec![
            ztunnel_json(NODE, zt.ip, zt.netns.path()),
            pod_json("mesh", "a", NODE, Some(lab.pod("a").ip), &[], &[]),
            pod_json("plain", "n", NODE, Some(lab.pod("n").ip), &[], &[]),
        ];
        write_workloads(&dirs.workloads, &namespaces(), &base_pods)?;
        let node_ns = node.netns.path().to_path_buf();
        let mut agent = Agent::start(agent_bin, &node_ns, NODE, &dirs)?;
        agent.wait_ready(Duration::from_secs(60))?;
        let mut me = AmbientBenchLab {
            lab,
            bulk: bulk_ns,
            dirs,
            agent,
            ztunnel: Some(stand_in),
            base_pods,
            bulk_pods: 0,
            _servers: servers,
            _tmp: tmp,
        };
        me.wait_enrolled(1, Duration::from_secs(30))?;
        Ok(me)
    }

    pub fn node_netns(&self) -> &Path {
        self.lab.node(1).netns.path()
    }

    pub fn pid(&self) -> Result<u32, String> {
        self.agent
            .pid()
            .ok_or_else(|| "the agent is not running".to_string())
    }

    /// Entries in the node's `ztunnel-pods-ips` ipset.
    pub fn enrolled(&self) -> Result<usize, String> {
        let out = stack::exec_in(
            self.node_netns(),
            "ipset",
            &["list", "-t", "ztunnel-pods-ips"],
        )?;
        out.lines()
            .find_map(|l| l.strip_prefix("Number of entries:"))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| format!("no entry count in `ipset list -t`: {out}"))
    }

    fn wait_enrolled(&mut self, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.enrolled().unwrap_or(0);
            if have == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{have} of {n} pods enrolled after {timeout:?}; agent log tail:\n{}",
                    tail(&self.agent.log(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn write(&self, ztunnel: &[Value], bulk: usize) -> Result<(), String> {
        let mut pods: Vec<Value> = ztunnel.to_vec();
        pods.extend(self.base_pods.iter().skip(1).cloned());
        for i in 0..bulk {
            pods.push(pod_json(
                "mesh",
                &format!("bulk-{i}"),
                NODE,
                Some(bulk_ip(i)),
                &[],
                &[],
            ));
        }
        write_workloads(&self.dirs.workloads, &namespaces(), &pods)
    }

    /// Add `pods` bulk pods to the workloads file (the first `pods` of those created at start)
    /// and time their enrollment.
    pub fn enroll_bulk(&mut self, pods: usize, timeout: Duration) -> Result<EnrollReport, String> {
        let pid = self.pid()?;
        let c0 = cpu_time(pid)?;
        let t0 = Instant::now();
        self.write(&self.base_pods[..1], pods)?;
        self.wait_enrolled(pods + 1, timeout)?;
        let wall = t0.elapsed();
        let cpu = cpu_time(pid)? - c0;
        let (rss_kib, hwm_kib) = memory_kib(pid)?;
        self.bulk_pods = pods;
        Ok(EnrollReport {
            pods,
            wall,
            cpu,
            rss_kib,
            hwm_kib,
        })
    }

    /// Agent CPU over `window` with nothing changing.
    pub fn idle(&self, window: Duration) -> Result<IdleReport, String> {
        let pid = self.pid()?;
        let c0 = cpu_time(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let cpu = cpu_time(pid)? - c0;
        let window = t0.elapsed();
        let (rss_kib, _) = memory_kib(pid)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok(IdleReport {
            window,
            cpu,
            rss_kib,
            threads,
        })
    }

    /// Restart ztunnel while probing every `interval` in both directions through pod `a`
    /// (outbound `a` → `n`, inbound `n` → `a`): a new ztunnel pod (new netns, IP and veth, new
    /// name and UID, newer) gets its stand-in up, then the old stand-in stops and, at the same
    /// moment, the workloads file replaces the old ztunnel pod by the new one (what a DaemonSet
    /// rollout does). Probing starts `before` the restart and runs until `after` past the
    /// agent's switch.
    pub fn restart_ztunnel(
        &mut self,
        interval: Duration,
        before: Duration,
        after: Duration,
    ) -> Result<RestartReport, String> {
        let slow = Duration::from_millis(500);
        let timeout = Duration::from_secs(5);
        let new = self.lab.add_pod(1, "zt2").map_err(|e| e.to_string())?;
        let (new_ip, new_ns) = (new.ip, new.netns.path().to_path_buf());
        let new_stand_in = ZtunnelStandIn::start(&self.lab.pod("zt2").netns, IpAddr::V4(new_ip))
            .map_err(|e| e.to_string())?;
        new_stand_in.set_captured([IpAddr::V4(self.lab.pod("a").ip)]);
        let mut new_pod = ztunnel_json(NODE, new_ip, &new_ns);
        new_pod["metadata"]["name"] = Value::from(format!("ztunnel-{NODE}-2"));
        new_pod["metadata"]["uid"] = Value::from(stack::pod_uid(&format!("ztunnel-{NODE}-2")));
        new_pod["metadata"]["creationTimestamp"] = Value::from("2026-01-02T00:00:00Z");

        let (a, n) = (self.lab.pod("a"), self.lab.pod("n"));
        let out =
            Prober::start(&a.netns, n.addr(PORT), interval, timeout).map_err(|e| e.to_string())?;
        let inb =
            Prober::start(&n.netns, a.addr(PORT), interval, timeout).map_err(|e| e.to_string())?;
        std::thread::sleep(before);
        let log_len = self.agent.log().len();
        let old = self
            .ztunnel
            .take()
            .ok_or("no running ztunnel stand-in to restart")?;
        let old_hops = old.hops();
        let t_restart = Instant::now();
        let restart_at = [out.elapsed(), inb.elapsed()];
        drop(old);
        self.write(&[new_pod], self.bulk_pods)?;
        // The agent logs "ambient iptables mode redirects to ztunnel" once it switched.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut agent_switch = None;
        while Instant::now() < deadline {
            let log = self.agent.log();
            let new_part = &log[log_len.min(log.len())..];
            if new_part.contains("ztunnel-node1-2") && new_part.contains("redirects to ztunnel") {
                agent_switch = Some(t_restart.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(after);
        out.halt();
        inb.halt();
        let outbound = out.stop().map_err(|e| e.to_string())?;
        let inbound = inb.stop().map_err(|e| e.to_string())?;
        let new_hops = new_stand_in.hops();
        self.ztunnel = Some(new_stand_in);
        let classify = |name: &'static str, restart_at: Duration, probes: Vec<Probe>| {
            let peer_in = |hops: &[crate::ZtunnelHop], local: SocketAddr| {
                hops.iter().any(|h| h.peer == local)
            };
            #[derive(PartialEq)]
            enum Via {
                Old,
                New,
                Escaped,
                Failed,
            }
            let via: Vec<Via> = probes
                .iter()
                .map(|p| {
                    // The server's banner names the peer it saw. Through a stand-in that is the
                    // stand-in's upstream socket (client IP, another port); a connection that
                    // bypassed capture shows the client's own socket, and no stand-in
                    // accepted it.
                    let seen: Option<SocketAddr> = p
                        .reply
                        .as_ref()
                        .ok()
                        .and_then(|l| l.split(" peer:").nth(1))
                        .and_then(|a| a.trim().parse().ok());
                    match (&p.reply, p.local) {
                        (Err(_), _) => Via::Failed,
                        (Ok(_), Some(local)) if peer_in(&new_hops, local) => Via::New,
                        (Ok(_), Some(local)) if peer_in(&old_hops, local) => Via::Old,
                        // Proxied, accepted by the old stand-in after its hops were read.
                        (Ok(_), Some(local)) if seen.is_some_and(|s| s != local) => Via::Old,
                        (Ok(_), _) => Via::Escaped,
                    }
                })
                .collect();
            let prompt = |p: &Probe| p.took.is_some_and(|t| t <= slow);
            let last_old = probes
                .iter()
                .zip(&via)
                .filter(|(p, v)| **v == Via::Old && prompt(p))
                .map(|(p, _)| p.started)
                .max();
            let first_new = probes
                .iter()
                .zip(&via)
                .filter(|(p, v)| **v == Via::New && prompt(p) && p.started >= restart_at)
                .map(|(p, _)| p.started)
                .min();
            let gap = match (last_old, first_new) {
                (Some(a), Some(b)) if b >= a => Some(b - a),
                _ => None,
            };
            let in_gap = |p: &Probe| {
                last_old.is_some_and(|a| p.started > a) && first_new.is_some_and(|b| p.started < b)
            };
            let delayed = |p: &Probe| p.ok() && !prompt(p);
            let mut spacing: Vec<Duration> = probes
                .windows(2)
                .map(|w| w[1].started.saturating_sub(w[0].started))
                .collect();
            spacing.sort();
            DirectionReport {
                name,
                restart_at,
                via_old: via.iter().filter(|v| **v == Via::Old).count(),
                via_new: via.iter().filter(|v| **v == Via::New).count(),
                escaped: probes
                    .iter()
                    .zip(&via)
                    .filter(|(_, v)| **v == Via::Escaped)
                    .map(|(p, _)| p.clone())
                    .collect(),
                failed: probes.iter().filter(|p| !p.ok()).count(),
                failed_in_gap: probes.iter().filter(|p| !p.ok() && in_gap(p)).count(),
                delayed: probes.iter().filter(|p| delayed(p)).count(),
                delayed_in_gap: probes.iter().filter(|p| delayed(p) && in_gap(p)).count(),
                gap,
                max_spacing: spacing.last().copied().unwrap_or_default(),
                p99_spacing: spacing
                    .get(spacing.len().saturating_sub(1) * 99 / 100)
                    .copied()
                    .unwrap_or_default(),
                probes,
            }
        };
        Ok(RestartReport {
            agent_switch,
            directions: vec![
                classify("outbound a → n (captured client)", restart_at[0], outbound),
                classify("inbound n → a (captured server)", restart_at[1], inbound),
            ],
        })
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
