//! Ambient enrollment: the reconcile loop and the [`RedirectDriver`] seam every redirect mode
//! (`iptables`, `ebpf`, `inpod`) implements.
//!
//! The loop owns *what* should be redirected: it receives workload snapshots from a source
//! (`workloads`: Kubernetes list+watch or a local file), derives the desired set, plans
//! against what the driver reports as actually applied (`enroll::plan`), and hands the driver
//! one [`Action`] at a time. It also tracks the active ztunnel (spec §3.2
//! `UpdateActiveNodeProxy`) and tells the driver and the ambient config file when it changes.
//! The driver owns *how*: rules, ipsets, routes, maps, ZDS — and nothing else.
//!
//! # Contract for driver authors
//!
//! Calls come from a single thread (the loop's), never concurrently; `&mut self` everywhere.
//!
//! 1. **Start-up**: the loop calls [`RedirectDriver::actual`] first, before anything else. A
//!    driver reconstructs the enrolled set from the dataplane (iptables mode: its ipset, whose
//!    comments are pod UIDs), so an agent restart converges with zero duplicated work. A
//!    driver that cannot know (nothing installed yet) returns an empty state.
//! 2. **ztunnel**: [`RedirectDriver::ztunnel_changed`] is called whenever the active ztunnel
//!    changes (appears, is replaced by a newer Ready one, changes IP, or disappears → `None`),
//!    and once at start-up with the initial value (possibly `None`), always *before* actions
//!    are applied in that pass. After a successful call the loop re-reads `actual()` (spec
//!    §3.2: after re-creating the node rules, re-list and re-enqueue everything).
//! 3. **Actions**: [`RedirectDriver::apply`] for each action of the plan, releases first.
//!    Actions must be idempotent at the dataplane level (an `Enroll` of a pod whose ipset
//!    entry already exists succeeds). On `Ok` the loop records the action as applied; on
//!    `Err` it retries later with exponential backoff (the plan is recomputed each time, so a
//!    retry may become a different action if the world moved on).
//! 4. **Errors**: [`DriverError::scope`] says whether the failure is about one pod
//!    ([`ErrorScope::Pod`]: its netns is gone, ...) or the driver as a whole
//!    ([`ErrorScope::Driver`]: ztunnel not ready so the node rules are missing, iptables
//!    broken, ...). Driver-scoped failures close the agent's `redirect-mode` readiness gate
//!    until the next success; pod-scoped ones are retried and logged but keep the gate open.
//! 5. **Shutdown**: [`RedirectDriver::uninstall`] is called only when the agent is told to
//!    remove everything (uninstall); a plain restart leaves the dataplane in place so traffic
//!    keeps flowing and the next agent adopts it through `actual()`.
//!
//! `actual()` is not called on every pass: the loop keeps a copy updated by successful
//! actions and re-reads the driver at start-up, after `ztunnel_changed`, after any apply
//! error, and on the periodic resync.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use crate::enroll::{Action, EnrolledPod, EnrolledState, PodId};
use crate::ambient_config::RedirectMode;

/// The active ztunnel on this node: among pods on the node with label `app=ztunnel`, the
/// Ready one with the newest `creationTimestamp` (ties broken by UID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelInfo {
    pub pod: PodId,
    /// Sorted, deduplicated pod IPs (`status.podIPs`, else `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// RFC 3339 `metadata.creationTimestamp` as the API gave it.
    pub created: String,
    /// The ztunnel pod's annotations (e.g. for a driver that needs its netns hint).
    pub annotations: BTreeMap<String, String>,
}

/// Whether an error concerns one pod or the whole driver (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorScope {
    /// Only the pod named in the action is affected; other actions proceed.
    Pod,
    /// The driver cannot work at the moment; readiness gate `redirect-mode` closes.
    Driver,
}

/// A driver failure. The message names what failed and on what (command + args, netns, pod,
/// IP), as everywhere in meshcni.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DriverError {
    pub scope: ErrorScope,
    pub message: String,
}

impl DriverError {
    /// A failure limited to the pod of the action being applied.
    pub fn pod(message: impl Into<String>) -> DriverError {
        DriverError {
            scope: ErrorScope::Pod,
            message: message.into(),
        }
    }

    /// A failure of the driver as a whole.
    pub fn driver(message: impl Into<String>) -> DriverError {
        DriverError {
            scope: ErrorScope::Driver,
            message: message.into(),
        }
    }
}

/// A redirect mode's dataplane programming. See the module docs for the calling contract.
pub trait RedirectDriver: Send {
    /// Short name for logs and readiness reasons, e.g. `iptables`.
    fn name(&self) -> &str;

    /// What is currently redirected, reconstructed from the dataplane.
    fn actual(&mut self) -> Result<EnrolledState, DriverError>;

    /// Apply one action. Must be idempotent at the dataplane level.
    fn apply(&mut self, action: &Action) -> Result<(), DriverError>;

    /// The active ztunnel changed (or this is the start-up notification). `None` = no Ready
    /// ztunnel on the node.
    fn ztunnel_changed(&mut self, ztunnel: Option<&ZtunnelInfo>) -> Result<(), DriverError>;

    /// Remove every trace of this mode from the node (agent uninstall).
    fn uninstall(&mut self) -> Result<(), DriverError>;
}

/// The driver for `mode`, or `Err(reason)` when this build has none (ambient then stays
/// not ready with that reason). Redirect-mode helpers add their arm here.
pub fn make_driver(
    mode: RedirectMode,
    args: &crate::cli::AgentArgs,
) -> Result<Box<dyn RedirectDriver>, String> {
    let _ = args;
    match mode {
        RedirectMode::Iptables | RedirectMode::Ebpf | RedirectMode::Inpod => Err(format!(
            "redirect mode {mode} has no driver in this build of meshcni-agent"
        )),
    }
}
