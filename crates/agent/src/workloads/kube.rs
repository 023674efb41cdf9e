//! Workloads from the Kubernetes API: a [`Reflector`] for the pods on this node
//! (`fieldSelector=spec.nodeName=<node>`) and one for all namespaces, each on its own thread
//! (blocking list+watch from `meshcni-kube`; no async runtime, no full client). After every
//! relist and every change the thread sends the complete decoded set
//! ([`SourceUpdate::Pods`] / [`SourceUpdate::Namespaces`]) to the reconcile loop. Watch errors
//! and 410 Gone lead to a relist (with back-off); a full relist also happens every
//! `resync` period. The API client is rebuilt at every `client_refresh` so a rotated service
//! account token is picked up.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meshcni_kube::kubeconfig::{Auth, ClusterAccess, TlsTrust};
use meshcni_kube::watch::{Reflector, ReflectorOptions, Resource};
use meshcni_kube::{ApiClient, ClientOptions};
use tracing::{info, warn};

use super::{SourceUpdate, decode_namespace, decode_pod};

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
    /// Resolve (re-reading token/CA files each time).
    pub fn resolve(&self) -> Result<ClusterAccess, String> {
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
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                Ok(ClusterAccess {
                    server: format!("{protocol}://{host}:{port}"),
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
}

/// Timing of the Kubernetes source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeSourceOptions {
    pub reflector: ReflectorOptions,
    /// Rebuild the client (re-read credentials) this often.
    pub client_refresh: Duration,
}

impl Default for KubeSourceOptions {
    fn default() -> Self {
        KubeSourceOptions {
            reflector: ReflectorOptions::default(),
            client_refresh: Duration::from_secs(600),
        }
    }
}

/// The two watch threads; they stop (at the end of their current request) when dropped.
pub struct KubeSource {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Start watching pods on `node` and all namespaces.
    pub fn spawn(
        access: AccessConfig,
        node: String,
        options: KubeSourceOptions,
        tx: Sender<SourceUpdate>,
    ) -> KubeSource {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for resource in [Resource::pods_on_node(&node), Resource::namespaces()] {
            let (access, tx, stop) = (access.clone(), tx.clone(), stop.clone());
            let name = if resource.path.ends_with("pods") {
                "watch-pods"
            } else {
                "watch-namespaces"
            };
            if let Ok(t) = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run_reflector(resource, access, options, &stop, &tx))
            {
                threads.push(t);
            }
        }
        KubeSource { stop, threads }
    }

    /// Ask the threads to stop and wait for them (at most one watch timeout).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        // Detach: a blocked watch read ends by itself at the server timeout.
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run_reflector(
    resource: Resource,
    access: AccessConfig,
    options: KubeSourceOptions,
    stop: &AtomicBool,
    tx: &Sender<SourceUpdate>,
) {
    let is_pods = resource.path.ends_with("/pods");
    let mut reflector = Reflector::new(resource, options.reflector);
    let mut backoff = options.reflector.min_backoff;
    while !stop.load(Ordering::SeqCst) {
        let client = match access
            .resolve()
            .and_then(|a| ApiClient::new(&a, ClientOptions::default()).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("kubernetes client for {}: {e}", reflector.resource().path);
                warn!(error = %msg, "cannot build the API client; retrying");
                let _ = tx.send(SourceUpdate::Error(msg));
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(options.reflector.max_backoff);
                continue;
            }
        };
        backoff = options.reflector.min_backoff;
        let started = Instant::now();
        let until = || stop.load(Ordering::SeqCst) || started.elapsed() >= options.client_refresh;
        reflector.run(
            &client,
            &until,
            &mut |r, change| {
                let update = if is_pods {
                    SourceUpdate::Pods(
                        r.store()
                            .values()
                            .filter_map(|v| {
                                decode_pod(v)
                                    .map_err(|e| warn!(error = %e, "ignoring pod"))
                                    .ok()
                            })
                            .collect(),
                    )
                } else {
                    SourceUpdate::Namespaces(
                        r.store()
                            .values()
                            .filter_map(|v| {
                                decode_namespace(v)
                                    .map_err(|e| warn!(error = %e, "ignoring namespace"))
                                    .ok()
                            })
                            .collect(),
                    )
                };
                if change == meshcni_kube::watch::StoreChange::Relisted {
                    info!(
                        resource = %r.resource().path,
                        objects = r.store().len(),
                        version = %r.resource_version(),
                        "listed"
                    );
                }
                let _ = tx.send(update);
            },
            &mut |e| {
                warn!(error = %e, "watch failed; relisting after back-off");
                let _ = tx.send(SourceUpdate::Error(e.to_string()));
            },
        );
    }
}
