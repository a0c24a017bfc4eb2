//! The domain: what a key is, independent of how it is stored or served.
//! Pure code, no I/O, nothing async; may import only [`crate::error`].
//!
//! - [`keys`]: the key format (prefix, id, secret, CRC32 checksum), generation, redaction.
//! - [`scopes`]: the scope catalog and presets.
//! - [`model`]: records (keys, organizations, audit events) and their enums.
//! - [`validate`]: the input rules (names, identifiers).
//! - [`secret`]: `SecretString`, which never prints its value.

pub mod keys;
pub mod model;
pub mod scopes;
pub mod secret;
pub mod validate;
