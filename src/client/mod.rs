//! The Rust client internal services use to talk to Takumo Keys (cargo feature `client`).
//! A surface beside [`crate::api`]: it speaks the wire types of [`crate::proto`] and shares
//! the refusal vocabulary of [`crate::verify::Denial`]; it imports nothing of the server.
//!
//! - [`KeysClient`]: the generated `ApiKeyService` client with the service token attached to
//!   every call, plus [`KeysClient::verify`], the one call most services need.
//! - [`VerifyLayer`]: a tower layer for tonic or axum routers that verifies the API key of
//!   every incoming request against the scopes its route requires, and hands the handler a
//!   [`VerifiedKey`] in the request extensions.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use takumo_keys::{client::{KeysClient, VerifyLayer}, domain::secret::SecretString};
//!
//! let keys = KeysClient::connect("http://keys.internal:50051", SecretString::new("…service token…")).await?;
//! let layer = VerifyLayer::builder(keys).require("/grpc.health.v1.Health/Check", ["fleet.read"]).build()?;
//! # let (_, health) = tonic_health::server::health_reporter();
//! tonic::transport::Server::builder()
//!     .layer(layer)
//!     .add_service(health)
//!     .serve("127.0.0.1:8080".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```

mod layer;

pub use layer::{RejectionBody, VerifyLayer, VerifyLayerBuilder, VerifyService};

pub use crate::verify::Denial;
use crate::{
    domain::model::Environment,
    domain::secret::SecretString,
    error::{Error, Result},
    proto::{
        self,
        pb::{self, api_key_service_client::ApiKeyServiceClient},
    },
};
use std::{fmt, time::Duration};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

/// The generated client as [`KeysClient::raw`] hands it out: every call already carries the
/// service token. Mutations also need the acting member in `x-takumo-actor` metadata.
pub type RawClient = ApiKeyServiceClient<InterceptedService<Channel, ServiceToken>>;

/// Adds `authorization: Bearer <service token>` to every call. The header value is marked
/// sensitive, so neither this type's `Debug` nor tonic's or hyper's logging print it.
#[derive(Clone)]
pub struct ServiceToken(MetadataValue<Ascii>);

impl ServiceToken {
    fn new(token: &SecretString) -> Result<Self> {
        let mut v = MetadataValue::try_from(format!("Bearer {}", token.expose()))
            .map_err(|_| Error::invalid("the service token must be printable ASCII"))?;
        v.set_sensitive(true);
        Ok(Self(v))
    }
}

impl fmt::Debug for ServiceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceToken([redacted])")
    }
}

impl Interceptor for ServiceToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A client of the keys service for an internal backend holding a service token. Cheap to
/// clone: clones share one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct KeysClient {
    raw: RawClient,
}

impl KeysClient {
    /// Connects to `url` (e.g. `http://keys.internal:50051`) and fails now, not on the first
    /// request, if the service cannot be reached. For TLS or a lazy connection build the
    /// channel yourself and use [`KeysClient::from_channel`].
    pub async fn connect(url: impl Into<String>, service_token: SecretString) -> Result<Self> {
        let url = url.into();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::invalid(format!("keys service url {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| Error::Unavailable {
            message: format!("cannot connect to the keys service at {url}"),
            source: Some(Box::new(e)),
        })?;
        Self::from_channel(channel, service_token)
    }

    /// A client over a channel built by the caller (TLS settings, `connect_lazy`, a balancer).
    pub fn from_channel(channel: Channel, service_token: SecretString) -> Result<Self> {
        Ok(Self { raw: ApiKeyServiceClient::with_interceptor(channel, ServiceToken::new(&service_token)?) })
    }

    /// The generated client, for every RPC besides `VerifyKey`.
    pub fn raw(&self) -> RawClient {
        self.raw.clone()
    }

    /// Asks the keys service whether `key` is usable and holds every one of
    /// `required_scopes`. A denial is `Ok(Verdict::Denied)`; `Err` means the question could
    /// not be answered (service unreachable, token refused) and must never be read as
    /// "invalid key".
    pub async fn verify(&self, key: &str, required_scopes: &[impl AsRef<str>]) -> Result<Verdict, Status> {
        let req = pb::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: required_scopes.iter().map(|s| s.as_ref().to_owned()).collect(),
            organization_id: None,
        };
        let r = self.raw.clone().verify_key(req).await?.into_inner();
        if !r.valid {
            let denial = Denial::from_code(r.code(), r.missing_scopes).ok_or_else(|| {
                Status::internal(format!("the keys service refused the key with an unknown code ({})", r.code))
            })?;
            return Ok(Verdict::Denied(denial));
        }
        // A test key read as a live one would be worse than no answer.
        let environment = proto::environment(r.environment).ok().flatten().ok_or_else(|| {
            Status::internal(format!("the keys service sent no known environment ({})", r.environment))
        })?;
        Ok(Verdict::Valid(VerifiedKey {
            key_id: r.key_id,
            organization_id: r.organization_id,
            name: r.name,
            created_by: r.created_by,
            scopes: r.scopes,
            environment,
        }))
    }
}

/// Who is calling: the identity of a key that verified. [`VerifyLayer`] puts one into the
/// request extensions (`request.extensions().get::<VerifiedKey>()` in tonic, the
/// `Extension<VerifiedKey>` extractor in axum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKey {
    pub key_id: String,
    pub organization_id: String,
    pub name: String,
    /// The member who created the key: who to attribute the request to.
    pub created_by: String,
    /// The key's full, expanded scope set, sorted.
    pub scopes: Vec<String>,
    pub environment: Environment,
}

/// The keys service's answer about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid(VerifiedKey),
    Denied(Denial),
}

/// What the layer and [`Verdict::into_result`] answer a refused key with.
impl Denial {
    /// PERMISSION_DENIED when only scopes are missing (the key is fine, the
    /// request is not), UNAUTHENTICATED otherwise; the message is
    /// [`Denial::reason`].
    pub fn to_status(&self) -> Status {
        match self {
            Denial::InsufficientScope(_) => Status::permission_denied(self.reason()),
            Denial::Malformed
            | Denial::NotFound
            | Denial::Revoked
            | Denial::Disabled
            | Denial::Expired
            | Denial::WrongOrganization => Status::unauthenticated(self.reason()),
        }
    }
}

impl Verdict {
    /// The key's identity, or the status a denial should be answered with.
    pub fn into_result(self) -> Result<VerifiedKey, Status> {
        match self {
            Self::Valid(k) => Ok(k),
            Self::Denied(d) => Err(d.to_status()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn the_service_token_never_prints() {
        let t = ServiceToken::new(&SecretString::new(TOKEN)).unwrap();
        assert_eq!(format!("{t:?}"), "ServiceToken([redacted])");
    }

    #[tokio::test]
    async fn the_layer_debug_shows_its_routes_and_no_token() {
        let channel = Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let client = KeysClient::from_channel(channel, SecretString::new(TOKEN)).unwrap();
        let layer = VerifyLayer::builder(client).require("/pkg.Svc/Call", ["fleet.read"]).build().unwrap();
        let shown = format!("{layer:?}");
        assert!(shown.starts_with("VerifyLayer") && shown.contains("/pkg.Svc/Call"), "{shown}");
        assert!(shown.contains("fleet.read") && !shown.contains(TOKEN), "{shown}");
    }
}
