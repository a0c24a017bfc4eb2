//! Secrets in: the pepper (flag, file, or generated beside the embedded
//! database) and the service tokens (flag and file). Files holding a secret
//! must be private to their owner.

use crate::{
    api::auth::ServiceTokens,
    domain::secret::SecretString,
    error::{Error, Result},
    server::config::{ServeArgs, StoreArgs},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::{TryRngCore, rngs::OsRng};
use std::{
    io::Write,
    path::{Path, PathBuf},
};

/// `TAKUMO_PREVIOUS_PEPPERS`: peppers of keys hashed before a rotation.
pub(crate) fn previous_peppers(args: &StoreArgs) -> Vec<SecretString> {
    args.previous_peppers
        .as_ref()
        .map(|p| p.expose().split(',').map(str::trim).filter(|s| !s.is_empty()).map(SecretString::new).collect())
        .unwrap_or_default()
}

pub(crate) async fn resolve_pepper(args: &StoreArgs) -> Result<SecretString> {
    if let Some(p) = &args.pepper {
        return Ok(p.clone());
    }
    if let Some(path) = &args.pepper_file {
        ensure_private("TAKUMO_PEPPER_FILE", path)?;
        let raw = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| Error::invalid(format!("TAKUMO_PEPPER_FILE {}: {e}", path.display())))?;
        return Ok(SecretString::new(raw.trim_end()));
    }
    match embedded_db_path(args.database_url.expose()) {
        Some(db) => embedded_pepper(&db),
        None => Err(Error::invalid(
            "TAKUMO_PEPPER (or TAKUMO_PEPPER_FILE) is required with PostgreSQL: every replica must share it",
        )),
    }
}

/// The SQLite file of an embedded DSN, or `None` for PostgreSQL.
fn embedded_db_path(dsn: &str) -> Option<PathBuf> {
    let rest = dsn.strip_prefix("sqlite:")?;
    let rest = rest.trim_start_matches("//");
    let path = rest.split('?').next().unwrap_or_default();
    Some(PathBuf::from(path))
}

/// The embedded default must start with no configuration, so it keeps a
/// generated pepper in `<db>.pepper` (mode 0600). In-memory databases get an
/// ephemeral one: their keys die with the process anyway.
fn embedded_pepper(db: &Path) -> Result<SecretString> {
    let fresh = || {
        let mut bytes = [0u8; 32];
        OsRng.try_fill_bytes(&mut bytes).map_err(Error::internal)?;
        Ok::<_, Error>(URL_SAFE_NO_PAD.encode(bytes))
    };
    let s = db.to_string_lossy();
    if s.is_empty() || s.starts_with(":memory:") || s == "memory" {
        return Ok(SecretString::new(fresh()?));
    }
    let mut path = db.as_os_str().to_owned();
    path.push(".pepper");
    let path = PathBuf::from(path);
    if path.exists() {
        ensure_private("pepper file", &path)?;
    }
    match std::fs::read_to_string(&path) {
        Ok(p) => return Ok(SecretString::new(p.trim_end())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::invalid(format!("pepper file {}: {e}", path.display())));
        }
    }
    let pepper = fresh()?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let write = opts.open(&path).and_then(|mut f| {
        f.write_all(pepper.as_bytes())?;
        f.sync_all()
    });
    match write {
        Ok(()) => {
            tracing::info!(path = %path.display(), "generated a pepper for the embedded database");
            Ok(SecretString::new(pepper))
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let p = std::fs::read_to_string(&path).map_err(Error::internal)?;
            Ok(SecretString::new(p.trim_end()))
        }
        Err(e) => Err(Error::invalid(format!("cannot write pepper file {}: {e}", path.display()))),
    }
}

/// Refuses a secret file that group or others may read, as ssh does with
/// private keys: a pepper anyone on the host can read is no secret.
fn ensure_private(what: &str, path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| Error::invalid(format!("{what} {}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::invalid(format!(
                "{what} {} has mode {mode:04o}: it must not be readable by group or others (chmod 600 {})",
                path.display(),
                path.display()
            )));
        }
    }
    let _ = (what, path);
    Ok(())
}

/// Service tokens from TAKUMO_SERVICE_TOKENS and TAKUMO_SERVICE_TOKENS_FILE together.
pub(crate) async fn service_tokens(args: &ServeArgs) -> Result<ServiceTokens> {
    let mut spec = args.service_tokens.as_ref().map(|s| s.expose().to_owned()).unwrap_or_default();
    if let Some(path) = &args.service_tokens_file {
        let file = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| Error::invalid(format!("TAKUMO_SERVICE_TOKENS_FILE {}: {e}", path.display())))?;
        spec.push(',');
        spec.push_str(&file.replace(['\n', '\r'], ","));
    }
    ServiceTokens::parse(&SecretString::new(spec))
}
