//! A dataplane prober: from inside a netns, start a new TCP connection to a target every
//! `interval` (≤ 1 ms is fine: connections are non-blocking, on one thread), whether or not the
//! earlier ones have finished, and record for each when it started, its local address, how long
//! until the server's first line arrived, and the line (or the error). Used to measure what a
//! dataplane change (a ztunnel restart) does to new connections, and to prove that none of
//! them bypassed capture (matching each probe's local address with the proxy's accepted peers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{Netns, TestkitError};

/// One probe connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Sequence number (0-based, in start order).
    pub seq: u64,
    /// When it started, from the prober's start.
    pub started: Duration,
    /// Its local address, once `connect` returned (the address a proxy or server sees).
    pub local: Option<SocketAddr>,
    /// From start to the server's first line, if it arrived.
    pub took: Option<Duration>,
    /// The server's first line, or why there was none.
    pub reply: Result<String, String>,
}

impl Probe {
    pub fn ok(&self) -> bool {
        self.reply.is_ok()
    }
}

/// A running prober (see the module docs). [`Prober::stop`] ends it and returns every probe.
#[derive(Debug)]
pub struct Prober {
    stop: Arc<AtomicBool>,
    started: Instant,
    handle: Option<JoinHandle<Result<Vec<Probe>, TestkitError>>>,
}

impl Prober {
    /// Start probing `target` from `ns` every `interval`; each probe gives up after `timeout`.
    pub fn start(
        ns: &Netns,
        target: SocketAddr,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Prober, TestkitError> {
        let stop = Arc::new(AtomicBool::new(false));
        let path: PathBuf = ns.path().to_path_buf();
        let flag = Arc::clone(&stop);
        let started = Instant::now();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                meshcni_netx::run_in_netns(&path, move || {
                    run(target, interval, timeout, &flag, started, ready_tx)
                })?
            })
            .map_err(|e| TestkitError::io("spawn the prober thread", e))?;
        // Wait until the runtime runs (sockets are created in the netns from then on).
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        Ok(Prober {
            stop,
            started,
            handle: Some(handle),
        })
    }

    /// Time since the prober started (the clock [`Probe::started`] uses).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stop starting probes (without waiting; [`Prober::stop`] collects them).
    pub fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stop starting probes, wait for the running ones (at most their timeout), return all.
    pub fn stop(mut self) -> Result<Vec<Probe>, TestkitError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(TestkitError::io(
                "prober thread",
                std::io::Error::other("panicked"),
            )),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(
    target: SocketAddr,
    interval: Duration,
    timeout: Duration,
    stop: &AtomicBool,
    t0: Instant,
    ready: std::sync::mpsc::Sender<()>,
) -> Result<Vec<Probe>, TestkitError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestkitError::io("build the prober runtime", e))?;
    rt.block_on(async move {
        let _ = ready.send(());
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::new();
        let mut seq = 0u64;
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let started = t0.elapsed();
            tasks.push(tokio::spawn(one(seq, started, target, timeout, t0)));
            seq += 1;
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            match t.await {
                Ok(p) => out.push(p),
                Err(e) => {
                    return Err(TestkitError::io(
                        "probe task",
                        std::io::Error::other(e.to_string()),
                    ));
                }
            }
        }
        Ok(out)
    })
}

async fn one(
    seq: u64,
    started: Duration,
    target: SocketAddr,
    timeout: Duration,
    t0: Instant,
) -> Probe {
    let mut probe = Probe {
        seq,
        started,
        local: None,
        took: None,
        reply: Err("not started".into()),
    };
    let attempt = async {
        let stream = match tokio::net::TcpStream::connect(target).await {
            Ok(s) => s,
            Err(e) => return (None, Err(format!("connect: {e}"))),
        };
        let local = stream.local_addr().ok();
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        let read = stream.read_line(&mut line).await;
        let _ = stream.get_mut().shutdown().await;
        let reply = match read {
            Ok(0) => Err("closed before the first line".to_string()),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("read: {e}")),
        };
        (local, reply)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok((local, reply)) => {
            probe.local = local;
            if reply.is_ok() {
                probe.took = Some(t0.elapsed().saturating_sub(started));
            }
            probe.reply = reply;
        }
        Err(_) => probe.reply = Err(format!("no reply within {timeout:?}")),
    }
    probe
}
