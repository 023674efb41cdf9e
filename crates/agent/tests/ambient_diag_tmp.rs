mod ambient_mesh;
use std::io::Write;
use ambient_mesh::{Mesh, PORT, T};
use meshcni_testkit::multinode::{open_stream, read_line};

#[test]
fn diag_live_release() {
    let mut m = Mesh::new("diag");
    m.set_label("b", ambient_mesh::DATAPLANE_MODE, Some("ambient"));
    m.reconcile();
    let mut live = open_stream(&m.pod("b").netns, m.pod("e").addr(PORT), T).expect("open");
    println!("banner {}", read_line(&mut live).unwrap());
    live.write_all(b"x\n").unwrap();
    println!("echo {}", read_line(&mut live).unwrap());
    println!("live conn local {}", live.local_addr().unwrap());
    println!("hops {:?}", m.zt(1).hops());
    m.set_label("b", ambient_mesh::DATAPLANE_MODE, None);
    m.reconcile();
    let node1 = &m.lab.node(1).netns;
    println!("--- ipset\n{}", node1.exec_ok("ipset", &["list"]).unwrap_or_default());
    println!("--- table 100\n{}", node1.exec_ok("ip", &["route", "show", "table", "100"]).unwrap_or_default());
    let _ = node1.exec_ok("iptables", &["-t", "mangle", "-Z"]);
    for ns in [&m.pod("e").netns, &m.lab.node(1).ztunnel.netns] { let _ = ns.exec_ok("nstat", &["-n"]); }
    live.write_all(b"after\n").unwrap();
    println!("read after release: {:?}", read_line(&mut live));
    println!("--- node1 mangle\n{}", node1.exec_ok("iptables", &["-t", "mangle", "-S", "ztunnel-PREROUTING", "-v"]).unwrap_or_default());
    println!("--- node1 conntrack\n{}", node1.exec_ok("conntrack", &["-L", "-p", "tcp"]).unwrap_or_default());
    println!("--- zt1 nstat\n{}", m.lab.node(1).ztunnel.netns.exec_ok("nstat", &["-z", "TcpInSegs", "TcpOutSegs", "TcpOutRsts"]).unwrap_or_default());
    println!("--- e nstat\n{}", m.pod("e").netns.exec_ok("nstat", &["-z", "TcpInSegs", "TcpOutSegs", "TcpOutRsts"]).unwrap_or_default());
}
