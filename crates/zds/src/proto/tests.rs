//! Byte-level tests: every expected byte string below is written by hand from the contract's field
//! numbers and protobuf wire types (tag byte = field_number << 3 | wire_type; wire type 0 =
//! varint, 2 = length-delimited), not produced by the encoder under test.

use super::*;
use prost::Message;

fn info() -> WorkloadInfo {
    WorkloadInfo {
        name: "p".into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
    }
}

// WorkloadInfo{name="p" (1:LEN), namespace="ns" (2:LEN), service_account="sa" (3:LEN)}
const INFO: &[u8] = &[
    0x0a, 0x01, b'p', 0x12, 0x02, b'n', b's', 0x1a, 0x02, b's', b'a',
];

#[test]
fn hello_v1_is_field1_varint_1() {
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);
    let decoded = ZdsHello::decode(&[0x08u8, 0x01][..]).expect("decode hello");
    assert_eq!(decoded.version(), Version::V1);
}

#[test]
fn hello_not_used_is_empty_and_unknown_version_survives_decoding() {
    let hello = ZdsHello {
        version: Version::NotUsed as i32,
    };
    assert_eq!(hello.encode_to_vec(), Vec::<u8>::new());
    assert_eq!(
        ZdsHello::decode(&[][..]).expect("empty hello").version,
        Version::NotUsed as i32
    );
    // A future version number decodes as its raw value, so the server can name it when refusing.
    assert_eq!(
        ZdsHello::decode(&[0x08u8, 0x02][..]).expect("v2").version,
        2
    );
}

#[test]
fn workload_info_fields_1_2_3() {
    assert_eq!(info().encode_to_vec(), INFO);
    assert_eq!(WorkloadInfo::decode(INFO).expect("decode info"), info());
}

#[test]
fn workload_info_reserved_field_4_is_skipped_when_decoding() {
    // name="p", then field 4 (the removed trust_domain, 4<<3|2 = 0x22) = "td"
    let bytes = [0x0a, 0x01, b'p', 0x22, 0x02, b't', b'd'];
    let decoded = WorkloadInfo::decode(&bytes[..]).expect("decode info with field 4");
    assert_eq!(
        decoded,
        WorkloadInfo {
            name: "p".into(),
            ..Default::default()
        }
    );
    // ...and never emitted: re-encoding drops it.
    assert_eq!(decoded.encode_to_vec(), [0x0a, 0x01, b'p']);
}

#[test]
fn add_workload_in_request_is_field1() {
    // AddWorkload{uid="u1" (1:LEN), workload_info (2:LEN, 11 bytes)} = 17 bytes
    let mut add = vec![0x0a, 0x02, b'u', b'1', 0x12, 0x0b];
    add.extend_from_slice(INFO);
    assert_eq!(add.len(), 0x11);
    let mut req = vec![0x0a, 0x11];
    req.extend_from_slice(&add);
    assert_eq!(WorkloadRequest::add("u1", &info()).encode_to_vec(), req);
    let decoded = WorkloadRequest::decode(&req[..]).expect("decode add");
    assert_eq!(decoded, WorkloadRequest::add("u1", &info()));
}

#[test]
fn add_workload_with_empty_info_still_carries_field2() {
    let req = WorkloadRequest::add("u1", &WorkloadInfo::default()).encode_to_vec();
    assert_eq!(req, [0x0a, 0x06, 0x0a, 0x02, b'u', b'1', 0x12, 0x00]);
}

#[test]
fn keep_workload_in_request_is_field5() {
    // keep = field 5, LEN: 5<<3|2 = 0x2a; KeepWorkload{uid="u1" (1:LEN)}
    let req = [0x2a, 0x04, 0x0a, 0x02, b'u', b'1'];
    assert_eq!(WorkloadRequest::keep("u1").encode_to_vec(), req);
    assert_eq!(
        WorkloadRequest::decode(&req[..]).expect("decode keep"),
        WorkloadRequest::keep("u1")
    );
}

#[test]
fn del_workload_uid_is_field2_in_request_field2() {
    // del = field 2 (0x12); DelWorkload{uid = field 2 (0x12)}
    let req = [0x12, 0x04, 0x12, 0x02, b'u', b'1'];
    assert_eq!(WorkloadRequest::del("u1").encode_to_vec(), req);
    assert_eq!(
        DelWorkload { uid: "u1".into() }.encode_to_vec(),
        [0x12, 0x02, b'u', b'1']
    );
    assert_eq!(
        WorkloadRequest::decode(&req[..]).expect("decode del"),
        WorkloadRequest::del("u1")
    );
    // A DelWorkload with the uid in field 1 (a plausible mistake) decodes to an empty uid.
    let wrong = DelWorkload::decode(&[0x0a, 0x02, b'u', b'1'][..]).expect("decode");
    assert_eq!(wrong.uid, "");
}

#[test]
fn snapshot_sent_is_empty_message_in_field3() {
    assert_eq!(SnapshotSent {}.encode_to_vec(), Vec::<u8>::new());
    let req = [0x1a, 0x00];
    assert_eq!(WorkloadRequest::snapshot_sent().encode_to_vec(), req);
    assert_eq!(
        WorkloadRequest::decode(&req[..]).expect("decode snapshot_sent"),
        WorkloadRequest::snapshot_sent()
    );
}

#[test]
fn ack_success_and_nack() {
    let ok = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack::default())),
    };
    assert_eq!(ok.encode_to_vec(), [0x0a, 0x00]);
    assert_eq!(
        WorkloadResponse::decode(&[0x0au8, 0x00][..]).expect("decode ack"),
        ok
    );
    let nack_bytes = [0x0a, 0x06, 0x0a, 0x04, b'b', b'o', b'o', b'm'];
    let nack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: "boom".into(),
        })),
    };
    assert_eq!(nack.encode_to_vec(), nack_bytes);
    assert_eq!(
        WorkloadResponse::decode(&nack_bytes[..]).expect("decode nack"),
        nack
    );
}

#[test]
fn response_unknown_fields_are_skipped_and_empty_has_no_payload() {
    // field 9 varint 1 (0x48 0x01) before the ack
    let bytes = [0x48, 0x01, 0x0a, 0x00];
    let decoded = WorkloadResponse::decode(&bytes[..]).expect("decode with unknown field");
    assert!(matches!(
        decoded.payload,
        Some(workload_response::Payload::Ack(ref a)) if a.error.is_empty()
    ));
    assert_eq!(
        WorkloadResponse::decode(&[][..]).expect("empty").payload,
        None
    );
}

#[test]
fn malformed_bytes_do_not_decode() {
    // A ZdsHello (field 1 as varint) is not a WorkloadResponse (field 1 must be LEN).
    assert!(WorkloadResponse::decode(&[0x08u8, 0x01][..]).is_err());
    // Length prefix past the end.
    assert!(WorkloadResponse::decode(&[0x0au8, 0x05, 0x0a][..]).is_err());
    // Invalid UTF-8 in the ack's error string.
    assert!(WorkloadResponse::decode(&[0x0au8, 0x03, 0x0a, 0x01, 0xff][..]).is_err());
}
