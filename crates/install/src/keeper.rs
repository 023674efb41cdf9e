//! The keeper: keeps the installation in place (spec §5.2 steps 2–3). Runs on its own std
//! thread: an install pass, then sleep until a file event (inotify on the CNI config dir, the
//! bin target dirs and the service-account dir), the periodic resync, or shutdown, and run the
//! (idempotent) pass again at once — no debounce, no back-off: a removed entry is put back
//! as fast as the pass runs.
//!
//! Readiness is closed by the watcher itself: every relevant event runs the readiness check
//! on the watcher thread, so `/readyz` says "our entry is not in the file" within
//! milliseconds even while the keeper is busy (in a pass, or waiting for a deleted primary
//! file to come back). Only the keeper's pass opens it again.
//!
//! A primary CNI that keeps deleting our entry (Cilium with `cni.exclusive=true`) is detected
//! (more than `loop_threshold` re-inserts within `loop_window`) and reported with a warning at
//! growing intervals instead of one log line per re-insert; the re-inserts themselves are
//! never delayed.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::cniconfig::Wait;
use crate::error::{InstallError, InstallResult};
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
    max_reinsert_latency_us: AtomicU64,
    rewrite_loop_warnings: AtomicU64,
    passes: AtomicU64,
    last_error: Mutex<Option<String>>,
    config_path: Mutex<Option<PathBuf>>,
    /// Serialises readiness transitions: each one is "check the files, then set the flag", so
    /// the flag always reflects the last check (a watcher probe and the keeper's end-of-pass
    /// check never overwrite each other's newer result).
    transition: Mutex<Transition>,
}

#[derive(Debug, Default)]
struct Transition {
    /// First time the installation was seen broken since it was last seen complete.
    broken_since: Option<Instant>,
    /// Last time the installation was seen complete.
    complete_at: Option<Instant>,
}

fn result_index(r: InstallResult) -> usize {
    match r {
        InstallResult::Success => 0,
        InstallResult::CopyBinariesFailure => 1,
        InstallResult::CreateKubeconfigFailure => 2,
        InstallResult::CreateCniConfigFailure => 3,
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl InstallStatus {
    pub fn new() -> InstallStatus {
        InstallStatus::default()
    }

    /// `/readyz`: true while the installed config is valid. Closed within milliseconds of a
    /// file event that breaks the installation (the watcher checks at once, whatever the
    /// keeper is doing), reopened by the keeper's pass that repairs it.
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

    /// Time our entry was missing before the last re-insert: from the removal (the earliest of
    /// the first failed check — the watcher checks on every file event — and the modification
    /// time of the file without our entry, never before the entry was last known present) to
    /// the completed re-insert.
    pub fn last_reinsert_latency(&self) -> Option<Duration> {
        match self.last_reinsert_latency_us.load(Ordering::SeqCst) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The longest [`InstallStatus::last_reinsert_latency`] seen since start.
    pub fn max_reinsert_latency(&self) -> Option<Duration> {
        match self.max_reinsert_latency_us.load(Ordering::SeqCst) {
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

    fn transition(&self) -> std::sync::MutexGuard<'_, Transition> {
        self.transition.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check the installation now and close readiness if it is broken (never opens it: that
    /// is the keeper's job after a pass). `at` is when the triggering event was seen.
    fn close_if_broken(&self, installer: &Installer, at: Instant) {
        if installer.installed_config_path().is_none() {
            return; // Not installed yet: readiness is still closed.
        }
        let mut t = self.transition();
        if !self.ready() {
            // Already closed, and whoever closed it recorded when (the lock orders this with
            // the keeper's end-of-pass check, which sees any later removal).
            return;
        }
        if let Err(e) = installer.check() {
            tracing::debug!(error = %e, "installation broken; readiness closed");
            self.set_ready(false);
            self.set_error(Some(e.to_string()));
            t.broken_since.get_or_insert(at);
        }
    }

    /// End of a pass: check and set readiness accordingly; returns the check's result with what
    /// was known before it (when the installation was first seen broken, cleared once it is
    /// complete again, and when it was last seen complete).
    fn settle(&self, installer: &Installer) -> Settled {
        let mut t = self.transition();
        let res = installer.check();
        let broken_since = t.broken_since;
        let complete_before = t.complete_at;
        match &res {
            Ok(()) => {
                self.set_ready(true);
                self.set_error(None);
                t.broken_since = None;
                t.complete_at = Some(Instant::now());
            }
            Err(e) => {
                self.set_ready(false);
                self.set_error(Some(e.to_string()));
                t.broken_since.get_or_insert_with(Instant::now);
            }
        }
        Settled {
            check: res,
            broken_since,
            complete_before,
        }
    }

    fn record_reinsert_latency(&self, lat: Duration) {
        self.reinserts.fetch_add(1, Ordering::SeqCst);
        self.last_reinsert_latency_us
            .store(us(lat), Ordering::SeqCst);
        self.max_reinsert_latency_us
            .fetch_max(us(lat), Ordering::SeqCst);
    }
}

/// The end-of-pass check and what was known before it.
struct Settled {
    check: Result<(), InstallError>,
    /// When the installation was first seen broken (None: it was not).
    broken_since: Option<Instant>,
    /// When it was last seen complete before this check.
    complete_before: Option<Instant>,
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

/// Convert a file modification time into an [`Instant`] (None if in the future or too old to
/// represent).
fn mtime_instant(path: &std::path::Path) -> Option<Instant> {
    let mtime = std::fs::metadata(path).ok()?.modified().ok()?;
    let age = SystemTime::now().duration_since(mtime).ok()?;
    Instant::now().checked_sub(age)
}

/// Rewrite-loop detection. It only throttles *logging*: every removal of our entry is answered
/// by an immediate re-insert, however often it happens.
#[derive(Debug, Default)]
struct LoopLog {
    reinsert_times: VecDeque<Instant>,
    /// Warnings emitted during the current loop (drives the growing interval).
    warnings: u32,
    next_warning_at: Option<Instant>,
    /// Re-inserts logged at debug level only since the last warning, and their worst latency.
    quiet_reinserts: u64,
    quiet_max_latency: Duration,
}

struct Keeper {
    installer: Arc<Installer>,
    status: Arc<InstallStatus>,
    shutdown: Shutdown,
    rx: Receiver<KeeperMsg>,
    watcher: Option<notify::RecommendedWatcher>,
    watched: Vec<PathBuf>,
    loop_log: LoopLog,
}

enum Woken {
    Event,
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

    /// Sleep until `deadline`, a file event or stop. Events already queued are taken together
    /// (the pass that follows covers all of them); there is no debounce: a removal of our
    /// entry is answered at once.
    fn sleep(&mut self, deadline: Instant) -> Woken {
        let now = Instant::now();
        match self
            .rx
            .recv_timeout(deadline.saturating_duration_since(now))
        {
            Ok(KeeperMsg::Stop) => return Woken::Stop,
            Ok(KeeperMsg::Fs) => {}
            Err(RecvTimeoutError::Timeout) => return Woken::Timer,
            Err(RecvTimeoutError::Disconnected) => return Woken::Stop,
        }
        loop {
            match self.rx.try_recv() {
                Ok(KeeperMsg::Stop) => return Woken::Stop,
                Ok(KeeperMsg::Fs) => {}
                Err(_) => return Woken::Event,
            }
        }
    }

    /// Log a re-insert: one info line each while calm; in a rewrite loop (more than
    /// `loop_threshold` re-inserts within `loop_window`) a warning at growing intervals
    /// summarising the re-inserts since the previous one, the rest at debug level.
    fn log_reinsert(&mut self, now: Instant, lat: Duration, path: &std::path::Path) {
        let t = self.installer.config().keeper.clone();
        let l = &mut self.loop_log;
        l.reinsert_times.push_back(now);
        while l
            .reinsert_times
            .front()
            .is_some_and(|f| now.duration_since(*f) > t.loop_window)
        {
            l.reinsert_times.pop_front();
        }
        let n = l.reinsert_times.len();
        let latency_ms = lat.as_secs_f64() * 1e3;
        if n <= t.loop_threshold {
            l.warnings = 0;
            l.next_warning_at = None;
            tracing::info!(path = %path.display(), latency_ms, "CNI config entry re-inserted");
            return;
        }
        l.quiet_reinserts += 1;
        l.quiet_max_latency = l.quiet_max_latency.max(lat);
        tracing::debug!(path = %path.display(), latency_ms, "CNI config entry re-inserted");
        if l.next_warning_at.is_some_and(|at| now < at) {
            return;
        }
        let interval = t
            .loop_backoff_base
            .saturating_mul(1u32 << l.warnings.min(20))
            .min(t.loop_backoff_max);
        l.warnings = l.warnings.saturating_add(1);
        l.next_warning_at = Some(now + interval);
        self.status
            .rewrite_loop_warnings
            .fetch_add(1, Ordering::SeqCst);
        tracing::warn!(
            path = %path.display(),
            reinserts = n,
            window_s = t.loop_window.as_secs_f64(),
            reinserts_since_last_warning = l.quiet_reinserts,
            max_latency_ms = l.quiet_max_latency.as_secs_f64() * 1e3,
            next_warning_in_ms = interval.as_millis() as u64,
            "our CNI config entry keeps being removed by another component; it is re-inserted \
             every time (only this warning is throttled). Likely cause: a primary CNI that owns \
             the config dir exclusively (Cilium: set cni.exclusive=false), or a second \
             installer with a different config"
        );
        l.quiet_reinserts = 0;
        l.quiet_max_latency = Duration::ZERO;
    }

    /// When our entry went missing: the earliest of the first failed check (the watcher's,
    /// stamped when the event was seen, or the keeper's) and the modification time of the file
    /// without our entry, but never before the entry was last known to be present (our own
    /// previous write or verification, or the last complete check): an mtime older than that
    /// belongs to a file version already seen with our entry, e.g. our own write.
    fn removal_time(
        settled: &Settled,
        present_before: Option<Instant>,
        mtime: Option<Instant>,
        pass_start: Instant,
    ) -> Instant {
        let lower = settled.complete_before.max(present_before);
        let mtime = mtime.filter(|m| lower.is_none_or(|l| *m > l));
        let earliest = [settled.broken_since, mtime]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(pass_start);
        match lower {
            Some(l) => earliest.max(l),
            None => earliest,
        }
    }

    fn run(mut self) {
        let mut initial = true;
        // When our entry was last known to be in the file: right after our write, or at the
        // start of a pass that found it current.
        let mut present_at: Option<Instant> = None;
        let tuning = self.installer.config().keeper.clone();
        let mut error_delay = tuning.error_retry;
        let stop_wait = Wait::until_stopped(self.shutdown.flag());
        loop {
            if self.shutdown.is_triggered() {
                break;
            }
            self.watch_dirs();
            let pass_start = Instant::now();
            // Resync passes and missed events: close readiness first if something is broken.
            self.status.close_if_broken(&self.installer, pass_start);
            let mtime = self
                .installer
                .installed_config_path()
                .and_then(|p| mtime_instant(&p));
            self.status.passes.fetch_add(1, Ordering::SeqCst);
            let next_wait = match self.installer.install_once(&stop_wait) {
                Ok(outcome) => {
                    let written_at = Instant::now();
                    self.status.record(InstallResult::Success);
                    error_delay = tuning.error_retry;
                    *self
                        .status
                        .config_path
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(outcome.config_path.clone());
                    let settled = self.status.settle(&self.installer);
                    if outcome.config_written {
                        if initial {
                            tracing::info!(path = %outcome.config_path.display(), "CNI config installed");
                        } else {
                            let removed_at =
                                Self::removal_time(&settled, present_at, mtime, pass_start);
                            let lat = written_at.saturating_duration_since(removed_at);
                            self.status.record_reinsert_latency(lat);
                            self.log_reinsert(written_at, lat, &outcome.config_path);
                        }
                        present_at = Some(written_at);
                    } else {
                        present_at = Some(pass_start);
                    }
                    initial = false;
                    match settled.check {
                        Ok(()) => None,
                        Err(e) => {
                            // Installed but not valid (e.g. preempted by a file sorting first).
                            tracing::warn!(error = %e, "installed CNI config is not valid");
                            Some(error_delay)
                        }
                    }
                }
                Err(e) if e.is_cancelled() => break,
                Err(e) => {
                    tracing::error!(error = %e, "install pass failed");
                    self.status.record(e.install_result());
                    {
                        let mut t = self.status.transition();
                        self.status.set_ready(false);
                        self.status.set_error(Some(e.to_string()));
                        t.broken_since.get_or_insert(pass_start);
                    }
                    let d = error_delay;
                    error_delay = (error_delay * 2).min(tuning.resync_interval);
                    Some(d)
                }
            };
            let deadline = Instant::now()
                + next_wait.map_or(tuning.resync_interval, |d| d.min(tuning.resync_interval));
            if let Woken::Stop = self.sleep(deadline) {
                break;
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
        let (probe_installer, probe_status) = (self.clone(), status.clone());
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let wanted = match &res {
                Ok(ev) => relevant(ev, &bin_dirs, &bin_names),
                // Queue overflow and other watch errors: re-check everything.
                Err(_) => true,
            };
            if wanted {
                let at = Instant::now();
                let _ = fs_tx.send(KeeperMsg::Fs);
                // Readiness on this (the watcher's) thread, in parallel with the keeper's pass:
                // it must not wait for the keeper, which may be in the middle of a pass or
                // waiting for a deleted primary file to come back.
                probe_status.close_if_broken(&probe_installer, at);
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
            loop_log: LoopLog::default(),
        };
        std::thread::Builder::new()
            .name("meshcni-install-keeper".into())
            .spawn(move || keeper.run())
    }
}
