//! A tiny downstream gRPC service that lets in only callers with a valid Takumo API key.
//!
//! It serves the standard health service, which needs a key holding `fleet.read`, and
//! `demo.v1.Whoami/Get`, which any valid key may call and which answers with the identity the
//! layer verified (a `google.protobuf.StringValue`), showing how a handler reads it.
//!
//! ```text
//! TAKUMO_KEYS_URL=http://127.0.0.1:50051 TAKUMO_SERVICE_TOKEN=… LISTEN=127.0.0.1:8081 \
//!     cargo run --example protected_service
//! grpcurl -plaintext -H "authorization: Bearer tk_live_…" 127.0.0.1:8081 grpc.health.v1.Health/Check
//! ```
//!
//! `tests/client_layer.rs` runs this same code against the real server.

use futures::future::BoxFuture;
use std::{
    convert::Infallible,
    future::Future,
    task::{Context, Poll},
};
use takumo_keys::{
    client::{KeysClient, VerifiedKey, VerifyLayer, VerifyLayerBuilder},
    domain::secret::SecretString,
};
use tokio::net::TcpListener;
use tonic::{
    Status,
    body::Body,
    server::{NamedService, UnaryService},
    transport::{Server, server::TcpIncoming},
};
use tonic_prost::ProstCodec;

pub const WHOAMI_PATH: &str = "/demo.v1.Whoami/Get";

/// What each route asks of its callers. Unlisted routes (Whoami) need any valid key.
pub fn routes(keys: KeysClient) -> VerifyLayerBuilder {
    VerifyLayer::builder(keys).require("/grpc.health.v1.Health/", ["fleet.read"])
}

/// Serves the protected routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    layer: VerifyLayer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    Server::builder()
        .layer(layer)
        .add_service(health)
        .add_service(Whoami)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// `demo.v1.Whoami`, written out by hand because this example has no proto of its own.
#[derive(Debug, Clone)]
pub struct Whoami;

impl NamedService for Whoami {
    const NAME: &'static str = "demo.v1.Whoami";
}

impl tower::Service<http::Request<Body>> for Whoami {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != WHOAMI_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        Box::pin(async move { Ok(tonic::server::Grpc::new(ProstCodec::<String, ()>::default()).unary(Get, req).await) })
    }
}

struct Get;

impl UnaryService<()> for Get {
    type Response = String;
    type Future = std::future::Ready<Result<tonic::Response<String>, Status>>;

    /// The layer put the caller's identity into the extensions; a handler needs nothing else.
    fn call(&mut self, req: tonic::Request<()>) -> Self::Future {
        std::future::ready(match req.extensions().get::<VerifiedKey>() {
            Some(k) => Ok(tonic::Response::new(format!("{} {} {}", k.key_id, k.organization_id, k.created_by))),
            None => Err(Status::internal("no verified key: is the service behind VerifyLayer?")),
        })
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("protected_service: {}", takumo_keys::error::error_chain(&*e));
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let keys_url = std::env::var("TAKUMO_KEYS_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let token = std::env::var("TAKUMO_SERVICE_TOKEN").map_err(|_| "set TAKUMO_SERVICE_TOKEN")?;
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8081".into());
    let keys = KeysClient::connect(keys_url, SecretString::new(token)).await?;
    let layer = routes(keys).build()?;
    let listener = TcpListener::bind(&listen).await?;
    println!("protected_service listening on {}", listener.local_addr()?);
    serve(listener, layer, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
