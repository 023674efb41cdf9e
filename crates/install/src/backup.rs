//! What uninstall needs to give the operator their CNI config back byte for byte (issue 7
//! item 5). Editing the primary's file in place re-renders it (Go `MarshalIndent`, sorted keys,
//! like the reference) and turns a `.conf` into a `.conflist`; the installer therefore keeps,
//! in its state dir, a record of the primary's file as it was before our edit (name, exact
//! bytes, mode, owner) and of the exact bytes we wrote.
//!
//! The rule applied at uninstall ([`plan`]):
//!
//! 1. The file we wrote is still exactly what we wrote, or it is the recorded original plus
//!    one entry of ours (same JSON values, any formatting, any version of our entry) → the
//!    original bytes go back under the original name (and mode/owner); a `.conflist` we made
//!    from a `.conf` is removed once the `.conf` is back.
//! 2. Otherwise (the primary rewrote its file while we were installed and kept our entry in it,
//!    or no original is known) → only our entry is cut out of the file's current bytes
//!    ([`crate::conflist::remove_preserving`]); everything else stays as the primary wrote it.
//! 3. The file we wrote is gone, or a `.conf` we converted has meanwhile been written again by
//!    the primary → our `.conflist` is removed / the primary's files are left as they are.
//!
//! Which version is "the original": the last version of the primary's file that held no entry
//! of an owned type when we edited it (a primary that rewrites its file without our entry
//! makes its new version the original). A file that already held an owned entry we did not
//! write (a migration from `istio-cni`, a record lost with a reboot of a tmpfs state dir) has
//! no restorable original: rule 2 applies.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conflist::{self, OwnedTypes};
use crate::fsutil::{self, ModePolicy};

/// File name of the record in the state dir (never a CNI config extension, so a state dir that
/// is the CNI config dir itself is safe).
pub const BACKUP_FILE: &str = "meshcni-cni-config.backup";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

mod bytes_b64 {
    use super::*;
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b64().encode(b))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        b64().decode(s).map_err(serde::de::Error::custom)
    }
}

/// The primary's file before our edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Original {
    /// File name in the CNI config dir (`10-bridge.conf` for a converted `.conf`).
    pub name: String,
    #[serde(with = "bytes_b64")]
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The record kept in the state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// Format version (1).
    pub version: u32,
    /// The file holding our entry, and the exact bytes we last wrote to it.
    pub written_name: String,
    #[serde(with = "bytes_b64")]
    pub written: Vec<u8>,
    /// The primary's own version, when known (see the module docs).
    pub original: Option<Original>,
}

/// What uninstall does with the primary's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Rule 1: write `original` back (and remove the written file if its name differs).
    Restore(Original),
    /// Rule 2: cut our entry out of the written file's current bytes.
    RemoveEntry,
    /// Rule 3: remove the written file (a `.conflist` we created from a `.conf` that the
    /// primary has written again since).
    RemoveWritten,
    /// Rule 3: the written file is gone; nothing to do.
    Nothing,
}

/// Does this config (a `.conf` or a list) hold an entry of an owned type?
pub fn has_owned_entry(content: &[u8], owned: &OwnedTypes) -> bool {
    let Ok(doc) = serde_json::from_slice::<Value>(content) else {
        return false;
    };
    conflist::plugin_types(&doc)
        .iter()
        .any(|t| owned.matches(t))
}

/// Decide what uninstall does (pure). `current` is the written file's content now (None:
/// gone); `original_exists_now` whether a file with the original's name exists now (only
/// consulted when that name differs from the written one).
pub fn plan(
    rec: &Backup,
    current: Option<&[u8]>,
    original_exists_now: bool,
    owned: &OwnedTypes,
) -> Plan {
    let Some(cur) = current else {
        return Plan::Nothing;
    };
    let Some(orig) = &rec.original else {
        return Plan::RemoveEntry;
    };
    if orig.name != rec.written_name && original_exists_now {
        return Plan::RemoveWritten;
    }
    if cur == rec.written.as_slice() || is_original_plus_ours(cur, &orig.content, owned) {
        return Plan::Restore(orig.clone());
    }
    Plan::RemoveEntry
}

/// Is `cur` (as JSON values) exactly what inserting its one owned entry into `original` gives?
fn is_original_plus_ours(cur: &[u8], original: &[u8], owned: &OwnedTypes) -> bool {
    let Ok(cur_doc) = serde_json::from_slice::<Value>(cur) else {
        return false;
    };
    let Some(plugins) = cur_doc.get("plugins").and_then(Value::as_array) else {
        return false;
    };
    let ours: Vec<&Value> = plugins
        .iter()
        .filter(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| owned.matches(t))
        })
        .collect();
    let [entry] = ours.as_slice() else {
        return false;
    };
    conflist::insert_value((*entry).clone(), original, owned).is_ok_and(|want| want == cur_doc)
}

/// Record path for a state dir.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(BACKUP_FILE)
}

/// Load the record; `Ok(None)` when there is none.
pub fn load(path: &Path) -> io::Result<Option<Backup>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Save the record atomically (0600; the state dir is created if missing).
pub fn save(path: &Path, rec: &Backup) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec(rec).map_err(io::Error::other)?;
    fsutil::atomic_write(path, &bytes, ModePolicy::Fixed(0o600))
}

/// The [`Original`] of a file about to be edited.
pub fn original_of(path: &Path, content: &[u8]) -> io::Result<Original> {
    let m = fs::metadata(path)?;
    Ok(Original {
        name: file_name(path),
        content: content.to_vec(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
    })
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned() -> OwnedTypes {
        OwnedTypes::new("meshcni", &["istio-cni"])
    }

    fn orig(name: &str, content: &str) -> Original {
        Original {
            name: name.into(),
            content: content.as_bytes().to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    fn rec(written_name: &str, written: &str, original: Option<Original>) -> Backup {
        Backup {
            version: 1,
            written_name: written_name.into(),
            written: written.as_bytes().to_vec(),
            original,
        }
    }

    const ORIG: &str = "{\"name\":\"n\",\n \"plugins\":[{\"type\":\"bridge\"}]}";

    #[test]
    fn exact_or_equivalent_content_restores() {
        let r = rec("a.conflist", "WRITTEN", Some(orig("a.conflist", ORIG)));
        assert_eq!(
            plan(&r, Some(b"WRITTEN"), false, &owned()),
            Plan::Restore(orig("a.conflist", ORIG))
        );
        // Same values, other formatting, another version of our entry.
        let cur = br#"{"plugins":[{"type":"bridge"},{"type":"meshcni","v":2}],"name":"n"}"#;
        assert!(matches!(
            plan(&r, Some(cur), false, &owned()),
            Plan::Restore(_)
        ));
        // The primary changed something: cut our entry only.
        let cur = br#"{"plugins":[{"type":"bridge","mtu":1},{"type":"meshcni"}],"name":"n"}"#;
        assert_eq!(plan(&r, Some(cur), false, &owned()), Plan::RemoveEntry);
        // Two entries of ours: not "original + ours".
        let cur = br#"{"plugins":[{"type":"bridge"},{"type":"meshcni"},{"type":"istio-cni"}],"name":"n"}"#;
        assert_eq!(plan(&r, Some(cur), false, &owned()), Plan::RemoveEntry);
        assert_eq!(plan(&r, None, false, &owned()), Plan::Nothing);
        let r = rec("a.conflist", "WRITTEN", None);
        assert_eq!(
            plan(&r, Some(b"WRITTEN"), false, &owned()),
            Plan::RemoveEntry
        );
    }

    #[test]
    fn converted_conf() {
        let conf = "{\"type\": \"bridge\", \"cniVersion\": \"0.4.0\"}\n";
        let r = rec("a.conflist", "W", Some(orig("a.conf", conf)));
        let cur = br#"{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[{"type":"bridge"},{"type":"meshcni"}]}"#;
        assert!(matches!(
            plan(&r, Some(cur), false, &owned()),
            Plan::Restore(_)
        ));
        assert_eq!(plan(&r, Some(cur), true, &owned()), Plan::RemoveWritten);
    }

    #[test]
    fn record_round_trips_arbitrary_bytes() {
        let mut r = rec("a", "", Some(orig("b", "")));
        r.written = vec![0xff, 0, b'{'];
        let d = tempfile::tempdir().expect("tmp");
        let p = path_in(&d.path().join("state"));
        save(&p, &r).expect("save");
        assert_eq!(load(&p).expect("load"), Some(r));
        assert!(has_owned_entry(br#"{"type":"istio-cni"}"#, &owned()));
        assert!(!has_owned_entry(br#"{"plugins":[{"type":"x"}]}"#, &owned()));
    }
}
