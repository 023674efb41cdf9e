//! Byte layouts of the pinned maps, shared with `bpf/meshcni.bpf.c` (pure; unit-tested).
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | `meshcni_pods` | HASH, capacity set at load ([`crate::DEFAULT_POD_CAPACITY`]) | 16-byte address (IPv4 as `::ffff:a.b.c.d`) | [`PodEntry`]: host veth ifindex, pod MAC, flags (bit 0: DNS capture) |
//! | `meshcni_zt` | ARRAY\[1\] | `u32` 0 | [`ZtunnelEntry`]: ztunnel host veth ifindex (0 = none → fail closed), ztunnel and host veth MACs, flags, its IPv4/IPv6 |
//! | `meshcni_hostip` | HASH\[64\] | 16-byte address | `u32` 1 — the node's own addresses (kubelet probes pass) |

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Map names (also their pin names under `<pin dir>/maps/`).
pub const PODS_MAP: &str = "meshcni_pods";
pub const ZTUNNEL_MAP: &str = "meshcni_zt";
pub const HOST_IPS_MAP: &str = "meshcni_hostip";
/// Capacity of `meshcni_hostip` (fixed in the object).
pub const HOST_IPS_CAPACITY: usize = 64;

/// The 16-byte map key of an address: IPv6 as is, IPv4 as the IPv4-mapped IPv6 address.
pub fn addr_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a map key stands for (the inverse of [`addr_key`]).
pub fn key_addr(key: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// One enrolled pod address (`struct pod_info`, 12 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodEntry {
    /// The pod's host-side veth (node netns).
    pub host_ifindex: u32,
    /// The MAC of the pod's `eth0` (destination MAC of packets handed to the pod).
    pub mac: [u8; 6],
    /// Steer the pod's DNS (UDP and TCP to port 53) to ztunnel's DNS proxy (15053).
    pub dns_capture: bool,
}

/// `pod_info.flags` bit: DNS capture.
const POD_DNS_CAPTURE: u8 = 0x1;

impl PodEntry {
    pub const SIZE: usize = 12;

    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.host_ifindex.to_ne_bytes());
        b[4..10].copy_from_slice(&self.mac);
        if self.dns_capture {
            b[10] |= POD_DNS_CAPTURE;
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<PodEntry> {
        if b.len() != Self::SIZE {
            return None;
        }
        let mut ifindex = [0u8; 4];
        ifindex.copy_from_slice(&b[0..4]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[4..10]);
        Some(PodEntry {
            host_ifindex: u32::from_ne_bytes(ifindex),
            mac,
            dns_capture: b[10] & POD_DNS_CAPTURE != 0,
        })
    }
}

/// The active ztunnel (`struct zt_info`, 52 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZtunnelEntry {
    /// ztunnel's host-side veth (node netns).
    pub host_ifindex: u32,
    /// The MAC of ztunnel's `eth0`.
    pub mac: [u8; 6],
    /// The MAC of ztunnel's host-side veth (destination of packets handed back to the node).
    pub host_mac: [u8; 6],
    /// ztunnel's pod IPv4 address, if any.
    pub ip4: Option<Ipv4Addr>,
    /// ztunnel's pod IPv6 address, if any.
    pub ip6: Option<Ipv6Addr>,
}

impl ZtunnelEntry {
    pub const SIZE: usize = 52;

    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.host_ifindex.to_ne_bytes());
        b[4..10].copy_from_slice(&self.mac);
        b[10..16].copy_from_slice(&self.host_mac);
        // 16..20: flags (none defined yet).
        if let Some(ip4) = self.ip4 {
            b[20..36].copy_from_slice(&addr_key(IpAddr::V4(ip4)));
        }
        if let Some(ip6) = self.ip6 {
            b[36..52].copy_from_slice(&ip6.octets());
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<ZtunnelEntry> {
        if b.len() != Self::SIZE {
            return None;
        }
        let mut ifindex = [0u8; 4];
        ifindex.copy_from_slice(&b[0..4]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[4..10]);
        let mut host_mac = [0u8; 6];
        host_mac.copy_from_slice(&b[10..16]);
        let mut k4 = [0u8; 16];
        k4.copy_from_slice(&b[20..36]);
        let mut k6 = [0u8; 16];
        k6.copy_from_slice(&b[36..52]);
        let ip4 = match key_addr(k4) {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        };
        let ip6 = (k6 != [0u8; 16]).then(|| Ipv6Addr::from(k6));
        Some(ZtunnelEntry {
            host_ifindex: u32::from_ne_bytes(ifindex),
            mac,
            host_mac,
            ip4,
            ip6,
        })
    }
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_ipv4_into_ipv6_and_back() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 10));
        let k = addr_key(v4);
        assert_eq!(&k[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&k[12..], &[10, 77, 1, 10]);
        assert_eq!(key_addr(k), v4);
        let v6: IpAddr = "fd77:1::a".parse().expect("literal");
        assert_eq!(key_addr(addr_key(v6)), v6);
    }

    #[test]
    fn entries_round_trip_with_the_c_layout() {
        let pod = PodEntry {
            host_ifindex: 0x0102_0304,
            mac: [1, 2, 3, 4, 5, 6],
            dns_capture: false,
        };
        let b = pod.to_bytes();
        assert_eq!(&b[0..4], &0x0102_0304u32.to_ne_bytes());
        assert_eq!(&b[4..10], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&b[10..], &[0, 0]);
        assert_eq!(PodEntry::from_bytes(&b), Some(pod));
        let dns = PodEntry {
            dns_capture: true,
            ..pod
        };
        assert_eq!(dns.to_bytes()[10], 1);
        assert_eq!(PodEntry::from_bytes(&dns.to_bytes()), Some(dns));

        let zt = ZtunnelEntry {
            host_ifindex: 7,
            mac: [0xaa; 6],
            host_mac: [0xbb; 6],
            ip4: Some(Ipv4Addr::new(10, 77, 1, 100)),
            ip6: Some("fd77:1::64".parse().expect("literal")),
        };
        let b = zt.to_bytes();
        assert_eq!(&b[10..16], &[0xbb; 6]);
        assert_eq!(&b[32..36], &[10, 77, 1, 100]);
        assert_eq!(ZtunnelEntry::from_bytes(&b), Some(zt));
        let none = ZtunnelEntry {
            ip4: None,
            ip6: None,
            ..zt
        };
        assert_eq!(ZtunnelEntry::from_bytes(&none.to_bytes()), Some(none));
        assert_eq!(&none.to_bytes()[20..], &[0u8; 32]);
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:00:0a:4d:01:0a\n"),
            Some([2, 0, 10, 0x4d, 1, 10])
        );
        assert_eq!(parse_mac("02:00:0a:4d:01"), None);
        assert_eq!(parse_mac("02:00:0a:4d:01:0a:00"), None);
        assert_eq!(parse_mac("zz:00:0a:4d:01:0a"), None);
    }
}
