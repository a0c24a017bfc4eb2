//! Keys an attacker or a typo would send: well-formed keys with random
//! secrets (built with the service's own [`keys::compose`], so the checksum is
//! valid), and keys whose checksum is wrong.

use rand::Rng;
use takumo_keys::domain::{keys, model::Environment};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A well-formed `tk_live_` key (valid checksum) with a random 32-character
/// secret: for `id` (an attacker's guess for a real key, which passes every
/// cheap check), or for a random 16-character id.
pub fn random_key(rng: &mut impl Rng, id: Option<&str>) -> String {
    let mut part = |n: usize| (0..n).map(|_| BASE62[rng.random_range(0..62)] as char).collect::<String>();
    let id = id.map_or_else(|| part(keys::ID_LEN), str::to_owned);
    let secret = part(keys::SECRET_LEN);
    keys::compose(Environment::Live, &id, &secret).into_exposed()
}

/// `key` with its checksum replaced by a wrong one: the right length and
/// alphabet, refused at the checksum (no store, no argon2).
pub fn with_wrong_checksum(key: &str) -> String {
    let (body, sum) = key.split_at(keys::KEY_LEN - keys::CHECKSUM_LEN);
    let wrong = if sum == "000000" { "000001" } else { "000000" };
    format!("{body}{wrong}")
}
