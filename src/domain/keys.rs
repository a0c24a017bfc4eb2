//! The key format: `tk_<env>_<id><secret><checksum>`, all base62 after the prefix.
//!
//! - `id` (16 chars, ~95 bits) is public: the store looks the key up by it.
//! - `secret` (32 chars, ~190.5 bits from the OS CSPRNG) is what proves possession.
//! - `checksum` (6 chars) is the base62 CRC32 of everything before it, as in
//!   GitHub's token scheme, so typos and garbage are refused before any
//!   database or argon2 work, and secret scanners can recognise our keys.

use crate::{domain::model::Environment, domain::secret::SecretString};
use rand::{Rng, TryRngCore, rngs::OsRng};

pub const ID_LEN: usize = 16;
pub const SECRET_LEN: usize = 32;
pub const CHECKSUM_LEN: usize = 6;
const ENV_PREFIX_LEN: usize = 8; // "tk_live_" / "tk_test_"
pub const KEY_LEN: usize = ENV_PREFIX_LEN + ID_LEN + SECRET_LEN + CHECKSUM_LEN;
/// Where the id sits in a key that [`parse`] accepted.
pub const ID_RANGE: std::ops::Range<usize> = ENV_PREFIX_LEN..ENV_PREFIX_LEN + ID_LEN;
/// How much of a key is shown in listings: the environment and half the id.
pub const DISPLAY_PREFIX_LEN: usize = 16;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A key presented by a caller, checked for shape and checksum only.
#[derive(Debug)]
pub struct ParsedKey<'a> {
    pub environment: Environment,
    pub id: &'a str,
    /// Borrowed from the presented string; redacted from `Debug`.
    secret: Redacted<'a>,
}

struct Redacted<'a>(&'a str);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'a> ParsedKey<'a> {
    pub fn secret(&self) -> &'a str {
        self.secret.0
    }
}

/// A freshly generated key: the full string is shown to the user once.
pub struct GeneratedKey {
    pub id: String,
    pub full: SecretString,
}

impl GeneratedKey {
    pub fn secret_part(&self) -> &str {
        let s = self.full.expose();
        &s[ENV_PREFIX_LEN + ID_LEN..ENV_PREFIX_LEN + ID_LEN + SECRET_LEN]
    }

    pub fn display_prefix(&self) -> String {
        self.full.expose()[..DISPLAY_PREFIX_LEN].to_owned()
    }
}

fn env_prefix(env: Environment) -> &'static str {
    match env {
        Environment::Live => "tk_live_",
        Environment::Test => "tk_test_",
    }
}

fn random_base62(rng: &mut impl Rng, len: usize, out: &mut String) {
    // Rejection sampling keeps every character uniform: 248 = 4 * 62.
    while out.len() < len {
        let b: u8 = rng.random();
        if b < 248 {
            out.push(BASE62[(b % 62) as usize] as char);
        }
    }
}

fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Generates a new key from the OS CSPRNG.
pub fn generate(env: Environment) -> GeneratedKey {
    let mut rng = OsRng.unwrap_err();
    let mut id = String::with_capacity(ID_LEN);
    random_base62(&mut rng, ID_LEN, &mut id);
    let mut secret = String::with_capacity(SECRET_LEN);
    random_base62(&mut rng, SECRET_LEN, &mut secret);
    let full = compose(env, &id, &secret);
    GeneratedKey { id, full }
}

/// Assembles a key from its parts and appends the checksum. Public so tests
/// and benchmarks can build well-formed keys with a chosen id and secret.
pub fn compose(env: Environment, id: &str, secret: &str) -> SecretString {
    let mut full = String::with_capacity(KEY_LEN);
    full.push_str(env_prefix(env));
    full.push_str(id);
    full.push_str(secret);
    let sum = checksum(&full);
    full.push_str(std::str::from_utf8(&sum).expect("base62 is ascii"));
    SecretString::new(full)
}

/// True when the string looks like one of our keys at all (prefix only), so
/// the auth layer can tell an API key from a service token.
pub fn looks_like_key(s: &str) -> bool {
    s.starts_with("tk_live_") || s.starts_with("tk_test_")
}

/// Checks shape and checksum; `None` means malformed. Does no I/O.
pub fn parse(key: &str) -> Option<ParsedKey<'_>> {
    if key.len() != KEY_LEN || !key.is_ascii() {
        return None;
    }
    let environment = match &key[..ENV_PREFIX_LEN] {
        "tk_live_" => Environment::Live,
        "tk_test_" => Environment::Test,
        _ => return None,
    };
    let rest = &key[ENV_PREFIX_LEN..];
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let (body, sum) = key.split_at(KEY_LEN - CHECKSUM_LEN);
    if checksum(body) != sum.as_bytes() {
        return None;
    }
    Some(ParsedKey {
        environment,
        id: &key[ID_RANGE],
        secret: Redacted(&key[ENV_PREFIX_LEN + ID_LEN..KEY_LEN - CHECKSUM_LEN]),
    })
}

/// Cuts every key-like run in `text` (a `tk_live_`/`tk_test_` prefix and the
/// base62 characters after it) to its 16-character public prefix, so a
/// message that quotes caller input never carries a key's secret, whatever
/// field the key was pasted into.
pub fn redact_keys(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("tk_live_") && !text.contains("tk_test_") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["tk_live_", "tk_test_"].iter().filter_map(|p| rest.find(p)).min() {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let run = ENV_PREFIX_LEN + from[ENV_PREFIX_LEN..].bytes().take_while(u8::is_ascii_alphanumeric).count();
        if run > DISPLAY_PREFIX_LEN {
            out.push_str(&from[..DISPLAY_PREFIX_LEN]);
            out.push('…');
        } else {
            out.push_str(&from[..run]);
        }
        rest = &from[run..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// True when `id` has the shape of a key id, so lookups of garbage ids can be
/// answered without touching the store.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_parses_back_to_its_parts() {
        let k = generate(Environment::Test);
        let p = parse(k.full.expose()).expect("parses");
        assert_eq!(p.environment, Environment::Test);
        assert_eq!(p.id, k.id);
        assert_eq!(p.secret(), k.secret_part());
        assert!(k.display_prefix().starts_with("tk_test_"));
        assert_eq!(k.display_prefix().len(), 16);
    }

    #[test]
    fn a_parsed_key_debug_prints_its_id_and_no_secret() {
        let k = generate(Environment::Live);
        let shown = format!("{:?}", parse(k.full.expose()).unwrap());
        assert!(shown.contains(&k.id) && shown.contains("[redacted]"), "{shown}");
        assert!(!shown.contains(k.secret_part()), "{shown}");
    }

    #[test]
    fn generated_characters_are_uniform_over_base62() {
        // 192,000 characters of ids and secrets: each of the 62 is expected
        // ~3,100 times (standard deviation ~55). A biased generator (a skewed
        // rejection bound that lets one character in 25% more often, a short
        // alphabet) leaves the ±10% band by many deviations; uniform sampling
        // leaves it with no probability worth naming.
        let mut counts = [0usize; 62];
        for _ in 0..4000 {
            let k = generate(Environment::Live);
            for c in k.secret_part().bytes().chain(k.id.bytes()) {
                counts[BASE62.iter().position(|&b| b == c).expect("base62")] += 1;
            }
        }
        let expected = 4000 * (SECRET_LEN + ID_LEN) / 62;
        for (i, n) in counts.iter().enumerate() {
            assert!(
                *n * 10 > expected * 9 && *n * 10 < expected * 11,
                "{:?} seen {n} times, ~{expected} expected",
                BASE62[i] as char
            );
        }
    }

    #[test]
    fn secret_part_carries_at_least_190_bits() {
        assert!(SECRET_LEN as f64 * 62f64.log2() >= 190.0);
    }

    #[test]
    fn every_single_character_change_is_rejected() {
        let k = generate(Environment::Live);
        let s = k.full.expose().to_owned();
        for i in 8..s.len() {
            for &c in BASE62 {
                if s.as_bytes()[i] == c {
                    continue;
                }
                let mut b = s.clone().into_bytes();
                b[i] = c;
                let t = String::from_utf8(b).unwrap();
                // CRC32 detects all single-symbol errors in a message this short.
                assert!(parse(&t).is_none(), "accepted a typo at {i}");
            }
        }
    }

    #[test]
    fn redaction_keeps_at_most_the_public_prefix_of_any_key_like_run() {
        let k = generate(Environment::Live);
        let full = k.full.expose();
        let msg = format!("organization {full} not found; scopes \"{full}\", {full}");
        let out = redact_keys(&msg);
        assert!(!out.contains(k.secret_part()) && !out.contains(&full[16..20]), "{out}");
        assert_eq!(out.matches(&full[..16]).count(), 3, "{out}");
        // Test keys too, alone in a message.
        let t = generate(Environment::Test);
        let out = redact_keys(t.full.expose());
        assert_eq!(out, format!("{}…", &t.full.expose()[..16]));
        assert_eq!(redact_keys("tk_live_short"), "tk_live_short");
        // A display prefix (exactly 16 characters) is public and left whole.
        assert_eq!(redact_keys("prefix tk_live_ABCDEFGH."), "prefix tk_live_ABCDEFGH.");
        assert_eq!(redact_keys("no key here"), "no key here");
    }

    #[test]
    fn garbage_is_malformed() {
        for s in [
            "",
            "tk_live_",
            "hello",
            &"a".repeat(KEY_LEN),
            "tk_prod_0000000000000000000000000000000000000000000000000000AAAA",
        ] {
            assert!(parse(s).is_none());
        }
    }
}
