//! Loading, pinning, attaching and detaching the datapath.

use std::ffi::CString;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use libbpf_rs::{MapCore, MapFlags, MapHandle, Object, ObjectBuilder, PrintLevel};
use meshcni_netx::netlink::{LocalRouteSpec, Netlink, RuleSpec};
use meshcni_netx::{IpFamily, run_in_netns};

use crate::features::{self, Features};
use crate::maps::{self, HOST_IPS_MAP, PODS_MAP, PodEntry, ZTUNNEL_MAP, ZtunnelEntry, addr_key};
use crate::{DEFAULT_PIN_DIR, DEFAULT_POD_CAPACITY, EbpfError, OBJECT};

/// `skb->mark` the ztunnel-netns program sets on packets it assigned to a socket; a policy
/// rule in the ztunnel netns routes them locally (`local default dev lo` in table 100).
pub const ZTUNNEL_LOCAL_MARK: u32 = 0x400;
/// Routing table of that local route (ztunnel netns only).
pub const ZTUNNEL_LOCAL_TABLE: u32 = 100;
/// Priority of the rule `fwmark 0x400/0xfff lookup 100` (ztunnel netns only).
pub const ZTUNNEL_LOCAL_PRIORITY: u32 = 20000;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// clsact fallback: our filters' handle and priority on every hook.
const CLSACT_HANDLE: u32 = 0x6d63;
const CLSACT_PRIORITY: u32 = 1;

/// How programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links when the kernel has them, else clsact filters.
    Auto,
    /// tcx links only (error naming the feature if the kernel lacks them).
    Tcx,
    /// clsact filters even where tcx exists (the fallback, selectable for tests).
    Clsact,
}

/// How programs are attached on this node (resolved from [`AttachMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    Tcx,
    Clsact,
}

/// Where a program goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Ingress of an enrolled pod's host-side veth (traffic leaving the pod).
    PodIngress,
    /// Egress of an enrolled pod's host-side veth (traffic to the pod).
    PodEgress,
    /// Ingress of ztunnel's host-side veth (traffic leaving ztunnel).
    ZtunnelHost,
    /// Ingress of ztunnel's `eth0`, inside the ztunnel netns.
    ZtunnelNetns,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::PodIngress => "meshcni_pod_in",
            Hook::PodEgress => "meshcni_pod_eg",
            Hook::ZtunnelHost => "meshcni_zt_host",
            Hook::ZtunnelNetns => "meshcni_zt_in",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Hook::PodIngress => "pod-in",
            Hook::PodEgress => "pod-eg",
            Hook::ZtunnelHost => "zt-host",
            Hook::ZtunnelNetns => "zt-in",
        }
    }

    fn egress(self) -> bool {
        self == Hook::PodEgress
    }
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// The meshcni directory in bpffs (created; its parent must be on bpffs).
    pub pin_dir: PathBuf,
    /// Capacity of the pod map, in addresses.
    pub pod_capacity: u32,
    pub attach: AttachMode,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            pod_capacity: DEFAULT_POD_CAPACITY,
            attach: AttachMode::Auto,
        }
    }
}

/// The loaded datapath: programs (held by this process), maps (pinned), links (pinned).
pub struct Datapath {
    pin_dir: PathBuf,
    kind: AttachKind,
    object: Object,
    pods: MapHandle,
    ztunnel: MapHandle,
    host_ips: MapHandle,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

static PRINT_INIT: Once = Once::new();
static CAPTURE: Mutex<Option<String>> = Mutex::new(None);
static LOAD_LOCK: Mutex<()> = Mutex::new(());

fn libbpf_print(level: PrintLevel, msg: String) {
    if let Ok(mut guard) = CAPTURE.lock()
        && let Some(buf) = guard.as_mut()
    {
        buf.push_str(&msg);
    }
    match level {
        PrintLevel::Warn => tracing::warn!(target: "libbpf", "{}", msg.trim_end()),
        _ => tracing::debug!(target: "libbpf", "{}", msg.trim_end()),
    }
}

/// The verifier log libbpf printed for a failed load, and the program it names.
fn verifier_log(captured: &str) -> Option<(String, String)> {
    let begin = "-- BEGIN PROG LOAD LOG --";
    let end = "-- END PROG LOAD LOG --";
    let start = captured.find(begin)?;
    let after = &captured[start + begin.len()..];
    let log = after.find(end).map_or(after, |e| &after[..e]);
    let log = log.trim_start_matches('\n').trim_end().to_string();
    let before = &captured[..start];
    let program = before
        .rfind("prog '")
        .and_then(|p| {
            let rest = &before[p + 6..];
            rest.find('\'').map(|q| rest[..q].to_string())
        })
        .unwrap_or_else(|| "(unknown)".to_string());
    Some((program, log))
}

fn is_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| EbpfError::Conflict(format!("path {} contains NUL", path.display())))?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(EbpfError::sys(
            format!("statfs {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mkdir(path: &Path) -> Result<(), EbpfError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(EbpfError::sys(format!("mkdir {}", path.display()), e)),
    }
}

fn cpath(path: &Path) -> Result<CString, EbpfError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| EbpfError::Conflict(format!("path {} contains NUL", path.display())))
}

/// `bpf_obj_get`: the pinned object's fd, `None` if nothing is pinned there.
fn obj_get(path: &Path) -> Result<Option<OwnedFd>, EbpfError> {
    let c = cpath(path)?;
    // SAFETY: valid C string.
    let rc = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    if rc >= 0 {
        // SAFETY: new fd owned by us.
        return Ok(Some(unsafe { OwnedFd::from_raw_fd(rc) }));
    }
    if -rc == libc::ENOENT {
        return Ok(None);
    }
    Err(EbpfError::errno(format!("open pin {}", path.display()), rc))
}

fn obj_pin(fd: &OwnedFd, path: &Path) -> Result<(), EbpfError> {
    let c = cpath(path)?;
    // SAFETY: valid fd and C string.
    let rc = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) };
    if rc < 0 {
        return Err(EbpfError::errno(format!("pin {}", path.display()), rc));
    }
    Ok(())
}

fn unlink(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EbpfError::sys(format!("remove pin {}", path.display()), e)),
    }
}

/// Link info of a tcx link: (link type, tcx ifindex, attach type, program id).
fn link_info(fd: &OwnedFd) -> Result<(u32, u32, u32, u32), EbpfError> {
    let mut info = libbpf_sys::bpf_link_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_link_info>() as u32;
    // SAFETY: valid fd and a correctly sized out struct.
    let rc = unsafe { libbpf_sys::bpf_link_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if rc < 0 {
        return Err(EbpfError::errno("get bpf link info", rc));
    }
    // SAFETY: reading the tcx member of the union; for other link types the values are unused.
    let tcx = unsafe { info.__bindgen_anon_1.tcx };
    Ok((info.type_, tcx.ifindex, tcx.attach_type, info.prog_id))
}

/// Name of the program with id `id` (None if it is gone).
fn prog_name_by_id(id: u32) -> Option<String> {
    // SAFETY: plain syscall wrapper.
    let rc = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    if rc < 0 {
        return None;
    }
    // SAFETY: new fd owned by us.
    let fd = unsafe { OwnedFd::from_raw_fd(rc) };
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: valid fd and out struct.
    let rc = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if rc < 0 {
        return None;
    }
    let bytes: Vec<u8> = info
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn netns_inode(netns: &Path) -> Result<u64, EbpfError> {
    Ok(meshcni_netx::netns::netns_inode(netns)?)
}

/// Run `f` in `netns`: inline when the calling thread is already there (the agent in the node
/// netns: no thread, no setns), else on a thread that entered it.
fn in_netns<R: Send>(netns: &Path, f: impl FnOnce() -> R + Send) -> Result<R, EbpfError> {
    if netns_inode(netns)? == meshcni_netx::netns::current_netns_inode()? {
        return Ok(f());
    }
    Ok(run_in_netns(netns, f)?)
}

fn ifindex_here(ifname: &str) -> Result<u32, EbpfError> {
    let c = CString::new(ifname)
        .map_err(|_| EbpfError::Conflict(format!("interface name {ifname:?} contains NUL")))?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(EbpfError::sys(
            format!("find interface {ifname}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(idx)
}

/// The ifindex of `ifname` in `netns`.
pub fn ifindex_in(netns: &Path, ifname: &str) -> Result<u32, EbpfError> {
    let name = ifname.to_string();
    in_netns(netns, move || ifindex_here(&name))?
}

/// The MAC address of `ifname` in `netns` (`SIOCGIFHWADDR`).
pub fn mac_in(netns: &Path, ifname: &str) -> Result<[u8; 6], EbpfError> {
    let name = ifname.to_string();
    in_netns(netns, move || -> Result<[u8; 6], EbpfError> {
        let bytes = name.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(EbpfError::Conflict(format!(
                "interface name {name:?} too long"
            )));
        }
        // SAFETY: zeroed ifreq is valid; the name fits (checked above).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: plain socket call.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(EbpfError::sys(
                "socket for SIOCGIFHWADDR",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: new fd owned by us.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        // SAFETY: valid socket and ifreq.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
        if rc < 0 {
            return Err(EbpfError::sys(
                format!("read MAC of {name}"),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
            *dst = *src as u8;
        }
        Ok(mac)
    })?
}

impl Datapath {
    /// Kernel ids of the loaded programs and of the pinned maps (for inspection with
    /// `bpftool prog/map show id N`).
    pub fn ids(&self) -> Result<(Vec<u32>, Vec<u32>), EbpfError> {
        let mut progs = Vec::new();
        for p in self.object.progs() {
            let mut info = libbpf_sys::bpf_prog_info::default();
            let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
            // SAFETY: valid fd and out struct.
            let rc = unsafe {
                libbpf_sys::bpf_prog_get_info_by_fd(p.as_fd().as_raw_fd(), &mut info, &mut len)
            };
            if rc < 0 {
                return Err(EbpfError::errno("get program info", rc));
            }
            progs.push(info.id);
        }
        let mut maps = Vec::new();
        for m in [&self.pods, &self.ztunnel, &self.host_ips] {
            let info = m.info().map_err(|e| EbpfError::Libbpf {
                op: "get map info".to_string(),
                message: e.to_string(),
            })?;
            maps.push(info.info.id);
        }
        Ok((progs, maps))
    }

    /// Probe the kernel, load the embedded programs, create or reuse the pinned maps.
    pub fn load(cfg: &DatapathConfig) -> Result<Datapath, EbpfError> {
        Self::load_object(cfg, OBJECT)
    }

    /// [`Datapath::load`] with another compiled object (tests load deliberately broken ones to
    /// prove verifier logs surface). The object must define the datapath's maps to be usable.
    pub fn load_object(cfg: &DatapathConfig, object: &[u8]) -> Result<Datapath, EbpfError> {
        let features = features::probe()?;
        let kind = match (cfg.attach, features) {
            (AttachMode::Clsact, _) => AttachKind::Clsact,
            (_, Features { tcx: true }) => AttachKind::Tcx,
            (AttachMode::Auto, Features { tcx: false }) => AttachKind::Clsact,
            (AttachMode::Tcx, Features { tcx: false }) => {
                return Err(EbpfError::MissingFeature {
                    feature: "tcx links (BPF_TCX_INGRESS/EGRESS)",
                    detail: "needs Linux 6.6 or later; use the clsact fallback".to_string(),
                });
            }
        };
        if cfg.pod_capacity == 0 {
            return Err(EbpfError::Conflict(
                "pod map capacity must be at least 1".to_string(),
            ));
        }
        let parent = cfg.pin_dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent)? {
            return Err(EbpfError::NotBpffs {
                path: parent.to_path_buf(),
            });
        }
        let maps_dir = cfg.pin_dir.join("maps");
        for dir in [
            &cfg.pin_dir,
            &maps_dir,
            &cfg.pin_dir.join("links"),
            &cfg.pin_dir.join("tc"),
        ] {
            mkdir(dir)?;
        }
        let pods_pin = maps_dir.join(PODS_MAP);
        if pods_pin.exists() {
            let existing =
                MapHandle::from_pinned_path(&pods_pin).map_err(|e| EbpfError::Libbpf {
                    op: format!("open pinned map {}", pods_pin.display()),
                    message: e.to_string(),
                })?;
            if existing.max_entries() != cfg.pod_capacity {
                return Err(EbpfError::CapacityMismatch {
                    path: pods_pin,
                    found: existing.max_entries(),
                    wanted: cfg.pod_capacity,
                });
            }
        }

        let object = Self::open_and_load(object, &maps_dir, cfg.pod_capacity)?;
        let open_map = |name: &str| -> Result<MapHandle, EbpfError> {
            let path = maps_dir.join(name);
            MapHandle::from_pinned_path(&path).map_err(|e| EbpfError::Libbpf {
                op: format!("open pinned map {}", path.display()),
                message: e.to_string(),
            })
        };
        Ok(Datapath {
            pin_dir: cfg.pin_dir.clone(),
            kind,
            pods: open_map(PODS_MAP)?,
            ztunnel: open_map(ZTUNNEL_MAP)?,
            host_ips: open_map(HOST_IPS_MAP)?,
            object,
        })
    }

    fn open_and_load(bytes: &[u8], maps_dir: &Path, capacity: u32) -> Result<Object, EbpfError> {
        PRINT_INIT.call_once(|| {
            libbpf_rs::set_print(Some((PrintLevel::Info, libbpf_print)));
        });
        let _serial = LOAD_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut builder = ObjectBuilder::default();
        builder
            .pin_root_path(maps_dir)
            .map_err(|e| EbpfError::Libbpf {
                op: format!("set pin root {}", maps_dir.display()),
                message: e.to_string(),
            })?;
        let mut open = builder.open_memory(bytes).map_err(|e| EbpfError::Libbpf {
            op: "open BPF object".to_string(),
            message: e.to_string(),
        })?;
        for mut map in open.maps_mut() {
            if map.name().as_bytes() == PODS_MAP.as_bytes() {
                map.set_max_entries(capacity)
                    .map_err(|e| EbpfError::Libbpf {
                        op: format!("set {PODS_MAP} capacity {capacity}"),
                        message: e.to_string(),
                    })?;
            }
        }
        if let Ok(mut c) = CAPTURE.lock() {
            *c = Some(String::new());
        }
        let loaded = open.load();
        let captured = CAPTURE
            .lock()
            .ok()
            .and_then(|mut c| c.take())
            .unwrap_or_default();
        loaded.map_err(|e| match verifier_log(&captured) {
            Some((program, log)) => EbpfError::Verifier {
                program,
                error: e.to_string(),
                log,
            },
            None => EbpfError::Libbpf {
                op: "load BPF object".to_string(),
                message: format!("{e}\n{}", captured.trim_end()),
            },
        })
    }

    /// How programs are attached on this node.
    pub fn attach_kind(&self) -> AttachKind {
        self.kind
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn prog_fd(&self, hook: Hook) -> Result<i32, EbpfError> {
        self.object
            .progs()
            .find(|p| p.name().as_bytes() == hook.program().as_bytes())
            .map(|p| p.as_fd().as_raw_fd())
            .ok_or_else(|| EbpfError::Libbpf {
                op: format!("find program {}", hook.program()),
                message: "not in the loaded object".to_string(),
            })
    }

    fn record_name(hook: Hook, nsino: u64, ifindex: u32) -> String {
        format!("{}-{nsino}-{ifindex}", hook.tag())
    }

    /// Attach `hook`'s program to `ifname` in `netns`. Idempotent: an existing pinned link of
    /// ours on the same interface is switched to this process's program in place
    /// (`bpf_link_update`, no gap); a pin left by a deleted interface is replaced.
    pub fn attach(&self, netns: &Path, ifname: &str, hook: Hook) -> Result<(), EbpfError> {
        self.attach_hooks(netns, ifname, &[hook])
    }

    /// [`Datapath::attach`] for several hooks of one interface, entering `netns` once.
    pub fn attach_hooks(
        &self,
        netns: &Path,
        ifname: &str,
        hooks: &[Hook],
    ) -> Result<(), EbpfError> {
        let plan = self.attach_plan(netns, hooks)?;
        in_netns(netns, || plan.attach_here(ifname))?
    }

    /// What attaching `hooks` in `netns` needs, gathered once (program fds and ids, the attach
    /// kind, the netns identity): plain data, so worker threads can share it.
    fn attach_plan(&self, netns: &Path, hooks: &[Hook]) -> Result<AttachPlan, EbpfError> {
        let mut progs = Vec::new();
        for hook in hooks {
            let fd = self.prog_fd(*hook)?;
            progs.push((*hook, fd, prog_id(fd)?));
        }
        Ok(AttachPlan {
            progs,
            kind: self.kind,
            pin_dir: self.pin_dir.clone(),
            nsino: netns_inode(netns)?,
            shown: netns.display().to_string(),
        })
    }

    /// Refuse a pin directory holding attachments of the other kind (an earlier agent ran with
    /// another attach setting): pod programs would then run twice on a veth, a tcx link and a
    /// clsact filter. Switching needs an uninstall first (which removes both kinds).
    pub fn check_attach_kind(&self) -> Result<(), EbpfError> {
        let (other, other_dir) = match self.kind {
            AttachKind::Tcx => ("clsact filters", self.pin_dir.join("tc")),
            AttachKind::Clsact => ("tcx links", self.pin_dir.join("links")),
        };
        let pinned_other = std::fs::read_dir(&other_dir)
            .map_err(|e| EbpfError::sys(format!("list {}", other_dir.display()), e))?
            .filter_map(Result::ok)
            .any(|e| parse_record(&e.file_name().to_string_lossy()).is_some());
        if pinned_other {
            return Err(EbpfError::Conflict(format!(
                "the datapath pinned under {} attaches its programs with {other} ({}), and this \
                 agent is set to attach with {}: run `meshcni-agent uninstall` first to switch",
                self.pin_dir.display(),
                other_dir.display(),
                match self.kind {
                    AttachKind::Tcx => "tcx links",
                    AttachKind::Clsact => "clsact filters",
                }
            )));
        }
        Ok(())
    }

    /// Attach both pod programs to each of `ifnames` (host veths in node netns `netns`),
    /// entering the netns once for all of them; one result per name, in order.
    ///
    /// Not in parallel, on purpose: creating (or detaching) a tcx link swaps the device's
    /// program array and waits for an RCU grace period (`synchronize_rcu`) while holding the
    /// RTNL lock, and a clsact filter change holds the same lock, so attaches are serialized
    /// by the kernel whatever the number of threads (measured: 1 and 16 threads take the same
    /// time for 100 pods). What a batch saves is the netns entry per pod.
    pub fn attach_pods(
        &self,
        netns: &Path,
        ifnames: &[String],
    ) -> Result<Vec<Result<(), EbpfError>>, EbpfError> {
        let plan = self.attach_plan(netns, &[Hook::PodIngress, Hook::PodEgress])?;
        in_netns(netns, || {
            ifnames.iter().map(|name| plan.attach_here(name)).collect()
        })
    }

    /// Detach `hook`'s program from interface `ifindex` of `netns` (only ours; foreign
    /// programs, filters and qdiscs stay). Nothing attached is fine.
    pub fn detach(&self, netns: &Path, ifindex: u32, hook: Hook) -> Result<(), EbpfError> {
        let nsino = netns_inode(netns)?;
        let name = Self::record_name(hook, nsino, ifindex);
        tcx_detach(&self.pin_dir.join("links").join(&name))?;
        clsact_detach(netns, &self.pin_dir.join("tc").join(&name))
    }

    /// Attach both pod programs to the pod's host-side veth `ifname` (node netns `netns`).
    pub fn attach_pod(&self, netns: &Path, ifname: &str) -> Result<(), EbpfError> {
        self.attach_hooks(netns, ifname, &[Hook::PodIngress, Hook::PodEgress])
    }

    /// Detach both pod programs from host veth `ifindex`.
    pub fn detach_pod(&self, netns: &Path, ifindex: u32) -> Result<(), EbpfError> {
        self.detach(netns, ifindex, Hook::PodIngress)?;
        self.detach(netns, ifindex, Hook::PodEgress)
    }

    /// Attach the ztunnel-netns program to `ifname` inside `zt_netns` and install the local
    /// delivery for assigned packets there: `ip rule fwmark 0x400/0xfff lookup 100 pref 20000`
    /// and `local default dev lo table 100`, IPv4 and IPv6 (no iptables/nft rule).
    ///
    /// Also sets `net.ipv4.conf.<ifname>.accept_local=1` there: ztunnel's HBONE to a local
    /// enrolled pod comes back into its own netns with ztunnel's own address as source (the
    /// same-node hairpin), which the kernel drops as martian otherwise. The previous value is
    /// recorded under `<pin dir>/sysctl/` and put back on detach and uninstall.
    pub fn attach_ztunnel_netns(&self, zt_netns: &Path, ifname: &str) -> Result<(), EbpfError> {
        ztunnel_routing(zt_netns, true)?;
        let nsino = netns_inode(zt_netns)?;
        let ifindex = ifindex_in(zt_netns, ifname)?;
        let key = format!("net/ipv4/conf/{ifname}/accept_local");
        let prev = meshcni_netx::with_netns(zt_netns, |ns| {
            meshcni_netx::sysctl::write_here(ns, &key, "1")
        })??;
        if let Some(prev) = prev {
            let dir = self.pin_dir.join("sysctl");
            mkdir(&dir)?;
            mkdir(&dir.join(format!("accept_local-{nsino}-{ifindex}-{prev}")))?;
        }
        self.attach(zt_netns, ifname, Hook::ZtunnelNetns)
    }

    /// Undo [`Datapath::attach_ztunnel_netns`].
    pub fn detach_ztunnel_netns(&self, zt_netns: &Path, ifname: &str) -> Result<(), EbpfError> {
        let ifindex = ifindex_in(zt_netns, ifname)?;
        self.detach(zt_netns, ifindex, Hook::ZtunnelNetns)?;
        restore_sysctls(&self.pin_dir, &[zt_netns], Some(ifindex))?;
        ztunnel_routing(zt_netns, false)
    }

    /// Our pinned tcx links: (hook, netns inode, ifindex — 0 once the device is gone,
    /// program id). For status output and the demo.
    pub fn links(&self) -> Result<Vec<(Hook, u64, u32, u32)>, EbpfError> {
        let dir = self.pin_dir.join("links");
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| EbpfError::sys(format!("list {}", dir.display()), e))?;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((hook, nsino, _)) = parse_record(&name) else {
                continue;
            };
            let Some(fd) = obj_get(&entry.path())? else {
                continue;
            };
            let (_, ifindex, _, prog_id) = link_info(&fd)?;
            out.push((hook, nsino, ifindex, prog_id));
        }
        out.sort_by_key(|l| (l.1, l.2, l.0.tag()));
        Ok(out)
    }

    /// Add or replace a pod address.
    pub fn set_pod(&self, ip: IpAddr, entry: PodEntry) -> Result<(), EbpfError> {
        self.pods
            .update(&addr_key(ip), &entry.to_bytes(), MapFlags::ANY)
            .map_err(|e| EbpfError::Libbpf {
                op: format!("{PODS_MAP}: set {ip}"),
                message: if e.kind() == libbpf_rs::ErrorKind::TooBig {
                    format!(
                        "the map is full ({} addresses; raise the pod capacity): {e}",
                        self.pods.max_entries()
                    )
                } else {
                    e.to_string()
                },
            })
    }

    /// Remove a pod address (absent is fine).
    pub fn remove_pod(&self, ip: IpAddr) -> Result<(), EbpfError> {
        match self.pods.delete(&addr_key(ip)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EbpfError::Libbpf {
                op: format!("{PODS_MAP}: remove {ip}"),
                message: e.to_string(),
            }),
        }
    }

    /// Every pod address in the map.
    pub fn pods(&self) -> Result<Vec<(IpAddr, PodEntry)>, EbpfError> {
        let mut out = Vec::new();
        for key in self.pods.keys() {
            let Ok(k) = <[u8; 16]>::try_from(key.as_slice()) else {
                continue;
            };
            let value = self
                .pods
                .lookup(&key, MapFlags::ANY)
                .map_err(|e| EbpfError::Libbpf {
                    op: format!("{PODS_MAP}: read"),
                    message: e.to_string(),
                })?;
            if let Some(entry) = value.as_deref().and_then(PodEntry::from_bytes) {
                out.push((maps::key_addr(k), entry));
            }
        }
        Ok(out)
    }

    /// Set the active ztunnel; `None` makes every enrolled pod's TCP fail closed.
    pub fn set_ztunnel(&self, entry: Option<ZtunnelEntry>) -> Result<(), EbpfError> {
        let bytes = entry.map_or([0u8; ZtunnelEntry::SIZE], ZtunnelEntry::to_bytes);
        self.ztunnel
            .update(&0u32.to_ne_bytes(), &bytes, MapFlags::ANY)
            .map_err(|e| EbpfError::Libbpf {
                op: format!("{ZTUNNEL_MAP}: set"),
                message: e.to_string(),
            })
    }

    /// Replace the node's own addresses (never steered).
    pub fn set_host_ips(&self, ips: &[IpAddr]) -> Result<(), EbpfError> {
        if ips.len() > maps::HOST_IPS_CAPACITY {
            return Err(EbpfError::Conflict(format!(
                "{} host addresses, {HOST_IPS_MAP} holds {}",
                ips.len(),
                maps::HOST_IPS_CAPACITY
            )));
        }
        let wanted: Vec<[u8; 16]> = ips.iter().map(|ip| addr_key(*ip)).collect();
        let stale: Vec<Vec<u8>> = self
            .host_ips
            .keys()
            .filter(|k| !wanted.iter().any(|w| w.as_slice() == k.as_slice()))
            .collect();
        for key in stale {
            let _ = self.host_ips.delete(&key);
        }
        for key in wanted {
            self.host_ips
                .update(&key, &1u32.to_ne_bytes(), MapFlags::ANY)
                .map_err(|e| EbpfError::Libbpf {
                    op: format!("{HOST_IPS_MAP}: set {}", maps::key_addr(key)),
                    message: e.to_string(),
                })?;
        }
        Ok(())
    }
}

/// Put back the `accept_local` values recorded under `<pin dir>/sysctl/` for interfaces of
/// `netns` (only `ifindex` if given) and drop their records. Records of other namespaces stay.
fn restore_sysctls(
    pin_dir: &Path,
    netns: &[&Path],
    ifindex: Option<u32>,
) -> Result<usize, EbpfError> {
    let dir = pin_dir.join("sysctl");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut restored = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name
            .strip_prefix("accept_local-")
            .unwrap_or("")
            .splitn(3, '-');
        let (Some(ino), Some(idx), Some(prev)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(ino), Ok(idx)) = (ino.parse::<u64>(), idx.parse::<u32>()) else {
            continue;
        };
        if ifindex.is_some_and(|i| i != idx) {
            continue;
        }
        let mut found = None;
        for ns in netns {
            if netns_inode(ns)? == ino {
                found = Some(*ns);
            }
        }
        let Some(ns) = found else {
            continue;
        };
        let prev = prev.to_string();
        meshcni_netx::with_netns(ns, |token| -> Result<(), EbpfError> {
            let mut buf = [0u8; libc::IF_NAMESIZE];
            // SAFETY: buffer of IF_NAMESIZE bytes as required.
            let p = unsafe { libc::if_indextoname(idx, buf.as_mut_ptr().cast()) };
            if p.is_null() {
                return Ok(()); // the interface is gone, and its sysctl with it
            }
            let ifname: String = buf
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as char)
                .collect();
            meshcni_netx::sysctl::write_here(
                token,
                &format!("net/ipv4/conf/{ifname}/accept_local"),
                &prev,
            )?;
            Ok(())
        })??;
        std::fs::remove_dir(entry.path())
            .map_err(|e| EbpfError::sys(format!("remove record {}", entry.path().display()), e))?;
        restored += 1;
    }
    Ok(restored)
}

fn ztunnel_routing(netns: &Path, install: bool) -> Result<(), EbpfError> {
    let mut nl = Netlink::open(netns)?;
    let has_v6 = in_netns(netns, || Path::new("/proc/sys/net/ipv6").exists())?;
    for family in [IpFamily::V4, IpFamily::V6] {
        if family == IpFamily::V6 && !has_v6 {
            continue;
        }
        let rule = RuleSpec {
            family,
            fwmark: ZTUNNEL_LOCAL_MARK,
            fwmask: Some(0xfff),
            table: ZTUNNEL_LOCAL_TABLE,
            priority: Some(ZTUNNEL_LOCAL_PRIORITY),
        };
        let route = LocalRouteSpec {
            family,
            table: ZTUNNEL_LOCAL_TABLE,
        };
        if install {
            nl.replace_local_route(&route)?;
            nl.add_rule(&rule)?;
        } else {
            nl.del_rule(&rule)?;
            nl.del_local_route(&route)?;
        }
    }
    Ok(())
}

/// (Calling thread in the interface's netns.)
/// See [`Datapath::attach_plan`].
struct AttachPlan {
    /// (hook, program fd, program id)
    progs: Vec<(Hook, i32, u32)>,
    kind: AttachKind,
    pin_dir: PathBuf,
    nsino: u64,
    shown: String,
}

impl AttachPlan {
    /// Attach every program of the plan to `name`; the calling thread is in the plan's netns.
    fn attach_here(&self, name: &str) -> Result<(), EbpfError> {
        let ifindex = ifindex_here(name)?;
        for &(hook, prog_fd, prog_id) in &self.progs {
            let record = Datapath::record_name(hook, self.nsino, ifindex);
            let result = match self.kind {
                AttachKind::Tcx => tcx_attach_here(
                    prog_fd,
                    prog_id,
                    ifindex,
                    hook,
                    &self.pin_dir.join("links").join(&record),
                ),
                AttachKind::Clsact => clsact_attach_here(
                    prog_fd,
                    prog_id,
                    ifindex,
                    hook,
                    &self.pin_dir.join("tc").join(&record),
                ),
            };
            result.map_err(|e| {
                EbpfError::Conflict(format!(
                    "attach {} to {name} (netns {}): {e}",
                    hook.program(),
                    self.shown
                ))
            })?;
        }
        Ok(())
    }
}

/// The id of the program behind `fd`.
fn prog_id(fd: i32) -> Result<u32, EbpfError> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: `fd` is a program fd owned by the loaded object; correctly sized out struct.
    let rc = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
    if rc < 0 {
        return Err(EbpfError::errno("get bpf program info", rc));
    }
    Ok(info.id)
}

fn tcx_attach_here(
    prog_fd: i32,
    prog_id: u32,
    ifindex: u32,
    hook: Hook,
    pin: &Path,
) -> Result<(), EbpfError> {
    let attach_type = if hook.egress() {
        libbpf_sys::BPF_TCX_EGRESS
    } else {
        libbpf_sys::BPF_TCX_INGRESS
    };
    if let Some(fd) = obj_get(pin)? {
        let (link_type, link_ifindex, link_attach, link_prog) = link_info(&fd)?;
        if link_type == libbpf_sys::BPF_LINK_TYPE_TCX
            && link_ifindex == ifindex
            && link_attach == attach_type
        {
            if link_prog == prog_id {
                // Already runs this program (a re-attach, or an attach done ahead by
                // `attach_pods`): nothing to switch.
                return Ok(());
            }
            // SAFETY: valid link and program fds.
            let rc =
                unsafe { libbpf_sys::bpf_link_update(fd.as_raw_fd(), prog_fd, std::ptr::null()) };
            if rc < 0 {
                return Err(EbpfError::errno(
                    format!("update link {}", pin.display()),
                    rc,
                ));
            }
            return Ok(());
        }
        // A link of a deleted interface (ifindex 0) or a reused ifindex: drop the stale pin.
        unlink(pin)?;
    }
    {
        let mut opts = libbpf_sys::bpf_link_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as libbpf_sys::size_t,
            // First in the chain: captured traffic must reach ztunnel whatever runs after us;
            // traffic we do not take continues to the next program (TCX_NEXT).
            flags: libbpf_sys::BPF_F_BEFORE,
            ..Default::default()
        };
        opts.__bindgen_anon_1.tcx = libbpf_sys::bpf_link_create_opts__bindgen_ty_1__bindgen_ty_6 {
            relative_fd: 0,
            relative_id: 0,
            expected_revision: 0,
        };
        let target = i32::try_from(ifindex)
            .map_err(|_| EbpfError::Conflict(format!("ifindex {ifindex} out of range")))?;
        // SAFETY: valid program fd and options.
        let rc = unsafe { libbpf_sys::bpf_link_create(prog_fd, target, attach_type, &opts) };
        if rc < 0 {
            return Err(EbpfError::errno(
                format!("create tcx link on ifindex {ifindex}"),
                rc,
            ));
        }
        // SAFETY: new fd owned by us.
        let link = unsafe { OwnedFd::from_raw_fd(rc) };
        obj_pin(&link, pin)
    }
}

fn tcx_detach(pin: &Path) -> Result<(), EbpfError> {
    let Some(fd) = obj_get(pin)? else {
        return Ok(());
    };
    let (_, ifindex, _, _) = link_info(&fd)?;
    if ifindex != 0 {
        // SAFETY: valid link fd.
        let rc = unsafe { libbpf_sys::bpf_link_detach(fd.as_raw_fd()) };
        if rc < 0 && -rc != libc::ENOLINK {
            return Err(EbpfError::errno(
                format!("detach link {}", pin.display()),
                rc,
            ));
        }
    }
    unlink(pin)
}

fn tc_hook(ifindex: u32, egress: bool) -> Result<libbpf_sys::bpf_tc_hook, EbpfError> {
    // SAFETY: an all-zero bpf_tc_hook is its documented initial state.
    let mut hook: libbpf_sys::bpf_tc_hook = unsafe { std::mem::zeroed() };
    hook.sz = std::mem::size_of::<libbpf_sys::bpf_tc_hook>() as libbpf_sys::size_t;
    hook.ifindex = i32::try_from(ifindex)
        .map_err(|_| EbpfError::Conflict(format!("ifindex {ifindex} out of range")))?;
    hook.attach_point = if egress {
        libbpf_sys::BPF_TC_EGRESS
    } else {
        libbpf_sys::BPF_TC_INGRESS
    };
    Ok(hook)
}

fn tc_opts(prog_fd: i32) -> libbpf_sys::bpf_tc_opts {
    // SAFETY: all-zero is the documented initial state.
    let mut opts: libbpf_sys::bpf_tc_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_tc_opts>() as libbpf_sys::size_t;
    opts.prog_fd = prog_fd;
    opts.handle = CLSACT_HANDLE;
    opts.priority = CLSACT_PRIORITY;
    opts
}

/// The program id of the filter at our handle/priority on `hook`, if any (in the netns of the
/// calling thread).
fn tc_query_here(hook: &libbpf_sys::bpf_tc_hook) -> Result<Option<u32>, EbpfError> {
    let mut opts = tc_opts(0);
    // SAFETY: valid hook and opts.
    let rc = unsafe { libbpf_sys::bpf_tc_query(hook, &mut opts) };
    if rc == 0 {
        return Ok(Some(opts.prog_id));
    }
    if -rc == libc::ENOENT || -rc == libc::EINVAL {
        return Ok(None);
    }
    Err(EbpfError::errno("query tc filter", rc))
}

/// (Calling thread in the interface's netns.)
fn clsact_attach_here(
    prog_fd: i32,
    prog_id: u32,
    ifindex: u32,
    hook: Hook,
    record: &Path,
) -> Result<(), EbpfError> {
    {
        let mut tc = tc_hook(ifindex, hook.egress())?;
        // SAFETY: valid hook.
        let rc = unsafe { libbpf_sys::bpf_tc_hook_create(&mut tc) };
        let created = match rc {
            0 => true,
            e if -e == libc::EEXIST => false,
            e => {
                return Err(EbpfError::errno(
                    format!("create clsact qdisc on ifindex {ifindex}"),
                    e,
                ));
            }
        };
        if created {
            // Remember that the qdisc is ours before anything else can fail.
            mkdir(&PathBuf::from(format!("{}-qdisc", record.display())))?;
        }
        if let Some(id) = tc_query_here(&tc)? {
            if id == prog_id {
                // Already runs this program (a re-attach, or one done ahead by
                // `attach_pods`): nothing to replace.
                return mkdir(record);
            }
            match prog_name_by_id(id) {
                Some(name) if name.starts_with("meshcni_") => {}
                other => {
                    return Err(EbpfError::Conflict(format!(
                        "a foreign tc filter (program {}) holds handle {CLSACT_HANDLE:#x} prio \
                         {CLSACT_PRIORITY} on ifindex {ifindex}; not replacing it",
                        other.unwrap_or_else(|| format!("id {id}"))
                    )));
                }
            }
        }
        let mut opts = tc_opts(prog_fd);
        opts.flags = libbpf_sys::BPF_TC_F_REPLACE;
        // SAFETY: valid hook and opts.
        let rc = unsafe { libbpf_sys::bpf_tc_attach(&tc, &mut opts) };
        if rc < 0 {
            return Err(EbpfError::errno(
                format!("attach clsact filter on ifindex {ifindex}"),
                rc,
            ));
        }
        mkdir(record)
    }
}

fn parse_record(name: &str) -> Option<(Hook, u64, u32)> {
    let hook = [
        Hook::PodIngress,
        Hook::PodEgress,
        Hook::ZtunnelHost,
        Hook::ZtunnelNetns,
    ]
    .into_iter()
    .find(|h| name.starts_with(&format!("{}-", h.tag())))?;
    let rest = &name[hook.tag().len() + 1..];
    let mut parts = rest.split('-');
    let nsino = parts.next()?.parse().ok()?;
    let ifindex = parts.next()?.parse().ok()?;
    Some((hook, nsino, ifindex))
}

/// Remove our clsact filter (only if it still runs a meshcni program) and, if we created the
/// qdisc and no filter is left on it in either direction, the qdisc.
fn clsact_detach(netns: &Path, record: &Path) -> Result<(), EbpfError> {
    if !record.exists() {
        return Ok(());
    }
    let name = record
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some((hook, _, ifindex)) = parse_record(&name) else {
        return Err(EbpfError::Conflict(format!(
            "unparsable record {}",
            record.display()
        )));
    };
    let qdisc_record = PathBuf::from(format!("{}-qdisc", record.display()));
    let ours_qdisc = qdisc_record.exists();
    let other_dir_record = record.with_file_name(name.replacen(
        hook.tag(),
        if hook.egress() {
            Hook::PodIngress.tag()
        } else {
            Hook::PodEgress.tag()
        },
        1,
    ));
    let other_attached =
        matches!(hook, Hook::PodIngress | Hook::PodEgress) && other_dir_record.exists();
    in_netns(netns, move || -> Result<(), EbpfError> {
        let tc = tc_hook(ifindex, hook.egress())?;
        if let Some(id) = tc_query_here(&tc)?
            && prog_name_by_id(id).is_some_and(|n| n.starts_with("meshcni_"))
        {
            let opts = tc_opts(0);
            // SAFETY: valid hook and opts (prog_fd 0 and flags 0, as libbpf requires).
            let rc = unsafe { libbpf_sys::bpf_tc_detach(&tc, &opts) };
            if rc < 0 && -rc != libc::ENOENT {
                return Err(EbpfError::errno(
                    format!("detach clsact filter on ifindex {ifindex}"),
                    rc,
                ));
            }
        }
        if ours_qdisc && !other_attached && clsact_empty_here(ifindex)? {
            let mut all = tc_hook(ifindex, false)?;
            all.attach_point = libbpf_sys::BPF_TC_INGRESS | libbpf_sys::BPF_TC_EGRESS;
            // SAFETY: valid hook.
            let rc = unsafe { libbpf_sys::bpf_tc_hook_destroy(&mut all) };
            if rc < 0 && -rc != libc::ENOENT && -rc != libc::EINVAL {
                return Err(EbpfError::errno(
                    format!("delete our clsact qdisc on ifindex {ifindex}"),
                    rc,
                ));
            }
        }
        Ok(())
    })??;
    if ours_qdisc && !other_attached {
        let _ = std::fs::remove_dir(&qdisc_record);
    }
    std::fs::remove_dir(record)
        .map_err(|e| EbpfError::sys(format!("remove record {}", record.display()), e))
}

/// Whether the clsact qdisc of `ifindex` holds no filter in either direction
/// (`tc filter show dev IF ingress|egress` prints nothing).
fn clsact_empty_here(ifindex: u32) -> Result<bool, EbpfError> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buffer of IF_NAMESIZE bytes as required.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Ok(false);
    }
    let name: String = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as char)
        .collect();
    for dir in ["ingress", "egress"] {
        let out = std::process::Command::new("tc")
            .args(["filter", "show", "dev", &name, dir])
            .output()
            .map_err(|e| EbpfError::sys(format!("run tc filter show dev {name} {dir}"), e))?;
        if !out.status.success() || !out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What [`uninstall`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UninstallReport {
    pub links: usize,
    pub filters: usize,
    pub maps: usize,
}

/// Remove everything of ours under `pin_dir`: detach every pinned link, every recorded clsact
/// filter (in whichever of `netns` has the recorded inode; the qdisc too where we created it),
/// unpin every map and remove the directory. Works without a loaded [`Datapath`] (after the
/// agent stopped). Nothing foreign is touched.
pub fn uninstall(pin_dir: &Path, netns: &[&Path]) -> Result<UninstallReport, EbpfError> {
    let mut report = UninstallReport::default();
    if !pin_dir.exists() {
        return Ok(report);
    }
    let read = |dir: &Path| -> Result<Vec<PathBuf>, EbpfError> {
        match std::fs::read_dir(dir) {
            Ok(rd) => Ok(rd.filter_map(|e| e.ok().map(|e| e.path())).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(EbpfError::sys(format!("list {}", dir.display()), e)),
        }
    };
    for pin in read(&pin_dir.join("links"))? {
        tcx_detach(&pin)?;
        report.links += 1;
    }
    let mut inodes = Vec::new();
    for ns in netns {
        inodes.push((netns_inode(ns)?, ns.to_path_buf()));
    }
    let mut records = read(&pin_dir.join("tc"))?;
    records.sort();
    for record in records {
        let name = record
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with("-qdisc") {
            continue;
        }
        let Some((_, nsino, _)) = parse_record(&name) else {
            continue;
        };
        let Some((_, ns)) = inodes.iter().find(|(i, _)| *i == nsino) else {
            return Err(EbpfError::Conflict(format!(
                "clsact record {} names netns inode {nsino}, which is none of the given namespaces",
                record.display()
            )));
        };
        clsact_detach(ns, &record)?;
        report.filters += 1;
    }
    restore_sysctls(pin_dir, netns, None)?;
    for map in read(&pin_dir.join("maps"))? {
        unlink(&map)?;
        report.maps += 1;
    }
    for dir in ["links", "tc", "maps", "sysctl"] {
        let path = pin_dir.join(dir);
        // Leftover `-qdisc` records of a qdisc that still had foreign filters: not ours to
        // delete, and nothing to keep track of any longer.
        for rest in read(&path)? {
            let _ = std::fs::remove_dir(rest);
        }
        match std::fs::remove_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EbpfError::sys(format!("remove {}", path.display()), e)),
        }
    }
    std::fs::remove_dir(pin_dir)
        .map_err(|e| EbpfError::sys(format!("remove {}", pin_dir.display()), e))?;
    Ok(report)
}

/// One attachment recorded under the pin dir (a pinned tcx link or a clsact record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedAttachment {
    pub hook: Hook,
    /// Inode of the netns the interface was in when attached.
    pub netns_inode: u64,
    /// The interface as recorded at attach time.
    pub ifindex: u32,
    /// tcx: the link's live ifindex (0 once the device is gone); clsact: the recorded one.
    pub live_ifindex: u32,
    /// `links/<record>` (tcx) or `tc/<record>` (clsact).
    pub path: PathBuf,
}

/// What is pinned under a pin dir, read without loading anything (`doctor`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinnedState {
    /// Names of the datapath maps pinned under `maps/` (of [`PODS_MAP`], [`ZTUNNEL_MAP`],
    /// [`HOST_IPS_MAP`]); other files there are listed in `foreign_maps`.
    pub maps: Vec<String>,
    pub foreign_maps: Vec<String>,
    /// Every entry of the pod map.
    pub pods: Vec<(IpAddr, PodEntry)>,
    /// The ztunnel entry (`None`: not pinned, or all zero = no ztunnel).
    pub ztunnel: Option<ZtunnelEntry>,
    pub attachments: Vec<PinnedAttachment>,
}

impl Hook {
    /// The record-name tag of the hook (`pod-in`, `pod-eg`, `zt-host`, `zt-in`).
    pub fn name(self) -> &'static str {
        self.tag()
    }
}

/// Read what is pinned under `pin_dir` (`None`: no pin dir). Read-only: opens pins, creates
/// nothing, loads no program.
pub fn inspect(pin_dir: &Path) -> Result<Option<PinnedState>, EbpfError> {
    if !pin_dir.exists() {
        return Ok(None);
    }
    let mut st = PinnedState::default();
    let list = |dir: &Path| -> Result<Vec<(String, PathBuf)>, EbpfError> {
        match std::fs::read_dir(dir) {
            Ok(rd) => {
                let mut v: Vec<(String, PathBuf)> = rd
                    .filter_map(Result::ok)
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect();
                v.sort();
                Ok(v)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(EbpfError::sys(format!("list {}", dir.display()), e)),
        }
    };
    let open = |path: &Path| {
        MapHandle::from_pinned_path(path).map_err(|e| EbpfError::Libbpf {
            op: format!("open pinned map {}", path.display()),
            message: e.to_string(),
        })
    };
    for (name, path) in list(&pin_dir.join("maps"))? {
        if ![PODS_MAP, ZTUNNEL_MAP, HOST_IPS_MAP].contains(&name.as_str()) {
            st.foreign_maps.push(name);
            continue;
        }
        if name == PODS_MAP {
            let m = open(&path)?;
            for key in m.keys() {
                let Ok(k) = <[u8; 16]>::try_from(key.as_slice()) else {
                    continue;
                };
                let value = m
                    .lookup(&key, MapFlags::ANY)
                    .map_err(|e| EbpfError::Libbpf {
                        op: format!("{PODS_MAP}: read"),
                        message: e.to_string(),
                    })?;
                if let Some(entry) = value.as_deref().and_then(PodEntry::from_bytes) {
                    st.pods.push((maps::key_addr(k), entry));
                }
            }
        } else if name == ZTUNNEL_MAP {
            let m = open(&path)?;
            let value =
                m.lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
                    .map_err(|e| EbpfError::Libbpf {
                        op: format!("{ZTUNNEL_MAP}: read"),
                        message: e.to_string(),
                    })?;
            st.ztunnel = value
                .filter(|v| v.iter().any(|b| *b != 0))
                .as_deref()
                .and_then(ZtunnelEntry::from_bytes);
        }
        st.maps.push(name);
    }
    for (name, path) in list(&pin_dir.join("links"))? {
        let Some((hook, nsino, ifindex)) = parse_record(&name) else {
            continue;
        };
        let Some(fd) = obj_get(&path)? else {
            continue;
        };
        let (_, live, _, _) = link_info(&fd)?;
        st.attachments.push(PinnedAttachment {
            hook,
            netns_inode: nsino,
            ifindex,
            live_ifindex: live,
            path,
        });
    }
    for (name, path) in list(&pin_dir.join("tc"))? {
        if name.ends_with("-qdisc") {
            continue;
        }
        let Some((hook, nsino, ifindex)) = parse_record(&name) else {
            continue;
        };
        st.attachments.push(PinnedAttachment {
            hook,
            netns_inode: nsino,
            ifindex,
            live_ifindex: ifindex,
            path,
        });
    }
    Ok(Some(st))
}

/// The inode of a netns file (what attachment records name).
pub fn netns_inode_of(netns: &Path) -> Result<u64, EbpfError> {
    netns_inode(netns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_log_is_cut_from_libbpf_output() {
        let out = "libbpf: prog 'meshcni_broken': BPF program load failed: Permission denied\n\
                   libbpf: prog 'meshcni_broken': -- BEGIN PROG LOAD LOG --\n\
                   0: R1=ctx() R10=fp0\ninvalid access to packet\n\
                   -- END PROG LOAD LOG --\nlibbpf: failed to load object\n";
        let (prog, log) = verifier_log(out).expect("log found");
        assert_eq!(prog, "meshcni_broken");
        assert_eq!(log, "0: R1=ctx() R10=fp0\ninvalid access to packet");
        assert_eq!(verifier_log("libbpf: failed to open\n"), None);
    }

    #[test]
    fn records_parse_back() {
        let name = Datapath::record_name(Hook::PodEgress, 4026531840, 7);
        assert_eq!(name, "pod-eg-4026531840-7");
        assert_eq!(parse_record(&name), Some((Hook::PodEgress, 4026531840, 7)));
        assert_eq!(parse_record("zt-in-5-9"), Some((Hook::ZtunnelNetns, 5, 9)));
        assert_eq!(parse_record("nonsense"), None);
    }
}
