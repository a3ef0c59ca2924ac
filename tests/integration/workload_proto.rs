//! The generated Workload API types carry the spec's field numbers.
//! Checked on the wire bytes, not through the generated decoder.

use prost::Message;
use sigil::proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svid, X509svidResponse};

/// The key byte of a length-delimited field: `(number << 3) | 2`.
fn tag(field: u8) -> u8 {
    (field << 3) | 2
}

#[test]
fn x509_svid_field_numbers() {
    let svid = X509svid {
        spiffe_id: "a".into(),
        x509_svid: vec![1],
        x509_svid_key: vec![2],
        bundle: vec![3],
        hint: "h".into(),
    };
    let bytes = svid.encode_to_vec();
    assert_eq!(
        bytes,
        [
            tag(1),
            1,
            b'a',
            tag(2),
            1,
            1,
            tag(3),
            1,
            2,
            tag(4),
            1,
            3,
            tag(5),
            1,
            b'h'
        ]
    );
    let resp = X509svidResponse {
        svids: vec![],
        crl: vec![vec![9]],
        federated_bundles: [("spiffe://x".to_string(), vec![7])].into(),
    };
    let bytes = resp.encode_to_vec();
    assert_eq!(bytes[0], tag(2));
    assert_eq!(bytes[3], tag(3));
}

#[test]
fn jwt_request_field_numbers() {
    let req = JwtsvidRequest {
        audience: vec!["x".into()],
        spiffe_id: "y".into(),
    };
    assert_eq!(req.encode_to_vec(), [tag(1), 1, b'x', tag(2), 1, b'y']);
    let v = ValidateJwtsvidRequest {
        audience: "a".into(),
        svid: "s".into(),
    };
    assert_eq!(v.encode_to_vec(), [tag(1), 1, b'a', tag(2), 1, b's']);
}

#[test]
fn service_path_has_no_package() {
    // The client's method path is what every SPIFFE library calls.
    let src = include_str!(concat!(env!("OUT_DIR"), "/_.rs"));
    assert!(src.contains("\"/SpiffeWorkloadAPI/FetchX509SVID\""));
    assert!(src.contains("\"/SpiffeWorkloadAPI/ValidateJWTSVID\""));
}
