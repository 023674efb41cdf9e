//! What the in-pod ztunnel stand-in itself costs per ZDS request, so agent benchmarks that
//! include the ack can say where the time goes: a fake agent (a `SOCK_SEQPACKET` listener in a
//! private temp directory) sends N `AddWorkload`s with N fresh pod netns fds and times each
//! add → ack (the stand-in enters the netns and opens 6 listeners), then `SnapshotSent`, a
//! reconnect with a full snapshot replay (same netns: listeners kept), and N `DelWorkload`s.
//! Netns creation is outside every timed span.
//!
//! Run as root: `cargo run -p meshcni-testkit --example zds_standin_bench --release -- [N]`
//! (default N = 200).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use meshcni_testkit::zds_client::{
    WorkloadInfo, WorkloadRequest, accept_seqpacket, encode_request, listen_seqpacket, recv_packet,
    send_packet, set_recv_timeout,
};
use meshcni_testkit::{InpodZtunnelStandIn, Netns};

const T: Duration = Duration::from_secs(10);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| format!("N must be a count ({a:?}): {e}"))?,
        None => 200,
    };
    let dir = std::env::temp_dir().join(format!("mcni-zds-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(n, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn accept(listener: &OwnedFd) -> Result<OwnedFd, Box<dyn std::error::Error>> {
    let c = accept_seqpacket(listener)?;
    set_recv_timeout(&c, T)?;
    let hello = recv_packet(c.as_fd(), 64)?.bytes;
    if hello != [0x08, 0x01] {
        return Err(format!("unexpected hello {hello:02x?}").into());
    }
    Ok(c)
}

fn request(
    conn: &OwnedFd,
    req: &WorkloadRequest,
    netns: Option<&File>,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let fds: Vec<i32> = netns.iter().map(|f| f.as_raw_fd()).collect();
    let t = Instant::now();
    send_packet(conn.as_fd(), &encode_request(req), &fds)?;
    let ack = recv_packet(conn.as_fd(), 1024)?.bytes;
    let d = t.elapsed();
    if ack != [0x0a, 0x00] {
        return Err(format!("{req:?} not acked: {ack:02x?}").into());
    }
    Ok(d)
}

fn add(i: usize) -> WorkloadRequest {
    WorkloadRequest::Add {
        uid: format!("bench-{i}"),
        info: Some(WorkloadInfo {
            name: format!("pod-{i}"),
            namespace: "bench".to_string(),
            service_account: "default".to_string(),
        }),
    }
}

fn report(what: &str, mut d: Vec<Duration>) {
    d.sort();
    let pick = |q: f64| d[(((d.len() - 1) as f64) * q).round() as usize];
    let total: Duration = d.iter().sum();
    println!(
        "{what}: n={} total={:.1} ms p50={:.3} ms p90={:.3} ms p99={:.3} ms",
        d.len(),
        total.as_secs_f64() * 1e3,
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.9).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3
    );
}

fn run(n: usize, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let path = dir.join("ztunnel.sock");
    let listener = listen_seqpacket(&path)?;
    set_recv_timeout(&listener, T)?;
    let pods: Vec<Netns> = (0..n)
        .map(|i| Netns::new(&format!("zb{i}")))
        .collect::<Result<_, _>>()?;
    let files: Vec<File> = pods
        .iter()
        .map(|p| File::open(p.path()))
        .collect::<Result<_, _>>()?;
    let zt = InpodZtunnelStandIn::start(&path)?;
    let conn = accept(&listener)?;

    let mut adds = Vec::with_capacity(n);
    for (i, f) in files.iter().enumerate() {
        adds.push(request(&conn, &add(i), Some(f))?);
    }
    request(&conn, &WorkloadRequest::SnapshotSent, None)?;
    report("add -> ack (enter netns, open 6 listeners)", adds);

    drop(conn);
    let conn = accept(&listener)?;
    let t = Instant::now();
    let mut replay = Vec::with_capacity(n);
    for (i, f) in files.iter().enumerate() {
        replay.push(request(&conn, &add(i), Some(f))?);
    }
    request(&conn, &WorkloadRequest::SnapshotSent, None)?;
    let whole = t.elapsed();
    report(
        "snapshot replay add -> ack (same netns, listeners kept)",
        replay,
    );
    println!(
        "snapshot replay of {n} + SnapshotSent: {:.1} ms",
        whole.as_secs_f64() * 1e3
    );

    let mut dels = Vec::with_capacity(n);
    for i in 0..n {
        dels.push(request(
            &conn,
            &WorkloadRequest::Del {
                uid: format!("bench-{i}"),
            },
            None,
        )?);
    }
    report("del -> ack (close listeners and netns fd)", dels);
    if !zt.workloads().is_empty() {
        return Err("workloads left after the deletes".into());
    }
    Ok(())
}
