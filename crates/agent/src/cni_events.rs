//! The plugin event server: `POST /cmdadd` over HTTP/1.1 on the unix socket
//! `<cni_agent_run_dir>/pluginevent.sock` (Istio HEAD `cni-watcher.go`, spec §1.5 step 6 and
//! §7.3). The `meshcni` plugin hands every ambient pod to the agent here at ADD time and fails
//! the ADD unless the answer is 200, so a pod never starts uncaptured (fail closed; the runtime
//! retries the sandbox).
//!
//! This module owns the wire side: the pure body parser ([`parse_cmdadd`]), the request the
//! reconcile loop answers ([`CniAddRequest`], carried by `SourceUpdate::CniAdd`), and the
//! server ([`CniEventServer`]). The decision — is the pod known, selected, is there a ztunnel,
//! did the driver enroll it — is taken by the loop (`crate::ambient::Reconciler`), which owns
//! the workload view and the driver.
//!
//! Wire behaviour:
//!
//! | answer | when |
//! |---|---|
//! | 200 `captured <ns>/<name> ...` | the driver applied the pod's enrollment with the event's IPs, or it was already enrolled with them |
//! | 400 `<what is wrong with the body>` | not JSON of Istio's shape, `PodName`/`PodNamespace` missing, no IP, an IP or mask that does not parse |
//! | 500 `<reason>` | pod not in the agent's view after the lookup wait, not selected for ambient, no ztunnel Ready on the node, driver failure, enrollment loop not running or too slow |
//!
//! The loop answers within [`CniEventOptions::reply_timeout`] (default 4.5 s, under the
//! plugin's 5 s); the server answers 500 itself if it does not.
//!
//! **Socket permissions**: Istio makes the socket 0666. Here it is 0600 (owner = the agent's
//! user, root in a deployment): the CNI plugin runs as root, and any local process able to
//! post events could have arbitrary IPs redirected to ztunnel. The socket is bound under a
//! temporary name, chmod-ed, then renamed into place, so it is never reachable with looser
//! permissions.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde::Deserialize;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::enroll::canonical_ips;
pub use crate::metrics::CniEventMetrics;
use crate::metrics::EventLabels;
pub use crate::seam::{
    CmdAdd, CniAddRequest, CniEventOptions, CniOutcome, CniRejection, RejectKind, ReplySlot,
};
use crate::workloads::SourceUpdate;

/// File name of the socket in the agent run dir (what the plugin's `agent_event_socket()`
/// uses by default).
pub const SOCKET_NAME: &str = "pluginevent.sock";

/// Largest accepted request body. An event is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Bounds on the server's connections, so that slow or idle clients cannot hold file
/// descriptors or keep real `/cmdadd`s out.
///
/// At most `max_connections` are served at once. When a new client connects at the limit,
/// the oldest connection that has not yet delivered its request head is closed to make room
/// (a slow client is evicted, a real plugin request — sent in one write — is not); if every
/// connection is a request in progress, the new client waits in the listen backlog until one
/// ends. A client must send its request head within `header_timeout` of being accepted and
/// its body within `body_timeout` after that (else 408), at most `max_body_bytes` (else 413).
/// One request per connection (no keep-alive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 64,
            header_timeout: Duration::from_secs(3),
            body_timeout: Duration::from_secs(3),
            max_body_bytes: MAX_BODY_BYTES,
        }
    }
}

/// `<run_dir>/pluginevent.sock`.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

// ---- the event body -------------------------------------------------------------------

/// Why a body was refused (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEvent {
    #[error("body is not a cmdadd event (JSON object with Netns, PodName, PodNamespace, IPs): {0}")]
    NotJson(String),
    #[error("field {0} is missing or empty")]
    Missing(&'static str),
    #[error("IPs is empty: the event names no pod address to capture")]
    NoIps,
    #[error("IPs[{index}].Address.IP {value:?} is not an IP address")]
    BadIp { index: usize, value: String },
    #[error("IPs[{index}].Address.Mask {value:?} {reason}")]
    BadMask {
        index: usize,
        value: String,
        reason: String,
    },
    #[error("IPs[{index}].Gateway {value:?} is not an IP address")]
    BadGateway { index: usize, value: String },
    #[error("PodUID {0:?} is not a Kubernetes UID (letters, digits and '-' only)")]
    BadUid(String),
}

// Go's `encoding/json` shape of Istio's `CNIPluginAddEvent`. Every field optional here so a
// missing one is reported by name rather than by serde's generic message.
#[derive(Debug, Deserialize)]
struct WireEvent {
    #[serde(rename = "Netns")]
    netns: Option<String>,
    #[serde(rename = "PodName")]
    pod_name: Option<String>,
    #[serde(rename = "PodNamespace")]
    pod_namespace: Option<String>,
    #[serde(rename = "IPs")]
    ips: Option<Vec<WireIp>>,
    /// meshcni's plugin adds the pod UID (from `K8S_POD_UID`); Istio's does not send it.
    #[serde(rename = "PodUID", default)]
    pod_uid: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireIp {
    // `*int` in Go; unused by the agent (the reference ignores it too).
    #[serde(rename = "Interface")]
    _interface: Option<serde_json::Value>,
    #[serde(rename = "Address")]
    address: Option<WireNet>,
    #[serde(rename = "Gateway")]
    gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireNet {
    #[serde(rename = "IP")]
    ip: Option<String>,
    /// `net.IPMask` = bytes = base64 in Go's JSON.
    #[serde(rename = "Mask")]
    mask: Option<String>,
}

/// Check a base64 `net.IPMask` against the address family: 4 bytes for IPv4 (16 bytes whose
/// first 12 are 0xff also, Go's 16-byte form), 16 for IPv6, contiguous ones.
fn check_mask(index: usize, ip: IpAddr, b64: &str) -> Result<(), BadEvent> {
    let bad = |reason: String| BadEvent::BadMask {
        index,
        value: b64.to_string(),
        reason,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| bad(format!("is not base64: {e}")))?;
    let bytes: &[u8] = match (ip, bytes.len()) {
        (IpAddr::V4(_), 4) | (IpAddr::V6(_), 16) => &bytes,
        (IpAddr::V4(_), 16) if bytes[..12].iter().all(|b| *b == 0xff) => &bytes[12..],
        (_, n) => {
            return Err(bad(format!(
                "has {n} bytes, which is not a netmask for {ip} ({} bytes expected)",
                if ip.is_ipv4() { 4 } else { 16 }
            )));
        }
    };
    // Left-align the mask in 128 bits: contiguous ⇔ leading ones + trailing zeros cover it.
    let bits: u128 = bytes
        .iter()
        .fold(0u128, |acc, b| (acc << 8) | u128::from(*b));
    let v = bits << (128 - bytes.len() * 8);
    if v.leading_ones() + v.trailing_zeros() < 128 {
        return Err(bad("is not a contiguous netmask".into()));
    }
    Ok(())
}

/// Parse and validate a `POST /cmdadd` body. Pure.
pub fn parse_cmdadd(body: &[u8]) -> Result<CmdAdd, BadEvent> {
    let w: WireEvent =
        serde_json::from_slice(body).map_err(|e| BadEvent::NotJson(e.to_string()))?;
    let name = w
        .pod_name
        .filter(|s| !s.is_empty())
        .ok_or(BadEvent::Missing("PodName"))?;
    let namespace = w
        .pod_namespace
        .filter(|s| !s.is_empty())
        .ok_or(BadEvent::Missing("PodNamespace"))?;
    let wire_ips = w.ips.unwrap_or_default();
    if wire_ips.is_empty() {
        return Err(BadEvent::NoIps);
    }
    let mut ips = Vec::with_capacity(wire_ips.len());
    for (index, wip) in wire_ips.into_iter().enumerate() {
        let addr = wip.address.ok_or(BadEvent::Missing("IPs[].Address"))?;
        let raw = addr.ip.unwrap_or_default();
        let ip = raw
            .trim()
            .parse::<IpAddr>()
            .map_err(|_| BadEvent::BadIp {
                index,
                value: raw.clone(),
            })?
            .to_canonical();
        if let Some(mask) = addr.mask.as_deref() {
            check_mask(index, ip, mask)?;
        }
        if let Some(gw) = wip.gateway.as_deref().filter(|g| !g.is_empty()) {
            gw.parse::<IpAddr>().map_err(|_| BadEvent::BadGateway {
                index,
                value: gw.to_string(),
            })?;
        }
        ips.push(ip);
    }
    let uid = w.pod_uid.filter(|u| !u.is_empty());
    if let Some(u) = uid.as_deref().filter(|u| !crate::workloads::valid_uid(u)) {
        return Err(BadEvent::BadUid(u.to_string()));
    }
    Ok(CmdAdd {
        netns: w.netns.unwrap_or_default(),
        namespace,
        name,
        ips: canonical_ips(ips),
        uid,
    })
}

// ---- the request the loop answers -------------------------------------------------------

// ---- the server ---------------------------------------------------------------------------

/// Where the server sends requests.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The reconcile loop's channel (`AmbientLoop::sender`).
    Loop(Sender<SourceUpdate>),
    /// Ambient enrollment could not start; every request is refused with this reason.
    Unavailable(String),
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum CniEventError {
    #[error("creating run dir {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("binding the plugin event socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct ServerState {
    backend: Backend,
    options: CniEventOptions,
    metrics: CniEventMetrics,
    limits: ConnectionLimits,
}

impl ServerState {
    fn count(&self, result: &'static str, started: Instant) {
        self.metrics
            .events
            .get_or_create(&EventLabels { result })
            .inc();
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
    }

    async fn submit(&self, event: CmdAdd) -> CniOutcome {
        let tx = match &self.backend {
            Backend::Loop(tx) => tx,
            Backend::Unavailable(reason) => {
                return Err(CniRejection::new(
                    RejectKind::Unavailable,
                    format!("ambient enrollment is not running on this node: {reason}"),
                ));
            }
        };
        let (req, rx) = CniAddRequest::new(event, &self.options);
        if tx.send(SourceUpdate::CniAdd(req)).is_err() {
            return Err(CniRejection::new(
                RejectKind::Unavailable,
                "the ambient enrollment loop is not running",
            ));
        }
        match tokio::time::timeout(self.options.reply_timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(CniRejection::new(
                RejectKind::Unavailable,
                "the ambient enrollment loop stopped before answering",
            )),
            Err(_) => Err(CniRejection::new(
                RejectKind::Timeout,
                format!(
                    "the ambient enrollment loop did not answer within {} ms",
                    self.options.reply_timeout.as_millis()
                ),
            )),
        }
    }
}

async fn cmdadd(State(s): State<ServerState>, req: axum::extract::Request) -> Response {
    let started = Instant::now();
    let body = tokio::time::timeout(
        s.limits.body_timeout,
        axum::body::to_bytes(req.into_body(), s.limits.max_body_bytes),
    )
    .await;
    let body: Bytes = match body {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            s.count("bad_request", started);
            warn!(error = %e, "refused a cmdadd body");
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body unreadable or larger than {} bytes: {e}\n",
                    s.limits.max_body_bytes
                ),
            )
                .into_response();
        }
        Err(_) => {
            s.count("bad_request", started);
            warn!("a cmdadd body did not arrive in time");
            return (
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} ms\n",
                    s.limits.body_timeout.as_millis()
                ),
            )
                .into_response();
        }
    };
    let event = match parse_cmdadd(&body) {
        Ok(e) => e,
        Err(e) => {
            s.count("bad_request", started);
            warn!(error = %e, "refused a malformed cmdadd event");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    let key = event.key();
    let ips = event.ips.clone();
    match s.submit(event).await {
        Ok(()) => {
            s.count("captured", started);
            info!(pod = %key, ?ips, ms = started.elapsed().as_millis() as u64, "cmdadd: pod captured");
            let ips: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
            (
                StatusCode::OK,
                format!("captured {key} ({})\n", ips.join(",")),
            )
                .into_response()
        }
        Err(r) => {
            s.count(r.kind.label(), started);
            warn!(pod = %key, result = r.kind.label(), reason = %r, "cmdadd refused");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{r}\n")).into_response()
        }
    }
}

/// The router (exposed for tests that want to drive it without a socket).
pub fn router(backend: Backend, options: CniEventOptions, metrics: CniEventMetrics) -> Router {
    router_with_limits(backend, options, metrics, ConnectionLimits::default())
}

fn router_with_limits(
    backend: Backend,
    options: CniEventOptions,
    metrics: CniEventMetrics,
    limits: ConnectionLimits,
) -> Router {
    Router::new()
        .route("/cmdadd", post(cmdadd))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(ServerState {
            backend,
            options,
            metrics,
            limits,
        })
}

/// Serve `app` on `listener` within `limits` (see [`ConnectionLimits`]) until `stopped`;
/// then wait for the connections in progress.
async fn serve_bounded(
    listener: tokio::net::UnixListener,
    app: Router,
    limits: ConnectionLimits,
    lifetime: Duration,
    open: Arc<std::sync::atomic::AtomicUsize>,
    mut stopped: oneshot::Receiver<()>,
) {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::task::{Id, JoinSet};
    let max = limits.max_connections.max(1);
    let mut conns: JoinSet<()> = JoinSet::new();
    // Live connections in accept order: task id → (accept order, head delivered, abort).
    let mut live: BTreeMap<Id, (u64, Arc<AtomicBool>, tokio::task::AbortHandle)> = BTreeMap::new();
    let mut order = 0u64;
    let mut evicted = 0u64;
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE/ENFILE: back off instead of spinning.
                    warn!(error = %e, "accepting a plugin event connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while let Some(done) = conns.try_join_next_with_id() {
            live.remove(&done.map_or_else(|e| e.id(), |(id, ())| id));
        }
        while live.len() >= max {
            let slow = live
                .iter()
                .filter(|(_, (_, head, _))| !head.load(Ordering::SeqCst))
                .min_by_key(|(_, (n, _, _))| *n)
                .map(|(id, (_, _, abort))| (*id, abort.clone()));
            if let Some((id, abort)) = slow {
                abort.abort();
                live.remove(&id);
                // Wait until it is gone (its socket closed) before taking a new one.
                while let Some(done) = conns.join_next_with_id().await {
                    let gone = done.map_or_else(|e| e.id(), |(id, ())| id);
                    live.remove(&gone);
                    if gone == id {
                        break;
                    }
                }
                evicted += 1;
                if evicted.is_power_of_two() {
                    warn!(
                        evicted,
                        max_connections = max,
                        "plugin event socket full: closed the oldest connection that had not sent its request"
                    );
                }
                break;
            }
            // Every connection is a request in progress: wait for one to end.
            match conns.join_next_with_id().await {
                Some(done) => {
                    live.remove(&done.map_or_else(|e| e.id(), |(id, ())| id));
                }
                None => live.clear(),
            }
        }
        let head = Arc::new(AtomicBool::new(false));
        let h2 = head.clone();
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
                h2.store(true, Ordering::SeqCst);
                tower::ServiceExt::oneshot(app.clone(), req)
            });
        let open2 = open.clone();
        let abort = conns.spawn(async move {
            // Counted while the connection lives, also when it is evicted (aborted).
            struct Open(Arc<std::sync::atomic::AtomicUsize>);
            impl Drop for Open {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            open2.fetch_add(1, Ordering::SeqCst);
            let _open = Open(open2);
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false);
            let conn = b.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(lifetime, conn).await;
        });
        order += 1;
        live.insert(abort.id(), (order, head, abort));
    }
    while conns.join_next().await.is_some() {}
}

/// A running server. Dropping it (or [`CniEventServer::shutdown`]) stops it and removes the
/// socket file, so the plugin's `STATUS` and ADD see at once that nobody listens.
pub struct CniEventServer {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for CniEventServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CniEventServer")
            .field("path", &self.path)
            .finish()
    }
}

/// Bind `path` with mode 0600: bind a temporary name next to it, chmod, rename into place
/// (replacing a stale socket of a previous agent; never a non-socket file).
fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, CniEventError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind_err = |source| CniEventError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(m) = std::fs::symlink_metadata(path)
        && !m.file_type().is_socket()
    {
        return Err(CniEventError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp).map_err(bind_err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(bind_err(e));
    }
    Ok(listener)
}

/// Remove the socket file at `path` if it is a socket (agent exit, uninstall).
pub fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

impl CniEventServer {
    /// Create `run_dir` if needed, bind `<run_dir>/pluginevent.sock` and serve on the current
    /// tokio runtime.
    pub fn start(
        run_dir: &Path,
        backend: Backend,
        options: CniEventOptions,
        metrics: CniEventMetrics,
    ) -> Result<CniEventServer, CniEventError> {
        Self::start_with_limits(
            run_dir,
            backend,
            options,
            metrics,
            ConnectionLimits::default(),
        )
    }

    /// [`CniEventServer::start`] with explicit connection limits.
    pub fn start_with_limits(
        run_dir: &Path,
        backend: Backend,
        options: CniEventOptions,
        metrics: CniEventMetrics,
        limits: ConnectionLimits,
    ) -> Result<CniEventServer, CniEventError> {
        std::fs::create_dir_all(run_dir).map_err(|source| CniEventError::RunDir {
            path: run_dir.to_path_buf(),
            source,
        })?;
        let path = socket_path(run_dir);
        let listener = bind_socket(&path)?;
        // A connection lives at most this long: head, body, the loop's answer, a margin.
        let lifetime = limits.header_timeout
            + limits.body_timeout
            + options.reply_timeout
            + Duration::from_secs(1);
        let app = router_with_limits(backend, options, metrics, limits);
        let (stop, stopped) = oneshot::channel::<()>();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(serve_bounded(
            listener,
            app,
            limits,
            lifetime,
            open.clone(),
            stopped,
        ));
        info!(socket = %path.display(), max_connections = limits.max_connections, "serving plugin events (POST /cmdadd)");
        Ok(CniEventServer {
            path,
            stop: Some(stop),
            task: Some(task),
            open,
        })
    }

    /// Connections being served right now (at most `ConnectionLimits::max_connections`).
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, remove the socket file, and wait (up to `grace`) for requests in
    /// flight to be answered; the rest are cut (their ADD fails and is retried).
    pub async fn shutdown(mut self, grace: Duration) {
        remove_socket(&self.path);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let abort = t.abort_handle();
            if tokio::time::timeout(grace, t).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for CniEventServer {
    fn drop(&mut self) {
        remove_socket(&self.path);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"Netns":"/var/run/netns/cni-1","PodName":"p","PodNamespace":"ns","IPs":[{"Interface":0,"Address":{"IP":"10.0.0.2","Mask":"////AA=="},"Gateway":"10.0.0.1"}]}"#;

    #[test]
    fn parses_istio_shape() {
        let e = parse_cmdadd(GOOD.as_bytes()).expect("valid");
        assert_eq!(
            e,
            CmdAdd {
                netns: "/var/run/netns/cni-1".into(),
                namespace: "ns".into(),
                name: "p".into(),
                ips: vec!["10.0.0.2".parse().expect("ip")],
                uid: None,
            }
        );
    }

    #[test]
    fn meshcni_sends_the_pod_uid() {
        let body = GOOD.replace(r#""IPs""#, r#""PodUID":"u-1","IPs""#);
        assert_eq!(
            parse_cmdadd(body.as_bytes()).expect("valid").uid.as_deref(),
            Some("u-1")
        );
    }

    #[test]
    fn dual_stack_null_fields_and_mapped_v4() {
        let body = r#"{"Netns":"","PodName":"p","PodNamespace":"ns","IPs":[
            {"Interface":null,"Address":{"IP":"fd00::5","Mask":"/////////////////////w=="},"Gateway":null},
            {"Address":{"IP":"::ffff:10.0.0.9","Mask":"/////////////////////w=="}},
            {"Address":{"IP":"10.0.0.9","Mask":"/////////////////wAAAA=="}}]}"#;
        let e = parse_cmdadd(body.as_bytes()).expect("valid");
        assert_eq!(e.netns, "");
        assert_eq!(
            e.ips,
            vec![
                "10.0.0.9".parse::<IpAddr>().expect("ip"),
                "fd00::5".parse().expect("ip")
            ]
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("not json", "body is not a cmdadd event"),
            (
                r#"{"PodNamespace":"ns","IPs":[]}"#,
                "field PodName is missing",
            ),
            (
                r#"{"PodName":"p","PodNamespace":"","IPs":[]}"#,
                "field PodNamespace",
            ),
            (
                r#"{"PodName":"p","PodNamespace":"ns","IPs":[]}"#,
                "IPs is empty",
            ),
            (r#"{"PodName":"p","PodNamespace":"ns"}"#, "IPs is empty"),
            (
                r#"{"PodName":"p","PodNamespace":"ns","IPs":[{"Address":{"IP":"10.0.0.300"}}]}"#,
                r#"IPs[0].Address.IP "10.0.0.300" is not an IP address"#,
            ),
            (
                r#"{"PodName":"p","PodNamespace":"ns","IPs":[{"Address":{"IP":"10.0.0.3","Mask":"!!"}}]}"#,
                "is not base64",
            ),
            (
                r#"{"PodName":"p","PodNamespace":"ns","IPs":[{"Address":{"IP":"10.0.0.3","Mask":"//8="}}]}"#,
                "has 2 bytes, which is not a netmask for 10.0.0.3",
            ),
            (
                r#"{"PodName":"p","PodNamespace":"ns","IPs":[{"Address":{"IP":"10.0.0.3","Mask":"/wD/AA=="}}]}"#,
                "is not a contiguous netmask",
            ),
            (
                r#"{"PodName":"p","PodNamespace":"ns","IPs":[{"Address":{"IP":"10.0.0.3"},"Gateway":"x"}]}"#,
                r#"IPs[0].Gateway "x""#,
            ),
            (
                r#"{"PodName":"p","PodNamespace":"ns","IPs":[{"Interface":0}]}"#,
                "IPs[].Address is missing",
            ),
            (
                r#"{"PodName":"p","PodNamespace":"ns","PodUID":"a\nb","IPs":[{"Address":{"IP":"10.0.0.3"}}]}"#,
                r#"PodUID "a\nb" is not a Kubernetes UID"#,
            ),
        ];
        for (body, want) in cases {
            let err = parse_cmdadd(body.as_bytes()).expect_err(body);
            assert!(err.to_string().contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn masks() {
        let ip4: IpAddr = "10.0.0.1".parse().expect("ip");
        let ip6: IpAddr = "fd00::1".parse().expect("ip");
        assert!(check_mask(0, ip4, "AAAAAA==").is_ok(), "/0");
        assert!(check_mask(0, ip4, "/////w==").is_ok(), "/32");
        assert!(check_mask(0, ip4, "///+AA==").is_ok(), "/23");
        assert!(
            check_mask(0, ip6, "////////////////AAAAAA==").is_ok(),
            "/96"
        );
        assert!(check_mask(0, ip6, "/////w==").is_err(), "v4 mask on v6");
        assert!(check_mask(0, ip4, "AP///w==").is_err(), "leading zeros");
    }

    #[test]
    fn reply_slot_answers_once() {
        let (slot, mut rx) = ReplySlot::new();
        let copy = slot.clone();
        assert_eq!(slot, copy);
        assert!(!slot.is_closed());
        assert!(slot.send(Ok(())));
        assert!(!copy.send(Ok(())), "second answer is dropped");
        assert!(slot.is_closed());
        assert_eq!(rx.try_recv().expect("answered"), Ok(()));
        let (slot, rx) = ReplySlot::new();
        drop(rx);
        assert!(slot.is_closed(), "receiver gone");
    }
}
