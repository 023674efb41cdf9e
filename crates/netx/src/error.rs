//! The one error type of the dataplane edge. Every variant names what failed, in which network
//! namespace, and — for external commands — the full command line, its exit status and stderr.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while touching a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetxError {
    /// The netns file could not be opened (missing path, permissions).
    #[error("cannot open network namespace {path}: {source}")]
    NetnsOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The path exists but is not a network namespace file.
    #[error("{path} is not a network namespace: {detail}")]
    NotANetns { path: PathBuf, detail: String },
    /// `setns(CLONE_NEWNET)` itself failed.
    #[error("setns(CLONE_NEWNET) into {path} failed: {source}")]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// A helper thread could not be spawned.
    #[error("cannot spawn a thread to enter network namespace {path}: {source}")]
    ThreadSpawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An external program could not be started at all.
    #[error("cannot run `{command}` in network namespace {netns}: {source}")]
    Spawn {
        netns: PathBuf,
        command: String,
        #[source]
        source: io::Error,
    },
    /// An external program ran and failed.
    #[error("`{command}` in network namespace {netns} failed ({status}): {stderr}")]
    Command {
        netns: PathBuf,
        command: String,
        status: String,
        stderr: String,
    },
    /// An external program ran past its time limit and was killed (SIGKILL).
    #[error("`{command}` in network namespace {netns} timed out after {after:?} and was killed")]
    Timeout {
        netns: PathBuf,
        command: String,
        after: std::time::Duration,
    },
    /// A netlink request was refused by the kernel or the socket failed.
    #[error("netlink {op} in network namespace {netns} failed: {source}")]
    Netlink {
        netns: PathBuf,
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel answered something we could not decode.
    #[error("netlink {op} in network namespace {netns}: unexpected reply: {detail}")]
    NetlinkProtocol {
        netns: PathBuf,
        op: String,
        detail: String,
    },
    /// No usable iptables binary (legacy, nft or plain) was found.
    #[error("no usable iptables binary for network namespace {netns}: {detail}")]
    NoIptables { netns: PathBuf, detail: String },
    /// The caller's plan is inconsistent (e.g. nft backend chosen without nft text).
    #[error("invalid apply plan for network namespace {netns}: {detail}")]
    InvalidPlan { netns: PathBuf, detail: String },
    /// A host file or directory could not be read (e.g. the host's `/proc` when looking for
    /// the kubelet).
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An apply failed and putting the previous state back failed too. Both causes are kept.
    #[error("{original}; additionally, restoring the previous state failed: {rollback}")]
    RollbackFailed {
        original: Box<NetxError>,
        rollback: Box<NetxError>,
    },
}

impl NetxError {
    /// The error that started it all (for `RollbackFailed`, the apply error rather than the
    /// rollback error).
    pub fn root(&self) -> &NetxError {
        match self {
            NetxError::RollbackFailed { original, .. } => original.root(),
            other => other,
        }
    }
}
