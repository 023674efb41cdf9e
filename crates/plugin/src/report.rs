//! Per-request report to the agent: one datagram to `<cni_agent_run_dir>/metrics.sock`,
//! `{"cmd":"ADD","result":"success","seconds":0.0042}` (the agent's wire format v1, see
//! `meshcni-agent`'s `plugin_report` module). Fire-and-forget: never blocks, never fails the
//! request — a dead agent costs one failed `sendto`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

/// File name of the agent's report socket inside the run dir.
pub const METRICS_SOCKET_NAME: &str = "metrics.sock";

/// Sends one report; every error is ignored by design.
pub fn send(run_dir: &Path, cmd: &str, success: bool, elapsed: Duration) {
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    if sock.set_nonblocking(true).is_err() {
        return;
    }
    let msg = format!(
        r#"{{"cmd":"{}","result":"{}","seconds":{:.6}}}"#,
        cmd,
        if success { "success" } else { "error" },
        elapsed.as_secs_f64()
    );
    let _ = sock.send_to(msg.as_bytes(), run_dir.join(METRICS_SOCKET_NAME));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_has_the_agent_wire_format() {
        let dir = tempfile::tempdir().unwrap();
        let rx = UnixDatagram::bind(dir.path().join(METRICS_SOCKET_NAME)).unwrap();
        send(dir.path(), "ADD", true, Duration::from_micros(4211));
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"cmd":"ADD","result":"success","seconds":0.004211}"#
        );
    }

    #[test]
    fn missing_agent_is_silent() {
        let dir = tempfile::tempdir().unwrap();
        send(dir.path(), "DEL", false, Duration::ZERO);
    }
}
