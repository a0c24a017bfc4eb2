//! Properties of the key format (`keys`) and of the name and identifier checks
//! (`validate`), over generated inputs. Pure functions only: no server, no
//! database, a few seconds in all.

use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};
use takumo_keys::{
    Error,
    domain::keys::{self, CHECKSUM_LEN, ID_LEN, KEY_LEN, SECRET_LEN},
    domain::model::Environment,
    domain::validate::{self, MAX_LEN},
};

const BASE62: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const PREFIX_LEN: usize = KEY_LEN - ID_LEN - SECRET_LEN - CHECKSUM_LEN;

fn base62_char() -> impl Strategy<Value = char> {
    proptest::sample::select(BASE62.chars().collect::<Vec<_>>())
}

fn base62(len: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(base62_char(), len).prop_map(String::from_iter)
}

fn environment() -> impl Strategy<Value = Environment> {
    prop_oneof![Just(Environment::Live), Just(Environment::Test)]
}

fn prefix(env: Environment) -> &'static str {
    match env {
        Environment::Live => "tk_live_",
        Environment::Test => "tk_test_",
    }
}

/// A well-formed key built from a generated id and secret.
fn valid_key() -> impl Strategy<Value = String> {
    (environment(), base62(ID_LEN), base62(SECRET_LEN))
        .prop_map(|(env, id, secret)| keys::compose(env, &id, &secret).into_exposed())
}

/// Any character that is not base62: ASCII punctuation, whitespace and
/// controls (same byte length as a base62 character) or any other Unicode.
fn non_base62_char() -> impl Strategy<Value = char> {
    prop_oneof![
        (0u8..128).prop_map(char::from),
        any::<char>(),
        Just('_'),
        Just('-'),
        Just(' '),
        Just('\0'),
        Just('é'),
        Just('０'), // FULLWIDTH DIGIT ZERO: alphanumeric, but not ASCII
    ]
    .prop_filter("must not be base62", |c| !c.is_ascii_alphanumeric())
}

fn replace_char(s: &str, at: usize, c: char) -> String {
    s.chars().enumerate().map(|(i, old)| if i == at { c } else { old }).collect()
}

/// What `parse` accepted, put back together; `None` when it refused.
fn recomposed(s: &str) -> Option<String> {
    keys::parse(s).map(|p| keys::compose(p.environment, p.id, p.secret()).into_exposed())
}

/// The rules for names, written out independently of `validate::name`.
fn name_is_acceptable(v: &str) -> bool {
    let len = v.chars().count();
    (1..=MAX_LEN).contains(&len)
        && !v.trim().is_empty()
        && !v.chars().any(|c| c.is_control() || validate::is_invisible_format(c))
}

#[test]
fn the_invisible_set_holds_every_bidi_control_and_zero_width_character() {
    let listed = ('\u{202A}'..='\u{202E}')
        .chain('\u{2066}'..='\u{2069}')
        .chain('\u{200B}'..='\u{200D}')
        .chain(['\u{2060}', '\u{FEFF}', '\u{200E}', '\u{200F}', '\u{061C}']);
    for c in listed {
        assert!(validate::is_invisible_format(c), "U+{:04X}", c as u32);
    }
    for c in ['a', ' ', 'é', '鍵', '🚀', '\u{0301}'] {
        assert!(!validate::is_invisible_format(c), "U+{:04X}", c as u32);
    }
}

fn ident_is_acceptable(v: &str) -> bool {
    name_is_acceptable(v) && !v.chars().any(char::is_whitespace)
}

/// Strings around the interesting boundaries: empty, 64/65 characters,
/// whitespace only, with controls, multi-byte characters.
fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,70}",
        "[a-z0-9_.-]{60,70}",
        "[ \\t\\u{a0}\\u{3000}]{0,5}",
        "[a-z]{0,10}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}][a-z]{0,10}",
        "[a-z]{0,10}[ \\t\\u{a0}\\u{2028}\\u{3000}][a-z]{0,10}",
        "[é日本🔑]{60,70}",
    ]
}

#[test]
fn the_prefix_length_is_that_of_tk_live_and_tk_test() {
    assert_eq!(PREFIX_LEN, "tk_live_".len());
    assert_eq!(KEY_LEN - PREFIX_LEN, 54, "secret scanners match tk_(live|test)_[0-9A-Za-z]{{54}}");
}

#[test]
fn the_generated_names_include_accepted_and_rejected_ones_of_every_kind() {
    // Guards the name properties against passing vacuously.
    let mut runner = TestRunner::deterministic();
    let strategy = name_like();
    let (mut name_ok, mut ident_ok, mut only_name_ok, mut rejected) = (0, 0, 0, 0);
    for _ in 0..2000 {
        let v = strategy.new_tree(&mut runner).expect("a value").current();
        match (name_is_acceptable(&v), ident_is_acceptable(&v)) {
            (true, true) => ident_ok += 1,
            (true, false) => only_name_ok += 1,
            _ => rejected += 1,
        }
        name_ok += usize::from(name_is_acceptable(&v));
    }
    assert!(ident_ok > 100 && only_name_ok > 100 && rejected > 100, "{ident_ok} {only_name_ok} {rejected}");
    assert!(name_ok > 200);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_composed_key_parses_back_to_its_environment_id_and_secret(
        env in environment(),
        id in base62(ID_LEN),
        secret in base62(SECRET_LEN),
    ) {
        let key = keys::compose(env, &id, &secret).into_exposed();
        prop_assert_eq!(key.len(), KEY_LEN);
        prop_assert!(key.starts_with(prefix(env)));
        prop_assert!(key[PREFIX_LEN..].bytes().all(|b| b.is_ascii_alphanumeric()));
        prop_assert_eq!(&key[PREFIX_LEN..PREFIX_LEN + ID_LEN], id.as_str());
        prop_assert!(keys::looks_like_key(&key));
        let parsed = keys::parse(&key).expect("a composed key parses");
        prop_assert_eq!(parsed.environment, env);
        prop_assert_eq!(parsed.id, id.as_str());
        prop_assert_eq!(parsed.secret(), secret.as_str());
        prop_assert!(keys::is_valid_id(parsed.id));
        prop_assert_eq!(recomposed(&key), Some(key.clone()));
    }

    #[test]
    fn a_generated_key_parses_and_recomposes_to_itself(env in environment()) {
        let generated = keys::generate(env);
        let full = generated.full.expose();
        let parsed = keys::parse(full).expect("a generated key parses");
        prop_assert_eq!(parsed.environment, env);
        prop_assert_eq!(parsed.id, generated.id.as_str());
        prop_assert_eq!(parsed.secret(), generated.secret_part());
        let display_prefix = generated.display_prefix();
        prop_assert_eq!(display_prefix.as_str(), &full[..keys::DISPLAY_PREFIX_LEN]);
        let again = recomposed(full);
        prop_assert_eq!(again.as_deref(), Some(full));
    }

    #[test]
    fn every_change_of_one_character_after_the_prefix_to_another_base62_character_is_rejected(
        key in valid_key(),
        at in PREFIX_LEN..KEY_LEN,
        c in base62_char(),
    ) {
        let original = key.as_bytes()[at] as char;
        // Any other base62 character: skip to the next one when we drew the same.
        let c = if c == original {
            let i = BASE62.find(c).unwrap();
            BASE62.as_bytes()[(i + 1) % BASE62.len()] as char
        } else {
            c
        };
        let typo = replace_char(&key, at, c);
        prop_assert_ne!(&typo, &key);
        prop_assert!(keys::parse(&typo).is_none(), "accepted {} with position {} changed", key, at);
    }

    #[test]
    fn every_change_of_one_character_after_the_prefix_to_a_non_base62_character_is_rejected(
        key in valid_key(),
        at in PREFIX_LEN..KEY_LEN,
        c in non_base62_char(),
    ) {
        let typo = replace_char(&key, at, c);
        prop_assert!(keys::parse(&typo).is_none(), "accepted {:?} at position {}", c, at);
    }

    #[test]
    fn every_change_of_one_character_inside_the_prefix_is_rejected(
        key in valid_key(),
        at in 0..PREFIX_LEN,
        c in any::<char>(),
    ) {
        prop_assume!(key.chars().nth(at) != Some(c));
        prop_assert!(keys::parse(&replace_char(&key, at, c)).is_none());
    }

    #[test]
    fn moving_a_key_to_the_other_environment_is_rejected(key in valid_key()) {
        let moved = if let Some(rest) = key.strip_prefix("tk_live_") {
            format!("tk_test_{rest}")
        } else {
            format!("tk_live_{}", &key[PREFIX_LEN..])
        };
        prop_assert!(keys::parse(&moved).is_none());
    }

    #[test]
    fn every_truncation_of_a_valid_key_is_rejected(key in valid_key(), len in 0..KEY_LEN) {
        prop_assert!(keys::parse(&key[..len]).is_none());
        prop_assert!(keys::parse(&key[KEY_LEN - len..]).is_none());
    }

    #[test]
    fn every_extension_of_a_valid_key_is_rejected(
        key in valid_key(),
        before in "\\PC{0,4}",
        after in prop_oneof![base62(1), base62(6), "\\PC{1,8}", "[ \\t\\r\\n]{1,2}"],
    ) {
        let extended = format!("{key}{after}");
        prop_assert!(keys::parse(&extended).is_none());
        if !before.is_empty() {
            let extended = format!("{before}{key}");
            prop_assert!(keys::parse(&extended).is_none());
        }
    }

    #[test]
    fn a_valid_key_with_one_character_dropped_or_doubled_is_rejected(key in valid_key(), at in PREFIX_LEN..KEY_LEN) {
        let dropped: String = key.chars().enumerate().filter(|&(i, _)| i != at).map(|(_, c)| c).collect();
        prop_assert!(keys::parse(&dropped).is_none());
        let doubled = format!("{}{}", &key[..=at], &key[at..]);
        prop_assert!(keys::parse(&doubled).is_none());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn parse_never_panics_on_arbitrary_strings_and_accepts_only_what_compose_makes(s in any::<String>()) {
        if let Some(again) = recomposed(&s) {
            prop_assert_eq!(again, s);
        }
    }

    #[test]
    fn parse_never_panics_on_strings_shaped_almost_like_keys(
        s in prop_oneof![
            "tk_(live|test)_[0-9A-Za-z]{50,58}",
            "tk_(live|test)_\\PC{54}",
            "\\PC{62}",
            ".{60,64}",
        ],
    ) {
        if let Some(again) = recomposed(&s) {
            prop_assert_eq!(again, s);
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let s = String::from_utf8_lossy(&bytes);
        if let Some(again) = recomposed(&s) {
            prop_assert_eq!(again.as_str(), &*s);
        }
    }

    #[test]
    fn name_accepts_exactly_one_to_64_characters_with_no_control_characters_and_not_only_spaces(v in name_like()) {
        let result = validate::name("name", &v);
        prop_assert_eq!(result.is_ok(), name_is_acceptable(&v), "name({:?}) = {:?}", v, result);
        if let Err(e) = result {
            prop_assert!(matches!(e, Error::InvalidArgument(_)), "{:?}", e);
            prop_assert!(e.to_string().contains("name"), "the message names the field: {}", e);
        }
    }

    #[test]
    fn ident_accepts_exactly_what_name_accepts_without_whitespace(v in name_like()) {
        let result = validate::ident("organization_id", &v);
        prop_assert_eq!(result.is_ok(), ident_is_acceptable(&v), "ident({:?}) = {:?}", v, result);
        if let Err(e) = result {
            prop_assert!(matches!(e, Error::InvalidArgument(_)), "{:?}", e);
            prop_assert!(e.to_string().contains("organization_id"), "the message names the field: {}", e);
        }
    }

    #[test]
    fn every_printable_identifier_of_1_to_64_characters_without_whitespace_is_accepted(v in "[^\\p{C}\\s]{1,64}") {
        prop_assert!(validate::name("name", &v).is_ok());
        prop_assert!(validate::ident("member", &v).is_ok());
    }

    #[test]
    fn anything_longer_than_64_characters_is_rejected(v in "\\PC{65,100}") {
        prop_assert!(validate::name("name", &v).is_err());
        prop_assert!(validate::ident("member", &v).is_err());
    }

    #[test]
    fn a_rejected_value_is_never_echoed_in_the_error(
        v in prop_oneof![
            "zqx[a-z]{70,80}",
            "zqx[a-z]{4,10}[\\x00-\\x1f][a-z]{4}",
            "zqx[a-z]{4,10} [a-z]{4}",
        ],
    ) {
        let e = validate::ident("member", &v).expect_err("rejected");
        prop_assert!(!e.to_string().contains(&v), "{}", e);
    }
}
