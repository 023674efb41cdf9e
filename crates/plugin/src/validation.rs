//! `--run-validation` of init-container mode (Istio's `istio-validation` init container, spec
//! §2.2): proves that outbound capture is in place in the current netns. Listens on
//! 127.0.0.1:<envoy port> and 127.0.0.1:<inbound capture port>, dials 127.0.0.6:<probe port>
//! until a connection arrives whose original destination (`SO_ORIGINAL_DST`) is the probe port,
//! i.e. it was redirected. Single-threaded and non-blocking, so nothing is left running.
//!
//! Like Istio's, the probe is meant to run as the proxy UID (the `istio-validation` container
//! does): loopback traffic of other UIDs is deliberately not captured, so as root it fails.
//!
//! Deliberate difference from the reference: only IPv4 is probed (Istio probes `::1` instead on
//! IPv6-only pods); the IPv4 rules are always installed, so this holds on every pod.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};

/// Exit code of a failed validation (Istio's `ValidationErrorCode`, watched by the repair
/// controller).
pub const VALIDATION_ERROR_CODE: i32 = 126;

/// Where to listen and what to dial.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Ports redirected connections may arrive on (outbound and inbound capture ports).
    pub capture_ports: Vec<u16>,
    /// Original destination port of the probe connection.
    pub probe_port: u16,
    /// Give up after this long.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("cannot listen on 127.0.0.1:{port} (is something already using it?): {source}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no connection to 127.0.0.6:{probe_port} was redirected to ports {ports:?} within {timeout:?}: traffic capture is not in place{last}"
    )]
    Timeout {
        probe_port: u16,
        ports: Vec<u16>,
        timeout: Duration,
        last: String,
    },
}

/// Runs the probe; `Ok` once a redirected probe connection was seen.
pub fn run(probe: &Probe) -> Result<(), ValidationError> {
    let mut listeners = Vec::new();
    for &port in &probe.capture_ports {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| ValidationError::Listen { port, source })?;
        listeners.push(listener);
    }
    let target = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 6), probe.probe_port).into();
    let deadline = Instant::now() + probe.timeout;
    // Connections are kept open until accepted (the handshake completes in the backlog).
    let mut clients: Vec<TcpStream> = Vec::new();
    let mut last = String::new();
    let mut next_dial = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_dial {
            next_dial = now + Duration::from_millis(200);
            let wait = deadline
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), Duration::from_secs(1));
            match TcpStream::connect_timeout(&target, wait) {
                Ok(s) => clients.push(s),
                Err(e) => last = format!(" (last attempt: {e})"),
            }
        }
        for listener in &listeners {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if getsockopt(&stream, OriginalDst)
                            .is_ok_and(|dst| u16::from_be(dst.sin_port) == probe.probe_port)
                        {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        last = format!(" (accept: {e})");
                        break;
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(ValidationError::Timeout {
                probe_port: probe.probe_port,
                ports: probe.capture_ports.clone(),
                timeout: probe.timeout,
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
