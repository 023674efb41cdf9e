//! [`FakeDriver`]: an in-memory redirect driver for tests of the reconcile loop. It records
//! every call and can be told to fail.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::enroll::{Action, EnrolledState, PodId};
use crate::seam::{
    DriverError, DriverEvent, DriverEvents, RedirectDriver, ZtunnelInfo, ZtunnelSource,
};

/// What [`FakeDriver`] has "programmed", shared with the test that created it.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub enrolled: EnrolledState,
    pub ztunnel: Option<ZtunnelInfo>,
    /// Every call, rendered (`actual`, `apply <action>`, `ztunnel <name|none>`, `uninstall`).
    pub calls: Vec<String>,
    /// Fail the next N calls of `apply` with this error.
    pub fail_apply: Vec<DriverError>,
    /// Fail `apply` for these UIDs (pod-scoped) until removed.
    pub fail_uids: BTreeSet<String>,
    /// Fail the next N calls of `actual`.
    pub fail_actual: u32,
    /// When set, `apply` of an Enroll/UpdateIps fails (driver-scoped) while no ztunnel is
    /// known, like the G1 iptables mode whose ipset exists only once ztunnel is up.
    pub require_ztunnel: bool,
    /// Handle IPv4 addresses only (like the node-level iptables mode).
    pub ipv4_only: bool,
    /// Behave like a mode whose proxy connects to it (in-pod/ZDS): `ztunnel_source()` is
    /// `Connected`; the test reports connects through [`FakeDriver::emit`].
    pub connected: bool,
    /// Behave like a mode that works inside the pod netns (`needs_netns()`).
    pub needs_netns: bool,
    /// The loop's event sink, once attached.
    pub events: Option<DriverEvents>,
}

/// An in-memory [`RedirectDriver`] for tests: records calls, keeps the enrolled set, can be
/// told to fail.
#[derive(Debug, Clone, Default)]
pub struct FakeDriver {
    pub dataplane: Arc<Mutex<FakeDataplane>>,
}

impl FakeDriver {
    pub fn new() -> FakeDriver {
        FakeDriver::default()
    }

    /// A driver whose dataplane already holds `state` (an agent restart).
    pub fn with_state(state: EnrolledState) -> FakeDriver {
        let d = FakeDriver::default();
        d.lock().enrolled = state;
        d
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeDataplane> {
        self.dataplane.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send `event` to the loop as the driver would; `false` if no loop attached yet.
    pub fn emit(&self, event: DriverEvent) -> bool {
        let sink = self.lock().events.clone();
        sink.map(|s| s.send(event)).is_some()
    }
}

impl RedirectDriver for FakeDriver {
    fn name(&self) -> &str {
        "fake"
    }

    fn handles(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() || !self.dataplane.lock().is_ok_and(|d| d.ipv4_only)
    }

    fn actual(&mut self) -> Result<EnrolledState, DriverError> {
        let mut d = self.lock();
        d.calls.push("actual".into());
        if d.fail_actual > 0 {
            d.fail_actual -= 1;
            return Err(DriverError::driver("fake: listing enrolled pods failed"));
        }
        // Like a real dataplane, only UIDs, IPs (and the netns a netns mode holds) survive.
        let mut s = EnrolledState::default();
        for (uid, p) in &d.enrolled.pods {
            s.insert(PodId::new(uid, "", ""), p.ips.iter().copied());
            if let Some(e) = s.pods.get_mut(uid) {
                e.netns = p.netns;
            }
        }
        Ok(s)
    }

    fn apply(&mut self, action: &Action) -> Result<(), DriverError> {
        let mut d = self.lock();
        d.calls.push(format!("apply {action}"));
        if !d.fail_apply.is_empty() {
            return Err(d.fail_apply.remove(0));
        }
        if d.fail_uids.contains(&action.pod().uid) {
            return Err(DriverError::pod(format!(
                "fake: {} fails for {}",
                action.kind(),
                action.pod()
            )));
        }
        if d.require_ztunnel && d.ztunnel.is_none() && !matches!(action, Action::Release { .. }) {
            return Err(DriverError::driver("fake: no ztunnel, node rules missing"));
        }
        d.enrolled.apply(action);
        Ok(())
    }

    fn ztunnel_changed(&mut self, ztunnel: Option<&ZtunnelInfo>) -> Result<(), DriverError> {
        let mut d = self.lock();
        d.calls.push(format!(
            "ztunnel {}",
            ztunnel.map_or("none".to_string(), |z| z.pod.name.clone())
        ));
        d.ztunnel = ztunnel.cloned();
        Ok(())
    }

    fn ztunnel_source(&self) -> ZtunnelSource {
        if self.lock().connected {
            ZtunnelSource::Connected
        } else {
            ZtunnelSource::Watched
        }
    }

    fn attach(&mut self, events: DriverEvents) {
        self.lock().events = Some(events);
    }

    fn needs_netns(&self) -> bool {
        self.lock().needs_netns
    }

    fn uninstall(&mut self) -> Result<(), DriverError> {
        let mut d = self.lock();
        d.calls.push("uninstall".into());
        d.enrolled = EnrolledState::default();
        d.ztunnel = None;
        Ok(())
    }
}
