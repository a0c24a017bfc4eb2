//! The key parser against arbitrary input.
//!
//! 1. The bytes as a string: `parse` must never panic, and whatever it accepts
//!    must be exactly the key `compose` builds from the parsed parts (no
//!    non-canonical spelling of a key is ever accepted).
//! 2. The bytes as material for a well-formed key (id and secret mapped onto
//!    base62), since random bytes almost never hit a valid checksum: the key
//!    must parse back to its parts, and changing any one character after the
//!    prefix to any other character must make it malformed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use takumo_keys::{
    domain::keys::{self, CHECKSUM_LEN, ID_LEN, KEY_LEN, SECRET_LEN},
    domain::model::Environment};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const PREFIX_LEN: usize = KEY_LEN - ID_LEN - SECRET_LEN - CHECKSUM_LEN;

fn check_arbitrary_string(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    // The auth layer's cheap check must not panic either.
    let looks = keys::looks_like_key(s);
    let Some(parsed) = keys::parse(s) else { return };
    assert!(looks, "parse accepted a string that does not look like a key");
    assert_eq!(s.len(), KEY_LEN);
    assert_eq!(parsed.id.len(), ID_LEN);
    assert_eq!(parsed.secret().len(), SECRET_LEN);
    assert!(keys::is_valid_id(parsed.id));
    let again = keys::compose(parsed.environment, parsed.id, parsed.secret());
    assert_eq!(again.expose(), s, "parse accepted a key that compose does not produce");
}

fn check_composed_key(data: &[u8]) {
    let [head, at, replacement, rest @ ..] = data else { return };
    let env = if head & 1 == 0 { Environment::Live } else { Environment::Test };
    let material: Vec<u8> =
        rest.iter().chain(std::iter::repeat(&0)).take(ID_LEN + SECRET_LEN).map(|b| BASE62[*b as usize % 62]).collect();
    let material = std::str::from_utf8(&material).expect("base62 is ascii");
    let (id, secret) = material.split_at(ID_LEN);

    let key = keys::compose(env, id, secret);
    let key = key.expose();
    let parsed = keys::parse(key).expect("a composed key parses");
    assert_eq!(parsed.environment, env);
    assert_eq!(parsed.id, id);
    assert_eq!(parsed.secret(), secret);

    // One character after the prefix changed to another one (any byte value,
    // base62 or not; non-ASCII becomes a multi-byte character).
    let at = PREFIX_LEN + *at as usize % (KEY_LEN - PREFIX_LEN);
    let replacement = char::from(*replacement);
    if key.as_bytes()[at] as char != replacement {
        let typo: String = key.chars().enumerate().map(|(i, c)| if i == at { replacement } else { c }).collect();
        assert!(keys::parse(&typo).is_none(), "accepted a key with position {at} changed to {replacement:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    check_arbitrary_string(data);
    check_composed_key(data);
});
