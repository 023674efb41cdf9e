//! Redirect-mode drivers (implementations of [`crate::ambient::RedirectDriver`]).
//!
//! * [`iptables`] — G1 node-level redirection: node iptables + ipset + policy routing +
//!   GENEVE/VXLAN tunnels into the ztunnel pod (spec §3).

pub mod iptables;
