//! Checks on caller-supplied identifiers and names, with messages that say
//! what is allowed. Offending values are never echoed whole.

use crate::error::{Error, Result};

/// Longest name, organization id or member id accepted.
pub const MAX_LEN: usize = 64;

/// 1–64 printable characters (no control characters), not only spaces.
pub fn name(field: &str, value: &str) -> Result<()> {
    let len = value.chars().count();
    if len == 0 || value.trim().is_empty() {
        return Err(Error::invalid(format!("{field} is required (1–{MAX_LEN} printable characters)")));
    }
    if len > MAX_LEN {
        return Err(Error::invalid(format!("{field} is {len} characters long; at most {MAX_LEN} are allowed")));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(format!("{field} must not contain control characters")));
    }
    Ok(())
}

/// An identifier from another system (organization, member): 1–64 printable
/// characters without whitespace.
pub fn ident(field: &str, value: &str) -> Result<()> {
    name(field, value)?;
    if value.chars().any(char::is_whitespace) {
        return Err(Error::invalid(format!("{field} must not contain whitespace")));
    }
    Ok(())
}
