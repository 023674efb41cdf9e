//! The ZDS server: a root-only `SOCK_SEQPACKET` unix socket that ztunnel connects to.
//!
//! Per connection (one thread each): read `ZdsHello` (must be V1), replay the snapshot — every
//! registered workload as `AddWorkload` + its netns fd, or `KeepWorkload` when registered without
//! an fd, each awaiting its `Ack` before the next — then `SnapshotSent` (acked too), then serve
//! queued incremental requests one at a time (one outstanding request per connection; ztunnel
//! answers each with exactly one `WorkloadResponse`).
//!
//! Routing: [`ZdsServer::add`] goes to the **newest** connection (the one that said Hello last);
//! if that connection is still replaying its snapshot, the add is queued behind the snapshot.
//! Registering the workload and choosing the target happen under the same lock as a new
//! connection's joining and copying the registry for its snapshot, so every connection learns a
//! workload exactly once: either in its snapshot (it joined after the add was registered) or as a
//! queued add (it was the newest connection when the add was registered). [`ZdsServer::del`] goes
//! to every connection, queued behind whatever that connection is doing.
//!
//! Any protocol violation by the peer — a datagram over [`MAX_MESSAGE_LEN`] (`MSG_TRUNC`), an fd or
//! other ancillary data sent to us (`MSG_CTRUNC`), undecodable protobuf, a second Hello or any
//! message while no request is outstanding, a response without an ack — drops that connection
//! (logged with the reason); the server and other connections carry on. An ack timeout also drops
//! the connection: a late ack would otherwise be taken as the answer to the next request.
//! Dead peers are noticed at once: an idle connection thread polls its socket, so EOF/HUP ends it.

use std::collections::{BTreeMap, VecDeque};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, bind, listen,
    recvmsg, sendmsg, socket, sockopt,
};
use prost::Message;
use tracing::{debug, info, warn};

use crate::proto::{
    Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_response,
};

/// ztunnel's default `INPOD_UDS`.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";

/// Largest ZDS datagram either side may send. ztunnel and istio's agent read with a 1024-byte
/// buffer and treat truncation as an error, so we refuse to send more and drop peers that do.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Server settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZdsOptions {
    /// How long the peer has to answer one request (and to send its Hello after connecting).
    /// A request not acked in time fails with [`ZdsError::Timeout`] and the connection is dropped.
    pub ack_timeout: Duration,
    /// Connections open at once; further ones are accepted and closed at once (logged).
    pub max_connections: usize,
    /// Accept rate limit: connections accepted per second (token bucket, burst of the same size).
    /// Pending connections wait in the listen backlog.
    pub accepts_per_second: u32,
}

impl Default for ZdsOptions {
    /// 5 s ack timeout and 5 accepts/s as upstream; 16 connections (ztunnel keeps one, two during a
    /// rolling restart).
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(5),
            max_connections: 16,
            accepts_per_second: 5,
        }
    }
}

/// What happened on a connection, reported through the `on_event` callback (called from the
/// connection's own thread, in this order per connection, with no server lock held). The
/// callback must return quickly and must not call [`ZdsServer::add`]/[`ZdsServer::del`] itself
/// (that would wait on the very thread running the callback): hand the event to another thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZdsEvent {
    /// A peer connected (before its Hello). `peer_pid` from SO_PEERCRED.
    Connected { conn: u64, peer_pid: Option<i32> },
    /// The snapshot was delivered and `SnapshotSent` acked; the connection now takes requests.
    /// `nacked` = (uid, ztunnel's error) for snapshot entries ztunnel refused; they stay registered.
    SnapshotSent {
        conn: u64,
        nacked: Vec<(String, String)>,
    },
    /// The connection ended (peer closed, protocol violation, ack timeout, server stopped).
    Disconnected { conn: u64, reason: String },
}

/// Errors; every message names the pod uid (where there is one) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS: no ztunnel connected to hand pod {uid} to (is ztunnel running on this node?)")]
    NoConnection { uid: String },
    #[error("ZDS: ztunnel (connection {conn}) refused pod {uid}: {reason}")]
    Nack {
        uid: String,
        conn: u64,
        reason: String,
    },
    #[error(
        "ZDS: ztunnel (connection {conn}) did not acknowledge pod {uid} within {after:?}; connection dropped"
    )]
    Timeout {
        uid: String,
        conn: u64,
        after: Duration,
    },
    #[error("ZDS: ztunnel connection {conn} lost while handing over pod {uid}: {reason}")]
    Disconnected {
        uid: String,
        conn: u64,
        reason: String,
    },
    #[error("ZDS: request for pod {uid} is {len} bytes, over the {max}-byte ZDS message limit")]
    TooLarge { uid: String, len: usize, max: usize },
    #[error("ZDS: DelWorkload for pod {uid} failed on {}", describe_failures(.failures))]
    DelFailed {
        uid: String,
        /// (connection, cause) per failed connection.
        failures: Vec<(u64, String)>,
    },
    #[error("ZDS: invalid option {option}: {reason}")]
    InvalidOptions {
        option: &'static str,
        reason: &'static str,
    },
    #[error("ZDS: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn describe_failures(failures: &[(u64, String)]) -> String {
    failures
        .iter()
        .map(|(conn, why)| format!("connection {conn}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn io_err(context: String, source: impl Into<std::io::Error>) -> ZdsError {
    ZdsError::Io {
        context,
        source: source.into(),
    }
}

type EventFn = Box<dyn Fn(ZdsEvent) + Send + Sync>;
type Reply = mpsc::SyncSender<Result<(), ZdsError>>;

/// A registered workload.
struct Entry {
    info: WorkloadInfo,
    netns: Option<Arc<OwnedFd>>,
    /// Distinguishes this registration from a later one of the same uid (failure rollback must not
    /// remove a newer registration).
    generation: u64,
}

/// One queued request for a connection.
struct Job {
    uid: String,
    kind: &'static str,
    bytes: Vec<u8>,
    fd: Option<Arc<OwnedFd>>,
    /// `None` = fire and forget (outcome logged).
    reply: Option<Reply>,
}

struct QueueState {
    jobs: VecDeque<Job>,
}

/// A connection's request queue. The connection thread sleeps in poll(2) on its socket, the
/// server's stop socket and `wake_rx`; a producer pushes a job and writes one byte to `wake_tx`.
struct ConnQueue {
    state: Mutex<QueueState>,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl ConnQueue {
    fn new() -> std::io::Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Self {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
            }),
            wake_tx,
            wake_rx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a job; the caller must hold the server state lock and have found this connection in
    /// `State::conns`: a connection drains its queue for the last time after leaving `conns`,
    /// under the same lock, so no job pushed this way is ever stranded.
    fn push(&self, job: Job) {
        self.lock().jobs.push_back(job);
        // A full wake buffer (EAGAIN) already means "readable"; nothing else can fail here that
        // the connection thread would not notice on its own socket.
        let _ = (&self.wake_tx).write(&[1]);
    }

    fn pop(&self) -> Option<Job> {
        self.lock().jobs.pop_front()
    }

    fn drain_wake(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// The jobs left when the connection ends (called under the state lock, after leaving `conns`).
    fn close(&self) -> Vec<Job> {
        self.lock().jobs.drain(..).collect()
    }
}

struct ConnHandle {
    id: u64,
    /// Order in which connections said Hello; the last one is "the newest".
    join_seq: u64,
    ready: bool,
    queue: Arc<ConnQueue>,
}

#[derive(Default)]
struct State {
    workloads: BTreeMap<String, Entry>,
    /// Connections that said Hello, in join order.
    conns: Vec<ConnHandle>,
    next_generation: u64,
    next_join_seq: u64,
}

struct Shared {
    opts: ZdsOptions,
    state: Mutex<State>,
    on_event: EventFn,
    /// Read end of the stop socket: it turns readable (EOF) when the server drops the write end.
    stop_rx: UnixStream,
    open_conns: AtomicUsize,
    next_conn_id: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: ZdsEvent) {
        (self.on_event)(event);
    }
}

/// The running server (`Send + Sync`: share it in an `Arc`; `add`/`del` block the calling thread
/// until acked, so call them from the agent's worker threads, not from `on_event`).
///
/// Latency bound: a request waits behind the requests queued before it on its connection, each
/// bounded by `ack_timeout`. Dropping the server stops the threads, closes every connection and
/// removes the socket file (if it is still ours).
pub struct ZdsServer {
    shared: Arc<Shared>,
    path: PathBuf,
    /// (dev, ino) of the socket file we created.
    socket_id: (u64, u64),
    stop_tx: Option<UnixStream>,
    accept_thread: Option<JoinHandle<()>>,
}

impl ZdsServer {
    /// Listen at `path` (parent directory created 0755 if missing; a stale socket there is
    /// replaced, anything else at the path is an error). The socket is bound under a temporary
    /// name, made 0600 (only root may hand netns to ztunnel) and listening before it is renamed
    /// into place, so nobody can connect to a socket with a looser mode.
    pub fn start(path: &Path, opts: ZdsOptions, on_event: EventFn) -> Result<ZdsServer, ZdsError> {
        validate(&opts)?;
        let (listener, socket_id) = bind_socket(path)?;
        let (stop_tx, stop_rx) = UnixStream::pair()
            .map_err(|e| io_err("creating the ZDS server's stop socket".into(), e))?;
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(State::default()),
            on_event,
            stop_rx,
            open_conns: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            workers: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept_thread = std::thread::Builder::new()
            .name("zds-accept".into())
            .spawn(move || accept_loop(accept_shared, listener))
            .map_err(|e| io_err("spawning the ZDS accept thread".into(), e))?;
        info!(path = %path.display(), "ZDS server listening");
        Ok(ZdsServer {
            shared,
            path: path.to_owned(),
            socket_id,
            stop_tx: Some(stop_tx),
            accept_thread: Some(accept_thread),
        })
    }

    /// Register (or replace) the workload and send `AddWorkload` with a dup of `netns` to the
    /// newest connection, waiting for its ack. If that connection is still replaying its
    /// snapshot, the add is queued behind the snapshot (and the snapshot does not carry it).
    ///
    /// Fail closed: on any failure (no connection, nack, timeout, disconnect) the workload is
    /// **not** left registered, so no later snapshot hands it to ztunnel; the caller rolls the pod
    /// back. (If a newer connection joined while the add was in flight, its snapshot carried the
    /// workload; it then gets a best-effort `DelWorkload`.) A registration made meanwhile by a
    /// newer `add`/`register` of the same uid is left alone.
    pub fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: BorrowedFd<'_>,
    ) -> Result<(), ZdsError> {
        let bytes = encode_checked(uid, &WorkloadRequest::add(uid, &info))?;
        let fd = Arc::new(
            netns
                .try_clone_to_owned()
                .map_err(|e| io_err(format!("duplicating the netns fd of pod {uid}"), e))?,
        );
        let (tx, rx) = mpsc::sync_channel(1);
        let (generation, conn, join_seq) = {
            let mut st = self.shared.lock();
            let Some(target) = st.conns.last() else {
                return Err(ZdsError::NoConnection {
                    uid: uid.to_owned(),
                });
            };
            let (conn, join_seq, queue) = (target.id, target.join_seq, target.queue.clone());
            let generation = st.next_generation;
            st.next_generation += 1;
            st.workloads.insert(
                uid.to_owned(),
                Entry {
                    info,
                    netns: Some(fd.clone()),
                    generation,
                },
            );
            queue.push(Job {
                uid: uid.to_owned(),
                kind: "AddWorkload",
                bytes,
                fd: Some(fd),
                reply: Some(tx),
            });
            (generation, conn, join_seq)
        };
        let result = rx.recv().unwrap_or_else(|_| {
            Err(ZdsError::Disconnected {
                uid: uid.to_owned(),
                conn,
                reason: "connection thread ended without answering".into(),
            })
        });
        if result.is_err() {
            self.roll_back_add(uid, generation, join_seq);
        }
        result
    }

    fn roll_back_add(&self, uid: &str, generation: u64, join_seq: u64) {
        let mut st = self.shared.lock();
        if st.workloads.get(uid).map(|e| e.generation) != Some(generation) {
            return;
        }
        st.workloads.remove(uid);
        let bytes = WorkloadRequest::del(uid).encode_to_vec();
        for newer in st.conns.iter().filter(|c| c.join_seq > join_seq) {
            debug!(
                uid,
                conn = newer.id,
                "ZDS: withdrawing failed add from a newer connection's snapshot"
            );
            newer.queue.push(Job {
                uid: uid.to_owned(),
                kind: "DelWorkload",
                bytes: bytes.clone(),
                fd: None,
                reply: None,
            });
        }
    }

    /// Register without sending (agent restart: pods known, netns held or not) so the next
    /// snapshot carries it: as `AddWorkload` with the fd, or `KeepWorkload` without one.
    /// Connections that already said Hello (their snapshot is copied at that moment) are not
    /// told; use it before ztunnel connects, e.g. while rebuilding state after an agent restart.
    pub fn register(&self, uid: &str, info: WorkloadInfo, netns: Option<OwnedFd>) {
        let mut st = self.shared.lock();
        let generation = st.next_generation;
        st.next_generation += 1;
        st.workloads.insert(
            uid.to_owned(),
            Entry {
                info,
                netns: netns.map(Arc::new),
                generation,
            },
        );
    }

    /// Unregister and send `DelWorkload` to every connection (queued behind a snapshot in
    /// progress), waiting for each ack. Best effort: every connection is tried; failures are
    /// returned together as [`ZdsError::DelFailed`]. No connection at all is not an error.
    pub fn del(&self, uid: &str) -> Result<(), ZdsError> {
        let bytes = encode_checked(uid, &WorkloadRequest::del(uid))?;
        let waits: Vec<(u64, mpsc::Receiver<Result<(), ZdsError>>)> = {
            let mut st = self.shared.lock();
            st.workloads.remove(uid);
            st.conns
                .iter()
                .map(|c| {
                    let (tx, rx) = mpsc::sync_channel(1);
                    c.queue.push(Job {
                        uid: uid.to_owned(),
                        kind: "DelWorkload",
                        bytes: bytes.clone(),
                        fd: None,
                        reply: Some(tx),
                    });
                    (c.id, rx)
                })
                .collect()
        };
        let failures: Vec<(u64, String)> = waits
            .into_iter()
            .filter_map(|(conn, rx)| match rx.recv() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((conn, e.to_string())),
                Err(_) => Some((conn, "connection thread ended without answering".into())),
            })
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ZdsError::DelFailed {
                uid: uid.to_owned(),
                failures,
            })
        }
    }

    /// Connections that completed their snapshot.
    pub fn ready_connections(&self) -> usize {
        self.shared.lock().conns.iter().filter(|c| c.ready).count()
    }

    /// Registered workload uids, sorted.
    pub fn registered(&self) -> Vec<String> {
        self.shared.lock().workloads.keys().cloned().collect()
    }

    /// The socket path served.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ZdsServer {
    fn drop(&mut self) {
        // Closing the write end makes `stop_rx` readable for every poller.
        drop(self.stop_tx.take());
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let workers = std::mem::take(
            &mut *self
                .shared
                .workers
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for w in workers {
            let _ = w.join();
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.socket_id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "ZDS: could not remove the socket");
                }
            }
            Ok(_) => {
                debug!(path = %self.path.display(), "ZDS: socket path now belongs to someone else; left alone")
            }
            Err(_) => {}
        }
        info!(path = %self.path.display(), "ZDS server stopped");
    }
}

fn validate(opts: &ZdsOptions) -> Result<(), ZdsError> {
    if opts.ack_timeout.is_zero() {
        return Err(ZdsError::InvalidOptions {
            option: "ack_timeout",
            reason: "must be greater than zero",
        });
    }
    if opts.max_connections == 0 {
        return Err(ZdsError::InvalidOptions {
            option: "max_connections",
            reason: "must be at least 1",
        });
    }
    if opts.accepts_per_second == 0 {
        return Err(ZdsError::InvalidOptions {
            option: "accepts_per_second",
            reason: "must be at least 1",
        });
    }
    Ok(())
}

fn encode_checked(uid: &str, req: &WorkloadRequest) -> Result<Vec<u8>, ZdsError> {
    let bytes = req.encode_to_vec();
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(ZdsError::TooLarge {
            uid: uid.to_owned(),
            len: bytes.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    Ok(bytes)
}

fn bind_socket(path: &Path) -> Result<(UnixListener, (u64, u64)), ZdsError> {
    let shown = path.display();
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io_err(
            format!("ZDS socket path {shown}"),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "needs a parent directory and a file name",
            ),
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| {
                io_err(
                    format!("creating the ZDS socket directory {}", parent.display()),
                    e,
                )
            })?;
        // The umask may have narrowed the mode; ztunnel (root) needs only search permission, but
        // say exactly what we promise.
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err(format!("chmod 0755 {}", parent.display()), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(|e| io_err(format!("removing the stale ZDS socket {shown}"), e))?;
            info!(path = %shown, "ZDS: removed a stale socket");
        }
        Ok(_) => {
            return Err(io_err(
                format!("ZDS socket path {shown}"),
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; refusing to replace it",
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("inspecting the ZDS socket path {shown}"), e)),
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = parent.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let addr = UnixAddr::new(&tmp).map_err(|e| {
        io_err(
            format!(
                "ZDS socket temp path {} (too long for a unix socket?)",
                tmp.display()
            ),
            e,
        )
    })?;
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_err("creating a SOCK_SEQPACKET unix socket".into(), e))?;
    let cleanup_tmp = |e: ZdsError| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    bind(sock.as_raw_fd(), &addr).map_err(|e| {
        cleanup_tmp(io_err(
            format!("binding the ZDS socket at {}", tmp.display()),
            e,
        ))
    })?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| cleanup_tmp(io_err(format!("chmod 0600 {}", tmp.display()), e)))?;
    // Listen only after the chmod: until then a connect is refused, so the looser window is closed.
    listen(&sock, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| cleanup_tmp(io_err(format!("listening on {}", tmp.display()), e)))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| cleanup_tmp(io_err(format!("renaming {} to {shown}", tmp.display()), e)))?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| io_err(format!("inspecting the new ZDS socket {shown}"), e))?;
    // std's UnixListener only wraps the fd; accept(2) is the same for SOCK_SEQPACKET, and the
    // accepted fd keeps the listener's socket type.
    Ok((UnixListener::from(sock), (meta.dev(), meta.ino())))
}

/// poll(2) outcome.
enum Ready {
    Sock,
    Wake,
    Stop,
    TimedOut,
}

/// Wait until `sock` is readable (or hung up / in error), `wake` is readable, the server stops, or
/// `deadline` passes. `out` waits for writability instead of readability.
fn wait(
    sock: BorrowedFd<'_>,
    out: bool,
    wake: Option<&UnixStream>,
    stop: &UnixStream,
    deadline: Option<Instant>,
) -> Result<Ready, String> {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Ready::TimedOut);
                }
                // Round up so we do not spin on a sub-millisecond remainder.
                let ms = left.as_micros().div_ceil(1000);
                PollTimeout::try_from(ms.min(i32::MAX as u128)).unwrap_or(PollTimeout::MAX)
            }
        };
        let sock_events = if out {
            PollFlags::POLLOUT
        } else {
            PollFlags::POLLIN
        };
        let mut fds = vec![
            PollFd::new(sock, sock_events),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(w) = wake {
            fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let fired = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty())
        };
        if fired(1) {
            return Ok(Ready::Stop);
        }
        if fired(0) {
            return Ok(Ready::Sock);
        }
        if fired(2) {
            return Ok(Ready::Wake);
        }
    }
}

/// One datagram from the peer, or why the connection must go. `Ok(None)` = nothing there after all.
fn recv_datagram(sock: BorrowedFd<'_>) -> Result<Option<Vec<u8>>, String> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        // No control buffer: ZDS responses carry no ancillary data. If the peer attaches an fd the
        // kernel sets MSG_CTRUNC and closes it for us (nothing is installed in our fd table).
        let (n, flags) = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            None,
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(r) => (r.bytes, r.flags),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(format!("reading from the peer: {e}")),
        };
        if flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(format!(
                "peer sent a datagram over {MAX_MESSAGE_LEN} bytes (MSG_TRUNC)"
            ));
        }
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(
                "peer sent ancillary data such as an fd (MSG_CTRUNC); ZDS responses carry none"
                    .into(),
            );
        }
        if n == 0 {
            return Err("peer closed the connection (EOF)".into());
        }
        return Ok(buf.get(..n).map(<[u8]>::to_vec));
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let more = if bytes.len() > 16 { " …" } else { "" };
    format!("{} bytes: {}{more}", bytes.len(), shown.join(" "))
}

/// How a request ended without an ack.
enum ReqFail {
    /// No answer within the ack timeout (the connection must go).
    Timeout,
    /// The connection is unusable: the reason.
    Drop(String),
    Stopped,
}

fn send_datagram(
    shared: &Shared,
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
    deadline: Instant,
) -> Result<(), ReqFail> {
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw
        .as_ref()
        .map(|r| ControlMessage::ScmRights(r))
        .into_iter()
        .collect();
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(ReqFail::Drop(format!(
                    "short send: {n} of {} bytes",
                    bytes.len()
                )));
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => match wait(sock, true, None, &shared.stop_rx, Some(deadline)) {
                Ok(Ready::Sock | Ready::Wake) => continue,
                Ok(Ready::Stop) => return Err(ReqFail::Stopped),
                Ok(Ready::TimedOut) => return Err(ReqFail::Timeout),
                Err(e) => return Err(ReqFail::Drop(e)),
            },
            Err(e) => return Err(ReqFail::Drop(format!("sending to the peer: {e}"))),
        }
    }
}

/// Send one request and wait for its `WorkloadResponse`; `Ok(error)` where empty = ack.
fn request(
    shared: &Shared,
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<String, ReqFail> {
    let deadline = Instant::now() + shared.opts.ack_timeout;
    send_datagram(shared, sock, bytes, fd, deadline)?;
    loop {
        match wait(sock, false, None, &shared.stop_rx, Some(deadline)) {
            Ok(Ready::Sock | Ready::Wake) => {}
            Ok(Ready::Stop) => return Err(ReqFail::Stopped),
            Ok(Ready::TimedOut) => return Err(ReqFail::Timeout),
            Err(e) => return Err(ReqFail::Drop(e)),
        }
        let Some(msg) = recv_datagram(sock).map_err(ReqFail::Drop)? else {
            continue;
        };
        let resp = WorkloadResponse::decode(msg.as_slice()).map_err(|e| {
            ReqFail::Drop(format!(
                "undecodable WorkloadResponse ({}): {e}",
                hex_prefix(&msg)
            ))
        })?;
        return match resp.payload {
            Some(workload_response::Payload::Ack(ack)) => Ok(ack.error),
            None => Err(ReqFail::Drop(format!(
                "WorkloadResponse without an ack ({})",
                hex_prefix(&msg)
            ))),
        };
    }
}

fn accept_loop(shared: Arc<Shared>, listener: UnixListener) {
    let rate = f64::from(shared.opts.accepts_per_second);
    let mut tokens = rate;
    let mut last = Instant::now();
    loop {
        match wait(listener.as_fd(), false, None, &shared.stop_rx, None) {
            Ok(Ready::Stop) => return,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "ZDS: accept loop poll failed; stopping the accept loop");
                return;
            }
        }
        // Token bucket: refill, and if empty wait (pending peers stay in the backlog).
        let now = Instant::now();
        tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate);
        last = now;
        if tokens < 1.0 {
            let pause = Duration::from_secs_f64((1.0 - tokens) / rate);
            debug!(?pause, "ZDS: accept rate limit reached; pausing");
            if let Ok(Ready::Stop) = wait(
                shared.stop_rx.as_fd(),
                false,
                None,
                &shared.stop_rx,
                Some(now + pause),
            ) {
                return;
            }
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "ZDS: accept failed");
                if let Ok(Ready::Stop) = wait(
                    shared.stop_rx.as_fd(),
                    false,
                    None,
                    &shared.stop_rx,
                    Some(Instant::now() + Duration::from_millis(100)),
                ) {
                    return;
                }
                continue;
            }
        };
        tokens -= 1.0;
        let open = shared.open_conns.load(Ordering::SeqCst);
        if open >= shared.opts.max_connections {
            warn!(
                open,
                max = shared.opts.max_connections,
                "ZDS: refusing a connection: too many open connections"
            );
            continue;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            warn!(error = %e, "ZDS: refusing a connection: cannot make it non-blocking");
            continue;
        }
        let sock = OwnedFd::from(stream);
        let peer_pid = nix::sys::socket::getsockopt(&sock, sockopt::PeerCredentials)
            .ok()
            .map(|c| c.pid());
        let id = shared.next_conn_id.fetch_add(1, Ordering::SeqCst);
        let queue = match ConnQueue::new() {
            Ok(q) => Arc::new(q),
            Err(e) => {
                warn!(conn = id, error = %e, "ZDS: refusing a connection: cannot create its queue");
                continue;
            }
        };
        shared.open_conns.fetch_add(1, Ordering::SeqCst);
        let conn_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("zds-conn-{id}"))
            .spawn(move || serve_conn(conn_shared, id, peer_pid, sock, queue));
        match spawned {
            Ok(handle) => {
                let mut workers = shared.workers.lock().unwrap_or_else(|p| p.into_inner());
                workers.retain(|w| !w.is_finished());
                workers.push(handle);
            }
            Err(e) => {
                shared.open_conns.fetch_sub(1, Ordering::SeqCst);
                warn!(conn = id, error = %e, "ZDS: refusing a connection: cannot spawn its thread");
            }
        }
    }
}

/// How a connection's session ended.
enum End {
    Stopped,
    Dropped(String),
}

fn serve_conn(
    shared: Arc<Shared>,
    id: u64,
    peer_pid: Option<i32>,
    sock: OwnedFd,
    queue: Arc<ConnQueue>,
) {
    info!(conn = id, ?peer_pid, "ZDS: ztunnel connected");
    shared.emit(ZdsEvent::Connected { conn: id, peer_pid });
    let end = session(&shared, id, sock.as_fd(), &queue);
    let orphans = {
        let mut st = shared.lock();
        st.conns.retain(|c| c.id != id);
        queue.close()
    };
    drop(sock);
    let reason = match end {
        End::Stopped => "server stopped".to_owned(),
        End::Dropped(r) => r,
    };
    for job in orphans {
        finish(
            id,
            job,
            Err(ZdsError::Disconnected {
                uid: String::new(),
                conn: id,
                reason: reason.clone(),
            }),
        );
    }
    shared.open_conns.fetch_sub(1, Ordering::SeqCst);
    if reason == "server stopped" {
        info!(conn = id, "ZDS: connection closed: server stopped");
    } else {
        warn!(conn = id, reason = %reason, "ZDS: connection dropped");
    }
    shared.emit(ZdsEvent::Disconnected { conn: id, reason });
}

/// Answer a job's caller (or log the outcome of a fire-and-forget job).
fn finish(conn: u64, job: Job, result: Result<(), ZdsError>) {
    let result = result.map_err(|e| match e {
        // Orphaned jobs are failed without their uid in hand; fill it in.
        ZdsError::Disconnected { uid, conn, reason } if uid.is_empty() => ZdsError::Disconnected {
            uid: job.uid.clone(),
            conn,
            reason,
        },
        other => other,
    });
    match job.reply {
        Some(tx) => {
            let _ = tx.send(result);
        }
        None => match result {
            Ok(()) => debug!(conn, uid = %job.uid, kind = job.kind, "ZDS: acked"),
            Err(e) => {
                warn!(conn, uid = %job.uid, kind = job.kind, error = %e, "ZDS: request failed")
            }
        },
    }
}

fn session(shared: &Shared, id: u64, sock: BorrowedFd<'_>, queue: &Arc<ConnQueue>) -> End {
    // 1. Hello.
    let deadline = Instant::now() + shared.opts.ack_timeout;
    loop {
        match wait(sock, false, None, &shared.stop_rx, Some(deadline)) {
            Ok(Ready::Sock | Ready::Wake) => {}
            Ok(Ready::Stop) => return End::Stopped,
            Ok(Ready::TimedOut) => {
                return End::Dropped(format!(
                    "no ZdsHello within {:?} of connecting",
                    shared.opts.ack_timeout
                ));
            }
            Err(e) => return End::Dropped(e),
        }
        let msg = match recv_datagram(sock) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => return End::Dropped(format!("before ZdsHello: {e}")),
        };
        match ZdsHello::decode(msg.as_slice()) {
            Ok(h) if h.version == Version::V1 as i32 => break,
            Ok(h) => {
                return End::Dropped(format!(
                    "ZdsHello with unsupported version {} (only V1 = 1 is spoken)",
                    h.version
                ));
            }
            Err(e) => {
                return End::Dropped(format!("undecodable ZdsHello ({}): {e}", hex_prefix(&msg)));
            }
        }
    }

    // 2. Join (become the newest connection) and copy the registry, atomically with respect to
    //    add(): see the module docs.
    let snapshot: Vec<(String, WorkloadInfo, Option<Arc<OwnedFd>>)> = {
        let mut st = shared.lock();
        let join_seq = st.next_join_seq;
        st.next_join_seq += 1;
        st.conns.push(ConnHandle {
            id,
            join_seq,
            ready: false,
            queue: queue.clone(),
        });
        st.workloads
            .iter()
            .map(|(uid, e)| (uid.clone(), e.info.clone(), e.netns.clone()))
            .collect()
    };
    info!(
        conn = id,
        workloads = snapshot.len(),
        "ZDS: Hello V1; sending snapshot"
    );

    // 3. Snapshot, one acked request at a time.
    let mut nacked = Vec::new();
    for (uid, info, fd) in &snapshot {
        let (kind, req) = match fd {
            Some(_) => ("AddWorkload", WorkloadRequest::add(uid, info)),
            None => ("KeepWorkload", WorkloadRequest::keep(uid)),
        };
        let bytes = match encode_checked(uid, &req) {
            Ok(b) => b,
            Err(e) => {
                warn!(conn = id, uid = %uid, error = %e, "ZDS: snapshot entry not sent");
                nacked.push((uid.clone(), e.to_string()));
                continue;
            }
        };
        match request(shared, sock, &bytes, fd.as_deref().map(AsFd::as_fd)) {
            Ok(err) if err.is_empty() => {
                debug!(conn = id, uid = %uid, kind, "ZDS: snapshot entry acked")
            }
            Ok(err) => {
                warn!(conn = id, uid = %uid, kind, error = %err, "ZDS: ztunnel refused a snapshot entry");
                nacked.push((uid.clone(), err));
            }
            Err(ReqFail::Timeout) => {
                return End::Dropped(format!(
                    "no ack for snapshot {kind} of pod {uid} within {:?}",
                    shared.opts.ack_timeout
                ));
            }
            Err(ReqFail::Drop(r)) => {
                return End::Dropped(format!("during snapshot {kind} of pod {uid}: {r}"));
            }
            Err(ReqFail::Stopped) => return End::Stopped,
        }
    }
    let bytes = WorkloadRequest::snapshot_sent().encode_to_vec();
    match request(shared, sock, &bytes, None) {
        Ok(err) if err.is_empty() => {}
        Ok(err) => warn!(conn = id, error = %err, "ZDS: ztunnel nacked SnapshotSent"),
        Err(ReqFail::Timeout) => {
            return End::Dropped(format!(
                "no ack for SnapshotSent within {:?}",
                shared.opts.ack_timeout
            ));
        }
        Err(ReqFail::Drop(r)) => return End::Dropped(format!("during SnapshotSent: {r}")),
        Err(ReqFail::Stopped) => return End::Stopped,
    }
    {
        let mut st = shared.lock();
        if let Some(c) = st.conns.iter_mut().find(|c| c.id == id) {
            c.ready = true;
        }
    }
    info!(
        conn = id,
        workloads = snapshot.len(),
        nacked = nacked.len(),
        "ZDS: snapshot sent"
    );
    drop(snapshot);
    shared.emit(ZdsEvent::SnapshotSent { conn: id, nacked });

    // 4. Incremental requests; idle = watch the socket so a dead or misbehaving peer goes at once.
    loop {
        if let Some(job) = queue.pop() {
            let outcome = request(shared, sock, &job.bytes, job.fd.as_deref().map(AsFd::as_fd));
            let uid = job.uid.clone();
            match outcome {
                Ok(err) if err.is_empty() => {
                    debug!(conn = id, uid = %uid, kind = job.kind, "ZDS: acked");
                    finish(id, job, Ok(()));
                }
                Ok(reason) => finish(
                    id,
                    job,
                    Err(ZdsError::Nack {
                        uid,
                        conn: id,
                        reason,
                    }),
                ),
                Err(ReqFail::Timeout) => {
                    let kind = job.kind;
                    finish(
                        id,
                        job,
                        Err(ZdsError::Timeout {
                            uid: uid.clone(),
                            conn: id,
                            after: shared.opts.ack_timeout,
                        }),
                    );
                    return End::Dropped(format!(
                        "no ack for {kind} of pod {uid} within {:?}",
                        shared.opts.ack_timeout
                    ));
                }
                Err(ReqFail::Drop(reason)) => {
                    let kind = job.kind;
                    finish(
                        id,
                        job,
                        Err(ZdsError::Disconnected {
                            uid: uid.clone(),
                            conn: id,
                            reason: reason.clone(),
                        }),
                    );
                    return End::Dropped(format!("during {kind} of pod {uid}: {reason}"));
                }
                Err(ReqFail::Stopped) => {
                    finish(
                        id,
                        job,
                        Err(ZdsError::Disconnected {
                            uid,
                            conn: id,
                            reason: "server stopped".into(),
                        }),
                    );
                    return End::Stopped;
                }
            }
            continue;
        }
        match wait(sock, false, Some(&queue.wake_rx), &shared.stop_rx, None) {
            Ok(Ready::Wake) => queue.drain_wake(),
            Ok(Ready::Stop) => return End::Stopped,
            Ok(Ready::TimedOut) => {}
            Ok(Ready::Sock) => match recv_datagram(sock) {
                Ok(None) => {}
                Ok(Some(msg)) => {
                    let what = if matches!(ZdsHello::decode(msg.as_slice()), Ok(h) if h.version == Version::V1 as i32)
                    {
                        "a second ZdsHello"
                    } else if WorkloadResponse::decode(msg.as_slice()).is_ok() {
                        "a response"
                    } else {
                        "a message"
                    };
                    return End::Dropped(format!(
                        "unexpected {what} with no request outstanding ({})",
                        hex_prefix(&msg)
                    ));
                }
                Err(e) => return End::Dropped(e),
            },
            Err(e) => return End::Dropped(e),
        }
    }
}
