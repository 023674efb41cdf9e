//! The "application" side of a lab: a TCP server that tells the client what it saw, and
//! clients that connect from inside a namespace, optionally as another uid/gid.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::proxy::echo;
use crate::sockets::{Workers, tcp_listener};
use crate::{Netns, TestkitError};

/// A TCP server inside a namespace. For every connection it writes
/// `server:<local addr> peer:<peer addr>\n` and then echoes what it receives.
#[derive(Debug)]
pub struct TcpServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>,
    _workers: Workers,
}

impl TcpServer {
    /// Listen on `addr` (e.g. `0.0.0.0:8080`, `[::]:8080`, or a specific address) inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self, TestkitError> {
        let what = format!("listen on {addr} in {}", ns.name());
        let listener = ns
            .run(move || tcp_listener(addr, false))?
            .map_err(|e| TestkitError::io(what.clone(), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| TestkitError::io(what.clone(), e))?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&peers);
        let mut workers = Workers::default();
        workers
            .serve_tcp(listener, move |mut stream, peer| {
                let Ok(local) = stream.local_addr() else {
                    return;
                };
                if let Ok(mut l) = log.lock() {
                    l.push((local, peer));
                }
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                if stream
                    .write_all(format!("server:{local} peer:{peer}\n").as_bytes())
                    .is_ok()
                {
                    echo(stream);
                }
            })
            .map_err(|e| TestkitError::io(what, e))?;
        Ok(TcpServer {
            addr: bound,
            peers,
            _workers: workers,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `(local, peer)` of every accepted connection so far.
    pub fn accepted(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// How a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOpts {
    /// Run as this uid (per-thread `setresuid`), e.g. 1337 to be "the proxy".
    pub uid: Option<u32>,
    /// Run as this gid (per-thread `setresgid`; supplementary groups dropped).
    pub gid: Option<u32>,
    /// Connect and read timeout.
    pub timeout: Duration,
    /// Bytes sent after connecting (then the write side is shut down).
    pub payload: Vec<u8>,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            uid: None,
            gid: None,
            timeout: Duration::from_secs(5),
            payload: b"hello\n".to_vec(),
        }
    }
}

/// Connect to `addr` from a thread inside `ns` (with the credentials in `opts`), send the
/// payload, half-close, and return everything received until EOF.
pub fn connect(ns: &Netns, addr: SocketAddr, opts: &ConnectOpts) -> Result<Vec<u8>, TestkitError> {
    let what = format!(
        "connect to {addr} from {} (uid {:?}, gid {:?})",
        ns.name(),
        opts.uid,
        opts.gid
    );
    ns.run(|| -> std::io::Result<Vec<u8>> {
        // This thread is discarded after the closure, so changing its credentials is safe.
        crate::sys::set_thread_credentials(opts.uid, opts.gid)?;
        let mut stream = TcpStream::connect_timeout(&addr, opts.timeout)?;
        stream.set_read_timeout(Some(opts.timeout))?;
        stream.set_write_timeout(Some(opts.timeout))?;
        stream.write_all(&opts.payload)?;
        stream.shutdown(Shutdown::Write)?;
        let mut received = Vec::new();
        stream.read_to_end(&mut received)?;
        Ok(received)
    })?
    .map_err(|e| TestkitError::io(what, e))
}

/// [`connect`], returning the reply as (lossy) UTF-8.
pub fn connect_text(
    ns: &Netns,
    addr: SocketAddr,
    opts: &ConnectOpts,
) -> Result<String, TestkitError> {
    connect(ns, addr, opts).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Send one datagram to `addr` from inside `ns` (credentials as in `opts`) and return the first
/// reply.
pub fn udp_exchange(
    ns: &Netns,
    addr: SocketAddr,
    opts: &ConnectOpts,
) -> Result<Vec<u8>, TestkitError> {
    let what = format!("udp exchange with {addr} from {}", ns.name());
    ns.run(|| -> std::io::Result<Vec<u8>> {
        crate::sys::set_thread_credentials(opts.uid, opts.gid)?;
        let bind: SocketAddr = if addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(opts.timeout))?;
        socket.connect(addr)?;
        socket.send(&opts.payload)?;
        let mut buf = vec![0u8; 4096];
        let n = crate::retry_eintr(|| socket.recv(&mut buf))?;
        buf.truncate(n);
        Ok(buf)
    })?
    .map_err(|e| TestkitError::io(what, e))
}
