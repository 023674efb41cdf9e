//! Plugin → agent request reports: how the short-lived `meshcni` plugin tells the agent about each
//! CNI request so the agent can export `meshcni_cni_requests_total{command,result}` and
//! `meshcni_cni_request_duration_seconds{command}`.
//!
//! # Wire format (version 1)
//!
//! * Transport: a Unix **datagram** socket (`SOCK_DGRAM`) bound by the agent at
//!   `<cni-agent-run-dir>/metrics.sock` (default `/var/run/meshcni/metrics.sock`, mode 0600; the
//!   plugin runs as root under the container runtime).
//! * One datagram per finished request, at most 512 bytes, UTF-8 compact JSON object:
//!   `{"cmd":"ADD","result":"success","seconds":0.004211}`
//!   * `cmd`: the `CNI_COMMAND` verbatim: `ADD`, `DEL`, `CHECK`, `STATUS`, `GC`, `VERSION`.
//!   * `result`: `success` or `error` (the plugin returned a CNI error result / non-zero exit).
//!   * `seconds`: wall time from plugin start to the response being written, a finite number ≥ 0.
//!   * Unknown extra fields are ignored (room for later additions, e.g. `"v":2`); unknown `cmd`
//!     or `result` values are counted under `other` so a bad sender cannot explode label
//!     cardinality; malformed datagrams are counted in `meshcni_plugin_reports_malformed_total`.
//!
//! # Sender rules (plugin side)
//!
//! Fire-and-forget, never blocking, never failing the CNI request: create an unbound
//! `UnixDatagram`, set it non-blocking, `send_to` once, ignore every error (no agent → `ENOENT`/
//! `ECONNREFUSED`; agent slow → `EAGAIN`). Cost: one `socket` + one `sendto` syscall. The
//! reference sender is [`send_report`], std-only so the plugin can copy it or depend on it
//! without pulling tokio.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// File name of the socket inside the run dir.
pub const METRICS_SOCKET_NAME: &str = "metrics.sock";

/// Largest datagram the agent reads; longer ones are truncated and counted malformed.
pub const MAX_REPORT_BYTES: usize = 512;

/// Commands accepted as label values.
pub const KNOWN_COMMANDS: &[&str] = &["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"];
/// Results accepted as label values.
pub const KNOWN_RESULTS: &[&str] = &["success", "error"];

/// One report as sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginReport {
    pub cmd: String,
    pub result: String,
    pub seconds: f64,
}

/// Why a datagram was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReportError {
    #[error("plugin report is not valid JSON of the form {{cmd,result,seconds}}: {0}")]
    Json(String),
    #[error("plugin report has a negative or non-finite duration {0}")]
    BadSeconds(f64),
}

/// A report reduced to bounded label values, ready to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizedReport {
    pub command: &'static str,
    pub result: &'static str,
    pub seconds: f64,
}

fn normalize_label(value: &str, known: &[&'static str]) -> &'static str {
    known
        .iter()
        .copied()
        .find(|k| *k == value)
        .unwrap_or("other")
}

/// Parse and normalise one datagram (pure).
pub fn parse_report(datagram: &[u8]) -> Result<NormalizedReport, ReportError> {
    let r: PluginReport =
        serde_json::from_slice(datagram).map_err(|e| ReportError::Json(e.to_string()))?;
    if !r.seconds.is_finite() || r.seconds < 0.0 {
        return Err(ReportError::BadSeconds(r.seconds));
    }
    Ok(NormalizedReport {
        command: normalize_label(&r.cmd, KNOWN_COMMANDS),
        result: normalize_label(&r.result, KNOWN_RESULTS),
        seconds: r.seconds,
    })
}

/// Encode one report (what [`send_report`] puts on the wire).
pub fn encode_report(cmd: &str, result: &str, seconds: f64) -> Vec<u8> {
    let r = PluginReport {
        cmd: cmd.to_string(),
        result: result.to_string(),
        seconds: if seconds.is_finite() && seconds >= 0.0 {
            seconds
        } else {
            0.0
        },
    };
    serde_json::to_vec(&r).unwrap_or_default()
}

/// Reference sender: fire-and-forget, non-blocking, errors ignored. Returns whether the datagram
/// was handed to the kernel (for tests; the plugin ignores it).
pub fn send_report(run_dir: &Path, cmd: &str, result: &str, seconds: f64) -> bool {
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    if sock.set_nonblocking(true).is_err() {
        return false;
    }
    sock.send_to(
        &encode_report(cmd, result, seconds),
        run_dir.join(METRICS_SOCKET_NAME),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let r = parse_report(br#"{"cmd":"ADD","result":"success","seconds":0.25}"#).expect("ok");
        assert_eq!(
            r,
            NormalizedReport {
                command: "ADD",
                result: "success",
                seconds: 0.25
            }
        );
        let r = parse_report(br#"{"cmd":"weird","result":"boom","seconds":0,"v":2}"#)
            .expect("extra fields ignored");
        assert_eq!((r.command, r.result), ("other", "other"));
        assert!(matches!(
            parse_report(br#"{"cmd":"ADD","result":"success","seconds":-1}"#),
            Err(ReportError::BadSeconds(_))
        ));
        assert!(matches!(
            parse_report(b"garbage"),
            Err(ReportError::Json(_))
        ));
        assert!(matches!(
            parse_report(br#"{"cmd":"ADD"}"#),
            Err(ReportError::Json(_))
        ));
    }

    #[test]
    fn encode_round_trips() {
        let b = encode_report("DEL", "error", 1.5);
        assert_eq!(b, br#"{"cmd":"DEL","result":"error","seconds":1.5}"#);
        assert_eq!(parse_report(&b).expect("ok").command, "DEL");
    }

    #[test]
    fn sender_never_fails_without_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = std::time::Instant::now();
        assert!(!send_report(dir.path(), "ADD", "success", 0.1));
        assert!(t.elapsed() < std::time::Duration::from_millis(100));
    }

    /// The plugin pays this per request: with a live socket, with a full queue (agent stuck)
    /// and with no agent at all. Printed with `--nocapture`; the bound is loose for debug builds.
    #[test]
    fn sender_is_cheap_in_every_agent_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let per_send = |n: u32| {
            let t = std::time::Instant::now();
            for _ in 0..n {
                send_report(dir.path(), "ADD", "success", 0.001);
            }
            t.elapsed() / n
        };
        let absent = per_send(1000);
        // Bound but never read: the queue fills and later sends hit EAGAIN.
        let _rx = UnixDatagram::bind(dir.path().join(METRICS_SOCKET_NAME)).expect("bind");
        let stuck = per_send(5000);
        println!("send_report: no agent {absent:?}/send, stuck agent {stuck:?}/send");
        assert!(absent < std::time::Duration::from_millis(1));
        assert!(stuck < std::time::Duration::from_millis(1));
    }

    #[test]
    fn sender_reaches_a_bound_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rx = UnixDatagram::bind(dir.path().join(METRICS_SOCKET_NAME)).expect("bind");
        assert!(send_report(dir.path(), "ADD", "success", 0.1));
        let mut buf = [0u8; MAX_REPORT_BYTES];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(parse_report(&buf[..n]).expect("ok").command, "ADD");
    }
}
