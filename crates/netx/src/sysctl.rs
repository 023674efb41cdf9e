//! Per-netns sysctls under `/proc/sys/net`. The `net` subtree shows the network namespace of
//! the task that opens the file, so these functions must run on a thread inside the target
//! netns (they take the [`InNetns`] token). Writes return the previous value so a caller can
//! put it back on uninstall.

use std::path::PathBuf;

use crate::NetxError;
use crate::netns::InNetns;

fn full(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.trim_start_matches('/'))
}

fn io_err(ns: &InNetns<'_>, op: String, source: std::io::Error) -> NetxError {
    NetxError::Netlink {
        netns: ns.path().to_path_buf(),
        op,
        source,
    }
}

/// Read `key` (e.g. `net/ipv4/conf/all/rp_filter`), trimmed; `None` if the file does not exist
/// (e.g. the interface is gone).
pub fn read_here(ns: &InNetns<'_>, key: &str) -> Result<Option<String>, NetxError> {
    match std::fs::read_to_string(full(key)) {
        Ok(v) => Ok(Some(v.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(ns, format!("read sysctl {key}"), e)),
    }
}

/// Write `value` to `key`, returning the previous value (`None` when unchanged writes were
/// skipped because the value was already `value`).
pub fn write_here(ns: &InNetns<'_>, key: &str, value: &str) -> Result<Option<String>, NetxError> {
    let prev = read_here(ns, key)?.ok_or_else(|| {
        io_err(
            ns,
            format!("write sysctl {key}={value}"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    if prev == value {
        return Ok(None);
    }
    std::fs::write(full(key), value)
        .map_err(|e| io_err(ns, format!("write sysctl {key}={value}"), e))?;
    Ok(Some(prev))
}
