//! Issue 11 "Numbers": the ambient `ebpf` redirect mode against the `iptables` mode and no
//! redirection, in the same run, through the same ztunnel stand-in (root; every namespace is
//! the bench's own, pins on a private bpffs). Prints Markdown tables.
//!
//! ```text
//! ebpf_bench conn   [--n 500] [--rounds 3] [--bulk-mib 256]
//! ebpf_bench enroll [--pods 200] [--rounds 3]
//! ```
//!
//! * `conn`: one two-node traffic lab per mode (`tests/ambient_mesh`: the agent's reconciler
//!   and the mode's driver per node, a `ZtunnelStandIn` per node), both up at once; per round
//!   and mode (the order alternates between rounds): N sequential exchanges (connect, 5 bytes,
//!   half-close, read to EOF; `multinode::timed_exchanges`) on each path, then one bulk TCP
//!   stream (the client writes `--bulk-mib` MiB to a sink that reads with 256 KiB buffers and
//!   answers the byte count). Paths: no redirection (b→o, same node, neither enrolled),
//!   captured→plain (a→o, 15001 hop), plain→captured (b→a, 15006 hop), captured→captured across
//!   nodes (a→c, 15001 → HBONE → 15008).
//! * `enroll`: one lab of N pods, each with its own netns (held by file descriptors, never
//!   bind-mounted: no mount per pod on the machine) and a veth whose host side is in the node
//!   netns with its `/32` route, plus a ztunnel netns. Per round and mode (order alternating):
//!   a fresh driver, install (`ztunnel_changed`), N `apply(Enroll)` with the pod's netns given
//!   (as a CNI ADD gives it), then N `apply(Release)`, N `apply(Enroll)` again (a label flip of
//!   running pods: ebpf re-uses the pinned links), then `uninstall`. The state files are on the
//!   same file system for both modes.
//!
//! Run through `scripts/bench-ebpf.sh`.

#[path = "../tests/ambient_mesh/mod.rs"]
mod ambient_mesh;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambient_mesh::{Mesh, Mode};
use meshcni_agent::ambient::{Action, PodId, RedirectDriver, ZtunnelInfo};
use meshcni_agent::enroll::PodNetns;
use meshcni_agent::modes::ebpf::{EbpfDriver, EbpfModeConfig};
use meshcni_agent::modes::iptables::{
    IptablesDriver, IptablesModeConfig, ZTUNNEL_NETNS_ANNOTATION,
};
use meshcni_netx::podns::NetnsId;
use meshcni_testkit::multinode::{EchoServer, timed_exchanges};
use meshcni_testkit::{Netns, veth};

const BENCH_PORT: u16 = 8090;
const SINK_PORT: u16 = 8091;

fn usage() -> ! {
    eprintln!(
        "usage: ebpf_bench conn [--n N] [--rounds R] [--bulk-mib M] | enroll [--pods N] [--rounds R] [--attach tcx|clsact]"
    );
    std::process::exit(2)
}

fn flag(args: &[String], name: &str, default: usize) -> usize {
    match args.iter().position(|a| a == name) {
        None => default,
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for a in args.iter().skip(1).step_by(2) {
        if !["--n", "--rounds", "--bulk-mib", "--pods", "--attach"].contains(&a.as_str()) {
            usage();
        }
    }
    match args.first().map(String::as_str) {
        Some("conn") => conn(
            flag(&args, "--n", 500),
            flag(&args, "--rounds", 3),
            flag(&args, "--bulk-mib", 256),
        ),
        Some("enroll") => {
            let attach = match args.iter().position(|a| a == "--attach") {
                None => meshcni_ebpf::AttachMode::Auto,
                Some(i) => match args.get(i + 1).map(String::as_str) {
                    Some("tcx") => meshcni_ebpf::AttachMode::Tcx,
                    Some("clsact") => meshcni_ebpf::AttachMode::Clsact,
                    _ => usage(),
                },
            };
            enroll(
                flag(&args, "--pods", 200),
                flag(&args, "--rounds", 3),
                attach,
            )
        }
        _ => usage(),
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Iptables => "iptables",
        Mode::Ebpf => "ebpf",
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// (rate/s, p50 µs, p90 µs, p99 µs).
type Stats = (f64, f64, f64, f64);

/// [`Stats`] of sequential exchange times.
fn stats(mut times: Vec<Duration>) -> Stats {
    let total: Duration = times.iter().sum();
    times.sort();
    let pick = |q: f64| us(times[((times.len() - 1) as f64 * q).round() as usize]);
    (
        times.len() as f64 / total.as_secs_f64(),
        pick(0.5),
        pick(0.9),
        pick(0.99),
    )
}

/// A sink: accepts one connection at a time, reads to EOF with 256 KiB reads, answers the
/// byte count (8 bytes, big-endian) and closes.
fn start_sink(ns: &Netns, addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let listener = ns
        .run(move || TcpListener::bind(addr))
        .expect("netns")
        .expect("bind sink");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            let _ = s.write_all(&total.to_be_bytes());
        }
    })
}

/// One stream of `bytes` from `ns` to the sink at `addr`; MB/s (10^6 bytes) until the sink
/// confirmed the count.
fn bulk(ns: &Netns, addr: SocketAddr, bytes: usize) -> f64 {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        let chunk = vec![7u8; 256 * 1024];
        let start = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            s.write_all(&chunk[..n]).expect("write");
            sent += n;
        }
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut got = [0u8; 8];
        s.read_exact(&mut got).expect("sink count");
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(u64::from_be_bytes(got), bytes as u64, "sink got every byte");
        bytes as f64 / secs / 1e6
    })
    .expect("netns")
}

const PATHS: &[(&str, &str, &str)] = &[
    ("no redirection (b→o, same node)", "b", "o"),
    ("captured→plain (a→o, 15001)", "a", "o"),
    ("plain→captured (b→a, 15006)", "b", "a"),
    ("captured→captured x-node (a→c, 15001→15008)", "a", "c"),
];

fn conn(n: usize, rounds: usize, bulk_mib: usize) {
    let meshes: Vec<(Mode, Mesh)> = [Mode::Iptables, Mode::Ebpf]
        .into_iter()
        .map(|m| {
            let tag = match m {
                Mode::Iptables => "bi",
                Mode::Ebpf => "be",
            };
            (m, Mesh::new_in(tag, m))
        })
        .collect();
    let mut servers: Vec<EchoServer> = Vec::new();
    let mut sinks = Vec::new();
    for (_, m) in &meshes {
        for p in ["o", "a", "c"] {
            servers.push(
                EchoServer::start(&m.pod(p).netns, m.pod(p).addr(BENCH_PORT)).expect("server"),
            );
        }
        sinks.push(start_sink(&m.pod("o").netns, m.pod("o").addr(SINK_PORT)));
    }
    let payload = b"ping\n";
    // (path, mode) → per-round (rate, p50, p90, p99); mode → bulk MB/s per round, for the
    // direct and the captured stream.
    let mut conn_rows: BTreeMap<(usize, &str), Vec<Stats>> = BTreeMap::new();
    let mut bulk_rows: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        let order: Vec<&(Mode, Mesh)> = if round % 2 == 0 {
            meshes.iter().collect()
        } else {
            meshes.iter().rev().collect()
        };
        for (mode, m) in order {
            for (i, (_, from, to)) in PATHS.iter().enumerate() {
                let ns = &m.pod(from).netns;
                let addr = m.pod(to).addr(BENCH_PORT);
                timed_exchanges(ns, addr, 20, payload, 2).expect("warm-up");
                let t = timed_exchanges(ns, addr, n, payload, 2).expect("exchanges");
                conn_rows
                    .entry((i, mode_name(*mode)))
                    .or_default()
                    .push(stats(t));
            }
            let sink = m.pod("o").addr(SINK_PORT);
            for (i, from) in ["b", "a"].into_iter().enumerate() {
                bulk_rows
                    .entry((i, mode_name(*mode)))
                    .or_default()
                    .push(bulk(&m.pod(from).netns, sink, bulk_mib << 20));
            }
            eprintln!("round {} {}: done", round + 1, mode_name(*mode));
        }
    }
    let range = |v: &[f64], prec: usize| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        let med = sorted[sorted.len() / 2];
        format!("{med:.prec$} ({lo:.prec$}–{hi:.prec$})")
    };
    println!(
        "{n} sequential exchanges per path, mode and round; {rounds} rounds; median of the rounds (min–max)"
    );
    println!();
    println!("| path | mode | conn/s | p50 µs | p90 µs | p99 µs |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for ((i, mode), v) in &conn_rows {
        let col = |f: fn(&Stats) -> f64| v.iter().map(f).collect::<Vec<f64>>();
        println!(
            "| {} | {mode} | {} | {} | {} | {} |",
            PATHS[*i].0,
            range(&col(|s| s.0), 0),
            range(&col(|s| s.1), 0),
            range(&col(|s| s.2), 0),
            range(&col(|s| s.3), 0),
        );
    }
    println!();
    println!(
        "One bulk TCP stream of {bulk_mib} MiB to a sink (256 KiB reads), MB/s, median (min–max) of {rounds} rounds"
    );
    println!();
    println!("| stream | mode | MB/s |");
    println!("| --- | --- | ---: |");
    for ((i, mode), v) in &bulk_rows {
        let what = if *i == 0 {
            "no redirection (b→o)"
        } else {
            "captured→plain through the stand-in (a→o)"
        };
        println!("| {what} | {mode} | {} |", range(v, 0));
    }
    drop(servers);
    drop(meshes);
    drop(sinks);
}

// ---------------------------------------------------------------------------------------
// enroll

const HOST: &str = "10.244.1.1";
const ZIP: &str = "10.244.1.5";

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 2 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// A network namespace held only by an open file (no bind mount, no name).
struct FdNetns {
    file: File,
    id: NetnsId,
}

impl FdNetns {
    fn new() -> FdNetns {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            let file = File::open("/proc/thread-self/ns/net").expect("open netns");
            let st = nix::sys::stat::fstat(&file).expect("fstat netns");
            FdNetns {
                file,
                id: NetnsId {
                    dev: st.st_dev,
                    ino: st.st_ino,
                },
            }
        })
        .join()
        .expect("netns thread")
    }

    /// A path to it valid in this process (and, as `/proc/<pid>/fd/N`, in children).
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    fn path_for_children(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }
}

struct EnrollLab {
    node: Netns,
    zt: Netns,
    pods: Vec<FdNetns>,
}

fn run_ok(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn enroll_lab(pods: usize) -> EnrollLab {
    let node = Netns::new("ebench-node").expect("node");
    node.sysctl("net.ipv4.ip_forward", "1").expect("fwd");
    let zt = Netns::new("ebench-zt").expect("zt");
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
    let t = Instant::now();
    let netns: Vec<FdNetns> = (0..pods).map(|_| FdNetns::new()).collect();
    let made_ns = t.elapsed();
    let mut batch = String::new();
    for (i, p) in netns.iter().enumerate() {
        batch.push_str(&format!(
            "link add vp{i} type veth peer name eth0 netns {}\nlink set vp{i} up\nroute add {}/32 dev vp{i} scope link\n",
            p.path_for_children().display(),
            pod_ip(i)
        ));
    }
    let file = std::env::temp_dir().join(format!("mcni-ebench-{}.batch", std::process::id()));
    std::fs::write(&file, batch).expect("batch file");
    let t = Instant::now();
    run_ok(
        "ip",
        &["-n", node.name(), "-batch", &file.display().to_string()],
    );
    let _ = std::fs::remove_file(&file);
    eprintln!(
        "lab: {pods} pod netns in {:.1} s, {pods} veths + routes in {:.1} s",
        made_ns.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    EnrollLab {
        node,
        zt,
        pods: netns,
    }
}

/// A private bpffs (never the host's /sys/fs/bpf), unmounted on drop.
struct Bpffs(tempfile::TempDir);

impl Bpffs {
    fn mount() -> Bpffs {
        let dir = tempfile::Builder::new()
            .prefix("mcni-bpffs-")
            .tempdir()
            .expect("temp dir");
        nix::mount::mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount bpffs");
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn driver(
    mode: Mode,
    lab: &EnrollLab,
    state: &Path,
    bpffs: &Path,
    attach: meshcni_ebpf::AttachMode,
) -> Box<dyn RedirectDriver> {
    match mode {
        Mode::Iptables => Box::new(
            IptablesDriver::new(IptablesModeConfig {
                node_netns: lab.node.path().to_path_buf(),
                netns_dir: state.join("netns"),
                state_file: state.join("iptables-mode.json"),
                ..IptablesModeConfig::default()
            })
            .expect("iptables driver"),
        ),
        Mode::Ebpf => Box::new(
            EbpfDriver::new(EbpfModeConfig {
                node_netns: lab.node.path().to_path_buf(),
                netns_dirs: vec![state.join("netns")],
                proc_root: state.join("proc"),
                pin_dir: bpffs.join("meshcni"),
                state_file: state.join("ebpf-mode.json"),
                attach,
                ..EbpfModeConfig::default()
            })
            .expect("ebpf driver"),
        ),
    }
}

/// (install, first enroll, release, re-enroll) of every pod.
fn enroll_round(
    mode: Mode,
    lab: &EnrollLab,
    bpffs: &Path,
    attach: meshcni_ebpf::AttachMode,
) -> (Duration, Duration, Duration, Duration) {
    let state = tempfile::Builder::new()
        .prefix("mcni-ebench-state-")
        .tempdir()
        .expect("state dir");
    for d in ["netns", "proc"] {
        std::fs::create_dir_all(state.path().join(d)).expect("dir");
    }
    let mut d = driver(mode, lab, state.path(), bpffs, attach);
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
    let pod = |i: usize| PodId::new(&format!("uid-{i}"), "bench", &format!("pod-{i}"));
    let step = (lab.pods.len() / 10).max(1);
    // As the agent's reconcile pass drives a driver: `prepare` with every action of the pass,
    // then each `apply`, each followed by `flush`.
    let enroll_all = |d: &mut Box<dyn RedirectDriver>| {
        let t = Instant::now();
        let actions: Vec<Action> = lab
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| Action::Enroll {
                pod: pod(i),
                ips: vec![IpAddr::V4(pod_ip(i))],
                annotations: BTreeMap::new(),
                service_account: String::new(),
                netns: Some(PodNetns {
                    path: p.path(),
                    id: p.id,
                }),
            })
            .collect();
        d.prepare(&actions).expect("prepare");
        eprintln!(
            "  {}: pass prepared in {:.1} s",
            mode_name(mode),
            t.elapsed().as_secs_f64()
        );
        for (i, action) in actions.iter().enumerate() {
            if i > 0 && i % step == 0 {
                // Progress (stderr), so a run cut short still tells the rate so far.
                eprintln!(
                    "  {}: {i} pods enrolled in {:.1} s",
                    mode_name(mode),
                    t.elapsed().as_secs_f64()
                );
            }
            d.apply(action)
                .unwrap_or_else(|e| panic!("{} enroll pod {i}: {e}", mode_name(mode)));
            d.flush().expect("flush");
        }
        t.elapsed()
    };
    let first = enroll_all(&mut d);
    assert_eq!(d.actual().expect("actual").len(), lab.pods.len());
    let t = Instant::now();
    let releases: Vec<Action> = (0..lab.pods.len())
        .map(|i| Action::Release {
            pod: pod(i),
            ips: vec![IpAddr::V4(pod_ip(i))],
        })
        .collect();
    d.prepare(&releases).expect("prepare");
    for action in &releases {
        d.apply(action).expect("release");
        d.flush().expect("flush");
    }
    let release = t.elapsed();
    assert_eq!(d.actual().expect("actual").len(), 0);
    let again = enroll_all(&mut d);
    d.uninstall().expect("uninstall");
    (install, first, release, again)
}

fn enroll(pods: usize, rounds: usize, attach: meshcni_ebpf::AttachMode) {
    let lab = enroll_lab(pods);
    let bpffs = Bpffs::mount();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / pods as f64;
    println!(
        "{pods} pods (each its own netns and veth), {rounds} rounds, mode order alternating, ebpf attach {attach:?}"
    );
    println!();
    println!(
        "| round | mode | install ms | enroll {pods} (first: attach + map/ipset) ms | per pod µs | release {pods} ms | per pod µs | re-enroll {pods} (label flip) ms | per pod µs |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::Iptables, Mode::Ebpf]
        } else {
            [Mode::Ebpf, Mode::Iptables]
        };
        for mode in order {
            let (install, first, release, again) = enroll_round(mode, &lab, bpffs.0.path(), attach);
            println!(
                "| {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                round + 1,
                mode_name(mode),
                ms(install),
                ms(first),
                per(first),
                ms(release),
                per(release),
                ms(again),
                per(again)
            );
        }
    }
    let t = Instant::now();
    drop(lab);
    eprintln!(
        "lab removed in {:.1} s (netns teardown continues in the kernel)",
        t.elapsed().as_secs_f64()
    );
}
