//! The gRPC surface: what a caller sees. Translates requests into calls on
//! the layers below ([`crate::verify`], [`crate::store`]) and their answers
//! into responses; decides nothing about a key itself (that is
//! [`crate::verify`]). May not import from [`crate::server`].
//!
//! - [`service`]: the `ApiKeyService` handlers.
//! - [`auth`]: principals (service tokens, API keys, certificates) and the authorization table.
//! - [`issue`]: generating, hashing and storing a new key (CreateKey, RollKey and `bootstrap`).
//! - [`leaks`]: the leaked-key intake (ReportLeakedKeys and GitHub's secret scanning).
//! - [`limits`]: request size and metadata limits, HTTP/2 settings.
//! - [`tls`]: TLS and mutual TLS configuration, certificate identities.
//! - [`page_token`]: the list RPCs' page tokens.
//! - [`spans`]: the per-RPC tracing span and what handlers record on it.

pub mod auth;
pub mod issue;
pub mod leaks;
pub mod limits;
pub mod page_token;
pub mod service;
pub mod spans;
pub mod tls;
