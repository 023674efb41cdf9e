//! Ambient redirect mode `ebpf`: the agent's driver (`modes::ebpf`) under the reconcile loop,
//! for what the shared scenario suite (`ambient_traffic.rs`, run in both modes) does not cover:
//! an agent restart adopting the pinned datapath, ztunnel not ready (fail closed) and back,
//! a deleted pod's entries and link pins removed. Pins live on a private bpffs mount; dropping
//! the mesh uninstalls and asserts the pin dir is gone and both netns of each node are as
//! before.
//!
//! Needs root; fails (never skips) without it.

mod ambient_mesh;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use ambient_mesh::{DATAPLANE_MODE, Mesh, Mode, PORT, T, ebpf_config};
use meshcni_agent::ambient::{LoopOptions, Reconciler, RedirectDriver, StatusHandle};
use meshcni_agent::modes::ebpf::EbpfDriver;
use meshcni_agent::workloads::{EnrollPolicy, SourceUpdate};
use meshcni_testkit::multinode::{open_stream, read_line};
use meshcni_testkit::ztunnel::OUTBOUND_PORT;

fn driver_of(m: &Mesh, node: usize) -> EbpfDriver {
    let bpffs = m.bpffs.as_ref().expect("ebpf mesh has a bpffs");
    EbpfDriver::new(ebpf_config(&m.lab.nodes[node], m.tmp.path(), bpffs.path()))
        .expect("ebpf driver")
}

fn ping(s: &mut std::net::TcpStream, what: &str) -> Result<(), String> {
    use std::io::Write;
    let msg = format!("{what}\n");
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write {what:?}: {e}"))?;
    let got = read_line(s).map_err(|e| format!("read echo of {what:?}: {e}"))?;
    if got == msg {
        Ok(())
    } else {
        Err(format!("echo of {what:?} was {got:?}"))
    }
}

/// One pass of node `i`'s reconciler without the mesh's "everything enrolled" assertions.
fn pass(m: &mut Mesh, i: usize) -> meshcni_agent::ambient::PassReport {
    let snapshot = m.snapshot(i);
    let (rec, _) = &mut m.reconcilers[i];
    rec.update(SourceUpdate::Snapshot(snapshot));
    rec.reconcile(std::time::Instant::now())
}

#[test]
fn agent_restart_adopts_the_pinned_datapath_without_reapplying_or_breaking_connections() {
    let mut m = Mesh::new_in("eb-rst", Mode::Ebpf);
    m.clear_hops();
    let mut live = open_stream(&m.pod("a").netns, m.pod("e").addr(PORT), T).expect("open");
    read_line(&mut live).expect("banner");
    ping(&mut live, "before restart").expect("captured connection works");
    assert_eq!(m.hops(1).0.len(), 1, "the connection went through ztunnel");

    // A new agent reads the enrolled pods back from the pinned map and its state file.
    let mut fresh = driver_of(&m, 0);
    let actual = fresh.actual().expect("actual");
    let got: BTreeMap<String, Vec<IpAddr>> = actual
        .pods
        .iter()
        .map(|(uid, p)| (uid.clone(), p.ips.clone()))
        .collect();
    let want: BTreeMap<String, Vec<IpAddr>> = ["a", "d"]
        .iter()
        .map(|p| (format!("uid-{p}"), vec![IpAddr::V4(m.pod(p).ip)]))
        .collect();
    assert_eq!(got, want, "pods read back after a restart");

    // Replace node 1's agent: its first pass re-targets ztunnel (links switched in place) and
    // applies no pod action.
    let status = StatusHandle::new(Err("starting".into()));
    m.reconcilers[0] = (
        Reconciler::new(
            Box::new(fresh),
            EnrollPolicy::default(),
            LoopOptions::default(),
            status.clone(),
        ),
        status,
    );
    let report = pass(&mut m, 0);
    assert!(
        report.blocked.is_none() && report.failed.is_empty() && report.applied.is_empty(),
        "restarted agent's first pass: {report:?}"
    );
    ping(&mut live, "after restart").expect("open connection survives the agent restart");
    m.clear_hops();
    m.exchange("a", "e");
    let (h1, _) = m.hops(1);
    assert_eq!(h1.len(), 1, "new connections still captured: {h1:?}");
    assert_eq!(h1[0].listener_port, OUTBOUND_PORT);
    m.assert_no_node_rules();
}

#[test]
fn ztunnel_not_ready_fails_closed_and_a_ready_one_restores_capture() {
    let mut m = Mesh::new_in("eb-ztd", Mode::Ebpf);
    m.ztunnel_down.insert(0);
    let report = pass(&mut m, 0);
    assert!(report.failed.is_empty(), "{report:?}");
    // Enrolled pods' new TCP is dropped, not leaked around ztunnel...
    let short = Duration::from_millis(700);
    for (from, to) in [("a", "e"), ("e", "a")] {
        let r = open_stream(&m.pod(from).netns, m.pod(to).addr(PORT), short)
            .map_err(|e| e.to_string())
            .and_then(|mut s| read_line(&mut s).map_err(|e| e.to_string()));
        assert!(
            r.is_err(),
            "{from} → {to} must fail closed without ztunnel: {r:?}"
        );
    }
    // ...while pods outside the mesh are unaffected.
    m.exchange("b", "e");
    // A ready ztunnel again: captured.
    m.ztunnel_down.clear();
    m.reconcile();
    m.clear_hops();
    m.exchange("a", "e");
    let (h1, _) = m.hops(1);
    assert_eq!(h1.len(), 1, "{h1:?}");
    assert_eq!(h1[0].listener_port, OUTBOUND_PORT);
}

#[test]
fn a_deleted_pod_leaves_no_map_entry_and_no_link_pin() {
    let mut m = Mesh::new_in("eb-del", Mode::Ebpf);
    let node_ns = m.lab.node(1).netns.path().to_path_buf();
    let veth = m.pod("a").host_veth.clone();
    let ifindex = meshcni_ebpf::ifindex_in(&node_ns, &veth).expect("ifindex");
    let pins = m.bpffs.as_ref().expect("bpffs").path().join("node1/links");
    let pinned = |ifindex: u32| -> Vec<String> {
        std::fs::read_dir(&pins)
            .expect("links pin dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pod-") && n.ends_with(&format!("-{ifindex}")))
            .collect()
    };
    assert_eq!(pinned(ifindex).len(), 2, "pod-in and pod-eg links of a");
    // The pod goes away: its veth (the runtime's sandbox teardown) and its API object.
    m.lab
        .node(1)
        .netns
        .ip(&["link", "del", &veth])
        .expect("delete a's veth");
    m.deleted.insert("a".to_string());
    m.reconcile();
    let ips: Vec<IpAddr> = driver_of(&m, 0)
        .datapath()
        .pods()
        .expect("pods map")
        .into_iter()
        .map(|(ip, _)| ip)
        .collect();
    assert!(
        !ips.contains(&IpAddr::V4(m.pod("a").ip)),
        "a's address left the map: {ips:?}"
    );
    assert!(ips.contains(&IpAddr::V4(m.pod("d").ip)), "{ips:?}");
    assert!(pinned(ifindex).is_empty(), "{:?}", pinned(ifindex));
    // The node netns lost a's veth (not our doing): that is its state to return to.
    let now = meshcni_testkit::NetnsSnapshot::capture(&node_ns).expect("snapshot");
    for b in &mut m.baselines {
        if b.1 == node_ns {
            b.2 = now.clone();
        }
    }
}

/// Regression (issue 12 item 4, found by `crash_suite`): a running pod that leaves the mesh
/// kept its pod programs attached and their link pins, with no record of them in the state
/// file (a pin per such pod until uninstall; the doctor's "one attachment per enrolled pod
/// veth" failed). Now the release detaches them; a fresh driver finding programs on a veth
/// no enrolled pod holds (a release cut short) detaches them too.
#[test]
fn a_pod_leaving_the_mesh_keeps_no_program_attached() {
    let mut m = Mesh::new_in("eb-rel", Mode::Ebpf);
    let node_ns = m.lab.node(1).netns.path().to_path_buf();
    let pins = m.bpffs.as_ref().expect("bpffs").path().join("node1");
    let veth = |m: &Mesh, name: &str| m.pod(name).host_veth.clone();
    let attached = |veth: &str| -> usize {
        let ix = meshcni_ebpf::ifindex_in(&node_ns, veth).expect("ifindex");
        meshcni_ebpf::inspect(&pins)
            .expect("inspect")
            .expect("pin dir")
            .attachments
            .iter()
            .filter(|a| a.ifindex == ix)
            .count()
    };
    let (va, vb, vd) = (veth(&m, "a"), veth(&m, "b"), veth(&m, "d"));
    assert_eq!(attached(&va), 2, "pod-in and pod-eg on a's veth");
    m.labels
        .get_mut("a")
        .expect("a")
        .insert(DATAPLANE_MODE.to_string(), "none".to_string());
    m.reconcile();
    assert_eq!(
        attached(&va),
        0,
        "a left the mesh: nothing of ours on its veth"
    );
    assert_eq!(attached(&vd), 2, "d stays enrolled");

    // A release cut short: programs on b's veth (never enrolled), no record. A new driver's
    // first read-back detaches them.
    driver_of(&m, 0)
        .datapath()
        .attach_pod(&node_ns, &vb)
        .expect("attach to b");
    assert_eq!(attached(&vb), 2);
    driver_of(&m, 0).actual().expect("actual");
    assert_eq!(attached(&vb), 0, "stale attachment detached at start-up");
    assert_eq!(attached(&vd), 2);
}
