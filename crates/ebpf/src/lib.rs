//! meshcni's eBPF datapath for the ambient redirect mode `ebpf` (issue 11): the tc programs of
//! `bpf/meshcni.bpf.c` (compiled by clang in `build.rs`, embedded here), their pinned maps and
//! links under a meshcni directory in bpffs, and the loader that attaches them with tcx links
//! (clsact filters on kernels without tcx) and removes exactly what it attached.
//!
//! Layout of the pin directory (`/sys/fs/bpf/meshcni` by default):
//!
//! ```text
//! <pin dir>/maps/meshcni_pods|meshcni_zt|meshcni_hostip   pinned maps (survive agent restarts)
//! <pin dir>/links/<hook>-<netns inode>-<ifindex>            pinned tcx links (ditto)
//! <pin dir>/tc/<hook>-<netns inode>-<ifindex>[-qdisc]       clsact fallback records (empty dirs)
//! ```
//!
//! The agent's driver of the `ebpf` redirect mode is `meshcni_agent::modes::ebpf`.

mod datapath;
mod error;
pub mod features;
pub mod maps;

pub use datapath::{
    AttachKind, AttachMode, Datapath, DatapathConfig, Hook, PinnedAttachment, PinnedState,
    UninstallReport, ZTUNNEL_LOCAL_MARK, ZTUNNEL_LOCAL_PRIORITY, ZTUNNEL_LOCAL_TABLE, ifindex_in,
    inspect, mac_in, netns_inode_of, uninstall,
};
pub use error::EbpfError;
pub use maps::{PodEntry, ZtunnelEntry};

/// The compiled datapath object (`bpf/meshcni.bpf.c`).
pub const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/meshcni.bpf.o"));

/// Default capacity of the pod map (addresses, so a dual-stack pod takes two).
pub const DEFAULT_POD_CAPACITY: u32 = 16_384;

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshcni";
