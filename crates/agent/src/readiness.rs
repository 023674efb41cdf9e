//! Readiness as a set of named gates. `/readyz` answers 200 only when every registered gate is
//! open; the body lists the closed ones so an operator sees *why* the agent is not ready.
//!
//! Gates registered by the agent (see `run.rs`): `install` (the installer reports the plugin
//! binary, kubeconfig and CNI config valid) and, with ambient enabled, `redirect-mode` (the
//! redirect mode driver is up; ztunnel being connected is *not* required, as in Istio §7.7).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// One gate; cheap to clone and flip from any thread.
#[derive(Debug, Clone)]
pub struct Gate {
    open: Arc<AtomicBool>,
}

impl Gate {
    pub fn set(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }
}

/// A gate whose state is computed on demand (e.g. read from the installer's status flag):
/// `Ok(())` = open, `Err(reason)` = closed, with the reason shown on `/readyz` and in the log.
type Probe = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
enum GateKind {
    Flag(Gate),
    Probe(Probe),
}

impl GateKind {
    fn check(&self) -> Result<(), String> {
        match self {
            GateKind::Flag(g) if g.is_open() => Ok(()),
            GateKind::Flag(_) => Err(String::new()),
            GateKind::Probe(p) => p(),
        }
    }
}

/// The set of gates.
#[derive(Clone, Default)]
pub struct Readiness {
    gates: Arc<Mutex<BTreeMap<String, GateKind>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("closed", &self.closed())
            .finish()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a flag gate (initially closed) and return its handle.
    pub fn gate(&self, name: &str) -> Gate {
        let g = Gate {
            open: Arc::new(AtomicBool::new(false)),
        };
        self.lock()
            .insert(name.to_string(), GateKind::Flag(g.clone()));
        g
    }

    /// Register a gate whose state is read from `probe` at every check.
    pub fn probe(
        &self,
        name: &str,
        probe: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.lock()
            .insert(name.to_string(), GateKind::Probe(Arc::new(probe)));
    }

    /// Closed gates, sorted by name, as `name` or `name (reason)`. Empty ⇔ ready. With no
    /// gates registered the agent is not ready (nothing has been started yet).
    pub fn closed(&self) -> Vec<String> {
        let gates = self.lock();
        if gates.is_empty() {
            return vec!["<no gates registered>".to_string()];
        }
        gates
            .iter()
            .filter_map(|(n, g)| match g.check() {
                Ok(()) => None,
                Err(r) if r.is_empty() => Some(n.clone()),
                Err(r) => Some(format!("{n} ({r})")),
            })
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.closed().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, GateKind>> {
        self.gates.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_gates_open() {
        let r = Readiness::new();
        assert!(!r.is_ready(), "no gates ⇒ not ready");
        let a = r.gate("install");
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        r.probe("redirect-mode", move || {
            if f2.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("driver starting".into())
            }
        });
        assert_eq!(
            r.closed(),
            vec!["install", "redirect-mode (driver starting)"]
        );
        a.set(true);
        assert_eq!(r.closed(), vec!["redirect-mode (driver starting)"]);
        flag.store(true, Ordering::SeqCst);
        assert!(r.is_ready());
        a.set(false);
        assert_eq!(r.closed(), vec!["install"]);
    }
}
