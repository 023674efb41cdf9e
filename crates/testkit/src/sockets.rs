//! Socket plumbing shared by the stand-ins: listeners created inside a namespace (a socket
//! belongs to the netns it was created in, so only creation needs the netns thread), original
//! destination lookup, and a stoppable accept loop.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    SockaddrIn, SockaddrIn6, SockaddrStorage, bind, getsockopt, listen, recvmsg, sendmsg,
    setsockopt, socket, sockopt,
};

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

fn bound_socket(addr: SocketAddr, ty: SockType, transparent: bool) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None).map_err(nix_io)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(nix_io)?;
    match addr {
        SocketAddr::V4(v4) => {
            if transparent {
                setsockopt(&fd, sockopt::IpTransparent, &true).map_err(nix_io)?;
            }
            bind(fd.as_raw_fd(), &SockaddrIn::from(v4)).map_err(nix_io)?;
        }
        SocketAddr::V6(v6) => {
            // Separate v4 and v6 sockets: the v4 one must see IPv4 original destinations.
            setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(nix_io)?;
            if transparent {
                crate::sys::set_ipv6_transparent(fd.as_fd())?;
            }
            bind(fd.as_raw_fd(), &SockaddrIn6::from(v6)).map_err(nix_io)?;
        }
    }
    Ok(fd)
}

/// A TCP listener on `addr` (call on a thread inside the target netns). `transparent` sets
/// `IP_TRANSPARENT`/`IPV6_TRANSPARENT`, which TPROXY requires of the receiving socket.
pub(crate) fn tcp_listener(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let fd = bound_socket(addr, SockType::Stream, transparent)?;
    listen(&fd, Backlog::new(128).map_err(nix_io)?).map_err(nix_io)?;
    Ok(TcpListener::from(fd))
}

/// A UDP socket on `addr` (call on a thread inside the target netns).
pub(crate) fn udp_socket(addr: SocketAddr, transparent: bool) -> io::Result<UdpSocket> {
    let fd = bound_socket(addr, SockType::Datagram, transparent)?;
    Ok(UdpSocket::from(fd))
}

/// The pre-NAT destination of a REDIRECTed connection (`SO_ORIGINAL_DST` /
/// `IP6T_SO_ORIGINAL_DST`), `None` if conntrack has no entry.
pub fn nat_original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    match stream.local_addr().ok()? {
        SocketAddr::V4(_) => {
            let sa = getsockopt(stream, sockopt::OriginalDst).ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr),
                u16::from_be(sa.sin6_port),
                0,
                0,
            )))
        }
    }
}

pub(crate) fn recv_with_dst(
    socket: &UdpSocket,
) -> io::Result<(Vec<u8>, SocketAddr, Option<IpAddr>)> {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    let (n, peer, local) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(nix_io)?;
        let mut local = None;
        for c in msg.cmsgs().map_err(nix_io)? {
            match c {
                ControlMessageOwned::Ipv4PacketInfo(pi) => {
                    local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr))));
                }
                ControlMessageOwned::Ipv6PacketInfo(pi) => {
                    local = Some(IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        let peer = msg
            .address
            .and_then(|a: SockaddrStorage| storage_to_std(&a))
            .ok_or_else(|| io::Error::other("datagram without a source address"))?;
        (msg.bytes, peer, local)
    };
    buf.truncate(n);
    Ok((buf, peer, local))
}

fn storage_to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

pub(crate) fn send_from(
    socket: &UdpSocket,
    data: &[u8],
    peer: SocketAddr,
    local: Option<IpAddr>,
) -> io::Result<()> {
    let iov = [IoSlice::new(data)];
    match (peer, local) {
        (SocketAddr::V4(p), Some(IpAddr::V4(l))) => {
            let pi = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(l).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            sendmsg(
                socket.as_raw_fd(),
                &iov,
                &[ControlMessage::Ipv4PacketInfo(&pi)],
                MsgFlags::empty(),
                Some(&SockaddrIn::from(p)),
            )
            .map_err(nix_io)?;
        }
        (SocketAddr::V6(p), Some(IpAddr::V6(l))) => {
            let pi = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: l.octets(),
                },
                ipi6_ifindex: 0,
            };
            sendmsg(
                socket.as_raw_fd(),
                &iov,
                &[ControlMessage::Ipv6PacketInfo(&pi)],
                MsgFlags::empty(),
                Some(&SockaddrIn6::from(p)),
            )
            .map_err(nix_io)?;
        }
        _ => {
            socket.send_to(data, peer)?;
        }
    }
    Ok(())
}

/// Background accept loops that stop (and are joined) on drop.
#[derive(Debug, Default)]
pub(crate) struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(5);

impl Workers {
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Accept on `listener` until stopped, handing each connection to `handle` on its own
    /// thread.
    pub fn serve_tcp<F>(&mut self, listener: TcpListener, handle: F) -> io::Result<()>
    where
        F: Fn(TcpStream, SocketAddr) + Send + Sync + 'static,
    {
        listener.set_nonblocking(true)?;
        let stop = self.stop_flag();
        let handle = Arc::new(handle);
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let handle = Arc::clone(&handle);
                        std::thread::spawn(move || {
                            if stream.set_nonblocking(false).is_ok() {
                                handle(stream, peer);
                            }
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        std::thread::sleep(POLL);
                    }
                }
            }
        }));
        Ok(())
    }

    /// Receive datagrams on `socket` until stopped; `handle(bytes, peer, local)` returns the
    /// reply, which is sent *from the address the datagram was addressed to* (IP_PKTINFO).
    /// Why: a socket bound to the wildcard would otherwise pick its own source address, and
    /// conntrack could not undo a REDIRECT (the reply must come from the post-NAT address) nor
    /// would a TPROXY reply carry the original destination.
    pub fn serve_udp<F>(&mut self, socket: UdpSocket, handle: F) -> io::Result<()>
    where
        F: Fn(&[u8], SocketAddr, Option<IpAddr>) -> Option<Vec<u8>> + Send + 'static,
    {
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let v4 = socket.local_addr()?.is_ipv4();
        if v4 {
            setsockopt(&socket, sockopt::Ipv4PacketInfo, &true).map_err(nix_io)?;
        } else {
            setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true).map_err(nix_io)?;
        }
        let stop = self.stop_flag();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match recv_with_dst(&socket) {
                    Ok((data, peer, local)) => {
                        if let Some(reply) = handle(&data, peer, local)
                            && let Err(e) = send_from(&socket, &reply, peer, local)
                        {
                            tracing::warn!(error = %e, "udp reply failed");
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "recv failed");
                        std::thread::sleep(POLL);
                    }
                }
            }
        }));
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
