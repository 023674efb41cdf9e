//! The keeper: keeps the installation in place (spec §5.2 steps 2–3). Runs on its own std
//! thread: an install pass, then sleep until a file event (inotify on the CNI config dir, the
//! bin target dirs and the service-account dir), the periodic resync, or shutdown; debounce
//! the event burst and run the (idempotent) pass again. A primary CNI that keeps deleting our
//! entry (Cilium with `cni.exclusive=true`) is detected and answered with an exponential
//! back-off instead of a tight loop, but the keeper never gives up.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::cniconfig::Wait;
use crate::error::InstallResult;
use crate::installer::Installer;

/// Shutdown signal shared by the agent and the keeper: a flag plus wake-ups for sleepers.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<Sender<KeeperMsg>>>>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Ask every keeper to stop; sleeping keepers wake immediately.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for w in wakers.iter() {
            let _ = w.send(KeeperMsg::Stop);
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The raw flag (for [`Wait::until_stopped`]).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    fn register(&self, tx: Sender<KeeperMsg>) {
        self.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
    }
}

#[derive(Debug)]
#[doc(hidden)]
pub enum KeeperMsg {
    Fs,
    Stop,
}

/// Live status of the installation, shared with the agent's readiness/metrics endpoints.
#[derive(Debug, Default)]
pub struct InstallStatus {
    ready: AtomicBool,
    installs: [AtomicU64; 4],
    reinserts: AtomicU64,
    last_reinsert_latency_us: AtomicU64,
    rewrite_loop_warnings: AtomicU64,
    passes: AtomicU64,
    last_error: Mutex<Option<String>>,
    config_path: Mutex<Option<PathBuf>>,
}

fn result_index(r: InstallResult) -> usize {
    match r {
        InstallResult::Success => 0,
        InstallResult::CopyBinariesFailure => 1,
        InstallResult::CreateKubeconfigFailure => 2,
        InstallResult::CreateCniConfigFailure => 3,
    }
}

impl InstallStatus {
    pub fn new() -> InstallStatus {
        InstallStatus::default()
    }

    /// `/readyz`: true while the installed config is valid.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// `istio_cni_installs_total{result}`.
    pub fn installs(&self, r: InstallResult) -> u64 {
        self.installs[result_index(r)].load(Ordering::SeqCst)
    }

    /// Passes that had to write our CNI config again after the first install.
    pub fn reinserts(&self) -> u64 {
        self.reinserts.load(Ordering::SeqCst)
    }

    /// Time from the first file event of a burst to the completed re-insert.
    pub fn last_reinsert_latency(&self) -> Option<Duration> {
        match self.last_reinsert_latency_us.load(Ordering::SeqCst) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// How many times a rewrite loop was detected and warned about.
    pub fn rewrite_loop_warnings(&self) -> u64 {
        self.rewrite_loop_warnings.load(Ordering::SeqCst)
    }

    /// Install passes run so far (successful or not).
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::SeqCst)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The config file holding our entry, once installed.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(&self, r: InstallResult) {
        self.installs[result_index(r)].fetch_add(1, Ordering::SeqCst);
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// Is this event worth a re-check? Reads (ours included: every pass opens files) are not;
/// events on our own temp files are not; bin dir events only for our binaries.
fn relevant(ev: &notify::Event, bin_dirs: &[PathBuf], bin_names: &[String]) -> bool {
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    if ev.paths.is_empty() {
        return true;
    }
    ev.paths.iter().any(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.contains(".meshcni-tmp-") {
            return false;
        }
        match p.parent() {
            Some(parent) if bin_dirs.iter().any(|d| d == parent) => bin_names.contains(&name),
            _ => true,
        }
    })
}

struct Keeper {
    installer: Arc<Installer>,
    status: Arc<InstallStatus>,
    shutdown: Shutdown,
    rx: Receiver<KeeperMsg>,
    watcher: Option<notify::RecommendedWatcher>,
    watched: Vec<PathBuf>,
    reinsert_times: VecDeque<Instant>,
}

enum Woken {
    Event(Instant),
    Timer,
    Stop,
}

impl Keeper {
    fn watch_dirs(&mut self) {
        let cfg = self.installer.config();
        let mut dirs = vec![
            cfg.mounted_cni_net_dir.clone(),
            cfg.service_account_dir.clone(),
        ];
        dirs.extend(cfg.cni_bin_target_dirs.iter().cloned());
        if let Some(w) = self.watcher.as_mut() {
            for d in dirs {
                if self.watched.contains(&d) {
                    continue;
                }
                match w.watch(&d, RecursiveMode::NonRecursive) {
                    Ok(()) => self.watched.push(d),
                    Err(e) => {
                        tracing::debug!(dir = %d.display(), error = %e, "cannot watch yet; relying on resync")
                    }
                }
            }
        }
    }

    /// Sleep until `deadline`, an event (then debounce), or stop.
    fn sleep(&mut self, deadline: Instant, wake_on_event: bool) -> Woken {
        let tuning = self.installer.config().keeper.clone();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Woken::Timer;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(KeeperMsg::Stop) => return Woken::Stop,
                Ok(KeeperMsg::Fs) if wake_on_event => {
                    let first = Instant::now();
                    // Debounce: wait for a quiet gap, bounded by debounce_max.
                    loop {
                        let waited = first.elapsed();
                        if waited >= tuning.debounce_max {
                            break;
                        }
                        let gap = tuning.debounce.min(tuning.debounce_max - waited);
                        match self.rx.recv_timeout(gap) {
                            Ok(KeeperMsg::Stop) => return Woken::Stop,
                            Ok(KeeperMsg::Fs) => continue,
                            Err(_) => break,
                        }
                    }
                    return Woken::Event(first);
                }
                Ok(KeeperMsg::Fs) => continue,
                Err(RecvTimeoutError::Timeout) => return Woken::Timer,
                Err(RecvTimeoutError::Disconnected) => return Woken::Stop,
            }
        }
    }

    /// Delay demanded by the rewrite-loop detector (zero when calm).
    fn loop_delay(&mut self, now: Instant) -> Duration {
        let t = &self.installer.config().keeper;
        while self
            .reinsert_times
            .front()
            .is_some_and(|f| now.duration_since(*f) > t.loop_window)
        {
            self.reinsert_times.pop_front();
        }
        let n = self.reinsert_times.len();
        if n <= t.loop_threshold {
            return Duration::ZERO;
        }
        let excess = (n - t.loop_threshold - 1).min(20) as u32;
        let delay = t
            .loop_backoff_base
            .saturating_mul(1u32 << excess)
            .min(t.loop_backoff_max);
        self.status
            .rewrite_loop_warnings
            .fetch_add(1, Ordering::SeqCst);
        tracing::warn!(
            reinserts = n,
            window_s = t.loop_window.as_secs_f64(),
            delay_ms = delay.as_millis() as u64,
            "our CNI config entry keeps being removed by another component; backing off. \
             Likely cause: a primary CNI that owns the config dir exclusively \
             (Cilium: set cni.exclusive=false), or a second installer with a different config"
        );
        delay
    }

    fn run(mut self) {
        let mut initial = true;
        let mut trigger: Option<Instant> = None;
        let mut error_delay = self.installer.config().keeper.error_retry;
        let stop_wait = Wait::until_stopped(self.shutdown.flag());
        loop {
            if self.shutdown.is_triggered() {
                break;
            }
            self.watch_dirs();
            let started = trigger.unwrap_or_else(Instant::now);
            self.status.passes.fetch_add(1, Ordering::SeqCst);
            let next_wait = match self.installer.install_once(&stop_wait) {
                Ok(outcome) => {
                    self.status.record(InstallResult::Success);
                    error_delay = self.installer.config().keeper.error_retry;
                    *self
                        .status
                        .config_path
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(outcome.config_path.clone());
                    if outcome.config_written {
                        if initial {
                            tracing::info!(path = %outcome.config_path.display(), "CNI config installed");
                        } else {
                            let lat = started.elapsed();
                            self.status.reinserts.fetch_add(1, Ordering::SeqCst);
                            self.status
                                .last_reinsert_latency_us
                                .store(lat.as_micros().max(1) as u64, Ordering::SeqCst);
                            self.reinsert_times.push_back(Instant::now());
                            tracing::info!(path = %outcome.config_path.display(), latency_ms = lat.as_secs_f64() * 1e3, "CNI config entry re-inserted");
                        }
                    }
                    initial = false;
                    match self.installer.check() {
                        Ok(()) => {
                            self.status.set_ready(true);
                            self.status.set_error(None);
                            None
                        }
                        Err(e) => {
                            // Installed but not valid (e.g. preempted by a file sorting first).
                            tracing::warn!(error = %e, "installed CNI config is not valid");
                            self.status.set_ready(false);
                            self.status.set_error(Some(e.to_string()));
                            Some(error_delay)
                        }
                    }
                }
                Err(e) if e.is_cancelled() => break,
                Err(e) => {
                    tracing::error!(error = %e, "install pass failed");
                    self.status.record(e.install_result());
                    self.status.set_ready(false);
                    self.status.set_error(Some(e.to_string()));
                    let d = error_delay;
                    error_delay =
                        (error_delay * 2).min(self.installer.config().keeper.loop_backoff_max);
                    Some(d)
                }
            };
            trigger = None;
            let now = Instant::now();
            // Rewrite-loop back-off: ignore events until it has passed (they are re-checked
            // by the pass that follows).
            let backoff = self.loop_delay(now);
            if !backoff.is_zero() {
                match self.sleep(now + backoff, false) {
                    Woken::Stop => break,
                    _ => continue,
                }
            }
            let resync = self.installer.config().keeper.resync_interval;
            let deadline = now + next_wait.map_or(resync, |d| d.min(resync));
            match self.sleep(deadline, true) {
                Woken::Stop => break,
                Woken::Event(t) => trigger = Some(t),
                Woken::Timer => {}
            }
        }
        self.status.set_ready(false);
    }
}

impl Installer {
    /// Run the keeper on a new thread until `shutdown` is triggered. The keeper does not
    /// uninstall on exit: call [`Installer::uninstall`] after joining when the node is being
    /// cleaned up (not on an upgrade/restart, spec §5.5).
    pub fn spawn_keeper(
        self: &Arc<Self>,
        status: Arc<InstallStatus>,
        shutdown: Shutdown,
    ) -> std::io::Result<JoinHandle<()>> {
        let (tx, rx) = mpsc::channel();
        shutdown.register(tx.clone());
        let cfg = self.config();
        let bin_dirs = cfg.cni_bin_target_dirs.clone();
        let mut bin_names = cfg.cni_bin_names.clone();
        if bin_names.is_empty() {
            bin_names = crate::binaries::scan_sources(&cfg.cni_bin_source_dir, &[])
                .map(|s| s.into_iter().map(|s| s.name).collect())
                .unwrap_or_default();
        }
        let fs_tx = tx;
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let wanted = match &res {
                Ok(ev) => relevant(ev, &bin_dirs, &bin_names),
                // Queue overflow and other watch errors: re-check everything.
                Err(_) => true,
            };
            if wanted {
                let _ = fs_tx.send(KeeperMsg::Fs);
            }
        })
        .map_err(|e| tracing::warn!(error = %e, "no inotify watcher; relying on periodic resync"))
        .ok();
        let keeper = Keeper {
            installer: self.clone(),
            status,
            shutdown,
            rx,
            watcher,
            watched: Vec::new(),
            reinsert_times: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name("meshcni-install-keeper".into())
            .spawn(move || keeper.run())
    }
}
