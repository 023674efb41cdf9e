//! Pure rule generation: configuration in, rule text out. Nothing here touches the system.
//!
//! * [`model`] — the rule model (typed matches and targets) shared by generators and renderers.
//! * [`sidecar`] — the sidecar capture generator (Istio's `istio-iptables`), producing one
//!   rule model that both renderers consume.
//! * [`ambient_node`] — ambient node-level (`iptables` redirect mode) node/ztunnel rules, routes, sysctls.
//! * [`inpod`] — ambient `inpod` mode: in-pod rules and the host-probe SNAT rule.
//! * [`iptables`] — `iptables-restore` text renderer.
//! * [`nft`] — native nftables (`nft -f`) transaction renderer.
//! * [`save_form`] — the `iptables-save` spelling of a rule set (verify-or-repair).
#![forbid(unsafe_code)]

pub mod ambient_node;
pub mod inpod;
pub mod iptables;
pub mod model;
pub mod nft;
pub mod save_form;
pub mod sidecar;
