//! TEST sink: keeps the raw resources of an xDS stream in memory, refusing values that start with `bad`.
#![allow(
    clippy::unwrap_used,
    reason = "a test helper: a poisoned lock panics the test (STYLE.md §7)"
)]
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::state::Sink;

/// A sink that keeps the raw resources in memory and refuses values starting with `bad`.
#[derive(Debug, Clone, Default)]
pub struct MemorySink(Arc<Mutex<MemoryState>>);

/// What a [`MemorySink`] holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryState {
    /// (type URL, name) → value.
    pub resources: BTreeMap<(String, String), Vec<u8>>,
    /// Types reported synced, in order.
    pub synced: Vec<String>,
}

impl MemorySink {
    /// A copy of what it holds.
    pub fn snapshot(&self) -> MemoryState {
        self.0.lock().unwrap().clone()
    }

    /// The value of `name` of `type_url`.
    pub fn get(&self, type_url: &str, name: &str) -> Option<Vec<u8>> {
        self.0
            .lock()
            .unwrap()
            .resources
            .get(&(type_url.to_owned(), name.to_owned()))
            .cloned()
    }
}

impl Sink for MemorySink {
    fn apply(&mut self, type_url: &str, name: &str, value: &[u8]) -> Result<(), String> {
        if value.starts_with(b"bad") {
            return Err(format!(
                "cannot decode {:?}",
                String::from_utf8_lossy(value)
            ));
        }
        self.0
            .lock()
            .unwrap()
            .resources
            .insert((type_url.to_owned(), name.to_owned()), value.to_vec());
        Ok(())
    }

    fn remove(&mut self, type_url: &str, name: &str) {
        self.0
            .lock()
            .unwrap()
            .resources
            .remove(&(type_url.to_owned(), name.to_owned()));
    }

    fn synced(&mut self, type_url: &str) {
        self.0.lock().unwrap().synced.push(type_url.to_owned());
    }
}
