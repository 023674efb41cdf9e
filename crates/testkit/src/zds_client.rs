//! The ztunnel side of ZDS (the in-pod hand-off protocol), written by hand from the contract
//! (`ztunnel-contract.md`, "ZDS"; `istio-cni-spec.md` §7.4) — deliberately independent of the
//! agent's server and of any protobuf library, so a test that passes here checks the agent's
//! bytes the way an unmodified ztunnel reads them.
//!
//! Wire format (package `istio.workload.zds`, proto3, one message per `SOCK_SEQPACKET` packet,
//! no length framing):
//!
//! ```text
//! ZdsHello        { Version version = 1; }                  enum Version { NOT_USED = 0; V1 = 1; }
//! WorkloadInfo    { string name = 1; string namespace = 2; string service_account = 3; reserved 4; }
//! AddWorkload     { string uid = 1; WorkloadInfo workload_info = 2; }   + exactly one netns fd (SCM_RIGHTS)
//! KeepWorkload    { string uid = 1; }
//! DelWorkload     { string uid = 2; }                        ← field number 2
//! SnapshotSent    { }
//! WorkloadRequest { oneof payload { AddWorkload add = 1; DelWorkload del = 2;
//!                                   SnapshotSent snapshot_sent = 3; KeepWorkload keep = 5; } }
//! Ack             { string error = 1; }
//! WorkloadResponse{ oneof payload { Ack ack = 1; } }
//! ```
//!
//! Reads use a 1024-byte buffer, as ztunnel's do; `MSG_TRUNC` / `MSG_CTRUNC` are errors.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, bind, connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

/// ztunnel's receive buffer size (bytes); a longer packet is a protocol error.
pub const ZDS_READ_BUFFER: usize = 1024;

/// `ZdsHello { version: V1 }` encoded: field 1, varint, value 1.
pub const HELLO_V1: [u8; 2] = [0x08, 0x01];

/// `WorkloadInfo` of an `AddWorkload`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// A decoded `WorkloadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadRequest {
    /// `add = 1`; `info` is `None` when the message had no `workload_info` (ztunnel 1.21 style).
    Add {
        uid: String,
        info: Option<WorkloadInfo>,
    },
    /// `keep = 5`.
    Keep { uid: String },
    /// `del = 2` (uid in field **2** of `DelWorkload`).
    Del { uid: String },
    /// `snapshot_sent = 3`.
    SnapshotSent,
}

impl WorkloadRequest {
    /// The request's kind, for records and messages.
    pub fn kind(&self) -> RequestKind {
        match self {
            WorkloadRequest::Add { .. } => RequestKind::Add,
            WorkloadRequest::Keep { .. } => RequestKind::Keep,
            WorkloadRequest::Del { .. } => RequestKind::Del,
            WorkloadRequest::SnapshotSent => RequestKind::SnapshotSent,
        }
    }

    /// The uid the request names (none for `SnapshotSent`).
    pub fn uid(&self) -> Option<&str> {
        match self {
            WorkloadRequest::Add { uid, .. }
            | WorkloadRequest::Keep { uid }
            | WorkloadRequest::Del { uid } => Some(uid),
            WorkloadRequest::SnapshotSent => None,
        }
    }
}

/// Kind of a `WorkloadRequest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Add,
    Keep,
    Del,
    SnapshotSent,
}

/// Why bytes did not decode as the contract's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ZDS decode error in {message}: {detail}")]
pub struct DecodeError {
    /// The message being decoded (`WorkloadRequest`, `AddWorkload`, …).
    pub message: &'static str,
    pub detail: String,
}

fn derr(message: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError {
        message,
        detail: detail.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Protobuf primitives (wire types 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).

/// Append `v` as a base-128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Read a varint at `*pos`, advancing it.
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some(&b) = buf.get(*pos) else {
            return Err(format!("varint truncated at byte {}", *pos));
        };
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".to_string())
}

fn put_len_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// proto3: an empty string is the default and is not emitted.
fn put_string(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        put_len_field(out, field, s.as_bytes());
    }
}

/// One field of a message: number and value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Split a message into its fields (in order; repeated numbers kept).
fn fields<'a>(buf: &'a [u8], message: &'static str) -> Result<Vec<(u64, Value<'a>)>, DecodeError> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = get_varint(buf, &mut pos).map_err(|e| derr(message, format!("key: {e}")))?;
        let number = key >> 3;
        if number == 0 {
            return Err(derr(message, "field number 0"));
        }
        let value = match key & 7 {
            0 => Value::Varint(
                get_varint(buf, &mut pos)
                    .map_err(|e| derr(message, format!("field {number}: {e}")))?,
            ),
            1 | 5 => {
                let width = if key & 7 == 1 { 8 } else { 4 };
                if pos + width > buf.len() {
                    return Err(derr(
                        message,
                        format!("field {number}: fixed value truncated"),
                    ));
                }
                pos += width;
                Value::Fixed
            }
            2 => {
                let len = get_varint(buf, &mut pos)
                    .map_err(|e| derr(message, format!("field {number} length: {e}")))?;
                let len = usize::try_from(len)
                    .map_err(|_| derr(message, format!("field {number}: length {len}")))?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or_else(|| {
                        derr(
                            message,
                            format!(
                                "field {number}: length {len} overruns the {}-byte message",
                                buf.len()
                            ),
                        )
                    })?;
                let v = Value::Bytes(&buf[pos..end]);
                pos = end;
                v
            }
            wt => {
                return Err(derr(
                    message,
                    format!("field {number}: unsupported wire type {wt}"),
                ));
            }
        };
        out.push((number, value));
    }
    Ok(out)
}

fn string_of(v: &Value<'_>, message: &'static str, field: &str) -> Result<String, DecodeError> {
    match v {
        Value::Bytes(b) => String::from_utf8(b.to_vec())
            .map_err(|e| derr(message, format!("{field} is not UTF-8: {e}"))),
        other => Err(derr(
            message,
            format!("{field} has the wrong wire type ({other:?}), want length-delimited"),
        )),
    }
}

fn bytes_of<'a>(
    v: &Value<'a>,
    message: &'static str,
    field: &str,
) -> Result<&'a [u8], DecodeError> {
    match v {
        Value::Bytes(b) => Ok(b),
        other => Err(derr(
            message,
            format!("{field} has the wrong wire type ({other:?}), want a message"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Messages.

/// Encode `ZdsHello { version }` (1 = V1).
pub fn encode_hello(version: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if version != 0 {
        put_varint(&mut out, 1 << 3);
        put_varint(&mut out, version);
    }
    out
}

/// Encode `WorkloadResponse { ack: Ack { error } }` (empty error = success → `0a 00`).
pub fn encode_ack(error: &str) -> Vec<u8> {
    let mut ack = Vec::new();
    put_string(&mut ack, 1, error);
    let mut out = Vec::new();
    put_len_field(&mut out, 1, &ack);
    out
}

/// Decode a `WorkloadInfo`. Unknown fields are an error here (the contract knows 1–3; 4 is
/// reserved), so a server that puts a field at the wrong number is caught.
pub fn decode_workload_info(buf: &[u8]) -> Result<WorkloadInfo, DecodeError> {
    const M: &str = "WorkloadInfo";
    let mut info = WorkloadInfo::default();
    for (n, v) in fields(buf, M)? {
        match n {
            1 => info.name = string_of(&v, M, "name (1)")?,
            2 => info.namespace = string_of(&v, M, "namespace (2)")?,
            3 => info.service_account = string_of(&v, M, "service_account (3)")?,
            4 => return Err(derr(M, "field 4 is reserved (removed trust_domain)")),
            other => return Err(derr(M, format!("unknown field {other}"))),
        }
    }
    Ok(info)
}

fn decode_uid_message(
    buf: &[u8],
    message: &'static str,
    uid_field: u64,
) -> Result<String, DecodeError> {
    let mut uid = String::new();
    for (n, v) in fields(buf, message)? {
        if n == uid_field {
            uid = string_of(&v, message, &format!("uid ({uid_field})"))?;
        } else {
            return Err(derr(
                message,
                format!("unknown field {n} (the uid is field {uid_field})"),
            ));
        }
    }
    if uid.is_empty() {
        return Err(derr(message, format!("no uid (field {uid_field})")));
    }
    Ok(uid)
}

/// Decode a `WorkloadRequest`. Strict: a request with no payload, with a payload at an unknown
/// field number, with an empty uid, or with unknown fields inside a payload is an error.
pub fn decode_request(buf: &[u8]) -> Result<WorkloadRequest, DecodeError> {
    const M: &str = "WorkloadRequest";
    let mut payload = None;
    for (n, v) in fields(buf, M)? {
        // oneof: the last payload field wins, as in protobuf.
        payload = Some(match n {
            1 => {
                const A: &str = "AddWorkload";
                let body = bytes_of(&v, M, "add (1)")?;
                let mut uid = String::new();
                let mut info = None;
                for (n, v) in fields(body, A)? {
                    match n {
                        1 => uid = string_of(&v, A, "uid (1)")?,
                        2 => {
                            info =
                                Some(decode_workload_info(bytes_of(&v, A, "workload_info (2)")?)?)
                        }
                        other => return Err(derr(A, format!("unknown field {other}"))),
                    }
                }
                if uid.is_empty() {
                    return Err(derr(A, "no uid (field 1)"));
                }
                WorkloadRequest::Add { uid, info }
            }
            2 => WorkloadRequest::Del {
                uid: decode_uid_message(bytes_of(&v, M, "del (2)")?, "DelWorkload", 2)?,
            },
            3 => {
                let body = bytes_of(&v, M, "snapshot_sent (3)")?;
                if let Some((n, _)) = fields(body, "SnapshotSent")?.first() {
                    return Err(derr("SnapshotSent", format!("unknown field {n}")));
                }
                WorkloadRequest::SnapshotSent
            }
            5 => WorkloadRequest::Keep {
                uid: decode_uid_message(bytes_of(&v, M, "keep (5)")?, "KeepWorkload", 1)?,
            },
            other => return Err(derr(M, format!("unknown payload field {other}"))),
        });
    }
    payload.ok_or_else(|| derr(M, "no payload (empty message)"))
}

/// Encode a `WorkloadRequest` the way the contract says an agent must (for tests that play the
/// agent; independent of the agent's own encoder).
pub fn encode_request(req: &WorkloadRequest) -> Vec<u8> {
    let mut body = Vec::new();
    let field = match req {
        WorkloadRequest::Add { uid, info } => {
            put_string(&mut body, 1, uid);
            if let Some(info) = info {
                let mut i = Vec::new();
                put_string(&mut i, 1, &info.name);
                put_string(&mut i, 2, &info.namespace);
                put_string(&mut i, 3, &info.service_account);
                put_len_field(&mut body, 2, &i);
            }
            1
        }
        WorkloadRequest::Del { uid } => {
            put_string(&mut body, 2, uid);
            2
        }
        WorkloadRequest::SnapshotSent => 3,
        WorkloadRequest::Keep { uid } => {
            put_string(&mut body, 1, uid);
            5
        }
    };
    let mut out = Vec::new();
    put_len_field(&mut out, field, &body);
    out
}

/// Decode a `WorkloadResponse`: `Ok(None)` = ack, `Ok(Some(msg))` = nack.
pub fn decode_ack(buf: &[u8]) -> Result<Option<String>, DecodeError> {
    const M: &str = "WorkloadResponse";
    let mut ack = None;
    for (n, v) in fields(buf, M)? {
        if n != 1 {
            return Err(derr(M, format!("unknown field {n}")));
        }
        let body = bytes_of(&v, M, "ack (1)")?;
        let mut error = String::new();
        for (n, v) in fields(body, "Ack")? {
            if n != 1 {
                return Err(derr("Ack", format!("unknown field {n}")));
            }
            error = string_of(&v, "Ack", "error (1)")?;
        }
        ack = Some(if error.is_empty() { None } else { Some(error) });
    }
    ack.ok_or_else(|| derr(M, "no ack"))
}

/// Decode a `ZdsHello`; returns the version number.
pub fn decode_hello(buf: &[u8]) -> Result<u64, DecodeError> {
    const M: &str = "ZdsHello";
    let mut version = 0;
    for (n, v) in fields(buf, M)? {
        match (n, v) {
            (1, Value::Varint(x)) => version = x,
            (1, other) => return Err(derr(M, format!("version has wire type {other:?}"))),
            (other, _) => return Err(derr(M, format!("unknown field {other}"))),
        }
    }
    Ok(version)
}

// ---------------------------------------------------------------------------------------------
// Transport.

/// One received packet: its bytes and the fds that rode along.
#[derive(Debug)]
pub struct Packet {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Why a receive ended.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed the connection.
    #[error("ZDS peer closed the connection")]
    Closed,
    /// Nothing arrived within the socket's receive timeout.
    #[error("ZDS receive timed out")]
    TimedOut,
    /// The packet was longer than the buffer (`MSG_TRUNC`).
    #[error("ZDS packet truncated (MSG_TRUNC): longer than {ZDS_READ_BUFFER} bytes")]
    Truncated,
    /// The ancillary data did not fit (`MSG_CTRUNC`).
    #[error("ZDS control data truncated (MSG_CTRUNC)")]
    ControlTruncated,
    #[error("ZDS receive: {0}")]
    Io(#[from] io::Error),
}

/// Connect a `SOCK_SEQPACKET` unix socket to `path`.
pub fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    connect(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    Ok(fd)
}

/// Listen on a `SOCK_SEQPACKET` unix socket at `path` (for tests that play the agent).
pub fn listen_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    bind(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    listen(&fd, Backlog::new(16).map_err(io::Error::from)?).map_err(io::Error::from)?;
    Ok(fd)
}

/// Accept one connection on a listener from [`listen_seqpacket`] (honours `SO_RCVTIMEO`).
pub fn accept_seqpacket(listener: impl AsFd) -> io::Result<OwnedFd> {
    loop {
        match nix::sys::socket::accept4(listener.as_fd().as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(raw) => return Ok(crate::sys::own_fd(raw)),
            // A signal handler in this process (any thread's) interrupts a socket wait that has a
            // timeout even with SA_RESTART (signal(7)): not an error of the peer.
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Set the receive timeout (`SO_RCVTIMEO`) of `fd`.
pub fn set_recv_timeout(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = TimeVal::new(
        i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        i64::from(t.subsec_micros()),
    );
    setsockopt(fd, sockopt::ReceiveTimeout, &tv).map_err(io::Error::from)
}

/// Send one packet with optional fds (`SCM_RIGHTS`).
pub fn send_packet(fd: impl AsFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    loop {
        match sendmsg::<()>(
            fd.as_fd().as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receive one packet (buffer of `buf_len` bytes, room for up to 8 fds). A wait interrupted by
/// a signal (`EINTR`: a socket with `SO_RCVTIMEO` returns it even under `SA_RESTART`) is resumed,
/// as ztunnel's async runtime does; it is not a protocol error.
pub fn recv_packet(fd: impl AsFd, buf_len: usize) -> Result<Packet, RecvError> {
    let mut buf = vec![0u8; buf_len];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let (n, flags, raw_fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = loop {
            match recvmsg::<()>(
                fd.as_fd().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return Err(RecvError::TimedOut),
                Err(e) => return Err(RecvError::Io(e.into())),
            }
        };
        let mut raw_fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    raw_fds.extend(fds);
                }
            }
        }
        (msg.bytes, msg.flags, raw_fds)
    };
    // Take ownership first, so an error below still closes what we were sent.
    let fds: Vec<OwnedFd> = raw_fds.into_iter().map(crate::sys::own_fd).collect();
    if flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(RecvError::Truncated);
    }
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(RecvError::ControlTruncated);
    }
    if n == 0 && fds.is_empty() {
        return Err(RecvError::Closed);
    }
    buf.truncate(n);
    Ok(Packet { bytes: buf, fds })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (CI of stop 16): a signal delivered to the stand-in's receiving thread made
    /// `recv_packet` fail with "Interrupted system call", the stand-in dropped its ZDS connection
    /// and missed the agent's Dels. A timed socket wait returns EINTR even under SA_RESTART.
    #[test]
    fn a_signal_during_a_timed_receive_does_not_end_it() {
        let (a, b) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        set_recv_timeout(&a, Duration::from_secs(20)).expect("SO_RCVTIMEO");
        let got = crate::eintr_tests::signalled(
            move || recv_packet(&a, 64),
            move || send_packet(&b, b"after the signals", &[]).expect("send"),
        )
        .expect("the receive outlives the signals");
        assert_eq!(got.bytes, b"after the signals");
    }

    #[test]
    fn varints_round_trip() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos), Ok(v));
            assert_eq!(pos, b.len());
        }
        let mut b = Vec::new();
        put_varint(&mut b, 300);
        assert_eq!(b, [0xac, 0x02]);
        assert!(get_varint(&[0x80], &mut 0).is_err());
    }

    #[test]
    fn contract_bytes() {
        assert_eq!(encode_hello(1), HELLO_V1);
        assert_eq!(decode_hello(&HELLO_V1), Ok(1));
        assert_eq!(encode_ack(""), [0x0a, 0x00]);
        assert_eq!(encode_ack("no"), [0x0a, 0x04, 0x0a, 0x02, b'n', b'o']);
        assert_eq!(decode_ack(&[0x0a, 0x00]), Ok(None));
        assert_eq!(
            decode_ack(&[0x0a, 0x04, 0x0a, 0x02, b'n', b'o']),
            Ok(Some("no".to_string()))
        );
        // DelWorkload { uid (2) = "u" } inside WorkloadRequest.del (2).
        let del = [0x12, 0x03, 0x12, 0x01, b'u'];
        assert_eq!(
            decode_request(&del),
            Ok(WorkloadRequest::Del {
                uid: "u".to_string()
            })
        );
        assert_eq!(
            encode_request(&WorkloadRequest::Del {
                uid: "u".to_string()
            }),
            del
        );
        // The classic mistake: uid in field 1 of DelWorkload.
        let wrong = [0x12, 0x03, 0x0a, 0x01, b'u'];
        let err = decode_request(&wrong).expect_err("field 1 in DelWorkload");
        assert!(err.to_string().contains("uid is field 2"), "{err}");
        // SnapshotSent = field 3, empty.
        assert_eq!(
            decode_request(&[0x1a, 0x00]),
            Ok(WorkloadRequest::SnapshotSent)
        );
        // KeepWorkload { uid (1) } at field 5.
        assert_eq!(
            decode_request(&[0x2a, 0x03, 0x0a, 0x01, b'k']),
            Ok(WorkloadRequest::Keep {
                uid: "k".to_string()
            })
        );
        // AddWorkload { uid "a", info { name "n", namespace "s", sa "x" } }.
        let add = [
            0x0a, 0x0e, 0x0a, 0x01, b'a', 0x12, 0x09, 0x0a, 0x01, b'n', 0x12, 0x01, b's', 0x1a,
            0x01, b'x',
        ];
        let req = WorkloadRequest::Add {
            uid: "a".to_string(),
            info: Some(WorkloadInfo {
                name: "n".to_string(),
                namespace: "s".to_string(),
                service_account: "x".to_string(),
            }),
        };
        assert_eq!(decode_request(&add), Ok(req.clone()));
        assert_eq!(encode_request(&req), add);
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        assert!(decode_request(&[]).is_err());
        assert!(decode_request(&[0xff, 0xff]).is_err());
        assert!(decode_request(&[0x0a, 0x05, 0x0a]).is_err());
        assert!(decode_request(&[0x32, 0x00]).is_err(), "field 6 unknown");
        assert!(decode_request(&[0x0a, 0x00]).is_err(), "add without uid");
        assert!(decode_workload_info(&[0x22, 0x00]).is_err(), "reserved 4");
    }
}
