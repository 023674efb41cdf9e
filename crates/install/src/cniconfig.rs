//! The CNI config directory edge (spec §5.3): list valid config files kubelet-style, resolve
//! the file to edit (waiting for the primary CNI to write one), decide whether it is valid,
//! write our entry, and undo it. The content decisions are delegated to [`crate::conflist`].

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use notify::Watcher as _;
use serde_json::Value;

use crate::config::InstallConfig;
use crate::conflist::{self, ConfigError};
use crate::error::InstallError;
use crate::fsutil::{self, ModePolicy};

/// Bounds on a blocking wait for a config file to appear: a deadline and/or a stop flag.
#[derive(Debug, Clone, Default)]
pub struct Wait {
    pub deadline: Option<Instant>,
    pub stop: Option<Arc<AtomicBool>>,
}

impl Wait {
    /// Do not wait at all: fail with `Timeout` if the file is not there.
    pub fn no_wait() -> Wait {
        Wait {
            deadline: Some(Instant::now()),
            stop: None,
        }
    }

    pub fn timeout(d: Duration) -> Wait {
        Wait {
            deadline: Some(Instant::now() + d),
            stop: None,
        }
    }

    pub fn until_stopped(stop: Arc<AtomicBool>) -> Wait {
        Wait {
            deadline: None,
            stop: Some(stop),
        }
    }

    fn stopped(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }
}

/// Poll interval while waiting; inotify wakes us earlier when the directory changes.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Repeat `probe` until it yields a value, waking on changes in `dir`.
fn wait_for<T>(
    dir: &Path,
    wait: &Wait,
    what: impl Fn() -> String,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, InstallError> {
    if let Some(v) = probe() {
        return Ok(v);
    }
    let (tx, rx) = mpsc::channel();
    // Best effort: without a watch (dir missing, inotify limits) we still poll.
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.send(());
    })
    .ok();
    let mut watching = false;
    loop {
        if wait.stopped() {
            return Err(InstallError::Cancelled { what: what() });
        }
        let now = Instant::now();
        let mut timeout = WAIT_POLL;
        if let Some(d) = wait.deadline {
            if now >= d {
                return Err(InstallError::Timeout { what: what() });
            }
            timeout = timeout.min(d - now);
        }
        if !watching && let Some(w) = watcher.as_mut() {
            watching = w.watch(dir, notify::RecursiveMode::NonRecursive).is_ok();
            // What appeared between the first probe and the watch has no event: look
            // again now instead of after a whole poll interval.
            if watching && let Some(v) = probe() {
                return Ok(v);
            }
        }
        let _ = rx.recv_timeout(timeout);
        while rx.try_recv().is_ok() {}
        if let Some(v) = probe() {
            return Ok(v);
        }
    }
}

/// Read the directory: `(name, content)` of every regular `.conf`/`.conflist` file.
fn read_config_files(dir: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !conflist::has_config_extension(&name) {
            continue;
        }
        // A file can vanish between readdir and read (another writer's rename): skip it.
        if let Ok(content) = fs::read(entry.path()) {
            out.push((name, content));
        }
    }
    Ok(out)
}

/// `getConfigFilenames`: valid config file names in `dir`, lexically sorted. Errors if the
/// directory cannot be read or holds no valid file.
pub fn get_config_filenames(dir: &Path) -> Result<Vec<String>, InstallError> {
    let files =
        read_config_files(dir).map_err(|e| InstallError::io("reading CNI config dir", dir, e))?;
    let names = conflist::valid_config_names(files.iter().map(|(n, c)| (n.as_str(), c.as_slice())));
    if names.is_empty() {
        return Err(InstallError::NoValidConfig {
            dir: dir.to_path_buf(),
        });
    }
    Ok(names)
}

/// `X.conf` missing but `X.conflist` present (or vice versa) → use the one that exists.
fn existing_variant(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let s = path.to_string_lossy();
    if s.ends_with(".conf") {
        let alt = PathBuf::from(format!("{s}list"));
        if alt.exists() {
            return Some(alt);
        }
    }
    if let Some(stripped) = s.strip_suffix("list")
        && s.ends_with(".conflist")
    {
        let alt = PathBuf::from(stripped);
        if alt.exists() {
            return Some(alt);
        }
    }
    None
}

/// The primary CNI config file: `cni_conf_name` (with the .conf/.conflist fallback) or the
/// first valid file, skipping `exclude` (our owned file). Waits per `wait`.
pub fn resolve_primary(
    cfg: &InstallConfig,
    exclude: Option<&str>,
    wait: &Wait,
) -> Result<PathBuf, InstallError> {
    let dir = &cfg.mounted_cni_net_dir;
    let name = if cfg.cni_conf_name.is_empty() {
        wait_for(
            dir,
            wait,
            || format!("a valid CNI config file in {}", dir.display()),
            || {
                let files = read_config_files(dir).ok()?;
                conflist::valid_config_names(
                    files
                        .iter()
                        .filter(|(n, _)| Some(n.as_str()) != exclude)
                        .map(|(n, c)| (n.as_str(), c.as_slice())),
                )
                .into_iter()
                .next()
            },
        )?
    } else {
        cfg.cni_conf_name.clone()
    };
    let path = dir.join(&name);
    wait_for(
        dir,
        wait,
        || format!("CNI config file {}", path.display()),
        || existing_variant(&path),
    )
}

/// `getCNIConfigFilepath`: the file our entry goes into. Standalone: `cni_conf_name` or
/// `YYY-<type>.conf` (no waiting). Chained: the primary (waiting for it).
pub fn resolve_config_path(cfg: &InstallConfig, wait: &Wait) -> Result<PathBuf, InstallError> {
    if !cfg.chained_cni_plugin {
        return Ok(cfg.mounted_cni_net_dir.join(cfg.standalone_file_name()));
    }
    resolve_primary(cfg, None, wait)
}

fn read_doc(path: &Path) -> Result<Value, InstallError> {
    let bytes = fs::read(path).map_err(|e| InstallError::io("reading CNI config", path, e))?;
    serde_json::from_slice::<Value>(&bytes)
        .map_err(|e| InstallError::Config {
            path: path.to_path_buf(),
            source: ConfigError::InvalidJson {
                what: "CNI config",
                detail: e.to_string(),
            },
        })
        .and_then(|v| {
            if v.is_object() {
                Ok(v)
            } else {
                Err(InstallError::Config {
                    path: path.to_path_buf(),
                    source: ConfigError::NotAnObject {
                        what: "CNI config",
                        found: "a non-object",
                    },
                })
            }
        })
}

/// `checkValidCNIConfig` (reference semantics): the first valid file must be `path` (chained
/// without a configured name; otherwise a warning), `path` must exist and contain our plugin
/// type (chained list) or be our standalone config; in owned mode our owned file must exist,
/// hold our entry, and cover every plugin type of the primary.
pub fn check_valid_cni_config(cfg: &InstallConfig, path: &Path) -> Result<(), InstallError> {
    let dir = &cfg.mounted_cni_net_dir;
    let names = get_config_filenames(dir)?;
    let first = dir.join(&names[0]);
    if first != path {
        if !cfg.cni_conf_name.is_empty() || !cfg.chained_cni_plugin {
            tracing::warn!(path = %path.display(), first = %first.display(), "CNI config file preempted (ignored: name configured or standalone)");
        } else {
            return Err(InstallError::Preempted {
                path: path.to_path_buf(),
                first,
            });
        }
    }
    if !path.exists() {
        return Err(InstallError::Removed {
            path: path.to_path_buf(),
        });
    }
    let doc = read_doc(path)?;
    if !cfg.chained_cni_plugin {
        if doc.get("type").and_then(Value::as_str) != Some(cfg.plugin_type.as_str()) {
            return Err(InstallError::StandaloneModified {
                path: path.to_path_buf(),
                plugin_type: cfg.plugin_type.clone(),
            });
        }
        return Ok(());
    }
    if conflist::list_has_type(&doc, &cfg.plugin_type) != Some(true) {
        return Err(InstallError::EntryMissing {
            path: path.to_path_buf(),
            plugin_type: cfg.plugin_type.clone(),
        });
    }
    if cfg.owned_mode() {
        let owned_name = cfg.owned_file_name();
        let owned = dir.join(&owned_name);
        if !owned.exists() {
            return Err(InstallError::Removed { path: owned });
        }
        let owned_doc = read_doc(&owned)?;
        if conflist::list_has_type(&owned_doc, &cfg.plugin_type) != Some(true) {
            return Err(InstallError::EntryMissing {
                path: owned,
                plugin_type: cfg.plugin_type.clone(),
            });
        }
        if let Ok(primary) = resolve_primary(cfg, Some(&owned_name), &Wait::no_wait())
            && primary != owned
        {
            let have = conflist::plugin_types(&owned_doc);
            let missing: Vec<String> = read_doc(&primary)
                .map(|d| conflist::plugin_types(&d))
                .unwrap_or_default()
                .into_iter()
                .filter(|t| !have.contains(t))
                .collect();
            if !missing.is_empty() {
                return Err(InstallError::OwnedStale {
                    owned,
                    primary,
                    missing,
                });
            }
        }
    }
    Ok(())
}

/// Our plugin config, rendered: the G1 template (file first, then inline) after
/// substitution, or the HEAD struct.
pub fn plugin_config_bytes(cfg: &InstallConfig) -> Result<Vec<u8>, InstallError> {
    if let Some(f) = &cfg.cni_network_config_file
        && f.exists()
    {
        let t = fs::read_to_string(f)
            .map_err(|e| InstallError::io("reading CNI network config template", f, e))?;
        let rendered = conflist::substitute_template(&t, &cfg.template_vars());
        return crate::agent_settings::merge_into_template(rendered.into_bytes(), cfg)
            .map_err(InstallError::PluginConfig);
    }
    if !cfg.cni_network_config.is_empty() {
        let rendered = conflist::substitute_template(&cfg.cni_network_config, &cfg.template_vars());
        return crate::agent_settings::merge_into_template(rendered.into_bytes(), cfg)
            .map_err(InstallError::PluginConfig);
    }
    Ok(cfg
        .plugin_config()
        .map_err(InstallError::PluginConfig)?
        .render())
}

/// Identity of a file version, to notice a concurrent rewrite between our read and our write.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileVersion {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn version_of(path: &Path) -> Option<FileVersion> {
    let m = fs::metadata(path).ok()?;
    Some(FileVersion {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// What [`write_cni_config`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWrite {
    /// The file that now holds our entry (after a `.conf` → `.conflist` rename).
    pub path: PathBuf,
    /// Whether anything was written (false: already current).
    pub written: bool,
}

/// An in-place edit of the primary's file, about to be written (see
/// [`write_cni_config_observed`]).
#[derive(Debug)]
pub struct PrimaryEdit<'a> {
    /// The primary's file as read (`X.conf` for a conversion).
    pub path: &'a Path,
    /// Its content.
    pub existing: &'a [u8],
    /// The file that will hold the result (`X.conflist` for a conversion).
    pub target: &'a Path,
    /// The bytes about to be written there.
    pub new: &'a [u8],
}

/// `createCNIConfigFile` + `writeCNIConfig`: resolve (waiting per `wait`), merge and write
/// atomically. Writes only if the file is not already current. A primary file that is invalid
/// JSON or has the wrong shape is left untouched and reported.
pub fn write_cni_config(cfg: &InstallConfig, wait: &Wait) -> Result<ConfigWrite, InstallError> {
    write_cni_config_observed(cfg, wait, &mut |_| {})
}

/// [`write_cni_config`], calling `before_edit` right before the primary's file is rewritten in
/// place (not for standalone or owned files, which are ours): the installer records there
/// what uninstall needs to give the file back byte for byte.
pub fn write_cni_config_observed(
    cfg: &InstallConfig,
    wait: &Wait,
    before_edit: &mut dyn FnMut(&PrimaryEdit<'_>),
) -> Result<ConfigWrite, InstallError> {
    let plugin = plugin_config_bytes(cfg)?;
    let owned_types = cfg.owned_types();
    let new_mode = cfg.created_file_mode();
    let dir = &cfg.mounted_cni_net_dir;

    if !cfg.chained_cni_plugin {
        let path = resolve_config_path(cfg, wait)?;
        let written = fsutil::write_if_changed(&path, &plugin, ModePolicy::Fixed(new_mode))
            .map_err(|e| InstallError::io("writing standalone CNI config", &path, e))?;
        return Ok(ConfigWrite { path, written });
    }

    let entry = conflist::entry_for_list(&plugin).map_err(InstallError::PluginConfig)?;
    if cfg.owned_mode() {
        let owned_name = cfg.owned_file_name();
        let primary = resolve_primary(cfg, Some(&owned_name), wait)?;
        let existing = fs::read(&primary)
            .map_err(|e| InstallError::io("reading primary CNI config", &primary, e))?;
        let merged = conflist::insert_value(entry, &existing, &owned_types).map_err(|source| {
            InstallError::Config {
                path: primary.clone(),
                source,
            }
        })?;
        let path = dir.join(&owned_name);
        let written = fsutil::write_if_changed(
            &path,
            &conflist::render_sorted(&merged),
            ModePolicy::Fixed(new_mode),
        )
        .map_err(|e| InstallError::io("writing owned CNI config", &path, e))?;
        if let Ok(names) = get_config_filenames(dir)
            && names.first().map(String::as_str) != Some(owned_name.as_str())
        {
            tracing::warn!(owned = %owned_name, first = ?names.first(), "owned CNI config does not sort first; the runtime will not use it");
        }
        return Ok(ConfigWrite { path, written });
    }

    // In place: a concurrent rewrite by the primary between our read and our rename would be
    // lost, so re-check the file version right before writing and start over if it moved.
    for _ in 0..5 {
        let path = resolve_config_path(cfg, wait)?;
        let before = version_of(&path);
        let existing =
            fs::read(&path).map_err(|e| InstallError::io("reading CNI config", &path, e))?;
        let is_conf = path.to_string_lossy().ends_with(".conf");
        if !is_conf
            && let Ok(doc) = serde_json::from_slice::<Value>(&existing)
            && conflist::entry_is_current(&doc, &entry, &owned_types)
        {
            return Ok(ConfigWrite {
                path,
                written: false,
            });
        }
        let merged =
            conflist::insert_value(entry.clone(), &existing, &owned_types).map_err(|source| {
                InstallError::Config {
                    path: path.clone(),
                    source,
                }
            })?;
        let bytes = conflist::render_sorted(&merged);
        if version_of(&path) != before {
            continue;
        }
        // A chained .conf becomes a list: write X.conflist, then drop X.conf (runtimes see
        // either the old single config or the new list, never a list in a .conf file).
        let target = if is_conf {
            PathBuf::from(format!("{}list", path.display()))
        } else {
            path.clone()
        };
        let policy = if is_conf {
            match fs::metadata(&path) {
                Ok(m) => ModePolicy::Fixed(m.mode() & 0o7777),
                Err(_) => ModePolicy::Fixed(new_mode),
            }
        } else {
            ModePolicy::PreserveOr(new_mode)
        };
        before_edit(&PrimaryEdit {
            path: &path,
            existing: &existing,
            target: &target,
            new: &bytes,
        });
        fsutil::atomic_write(&target, &bytes, policy)
            .map_err(|e| InstallError::io("writing CNI config", &target, e))?;
        if is_conf {
            fsutil::remove_if_exists(&path)
                .map_err(|e| InstallError::io("removing converted CNI config", &path, e))?;
        }
        return Ok(ConfigWrite {
            path: target,
            written: true,
        });
    }
    Err(InstallError::Contended {
        path: dir.to_path_buf(),
    })
}

/// Undo our config change (spec §5.5): chained → cut our entry out of the list, keeping the
/// rest of the file's bytes as they are ([`conflist::remove_preserving`]); standalone or our
/// owned file → delete the file. An unparsable file is left alone and reported. (Giving back
/// the primary's original bytes and name is [`crate::Installer::uninstall`]'s job, from its
/// [`crate::backup`] record.)
pub fn cleanup_cni_config(cfg: &InstallConfig, path: &Path) -> Result<(), InstallError> {
    if !path.exists() {
        return Ok(());
    }
    // The reference decides by the istio-owned flag alone; we also require the file to be our
    // owned file, so a flag set without ambient (primary edited in place) never deletes the
    // primary's config.
    let is_owned_file = cfg.istio_owned_cni_config
        && path
            .file_name()
            .is_some_and(|n| n.to_string_lossy() == cfg.owned_file_name());
    if cfg.chained_cni_plugin && !is_owned_file {
        let existing =
            fs::read(path).map_err(|e| InstallError::io("reading CNI config", path, e))?;
        if let Ok(doc) = serde_json::from_slice::<Value>(&existing)
            && conflist::list_has_type(&doc, &cfg.plugin_type) == Some(false)
        {
            // Nothing of ours in it: do not re-render someone else's file.
            return Ok(());
        }
        let cleaned =
            conflist::remove_preserving(&existing, &cfg.plugin_type).map_err(|source| {
                InstallError::Config {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        fsutil::atomic_write(
            path,
            &cleaned,
            ModePolicy::PreserveOr(cfg.created_file_mode()),
        )
        .map_err(|e| InstallError::io("writing CNI config", path, e))?;
    } else {
        fsutil::remove_if_exists(path)
            .map_err(|e| InstallError::io("removing CNI config", path, e))?;
    }
    Ok(())
}
