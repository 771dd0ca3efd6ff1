//! The client's side of delta xDS, without I/O: what it holds, what it asks for, how it answers a push.
//!
//! Per type URL it keeps the version of every resource it holds (the last good one: a rejected
//! resource keeps the version it had, or is not recorded at all, so a resumed stream gets it
//! again). A new stream subscribes with those versions as `initial_resource_versions`, and the
//! inventory is left as it is until that type's first response on the new stream: that push is
//! the server's full state for the type (istiod sends everything on a fresh stream), so whatever
//! the agent held that the new stream neither sent nor removed is removed then, not before.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use ambit_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status,
};

/// gRPC `INVALID_ARGUMENT`: the code of a NACK's `error_detail` (istiod reads only its presence
/// and message).
const NACK_CODE: i32 = 3;

/// Where the resources go: the inventory behind the stream.
pub trait Sink: Send {
    /// Adds or replaces resource `name` of `type_url` with the encoded message `value`. On an
    /// error the sink keeps what it had for `name`; the error text goes into the NACK.
    fn apply(&mut self, type_url: &str, name: &str, value: &[u8]) -> Result<(), String>;

    /// Removes resource `name` of `type_url` (nothing when unknown).
    fn remove(&mut self, type_url: &str, name: &str);

    /// The stream delivered its first full push of `type_url` (after every apply and removal
    /// of it): the sink's view of the type is complete.
    fn synced(&mut self, _type_url: &str) {}
}

/// What handling one response produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The ACK, or the NACK with the error text.
    pub reply: DeltaDiscoveryRequest,
    /// The errors of the resources not used (`name: error`).
    pub rejected: Vec<String>,
    /// Held resources removed because the new stream's first push left them out.
    pub stale_removed: usize,
    /// Whether this response was the type's first on the stream.
    pub first: bool,
}

/// One type's state.
#[derive(Debug, Default)]
struct TypeState {
    /// Held resources and their versions.
    versions: HashMap<String, String>,
    /// On a new stream until its first response: the names held that it has not yet mentioned.
    unconfirmed: Option<BTreeSet<String>>,
}

/// The delta state of every subscribed type.
#[derive(Debug)]
pub struct DeltaState {
    types: BTreeMap<String, TypeState>,
}

impl DeltaState {
    /// Subscribes (as wildcard) to `type_urls`.
    pub fn new(type_urls: &[&str]) -> Self {
        Self {
            types: type_urls
                .iter()
                .map(|t| ((*t).to_owned(), TypeState::default()))
                .collect(),
        }
    }

    /// The subscribed types.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// Resources of `type_url` held.
    pub fn count(&self, type_url: &str) -> usize {
        self.types.get(type_url).map_or(0, |t| t.versions.len())
    }

    /// The version held of `name`, if any.
    pub fn version(&self, type_url: &str, name: &str) -> Option<&str> {
        self.types
            .get(type_url)?
            .versions
            .get(name)
            .map(String::as_str)
    }

    /// A new stream starts: every held resource is unconfirmed until its type's first push.
    pub fn begin_stream(&mut self) {
        for t in self.types.values_mut() {
            t.unconfirmed = Some(t.versions.keys().cloned().collect());
        }
    }

    /// Whether `type_url` has had its first response on the current stream.
    pub fn synced(&self, type_url: &str) -> bool {
        self.types
            .get(type_url)
            .is_some_and(|t| t.unconfirmed.is_none())
    }

    /// The stream's first request for each type: a wildcard subscription (no names) with the
    /// versions held.
    pub fn initial_requests(&self, node: &Node) -> Vec<DeltaDiscoveryRequest> {
        self.types
            .iter()
            .map(|(type_url, t)| DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: type_url.clone(),
                initial_resource_versions: t
                    .versions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ..DeltaDiscoveryRequest::default()
            })
            .collect()
    }

    /// Applies a response to `sink` (every resource, then every removal) and answers it: an
    /// ACK, or a NACK naming each resource not used. The others of the push still apply.
    pub fn handle(&mut self, response: &DeltaDiscoveryResponse, sink: &mut dyn Sink) -> Outcome {
        let type_url = response.type_url.as_str();
        let mut rejected = Vec::new();
        let mut stale_removed = 0;
        let mut first = false;
        match self.types.get_mut(type_url) {
            None => rejected.push(format!("type {type_url:?} is not subscribed")),
            Some(state) => {
                for resource in &response.resources {
                    let name = resource.name.as_str();
                    if let Some(unconfirmed) = &mut state.unconfirmed {
                        unconfirmed.remove(name);
                    }
                    let result = match &resource.resource {
                        None => Err("the resource has no body".to_owned()),
                        Some(any) if any.type_url != type_url => Err(format!(
                            "the resource is a {:?}, not a {type_url:?}",
                            any.type_url
                        )),
                        Some(any) => sink.apply(type_url, name, &any.value),
                    };
                    match result {
                        Ok(()) => {
                            state
                                .versions
                                .insert(name.to_owned(), resource.version.clone());
                        }
                        Err(error) => rejected.push(format!("{name}: {error}")),
                    }
                }
                for name in &response.removed_resources {
                    if let Some(unconfirmed) = &mut state.unconfirmed {
                        unconfirmed.remove(name);
                    }
                    state.versions.remove(name);
                    sink.remove(type_url, name);
                }
                if let Some(stale) = state.unconfirmed.take() {
                    first = true;
                    for name in stale {
                        state.versions.remove(&name);
                        sink.remove(type_url, &name);
                        stale_removed += 1;
                    }
                    sink.synced(type_url);
                }
            }
        }
        let error_detail = (!rejected.is_empty()).then(|| Status {
            code: NACK_CODE,
            message: rejected.join("; "),
            details: Vec::new(),
        });
        Outcome {
            reply: DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail,
                ..DeltaDiscoveryRequest::default()
            },
            rejected,
            stale_removed,
            first,
        }
    }
}

#[cfg(test)]
mod tests;
