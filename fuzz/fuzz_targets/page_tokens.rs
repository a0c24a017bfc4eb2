//! The list RPCs' page-token decoders against arbitrary input.
//!
//! 1. The bytes as a token (when UTF-8): `decode_key_cursor` and
//!    `decode_audit_cursor` must never panic, and whatever either accepts must
//!    encode back to a token that decodes to the same position (a token is
//!    never read as a position the service could not have issued).
//! 2. The bytes as a position: every cursor the service can issue (a storable
//!    time, a well-formed id; any audit id) must round-trip, and a key token
//!    must never decode as an audit token or the other way round.
#![no_main]

use chrono::DateTime;
use libfuzzer_sys::fuzz_target;
use takumo_keys::{
    domain::keys::{self, ID_LEN},
    domain::model::Cursor,
    api::page_token, proto};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn check_arbitrary_token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else { return };
    if let Ok(cursor) = page_token::decode_key_cursor(token) {
        assert!(keys::is_valid_id(&cursor.id), "accepted a cursor with a malformed id");
        assert!(proto::in_storable_range(cursor.created_at), "accepted a cursor outside the storable range");
        let again = page_token::decode_key_cursor(&page_token::encode_key_cursor(&cursor)).expect("re-encoded");
        assert_eq!(again, cursor);
    }
    if let Ok(id) = page_token::decode_audit_cursor(token) {
        assert_eq!(page_token::decode_audit_cursor(&page_token::encode_audit_cursor(id)).unwrap(), id);
    }
}

fn check_issued_positions(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<8>() else { return };
    let n = i64::from_le_bytes(*head);
    let audit = page_token::encode_audit_cursor(n);
    assert_eq!(page_token::decode_audit_cursor(&audit).unwrap(), n);
    assert!(page_token::decode_key_cursor(&audit).is_err(), "an audit token decoded as a key cursor");

    let Some(created_at) = DateTime::from_timestamp_micros(n).filter(|t| proto::in_storable_range(*t)) else {
        return;
    };
    let id: String =
        rest.iter().chain(std::iter::repeat(&0)).take(ID_LEN).map(|b| BASE62[*b as usize % 62] as char).collect();
    let cursor = Cursor { created_at, id };
    let token = page_token::encode_key_cursor(&cursor);
    assert_eq!(page_token::decode_key_cursor(&token).unwrap(), cursor);
    assert!(page_token::decode_audit_cursor(&token).is_err(), "a key token decoded as an audit cursor");
}

fuzz_target!(|data: &[u8]| {
    check_arbitrary_token(data);
    check_issued_positions(data);
});
