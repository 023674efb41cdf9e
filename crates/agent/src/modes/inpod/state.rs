//! What the in-pod mode remembers across agent restarts: one record per enrolled pod, in a
//! JSON file in the run dir (written to a temp file and renamed over the old one: a crash
//! leaves the old or the new file, never a torn one; a lost update only makes the next agent
//! enroll or release that pod again, which is idempotent).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::enroll::NetnsId;

/// One enrolled pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// The pod's annotations that shape its rules (all of them are kept; they are small).
    pub annotations: BTreeMap<String, String>,
    /// The sandbox netns path from the CNI ADD (empty when the netns was discovered).
    pub netns_path: PathBuf,
    /// Its identity when enrolled.
    #[serde(with = "netns_id")]
    pub netns_id: NetnsId,
}

impl PodRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

mod netns_id {
    use super::NetnsId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(id: &NetnsId, s: S) -> Result<S::Ok, S::Error> {
        (id.dev, id.ino).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NetnsId, D::Error> {
        let (dev, ino) = <(u64, u64)>::deserialize(d)?;
        Ok(NetnsId { dev, ino })
    }
}

/// The state file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InpodState {
    /// uid → record.
    pub pods: BTreeMap<String, PodRecord>,
}

/// Largest state file read (1,000 pods take about 400 KiB).
const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

impl InpodState {
    /// The file's content; an absent file is an empty state.
    pub fn load(path: &Path) -> Result<InpodState, String> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(InpodState::default());
            }
            Err(e) => return Err(format!("cannot read state file {}: {e}", path.display())),
        };
        if meta.len() > MAX_STATE_BYTES {
            return Err(format!(
                "state file {} is {} bytes, over the {MAX_STATE_BYTES} limit",
                path.display(),
                meta.len()
            ));
        }
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read state file {}: {e}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("state file {} is not valid: {e}", path.display()))
    }

    /// Replace the file with this state (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let fail = |what: &str, e: std::io::Error| {
            format!("cannot write state file {}: {what}: {e}", path.display())
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail("create its directory", e))?;
        }
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(self).map_err(|e| format!("state file: {e}"))?;
        std::fs::write(&tmp, bytes).map_err(|e| fail("write the temp file", e))?;
        std::fs::rename(&tmp, path).map_err(|e| fail("rename the temp file onto it", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/inpod.json");
        assert_eq!(
            InpodState::load(&p).expect("missing"),
            InpodState::default()
        );
        let mut s = InpodState::default();
        s.pods.insert(
            "u1".into(),
            PodRecord {
                namespace: "ns".into(),
                name: "p".into(),
                service_account: "sa".into(),
                ips: vec![
                    "10.0.0.2".parse().expect("ip"),
                    "fd00::2".parse().expect("ip"),
                ],
                annotations: BTreeMap::from([("a".into(), "b".into())]),
                netns_path: "/var/run/netns/cni-1".into(),
                netns_id: NetnsId { dev: 4, ino: 9 },
            },
        );
        s.save(&p).expect("save");
        assert_eq!(InpodState::load(&p).expect("load"), s);
        std::fs::write(&p, b"{not json").expect("corrupt");
        let e = InpodState::load(&p).expect_err("corrupt state is an error");
        assert!(e.contains("is not valid"), "{e}");
    }
}
