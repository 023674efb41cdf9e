//! The ZDS server against a raw SEQPACKET client speaking hand-written bytes (tests/common).

mod common;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ACK, Client, Events, Got, HELLO_V1, Req, file_id, nack, temp_fd};
use meshcni_zds::{WorkloadInfo, ZdsError, ZdsEvent, ZdsOptions, ZdsServer};

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    events: Events,
    server: Arc<ZdsServer>,
}

fn fixture(opts: ZdsOptions) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("run/ztunnel/ztunnel.sock");
    let events = Events::default();
    let server = ZdsServer::start(&path, opts, events.sink()).expect("start");
    Fixture {
        _dir: dir,
        path,
        events,
        server: Arc::new(server),
    }
}

fn fast() -> ZdsOptions {
    ZdsOptions {
        accepts_per_second: 1000,
        ..ZdsOptions::default()
    }
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "ns1".into(),
        service_account: "sa1".into(),
    }
}

/// Run `add` on another thread (the client answers on this one).
fn add_async(f: &Fixture, uid: &str, fd: OwnedFd) -> std::thread::JoinHandle<Result<(), ZdsError>> {
    let server = f.server.clone();
    let uid = uid.to_owned();
    std::thread::spawn(move || server.add(&uid, info(&format!("pod-{uid}")), fd.as_fd()))
}

/// A connected, snapshotted client and its connection id.
fn ready_client(f: &Fixture, n: usize) -> (Client, u64) {
    let c = Client::connect(&f.path);
    c.hello_and_snapshot();
    (c, f.events.snapshot_sent(n))
}

#[test]
fn socket_is_0600_in_a_created_0755_dir_and_stale_socket_is_replaced() {
    let f = fixture(fast());
    let meta = std::fs::symlink_metadata(&f.path).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let dir = f.path.parent().expect("parent");
    assert_eq!(
        std::fs::metadata(dir).expect("dir").permissions().mode() & 0o7777,
        0o755
    );
    // No temp name left behind.
    let names: Vec<_> = std::fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ztunnel.sock")]);

    // A second server on the same path replaces the (now stale from its view) socket...
    let events = Events::default();
    let second = ZdsServer::start(&f.path, fast(), events.sink()).expect("restart over stale");
    let c = Client::connect(&f.path);
    assert!(c.hello_and_snapshot().is_empty());
    events.snapshot_sent(1);
    // ...and the first server's drop leaves the second's socket alone.
    let Fixture { server, path, .. } = f;
    drop(server);
    assert!(std::fs::symlink_metadata(&path).is_ok());
    drop(second);
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "socket removed on drop"
    );
}

#[test]
fn refuses_to_replace_a_non_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ztunnel.sock");
    std::fs::write(&path, b"not a socket").expect("write");
    let err = ZdsServer::start(&path, fast(), Events::default().sink())
        .err()
        .expect("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("not a socket") && msg.contains("ztunnel.sock"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&path).expect("kept"), b"not a socket");
}

#[test]
fn invalid_options_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.sock");
    for (opts, name) in [
        (
            ZdsOptions {
                ack_timeout: Duration::ZERO,
                ..fast()
            },
            "ack_timeout",
        ),
        (
            ZdsOptions {
                max_connections: 0,
                ..fast()
            },
            "max_connections",
        ),
        (
            ZdsOptions {
                accepts_per_second: 0,
                ..fast()
            },
            "accepts_per_second",
        ),
    ] {
        let err = ZdsServer::start(&path, opts, Events::default().sink())
            .err()
            .expect("invalid");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn hello_then_snapshot_adds_with_fds_keeps_then_snapshot_sent() {
    let f = fixture(fast());
    let netns = OwnedFd::from(std::fs::File::open("/proc/self/ns/net").expect("own netns"));
    let file = temp_fd();
    let want_netns = file_id(&netns);
    let want_file = file_id(&file);
    f.server.register("a-uid", info("pod-a"), Some(netns));
    f.server.register("b-uid", info("pod-b"), Some(file));
    f.server.register("k-uid", info("pod-k"), None);
    assert_eq!(f.server.ready_connections(), 0);

    let c = Client::connect(&f.path);
    let connected = f
        .events
        .wait_for("Connected", |e| matches!(e, ZdsEvent::Connected { .. }));
    assert_eq!(
        connected,
        ZdsEvent::Connected {
            conn: 1,
            peer_pid: Some(std::process::id() as i32)
        }
    );
    // Nothing is sent before Hello.
    assert!(matches!(c.recv(Duration::from_millis(200)), Got::Timeout));
    c.send(HELLO_V1);

    let (r, fds) = c.recv_req();
    assert_eq!(
        r,
        Req::Add {
            uid: "a-uid".into(),
            name: "pod-a".into(),
            namespace: "ns1".into(),
            service_account: "sa1".into()
        }
    );
    assert_eq!(fds.len(), 1, "exactly one fd with AddWorkload");
    assert_eq!(
        file_id(&fds[0]),
        want_netns,
        "the fd is the registered netns"
    );
    // One outstanding request: nothing more until we ack.
    assert!(matches!(c.recv(Duration::from_millis(200)), Got::Timeout));
    c.send(ACK);

    let (r, fds) = c.recv_req();
    assert_eq!(r.uid(), Some("b-uid"));
    assert!(matches!(r, Req::Add { .. }));
    assert_eq!(fds.len(), 1);
    assert_eq!(file_id(&fds[0]), want_file);
    c.send(ACK);

    let (r, fds) = c.recv_req();
    assert_eq!(
        r,
        Req::Keep {
            uid: "k-uid".into()
        }
    );
    assert!(fds.is_empty(), "KeepWorkload carries no fd");
    c.send(ACK);

    let (r, fds) = c.recv_req();
    assert_eq!(r, Req::SnapshotSent);
    assert!(fds.is_empty());
    assert_eq!(
        f.server.ready_connections(),
        0,
        "not ready before SnapshotSent is acked"
    );
    c.send(ACK);
    let conn = f.events.snapshot_sent(1);
    assert_eq!(conn, 1);
    assert_eq!(f.server.ready_connections(), 1);
    assert_eq!(f.server.registered(), vec!["a-uid", "b-uid", "k-uid"]);
}

#[test]
fn snapshot_nacks_are_reported_and_keep_registration() {
    let f = fixture(fast());
    f.server.register("a", info("pod-a"), Some(temp_fd()));
    f.server.register("b", info("pod-b"), Some(temp_fd()));
    let c = Client::connect(&f.path);
    c.send(HELLO_V1);
    let _ = c.recv_req();
    c.send(&nack("netns gone"));
    let _ = c.recv_req();
    c.send(ACK);
    assert_eq!(c.recv_req().0, Req::SnapshotSent);
    c.send(ACK);
    let ev = f.events.wait_for("SnapshotSent", |e| {
        matches!(e, ZdsEvent::SnapshotSent { .. })
    });
    assert_eq!(
        ev,
        ZdsEvent::SnapshotSent {
            conn: 1,
            nacked: vec![("a".into(), "netns gone".into())]
        }
    );
    assert_eq!(f.server.registered(), vec!["a", "b"]);
}

#[test]
fn incremental_add_is_acked_and_carries_the_fd() {
    let f = fixture(fast());
    let (c, _) = ready_client(&f, 1);
    let fd = temp_fd();
    let want = file_id(&fd);
    let add = add_async(&f, "u1", fd);
    let (r, fds) = c.recv_req();
    assert_eq!(
        r,
        Req::Add {
            uid: "u1".into(),
            name: "pod-u1".into(),
            namespace: "ns1".into(),
            service_account: "sa1".into()
        }
    );
    assert_eq!(fds.len(), 1);
    assert_eq!(file_id(&fds[0]), want);
    c.send(ACK);
    add.join().expect("join").expect("add acked");
    assert_eq!(f.server.registered(), vec!["u1"]);
}

#[test]
fn nack_fails_the_add_with_the_reason_and_unregisters() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    let add = add_async(&f, "u-nack", temp_fd());
    let _ = c.recv_req();
    c.send(&nack("no such pod"));
    let err = add.join().expect("join").expect_err("nack");
    match &err {
        ZdsError::Nack {
            uid,
            conn: c2,
            reason,
        } => {
            assert_eq!(
                (uid.as_str(), *c2, reason.as_str()),
                ("u-nack", conn, "no such pod")
            );
        }
        other => panic!("want Nack, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("u-nack") && msg.contains("no such pod"),
        "{msg}"
    );
    assert!(
        f.server.registered().is_empty(),
        "fail closed: not registered"
    );
    // The connection survives a nack.
    assert_eq!(f.server.ready_connections(), 1);
    let add = add_async(&f, "u2", temp_fd());
    let _ = c.recv_req();
    c.send(ACK);
    add.join().expect("join").expect("second add");
}

#[test]
fn no_ack_times_out_drops_the_connection_and_unregisters() {
    let f = fixture(ZdsOptions {
        ack_timeout: Duration::from_millis(300),
        ..fast()
    });
    let (c, conn) = ready_client(&f, 1);
    let add = add_async(&f, "u-slow", temp_fd());
    let _ = c.recv_req();
    let err = add.join().expect("join").expect_err("timeout");
    assert!(
        matches!(&err, ZdsError::Timeout { uid, .. } if uid == "u-slow"),
        "{err:?}"
    );
    assert!(err.to_string().contains("u-slow"), "{err}");
    assert!(c.wait_closed(Duration::from_secs(5)), "connection dropped");
    assert!(f.events.disconnected(conn).contains("no ack"));
    assert!(f.server.registered().is_empty());
    assert_eq!(f.server.ready_connections(), 0);
}

#[test]
fn no_client_is_no_connection_and_nothing_registered() {
    let f = fixture(fast());
    let fd = temp_fd();
    let err = f
        .server
        .add("u-alone", info("p"), fd.as_fd())
        .expect_err("no connection");
    assert!(matches!(&err, ZdsError::NoConnection { uid } if uid == "u-alone"));
    assert!(err.to_string().contains("u-alone") && err.to_string().contains("no ztunnel"));
    assert!(f.server.registered().is_empty());
    // del with nobody connected: unregisters, nothing to tell.
    f.server.register("r", info("p"), None);
    f.server.del("r").expect("del without connections");
    assert!(f.server.registered().is_empty());
}

#[test]
fn two_connections_add_goes_to_newest_del_to_both() {
    let f = fixture(fast());
    let (old, _) = ready_client(&f, 1);
    let (new, _) = ready_client(&f, 2);
    assert_eq!(f.server.ready_connections(), 2);

    let add = add_async(&f, "u1", temp_fd());
    let (r, _) = new.recv_req();
    assert_eq!(r.uid(), Some("u1"));
    new.send(ACK);
    add.join().expect("join").expect("add");
    assert!(
        matches!(old.recv(Duration::from_millis(200)), Got::Timeout),
        "old gets no add"
    );

    let server = f.server.clone();
    let del = std::thread::spawn(move || server.del("u1"));
    for c in [&old, &new] {
        let (r, fds) = c.recv_req();
        assert_eq!(r, Req::Del { uid: "u1".into() });
        assert!(fds.is_empty());
        c.send(ACK);
    }
    del.join().expect("join").expect("del");
    assert!(f.server.registered().is_empty());
}

#[test]
fn del_reports_each_failing_connection() {
    let f = fixture(fast());
    let (a, conn_a) = ready_client(&f, 1);
    let (b, _) = ready_client(&f, 2);
    f.server.register("u1", info("p"), None);
    let server = f.server.clone();
    let del = std::thread::spawn(move || server.del("u1"));
    let _ = a.recv_req();
    a.send(&nack("unknown workload"));
    let _ = b.recv_req();
    b.send(ACK);
    let err = del.join().expect("join").expect_err("partial failure");
    match &err {
        ZdsError::DelFailed { uid, failures } => {
            assert_eq!(uid, "u1");
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].0, conn_a);
            assert!(failures[0].1.contains("unknown workload"));
        }
        other => panic!("want DelFailed, got {other:?}"),
    }
    assert!(err.to_string().contains("u1"));
    assert!(f.server.registered().is_empty(), "unregistered regardless");
}

#[test]
fn client_disconnect_mid_request_fails_the_add_promptly() {
    let f = fixture(ZdsOptions {
        ack_timeout: Duration::from_secs(60),
        ..fast()
    });
    let (c, conn) = ready_client(&f, 1);
    let add = add_async(&f, "u-gone", temp_fd());
    let _ = c.recv_req();
    let t = Instant::now();
    drop(c);
    let err = add.join().expect("join").expect_err("disconnected");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "disconnect noticed before the ack timeout, took {:?}",
        t.elapsed()
    );
    assert!(
        matches!(&err, ZdsError::Disconnected { uid, .. } if uid == "u-gone"),
        "{err:?}"
    );
    assert!(f.events.disconnected(conn).contains("EOF"));
    assert!(f.server.registered().is_empty());
}

#[test]
fn idle_peer_death_is_noticed_at_once() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    drop(c);
    assert!(f.events.disconnected(conn).contains("EOF"));
    assert_eq!(f.server.ready_connections(), 0);
}

/// A misbehaving peer: the connection is dropped with `reason`, and a new client is served.
fn assert_dropped_then_served(
    f: &Fixture,
    c: &Client,
    conn: u64,
    reason: &str,
    n_snapshots: usize,
) {
    assert!(
        c.wait_closed(Duration::from_secs(5)),
        "connection not dropped"
    );
    let got = f.events.disconnected(conn);
    assert!(
        got.contains(reason),
        "reason {got:?} should mention {reason:?}"
    );
    let (fresh, _) = ready_client(f, n_snapshots);
    let add = add_async(f, "after", temp_fd());
    let _ = fresh.recv_req();
    fresh.send(ACK);
    add.join().expect("join").expect("served after a bad peer");
}

#[test]
fn undecodable_response_drops_the_connection() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    let add = add_async(&f, "u1", temp_fd());
    let _ = c.recv_req();
    c.send(&[0x0a, 0x05, 0x0a]); // length past the end
    let err = add.join().expect("join").expect_err("bad response");
    assert!(
        matches!(&err, ZdsError::Disconnected { uid, reason, .. } if uid == "u1" && reason.contains("undecodable")),
        "{err:?}"
    );
    assert_dropped_then_served(&f, &c, conn, "undecodable WorkloadResponse", 2);
}

#[test]
fn response_without_ack_drops_the_connection() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    let add = add_async(&f, "u1", temp_fd());
    let _ = c.recv_req();
    c.send(&[0x48, 0x01]); // only an unknown field: no payload
    add.join().expect("join").expect_err("no ack");
    assert_dropped_then_served(&f, &c, conn, "without an ack", 2);
}

#[test]
fn oversized_datagram_drops_the_connection() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    let add = add_async(&f, "u1", temp_fd());
    let _ = c.recv_req();
    // A valid nack padded past 1024 bytes.
    let mut big = vec![0x0a, 0xd3, 0x07, 0x0a, 0xd0, 0x07];
    big.extend(std::iter::repeat_n(b'x', 2000));
    c.send(&big);
    add.join().expect("join").expect_err("oversized");
    assert_dropped_then_served(&f, &c, conn, "MSG_TRUNC", 2);
}

#[test]
fn fd_sent_to_the_server_drops_the_connection() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    let add = add_async(&f, "u1", temp_fd());
    let _ = c.recv_req();
    let fd = temp_fd();
    c.send_with_fd(ACK, Some(fd.as_fd()));
    add.join().expect("join").expect_err("fd sent to us");
    assert_dropped_then_served(&f, &c, conn, "MSG_CTRUNC", 2);
}

#[test]
fn second_hello_drops_the_connection() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    c.send(HELLO_V1);
    assert_dropped_then_served(&f, &c, conn, "second ZdsHello", 2);
}

#[test]
fn unsolicited_ack_drops_the_connection() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    c.send(ACK);
    assert_dropped_then_served(&f, &c, conn, "no request outstanding", 2);
}

#[test]
fn bad_hello_drops_the_connection() {
    let f = fixture(fast());
    let cases: [(&[u8], &str); 3] = [
        (&[0x08, 0x02], "unsupported version 2"),
        (&[], "EOF"), // a zero-length datagram reads like EOF: dropped either way
        (&[0x0a, 0x01], "undecodable ZdsHello"),
    ];
    for (i, (bytes, reason)) in cases.into_iter().enumerate() {
        // Sequential connects: connection ids are 1, 2, 3.
        let conn = i as u64 + 1;
        let c = Client::connect(&f.path);
        c.send(bytes);
        assert!(
            c.wait_closed(Duration::from_secs(5)),
            "dropped after {bytes:02x?}"
        );
        let got = f.events.disconnected(conn);
        assert!(got.contains(reason), "{got:?} should mention {reason:?}");
    }
    let _ = ready_client(&f, 1);
}

#[test]
fn silent_peer_is_dropped_after_the_hello_timeout() {
    let f = fixture(ZdsOptions {
        ack_timeout: Duration::from_millis(200),
        ..fast()
    });
    let c = Client::connect(&f.path);
    assert!(c.wait_closed(Duration::from_secs(5)));
    assert!(f.events.disconnected(1).contains("no ZdsHello"));
}

#[test]
fn reconnect_gets_the_full_snapshot_again() {
    let f = fixture(fast());
    let (c, _) = ready_client(&f, 1);
    let mut ids = BTreeMap::new();
    for uid in ["u1", "u2", "u3"] {
        let fd = temp_fd();
        ids.insert(uid.to_owned(), file_id(&fd));
        let add = add_async(&f, uid, fd);
        let _ = c.recv_req();
        c.send(ACK);
        add.join().expect("join").expect("add");
    }
    drop(c);
    let c2 = Client::connect(&f.path);
    let snap = c2.hello_and_snapshot();
    let got: BTreeMap<String, (u64, u64)> = snap
        .iter()
        .map(|(r, fds)| {
            assert!(matches!(r, Req::Add { .. }));
            assert_eq!(fds.len(), 1);
            (r.uid().expect("uid").to_owned(), file_id(&fds[0]))
        })
        .collect();
    assert_eq!(got, ids);
}

#[test]
fn add_during_snapshot_is_queued_behind_it_exactly_once() {
    let f = fixture(fast());
    for uid in ["s1", "s2"] {
        f.server.register(uid, info(uid), Some(temp_fd()));
    }
    let c = Client::connect(&f.path);
    c.send(HELLO_V1);
    let (first, _) = c.recv_req(); // the connection has joined: it is the newest
    let add = add_async(&f, "new", temp_fd());
    let del_server = f.server.clone();
    // Give the add time to be queued while the snapshot is stalled on our ack.
    std::thread::sleep(Duration::from_millis(100));
    let mut seen = vec![first];
    c.send(ACK);
    loop {
        let (r, _) = c.recv_req();
        c.send(ACK);
        let done = matches!(&r, Req::Add { uid, .. } if uid == "new");
        seen.push(r);
        if done {
            break;
        }
    }
    add.join().expect("join").expect("add");
    let order: Vec<String> = seen
        .iter()
        .map(|r| match r {
            Req::SnapshotSent => "SnapshotSent".to_owned(),
            r => r.uid().expect("uid").to_owned(),
        })
        .collect();
    assert_eq!(order, ["s1", "s2", "SnapshotSent", "new"]);
    assert!(
        matches!(c.recv(Duration::from_millis(200)), Got::Timeout),
        "sent once"
    );
    assert_eq!(del_server.registered(), vec!["new", "s1", "s2"]);
}

#[test]
fn failed_add_is_withdrawn_from_a_newer_connections_snapshot() {
    let f = fixture(fast());
    let (old, _) = ready_client(&f, 1);
    let add = add_async(&f, "x", temp_fd());
    let _ = old.recv_req(); // in flight at the old connection
    // A newer ztunnel connects meanwhile: its snapshot carries x (registered while in flight).
    let new = Client::connect(&f.path);
    let snap = new.hello_and_snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].0.uid(), Some("x"));
    old.send(&nack("refused"));
    assert!(matches!(
        add.join().expect("join"),
        Err(ZdsError::Nack { .. })
    ));
    // Fail closed everywhere: the newer connection is told to drop it.
    let (r, _) = new.recv_req();
    assert_eq!(r, Req::Del { uid: "x".into() });
    new.send(ACK);
    assert!(f.server.registered().is_empty());
}

#[test]
fn del_while_add_in_flight_ends_deleted() {
    let f = fixture(fast());
    let (c, _) = ready_client(&f, 1);
    let add = add_async(&f, "x", temp_fd());
    let (r, _) = c.recv_req();
    assert!(matches!(r, Req::Add { .. }));
    let server = f.server.clone();
    let del = std::thread::spawn(move || server.del("x"));
    std::thread::sleep(Duration::from_millis(50));
    c.send(ACK);
    let (r, _) = c.recv_req();
    assert_eq!(r, Req::Del { uid: "x".into() });
    c.send(ACK);
    add.join().expect("join").expect("add");
    del.join().expect("join").expect("del");
    assert!(f.server.registered().is_empty());
}

#[test]
fn connection_cap_closes_extra_connections() {
    let f = fixture(ZdsOptions {
        max_connections: 2,
        ..fast()
    });
    let (a, _) = ready_client(&f, 1);
    let (b, _) = ready_client(&f, 2);
    let extra = Client::connect(&f.path);
    assert!(
        extra.wait_closed(Duration::from_secs(5)),
        "third connection closed"
    );
    drop(a);
    // Once one goes, a new one is served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The slot frees when the server notices `a` is gone; until then new ones are closed.
        let c = Client::connect(&f.path);
        if c.try_send(HELLO_V1).is_ok()
            && let Got::Msg(b, _) = c.recv(Duration::from_secs(5))
        {
            assert_eq!(common::decode_request(&b), Req::SnapshotSent);
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed");
    }
    drop(b);
}

#[test]
fn accept_rate_is_limited() {
    let f = fixture(ZdsOptions {
        accepts_per_second: 2,
        ..ZdsOptions::default()
    });
    let t = Instant::now();
    let _clients: Vec<Client> = (0..4).map(|_| Client::connect(&f.path)).collect();
    f.events.wait_for("4th Connected", |e| {
        matches!(e, ZdsEvent::Connected { conn: 4, .. })
    });
    // Burst of 2, then 2/s: the 4th accept comes ≥ ~1 s after the start.
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "4 accepts at 2/s took only {:?}",
        t.elapsed()
    );
}

#[test]
fn dropping_the_server_closes_connections_and_removes_the_socket() {
    let f = fixture(fast());
    let (c, conn) = ready_client(&f, 1);
    let Fixture {
        server,
        path,
        events,
        _dir,
    } = f;
    drop(server);
    assert!(c.wait_closed(Duration::from_secs(5)), "connection closed");
    assert_eq!(events.disconnected(conn), "server stopped");
    assert!(std::fs::symlink_metadata(&path).is_err(), "socket removed");
}

#[test]
fn too_large_request_is_refused_before_sending() {
    let f = fixture(fast());
    let (_c, _) = ready_client(&f, 1);
    let fd = temp_fd();
    let big = "n".repeat(1100);
    let err = f
        .server
        .add("u-big", info(&big), fd.as_fd())
        .expect_err("too large");
    assert!(
        matches!(&err, ZdsError::TooLarge { uid, .. } if uid == "u-big"),
        "{err:?}"
    );
    assert!(f.server.registered().is_empty());
}

#[test]
fn concurrent_200_adds_from_8_threads_are_each_acked_exactly_once() {
    let f = fixture(fast());
    let c = Client::connect(&f.path);
    c.hello_and_snapshot();
    f.events.snapshot_sent(1);
    let acker = std::thread::spawn(move || {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        while let Got::Msg(b, fds) = c.recv(Duration::from_secs(10)) {
            let r = common::decode_request(&b);
            assert_eq!(fds.len(), 1, "{r:?}");
            *seen.entry(r.uid().expect("uid").to_owned()).or_default() += 1;
            c.send(ACK);
            if seen.len() == 200 {
                break;
            }
        }
        seen
    });
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let server = f.server.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let fd = temp_fd();
                    let uid = format!("pod-{t}-{i}");
                    server.add(&uid, info(&uid), fd.as_fd()).expect("add");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("adder");
    }
    let seen = acker.join().expect("acker");
    assert_eq!(seen.len(), 200);
    assert!(seen.values().all(|&n| n == 1), "each exactly once");
    assert_eq!(f.server.registered().len(), 200);
}

#[test]
fn add_queued_behind_a_snapshot_fails_when_that_connection_dies() {
    let f = fixture(fast());
    f.server.register("s1", info("s1"), Some(temp_fd()));
    let c = Client::connect(&f.path);
    c.send(HELLO_V1);
    let _ = c.recv_req(); // joined, snapshot stalled on our ack
    let add = add_async(&f, "new", temp_fd());
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    let err = add.join().expect("join").expect_err("connection died");
    assert!(
        matches!(&err, ZdsError::Disconnected { uid, .. } if uid == "new"),
        "{err:?}"
    );
    assert_eq!(f.server.registered(), vec!["s1"], "fail closed; s1 kept");
}

#[test]
fn add_replaces_a_registration_without_fd() {
    let f = fixture(fast());
    f.server.register("u1", info("old-name"), None);
    let (c, _) = ready_client(&f, 1);
    let fd = temp_fd();
    let want = file_id(&fd);
    let add = add_async(&f, "u1", fd);
    let _ = c.recv_req();
    c.send(ACK);
    add.join().expect("join").expect("add");
    drop(c);
    let c2 = Client::connect(&f.path);
    let snap = c2.hello_and_snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(
        snap[0].0,
        Req::Add {
            uid: "u1".into(),
            name: "pod-u1".into(),
            namespace: "ns1".into(),
            service_account: "sa1".into()
        }
    );
    assert_eq!(file_id(&snap[0].1[0]), want);
}

#[test]
fn server_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ZdsServer>();
    check::<ZdsError>();
}
