//! `meshcni-testkit`: test-only helpers (a dev-dependency, never shipped). Uniquely named
//! network namespaces that delete themselves, veth labs, a transparent-proxy stand-in that
//! records original destinations (REDIRECT and TPROXY), a DNS stand-in, a TCP server that
//! reports what it saw, and clients that connect from inside a namespace as any uid/gid.
//!
//! Everything needs root. Only namespaces created here are touched; names are
//! `mcni-<pid>-<counter>-<tag>`; traffic stays inside them.

#![deny(unsafe_code)]

pub mod ambient_bench;
mod error;
pub mod inpod_ztunnel;
pub mod kube_api;
pub mod kube_cluster;
pub mod lab;
pub mod multinode;
mod netns;
pub mod probe;
pub mod proxy;
pub mod server;
pub mod snapshot;
mod sockets;
pub mod stack;
mod sys;
pub mod zds_client;
pub mod ztunnel;

pub use error::TestkitError;
pub use inpod_ztunnel::{
    AckOutcome, DnsMode, InpodDnsQuery, InpodHop, InpodZtunnelConfig, InpodZtunnelStandIn,
    WorkloadStatus, ZdsRecord,
};
pub use lab::Lab;
pub use multinode::{LabNode, LabPod, MultiNodeLab};
pub use netns::{Netns, veth};
pub use proxy::{DnsQuery, ProxiedConn, ProxyConfig, TransparentProxy};
pub use server::{ConnectOpts, TcpServer, connect, connect_text, udp_exchange};
pub use snapshot::{NetnsSnapshot, assert_netns_unchanged};
pub use sockets::nat_original_dst;
pub use ztunnel::{ZtunnelConfig, ZtunnelHop, ZtunnelStandIn};

/// Run a blocking socket call again when it was interrupted (`EINTR`).
///
/// A socket wait with a timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`) returns `EINTR` whenever the
/// thread is woken for a signal, even under `SA_RESTART`, and also when the process is frozen
/// and thawed (cgroup freezer, SIGSTOP/SIGCONT) with no handler at all (signal(7)). CI runs have
/// failed on it ("Interrupted system call" from a timed read), so every timed
/// `read`/`recv`/`accept` in the test kit and its tests goes through this.
/// Standard `read_exact`/`read_to_end`/`write_all`/`BufRead::read_line` already retry.
pub fn retry_eintr<T>(mut f: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

#[cfg(test)]
pub(crate) mod eintr_tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    extern "C" fn ignore_signal(_: libc::c_int) {}

    /// A no-op SIGUSR2 handler with SA_RESTART: the signal interrupts only timed waits.
    #[allow(unsafe_code)]
    fn install_handler() {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
        let action = SigAction::new(
            SigHandler::Handler(ignore_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing (async-signal-safe); every test of this binary that
        // installs one installs this same no-op.
        unsafe { sigaction(Signal::SIGUSR2, &action) }.expect("sigaction");
    }

    /// Run `f` on a new thread and signal that thread five times while it waits (then `then`,
    /// which must let `f` finish).
    #[allow(unsafe_code)]
    pub(crate) fn signalled<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
        then: impl FnOnce(),
    ) -> T {
        install_handler();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tid_tx
                .send(unsafe { libc::pthread_self() })
                .expect("send tid");
            f()
        });
        let tid = tid_rx.recv().expect("tid");
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: the worker is alive: it waits for what `then` sends.
            assert_eq!(
                unsafe { libc::pthread_kill(tid, libc::SIGUSR2) },
                0,
                "pthread_kill"
            );
        }
        then();
        worker.join().expect("join")
    }

    fn loopback_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
        }
        (a, b)
    }

    /// Regression (CI of stop 17): `read_line` on a timed stream failed with "Interrupted
    /// system call" (ambient_traffic's banner read), failing the test.
    #[test]
    fn a_signal_during_a_timed_read_line_does_not_end_it() {
        let (mut a, mut b) = loopback_pair();
        let got = signalled(
            move || crate::multinode::read_line(&mut a),
            move || b.write_all(b"banner\n").expect("write"),
        );
        assert_eq!(got.expect("read_line outlives the signals"), "banner\n");
    }

    /// The echo servers' loop ended the connection on EINTR: the next ping got EOF.
    #[test]
    fn a_signal_during_an_echo_servers_read_does_not_close_the_connection() {
        let (a, mut b) = loopback_pair();
        let mut b2 = b.try_clone().expect("clone");
        signalled(
            move || crate::proxy::echo(a),
            move || {
                crate::multinode::ping(&mut b2, "after the signals")
                    .expect("the echo server outlives the signals");
                b2.shutdown(std::net::Shutdown::Write).expect("shutdown");
            },
        );
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut b, &mut rest).expect("EOF after shutdown");
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// A UDP exchange's timed receive, likewise.
    #[test]
    fn a_signal_during_a_timed_udp_receive_does_not_end_it() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let to = rx.local_addr().expect("addr");
        let got = signalled(
            move || {
                let mut buf = [0u8; 16];
                crate::retry_eintr(|| rx.recv(&mut buf)).map(|n| buf[..n].to_vec())
            },
            move || {
                let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                tx.send_to(b"dgram", to).expect("send");
            },
        );
        assert_eq!(got.expect("recv outlives the signals"), b"dgram");
    }
}
