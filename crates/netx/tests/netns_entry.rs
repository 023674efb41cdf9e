//! netns entry: errors name the path, children inherit the thread's netns. Needs root.

mod common;

use std::path::Path;
use std::process::Command;

use common::TestNetns;
use meshcni_netx::netns::{current_netns_inode, netns_inode};
use meshcni_netx::{NetxError, run_in_netns, spawn_in_netns, with_netns};

#[test]
fn missing_netns_is_a_named_error() {
    let path = format!("/run/netns/mcni-nx-missing-{}", std::process::id());
    let err = run_in_netns(Path::new(&path), || ()).expect_err("missing netns must fail");
    assert!(matches!(err, NetxError::NetnsOpen { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path), "message must name the path: {msg}");
    assert!(msg.contains("No such file"), "{msg}");
}

#[test]
fn regular_file_is_not_a_netns() {
    let path = std::env::temp_dir().join(format!("mcni-nx-notns-{}", std::process::id()));
    std::fs::write(&path, b"x").expect("write temp file");
    let err = run_in_netns(&path, || ()).expect_err("regular file must fail");
    let _ = std::fs::remove_file(&path);
    assert!(matches!(err, NetxError::NotANetns { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
    assert!(err.to_string().contains("not a network namespace"), "{err}");
}

#[test]
fn other_namespace_type_is_not_a_netns() {
    let err = run_in_netns(Path::new("/proc/self/ns/uts"), || ()).expect_err("uts ns must fail");
    assert!(matches!(err, NetxError::NotANetns { .. }), "{err:?}");
    assert!(err.to_string().contains("another type"), "{err}");
}

#[test]
fn closure_and_children_run_in_the_netns_and_caller_stays_put() {
    let ns = TestNetns::new();
    let want = netns_inode(&ns.path()).expect("inode");
    let host = current_netns_inode().expect("host inode");
    assert_ne!(want, host);
    let (inside, child_link) = run_in_netns(&ns.path(), || {
        let inside = current_netns_inode().expect("inode inside");
        let out = Command::new("readlink")
            .arg("/proc/self/ns/net")
            .output()
            .expect("spawn readlink from the netns thread");
        (
            inside,
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    })
    .expect("enter netns");
    assert_eq!(inside, want);
    assert_eq!(
        child_link,
        format!("net:[{want}]"),
        "child must inherit the thread's netns"
    );
    assert_eq!(
        current_netns_inode().expect("after"),
        host,
        "caller thread must not move"
    );
    // The child sees only the netns' links (lo), not the host's.
    let links = run_in_netns(&ns.path(), || {
        Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip link")
    })
    .expect("enter");
    let text = String::from_utf8_lossy(&links.stdout);
    assert_eq!(text.lines().count(), 1, "only lo expected, got {text}");
}

#[test]
fn panics_propagate_and_spawned_threads_stay_inside() {
    let ns = TestNetns::new();
    let path = ns.path();
    let caught = std::panic::catch_unwind(|| {
        let _ = run_in_netns(&path, || panic!("boom inside netns"));
    });
    assert!(caught.is_err());

    let want = netns_inode(&path).expect("inode");
    let handle = spawn_in_netns(&path, "long-lived", |token| {
        (
            token.path().to_path_buf(),
            current_netns_inode().expect("inode"),
        )
    })
    .expect("spawn");
    let (p, inode) = handle.join().expect("join");
    assert_eq!(p, path);
    assert_eq!(inode, want);

    let err = spawn_in_netns(Path::new("/nonexistent/mcni"), "x", |_| ()).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/mcni"));
    let v = with_netns(&path, |token| token.path().to_path_buf()).expect("with_netns");
    assert_eq!(v, path);
}
