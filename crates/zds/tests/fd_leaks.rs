//! No fd leaks: its own test binary (one process, one test) so the process-wide fd count is not
//! disturbed by other tests.

mod common;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::{ACK, Client, Events, HELLO_V1, temp_fd};
use meshcni_zds::{WorkloadInfo, ZdsOptions, ZdsServer};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Waits (up to 5 s: connection threads finish cleaning up after their last event) for the fd
/// count to come back to `want`.
fn settle_to(want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = open_fds();
        if n == want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn adds_dels_reconnects_and_bad_peers_leave_no_fds_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ztunnel.sock");
    let events = Events::default();
    let server = std::sync::Arc::new(
        ZdsServer::start(
            &path,
            ZdsOptions {
                accepts_per_second: 1000,
                ..ZdsOptions::default()
            },
            events.sink(),
        )
        .expect("start"),
    );
    let baseline = open_fds();
    let info = || WorkloadInfo {
        name: "p".into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
    };
    let mut snapshots = 0;
    for round in 0..10 {
        let c = Client::connect(&path);
        c.hello_and_snapshot();
        snapshots += 1;
        events.snapshot_sent(snapshots);
        for i in 0..10 {
            let uid = format!("u-{round}-{i}");
            let s = server.clone();
            let u = uid.clone();
            let add = std::thread::spawn(move || {
                let fd = temp_fd();
                s.add(&u, info(), fd.as_fd())
            });
            let (_, fds) = c.recv_req();
            drop(fds);
            c.send(ACK);
            add.join().expect("join").expect("add");
            let s = server.clone();
            let del = std::thread::spawn(move || s.del(&uid));
            let _ = c.recv_req();
            c.send(ACK);
            del.join().expect("join").expect("del");
        }
        // A misbehaving peer sends us an fd: the kernel must not install it in our table.
        let bad = Client::connect(&path);
        bad.send(HELLO_V1);
        let _ = bad.recv_req(); // SnapshotSent (registry is empty)
        let fd = temp_fd();
        bad.send_with_fd(ACK, Some(fd.as_fd()));
        assert!(bad.wait_closed(Duration::from_secs(5)));
        drop(c);
        // Deletes go to every connection: the next round starts once this round's are gone,
        // or its deletes would also go to a connection that is closing.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.ready_connections() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "connections of round {round} still open"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(server.registered().is_empty());
    assert_eq!(settle_to(baseline), baseline, "fds leaked");
}
