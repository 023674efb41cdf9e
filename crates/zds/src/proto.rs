//! The ZDS messages (protobuf package `istio.workload.zds`), written by hand with `prost` derives.
//!
//! The wire format is fixed by ztunnel (`proto/zds.proto` there, `pkg/zdsapi/zds.proto` in istio);
//! field numbers below are the contract's, including the odd ones: `DelWorkload.uid` is field
//! **2**, `WorkloadRequest.keep` is field 5, and `WorkloadInfo` reserves field 4 (a removed
//! `trust_domain`), which is therefore never emitted and skipped when decoding. The byte-level
//! tests in `proto/tests.rs` pin every message against hand-computed bytes.

/// `enum Version { NOT_USED = 0; V1 = 1; }`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

/// ztunnel → agent, first message on a connection: `ZdsHello { Version version = 1; }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// `WorkloadInfo { string name = 1; string namespace = 2; string service_account = 3; reserved 4; }`
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// `AddWorkload { string uid = 1; WorkloadInfo workload_info = 2; }` — the pod's netns fd rides
/// along as SCM_RIGHTS (exactly one fd).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// `KeepWorkload { string uid = 1; }` — snapshot only, for a pod whose netns the agent does not
/// hold: ztunnel keeps what it already has. No fd.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// `DelWorkload { string uid = 2; }` (field number 2, not 1).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// `SnapshotSent {}` — ends the snapshot; ztunnel drops workloads the snapshot did not mention.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// agent → ztunnel: `WorkloadRequest { oneof payload { add = 1; keep = 5; del = 2; snapshot_sent = 3; } }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "workload_request::Payload", tags = "1, 5, 2, 3")]
    pub payload: Option<workload_request::Payload>,
}

pub mod workload_request {
    /// The `payload` oneof of [`super::WorkloadRequest`].
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
    }
}

/// `Ack { string error = 1; }` — empty error = success, anything else is a nack.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

/// ztunnel → agent after each request: `WorkloadResponse { oneof payload { Ack ack = 1; } }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

pub mod workload_response {
    /// The `payload` oneof of [`super::WorkloadResponse`].
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

impl WorkloadRequest {
    /// `WorkloadRequest { add: AddWorkload { uid, workload_info } }`
    pub fn add(uid: &str, info: &WorkloadInfo) -> Self {
        Self {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: uid.to_owned(),
                workload_info: Some(info.clone()),
            })),
        }
    }

    /// `WorkloadRequest { keep: KeepWorkload { uid } }`
    pub fn keep(uid: &str) -> Self {
        Self {
            payload: Some(workload_request::Payload::Keep(KeepWorkload {
                uid: uid.to_owned(),
            })),
        }
    }

    /// `WorkloadRequest { del: DelWorkload { uid } }`
    pub fn del(uid: &str) -> Self {
        Self {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: uid.to_owned(),
            })),
        }
    }

    /// `WorkloadRequest { snapshot_sent: SnapshotSent {} }`
    pub fn snapshot_sent() -> Self {
        Self {
            payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
        }
    }
}

#[cfg(test)]
mod tests;
