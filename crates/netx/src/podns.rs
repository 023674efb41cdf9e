//! Finding the network namespace of a known pod on this node again — after an agent restart,
//! when the CNI hand-off that carried the netns path is long gone.
//!
//! A netns is matched by its **identity** ([`NetnsId`], the nsfs device and inode), never by a
//! path or an interface index, and a namespace is only ever returned for a pod when it
//! **holds one of the pod's IP addresses** (checked by entering it and listing its addresses).
//! [`NetnsFinder::find`] looks for many pods in one pass:
//!
//! 1. **By cgroup (procfs).** One walk of `<proc_root>`: for each process, the identity of
//!    `<pid>/ns/net` (a `stat`); processes in the finder's own (the host's) netns are dropped
//!    at once — on a node that is most of them. For the rest, `<pid>/cgroup` is parsed for a pod
//!    UID ([`pod_uid_from_cgroup`]: kubelet's cgroupfs and systemd layouts, cgroup v1 and v2).
//!    Each queried pod's candidate namespaces are tried oldest process first (`<pid>/stat`
//!    start time, read only when a pod's processes span several namespaces: it is the costly
//!    per-process read) — the sandbox (pause) process — and the first that holds one of the
//!    pod's IPs wins. This is Istio's `podcgroupns` finder plus the IP check Istio does
//!    afterwards.
//! 2. **By IP, for pods step 1 did not find.** The candidates are the namespaces of the netns
//!    files in `netns_dirs` (runtime bind mounts such as `/var/run/netns/cni-…`) **and** of the
//!    processes whose cgroup names no pod at all (step "1b": runtimes or tests whose cgroups do
//!    not carry the pod UID, and sandboxes whose netns has no bind mount). A namespace that any
//!    process's cgroup attributes to a pod is never handed to another pod by IP. The best match
//!    is the namespace holding the most of the pod's IPs; a tie, or a namespace matching two
//!    queried pods, is ambiguous (e.g. a leaked sandbox still holding a reassigned IP) and
//!    yields nothing for those pods (logged) — a wrong netns would silently leave the pod
//!    uncaptured, a missing one is reported and retried by the caller.
//!
//! Why step 1b is worth having: it costs nothing when step 1 found every pod (it does not run
//! at all), and otherwise it reuses the identities the step-1 walk already collected, so each
//! extra namespace is entered once. It is the only way to find a pod whose sandbox netns is
//! held by a process alone (no bind mount) when its cgroup path does not name the pod.
//!
//! Cost: `<proc_root>` is read once; each distinct candidate namespace is opened once and
//! entered at most once, however many pods or processes share it (all entries on one dedicated
//! thread that `setns`es from one namespace to the next and lists its addresses with one
//! `RTM_GETADDR` dump). [`NetnsFinder::find_with_stats`] reports the counts.
//!
//! Addresses that are not unique to one namespace (loopback, unspecified, multicast, IPv6
//! link-local) never identify a pod and are ignored in queries.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs, statfs};

use crate::NetxError;
use crate::netlink::parse_route_message;

/// The identity of a network namespace: `(st_dev, st_ino)` of an nsfs file that refers to it
/// (`/proc/<pid>/ns/net`, a bind mount under `/run/netns`, an open fd). Two files refer to the
/// same namespace iff their identities are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}] (nsfs dev {})", self.ino, self.dev)
    }
}

/// The identity of the namespace the nsfs file at `path` refers to (symlinks followed).
/// A path on any other filesystem is [`NetxError::NotANetns`]; the namespace *type* is not
/// checked here (entering it with `setns(CLONE_NEWNET)` does that).
pub fn netns_id(path: &Path) -> Result<NetnsId, NetxError> {
    let open_err = |source: std::io::Error| NetxError::NetnsOpen {
        path: path.to_path_buf(),
        source,
    };
    let fs = statfs(path).map_err(|e| open_err(e.into()))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(NetxError::NotANetns {
            path: path.to_path_buf(),
            detail: format!(
                "it is on a filesystem of type {:#x}, not an nsfs namespace file",
                fs.filesystem_type().0
            ),
        });
    }
    let m = std::fs::metadata(path).map_err(open_err)?;
    Ok(NetnsId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The identity of the namespace an open nsfs fd refers to.
pub fn netns_id_of_fd(fd: BorrowedFd<'_>) -> Result<NetnsId, NetxError> {
    let label = || PathBuf::from(format!("<fd {}>", fd.as_raw_fd()));
    let fs = fstatfs(fd).map_err(|e| NetxError::NetnsOpen {
        path: label(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(NetxError::NotANetns {
            path: label(),
            detail: format!(
                "it is on a filesystem of type {:#x}, not an nsfs namespace file",
                fs.filesystem_type().0
            ),
        });
    }
    let st = nix::sys::stat::fstat(fd).map_err(|e| NetxError::NetnsOpen {
        path: label(),
        source: e.into(),
    })?;
    Ok(NetnsId {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// One pod to look for: its UID (as the API server spells it; `_` and upper case are
/// tolerated) and its IPs (from the pod status). A UID queried twice is looked up once (the
/// first entry's IPs).
#[derive(Debug, Clone, Copy)]
pub struct PodNetnsQuery<'a> {
    pub uid: &'a str,
    pub ips: &'a [IpAddr],
}

/// A pod's network namespace, found and verified.
#[derive(Debug)]
pub struct FoundNetns {
    /// An open nsfs fd: it keeps the namespace alive and is what to `setns` into or hand over.
    pub file: File,
    pub id: NetnsId,
    /// Where it was found and why it was accepted, for logs, e.g.
    /// `/proc/1234/ns/net (cgroup of pod uid …; holds 10.0.0.5)`.
    pub source: String,
}

/// What one [`NetnsFinder::find_with_stats`] call did (for logs, metrics and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FindStats {
    /// `<proc_root>/<pid>` entries examined.
    pub processes: usize,
    /// Of those, processes outside the host netns whose cgroup names a queried pod.
    pub pod_processes: usize,
    /// `<pid>/stat` start times read (only for pods whose processes span several netns).
    pub start_times_read: usize,
    /// nsfs files found in the netns directories (only read when step 2 runs).
    pub netns_files: usize,
    /// Distinct namespaces entered (or tried: a file of another namespace type is refused by
    /// `setns`) to list their addresses; each at most once per call.
    pub netns_entered: usize,
    /// Pods found by cgroup (step 1), by a netns-directory file (step 2), by a process IP (1b).
    pub by_cgroup: usize,
    pub by_netns_dir: usize,
    pub by_process_ip: usize,
}

/// Finds pods' network namespaces from a proc filesystem and netns directories. See the module
/// documentation for the method.
#[derive(Debug, Clone)]
pub struct NetnsFinder {
    proc_root: PathBuf,
    netns_dirs: Vec<PathBuf>,
    host: NetnsId,
}

/// Upper bound on a `/proc/<pid>/cgroup` or `/proc/<pid>/stat` read.
const PROC_FILE_LIMIT: u64 = 64 * 1024;

impl NetnsFinder {
    /// A finder over `proc_root` (`/proc`, or `/host/proc` in a container with the host's PID
    /// namespace mounted there) and `netns_dirs` (e.g. `/var/run/netns`; a missing directory
    /// is simply empty). The namespace of the calling thread is taken as the host's and is
    /// never returned for a pod.
    pub fn new(
        proc_root: impl Into<PathBuf>,
        netns_dirs: Vec<PathBuf>,
    ) -> Result<NetnsFinder, NetxError> {
        let proc_root = proc_root.into();
        std::fs::read_dir(&proc_root).map_err(|e| proc_error(&proc_root, "list", e))?;
        let host = netns_id(Path::new("/proc/thread-self/ns/net"))?;
        Ok(NetnsFinder {
            proc_root,
            netns_dirs,
            host,
        })
    }

    /// The namespace taken as the host's (skipped).
    pub fn host_netns(&self) -> NetnsId {
        self.host
    }

    /// Find each queried pod's netns in one scan. Pods that are not found (or whose match is
    /// ambiguous) are absent from the map, which is keyed by the UID exactly as queried. A
    /// returned namespace always holds at least one of the pod's IPs. Errors only when the
    /// proc root cannot be listed, a netns directory exists but cannot be listed, or the
    /// helper thread cannot be spawned.
    pub fn find(
        &self,
        pods: &[PodNetnsQuery<'_>],
    ) -> Result<BTreeMap<String, FoundNetns>, NetxError> {
        self.find_with_stats(pods).map(|(found, _)| found)
    }

    /// [`NetnsFinder::find`], also reporting what the scan did.
    pub fn find_with_stats(
        &self,
        pods: &[PodNetnsQuery<'_>],
    ) -> Result<(BTreeMap<String, FoundNetns>, FindStats), NetxError> {
        let mut stats = FindStats::default();
        let mut found = BTreeMap::new();

        // Queries, by normalised UID; a pod without a usable IP can never be verified.
        let mut queries: Vec<Query<'_>> = Vec::new();
        let mut by_uid: HashMap<String, usize> = HashMap::new();
        for pod in pods {
            let ips: Vec<IpAddr> = pod.ips.iter().copied().filter(identifies_netns).collect();
            if ips.is_empty() {
                tracing::debug!(
                    pod_uid = pod.uid,
                    "pod has no usable IP; its netns cannot be verified"
                );
                continue;
            }
            let key = normalize_uid(pod.uid);
            if by_uid.contains_key(&key) {
                continue;
            }
            by_uid.insert(key, queries.len());
            queries.push(Query {
                uid: pod.uid,
                ips,
                candidates: Vec::new(),
            });
        }
        if queries.is_empty() {
            return Ok((found, stats));
        }

        // One walk of the proc root.
        let mut others: Vec<(u32, NetnsId)> = Vec::new();
        let mut claimed: HashSet<NetnsId> = HashSet::new();
        let entries = std::fs::read_dir(&self.proc_root)
            .map_err(|e| proc_error(&self.proc_root, "list", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| proc_error(&self.proc_root, "list", e))?;
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            stats.processes += 1;
            let dir = entry.path();
            // Processes come and go during the walk: every per-process read may fail.
            let Ok(meta) = std::fs::metadata(dir.join("ns/net")) else {
                continue;
            };
            let id = NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            };
            if id == self.host {
                continue;
            }
            let uid = read_bounded(&dir.join("cgroup")).and_then(|t| pod_uid_from_cgroup(&t));
            let Some(uid) = uid else {
                others.push((pid, id));
                continue;
            };
            claimed.insert(id);
            let Some(&q) = by_uid.get(&uid) else {
                continue;
            };
            stats.pod_processes += 1;
            queries[q].candidates.push((0, pid, id));
        }

        let mut handles: HashMap<NetnsId, Handle> = HashMap::new();
        let mut addrs: HashMap<NetnsId, Option<HashSet<IpAddr>>> = HashMap::new();
        let mut assigned: HashSet<NetnsId> = HashSet::new();

        // Step 1: by cgroup, oldest process first, verified by IP.
        let mut order: Vec<Vec<NetnsId>> = Vec::with_capacity(queries.len());
        for query in &mut queries {
            // Which process is oldest only matters when the pod's processes are in more than
            // one namespace; reading `<pid>/stat` is by far the most expensive per-process
            // read of the walk (the kernel gathers the whole stat line), so it is skipped in
            // the usual case of one namespace per pod.
            let first = query.candidates.first().map(|c| c.2);
            if query.candidates.iter().any(|c| Some(c.2) != first) {
                for (start, pid, _) in &mut query.candidates {
                    let stat = self.proc_root.join(pid.to_string()).join("stat");
                    stats.start_times_read += 1;
                    // A process that exited meanwhile sorts last.
                    *start = read_bounded(&stat)
                        .and_then(|t| parse_starttime(&t))
                        .unwrap_or(u64::MAX);
                }
            }
            query.candidates.sort_unstable();
            let mut ids: Vec<NetnsId> = Vec::new();
            for &(_, pid, id) in &query.candidates {
                // A namespace shared by several processes (or pods) is opened and checked once.
                if !ids.contains(&id) {
                    ids.push(id);
                }
                if !handles.contains_key(&id)
                    && let Some(h) = self.open_proc_netns(pid, id)
                {
                    handles.insert(id, h);
                }
            }
            order.push(ids);
        }
        self.list_addresses(&handles, &mut addrs, &mut stats)?;
        for (q, ids) in order.iter().enumerate() {
            let query = &queries[q];
            let hit = ids.iter().find_map(|id| {
                let held = held_ips(addrs.get(id), &query.ips);
                (!held.is_empty() && !assigned.contains(id)).then_some((*id, held))
            });
            let Some((id, held)) = hit else {
                if !ids.is_empty() {
                    tracing::warn!(
                        pod_uid = query.uid,
                        candidates = ids.len(),
                        "processes of the pod found, but none of their network namespaces holds the pod's IPs"
                    );
                }
                continue;
            };
            let Some(h) = handles.remove(&id) else {
                continue;
            };
            assigned.insert(id);
            stats.by_cgroup += 1;
            found.insert(
                query.uid.to_string(),
                FoundNetns {
                    file: h.file,
                    id,
                    source: format!(
                        "{} (cgroup of pod uid {}; holds {})",
                        h.path.display(),
                        query.uid,
                        join_ips(&held)
                    ),
                },
            );
        }

        // Step 2 (+1b): by IP, among namespaces no pod process claims.
        let missing: Vec<usize> = (0..queries.len())
            .filter(|q| !found.contains_key(queries[*q].uid))
            .collect();
        if missing.is_empty() {
            return Ok((found, stats));
        }
        let mut pool: Vec<NetnsId> = Vec::new();
        let mut in_pool: HashSet<NetnsId> = HashSet::new();
        for dir in &self.netns_dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(proc_error(dir, "list netns directory", e)),
            };
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths {
                let (file, id) = match open_nsfs(&path) {
                    Ok(opened) => opened,
                    Err(e) => {
                        tracing::debug!(path = %path.display(), error = %e, "skipping non-netns entry");
                        continue;
                    }
                };
                stats.netns_files += 1;
                if id == self.host || claimed.contains(&id) || assigned.contains(&id) {
                    continue;
                }
                if in_pool.insert(id) {
                    pool.push(id);
                }
                // A stable runtime name is a better handle than a process that may exit.
                let replace = handles.get(&id).is_none_or(|h| !h.from_dir);
                if replace {
                    handles.insert(
                        id,
                        Handle {
                            file,
                            path,
                            from_dir: true,
                        },
                    );
                }
            }
        }
        for &(pid, id) in &others {
            if claimed.contains(&id) || assigned.contains(&id) || in_pool.contains(&id) {
                continue;
            }
            // If this process exited meanwhile, the next one in the same netns is tried.
            if let Entry::Vacant(slot) = handles.entry(id) {
                match self.open_proc_netns(pid, id) {
                    Some(h) => {
                        slot.insert(h);
                    }
                    None => continue,
                }
            }
            in_pool.insert(id);
            pool.push(id);
        }
        self.list_addresses(&handles, &mut addrs, &mut stats)?;

        // Best namespace per missing pod; contested namespaces are dropped. Matching goes
        // through an index "address -> namespaces holding it", so it is linear in the number
        // of addresses, not pods x namespaces.
        let wanted_ips: HashSet<IpAddr> = missing
            .iter()
            .flat_map(|&q| queries[q].ips.iter().copied())
            .collect();
        let mut holders: HashMap<IpAddr, Vec<NetnsId>> = HashMap::new();
        for id in &pool {
            if let Some(Some(set)) = addrs.get(id) {
                for ip in set.iter().filter(|ip| wanted_ips.contains(ip)) {
                    holders.entry(*ip).or_default().push(*id);
                }
            }
        }
        let mut best: Vec<Option<(NetnsId, Vec<IpAddr>)>> = Vec::with_capacity(missing.len());
        let mut wanted_by: HashMap<NetnsId, usize> = HashMap::new();
        for &q in &missing {
            let query = &queries[q];
            // (namespace, the pod's IPs it holds), in first-seen order.
            let mut matches: Vec<(NetnsId, Vec<IpAddr>)> = Vec::new();
            for ip in &query.ips {
                for id in holders.get(ip).into_iter().flatten() {
                    match matches.iter_mut().find(|(m, _)| m == id) {
                        Some((_, held)) => held.push(*ip),
                        None => matches.push((*id, vec![*ip])),
                    }
                }
            }
            for (id, _) in &matches {
                *wanted_by.entry(*id).or_default() += 1;
            }
            let most = matches
                .iter()
                .map(|(_, held)| held.len())
                .max()
                .unwrap_or(0);
            let mut top = matches.into_iter().filter(|(_, held)| held.len() == most);
            let choice = match (top.next(), top.next()) {
                (Some(only), None) => Some(only),
                (Some((first, _)), Some((second, _))) => {
                    tracing::warn!(
                        pod_uid = query.uid,
                        first = %first,
                        second = %second,
                        "two network namespaces hold the pod's IPs equally; not choosing"
                    );
                    None
                }
                _ => None,
            };
            best.push(choice);
        }
        for (i, &q) in missing.iter().enumerate() {
            let query = &queries[q];
            let Some((id, held)) = best[i].take() else {
                continue;
            };
            if wanted_by.get(&id).copied().unwrap_or(0) > 1 {
                tracing::warn!(
                    pod_uid = query.uid,
                    netns = %id,
                    "the network namespace holding this pod's IP also holds another queried pod's IP; not choosing"
                );
                continue;
            }
            let Some(h) = handles.remove(&id) else {
                continue;
            };
            assigned.insert(id);
            if h.from_dir {
                stats.by_netns_dir += 1;
            } else {
                stats.by_process_ip += 1;
            }
            let why = if h.from_dir {
                "netns file"
            } else {
                "process whose cgroup names no pod"
            };
            found.insert(
                query.uid.to_string(),
                FoundNetns {
                    file: h.file,
                    id,
                    source: format!("{} ({why}; holds {})", h.path.display(), join_ips(&held)),
                },
            );
        }
        Ok((found, stats))
    }

    /// Open `<proc_root>/<pid>/ns/net` and check it is still the namespace `want` (the pid may
    /// have exited or been reused since it was looked at).
    fn open_proc_netns(&self, pid: u32, want: NetnsId) -> Option<Handle> {
        let path = self.proc_root.join(pid.to_string()).join("ns/net");
        let (file, id) = open_nsfs(&path).ok()?;
        (id == want).then_some(Handle {
            file,
            path,
            from_dir: false,
        })
    }

    /// List the addresses of every handle's namespace not listed yet, on one dedicated thread
    /// that enters them one after the other.
    fn list_addresses(
        &self,
        handles: &HashMap<NetnsId, Handle>,
        addrs: &mut HashMap<NetnsId, Option<HashSet<IpAddr>>>,
        stats: &mut FindStats,
    ) -> Result<(), NetxError> {
        let mut todo: Vec<(NetnsId, &Handle)> = handles
            .iter()
            .filter(|(id, _)| !addrs.contains_key(id))
            .map(|(id, h)| (*id, h))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        todo.sort_unstable_by_key(|(id, _)| *id);
        stats.netns_entered += todo.len();
        let listed = std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("netx-podns".to_string())
                .spawn_scoped(scope, || {
                    todo.iter()
                        .map(|(id, h)| (*id, addresses_in(&h.file, &h.path)))
                        .collect::<Vec<_>>()
                })
                .map_err(|source| NetxError::ThreadSpawn {
                    path: self.proc_root.clone(),
                    source,
                })?;
            match worker.join() {
                Ok(listed) => Ok(listed),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })?;
        for (id, result) in listed {
            addrs.insert(id, result);
        }
        Ok(())
    }
}

/// Open a namespace file without ever blocking: `O_NONBLOCK`, so a FIFO (or device) left in a
/// netns directory cannot hang the scan, then require nsfs.
fn open_nsfs(path: &Path) -> Result<(File, NetnsId), NetxError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| NetxError::NetnsOpen {
            path: path.to_path_buf(),
            source,
        })?;
    let id = netns_id_of_fd(file.as_fd()).map_err(|e| match e {
        NetxError::NotANetns { detail, .. } => NetxError::NotANetns {
            path: path.to_path_buf(),
            detail,
        },
        other => other,
    })?;
    Ok((file, id))
}

/// On the dedicated thread: enter `file`'s namespace and list its addresses. `None` (logged)
/// when it cannot be entered or listed: such a namespace is never verified.
fn addresses_in(file: &File, path: &Path) -> Option<HashSet<IpAddr>> {
    if let Err(e) = setns(file, CloneFlags::CLONE_NEWNET) {
        tracing::warn!(netns = %path.display(), error = %e, "cannot enter network namespace to list its addresses");
        return None;
    }
    match addresses_here() {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::warn!(netns = %path.display(), error = %e, "cannot list addresses of network namespace");
            None
        }
    }
}

/// Every interface address of the calling thread's netns: one `RTM_GETADDR` dump on a fresh
/// netlink socket (half the work of `getifaddrs`, which also dumps every link).
fn addresses_here() -> Result<HashSet<IpAddr>, String> {
    const SEQ: u32 = 1;
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| format!("netlink socket: {e}"))?;
    socket
        .bind_auto()
        .map_err(|e| format!("netlink bind: {e}"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("netlink connect: {e}"))?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(10, 0),
    )
    .map_err(|e| format!("netlink receive timeout: {e}"))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = SEQ;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetAddress(AddressMessage::default())),
    );
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .map_err(|e| format!("send address dump request: {e}"))?;
    let mut out = HashSet::new();
    loop {
        let (datagram, _) =
            crate::netlink::recv_full(&socket).map_err(|e| format!("receive address dump: {e}"))?;
        let mut offset = 0;
        while offset < datagram.len() {
            let msg = parse_route_message(&datagram[offset..])?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err("zero-length netlink message in address dump".to_string());
            }
            offset += (len + 3) & !3;
            if msg.header.sequence_number != SEQ {
                continue;
            }
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(format!("address dump refused: {:?}", e.code));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) => {
                    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
                    // point-to-point links); either way only an address of this netns counts.
                    let local = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let address = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    });
                    if let Some(ip) = local.or(address) {
                        out.insert(ip);
                    }
                }
                _ => {}
            }
        }
    }
}

struct Query<'a> {
    uid: &'a str,
    ips: Vec<IpAddr>,
    /// (start time, pid, netns) of the processes whose cgroup names this pod.
    candidates: Vec<(u64, u32, NetnsId)>,
}

struct Handle {
    file: File,
    path: PathBuf,
    from_dir: bool,
}

fn proc_error(path: &Path, what: &str, e: std::io::Error) -> NetxError {
    NetxError::NetnsOpen {
        path: path.to_path_buf(),
        source: std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())),
    }
}

fn held_ips(addrs: Option<&Option<HashSet<IpAddr>>>, ips: &[IpAddr]) -> Vec<IpAddr> {
    match addrs {
        Some(Some(set)) => ips.iter().filter(|ip| set.contains(ip)).copied().collect(),
        _ => Vec::new(),
    }
}

fn join_ips(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether an address can tell one namespace from another (every netns has its own loopback
/// and link-local addresses).
fn identifies_netns(ip: &IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

fn read_bounded(path: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(PROC_FILE_LIMIT)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Field 22 (`starttime`, clock ticks since boot) of `/proc/<pid>/stat`. The command name
/// (field 2) is in parentheses and may contain spaces and `)`, so fields are counted from the
/// last `)`.
fn parse_starttime(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Lower case, `_` → `-` (systemd escapes the UID's dashes).
fn normalize_uid(uid: &str) -> String {
    uid.trim().to_ascii_lowercase().replace('_', "-")
}

/// The pod UID named by the contents of a `/proc/<pid>/cgroup` file, normalised to lower case
/// with dashes; `None` for a process outside any pod, or when lines name different pods.
///
/// Understands kubelet's layouts on cgroup v1 (`N:controllers:path` lines) and v2 (`0::path`):
/// cgroupfs driver `…/kubepods[/burstable|/besteffort]/pod<uid>/<container>`, systemd driver
/// `…/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` (also with
/// a `kubelet-` prefix as in kind, or `:`-separated as some runtimes print it), and paths seen
/// from inside a cgroup namespace (`/../../pod<uid>/<container>`).
pub fn pod_uid_from_cgroup(cgroup_file_text: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in cgroup_file_text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_hierarchy), Some(_controllers), Some(path)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        match uid_in_path(path) {
            PathUid::None => {}
            PathUid::Conflict => return None,
            PathUid::One(uid) => match &found {
                Some(f) if *f != uid => return None,
                _ => found = Some(uid),
            },
        }
    }
    found
}

enum PathUid {
    None,
    One(String),
    Conflict,
}

fn uid_in_path(path: &str) -> PathUid {
    let mut kubepods_seen = false;
    let mut outside_namespace = false;
    let mut found: Option<String> = None;
    for seg in path.split(['/', ':']).filter(|s| !s.is_empty()) {
        if seg == ".." {
            outside_namespace = true;
            continue;
        }
        let stem = seg.strip_suffix(".slice").unwrap_or(seg);
        if let Some((prefix, uid)) = pod_segment(stem) {
            let accepted = if prefix.is_empty() {
                kubepods_seen || outside_namespace
            } else {
                prefix.contains("kubepods")
            };
            if accepted {
                match &found {
                    Some(f) if *f != uid => return PathUid::Conflict,
                    _ => found = Some(uid),
                }
            }
        }
        if seg.contains("kubepods") {
            kubepods_seen = true;
        }
    }
    found.map_or(PathUid::None, PathUid::One)
}

/// `pod<uuid>` at the end of a path segment: returns what precedes `pod` (empty, or ending in
/// `-` for systemd slice names) and the normalised UID.
fn pod_segment(stem: &str) -> Option<(&str, String)> {
    const UUID_LEN: usize = 36;
    let split = stem.len().checked_sub(UUID_LEN)?;
    let head = stem.get(..split)?;
    let raw = stem.get(split..)?;
    let prefix = head.strip_suffix("pod")?;
    if !(prefix.is_empty() || prefix.ends_with('-')) {
        return None;
    }
    let bytes = raw.as_bytes();
    let sep = *bytes.get(8)?;
    if sep != b'-' && sep != b'_' {
        return None;
    }
    for (i, b) in bytes.iter().enumerate() {
        let ok = if matches!(i, 8 | 13 | 18 | 23) {
            *b == sep
        } else {
            b.is_ascii_hexdigit()
        };
        if !ok {
            return None;
        }
    }
    Some((prefix, normalize_uid(raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starttime_counts_from_the_last_paren() {
        let stat =
            "1234 (a) b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 0";
        assert_eq!(parse_starttime(stat), Some(987654));
        assert_eq!(parse_starttime("1 (x) S 0"), None);
        assert_eq!(parse_starttime("garbage"), None);
    }

    #[test]
    fn only_namespace_unique_addresses_identify_a_pod() {
        for (ip, want) in [
            ("10.1.2.3", true),
            ("fd00::5", true),
            ("2001:db8::1", true),
            ("127.0.0.1", false),
            ("::1", false),
            ("0.0.0.0", false),
            ("fe80::1", false),
            ("ff02::1", false),
            ("224.0.0.1", false),
        ] {
            let ip: IpAddr = ip.parse().expect("test address");
            assert_eq!(identifies_netns(&ip), want, "{ip}");
        }
    }
}
