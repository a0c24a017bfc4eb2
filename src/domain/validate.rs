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
    if let Some(c) = value.chars().find(|c| is_invisible_format(*c)) {
        return Err(Error::invalid(format!(
            "{field} must not contain invisible or text-direction characters (found U+{:04X}): they make a name \
             read differently from what it is",
            c as u32
        )));
    }
    Ok(())
}

/// Characters that render as nothing or reorder the text around them: bidi
/// controls (a right-to-left override makes `cod.exe` read `exe.doc`),
/// zero-width characters, line and paragraph separators, and Unicode tag
/// characters (which smuggle invisible ASCII). A name or identifier holding
/// one can look like another, or forge what a log line says.
pub fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}'                 // soft hyphen
        | '\u{061C}'               // Arabic letter mark
        | '\u{180E}'               // Mongolian vowel separator
        | '\u{200B}'..='\u{200F}' // zero-width space, non-joiner, joiner; LRM, RLM
        | '\u{2028}'..='\u{202E}' // line and paragraph separators; LRE, RLE, PDF, LRO, RLO
        | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
        | '\u{2066}'..='\u{206F}' // isolates (LRI, RLI, FSI, PDI) and deprecated format controls
        | '\u{FEFF}'               // zero-width no-break space (BOM)
        | '\u{FFF9}'..='\u{FFFB}' // interlinear annotation
        | '\u{E0000}'..='\u{E007F}' // tags
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_and_direction_characters_are_refused_in_names_and_identifiers() {
        for bad in ["\u{200B}\u{200B}", "abc\u{202E}fdp.exe", "a\u{2066}b", "\u{FEFF}acme", "ac\u{200D}me", "a\u{2060}"]
        {
            assert!(name("name", bad).is_err(), "{bad:?}");
            assert!(ident("organization_id", bad).is_err(), "{bad:?}");
        }
        for ok in ["cursor-dev", "CI pipeline 🚀", "Größe", "مفتاح", "鍵"] {
            assert!(name("name", ok).is_ok(), "{ok:?}");
        }
    }
}
