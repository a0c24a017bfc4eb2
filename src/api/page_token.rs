//! Page tokens of the list RPCs: opaque to clients (base64url of a position),
//! checked strictly on the way back in, so a token this service did not
//! issue is INVALID_ARGUMENT instead of silently restarting from the top.
//!
//! Pure functions (no I/O), public so the fuzz crate can reach them.

use crate::{
    domain::keys,
    domain::model::Cursor,
    error::{Error, Result},
    proto,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::DateTime;

const AUDIT_PREFIX: &str = "audit.";

fn not_ours() -> Error {
    Error::invalid("page_token is not one this service issued; start again with an empty page_token")
}

fn decode_text(token: &str) -> Result<String> {
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| not_ours())?;
    String::from_utf8(raw).map_err(|_| not_ours())
}

/// `ListKeys`: the last row's position, `<created_at micros>.<id>`.
pub fn encode_key_cursor(cursor: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", cursor.created_at.timestamp_micros(), cursor.id))
}

/// The inverse of [`encode_key_cursor`]; anything else is INVALID_ARGUMENT.
pub fn decode_key_cursor(token: &str) -> Result<Cursor> {
    let raw = decode_text(token)?;
    let (micros, id) = raw.split_once('.').ok_or_else(not_ours)?;
    let micros: i64 = micros.parse().map_err(|_| not_ours())?;
    let created_at =
        DateTime::from_timestamp_micros(micros).filter(|t| proto::in_storable_range(*t)).ok_or_else(not_ours)?;
    if !keys::is_valid_id(id) {
        return Err(not_ours());
    }
    Ok(Cursor { created_at, id: id.to_owned() })
}

/// `ListAuditEvents`: the last event's id, `audit.<id>`.
pub fn encode_audit_cursor(event_id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{AUDIT_PREFIX}{event_id}"))
}

/// The inverse of [`encode_audit_cursor`]; anything else is INVALID_ARGUMENT.
pub fn decode_audit_cursor(token: &str) -> Result<i64> {
    decode_text(token)?.strip_prefix(AUDIT_PREFIX).and_then(|id| id.parse().ok()).ok_or_else(not_ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    #[test]
    fn key_cursors_round_trip_at_microsecond_precision() {
        let cursor =
            Cursor { created_at: Utc.timestamp_micros(1_764_590_000_123_456).unwrap(), id: "0123456789ABCDEF".into() };
        assert_eq!(decode_key_cursor(&encode_key_cursor(&cursor)).unwrap(), cursor);
    }

    #[test]
    fn audit_cursors_round_trip() {
        for id in [0, 1, 500, i64::MAX] {
            assert_eq!(decode_audit_cursor(&encode_audit_cursor(id)).unwrap(), id);
        }
    }

    #[test]
    fn tokens_of_the_other_list_or_garbage_are_refused() {
        let key = encode_key_cursor(&Cursor { created_at: Utc::now(), id: "0123456789ABCDEF".into() });
        let audit = encode_audit_cursor(7);
        for bad in [audit.as_str(), "", "!!", "bm90LWEtdG9rZW4", &URL_SAFE_NO_PAD.encode("1.short")] {
            assert!(decode_key_cursor(bad).is_err(), "{bad:?} decoded as a key cursor");
        }
        for bad in [key.as_str(), "", "!!", &URL_SAFE_NO_PAD.encode("audit.x"), &URL_SAFE_NO_PAD.encode("audit.")] {
            assert!(decode_audit_cursor(bad).is_err(), "{bad:?} decoded as an audit cursor");
        }
    }

    #[test]
    fn key_cursors_outside_the_storable_range_are_refused() {
        let far = URL_SAFE_NO_PAD.encode(format!("{}.0123456789ABCDEF", i64::MAX));
        assert!(decode_key_cursor(&far).is_err());
        let before_1970 = URL_SAFE_NO_PAD.encode("-1.0123456789ABCDEF");
        assert!(decode_key_cursor(&before_1970).is_err());
    }
}
