//! The agent's lifecycle: start the installer, bind the plugin metrics socket and the HTTP
//! listeners, wait for SIGTERM/SIGINT, then leave the plugin installed or uninstall
//! (`lifecycle`). The runtime is a current-thread tokio runtime: the agent's async work is a few
//! sockets, and one thread keeps the idle footprint small. The installer's keeper runs on its own
//! std thread (file watching is blocking work).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixDatagram;
use tracing::{debug, error, info, warn};

use crate::ambient_config::{AmbientConfigWriter, RedirectMode};
use crate::cli::AgentArgs;
use crate::http::{HttpState, Listeners};
use crate::installer::NodeInstaller;
use crate::lifecycle::{ExitAction, ExitInputs, decide, read_marker};
use crate::metrics::{AgentMetrics, build_registry};
use crate::plugin_report::{MAX_REPORT_BYTES, parse_report};
use crate::readiness::Readiness;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("starting the installer: {0}")]
    Installer(String),
    #[error(transparent)]
    Config(#[from] crate::cli::ConfigError),
    #[error("building the tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error("creating run dir {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding the plugin metrics socket {path}: {source}")]
    MetricsSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    PluginEvents(#[from] crate::cni_events::CniEventError),
    #[error("writing the ambient config: {0}")]
    AmbientConfig(#[from] crate::ambient_config::AmbientConfigError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("uninstall failed: {0}")]
    Uninstall(String),
}

/// Handles the running agent exposes to the components that later issues add (ztunnel watch,
/// enrollment): the ambient config writer (`set_ztunnel_ready` hook), metrics, readiness gates.
#[derive(Clone)]
pub struct AgentHandle {
    pub ambient: Option<Arc<AmbientConfigWriter>>,
    pub metrics: AgentMetrics,
    pub readiness: Readiness,
    /// The ambient enrollment loop (`crate::ambient`), when ambient is enabled and startable.
    pub enrollment: Option<Arc<std::sync::Mutex<Option<crate::ambient::AmbientLoop>>>>,
    /// The plugin event server (`pluginevent.sock`), when ambient is enabled. Dropping the
    /// last handle stops it and removes the socket.
    pub cni_events: Option<Arc<crate::cni_events::CniEventServer>>,
    /// The repair controller (`--repair-enabled`); dropping the last handle stops it.
    pub repair: Option<Arc<crate::repair::RepairController>>,
}

/// Everything decided from the flags before starting.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub args: AgentArgs,
    pub redirect_mode: RedirectMode,
}

/// Run until SIGTERM/SIGINT, then leave installed or uninstall.
pub fn run(plan: RunPlan, installer: Arc<dyn NodeInstaller>) -> Result<(), AgentError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let args = plan.args.clone();
    let mode = plan.redirect_mode;
    let served = rt.block_on(serve_until_signal(plan, installer.clone()));
    // Stop serving before touching the node: after this point nothing reports ready.
    rt.shutdown_timeout(Duration::from_secs(1));
    let result = match served {
        Ok(enrollment) => shutdown(&args, mode, installer.as_ref(), enrollment),
        Err(e) => {
            // Start-up failed: stop the keeper, touch nothing (this is no uninstall signal).
            installer.stop();
            Err(e)
        }
    };
    remove_metrics_socket(&args.metrics_socket());
    crate::cni_events::remove_socket(&crate::cni_events::socket_path(&args.cni_agent_run_dir));
    result
}

async fn serve_until_signal(
    plan: RunPlan,
    installer: Arc<dyn NodeInstaller>,
) -> Result<Option<crate::ambient::AmbientLoop>, AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Install handlers first so a SIGTERM during start-up is not lost.
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;

    let handle = start(&plan, installer).await?;
    tokio::spawn(watch_readiness(handle.readiness.clone()));

    tokio::select! {
        _ = sigterm.recv() => info!("received SIGTERM"),
        _ = sigint.recv() => info!("received SIGINT"),
    }
    Ok(handle
        .enrollment
        .and_then(|e| e.lock().unwrap_or_else(|p| p.into_inner()).take()))
}

/// Start every async component; returns the handles.
pub async fn start(
    plan: &RunPlan,
    installer: Arc<dyn NodeInstaller>,
) -> Result<AgentHandle, AgentError> {
    let args = &plan.args;
    let readiness = Readiness::new();
    {
        let inst = installer.clone();
        readiness.probe("install", move || {
            if inst.is_ready() {
                Ok(())
            } else {
                Err(inst
                    .last_error()
                    .unwrap_or_else(|| "first install pass not finished".into()))
            }
        });
    }

    let ambient = if args.ambient_enabled {
        // The config file has its own gate; enrollment registers `redirect-mode` below
        // (`ambient::start_from_args`).
        let gate = readiness.gate("ambient-config");
        let w = Arc::new(AmbientConfigWriter::new(
            &args.ambient_config_dir,
            plan.redirect_mode,
        ));
        w.write_initial()?;
        gate.set(true);
        info!(path = %w.path().display(), mode = %plan.redirect_mode, "wrote ambient config");
        Some(w)
    } else {
        None
    };

    let (mut registry, metrics) = build_registry(installer);
    start_node_taint_removal(args, &readiness, &mut registry);
    let enrollment = if args.ambient_enabled {
        crate::ambient::start_from_args(
            args,
            plan.redirect_mode,
            &readiness,
            metrics.enrolled_pods.clone(),
            metrics.ztunnel_connected.clone(),
            metrics.workloads.clone(),
            ambient.clone(),
        )
        .map(|l| Arc::new(std::sync::Mutex::new(Some(l))))
    } else {
        None
    };
    let sock = bind_metrics_socket(&args.cni_agent_run_dir, &args.metrics_socket())?;
    tokio::spawn(receive_reports(sock, metrics.clone()));
    let cni_events = if args.ambient_enabled {
        Some(Arc::new(start_cni_events(
            args,
            enrollment.as_ref(),
            &readiness,
            &metrics,
        )?))
    } else {
        None
    };

    let repair = if args.repair_enabled {
        let enroll = enrollment.as_ref().and_then(|e| {
            e.lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|l| l.sender())
        });
        match crate::repair::RepairController::spawn(
            args,
            plan.redirect_mode,
            metrics.repair.clone(),
            enroll,
        ) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                // Readiness says so: a node that should repair pods and cannot is not ready.
                warn!(error = %e, "repair controller not started");
                let why = format!("repair controller not started: {e}");
                readiness.probe("repair", move || Err(why.clone()));
                None
            }
        }
    } else {
        None
    };

    let listeners = Listeners::bind(
        args.listen_address,
        args.readiness_port,
        args.monitoring_port,
    )
    .await?;
    info!(
        readiness = %listeners.health.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        monitoring = %listeners
            .metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_else(|| "shared".into()),
        "serving /healthz /readyz, /metrics and /debug/doctor"
    );
    let doctor: crate::http::DoctorFn = {
        let args = plan.args.clone();
        let mode = plan.redirect_mode;
        Arc::new(move || crate::doctor::run(&args, mode))
    };
    listeners.serve(HttpState {
        readiness: readiness.clone(),
        registry: Arc::new(registry),
        doctor: Some(doctor),
    });

    Ok(AgentHandle {
        ambient,
        metrics,
        readiness,
        enrollment,
        cni_events,
        repair,
    })
}

/// `--remove-node-taint`: remove the node's readiness taint once ready, on its own thread
/// (`node_taint`). Its metrics are registered also when the option is off (all zero), so
/// dashboards see the series either way.
fn start_node_taint_removal(
    args: &AgentArgs,
    readiness: &Readiness,
    registry: &mut prometheus_client::registry::Registry,
) {
    let metrics = crate::node_taint::TaintMetrics::default();
    metrics.register(registry);
    if let Some(remover) = crate::node_taint::TaintRemover::from_args(args) {
        info!(node = %remover.node, taint = %remover.key, "readiness taint: will remove it once ready");
        if let Err(e) = remover.spawn(readiness.clone(), metrics) {
            error!(error = %e, "readiness taint: could not start its thread; the taint stays");
        }
    }
}

/// Serve `pluginevent.sock`. Also when enrollment could not start: the plugin's ADD then gets
/// the reason (from the `redirect-mode` gate) instead of "connection refused".
fn start_cni_events(
    args: &AgentArgs,
    enrollment: Option<&Arc<std::sync::Mutex<Option<crate::ambient::AmbientLoop>>>>,
    readiness: &Readiness,
    metrics: &AgentMetrics,
) -> Result<crate::cni_events::CniEventServer, AgentError> {
    use crate::cni_events::{Backend, CniEventOptions, CniEventServer};
    let sender = enrollment.and_then(|e| {
        e.lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|l| l.sender())
    });
    let backend = match sender {
        Some(tx) => Backend::Loop(tx),
        None => Backend::Unavailable(
            readiness
                .closed()
                .into_iter()
                .find(|g| g.starts_with("redirect-mode"))
                .unwrap_or_else(|| "enrollment did not start".into()),
        ),
    };
    Ok(CniEventServer::start(
        &args.cni_agent_run_dir,
        backend,
        CniEventOptions::default(),
        metrics.cni_event_metrics(),
    )?)
}

/// Log readiness transitions (once per change, not per probe) so "why is the pod not ready" is
/// answered by the agent's log.
async fn watch_readiness(readiness: Readiness) {
    let mut last: Option<Vec<String>> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let closed = readiness.closed();
        if last.as_ref() != Some(&closed) {
            if closed.is_empty() {
                info!("agent ready");
            } else {
                warn!(closed_gates = %closed.join(","), "agent not ready");
            }
            last = Some(closed);
        }
    }
}

fn bind_metrics_socket(run_dir: &Path, path: &Path) -> Result<UnixDatagram, AgentError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    std::fs::create_dir_all(run_dir).map_err(|source| AgentError::RunDir {
        path: run_dir.to_path_buf(),
        source,
    })?;
    // A previous agent may have left its socket behind (crash, SIGKILL); only ever remove a
    // socket, never a regular file someone put there.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    let sock = UnixDatagram::bind(path).map_err(|source| AgentError::MetricsSocket {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        AgentError::MetricsSocket {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(sock)
}

async fn receive_reports(sock: UnixDatagram, metrics: AgentMetrics) {
    // One byte more than allowed so oversize datagrams are detectable (recv truncates).
    let mut buf = vec![0u8; MAX_REPORT_BYTES + 1];
    loop {
        match sock.recv(&mut buf).await {
            Ok(n) if n > MAX_REPORT_BYTES => {
                metrics.malformed_reports.inc();
                debug!(
                    bytes = n,
                    "plugin report larger than {MAX_REPORT_BYTES} bytes dropped"
                );
            }
            Ok(n) => match parse_report(&buf[..n]) {
                Ok(r) => metrics.record(&r),
                Err(e) => {
                    metrics.malformed_reports.inc();
                    debug!(error = %e, "plugin report dropped");
                }
            },
            Err(e) => {
                error!(error = %e, "receiving plugin reports failed; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn remove_metrics_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// After the signal: stop the keeper, then decide.
fn shutdown(
    args: &AgentArgs,
    mode: RedirectMode,
    installer: &dyn NodeInstaller,
    enrollment: Option<crate::ambient::AmbientLoop>,
) -> Result<(), AgentError> {
    // The keeper must stop first, or it would put back what uninstall removes.
    installer.stop();
    let mut inputs = ExitInputs {
        uninstall_on_exit: args.uninstall_on_exit,
        disable_safe_upgrade: args.ambient_disable_safe_upgrade,
        marker: read_marker(&args.uninstall_marker_file),
        daemonset: None,
    };
    let mut action = decide(&inputs);
    // No explicit uninstall signal: ask whether our DaemonSet is still there (a plain
    // `kubectl delete` of the manifests runs no hook), when --daemonset-name is set.
    if matches!(action, ExitAction::LeaveInstalled { .. })
        && let Some(check) = crate::owner_check::OwnerCheck::from_args(args)
    {
        let state = check.query();
        info!(target_object = %check.target(), ?state, "shutdown check of the agent's DaemonSet");
        inputs.daemonset = Some(state);
        action = decide(&inputs);
    }
    // Ambient redirection stays in place across restarts (the next agent adopts it) and is
    // removed only together with the plugin.
    if let Some(l) = enrollment {
        l.stop(matches!(action, ExitAction::Uninstall { .. }));
    }
    match action {
        ExitAction::LeaveInstalled { reason } => {
            info!(%reason, "leaving the CNI plugin installed");
            final_check(installer);
            Ok(())
        }
        ExitAction::Uninstall { reason } => {
            info!(%reason, "uninstalling the CNI plugin");
            uninstall_all(args, mode, installer)
        }
    }
}

/// The last verify-and-reinsert pass of an upgrade/restart stop: the keeper has stopped, and a
/// primary CNI may have rewritten its config (or something removed our binary or kubeconfig)
/// while it was stopping; the node must not be left without the plugin until the next agent
/// starts. Logs what it found and did for every part.
fn final_check(installer: &dyn NodeInstaller) {
    use meshcni_install::RepairOutcome;
    let steps = installer.verify_and_repair();
    let mut failed = 0usize;
    for s in &steps {
        let path = s.path.display();
        match &s.outcome {
            RepairOutcome::Intact => info!(part = s.what, %path, "final check: in place"),
            RepairOutcome::Repaired => {
                warn!(part = s.what, %path, "final check: was missing or changed; put back")
            }
            RepairOutcome::Failed(e) => {
                failed += 1;
                error!(part = s.what, %path, error = %e, "final check: could not verify or repair")
            }
        }
    }
    if failed == 0 {
        info!(
            parts = steps.len(),
            "final check done: the CNI plugin is installed"
        );
    } else {
        error!(failed, "final check done: the installation is incomplete");
    }
}

/// Remove every file of ours: the installer's files, the ambient config file, the metrics socket
/// and the run dir if it is left empty; with ambient on, the redirection of `mode` (the mode
/// the agent runs, [`AgentArgs::effective_redirect_mode`] with the flag's explicitness).
pub fn uninstall_all(
    args: &AgentArgs,
    mode: RedirectMode,
    installer: &dyn NodeInstaller,
) -> Result<(), AgentError> {
    installer.uninstall().map_err(AgentError::Uninstall)?;
    info!("removed the plugin binaries, our CNI config entry and the kubeconfig");
    let ambient_file = args
        .ambient_config_dir
        .join(crate::ambient_config::AMBIENT_CONFIG_FILE);
    match std::fs::remove_file(&ambient_file) {
        Ok(()) => info!(path = %ambient_file.display(), "removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(AgentError::Uninstall(format!(
                "removing {}: {e}",
                ambient_file.display()
            )));
        }
    }
    if args.ambient_enabled {
        // Redirection left in place by an agent that stopped without uninstalling (the normal
        // restart/upgrade path): remove it now. A mode without a driver has nothing to remove.
        if let Ok(mut driver) = crate::ambient::make_driver(mode, args) {
            driver.uninstall().map_err(|e| {
                AgentError::Uninstall(format!("removing the {mode} redirection: {e}"))
            })?;
            info!(%mode, "removed the ambient redirection");
        }
    }
    remove_metrics_socket(&args.metrics_socket());
    crate::cni_events::remove_socket(&crate::cni_events::socket_path(&args.cni_agent_run_dir));
    // Only an empty dir: other tools may share it.
    let _ = std::fs::remove_dir(&args.cni_agent_run_dir);
    Ok(())
}
