//! "Is this pod IPv6?" — Istio's `FillConfigFromEnvironment` looks at the pod netns addresses:
//! the family of the first non-loopback, non-link-local address decides; with dual-stack, any
//! such IPv6 address enables IPv6. Pure decision functions plus a netns-reading edge.

use std::net::IpAddr;
use std::path::Path;

use crate::netlink::{AddressInfo, Netlink};
use crate::{IpFamily, NetxError};

fn is_candidate(addr: &IpAddr) -> bool {
    if addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() {
        return false;
    }
    match addr {
        IpAddr::V4(v4) => !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_unicast_link_local(),
    }
}

/// Addresses in interface order (stable by interface index, as Go's `net.Interfaces`).
fn in_interface_order(addrs: &[AddressInfo]) -> Vec<&AddressInfo> {
    let mut sorted: Vec<&AddressInfo> = addrs.iter().collect();
    sorted.sort_by_key(|a| a.index);
    sorted
}

/// Family of the first non-loopback, non-link-local address, if any.
pub fn first_global_family(addrs: &[AddressInfo]) -> Option<IpFamily> {
    in_interface_order(addrs)
        .into_iter()
        .find(|a| is_candidate(&a.addr))
        .map(|a| IpFamily::of(&a.addr))
}

/// Whether IPv6 rules are needed: dual-stack → any global IPv6 address; otherwise the family
/// of the first global address (no address at all → IPv4 only).
pub fn ipv6_enabled_from(addrs: &[AddressInfo], dual_stack: bool) -> bool {
    if dual_stack {
        addrs
            .iter()
            .any(|a| a.addr.is_ipv6() && is_candidate(&a.addr))
    } else {
        first_global_family(addrs) == Some(IpFamily::V6)
    }
}

/// [`ipv6_enabled_from`] over the addresses of `netns`.
pub fn ipv6_enabled(netns: &Path, dual_stack: bool) -> Result<bool, NetxError> {
    let addrs = Netlink::open(netns)?.addresses()?;
    Ok(ipv6_enabled_from(&addrs, dual_stack))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(index: u32, s: &str) -> AddressInfo {
        AddressInfo {
            index,
            addr: s.parse().expect("test address"),
            prefix_len: 64,
        }
    }

    #[test]
    fn first_global_address_decides() {
        let addrs = [
            a(1, "127.0.0.1"),
            a(2, "10.1.0.5"),
            a(1, "::1"),
            a(2, "fe80::1"),
            a(2, "fd00::5"),
        ];
        assert_eq!(first_global_family(&addrs), Some(IpFamily::V4));
        assert!(!ipv6_enabled_from(&addrs, false));
        assert!(ipv6_enabled_from(&addrs, true));
    }

    #[test]
    fn interface_order_beats_dump_order() {
        // Kernel dumps list all IPv4 first; interface 2's v6 comes before interface 3's v4.
        let addrs = [a(3, "10.1.0.5"), a(2, "169.254.1.1"), a(2, "fd00::5")];
        assert_eq!(first_global_family(&addrs), Some(IpFamily::V6));
        assert!(ipv6_enabled_from(&addrs, false));
    }

    #[test]
    fn nothing_global_means_ipv4() {
        let addrs = [a(1, "127.0.0.1"), a(1, "::1"), a(2, "fe80::1")];
        assert_eq!(first_global_family(&addrs), None);
        assert!(!ipv6_enabled_from(&addrs, false));
        assert!(!ipv6_enabled_from(&addrs, true));
    }
}
