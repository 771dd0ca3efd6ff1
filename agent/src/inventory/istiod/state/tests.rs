//! The delta state without I/O: applies, NACKs, removals and the resync of a resumed stream.
use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Node};

use super::*;
use crate::inventory::istiod::fake_istiod::resource;
use crate::inventory::istiod::memory_sink::MemorySink;

const A: &str = "type.googleapis.com/istio.workload.Address";
const Z: &str = "type.googleapis.com/istio.security.Authorization";

fn response(
    type_url: &str,
    nonce: &str,
    put: &[(&str, &str, &str)],
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: format!("sys-{nonce}"),
        resources: put
            .iter()
            .map(|(name, version, value)| {
                resource(type_url, name, version, value.as_bytes().to_vec())
            })
            .collect(),
        type_url: type_url.to_owned(),
        removed_resources: removed.iter().map(|n| (*n).to_owned()).collect(),
        nonce: nonce.to_owned(),
    }
}

fn started() -> (DeltaState, MemorySink) {
    let mut state = DeltaState::new(&[A, Z]);
    state.begin_stream();
    (state, MemorySink::default())
}

#[test]
fn a_push_is_applied_and_acked_with_its_nonce() {
    let (mut state, mut sink) = started();
    let out = state.handle(
        &response(A, "n1", &[("w1", "1", "one"), ("w2", "1", "two")], &[]),
        &mut sink,
    );
    assert_eq!(out.reply.type_url, A);
    assert_eq!(out.reply.response_nonce, "n1");
    assert_eq!(out.reply.error_detail, None);
    assert!(out.reply.node.is_none() && out.reply.initial_resource_versions.is_empty());
    assert!(out.first);
    assert_eq!(sink.get(A, "w1").as_deref(), Some(&b"one"[..]));
    assert_eq!(state.count(A), 2);
    assert_eq!(sink.snapshot().synced, vec![A.to_owned()]);
    // The next push is not the first: no second sync.
    let out = state.handle(
        &response(A, "n2", &[("w1", "2", "uno")], &["w2"]),
        &mut sink,
    );
    assert!(!out.first);
    assert_eq!(sink.get(A, "w2"), None);
    assert_eq!(state.version(A, "w1"), Some("2"));
    assert_eq!(sink.snapshot().synced.len(), 1);
}

#[test]
fn a_resource_the_sink_refuses_is_nacked_and_keeps_its_last_good_version() {
    let (mut state, mut sink) = started();
    state.handle(&response(A, "n1", &[("w1", "1", "one")], &[]), &mut sink);
    let out = state.handle(
        &response(A, "n2", &[("w1", "2", "bad one"), ("w2", "2", "two")], &[]),
        &mut sink,
    );
    let detail = out.reply.error_detail.expect("a nack");
    assert_eq!(detail.message, "w1: cannot decode \"bad one\"");
    assert_ne!(detail.code, 0);
    assert_eq!(out.reply.response_nonce, "n2");
    // The other resource of the push applied; the refused one kept its value and version.
    assert_eq!(sink.get(A, "w2").as_deref(), Some(&b"two"[..]));
    assert_eq!(sink.get(A, "w1").as_deref(), Some(&b"one"[..]));
    assert_eq!(state.version(A, "w1"), Some("1"));
    // A refused new resource is not recorded, so a resumed stream asks for it again.
    state.handle(
        &response(A, "n3", &[("w3", "3", "bad three")], &[]),
        &mut sink,
    );
    assert_eq!(state.version(A, "w3"), None);
    let initial = state.initial_requests(&Node::default());
    let a = initial.iter().find(|r| r.type_url == A).unwrap();
    assert_eq!(a.initial_resource_versions.len(), 2);
    assert_eq!(a.initial_resource_versions["w1"], "1");
}

#[test]
fn malformed_resources_and_unknown_types_are_nacked() {
    let (mut state, mut sink) = started();
    let mut r = response(A, "n1", &[("w1", "1", "one"), ("w2", "1", "two")], &[]);
    r.resources[0].resource.as_mut().unwrap().type_url = Z.to_owned();
    r.resources[1].resource = None;
    let out = state.handle(&r, &mut sink);
    let message = out.reply.error_detail.unwrap().message;
    assert!(
        message
            .contains("w1: the resource is a \"type.googleapis.com/istio.security.Authorization\""),
        "{message}"
    );
    assert!(
        message.contains("w2: the resource has no body"),
        "{message}"
    );
    assert_eq!(state.count(A), 0);
    let out = state.handle(
        &response("type.googleapis.com/other", "n2", &[], &[]),
        &mut sink,
    );
    assert_eq!(
        out.reply.error_detail.unwrap().message,
        "type \"type.googleapis.com/other\" is not subscribed"
    );
}

#[test]
fn a_resumed_stream_keeps_what_is_held_until_its_first_push_then_drops_what_it_left_out() {
    let (mut state, mut sink) = started();
    state.handle(
        &response(
            A,
            "n1",
            &[("w1", "1", "one"), ("w2", "1", "two"), ("w3", "1", "three")],
            &[],
        ),
        &mut sink,
    );
    state.handle(&response(Z, "n2", &[("p1", "1", "pol")], &[]), &mut sink);
    state.begin_stream();
    assert!(!state.synced(A));
    let initial = state.initial_requests(&Node {
        id: "me".into(),
        ..Node::default()
    });
    assert_eq!(initial.len(), 2);
    let a = initial.iter().find(|r| r.type_url == A).unwrap();
    assert_eq!(a.node.as_ref().unwrap().id, "me");
    assert!(a.resource_names_subscribe.is_empty(), "wildcard");
    assert_eq!(a.initial_resource_versions.len(), 3);
    // Nothing is removed before the first push of the type.
    assert_eq!(sink.snapshot().resources.len(), 4);
    // The first push sends w1 (changed) and w3 refused; w2 is gone from istiod.
    let out = state.handle(
        &response(A, "n3", &[("w1", "2", "uno"), ("w3", "2", "bad")], &[]),
        &mut sink,
    );
    assert!(out.first);
    assert_eq!(out.stale_removed, 1);
    assert_eq!(sink.get(A, "w2"), None);
    assert_eq!(
        sink.get(A, "w3").as_deref(),
        Some(&b"three"[..]),
        "refused: last good kept"
    );
    assert_eq!(state.version(A, "w3"), Some("1"));
    assert!(state.synced(A));
    // The other type is still unsynced: its resource is kept.
    assert_eq!(sink.get(Z, "p1").as_deref(), Some(&b"pol"[..]));
    let out = state.handle(&response(Z, "n4", &[], &[]), &mut sink);
    assert_eq!((out.first, out.stale_removed), (true, 1));
    assert_eq!(sink.get(Z, "p1"), None);
    assert_eq!(state.count(Z), 0);
}

/// The wire: Envoy's field numbers and service name, as istiod decodes them.
#[test]
fn messages_carry_envoys_field_numbers_and_service_name() {
    use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
    use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};
    use prost::Message as _;
    use tonic::server::NamedService;

    /// The field numbers present in an encoding (top level).
    fn tags(bytes: &[u8]) -> Vec<u32> {
        let mut buf = bytes;
        let mut out = Vec::new();
        while !buf.is_empty() {
            let (tag, wire) = prost::encoding::decode_key(&mut buf).unwrap();
            prost::encoding::skip_field(wire, tag, &mut buf, Default::default()).unwrap();
            out.push(tag);
        }
        out
    }
    let request = DeltaDiscoveryRequest {
        node: Some(Node::default()),
        type_url: "t".into(),
        resource_names_subscribe: vec!["s".into()],
        resource_names_unsubscribe: vec!["u".into()],
        initial_resource_versions: [("a".to_owned(), "1".to_owned())].into(),
        response_nonce: "n".into(),
        error_detail: Some(Status::default()),
    };
    assert_eq!(tags(&request.encode_to_vec()), [1, 2, 3, 4, 5, 6, 7]);
    let mut response = response(A, "n", &[("w", "1", "x")], &["r"]);
    assert_eq!(tags(&response.encode_to_vec()), [1, 2, 4, 5, 6]);
    let resource: Resource = response.resources.remove(0);
    assert_eq!(tags(&resource.encode_to_vec()), [1, 2, 3]);
    type Server = AggregatedDiscoveryServiceServer<()>;
    assert_eq!(
        <Server as NamedService>::NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
}
