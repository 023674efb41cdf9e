//! `meshcni-plugin`: the CNI plugin's logic (the `meshcni` binary is a thin `main.rs`).
//!
//! * [`config`] — the plugin's stdin configuration (every Istio `istio-cni` field).
//! * [`pod`] — the pure pod decision and pod annotations → capture config.
//! * [`flow`] — ADD/DEL/CHECK/STATUS/GC: look the pod up, decide, apply, pass `prevResult` on.
//! * [`agent_client`] — hand ambient pods to the node agent (fail closed).
//! * [`report`] — fire-and-forget per-request metrics datagram to the agent.
//! * [`init_mode`] — `meshcni iptables …`: Istio's `istio-iptables` CLI for clusters without the
//!   CNI (init-container mode), applying the same rules in the current netns.
//! * [`validation`] — its `--run-validation` probe (is the capture in place?).
#![forbid(unsafe_code)]

pub mod agent_client;
pub mod cleanup;
pub mod config;
pub mod flow;
pub mod init_mode;
pub mod logging;
pub mod pod;
pub mod report;
pub mod validation;
