//! Ambient `iptables` mode at scale, measured from outside the real agent binary
//! (`meshcni_testkit::ambient_bench`): for each pod count, a fresh lab node (node netns,
//! ztunnel stand-in, pods `a`/`n`, N bulk pod veths), the agent started with only the ztunnel
//! and `a`/`n` in its workloads file, then N pods added in one file update:
//!
//! * enroll: wall time until the node ipset holds every pod, and agent CPU in that window;
//! * memory: `VmRSS` after enrolling and peak `VmHWM`;
//! * idle: agent CPU over an idle window after a settle time, with the pods enrolled;
//! * optionally (`--restart-at N`) a ztunnel restart with N pods enrolled, probed on the
//!   dataplane every `--probe-interval-us` in both directions through the captured pod.
//!
//! Needs root and the release binaries next to this example (`scripts/bench-ambient.sh`
//! builds them). Prints Markdown tables. Usage:
//!
//! ```text
//! ambient_scale_bench [--pods 0,1000,5000] [--idle-seconds 20] [--settle-seconds 5]
//!                     [--restart-at 1000] [--probe-interval-us 1000]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use meshcni_testkit::ambient_bench::{AmbientBenchLab, EnrollReport, IdleReport, RestartReport};

struct Opts {
    pods: Vec<usize>,
    idle: Duration,
    settle: Duration,
    restart_at: Option<usize>,
    interval: Duration,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        pods: vec![0, 1000, 5000],
        idle: Duration::from_secs(20),
        settle: Duration::from_secs(5),
        restart_at: Some(1000),
        interval: Duration::from_millis(1),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--pods" => {
                o.pods = val()?
                    .split(',')
                    .map(|p| p.trim().parse().map_err(|e| format!("--pods {p}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--idle-seconds" => o.idle = Duration::from_secs(num(val()?)?),
            "--settle-seconds" => o.settle = Duration::from_secs(num(val()?)?),
            "--restart-at" => {
                let v = val()?;
                o.restart_at = if v == "none" {
                    None
                } else {
                    Some(num(v)? as usize)
                };
            }
            "--probe-interval-us" => o.interval = Duration::from_micros(num(val()?)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn binaries() -> Result<(PathBuf, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/examples/<this> → target/<profile>/
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .ok_or("cannot locate the target dir")?;
    let (agent, plugin) = (dir.join("meshcni-agent"), dir.join("meshcni"));
    for b in [&agent, &plugin] {
        if !b.is_file() {
            return Err(format!(
                "{} is missing: build it first (cargo build --release -p meshcni-agent -p meshcni-plugin)",
                b.display()
            ));
        }
    }
    Ok((agent, plugin))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ambient_scale_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let o = parse()?;
    let (agent, plugin) = binaries()?;
    let mut rows: Vec<(EnrollReport, IdleReport)> = Vec::new();
    let mut restart: Option<(usize, RestartReport)> = None;
    for &n in &o.pods {
        eprintln!("building a lab with {n} pod veths …");
        let mut lab = AmbientBenchLab::start(&agent, &plugin, &format!("sc{n}"), n)?;
        eprintln!("enrolling {n} pods …");
        let e = lab.enroll_bulk(n, Duration::from_secs(600))?;
        std::thread::sleep(o.settle);
        eprintln!("idle {:?} …", o.idle);
        let i = lab.idle(o.idle)?;
        if o.restart_at == Some(n) {
            eprintln!("ztunnel restart with {n} pods enrolled …");
            let r = lab.restart_ztunnel(
                o.interval,
                Duration::from_millis(500),
                Duration::from_millis(1500),
            )?;
            restart = Some((n, r));
        }
        rows.push((e, i));
    }

    println!(
        "| pods | enroll wall | agent CPU while enrolling | CPU per pod | VmRSS after | peak (VmHWM) | idle CPU ({} s, after {} s) | idle VmRSS | threads |",
        o.idle.as_secs(),
        o.settle.as_secs()
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (e, i) in &rows {
        let per_pod = if e.pods > 0 {
            format!("{:.3} ms", e.cpu.as_secs_f64() * 1000.0 / e.pods as f64)
        } else {
            "–".into()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} % | {} | {} |",
            e.pods,
            ms(e.wall),
            ms(e.cpu),
            per_pod,
            mib(e.rss_kib),
            mib(e.hwm_kib),
            i.cpu_percent(),
            mib(i.rss_kib),
            i.threads
        );
    }
    let find = |n: usize| rows.iter().find(|(e, _)| e.pods == n).map(|(e, _)| e);
    if let (Some(k1), Some(k5)) = (find(1000), find(5000)) {
        println!();
        println!(
            "Linearity: 5,000-pod wall / (5 × 1,000-pod wall) = {:.2}; CPU {:.2} (target ≤ 1.5).",
            k5.wall.as_secs_f64() / (5.0 * k1.wall.as_secs_f64()),
            k5.cpu.as_secs_f64() / (5.0 * k1.cpu.as_secs_f64()),
        );
    }
    if let Some((n, r)) = restart {
        println!();
        println!(
            "ztunnel restart with {n} pods enrolled, a new connection every {} µs per direction; agent switch {} after the old ztunnel stopped:",
            o.interval.as_micros(),
            r.agent_switch.map(ms).unwrap_or_else(|| "never".into())
        );
        println!();
        println!(
            "| direction | probes | start spacing p99 / max | via old ztunnel | via new ztunnel | failed (in gap) | delayed > 0.5 s (in gap) | escaped capture | dataplane gap |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for d in &r.directions {
            println!(
                "| {} | {} | {:.1} / {:.1} ms | {} | {} | {} ({}) | {} ({}) | **{}** | {} |",
                d.name,
                d.probes.len(),
                d.p99_spacing.as_secs_f64() * 1000.0,
                d.max_spacing.as_secs_f64() * 1000.0,
                d.via_old,
                d.via_new,
                d.failed,
                d.failed_in_gap,
                d.delayed,
                d.delayed_in_gap,
                d.escaped.len(),
                d.gap.map(ms).unwrap_or_else(|| "n/a".into())
            );
        }
    }
    Ok(())
}
