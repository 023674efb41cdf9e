//! Workloads from the Kubernetes API, on kube-rs: a `kube::runtime::watcher` with a reflector
//! store for the pods on this node (`fieldSelector=spec.nodeName=<node>`) and one for all
//! namespaces, both on one thread with a single-threaded tokio runtime of their own. After
//! every (re)list and every change the source sends the complete decoded set
//! ([`SourceUpdate::Pods`] / [`SourceUpdate::Namespaces`]) to the reconcile loop.
//!
//! What kube-rs does for us: paginated lists (`limit` = `list_page_size`, then `continue`),
//! watches with
//! `allowWatchBookmarks=true` resumed from the last version seen, a relist when the version is
//! gone (410 / `ERROR` event), and a service-account token read from its file and re-read
//! about every minute (a rotated bound token is picked up without restarting anything).
//! What this module adds: a back-off between failed attempts (reset on success), every error
//! reported as [`SourceUpdate::Error`] (with the API server's status code, reason and message
//! when it sent one), a client that is built again until its credentials can be read, and a
//! full relist every `resync` period.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use serde::Serialize;
use tracing::{info, warn};

use super::{SourcePoke, SourceUpdate, decode_namespace, decode_pod};

/// How to reach the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessConfig {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// In-cluster: `<protocol>://<host>:<port>`, token and CA from the service account dir.
    InCluster {
        protocol: String,
        host: String,
        port: String,
        service_account_dir: PathBuf,
        skip_tls_verify: bool,
    },
}

impl AccessConfig {
    /// In-cluster access from the agent's KUBERNETES_SERVICE_* flags and service-account dir
    /// (port 443 when KUBERNETES_SERVICE_PORT is empty).
    pub fn in_cluster(args: &crate::cli::AgentArgs) -> AccessConfig {
        AccessConfig::InCluster {
            protocol: args.kubernetes_service_protocol.clone(),
            host: args.kubernetes_service_host.clone(),
            port: if args.kubernetes_service_port.is_empty() {
                "443".into()
            } else {
                args.kubernetes_service_port.clone()
            },
            service_account_dir: args.service_account_dir.clone(),
            skip_tls_verify: args.skip_tls_verify,
        }
    }

    /// The agent's access from its flags: `--ambient-kubeconfig`, else in-cluster when
    /// KUBERNETES_SERVICE_HOST is set (port 443 when KUBERNETES_SERVICE_PORT is empty); `None`
    /// when neither.
    pub fn from_args(args: &crate::cli::AgentArgs) -> Option<AccessConfig> {
        if !args.has_api_access() {
            None
        } else if !args.ambient_kubeconfig.is_empty() {
            Some(AccessConfig::Kubeconfig(
                args.ambient_kubeconfig.clone().into(),
            ))
        } else {
            Some(AccessConfig::in_cluster(args))
        }
    }

    /// A kube-rs client for this access.
    pub async fn client(&self) -> Result<Client, String> {
        let c = self.client_config().await?;
        Client::try_from(c).map_err(|e| format!("kubernetes client: {}", chain(&e)))
    }

    /// The blocking client's access (the `uninstall-hook`'s one PATCH): token and CA files
    /// re-read on every call, so a rotated token is picked up by the next attempt.
    pub fn resolve(&self) -> Result<meshcni_kube::kubeconfig::ClusterAccess, String> {
        use meshcni_kube::kubeconfig::{Auth, ClusterAccess, TlsTrust};
        match self {
            AccessConfig::Kubeconfig(path) => {
                ClusterAccess::from_kubeconfig(path).map_err(|e| e.to_string())
            }
            AccessConfig::InCluster {
                protocol,
                host,
                port,
                service_account_dir,
                skip_tls_verify,
            } => {
                let read = |name: &str| {
                    let p = service_account_dir.join(name);
                    std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))
                };
                let token = String::from_utf8_lossy(&read("token")?).trim().to_string();
                let trust = if *skip_tls_verify {
                    TlsTrust::InsecureSkipVerify
                } else {
                    TlsTrust::CaPem(read("ca.crt")?)
                };
                Ok(ClusterAccess {
                    server: server_url(protocol, host, port),
                    trust,
                    auth: Auth {
                        bearer_token: Some(token),
                        ..Auth::default()
                    },
                    source: service_account_dir.clone(),
                })
            }
        }
    }

    /// The kube-rs client configuration. In-cluster, the token is given as a file
    /// (`<dir>/token`), which kube-rs re-reads about every minute, and the CA as a file
    /// (`<dir>/ca.crt`), re-read the same way.
    pub async fn client_config(&self) -> Result<Config, String> {
        match self {
            AccessConfig::Kubeconfig(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("kubeconfig {}: {}", path.display(), chain(&e)))?;
                Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|e| format!("kubeconfig {}: {}", path.display(), chain(&e)))
            }
            AccessConfig::InCluster {
                protocol,
                host,
                port,
                service_account_dir,
                skip_tls_verify,
            } => {
                let url = server_url(protocol, host, port);
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| format!("API server address {url:?}: {e}"))?;
                let mut config = Config::new(uri);
                let token = service_account_dir.join("token");
                // Fail early and by name; kube-rs reads it again itself, and sends it verbatim
                // (no trimming), so a token with surrounding whitespace would only show up as
                // an opaque header error on every request.
                let text = std::fs::read_to_string(&token)
                    .map_err(|e| format!("service account token {}: {e}", token.display()))?;
                if text.trim() != text || text.is_empty() {
                    return Err(format!(
                        "service account token {}: empty or surrounded by whitespace",
                        token.display()
                    ));
                }
                config.auth_info.token_file = Some(token.display().to_string());
                if *skip_tls_verify {
                    config.accept_invalid_certs = true;
                } else {
                    let ca = service_account_dir.join("ca.crt");
                    let pem = std::fs::read(&ca)
                        .map_err(|e| format!("service account CA {}: {e}", ca.display()))?;
                    let certs = pem_certificates(&pem)
                        .map_err(|e| format!("service account CA {}: {e}", ca.display()))?;
                    config.root_cert = Some(certs);
                    config.root_cert_file = Some(ca);
                }
                Ok(config)
            }
        }
    }
}

/// `<protocol>://<host>:<port>` of the in-cluster settings, an IPv6 host in brackets.
fn server_url(protocol: &str, host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("{protocol}://[{host}]:{port}")
    } else {
        format!("{protocol}://{host}:{port}")
    }
}

/// DER certificates of a PEM bundle.
fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Ok(certs)
}

/// An error and its causes, `a: b: c` (kube-rs errors keep the useful part in the sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A watcher error; when the API server answered with a `Status`, its code, reason and
/// message (`list failed: HTTP 403 Forbidden: pods is forbidden: ... cannot list resource
/// "pods" ...`), else the cause chain.
fn describe(e: &watcher::Error) -> String {
    let (what, status) = match e {
        watcher::Error::WatchError(s) => ("watch ERROR event", &**s),
        watcher::Error::InitialListFailed(kube::Error::Api(s)) => ("list failed", &**s),
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => ("watch request failed", &**s),
        watcher::Error::WatchFailed(kube::Error::Api(s)) => ("watch stream failed", &**s),
        _ => return chain(e),
    };
    format!(
        "{what}: HTTP {} {}: {}",
        status.code, status.reason, status.message
    )
}

/// Timing of the Kubernetes source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeSourceOptions {
    /// `timeoutSeconds` of each watch request (the server ends the stream then; the watch
    /// resumes from the last version seen, without a relist).
    pub watch_timeout: Duration,
    /// Full relist at least this often (repairs anything a watch may have missed).
    pub resync: Duration,
    /// First delay after a failure; doubles up to `max_backoff`; back to `min_backoff` after
    /// a success.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Objects per list page (`limit`); the rest follows with `continue` tokens.
    pub list_page_size: u32,
}

impl Default for KubeSourceOptions {
    fn default() -> Self {
        KubeSourceOptions {
            watch_timeout: Duration::from_secs(290),
            resync: Duration::from_secs(600),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            // client-go's pager default.
            list_page_size: 500,
        }
    }
}

/// Doubling back-off between `min` and `max`, reset by the watcher after every success.
#[derive(Debug, Clone)]
struct Doubling {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Doubling {
    fn new(min: Duration, max: Duration) -> Doubling {
        Doubling {
            min,
            max,
            next: min,
        }
    }
}

impl Iterator for Doubling {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

impl Backoff for Doubling {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The watch thread; it stops when [`KubeSource::stop`] is called or the source is dropped.
pub struct KubeSource {
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeSource {
    /// Start watching pods on `node` and all namespaces.
    pub fn spawn(
        access: AccessConfig,
        node: String,
        options: KubeSourceOptions,
        tx: Sender<SourceUpdate>,
    ) -> KubeSource {
        Self::spawn_with_poke(access, node, options, tx, SourcePoke::new())
    }

    /// [`KubeSource::spawn`], retrying a failing list at once when `poke` is poked.
    pub fn spawn_with_poke(
        access: AccessConfig,
        node: String,
        options: KubeSourceOptions,
        tx: Sender<SourceUpdate>,
        poke: SourcePoke,
    ) -> KubeSource {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let msg = format!("kubernetes source: cannot start its runtime: {e}");
                        warn!(error = %msg);
                        let _ = tx.send(SourceUpdate::Error(msg));
                        return;
                    }
                };
                rt.block_on(run(access, node, options, tx, stop_rx, poke));
            })
            .map_err(|e| warn!(error = %e, "cannot start the kube-watch thread"))
            .ok();
        KubeSource {
            stop: Some(stop_tx),
            thread,
        }
    }

    /// Stop the watches and wait for the thread.
    pub fn stop(mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread, which ends its watches and exits.
        self.stop.take();
    }
}

async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // Resolves when the sender is dropped (or says stop).
    let _ = stop.wait_for(|s| *s).await;
}

async fn run(
    access: AccessConfig,
    node: String,
    options: KubeSourceOptions,
    tx: Sender<SourceUpdate>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    poke: SourcePoke,
) {
    let mut backoff = Doubling::new(options.min_backoff, options.max_backoff);
    let client = loop {
        let built = access.client_config().await.and_then(|c| {
            Client::try_from(c).map_err(|e| format!("kubernetes client: {}", chain(&e)))
        });
        match built {
            Ok(c) => break c,
            Err(msg) => {
                warn!(error = %msg, "cannot build the API client; retrying");
                let _ = tx.send(SourceUpdate::Error(msg));
                let pause = backoff.next().unwrap_or(options.max_backoff);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stopped(&mut stop) => return,
                }
            }
        }
    };
    let pods = watch_collection(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        options,
        tx.clone(),
        (stop.clone(), poke.clone()),
        |v| {
            decode_pod(v)
                .map_err(|e| warn!(error = %e, "ignoring pod"))
                .ok()
        },
        SourceUpdate::Pods,
    );
    let namespaces = watch_collection(
        Api::<Namespace>::all(client),
        watcher::Config::default(),
        options,
        tx,
        (stop, poke),
        |v| {
            decode_namespace(v)
                .map_err(|e| warn!(error = %e, "ignoring namespace"))
                .ok()
        },
        SourceUpdate::Namespaces,
    );
    tokio::join!(pods, namespaces);
}

/// List+watch one collection until stopped; send the decoded set after every relist and
/// every change.
async fn watch_collection<K, T>(
    api: Api<K>,
    config: watcher::Config,
    options: KubeSourceOptions,
    tx: Sender<SourceUpdate>,
    (mut stop, poke): (tokio::sync::watch::Receiver<bool>, SourcePoke),
    decode: impl Fn(&serde_json::Value) -> Option<T>,
    wrap: impl Fn(Vec<T>) -> SourceUpdate,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + PartialEq
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let secs = u32::try_from(options.watch_timeout.as_secs().max(1)).unwrap_or(u32::MAX);
    let config = config
        .timeout(secs)
        .page_size(options.list_page_size.max(1));
    let what = K::plural(&()).to_string();
    loop {
        // A fresh watcher starts with a list; its store replaces ours at the end of the list.
        let (reader, mut writer) = reflector::store::<K>();
        let mut events = watcher(api.clone(), config.clone())
            .backoff(Doubling::new(options.min_backoff, options.max_backoff))
            .boxed();
        let resync = tokio::time::sleep(options.resync);
        tokio::pin!(resync);
        // The last list/watch attempt failed: the watcher is in its back-off.
        let mut failing = false;
        loop {
            let item = tokio::select! {
                item = events.next() => item,
                _ = &mut resync => break,
                _ = poke.poked(), if failing => {
                    info!(resource = %what, "a CNI ADD waits for a pod not seen yet: retrying the list now, not after the back-off");
                    break;
                }
                _ = stopped(&mut stop) => return,
            };
            let Some(item) = item else { break };
            failing = item.is_err();
            match item {
                Ok(event) => {
                    let send = match &event {
                        watcher::Event::InitDone => true,
                        watcher::Event::Apply(o) => {
                            reader.get(&ObjectRef::from_obj(o)).as_deref() != Some(o)
                        }
                        watcher::Event::Delete(o) => reader.get(&ObjectRef::from_obj(o)).is_some(),
                        watcher::Event::Init | watcher::Event::InitApply(_) => false,
                    };
                    writer.apply_watcher_event(&event);
                    if matches!(event, watcher::Event::InitDone) {
                        info!(resource = %what, objects = reader.len(), "listed");
                    }
                    if send {
                        let set = reader
                            .state()
                            .iter()
                            .filter_map(|o| match serde_json::to_value(&**o) {
                                Ok(v) => decode(&v),
                                Err(e) => {
                                    warn!(error = %e, "cannot re-encode a {what} object");
                                    None
                                }
                            })
                            .collect();
                        let _ = tx.send(wrap(set));
                    }
                }
                Err(e) => {
                    let msg = format!("watching {what}: {}", describe(&e));
                    warn!(error = %msg, "list/watch failed; retrying after back-off");
                    let _ = tx.send(SourceUpdate::Error(msg));
                }
            }
        }
        info!(resource = %what, "relisting");
    }
}
