//! The integration tests: one binary (one link, one process), a module per
//! concern. Every test talks to the real server over a real socket, with a
//! database of its own. `tests/redaction.rs` stays a binary of its own: it
//! installs a global log subscriber, which would capture every other test here.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod api;
mod authz_matrix;
#[cfg(feature = "client")]
mod client_layer;
mod faults;
mod gateways;
mod github_scanning;
mod hostile;
mod key_changes;
mod nginx;
mod operations;
mod prometheus;
mod proptest_keys;
mod security;
mod standby;
mod store_conformance;
mod tls;
mod verify_cache;
mod wire;
