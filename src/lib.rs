//! Takumo Keys: issues and verifies Takumo API keys over gRPC.
//!
//! The folders are the layers a request crosses, top to bottom; a module may
//! import from its own layer and the ones below it, never from one above.
//!
//! | layer | owns |
//! |---|---|
//! | [`server`] | settings, secrets resolution, wiring, lifecycle, health, CLI commands, telemetry |
//! | [`api`] | the gRPC surface: handlers, caller authentication and authorization, request limits, TLS identities, page tokens, key issuance |
//! | [`http`] | the public HTTP surface: GitHub's secret scanning endpoint (over the API's leak intake), HTTP forward-auth for proxies |
//! | [`gateway`] | key enforcement by proxies: the decision HTTP forward-auth (nginx `auth_request` and kin) and Envoy's ext_authz share |
//! | [`client`] (feature `client`) | the Rust client and the tower layer internal services use to verify keys (a surface too, over [`proto`] and [`verify::Denial`]) |
//! | [`verify`] | the verification engine: verifier and its decision, the caches, argon2 hashing, usage counting |
//! | [`store`] | the `Store` trait, its PostgreSQL and SQLite backends, the business rules both apply |
//! | [`proto`] | the generated wire types and their conversions to domain types |
//! | [`domain`], [`error`], [`metrics`] | the ground: key format, scopes, records, validation, secrets (no I/O); the one error type and its mapping to gRPC status codes; the counters every layer may bump |

pub mod api;
#[cfg(feature = "client")]
pub mod client;
pub mod domain;
pub mod error;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod store;
pub mod verify;

pub use error::{Error, Result};

/// The layering rule of the table above, checked over the sources: the
/// compiler allows any `crate::` path, so this test is what keeps it true.
#[cfg(test)]
mod layering {
    use std::path::Path;

    /// Higher imports lower; equal ranks may import each other.
    fn rank(layer: &str) -> Option<u8> {
        Some(match layer {
            "domain" | "error" | "metrics" => 0,
            "proto" => 1,
            "store" => 2,
            "verify" => 3,
            "api" | "client" | "gateway" | "http" => 4,
            "server" => 5,
            _ => return None,
        })
    }

    /// The first path segment of every `crate::…` path, including each item
    /// of a `crate::{…}` group.
    fn referenced(src: &str) -> Vec<String> {
        let code: String = src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        let mut out = Vec::new();
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let (mut depth, mut item_start, mut end) = (1, true, group.len());
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 1 => item_start = true,
                        c if item_start && (c.is_ascii_lowercase() || c == '_') => {
                            let name: String =
                                group[j..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                            out.push(name);
                            item_start = false;
                        }
                        c if !c.is_whitespace() => item_start = false,
                        _ => {}
                    }
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
                rest = &group[end..];
            } else {
                out.push(rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect());
            }
        }
        out
    }

    fn visit(dir: &Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, found);
                continue;
            }
            let rel = path.strip_prefix(concat!(env!("CARGO_MANIFEST_DIR"), "/src")).unwrap();
            let mut parts = rel.iter().map(|p| p.to_string_lossy().into_owned());
            let first = parts.next().unwrap();
            let layer = if rel.components().count() > 1 { first } else { first.trim_end_matches(".rs").to_owned() };
            let Some(own) = rank(&layer) else { continue };
            for name in referenced(&std::fs::read_to_string(&path).unwrap()) {
                if rank(&name).is_some_and(|r| r > own) {
                    found.push(format!("{}: {layer} imports {name}", rel.display()));
                }
            }
        }
    }

    #[test]
    fn no_module_imports_from_a_layer_above_it() {
        let mut found = Vec::new();
        visit(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")), &mut found);
        assert!(found.is_empty(), "imports against the layering of lib.rs:\n{}", found.join("\n"));
    }

    #[test]
    fn the_checker_sees_grouped_and_inline_paths() {
        let src = "use crate::{\n    api::x,\n    domain::{keys, model::A},\n};\nfn f() { crate::server::g(); }";
        assert_eq!(referenced(src), ["api", "domain", "server"]);
    }
}
