use std::path::PathBuf;

/// Errors of the eBPF datapath. Each names what failed (program, map, pin, interface, netns).
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The running kernel lacks something the datapath needs; nothing was attached.
    #[error("kernel feature missing: {feature} ({detail})")]
    MissingFeature {
        feature: &'static str,
        detail: String,
    },
    /// The verifier rejected a program; `log` is the kernel's verifier log.
    #[error("BPF verifier rejected program {program}: {error}\n--- verifier log ---\n{log}")]
    Verifier {
        program: String,
        error: String,
        log: String,
    },
    /// The pin directory is not on a bpffs mount.
    #[error("{path} is not on a bpf filesystem (mount -t bpf bpf <dir>)")]
    NotBpffs { path: PathBuf },
    /// A pinned map left by an earlier run does not fit this configuration.
    #[error(
        "pinned map {path} has {found} entries but {wanted} were requested; \
         uninstall the ebpf datapath first to change the capacity"
    )]
    CapacityMismatch {
        path: PathBuf,
        found: u32,
        wanted: u32,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Sys {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// libbpf failed.
    #[error("{op}: {message}")]
    Libbpf { op: String, message: String },
    /// A tc hook already holds something in the place we would use.
    #[error("{0}")]
    Conflict(String),
    /// Entering a network namespace failed.
    #[error(transparent)]
    Netx(#[from] meshcni_netx::NetxError),
}

impl EbpfError {
    pub(crate) fn sys(op: impl Into<String>, source: std::io::Error) -> Self {
        EbpfError::Sys {
            op: op.into(),
            source,
        }
    }

    /// `op` failed with the negative errno `rc` a libbpf/bpf call returned.
    pub(crate) fn errno(op: impl Into<String>, rc: i32) -> Self {
        EbpfError::sys(op, std::io::Error::from_raw_os_error(rc.saturating_abs()))
    }
}
