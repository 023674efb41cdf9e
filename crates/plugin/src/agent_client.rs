//! The plugin's side of the agent's unix-socket API: `POST /cmdadd` over HTTP/1.1 on
//! `<cni_agent_run_dir>/pluginevent.sock` (Istio HEAD wire format, spec §1.5 HEAD step 6).
//!
//! Ambient pods are handed to the agent, which answers 200 only once the pod is captured; any
//! other outcome fails the ADD (fail closed), so a pod never starts uncaptured.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One pod IP as Istio's Go agent expects it (`net.IPNet` JSON: IP string, mask as base64 bytes).
#[derive(Debug, Clone, Serialize)]
pub struct EventIp {
    #[serde(rename = "Interface")]
    pub interface: u32,
    #[serde(rename = "Address")]
    pub address: EventAddr,
    #[serde(rename = "Gateway", skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventAddr {
    #[serde(rename = "IP")]
    pub ip: String,
    #[serde(rename = "Mask")]
    pub mask: String,
}

/// Body of `POST /cmdadd`.
#[derive(Debug, Clone, Serialize)]
pub struct CmdAddEvent {
    #[serde(rename = "Netns")]
    pub netns: String,
    #[serde(rename = "PodName")]
    pub pod_name: String,
    #[serde(rename = "PodNamespace")]
    pub pod_namespace: String,
    #[serde(rename = "IPs")]
    pub ips: Vec<EventIp>,
    /// meshcni extension (`K8S_POD_UID`), so the agent matches the exact pod; agents that do
    /// not know it ignore it.
    #[serde(rename = "PodUID", skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("failed to contact the node agent at {socket}: {source}")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the node agent at {socket} refused the pod: HTTP {status}: {body}")]
    Rejected {
        socket: String,
        status: u16,
        body: String,
    },
    #[error("malformed reply from the node agent at {socket}: {reason}")]
    BadReply { socket: String, reason: String },
}

/// Pause before sending again after the agent dropped the connection unanswered.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How one exchange failed.
enum Failure {
    /// No connection (agent not running), or a local or timeout error: not retried.
    Fatal(std::io::Error),
    /// Connected, but the agent closed the connection without answering (reset, broken pipe,
    /// end of stream with no reply): at its connection limit it closes connections whose
    /// request it has not read yet — under a burst of ADDs, real ones. Sent again.
    Dropped(std::io::Error),
}

fn dropped_or_fatal(e: std::io::Error) -> Failure {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    if matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted) {
        Failure::Dropped(e)
    } else {
        Failure::Fatal(e)
    }
}

/// One connection: send `request`, read the whole reply.
fn exchange(socket: &Path, request: &[u8], timeout: Duration) -> Result<Vec<u8>, Failure> {
    let mut stream = UnixStream::connect(socket).map_err(Failure::Fatal)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(Failure::Fatal)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(Failure::Fatal)?;
    stream.write_all(request).map_err(dropped_or_fatal)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(dropped_or_fatal)?;
    if reply.is_empty() {
        return Err(Failure::Dropped(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the node agent closed the connection without answering",
        )));
    }
    Ok(reply)
}

/// Sends the event and waits (up to `timeout`) for the agent's verdict. A connection the agent
/// closes without answering (it sheds unread connections at its connection limit) is retried
/// within the same `timeout`; the hand-off is idempotent.
pub fn push_cmdadd(
    socket: &Path,
    event: &CmdAddEvent,
    timeout: Duration,
) -> Result<(), AgentError> {
    let sock = socket.display().to_string();
    let unreachable = |source| AgentError::Unreachable {
        socket: sock.clone(),
        source,
    };
    let body = serde_json::to_vec(event).map_err(|e| AgentError::BadReply {
        socket: sock.clone(),
        reason: format!("cannot encode event: {e}"),
    })?;
    let mut request = format!(
        "POST /cmdadd HTTP/1.1\r\nHost: unix\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let deadline = Instant::now() + timeout;
    let reply = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match exchange(socket, &request, left.max(Duration::from_millis(1))) {
            Ok(r) => break r,
            Err(Failure::Dropped(_))
                if deadline.saturating_duration_since(Instant::now()) > RETRY_PAUSE * 2 =>
            {
                std::thread::sleep(RETRY_PAUSE);
            }
            Err(Failure::Dropped(e) | Failure::Fatal(e)) => return Err(unreachable(e)),
        }
    };
    let text = String::from_utf8_lossy(&reply);
    let status = parse_status(&text).ok_or_else(|| AgentError::BadReply {
        socket: sock.clone(),
        reason: format!(
            "no HTTP status line in {:?}",
            text.lines().next().unwrap_or("")
        ),
    })?;
    if status == 200 {
        return Ok(());
    }
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .unwrap_or("");
    Err(AgentError::Rejected {
        socket: sock,
        status,
        body: body.chars().take(512).collect(),
    })
}

fn parse_status(reply: &str) -> Option<u16> {
    let line = reply.lines().next()?;
    let mut parts = line.split_whitespace();
    let proto = parts.next()?;
    if !proto.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn event() -> CmdAddEvent {
        CmdAddEvent {
            netns: "/var/run/netns/x".into(),
            pod_name: "p".into(),
            pod_namespace: "ns".into(),
            ips: vec![EventIp {
                interface: 0,
                address: EventAddr {
                    ip: "10.0.0.2".into(),
                    mask: "////AA==".into(),
                },
                gateway: Some("10.0.0.1".into()),
            }],
            pod_uid: None,
        }
    }

    fn serve_once(
        reply: &'static str,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::thread::JoinHandle<String>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pluginevent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            s.write_all(reply.as_bytes()).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (dir, path, h)
    }

    #[test]
    fn ok_reply_is_success_and_body_is_istio_shape() {
        let (_d, path, h) = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        push_cmdadd(&path, &event(), Duration::from_secs(2)).unwrap();
        let req = h.join().unwrap();
        assert!(req.starts_with("POST /cmdadd HTTP/1.1\r\n"));
        assert!(req.contains(r#""Netns":"/var/run/netns/x","PodName":"p","PodNamespace":"ns","IPs":[{"Interface":0,"Address":{"IP":"10.0.0.2","Mask":"////AA=="},"Gateway":"10.0.0.1"}]"#), "{req}");
    }

    #[test]
    fn non_200_is_rejected_with_body() {
        let (_d, path, _h) =
            serve_once("HTTP/1.1 500 Internal Server Error\r\n\r\nztunnel not connected");
        let err = push_cmdadd(&path, &event(), Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, AgentError::Rejected { status: 500, .. }));
        assert!(err.to_string().contains("ztunnel not connected"), "{err}");
    }

    /// Issue 9 item 7: under a burst of ADDs the agent closes connections it has not read yet
    /// (its connection limit); the plugin used to fail the pod's ADD with "connection reset".
    /// Now it sends again within its timeout; a refused connect (no agent) still fails at once.
    #[test]
    fn a_connection_dropped_unanswered_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pluginevent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            // First connection: closed without reading (evicted).
            let (first, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            drop(first);
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        push_cmdadd(&path, &event(), Duration::from_secs(2)).unwrap();
        assert!(h.join().unwrap().starts_with("POST /cmdadd HTTP/1.1\r\n"));
    }

    #[test]
    fn missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let err = push_cmdadd(
            &dir.path().join("nope.sock"),
            &event(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, AgentError::Unreachable { .. }));
        assert!(err.to_string().contains("nope.sock"), "{err}");
    }
}
