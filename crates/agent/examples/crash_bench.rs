//! Issue 8 "Numbers": SIGKILL the real `meshcni-agent` (iptables mode) at random points, again
//! and again, and count what survives. Each round, on one lab node (see
//! `tests/crash_lab/mod.rs`: real pods `a`, `b` + synthetic pods, the operator's non-default
//! sysctls set, node and ztunnel netns snapshotted before anything runs):
//!
//! 1. **initial enrollment** of `--pods` ambient pods: the agent is started and killed;
//! 2. **change** of `--change` pods (half released, half new) on a running agent: killed;
//! 3. **uninstall** (marker + SIGTERM): killed, then `meshcni-agent uninstall` run.
//!
//! A kill is either a named crash point with a random hit count (`MESHCNI_CRASH_AT`, debug or
//! `crash-points` builds) or a SIGKILL after a random delay — chosen at random. After each kill
//! in 1 and 2 the agent is restarted and must converge: every ambient pod has its ipset entry,
//! table-100 route and `rp_filter=0` on its veth, nothing else has any, and inbound traffic to
//! the real ambient pods goes through the ztunnel stand-in (each miss is a violation). After 3,
//! the node and ztunnel netns are compared byte for byte with the snapshots (residue bytes).
//!
//! Run as root (`scripts/crash-bench.sh` builds and runs it):
//! `crash_bench [--pods 200] [--change 50] [--kills 100] [--seed 1] [--out FILE]`

#[path = "../tests/crash_lab/mod.rs"]
mod crash_lab;

use std::time::{Duration, Instant};

use crash_lab::{CrashLab, binaries_near, killed};
use meshcni_testkit::stack::Agent;

const T: Duration = Duration::from_secs(120);

/// xorshift64*: reproducible from `--seed`, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Default)]
struct PhaseStats {
    kills: u32,
    by_point: u32,
    by_timer: u32,
    /// Crash points whose hit count was not reached (the agent converged first) and that were
    /// killed after convergence instead.
    late: u32,
    convergences: u32,
    violations: u32,
    residue_bytes: usize,
    times_ms: Vec<u128>,
}

fn sigkill(agent: &mut Agent) -> bool {
    let Some(pid) = agent.pid() else {
        return false;
    };
    let alive = agent.wait_exit(Duration::ZERO).ok().flatten().is_none();
    if alive {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = agent.wait_exit(Duration::from_secs(10));
    }
    alive
}

/// Wait for a crash-point death; if it does not come within `grace`, SIGKILL. Returns
/// (killed at all, killed by the crash point).
fn await_crash(agent: &mut Agent, grace: Duration) -> (bool, bool) {
    match agent.wait_exit(grace) {
        Ok(Some(s)) if killed(&s) => (true, true),
        Ok(Some(_)) => (false, false),
        _ => (sigkill(agent), false),
    }
}

fn recover(lab: &CrashLab, ambient: &[String], st: &mut PhaseStats) -> Agent {
    let started = Instant::now();
    let mut agent = lab.start(None);
    if let Err(e) = agent.wait_ready(T) {
        eprintln!("restarted agent not ready: {e}");
        st.violations += 1;
        return agent;
    }
    match lab.converge(ambient, T) {
        Ok(_) => {
            st.convergences += 1;
            st.times_ms.push(started.elapsed().as_millis());
        }
        Err(v) => {
            eprintln!("not converged:\n{}", v.join("\n"));
            st.violations += v.len() as u32;
        }
    }
    for real in crash_lab::REAL {
        if ambient.iter().any(|a| a == real)
            && let Err(e) = lab.inbound_captured(real)
        {
            eprintln!("{e}");
            st.violations += 1;
        }
    }
    agent
}

fn pick(rng: &mut Rng, points: &[(&str, u64)]) -> String {
    let (p, max) = points[rng.below(points.len() as u64) as usize];
    format!("{p}:{}", 1 + rng.below(max))
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pods = arg(&args, "--pods", 200) as usize;
    let change = arg(&args, "--change", 50) as usize;
    let want_kills = arg(&args, "--kills", 100) as u32;
    let seed = arg(&args, "--seed", 1);
    let out = args
        .windows(2)
        .find(|w| w[0] == "--out")
        .map(|w| w[1].clone());
    let exe = std::env::current_exe().expect("current exe");
    let agent_bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("meshcni-agent"))
        .expect("target dir");
    let (agent_bin, plugin) = binaries_near(&agent_bin);
    // `pods` ambient pods = a, b + synthetic; the change releases change/2 of them and adds
    // change/2 synthetic pods that were not ambient before.
    let synth = pods.saturating_sub(2) + change / 2;
    let mut lab = CrashLab::new("cbn", agent_bin, plugin, synth);
    let names = |r: std::ops::Range<usize>| -> Vec<String> { r.map(|i| format!("s{i}")).collect() };
    let mut initial = vec!["a".to_string(), "b".to_string()];
    initial.extend(names(0..pods.saturating_sub(2)));
    let mut changed = vec!["a".to_string(), "b".to_string()];
    changed.extend(names(change / 2..synth));

    let n = pods as u64;
    let c = (change / 2).max(1) as u64;
    let install_points: &[(&str, u64)] = &[
        ("state-before-rename", 4),
        ("install-after-chains", 1),
        ("install-after-tunnels", 1),
        ("install-before-ztunnel-netns", 1),
        ("ztunnel-after-tables-saved", 1),
        ("sysctl-after-save", 3),
        ("sysctl-before-write", n + 12),
        ("sysctl-after-write", n + 12),
        ("enroll-after-ipset", n),
        ("enroll-after-route", n),
    ];
    let change_points: &[(&str, u64)] = &[
        ("release-after-route", c),
        ("enroll-after-ipset", c),
        ("enroll-after-route", c),
        ("sysctl-before-write", c),
        ("sysctl-after-save", 1),
        ("state-before-rename", 2),
    ];
    let uninstall_points: &[(&str, u64)] = &[
        ("uninstall-after-ztunnel-netns", 1),
        ("uninstall-after-chains", 1),
        ("uninstall-after-links", 1),
        ("uninstall-mid-sysctls", 2),
        ("uninstall-before-state-remove", 1),
    ];

    let mut rng = Rng(seed.max(1));
    let (mut a, mut b, mut u) = (
        PhaseStats::default(),
        PhaseStats::default(),
        PhaseStats::default(),
    );
    let mut rounds = 0;
    let started = Instant::now();
    while a.kills + b.kills + u.kills < want_kills {
        rounds += 1;
        lab.next_round();
        // 1. Initial enrollment.
        lab.write_workloads(&initial);
        let (mut agent, timed) = if rng.below(2) == 0 {
            (lab.start(Some(&pick(&mut rng, install_points))), false)
        } else {
            (lab.start(None), true)
        };
        let (k, by_point) = if timed {
            std::thread::sleep(Duration::from_millis(rng.below(3000)));
            (sigkill(&mut agent), false)
        } else {
            await_crash(&mut agent, Duration::from_secs(20))
        };
        if k {
            a.kills += 1;
            if by_point {
                a.by_point += 1;
            } else if timed {
                a.by_timer += 1;
            } else {
                a.late += 1;
            }
        }
        let mut agent = recover(&lab, &initial, &mut a);
        let _ = agent.terminate(T);

        // 2. Change on a running agent.
        let timed = rng.below(2) == 0;
        let mut agent = if timed {
            lab.start(None)
        } else {
            lab.start(Some(&pick(&mut rng, change_points)))
        };
        // Some points are also on the start-up path (the state file is rewritten when the
        // agent adopts the node): a death there is a kill before the change.
        let (k, by_point) = match agent.wait_ready(T) {
            Err(e) if !timed && e.contains("signal: 9") => {
                lab.write_workloads(&changed);
                (true, true)
            }
            ready => {
                if let Err(e) = ready {
                    eprintln!("agent not ready before the change: {e}");
                    b.violations += 1;
                } else if let Err(v) = lab.converge(&initial, T) {
                    eprintln!("not converged before the change:\n{}", v.join("\n"));
                    b.violations += v.len() as u32;
                }
                lab.write_workloads(&changed);
                if timed {
                    std::thread::sleep(Duration::from_millis(rng.below(1500)));
                    (sigkill(&mut agent), false)
                } else {
                    await_crash(&mut agent, Duration::from_secs(10))
                }
            }
        };
        if k {
            b.kills += 1;
            if by_point {
                b.by_point += 1;
            } else if timed {
                b.by_timer += 1;
            } else {
                b.late += 1;
            }
        }
        let mut agent = recover(&lab, &changed, &mut b);

        // 3. Uninstall, killed; `meshcni-agent uninstall` finishes.
        let timed = rng.below(2) == 0;
        let _ = agent.terminate(T);
        let mut agent = if timed {
            lab.start(None)
        } else {
            lab.start(Some(&pick(&mut rng, uninstall_points)))
        };
        if let Err(e) = agent.wait_ready(T) {
            eprintln!("agent not ready before uninstall: {e}");
            u.violations += 1;
        } else if let Err(v) = lab.converge(&changed, T) {
            eprintln!("not converged before uninstall:\n{}", v.join("\n"));
            u.violations += v.len() as u32;
        }
        lab.uninstall_marker();
        let pid = agent.pid();
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let (k, by_point) = if timed {
            std::thread::sleep(Duration::from_millis(rng.below(400)));
            (sigkill(&mut agent), false)
        } else {
            await_crash(&mut agent, Duration::from_secs(20))
        };
        if k {
            u.kills += 1;
            if by_point {
                u.by_point += 1;
            } else if timed {
                u.by_timer += 1;
            } else {
                u.late += 1;
            }
        }
        match lab.run_uninstall() {
            Ok(_) => u.convergences += 1,
            Err(e) => {
                eprintln!("uninstall after the kill failed: {e}");
                u.violations += 1;
            }
        }
        let (bytes, diff) = lab.residue();
        if bytes > 0 {
            eprintln!("round {rounds}: residue {bytes} bytes:\n{diff}");
        }
        u.residue_bytes += bytes;
        eprintln!(
            "round {rounds}: kills {} (enroll {}, change {}, uninstall {}), violations {}, residue {} B, {:?}",
            a.kills + b.kills + u.kills,
            a.kills,
            b.kills,
            u.kills,
            a.violations + b.violations + u.violations,
            a.residue_bytes + b.residue_bytes + u.residue_bytes,
            started.elapsed()
        );
        if bytes > 0 {
            break; // the node is no longer at its baseline: later rounds would be meaningless
        }
    }
    let median = |v: &mut Vec<u128>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let mut table = format!(
        "pods {pods}, change {change}, seed {seed}, rounds {rounds}, wall {:.0} s\n\n\
         | phase | kills | at a crash point | after a random delay | crash point not reached (killed after convergence) | convergences | violations | median restart→converged | uninstall residue |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        started.elapsed().as_secs_f64()
    );
    for (name, st) in [
        (format!("initial enrollment of {pods}"), &mut a),
        (format!("change of {change}"), &mut b),
        ("uninstall".to_string(), &mut u),
    ] {
        let m = median(&mut st.times_ms);
        table.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            st.kills,
            st.by_point,
            st.by_timer,
            st.late,
            st.convergences,
            st.violations,
            if m > 0 {
                format!("{m} ms")
            } else {
                "–".into()
            },
            if name == "uninstall" {
                format!("{} B", st.residue_bytes)
            } else {
                "–".into()
            },
        ));
    }
    table.push_str(&format!(
        "| **total** | **{}** | {} | {} | {} | {} | **{}** | | **{} B** |\n",
        a.kills + b.kills + u.kills,
        a.by_point + b.by_point + u.by_point,
        a.by_timer + b.by_timer + u.by_timer,
        a.late + b.late + u.late,
        a.convergences + b.convergences + u.convergences,
        a.violations + b.violations + u.violations,
        u.residue_bytes,
    ));
    print!("{table}");
    if let Some(path) = out {
        std::fs::write(&path, &table).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
    let bad = a.violations + b.violations + u.violations > 0 || u.residue_bytes > 0;
    drop(lab); // deletes the lab's namespaces (`exit` runs no destructors)
    std::process::exit(i32::from(bad));
}
