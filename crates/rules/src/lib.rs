//! Pure rule generation: configuration in, rule text out. Nothing here touches the system.
//!
//! * [`sidecar`] — the sidecar capture generator (Istio's `istio-iptables`), producing one
//!   rule model that both renderers consume.
//! * [`iptables`] — `iptables-restore` text renderer.
//! * [`nft`] — native nftables (`nft -f`) transaction renderer.
#![forbid(unsafe_code)]

pub mod sidecar;
