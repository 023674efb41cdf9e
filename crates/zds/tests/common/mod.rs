//! A raw ZDS client for the server tests, written from the contract with hand-written protobuf
//! bytes and a hand-written decoder — deliberately independent of `meshcni_zds::proto` (the
//! encoder under test).
#![allow(dead_code)]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use meshcni_zds::ZdsEvent;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    connect, recvmsg, sendmsg, socket,
};

pub const HELLO_V1: &[u8] = &[0x08, 0x01];
pub const ACK: &[u8] = &[0x0a, 0x00];

/// `WorkloadResponse{ack: Ack{error}}` for a short error (< 126 bytes).
pub fn nack(error: &str) -> Vec<u8> {
    let e = error.as_bytes();
    assert!(e.len() < 126);
    let mut out = vec![0x0a, (e.len() + 2) as u8, 0x0a, e.len() as u8];
    out.extend_from_slice(e);
    out
}

/// A decoded `WorkloadRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Req {
    Add {
        uid: String,
        name: String,
        namespace: String,
        service_account: String,
    },
    Keep {
        uid: String,
    },
    Del {
        uid: String,
    },
    SnapshotSent,
}

impl Req {
    pub fn uid(&self) -> Option<&str> {
        match self {
            Req::Add { uid, .. } | Req::Keep { uid } | Req::Del { uid } => Some(uid),
            Req::SnapshotSent => None,
        }
    }
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// (field, bytes) of every length-delimited field; panics on any other wire type.
fn fields(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let key = varint(b, &mut i);
        assert_eq!(
            key & 7,
            2,
            "only length-delimited fields expected in {b:02x?}"
        );
        let len = varint(b, &mut i) as usize;
        out.push((key >> 3, b[i..i + len].to_vec()));
        i += len;
    }
    out
}

fn string_field(b: &[u8], field: u64) -> String {
    fields(b)
        .into_iter()
        .filter(|(f, _)| *f == field)
        .map(|(_, v)| String::from_utf8(v).expect("utf8"))
        .next_back()
        .unwrap_or_default()
}

pub fn decode_request(b: &[u8]) -> Req {
    let top = fields(b);
    assert_eq!(top.len(), 1, "one oneof member expected in {b:02x?}");
    let (field, body) = &top[0];
    match field {
        1 => {
            let info = fields(body)
                .into_iter()
                .find(|(f, _)| *f == 2)
                .map(|(_, v)| v)
                .expect("AddWorkload without workload_info");
            Req::Add {
                uid: string_field(body, 1),
                name: string_field(&info, 1),
                namespace: string_field(&info, 2),
                service_account: string_field(&info, 3),
            }
        }
        5 => Req::Keep {
            uid: string_field(body, 1),
        },
        2 => {
            // DelWorkload.uid is field 2; a field-1 uid would be a contract violation.
            assert!(
                fields(body).iter().all(|(f, _)| *f == 2),
                "DelWorkload fields {body:02x?}"
            );
            Req::Del {
                uid: string_field(body, 2),
            }
        }
        3 => {
            assert!(body.is_empty(), "SnapshotSent must be empty");
            Req::SnapshotSent
        }
        other => panic!("unknown WorkloadRequest field {other} in {b:02x?}"),
    }
}

/// What the client read.
pub enum Got {
    Msg(Vec<u8>, Vec<OwnedFd>),
    Eof,
    Timeout,
}

pub struct Client {
    pub fd: OwnedFd,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        connect(fd.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("connect");
        Client { fd }
    }

    pub fn send(&self, bytes: &[u8]) {
        self.send_with_fd(bytes, None);
    }

    /// Send that tolerates a connection the server already closed.
    pub fn try_send(&self, bytes: &[u8]) -> nix::Result<usize> {
        sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
    }

    pub fn send_with_fd(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) {
        let raw = fd.map(|f| [f.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage<'_>> = raw
            .as_ref()
            .map(|r| ControlMessage::ScmRights(r))
            .into_iter()
            .collect();
        let n = sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .expect("sendmsg");
        assert_eq!(n, bytes.len());
    }

    pub fn recv(&self, timeout: Duration) -> Got {
        let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let n = loop {
            // A signal interrupting the wait is not the peer's doing: wait again.
            match poll(
                &mut pfd,
                PollTimeout::try_from(timeout.as_millis() as i32).expect("timeout"),
            ) {
                Err(Errno::EINTR) => continue,
                r => break r.expect("poll"),
            }
        };
        if n == 0 {
            return Got::Timeout;
        }
        let mut buf = vec![0u8; 65536];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (bytes, raw_fds, flags) = match recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(r) => {
                let mut fds = Vec::new();
                for c in r.cmsgs().expect("cmsgs") {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        fds.extend(v);
                    }
                }
                (r.bytes, fds, r.flags)
            }
            Err(Errno::ECONNRESET) => return Got::Eof,
            Err(e) => panic!("recvmsg: {e}"),
        };
        assert!(!flags.contains(MsgFlags::MSG_TRUNC), "truncated read");
        // SAFETY: the kernel just installed these fds in our table for this message; we own them.
        let fds = raw_fds
            .into_iter()
            .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
            .collect();
        if bytes == 0 {
            return Got::Eof;
        }
        Got::Msg(buf[..bytes].to_vec(), fds)
    }

    /// The next request (panics on EOF or after 10 s).
    pub fn recv_req(&self) -> (Req, Vec<OwnedFd>) {
        match self.recv(Duration::from_secs(10)) {
            Got::Msg(b, fds) => (decode_request(&b), fds),
            Got::Eof => panic!("unexpected EOF"),
            Got::Timeout => panic!("no request within 10 s"),
        }
    }

    /// Hello, then read and ack the whole snapshot; returns its entries (SnapshotSent excluded).
    pub fn hello_and_snapshot(&self) -> Vec<(Req, Vec<OwnedFd>)> {
        self.send(HELLO_V1);
        let mut out = Vec::new();
        loop {
            let (req, fds) = self.recv_req();
            self.send(ACK);
            if req == Req::SnapshotSent {
                return out;
            }
            out.push((req, fds));
        }
    }

    /// Waits for the server to close the connection.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.recv(left) {
                Got::Eof => return true,
                Got::Timeout => return false,
                Got::Msg(..) => {}
            }
        }
    }
}

/// (dev, ino) of an fd.
pub fn file_id(fd: impl AsFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd).expect("fstat");
    (st.st_dev, st.st_ino)
}

/// Records the server's events.
#[derive(Clone, Default)]
pub struct Events {
    inner: Arc<(Mutex<Vec<ZdsEvent>>, Condvar)>,
}

impl Events {
    pub fn sink(&self) -> Box<dyn Fn(ZdsEvent) + Send + Sync> {
        let inner = self.inner.clone();
        Box::new(move |e| {
            inner.0.lock().expect("events").push(e);
            inner.1.notify_all();
        })
    }

    pub fn all(&self) -> Vec<ZdsEvent> {
        self.inner.0.lock().expect("events").clone()
    }

    /// Waits (up to 10 s) for an event matching `pred` and returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&ZdsEvent) -> bool) -> ZdsEvent {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = self.inner.0.lock().expect("events");
        loop {
            if let Some(e) = events.iter().find(|e| pred(e)) {
                return e.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no event '{what}' within 10 s; got {events:?}"
            );
            events = self.inner.1.wait_timeout(events, left).expect("events").0;
        }
    }

    pub fn snapshot_sent(&self, n: usize) -> u64 {
        let count = |es: &[ZdsEvent]| {
            es.iter()
                .filter(|e| matches!(e, ZdsEvent::SnapshotSent { .. }))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = self.inner.0.lock().expect("events");
        loop {
            if count(&events) >= n {
                return events
                    .iter()
                    .filter_map(|e| match e {
                        ZdsEvent::SnapshotSent { conn, .. } => Some(*conn),
                        _ => None,
                    })
                    .nth(n - 1)
                    .expect("nth");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "fewer than {n} SnapshotSent events; got {events:?}"
            );
            events = self.inner.1.wait_timeout(events, left).expect("events").0;
        }
    }

    pub fn disconnected(&self, conn: u64) -> String {
        match self.wait_for(
            &format!("Disconnected {conn}"),
            |e| matches!(e, ZdsEvent::Disconnected { conn: c, .. } if *c == conn),
        ) {
            ZdsEvent::Disconnected { reason, .. } => reason,
            _ => unreachable!(),
        }
    }
}

/// A netns-like fd to hand over: a fresh temp file (tests compare dev+ino).
pub fn temp_fd() -> OwnedFd {
    OwnedFd::from(tempfile::tempfile().expect("tempfile"))
}
