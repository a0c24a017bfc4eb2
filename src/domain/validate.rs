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

/// Where a leak was found, or who found it: at most `max` characters, none a
/// control or invisible character (it is written to the audit log).
pub fn leak_source(field: &str, value: &str, max: usize) -> Result<()> {
    let len = value.chars().count();
    if len > max {
        return Err(Error::invalid(format!("{field} is {len} characters long; at most {max} are allowed")));
    }
    if value.chars().any(|c| c.is_control() || is_invisible_format(c)) {
        return Err(Error::invalid(format!(
            "{field} must not contain control, invisible or text-direction characters"
        )));
    }
    Ok(())
}

/// Most metadata entries a key may carry.
pub const MAX_METADATA_ENTRIES: usize = 16;
/// Longest metadata key, in bytes (keys are ASCII).
pub const MAX_METADATA_KEY_LEN: usize = 64;
/// Longest metadata value, in characters.
pub const MAX_METADATA_VALUE_LEN: usize = 256;
/// Most bytes of metadata in all (keys and values).
pub const MAX_METADATA_BYTES: usize = 4096;

/// A key's metadata: at most 16 entries, keys `[a-z0-9_.-]{1,64}`, values at
/// most 256 printable characters, 4 KiB in all. A refusal names the entry
/// (by its key, quoted and cut to 64 characters), never its value.
pub fn metadata<'a>(field: &str, entries: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<()> {
    let mut count = 0;
    let mut bytes = 0;
    for (k, v) in entries {
        count += 1;
        bytes += k.len() + v.len();
        let shown = format!("{:?}", k.chars().take(MAX_METADATA_KEY_LEN).collect::<String>());
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            return Err(Error::invalid(format!(
                "{field} key {shown} must be 1–{MAX_METADATA_KEY_LEN} characters of a-z, 0-9, `_`, `.`, `-`"
            )));
        }
        if !k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')) {
            return Err(Error::invalid(format!("{field} key {shown} may hold only a-z, 0-9, `_`, `.` and `-`")));
        }
        let len = v.chars().count();
        if len > MAX_METADATA_VALUE_LEN {
            return Err(Error::invalid(format!(
                "{field}[{shown}] is {len} characters long; at most {MAX_METADATA_VALUE_LEN} are allowed"
            )));
        }
        if v.chars().any(|c| c.is_control() || is_invisible_format(c)) {
            return Err(Error::invalid(format!(
                "{field}[{shown}] must hold printable characters only (no control, invisible or text-direction characters)"
            )));
        }
    }
    if count > MAX_METADATA_ENTRIES {
        return Err(Error::invalid(format!("{field} has {count} entries; at most {MAX_METADATA_ENTRIES} are allowed")));
    }
    if bytes > MAX_METADATA_BYTES {
        return Err(Error::invalid(format!(
            "{field} holds {bytes} bytes of keys and values; at most {MAX_METADATA_BYTES} are allowed"
        )));
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

    #[test]
    fn metadata_is_bounded_and_a_refusal_names_the_entry_not_its_value() {
        use std::collections::BTreeMap;
        let check = |pairs: &[(&str, &str)]| {
            let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            metadata("metadata", &m).map_err(|e| e.to_string())
        };
        assert!(check(&[]).is_ok());
        assert!(check(&[("tenant", "acme-eu"), ("plan.tier", "pro"), ("owner_id", ""), ("a-b", "ünïcode ok")]).is_ok());
        let e = check(&[("Tenant", "s3cr3t-value")]).unwrap_err();
        assert!(e.contains("\"Tenant\"") && !e.contains("s3cr3t"), "{e}");
        assert!(check(&[("", "x")]).unwrap_err().contains("key \"\""));
        assert!(check(&[(&*"k".repeat(64), "x")]).is_ok());
        assert!(check(&[(&*"k".repeat(65), "x")]).is_err());
        assert!(check(&[("k", &*"v".repeat(256))]).is_ok());
        let e = check(&[("k", &*"v".repeat(257))]).unwrap_err();
        assert!(e.contains("metadata[\"k\"]") && e.contains("257"), "{e}");
        assert!(check(&[("k", "line\nbreak")]).is_err());
        assert!(check(&[("k", "rtl\u{202E}txt")]).is_err());
        let many: Vec<(String, String)> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(check(&refs[..16]).is_ok());
        assert!(check(&refs).unwrap_err().contains("17 entries"));
        // 16 entries of 64 + 200 bytes: 4,224 bytes, over 4 KiB.
        let big: Vec<(String, String)> = (0..16).map(|i| (format!("{i:0>64}"), "v".repeat(200))).collect();
        let refs: Vec<(&str, &str)> = big.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(check(&refs).unwrap_err().contains("4096"));
        // The byte bound is exact and counts keys plus values: 16 entries of
        // 8 + 248 bytes are 4,096 (their products would be 31,744).
        let exact: Vec<(String, String)> = (0..16).map(|i| (format!("key{i:0>5}"), "v".repeat(248))).collect();
        let refs: Vec<(&str, &str)> = exact.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(check(&refs).is_ok(), "{:?}", check(&refs));
        let mut over = exact.clone();
        over[0].1.push('v');
        let refs: Vec<(&str, &str)> = over.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(check(&refs).unwrap_err().contains("4097 bytes"));
    }

    #[test]
    fn a_leak_source_is_bounded_in_characters_and_printable() {
        let check = |v: &str| leak_source("source_url", v, 8).map_err(|e| e.to_string());
        assert!(check("").is_ok());
        assert!(check("ünïcödé!").is_ok(), "8 characters (12 bytes) are within 8");
        assert!(check("123456789").unwrap_err().contains("9 characters long; at most 8"));
        assert!(check("a\nb").unwrap_err().contains("must not contain control"));
        assert!(check("a\u{202E}b").unwrap_err().contains("must not contain control"));
    }
}
