//! `meshcni-netx`: the dataplane edge. Entering network namespaces on dedicated threads,
//! applying rule text atomically (`iptables-restore`, `nft -f`), legacy-vs-nft detection per
//! netns, and a small synchronous rtnetlink client for addresses, rules and routes, plus
//! [`route`] (generic routes/rules), [`tunnel`] (GENEVE/VXLAN), [`ipset`] and [`sysctl`] for the
//! ambient node-level mode.
//!
//! It executes decisions; it does not make policy (that is `meshcni-rules`). Synchronous, no
//! tokio: the CNI plugin is short-lived and must start fast.
//!
//! `unsafe` is confined to [`sys`] (a `pre_exec` hook).

#![deny(unsafe_code)]

pub mod apply;
pub mod detect;
mod error;
pub mod exec;
pub mod inpod;
pub mod ipset;
pub mod iptables;
pub mod iptables_state;
pub mod iptnft;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod podns;
pub mod route;
mod sys;
pub mod sysctl;
pub mod tunnel;

use std::fmt;
use std::net::IpAddr;

pub use apply::{
    Applied, Applier, ApplyPlan, Backend, Ownership, RoutesPlan, RulesOutcome, TproxyRouting,
    apply_capture,
};
pub use error::NetxError;
pub use inpod::{
    HostProbe, InpodApplied, InpodApplier, InpodBackend, apply_inpod, check_inpod, remove_inpod,
};
pub use iptables::{IptablesFlavor, IptablesOptions};
pub use netlink::{AddressSpec, Change, LocalRouteSpec, Netlink, RuleSpec};
pub use netns::{InNetns, run_in_netns, spawn_in_netns, with_netns};

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        })
    }
}
