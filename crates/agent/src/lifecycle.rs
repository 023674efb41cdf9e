//! What the agent does to the node when it stops: **leave the plugin installed** (restart,
//! upgrade, node drain) or **uninstall** (the mesh CNI is being removed from the cluster).
//!
//! # Why the default is "leave installed"
//!
//! SIGTERM alone cannot tell an upgrade from an uninstall. If the agent removed the plugin on
//! every SIGTERM, then during a rolling upgrade (old pod gone, new pod not yet installed) the
//! container runtime would start new pods *without* meshcni in the chain: sidecar pods would run
//! without capture rules and ambient pods would escape ztunnel. Leaving the plugin in place means
//! such pods are handled by the old binary (sidecar capture needs no agent) or held (ambient ADD
//! fails closed while no agent answers) until the new agent is up — Istio's "safe upgrade"
//! (`ShouldStopCleanup`, spec §5.5). meshcni applies this to every mode, not just ambient.
//!
//! # The explicit uninstall signal
//!
//! Istio asks the API server whether the DaemonSet still exists; this agent does too when it
//! knows its DaemonSet (4.), after the explicit signals; any one of these makes the agent
//! remove everything on exit:
//!
//! 1. `--uninstall-on-exit` / `UNINSTALL_ON_EXIT=true` (static; for hosts without Kubernetes, or
//!    a DaemonSet deliberately configured to clean up on every stop).
//! 2. `AMBIENT_DISABLE_SAFE_UPGRADE=true` (Istio's switch with Istio's meaning: always clean up).
//! 3. The marker file `--uninstall-marker-file` (default `/etc/meshcni/lifecycle/uninstall`)
//!    exists and contains `true` (surrounding whitespace ignored, case-insensitive). It is read at
//!    shutdown time, not at start. The Helm chart mounts the `meshcni-lifecycle` ConfigMap there
//!    (its key `uninstall` becomes the file); the chart's pre-delete hook (`meshcni-agent
//!    uninstall-hook` in the meshcni image, [`crate::uninstall_hook`]) sets the key to `true`
//!    and waits for the kubelet to project it before Helm deletes the DaemonSet. Plain
//!    manifests need no such step (4. covers `kubectl delete -f`). On a host without
//!    Kubernetes, write the file directly.
//!
//! 4. `--daemonset-name` (`DAEMONSET_NAME`, set by the chart): with no signal above, the agent
//!    asks the API server about its own DaemonSet at shutdown ([`crate::owner_check`], the
//!    reference's `ShouldStopCleanup`): gone, being deleted, access refused, or no answer →
//!    uninstall; present → leave installed. This covers `kubectl delete -f` of the manifests,
//!    which runs no hook.
//!
//! The `meshcni-agent uninstall` subcommand removes everything immediately (for scripts, tests,
//! and nodes where the agent is gone).

use std::path::Path;

use crate::owner_check::DaemonSetState;

/// State of the marker file at shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// No file.
    Absent,
    /// File present with this (trimmed) content.
    Present(String),
    /// File exists but could not be read.
    Unreadable(String),
}

/// Read the marker file (side effect at the edge; the decision is [`decide`]).
pub fn read_marker(path: &Path) -> Marker {
    match std::fs::read_to_string(path) {
        Ok(s) => Marker::Present(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Marker::Absent,
        Err(e) => Marker::Unreadable(format!("{}: {e}", path.display())),
    }
}

/// Inputs of the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInputs {
    pub uninstall_on_exit: bool,
    pub disable_safe_upgrade: bool,
    pub marker: Marker,
    /// The `--daemonset-name` shutdown check's answer ([`crate::owner_check`]); `None` when the
    /// check is off or was not needed (an explicit signal already says uninstall).
    pub daemonset: Option<DaemonSetState>,
}

/// The decision, with the reason to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    Uninstall { reason: String },
    LeaveInstalled { reason: String },
}

/// Decide between uninstall and leave-installed (pure).
pub fn decide(i: &ExitInputs) -> ExitAction {
    if i.uninstall_on_exit {
        return ExitAction::Uninstall {
            reason: "UNINSTALL_ON_EXIT is set".into(),
        };
    }
    if i.disable_safe_upgrade {
        return ExitAction::Uninstall {
            reason: "AMBIENT_DISABLE_SAFE_UPGRADE is set".into(),
        };
    }
    if let Marker::Present(s) = &i.marker
        && s.eq_ignore_ascii_case("true")
    {
        return ExitAction::Uninstall {
            reason: "uninstall marker file says true".into(),
        };
    }
    // No explicit signal: the DaemonSet check, when on, decides (owner_check.rs's table).
    match &i.daemonset {
        None => {}
        Some(DaemonSetState::Present) => {
            return ExitAction::LeaveInstalled {
                reason: "the agent's DaemonSet still exists: treating stop as upgrade/restart"
                    .into(),
            };
        }
        Some(DaemonSetState::Deleting(ts)) => {
            return ExitAction::Uninstall {
                reason: format!("the agent's DaemonSet is being deleted (deletionTimestamp {ts})"),
            };
        }
        Some(DaemonSetState::Gone) => {
            return ExitAction::Uninstall {
                reason: "the agent's DaemonSet is gone (404)".into(),
            };
        }
        Some(DaemonSetState::Refused { status, message }) => {
            return ExitAction::Uninstall {
                reason: format!(
                    "the API server refused the agent's service account (HTTP {status}: \
                     {message}): its DaemonSet's account or RBAC is gone, and the plugin's \
                     token with it"
                ),
            };
        }
        Some(DaemonSetState::Unknown(e)) => {
            return ExitAction::Uninstall {
                reason: format!(
                    "the agent's DaemonSet could not be confirmed ({e}): uninstalling so that no \
                     pod is blocked by a plugin nobody will update"
                ),
            };
        }
    }
    match &i.marker {
        Marker::Present(s) => ExitAction::LeaveInstalled {
            reason: format!(
                "uninstall marker file holds {s:?}, not \"true\": treating stop as upgrade/restart"
            ),
        },
        Marker::Absent => ExitAction::LeaveInstalled {
            reason: "no uninstall signal: treating stop as upgrade/restart".into(),
        },
        // Fail towards keeping pods captured: an unreadable marker is not an uninstall signal.
        Marker::Unreadable(e) => ExitAction::LeaveInstalled {
            reason: format!("uninstall marker unreadable ({e}): treating stop as upgrade/restart"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(u: bool, d: bool, m: Marker) -> ExitInputs {
        ExitInputs {
            uninstall_on_exit: u,
            disable_safe_upgrade: d,
            marker: m,
            daemonset: None,
        }
    }

    #[test]
    fn default_is_leave_installed() {
        assert!(matches!(
            decide(&inputs(false, false, Marker::Absent)),
            ExitAction::LeaveInstalled { .. }
        ));
        assert!(matches!(
            decide(&inputs(false, false, Marker::Present("false".into()))),
            ExitAction::LeaveInstalled { .. }
        ));
        assert!(matches!(
            decide(&inputs(false, false, Marker::Present(String::new()))),
            ExitAction::LeaveInstalled { .. }
        ));
        assert!(matches!(
            decide(&inputs(false, false, Marker::Unreadable("EACCES".into()))),
            ExitAction::LeaveInstalled { .. }
        ));
    }

    #[test]
    fn each_signal_uninstalls() {
        for i in [
            inputs(true, false, Marker::Absent),
            inputs(false, true, Marker::Absent),
            inputs(false, false, Marker::Present("true".into())),
            inputs(false, false, Marker::Present("TRUE".into())),
        ] {
            assert!(matches!(decide(&i), ExitAction::Uninstall { .. }), "{i:?}");
        }
    }

    #[test]
    fn only_a_daemonset_seen_present_keeps_the_plugin() {
        let with = |d: DaemonSetState| ExitInputs {
            daemonset: Some(d),
            ..inputs(false, false, Marker::Present("false".into()))
        };
        assert!(matches!(
            decide(&with(DaemonSetState::Present)),
            ExitAction::LeaveInstalled { .. }
        ));
        for d in [
            DaemonSetState::Deleting("2026-12-06T18:00:00Z".into()),
            DaemonSetState::Gone,
            DaemonSetState::Refused {
                status: 401,
                message: "Unauthorized".into(),
            },
            DaemonSetState::Unknown("connection refused".into()),
        ] {
            assert!(
                matches!(decide(&with(d.clone())), ExitAction::Uninstall { .. }),
                "{d:?}"
            );
        }
        // An explicit signal wins over a DaemonSet that is still there.
        let i = ExitInputs {
            daemonset: Some(DaemonSetState::Present),
            ..inputs(false, false, Marker::Present("true".into()))
        };
        assert!(matches!(decide(&i), ExitAction::Uninstall { .. }));
    }

    #[test]
    fn marker_is_read_and_trimmed() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("uninstall");
        assert_eq!(read_marker(&p), Marker::Absent);
        std::fs::write(&p, " true\n").expect("write");
        assert_eq!(read_marker(&p), Marker::Present("true".into()));
    }
}
