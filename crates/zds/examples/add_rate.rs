//! Measures ZDS throughput against a client that acks instantly (raw SEQPACKET, hand-written
//! bytes): incremental adds/s from 1 and from 8 caller threads, and snapshot replay entries/s.
//!
//!     cargo run --release -p meshcni-zds --example add_rate [ADDS]
//!
//! Prints one line per figure.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use meshcni_zds::{WorkloadInfo, ZdsOptions, ZdsServer};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, connect, recvmsg,
    sendmsg, socket,
};

const HELLO_V1: &[u8] = &[0x08, 0x01];
const ACK: &[u8] = &[0x0a, 0x00];
/// `WorkloadRequest{snapshot_sent: {}}` = field 3, length 0.
const SNAPSHOT_SENT: &[u8] = &[0x1a, 0x00];

fn send(fd: &OwnedFd, b: &[u8]) {
    sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(b)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .expect("send");
}

/// Receives one request (closing any fds); `None` at EOF. Returns whether it was SnapshotSent.
fn recv(fd: &OwnedFd) -> Option<bool> {
    let mut buf = [0u8; 2048];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let r = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    for c in r.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(v) = c {
            for f in v {
                // SAFETY: installed in our table by this recvmsg; closed once here.
                drop(unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
    }
    let n = r.bytes;
    if n == 0 {
        return None;
    }
    Some(buf.get(..n) == Some(SNAPSHOT_SENT))
}

/// Connects, says Hello, acks everything; returns when the snapshot is done (the acker thread
/// keeps acking until EOF).
fn instant_client(path: &std::path::Path) -> (std::thread::JoinHandle<()>, std::time::Duration) {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    connect(fd.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("connect");
    let t = Instant::now();
    send(&fd, HELLO_V1);
    while let Some(snapshot_sent) = recv(&fd) {
        send(&fd, ACK);
        if snapshot_sent {
            break;
        }
    }
    let snapshot_time = t.elapsed();
    let h = std::thread::spawn(move || {
        while recv(&fd).is_some() {
            send(&fd, ACK);
        }
    });
    (h, snapshot_time)
}

fn main() {
    let adds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ztunnel.sock");
    let opts = ZdsOptions {
        accepts_per_second: 100,
        ..ZdsOptions::default()
    };
    let server = Arc::new(ZdsServer::start(&path, opts, Box::new(|_| {})).expect("start"));
    let netns = OwnedFd::from(std::fs::File::open("/proc/self/ns/net").expect("netns"));
    let (_acker, _) = instant_client(&path);
    let info = |uid: &str| WorkloadInfo {
        name: format!("pod-{uid}"),
        namespace: "bench".into(),
        service_account: "default".into(),
    };

    // 1 caller thread.
    let t = Instant::now();
    for i in 0..adds {
        let uid = format!("a-{i}");
        server.add(&uid, info(&uid), netns.as_fd()).expect("add");
    }
    let e = t.elapsed();
    println!(
        "incremental add, 1 caller thread: {adds} adds in {:.1} ms = {:.0} adds/s",
        e.as_secs_f64() * 1e3,
        adds as f64 / e.as_secs_f64()
    );

    // 8 caller threads.
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|th| {
            let server = server.clone();
            let netns = netns.try_clone().expect("dup");
            std::thread::spawn(move || {
                for i in 0..adds / 8 {
                    let uid = format!("b-{th}-{i}");
                    let wi = WorkloadInfo {
                        name: format!("pod-{uid}"),
                        namespace: "bench".into(),
                        service_account: "default".into(),
                    };
                    server.add(&uid, wi, netns.as_fd()).expect("add");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("thread");
    }
    let e = t.elapsed();
    let n = adds / 8 * 8;
    println!(
        "incremental add, 8 caller threads: {n} adds in {:.1} ms = {:.0} adds/s",
        e.as_secs_f64() * 1e3,
        n as f64 / e.as_secs_f64()
    );

    // Snapshot replay to a new connection.
    let registered = server.registered().len();
    let (_acker2, snap) = instant_client(&path);
    println!(
        "snapshot replay: {registered} AddWorkload + SnapshotSent in {:.1} ms = {:.0} entries/s",
        snap.as_secs_f64() * 1e3,
        registered as f64 / snap.as_secs_f64()
    );
}
