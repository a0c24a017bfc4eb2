//! Takumo Keys: issues and verifies Takumo API keys over gRPC.
//!
//! - [`proto`]: generated types and proto ↔ domain conversions.
//! - [`service`]: the `ApiKeyService` handlers.
//! - [`auth`]: principals (service tokens, API keys) and the authorization table.
//! - [`verify`]: the verification pipeline shared by `VerifyKey` and authentication.
//! - [`keys`]: the key format, generation and checksum; [`hashing`]: argon2id with a pepper.
//! - [`scopes`]: the scope catalog and presets; [`model`]: domain types;
//!   [`page_token`]: the list RPCs' page tokens.
//! - [`store`]: the `Store` trait and its PostgreSQL and SQLite backends.
//! - [`cache`]: the verified-key cache; [`usage`]: batched usage counting;
//!   [`metrics`]: counters of the verification path.
//! - [`config`], [`telemetry`], [`startup`]: settings, logging, wiring and lifecycle;
//!   [`tls`]: TLS, mutual TLS and certificate principals; [`limits`]: request size limits.
//! - [`error`]: the one error type and its mapping to gRPC status codes.
//! - [`client`] (feature `client`): a typed client and the tower layer internal services use to verify keys.

mod auth;
mod cache;
#[cfg(feature = "client")]
pub mod client;
pub mod config;
pub mod error;
pub mod hashing;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod page_token;
pub mod proto;
pub mod scopes;
pub mod secret;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
mod tls;
pub mod usage;
pub mod validate;
pub mod verify;

pub use error::{Error, Result};
