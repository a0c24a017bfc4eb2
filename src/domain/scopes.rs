//! The scope catalog and the presets, as the product page defines them.
//!
//! Scope sets are kept expanded and sorted, so "does the key hold every
//! required scope" is a subset test and stored sets compare byte for byte.

use crate::error::{Error, Result};
use std::collections::BTreeSet;

pub struct ScopeGroup {
    pub name: &'static str,
    pub scopes: &'static [(&'static str, &'static str)],
}

pub const CATALOG: &[ScopeGroup] = &[
    ScopeGroup {
        name: "organization",
        scopes: &[
            ("organization.read", "View organization details"),
            ("organization.settings", "Modify organization settings"),
            ("organization.delete", "Delete the organization"),
            ("organization.transfer", "Transfer ownership"),
        ],
    },
    ScopeGroup {
        name: "members",
        scopes: &[
            ("members.read", "View team members"),
            ("members.invite", "Invite new members"),
            ("members.remove", "Remove members"),
            ("members.role_change", "Change member roles"),
            ("members.suspend", "Suspend member accounts"),
        ],
    },
    ScopeGroup {
        name: "api_keys",
        scopes: &[
            ("api_keys.read", "View API keys"),
            ("api_keys.create", "Create new keys"),
            ("api_keys.revoke", "Revoke, disable, enable and delete existing keys"),
            ("api_keys.manage_all", "Manage keys created by other members"),
        ],
    },
    ScopeGroup {
        name: "policies",
        scopes: &[
            ("policies.read", "View policies"),
            ("policies.create", "Create new policies"),
            ("policies.edit", "Edit existing policies"),
            ("policies.delete", "Delete policies"),
        ],
    },
    ScopeGroup {
        name: "fleet",
        scopes: &[("fleet.read", "View gateway instances"), ("fleet.manage", "Manage instances and join keys")],
    },
    ScopeGroup {
        name: "audit",
        scopes: &[
            ("audit.read", "View audit log"),
            ("audit.export", "Export audit data"),
            ("audit.webhook_manage", "Configure audit webhooks"),
        ],
    },
    ScopeGroup {
        name: "billing",
        scopes: &[("billing.read", "View billing information"), ("billing.manage", "Change plans and payment methods")],
    },
    ScopeGroup {
        name: "security",
        scopes: &[("security.read", "View security settings"), ("security.manage", "Change security settings")],
    },
    ScopeGroup {
        name: "roles",
        scopes: &[("roles.read", "View custom roles"), ("roles.manage", "Create, edit and delete custom roles")],
    },
    ScopeGroup {
        name: "compliance",
        scopes: &[("compliance.read", "View compliance reports"), ("compliance.export", "Export compliance reports")],
    },
    ScopeGroup {
        name: "integrations",
        scopes: &[
            ("integrations.read", "View third-party integrations"),
            ("integrations.manage", "Connect and configure third-party integrations"),
        ],
    },
    ScopeGroup {
        name: "notifications",
        scopes: &[
            ("notifications.read", "View notification preferences"),
            ("notifications.manage", "Change notification preferences"),
        ],
    },
];

pub const API_KEYS_READ: &str = "api_keys.read";
pub const API_KEYS_CREATE: &str = "api_keys.create";
pub const API_KEYS_REVOKE: &str = "api_keys.revoke";
pub const API_KEYS_MANAGE_ALL: &str = "api_keys.manage_all";
pub const AUDIT_READ: &str = "audit.read";
pub const AUDIT_EXPORT: &str = "audit.export";

/// Most scopes one request may name; more is a caller's bug or an attack.
pub const MAX_SCOPES_PER_REQUEST: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Workspace,
    Organization,
    ReadOnly,
}

pub const PRESETS: [Preset; 3] = [Preset::Workspace, Preset::Organization, Preset::ReadOnly];

/// Write scopes the workspace preset adds to read-only.
const WORKSPACE_EXTRA: &[&str] = &[
    "policies.create",
    "policies.edit",
    "policies.delete",
    "fleet.manage",
    "api_keys.create",
    "api_keys.revoke",
    "audit.export",
    "integrations.manage",
    "notifications.manage",
];

fn all_scopes() -> impl Iterator<Item = &'static str> {
    CATALOG.iter().flat_map(|g| g.scopes.iter().map(|(n, _)| *n))
}

pub fn is_known(scope: &str) -> bool {
    all_scopes().any(|s| s == scope)
}

/// The sorted scope set a preset expands to.
pub fn expand_preset(preset: Preset) -> Vec<String> {
    let set: BTreeSet<&str> = match preset {
        Preset::Organization => all_scopes().collect(),
        Preset::ReadOnly => all_scopes().filter(|s| s.ends_with(".read")).collect(),
        Preset::Workspace => {
            all_scopes().filter(|s| s.ends_with(".read")).chain(WORKSPACE_EXTRA.iter().copied()).collect()
        }
    };
    set.into_iter().map(str::to_owned).collect()
}

/// Validates names a caller sent: known, no duplicates, not too many.
/// Errors name every offending scope so the caller can fix them all at once.
pub fn validate(names: &[String], what: &str) -> Result<()> {
    if names.len() > MAX_SCOPES_PER_REQUEST {
        return Err(Error::invalid(format!(
            "{what}: at most {MAX_SCOPES_PER_REQUEST} scopes per request, got {}",
            names.len()
        )));
    }
    let mut seen = BTreeSet::new();
    let mut unknown = Vec::new();
    let mut dup = BTreeSet::new();
    for n in names {
        if !is_known(n) {
            unknown.push(printable(n));
        } else if !seen.insert(n.as_str()) {
            dup.insert(n.as_str());
        }
    }
    if !unknown.is_empty() {
        return Err(Error::invalid(format!(
            "{what}: unknown scope(s) {}; ListScopes shows the catalog",
            unknown.join(", ")
        )));
    }
    if !dup.is_empty() {
        return Err(Error::invalid(format!(
            "{what}: duplicate scope(s) {}",
            dup.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// Quotes a caller-supplied name for an error message, cut short and with
/// control characters escaped, so a hostile value cannot flood or forge logs.
fn printable(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    let suffix = if s.chars().count() > 64 { "…" } else { "" };
    format!("{:?}{suffix}", cut)
}

/// Validated custom set, sorted.
pub fn custom(names: &[String]) -> Result<Vec<String>> {
    if names.is_empty() {
        return Err(Error::invalid("custom scopes: give at least one scope, or use a preset"));
    }
    validate(names, "custom scopes")?;
    let mut v = names.to_vec();
    v.sort();
    Ok(v)
}

/// The scopes in `required` that `held` (sorted) lacks.
pub fn missing(held: &[String], required: &[String]) -> Vec<String> {
    required.iter().filter(|r| held.binary_search(r).is_err()).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organization_preset_is_every_scope() {
        assert_eq!(expand_preset(Preset::Organization).len(), all_scopes().count());
    }

    #[test]
    fn read_only_preset_is_every_read_scope() {
        let ro = expand_preset(Preset::ReadOnly);
        assert_eq!(ro.len(), 12);
        assert!(ro.iter().all(|s| s.ends_with(".read")));
    }

    #[test]
    fn workspace_preset_is_read_only_plus_its_write_scopes() {
        let ws = expand_preset(Preset::Workspace);
        assert_eq!(ws.len(), 12 + WORKSPACE_EXTRA.len());
        assert!(WORKSPACE_EXTRA.iter().all(|s| is_known(s)));
        assert!(!ws.contains(&"api_keys.manage_all".to_owned()));
    }

    #[test]
    fn unknown_and_duplicate_scopes_are_named_in_the_error() {
        let e = custom(&["fleet.read".into(), "fleet.fly".into()]).unwrap_err();
        assert!(e.to_string().contains("fleet.fly"));
        let e = custom(&["fleet.read".into(), "fleet.read".into()]).unwrap_err();
        assert!(e.to_string().contains("duplicate"));
    }

    #[test]
    fn the_scope_count_bound_is_exact() {
        let names = |n: usize| vec!["fleet.read".to_string(); n];
        let at = validate(&names(MAX_SCOPES_PER_REQUEST), "scopes").unwrap_err().to_string();
        assert!(!at.contains("at most"), "{MAX_SCOPES_PER_REQUEST} names are read (then refused as duplicates): {at}");
        let past = validate(&names(MAX_SCOPES_PER_REQUEST + 1), "scopes").unwrap_err().to_string();
        assert!(past.contains(&format!("at most {MAX_SCOPES_PER_REQUEST}")), "{past}");
    }

    #[test]
    fn an_unknown_scope_is_quoted_whole_up_to_64_characters_then_cut() {
        assert_eq!(printable(&"a".repeat(64)), format!("{:?}", "a".repeat(64)));
        assert_eq!(printable(&"a".repeat(65)), format!("{:?}…", "a".repeat(64)));
        assert_eq!(printable("x\ny"), "\"x\\ny\"");
    }
}
