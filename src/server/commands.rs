//! The subcommands besides `serve`: `bootstrap` (the first key of an
//! organization), `migrate` (the schema, then exit) and `health` (a probe for
//! containers that cannot speak gRPC).

use crate::{
    api::issue::{KeySpec, issue_key},
    domain::{
        model::{ApiKey, AuditContext, Environment},
        scopes::{self, Preset},
        secret::SecretString,
        validate,
    },
    error::{Error, Result},
    server::{
        config::{BootstrapArgs, HealthArgs, MigrateArgs},
        startup::open_store,
    },
    store,
};
use std::{sync::Arc, time::Duration};

/// `takumo-keys bootstrap`: how an operator gets the first key of an
/// organization. Returns the full key; the caller prints it once.
pub async fn bootstrap(args: &BootstrapArgs) -> Result<(ApiKey, SecretString)> {
    validate::ident("--organization", &args.organization)?;
    validate::ident("--member", &args.member)?;
    validate::name("--name", &args.name)?;
    let (store, hasher) = open_store(&args.store, 1, Arc::default()).await?;
    if let Some(plan) = args.plan {
        store.set_plan(&args.organization, plan, &AuditContext::operator(&args.member)).await?;
    }
    issue_key(
        &*store,
        &hasher,
        KeySpec {
            organization_id: args.organization.clone(),
            name: args.name.clone(),
            scopes: scopes::expand_preset(Preset::Organization),
            created_by: args.member.clone(),
            environment: Environment::Live,
            expires_at: None,
            metadata: Default::default(),
        },
        &AuditContext::operator(&args.member),
    )
    .await
}

/// `takumo-keys health`: asks a running server's `grpc.health.v1.Health`
/// whether it is SERVING. For container health checks, which cannot speak gRPC.
pub async fn health_check(args: &HealthArgs) -> Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let timeout = Duration::from_millis(args.timeout_ms);
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))
            .map_err(Error::internal)?
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(Error::unavailable)?;
        let resp =
            HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map_err(|s| {
                Error::Unavailable { message: format!("health check failed: {}", s.message()), source: None }
            })?;
        match resp.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => {
                Err(Error::Unavailable { message: format!("server reports {}", other.as_str_name()), source: None })
            }
        }
    };
    tokio::time::timeout(timeout, check).await.map_err(|_| Error::Unavailable {
        message: format!("no answer from {} in {timeout:?}", args.addr),
        source: None,
    })?
}

/// `takumo-keys migrate`: brings the schema up to date and exits.
pub async fn migrate(args: &MigrateArgs) -> Result<()> {
    let store = store::connect(args.database_url.expose(), &Default::default()).await?;
    tracing::info!(backend = store.backend(), "schema is up to date");
    Ok(())
}
