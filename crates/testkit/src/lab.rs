//! A two-pod lab: "client" and "server" pod namespaces, each joined by a veth pair to a "node"
//! namespace that routes between them (ptp style, like a real node). IPv4 and IPv6, default
//! routes via the node, forwarding enabled inside the node namespace only.
//!
//! ```text
//!  client (eth0 10.10.1.2, fd00:10:1::2) ── vc (10.10.1.1, fd00:10:1::1) node
//!  server (eth0 10.10.2.2, fd00:10:2::2) ── vs (10.10.2.1, fd00:10:2::1) node
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{Netns, TestkitError, veth};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const NODE_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
pub const NODE_SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x1, 0, 0, 0, 0, 2);
pub const NODE_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x1, 0, 0, 0, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x2, 0, 0, 0, 0, 2);
pub const NODE_SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x2, 0, 0, 0, 0, 1);

/// Client and server pods behind a routing node. Dropping it deletes all three namespaces
/// (and with them the veths).
#[derive(Debug)]
pub struct Lab {
    pub client: Netns,
    pub server: Netns,
    pub node: Netns,
}

impl Lab {
    /// Build the lab; `tag` goes into the namespace names.
    pub fn new(tag: &str) -> Result<Lab, TestkitError> {
        let node = Netns::new(&format!("{tag}-node"))?;
        let client = Netns::new(&format!("{tag}-cli"))?;
        let server = Netns::new(&format!("{tag}-srv"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for (pod, node_if, pod_v4, node_v4, pod_v6, node_v6) in [
            (
                &client,
                "vc",
                CLIENT_V4,
                NODE_CLIENT_V4,
                CLIENT_V6,
                NODE_CLIENT_V6,
            ),
            (
                &server,
                "vs",
                SERVER_V4,
                NODE_SERVER_V4,
                SERVER_V6,
                NODE_SERVER_V6,
            ),
        ] {
            veth(pod, "eth0", &node, node_if)?;
            pod.add_addr("eth0", &format!("{pod_v4}/24"))?;
            pod.add_addr("eth0", &format!("{pod_v6}/64"))?;
            node.add_addr(node_if, &format!("{node_v4}/24"))?;
            node.add_addr(node_if, &format!("{node_v6}/64"))?;
            pod.add_default_route(&node_v4.to_string())?;
            pod.add_default_route(&node_v6.to_string())?;
        }
        Ok(Lab {
            client,
            server,
            node,
        })
    }

    /// The server pod's address of the family of `v6`.
    pub fn server_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(SERVER_V6)
        } else {
            IpAddr::V4(SERVER_V4)
        }
    }

    /// The client pod's address of the family of `v6`.
    pub fn client_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(CLIENT_V6)
        } else {
            IpAddr::V4(CLIENT_V4)
        }
    }
}
