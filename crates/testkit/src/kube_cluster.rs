//! A stateful in-process fake API server for list + watch of pods and namespaces (plain
//! HTTP on `127.0.0.1`), for tests of the node agent's informers (kube-rs `watcher`).
//!
//! Tests change the cluster with [`FakeCluster::apply_pod`], [`FakeCluster::delete_pod`],
//! [`FakeCluster::apply_namespace`], ...; every change gets the next resourceVersion and is
//! streamed to open watches as `ADDED`/`MODIFIED`/`DELETED`. [`FakeCluster::compact`] makes all
//! versions seen so far too old (open watches get an `ERROR` 410 event, new watches from an old
//! version too), [`FakeCluster::close_watches`] ends open streams as a server timeout would.
//! Supported query parameters: `watch` (`1`/`true`), `resourceVersion`, `timeoutSeconds`, and
//! `fieldSelector=spec.nodeName=<node>` on pods; others (`limit`, `allowWatchBookmarks`) are
//! accepted and recorded (lists are answered in one page); writes of the repair controller:
//! `POST /api/v1/namespaces/<ns>/events` (stored, [`FakeCluster::events`]),
//! `PATCH /api/v1/namespaces/<ns>/pods/<name>` (merge patch of `metadata.labels`, streamed as
//! `MODIFIED`), `DELETE /api/v1/namespaces/<ns>/pods/<name>` (honours a `preconditions.uid`,
//! streamed as `DELETED`); a watch with
//! `allowWatchBookmarks=true` that reaches its `timeoutSeconds` ends with a `BOOKMARK` of the
//! current version, as the API server's does. Responses use chunked encoding like the real
//! server. Std threads only.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Which collection an object belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pod,
    Namespace,
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    typ: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// Versions below this are compacted away.
    oldest: u64,
    pods: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    log: Vec<Change>,
    /// Bumped by `close_watches`/`compact` so open streams notice.
    generation: u64,
    /// Requests seen, as `METHOD path?query`.
    requests: Vec<String>,
    /// The `Authorization` header of each request in `requests` (empty if none).
    authorizations: Vec<String>,
    /// While > 0, list requests are answered 500 and this is decremented.
    fail_lists: u32,
    /// Events POSTed, in order.
    events: Vec<Value>,
    /// While true, every connection is closed without an answer (`set_unreachable`).
    unreachable: bool,
    /// Connections refused that way.
    refused: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running fake; stops (and ends all streams) when dropped.
pub struct FakeCluster {
    /// The listener (a clone), shut down on drop: wakes the accept loop even when the
    /// listener lives in another netns than the thread that drops it (a connect would not
    /// reach it).
    listener: TcpListener,
    addr: SocketAddr,
    url: String,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl FakeCluster {
    /// Start on `127.0.0.1:<ephemeral>` with no objects.
    pub fn start() -> io::Result<FakeCluster> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let wake = listener.try_clone()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                oldest: 0,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let accept_thread = std::thread::Builder::new()
            .name("fake-cluster".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s2.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    {
                        let mut st = s2.lock();
                        if st.unreachable {
                            st.refused += 1;
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            continue;
                        }
                    }
                    let s3 = s2.clone();
                    let _ = std::thread::Builder::new()
                        .name("fake-cluster-conn".into())
                        .spawn(move || {
                            let _ = serve(stream, &s3);
                        });
                }
            })?;
        Ok(FakeCluster {
            listener: wake,
            addr,
            url: format!("http://{addr}"),
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// Base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig pointing at this server (token auth, ignored by the fake).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nclusters:\n- cluster:\n    server: {}\n  name: local\ncontexts:\n- context:\n    cluster: local\n    user: u\n  name: c\ncurrent-context: c\nkind: Config\nusers:\n- name: u\n  user:\n    token: t\n",
            self.url
        )
    }

    /// Create or replace a pod (API JSON; `metadata.namespace`/`name` identify it). Returns
    /// the resourceVersion assigned.
    pub fn apply_pod(&self, pod: Value) -> u64 {
        self.apply(Kind::Pod, pod)
    }

    /// Delete a pod; no-op (returns `None`) if absent.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<u64> {
        self.delete(Kind::Pod, &format!("{namespace}/{name}"))
    }

    /// Create or replace a namespace.
    pub fn apply_namespace(&self, ns: Value) -> u64 {
        self.apply(Kind::Namespace, ns)
    }

    /// Delete a namespace.
    pub fn delete_namespace(&self, name: &str) -> Option<u64> {
        self.delete(Kind::Namespace, name)
    }

    /// Forget all history: every version handed out so far becomes "too old" (410), and
    /// open watches receive an `ERROR` 410 event.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.rv += 1;
        st.oldest = st.rv;
        st.log.clear();
        st.generation += 1;
        self.shared.changed.notify_all();
    }

    /// End every open watch stream normally (as the server's `timeoutSeconds` would).
    pub fn close_watches(&self) {
        let mut st = self.shared.lock();
        st.generation += 1;
        self.shared.changed.notify_all();
    }

    /// An outage as the agent sees it (`true`): open watch streams end and every new
    /// connection is closed before a byte is answered, until `set_unreachable(false)`. The
    /// cluster's state keeps changing meanwhile (`apply_pod`, `delete_pod`, …), as a real API
    /// server's would behind a broken network path.
    pub fn set_unreachable(&self, down: bool) {
        let mut st = self.shared.lock();
        st.unreachable = down;
        st.generation += 1;
        self.shared.changed.notify_all();
    }

    /// Connections closed unanswered by [`FakeCluster::set_unreachable`] so far.
    pub fn refused_connections(&self) -> u64 {
        self.shared.lock().refused
    }

    /// Answer the next `n` list requests with 500.
    pub fn fail_next_lists(&self, n: u32) {
        self.shared.lock().fail_lists = n;
    }

    /// Requests received so far (`GET /path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// The `Authorization` header of every request so far, in order (empty string if absent).
    pub fn authorizations(&self) -> Vec<String> {
        self.shared.lock().authorizations.clone()
    }

    /// Number of list (non-watch) requests for `path` so far.
    pub fn list_count(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                let p = r.trim_start_matches("GET ");
                (p == path || p.starts_with(&format!("{path}?")))
                    && !p.contains("watch=1")
                    && !p.contains("watch=true")
            })
            .count()
    }

    /// Events POSTed so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// The stored pod, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .pods
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    fn apply(&self, kind: Kind, object: Value) -> u64 {
        apply_locked(&self.shared, kind, object)
    }
}

fn apply_locked(shared: &Shared, kind: Kind, mut object: Value) -> u64 {
    {
        let mut st = shared.lock();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = object_key(&object);
        let map = match kind {
            Kind::Pod => &mut st.pods,
            Kind::Namespace => &mut st.namespaces,
        };
        let typ = if map.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.log.push(Change {
            rv,
            kind,
            typ,
            object,
        });
        shared.changed.notify_all();
        rv
    }
}

impl FakeCluster {
    fn delete(&self, kind: Kind, key: &str) -> Option<u64> {
        delete_locked(&self.shared, kind, key)
    }
}

fn delete_locked(shared: &Shared, kind: Kind, key: &str) -> Option<u64> {
    {
        let mut st = shared.lock();
        let map = match kind {
            Kind::Pod => &mut st.pods,
            Kind::Namespace => &mut st.namespaces,
        };
        let mut object = map.remove(key)?;
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.log.push(Change {
            rv,
            kind,
            typ: "DELETED",
            object,
        });
        shared.changed.notify_all();
        Some(rv)
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        let shut = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        if shut.is_err() {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

struct Query {
    watch: bool,
    resource_version: Option<u64>,
    timeout: Duration,
    node: Option<String>,
    bookmarks: bool,
}

fn parse_query(q: &str) -> Query {
    let mut out = Query {
        watch: false,
        resource_version: None,
        timeout: Duration::from_secs(300),
        node: None,
        bookmarks: false,
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "watch" => out.watch = v == "1" || v == "true",
            "allowWatchBookmarks" => out.bookmarks = v == "true",
            "resourceVersion" => out.resource_version = v.parse().ok(),
            "timeoutSeconds" => {
                out.timeout = Duration::from_secs(v.parse().unwrap_or(300));
            }
            "fieldSelector" => {
                out.node = v.strip_prefix("spec.nodeName=").map(str::to_string);
            }
            _ => {}
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches(kind: Kind, object: &Value, want: Kind, node: Option<&str>) -> bool {
    kind == want
        && match (want, node) {
            (Kind::Pod, Some(n)) => object["spec"]["nodeName"].as_str() == Some(n),
            _ => true,
        }
}

fn serve(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut it = line.split_whitespace();
    let method = it.next().unwrap_or_default().to_string();
    let target = it.next().unwrap_or_default().to_string();
    let mut authorization = String::new();
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.trim().eq_ignore_ascii_case("authorization") {
                authorization = v.trim().to_string();
            } else if n.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length.min(1 << 20)];
    std::io::Read::read_exact(&mut reader, &mut body)?;
    let mut stream = reader.into_inner();
    {
        let mut st = shared.lock();
        st.requests.push(format!("{method} {target}"));
        st.authorizations.push(authorization);
    }
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    if method != "GET" {
        let (status, answer) = write_request(shared, &method, path, &body);
        return write_full(&mut stream, status, &answer);
    }
    let q = parse_query(query);
    let kind = match path {
        "/api/v1/pods" => Kind::Pod,
        "/api/v1/namespaces" => Kind::Namespace,
        _ => {
            return write_full(
                &mut stream,
                404,
                &status_json(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
    };
    if !q.watch {
        let body = {
            let mut st = shared.lock();
            if st.fail_lists > 0 {
                st.fail_lists -= 1;
                None
            } else {
                let map = match kind {
                    Kind::Pod => &st.pods,
                    Kind::Namespace => &st.namespaces,
                };
                let items: Vec<Value> = map
                    .values()
                    .filter(|o| matches(kind, o, kind, q.node.as_deref()))
                    .cloned()
                    .collect();
                let list_kind = match kind {
                    Kind::Pod => "PodList",
                    Kind::Namespace => "NamespaceList",
                };
                Some(
                    json!({"kind": list_kind, "apiVersion": "v1",
                           "metadata": {"resourceVersion": st.rv.to_string()},
                           "items": items})
                    .to_string(),
                )
            }
        };
        return match body {
            Some(b) => write_full(&mut stream, 200, &b),
            None => write_full(
                &mut stream,
                500,
                &status_json(500, "InternalError", "injected list failure"),
            ),
        };
    }

    // Watch.
    let from = q.resource_version.unwrap_or(0);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes())?;
    let deadline = Instant::now() + q.timeout;
    let mut sent_up_to = from;
    let mut st = shared.lock();
    if from < st.oldest {
        drop(st);
        write_chunk(&mut stream, &expired_event(from))?;
        return finish(&mut stream);
    }
    let generation = st.generation;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if st.generation != generation {
            let expired = sent_up_to < st.oldest;
            if st.unreachable {
                // An outage: the stream breaks off (no final chunk), as a cut connection does.
                return Ok(());
            }
            drop(st);
            if expired {
                write_chunk(&mut stream, &expired_event(sent_up_to))?;
            }
            return finish(&mut stream);
        }
        let pending: Vec<Change> = st
            .log
            .iter()
            .filter(|c| c.rv > sent_up_to && matches(c.kind, &c.object, kind, q.node.as_deref()))
            .cloned()
            .collect();
        if let Some(last) = st.log.last() {
            sent_up_to = sent_up_to.max(last.rv);
        }
        if !pending.is_empty() {
            drop(st);
            for c in pending {
                let line = json!({"type": c.typ, "object": c.object}).to_string() + "\n";
                write_chunk(&mut stream, &line)?;
            }
            st = shared.lock();
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            // Like the API server at the end of a watch that asked for them: a BOOKMARK with
            // the current version, so the client resumes from there, not from its last object.
            if q.bookmarks {
                let (api_kind, rv) = (
                    match kind {
                        Kind::Pod => "Pod",
                        Kind::Namespace => "Namespace",
                    },
                    st.rv.to_string(),
                );
                drop(st);
                let line = json!({"type": "BOOKMARK", "object": {"kind": api_kind,
                    "apiVersion": "v1", "metadata": {"resourceVersion": rv}}})
                .to_string()
                    + "\n";
                write_chunk(&mut stream, &line)?;
                return finish(&mut stream);
            }
            break;
        }
        let (guard, _) = shared
            .changed
            .wait_timeout(st, (deadline - now).min(Duration::from_millis(200)))
            .unwrap_or_else(PoisonError::into_inner);
        st = guard;
    }
    drop(st);
    finish(&mut stream)
}

fn expired_event(rv: u64) -> String {
    json!({"type": "ERROR", "object": serde_json::from_str::<Value>(&status_json(
        410, "Expired", &format!("too old resource version: {rv}"))).unwrap_or(Value::Null)})
    .to_string()
        + "\n"
}

fn status_json(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

fn write_chunk(stream: &mut TcpStream, data: &str) -> io::Result<()> {
    write!(stream, "{:x}\r\n{data}\r\n", data.len())?;
    stream.flush()
}

fn finish(stream: &mut TcpStream) -> io::Result<()> {
    stream.write_all(b"0\r\n\r\n")?;
    stream.flush()
}

fn write_full(stream: &mut TcpStream, status: u16, body: &str) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        409 => "Conflict",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// A write (see the module docs): status and body.
fn write_request(shared: &Shared, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match (method, parts.as_slice()) {
        ("POST", ["api", "v1", "namespaces", ns, "events"]) => {
            let mut ev = doc;
            let n = {
                let mut st = shared.lock();
                st.events.push(Value::Null);
                st.events.len()
            };
            ev["metadata"]["namespace"] = json!(ns);
            ev["metadata"]["name"] = json!(format!("event-{n}"));
            shared.lock().events[n - 1] = ev.clone();
            (201, ev.to_string())
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let key = format!("{ns}/{name}");
            let Some(mut pod) = shared.lock().pods.get(&key).cloned() else {
                return (
                    404,
                    status_json(404, "NotFound", &format!("pods \"{name}\" not found")),
                );
            };
            if let Some(labels) = doc["metadata"]["labels"].as_object() {
                for (k, v) in labels {
                    pod["metadata"]["labels"][k] = v.clone();
                }
            }
            apply_locked(shared, Kind::Pod, pod.clone());
            let now = shared.lock().pods.get(&key).cloned().unwrap_or(pod);
            (200, now.to_string())
        }
        ("DELETE", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let key = format!("{ns}/{name}");
            let Some(pod) = shared.lock().pods.get(&key).cloned() else {
                return (
                    404,
                    status_json(404, "NotFound", &format!("pods \"{name}\" not found")),
                );
            };
            if let Some(uid) = doc["preconditions"]["uid"].as_str()
                && pod["metadata"]["uid"].as_str() != Some(uid)
            {
                return (
                    409,
                    status_json(409, "Conflict", "precondition failed: UID"),
                );
            }
            delete_locked(shared, Kind::Pod, &key);
            (200, pod.to_string())
        }
        _ => (
            405,
            status_json(
                405,
                "MethodNotAllowed",
                &format!("{method} {path} is not supported"),
            ),
        ),
    }
}

/// Store key of an object: `namespace/name`, or `name` for cluster-scoped objects.
fn object_key(object: &Value) -> String {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}/{name}")
    }
}
