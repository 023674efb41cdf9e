//! Numbers for the `ebpf` datapath alone (root; its own netns lab and private bpffs, like the
//! tests): per-connection latency and setup rate for a captured pod through the ztunnel
//! stand-in versus the same pods uncaptured, one bulk TCP stream each way, and the time to
//! enroll pods (tcx attach of both pod programs + one map entry per address).
//!
//!     cargo run --release -p meshcni-ebpf --example datapath_bench -- [connections] [pods]
//!
//! Not the full comparison (that needs the `ebpf` mode driver next to the `iptables`
//! mode in one run); a baseline for it.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use meshcni_ebpf::{
    AttachMode, Datapath, DatapathConfig, Hook, PodEntry, ZtunnelEntry, ifindex_in, mac_in,
    uninstall,
};
use meshcni_testkit::multinode::{EchoServer, ZTUNNEL_HOST_VETH, timed_exchanges};
use meshcni_testkit::ztunnel::ZtunnelStandIn;
use meshcni_testkit::{MultiNodeLab, Netns};

fn stats(label: &str, times: &[Duration]) {
    let mut us: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let pct = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
    let total: f64 = us.iter().sum();
    println!(
        "{label:<34} n={:<6} p50={:>7.1}us p90={:>7.1}us p99={:>7.1}us rate={:>8.0}/s",
        us.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        us.len() as f64 / (total / 1e6)
    );
}

/// One stream of `bytes` from `ns` to a sink at `addr`; returns MB/s.
fn bulk(ns: &Netns, addr: SocketAddr, bytes: usize) -> f64 {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        let mut greeting = [0u8; 256];
        let _ = s.read(&mut greeting).expect("greeting");
        let chunk = vec![7u8; 1 << 16];
        let start = Instant::now();
        let reader = {
            let mut r = s.try_clone().expect("clone");
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                let mut got = 0usize;
                while got < bytes {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                got
            })
        };
        let mut sent = 0;
        while sent < bytes {
            s.write_all(&chunk).expect("write");
            sent += chunk.len();
        }
        let got = reader.join().expect("reader");
        let _ = s.shutdown(Shutdown::Both);
        assert!(got >= bytes, "echoed {got} of {bytes}");
        // Bytes went both ways (echo): count one direction.
        bytes as f64 / start.elapsed().as_secs_f64() / 1e6
    })
    .expect("netns")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let conns: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let pods: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let bpffs_dir = tempfile::Builder::new()
        .prefix("mcni-bpffs-")
        .tempdir()
        .expect("tempdir");
    nix::mount::mount(
        Some("bpf"),
        bpffs_dir.path(),
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount bpffs");
    let pin_dir = bpffs_dir.path().join("meshcni");
    {
        let lab = MultiNodeLab::new("ebb", &[&["client", "server"]]).expect("lab");
        let node = lab.node(1);
        let (client, server) = (lab.pod("client"), lab.pod("server"));
        let _srv = EchoServer::start(&server.netns, server.addr(8080)).expect("server");
        let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
            .expect("stand-in");
        let dp = Datapath::load(&DatapathConfig {
            pin_dir: pin_dir.clone(),
            pod_capacity: 16_384,
            attach: AttachMode::Tcx,
        })
        .expect("load");
        dp.attach(node.netns.path(), ZTUNNEL_HOST_VETH, Hook::ZtunnelHost)
            .expect("attach");
        dp.attach_ztunnel_netns(node.ztunnel.netns.path(), "eth0")
            .expect("attach");
        dp.set_ztunnel(Some(ZtunnelEntry {
            host_ifindex: ifindex_in(node.netns.path(), ZTUNNEL_HOST_VETH).expect("ifindex"),
            mac: mac_in(node.ztunnel.netns.path(), "eth0").expect("mac"),
            host_mac: mac_in(node.netns.path(), ZTUNNEL_HOST_VETH).expect("mac"),
            ip4: Some(node.ztunnel.ip),
            ip6: None,
        }))
        .expect("ztunnel");

        println!("# {conns} sequential connect+exchange+close, client pod -> server pod");
        let warm = timed_exchanges(&client.netns, server.addr(8080), 100, b"x", 1).expect("warm");
        drop(warm);
        let direct =
            timed_exchanges(&client.netns, server.addr(8080), conns, b"ping", 4).expect("direct");
        stats("uncaptured (no redirection)", &direct);
        let direct_bulk = bulk(&client.netns, server.addr(8080), 256 << 20);

        dp.attach_pod(node.netns.path(), &client.host_veth)
            .expect("attach pod");
        let entry = PodEntry {
            host_ifindex: ifindex_in(node.netns.path(), &client.host_veth).expect("ifindex"),
            mac: mac_in(client.netns.path(), "eth0").expect("mac"),
            dns_capture: false,
        };
        dp.set_pod(IpAddr::V4(client.ip), entry).expect("pod");
        let captured =
            timed_exchanges(&client.netns, server.addr(8080), conns, b"ping", 4).expect("captured");
        stats("captured: ebpf -> ztunnel stand-in", &captured);
        assert!(zt.hops().len() >= conns, "not captured");
        let captured_bulk = bulk(&client.netns, server.addr(8080), 256 << 20);
        println!("# one bulk stream, 256 MiB echoed");
        println!("uncaptured                          {direct_bulk:>8.0} MB/s");
        println!("captured: ebpf -> ztunnel stand-in  {captured_bulk:>8.0} MB/s");

        // Enrollment cost: `pods` extra veth pairs in the node netns (both ends there).
        let mut names = Vec::new();
        for i in 0..pods {
            let a = format!("eb{i}a");
            let b = format!("eb{i}b");
            node.netns
                .ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])
                .expect("veth");
            node.netns.ip(&["link", "set", &a, "up"]).expect("up");
            names.push(a);
        }
        // As the agent runs it: on a thread inside the node netns (no netns switch per pod).
        let node_path = node.netns.path().to_path_buf();
        let per = node
            .netns
            .run(|| {
                let start = Instant::now();
                for (i, name) in names.iter().enumerate() {
                    dp.attach_pod(&node_path, name).expect("attach");
                    let ip = IpAddr::V4(std::net::Ipv4Addr::new(
                        10,
                        200,
                        (i / 250) as u8,
                        (i % 250) as u8 + 1,
                    ));
                    dp.set_pod(
                        ip,
                        PodEntry {
                            host_ifindex: 1,
                            mac: [2, 0, 0, 0, 0, 1],
                            dns_capture: false,
                        },
                    )
                    .expect("map");
                }
                start.elapsed() / u32::try_from(names.len().max(1)).unwrap_or(1)
            })
            .expect("netns");
        println!("# enroll {pods} pods (2 tcx links + 1 map entry each), from the node netns");
        println!(
            "enroll per pod                      {:>8.1} us",
            per.as_secs_f64() * 1e6
        );
        // The same again on fresh veths with 8 threads: the first tcx attach per device and
        // direction waits for an RCU grace period, which parallel attaches share.
        let mut fresh = Vec::new();
        for i in 0..pods {
            let a = format!("ep{i}a");
            let b = format!("ep{i}b");
            node.netns
                .ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])
                .expect("veth");
            node.netns.ip(&["link", "set", &a, "up"]).expect("up");
            fresh.push(a);
        }
        let per = node
            .netns
            .run(|| {
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for chunk in fresh.chunks(fresh.len().div_ceil(8).max(1)) {
                        let (dp, node_path) = (&dp, &node_path);
                        scope.spawn(move || {
                            for name in chunk {
                                dp.attach_pod(node_path, name).expect("attach");
                            }
                        });
                    }
                });
                start.elapsed() / u32::try_from(fresh.len().max(1)).unwrap_or(1)
            })
            .expect("netns");
        println!(
            "enroll per pod, 8 threads (wall)    {:>8.1} us",
            per.as_secs_f64() * 1e6
        );
        // Re-enroll (agent restart: links switched in place with bpf_link_update).
        let per = node
            .netns
            .run(|| {
                let start = Instant::now();
                for name in &names {
                    dp.attach_pod(&node_path, name).expect("re-attach");
                }
                start.elapsed() / u32::try_from(names.len().max(1)).unwrap_or(1)
            })
            .expect("netns");
        println!(
            "re-attach per pod (restart)         {:>8.1} us",
            per.as_secs_f64() * 1e6
        );
        drop(dp);
        uninstall(&pin_dir, &[node.netns.path()]).expect("uninstall");
    }
    let _ = nix::mount::umount2(bpffs_dir.path(), nix::mount::MntFlags::MNT_DETACH);
}
