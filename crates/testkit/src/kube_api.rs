//! An in-process fake Kubernetes API server (plain HTTP or TLS) for tests and demos.
//!
//! It answers each request with whatever the handler returns — JSON with a status code, a
//! delayed answer (to exercise client timeouts), or a dropped connection — and records the
//! requests it saw. [`FakeApiServer::with_objects`] serves `GET`s of given Pod/Namespace JSON
//! with real `Status` 404s for everything else. Std threads only; never used by the plugin's
//! production path.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// A request as the fake server parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The request body (`Content-Length` bytes, lossy UTF-8; empty without one).
    pub body: String,
}

impl FakeRequest {
    /// Value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the fake server does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeResponse {
    /// Answer `status` with a JSON body.
    Json { status: u16, body: String },
    /// Wait, then do the inner response.
    Delayed {
        delay: Duration,
        response: Box<FakeResponse>,
    },
    /// Close the connection without answering.
    Close,
}

impl FakeResponse {
    /// 200 with `body`.
    pub fn ok(body: impl Into<String>) -> FakeResponse {
        FakeResponse::Json {
            status: 200,
            body: body.into(),
        }
    }

    /// A Kubernetes `Status` failure object, as the API server sends it.
    pub fn status(code: u16, reason: &str, message: &str) -> FakeResponse {
        let body = serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        });
        FakeResponse::Json {
            status: code,
            body: body.to_string(),
        }
    }

    /// The API server's 404 for `<resource> "<name>"` (resource plural, e.g. `pods`).
    pub fn not_found(resource: &str, name: &str) -> FakeResponse {
        let body = serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("{resource} \"{name}\" not found"),
            "reason": "NotFound",
            "details": {"name": name, "kind": resource},
            "code": 404,
        });
        FakeResponse::Json {
            status: 404,
            body: body.to_string(),
        }
    }

    /// Wrap `self` in a delay.
    pub fn after(self, delay: Duration) -> FakeResponse {
        FakeResponse::Delayed {
            delay,
            response: Box::new(self),
        }
    }
}

type Handler = dyn Fn(&FakeRequest) -> FakeResponse + Send + Sync;

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    url: String,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    requests: Arc<Mutex<Vec<FakeRequest>>>,
}

impl FakeApiServer {
    /// Plain-HTTP server on `127.0.0.1:<ephemeral>`.
    pub fn start(
        handler: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static,
    ) -> io::Result<FakeApiServer> {
        Self::spawn(None, Arc::new(handler))
    }

    /// TLS server on `127.0.0.1:<ephemeral>` using `config` (URL scheme `https`).
    pub fn start_tls(
        config: Arc<rustls::ServerConfig>,
        handler: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static,
    ) -> io::Result<FakeApiServer> {
        Self::spawn(Some(config), Arc::new(handler))
    }

    /// Serve `GET /api/v1/namespaces/<ns>/pods/<name>` and `GET /api/v1/namespaces/<name>`
    /// from the given objects (API JSON; name/namespace taken from their metadata); every
    /// other path is a `Status` 404.
    pub fn with_objects(
        pods: Vec<serde_json::Value>,
        namespaces: Vec<serde_json::Value>,
    ) -> io::Result<FakeApiServer> {
        let mut routes: HashMap<String, String> = HashMap::new();
        let meta = |v: &serde_json::Value, f: &str| -> String {
            v["metadata"][f].as_str().unwrap_or_default().to_string()
        };
        for p in &pods {
            routes.insert(
                format!(
                    "/api/v1/namespaces/{}/pods/{}",
                    meta(p, "namespace"),
                    meta(p, "name")
                ),
                p.to_string(),
            );
        }
        for n in &namespaces {
            routes.insert(
                format!("/api/v1/namespaces/{}", meta(n, "name")),
                n.to_string(),
            );
        }
        Self::start(move |req| {
            if let Some(body) = routes.get(&req.path) {
                return FakeResponse::ok(body.clone());
            }
            let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
            match segments.as_slice() {
                ["api", "v1", "namespaces", _, "pods", name] => {
                    FakeResponse::not_found("pods", name)
                }
                ["api", "v1", "namespaces", name] => FakeResponse::not_found("namespaces", name),
                _ => FakeResponse::status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            }
        })
    }

    fn spawn(
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: Arc<Handler>,
    ) -> io::Result<FakeApiServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{addr}");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        let accept_thread = std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    let (handler, requests, tls) =
                        (handler.clone(), requests2.clone(), tls.clone());
                    // One thread per connection so a delayed answer blocks nobody else.
                    let _ = std::thread::Builder::new()
                        .name("fake-kube-conn".into())
                        .spawn(move || {
                            let _ = serve_conn(stream, tls, &*handler, &requests);
                        });
                }
            })?;
        Ok(FakeApiServer {
            addr,
            url,
            stop,
            accept_thread: Some(accept_thread),
            requests,
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A kubeconfig (the shape istio-cni's installer writes) pointing at this server.
    pub fn kubeconfig_yaml(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nclusters:\n- cluster:\n    server: {}\n  name: local\ncontexts:\n- context:\n    cluster: local\n    user: istio-cni\n  name: istio-cni-context\ncurrent-context: istio-cni-context\nkind: Config\nusers:\n- name: istio-cni\n  user:\n    token: {token}\n",
            self.url
        )
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_conn(
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: &Handler,
    requests: &Mutex<Vec<FakeRequest>>,
) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    match tls {
        None => serve_stream(stream, handler, requests),
        Some(cfg) => {
            let conn = rustls::ServerConnection::new(cfg).map_err(io::Error::other)?;
            serve_stream(rustls::StreamOwned::new(conn, stream), handler, requests)
        }
    }
}

fn serve_stream<S: Read + Write>(
    stream: S,
    handler: &Handler,
    requests: &Mutex<Vec<FakeRequest>>,
) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut it = line.split_whitespace();
    let method = it.next().unwrap_or_default().to_string();
    let path = it.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut body = Vec::new();
    (&mut reader).take(length).read_to_end(&mut body)?;
    let req = FakeRequest {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(req.clone());
    let mut response = handler(&req);
    loop {
        match response {
            FakeResponse::Delayed { delay, response: r } => {
                std::thread::sleep(delay);
                response = *r;
            }
            FakeResponse::Close => return Ok(()),
            FakeResponse::Json { status, body } => {
                let mut stream = reader.into_inner();
                let head = format!(
                    "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    reason_phrase(status),
                    body.len()
                );
                stream.write_all(head.as_bytes())?;
                stream.write_all(body.as_bytes())?;
                stream.flush()?;
                return Ok(());
            }
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
