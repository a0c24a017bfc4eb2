//! Wiring: settings in, a bound server out. The server runs until a shutdown
//! future resolves, so production passes SIGTERM/Ctrl-C and tests a oneshot.

use crate::{
    api::{
        auth::Authenticator,
        leaks::LeakIntake,
        limits,
        service::KeysService,
        spans,
        tls::{self, CertServices},
    },
    error::{Error, Result},
    gateway::{ext_authz::ExtAuthz, forward_auth::ForwardAuth},
    http::{self, github::GithubScanning},
    metrics::{self, Metrics},
    proto::{ENVOY_EXT_AUTHZ_DESCRIPTOR_SET, FILE_DESCRIPTOR_SET, pb::api_key_service_server::ApiKeyServiceServer},
    server::{
        config::{ServeArgs, StoreArgs},
        health, secrets,
    },
    store::{self, ChangeSink, Store},
    verify::{
        Verifier,
        cache::VerifyCache,
        hashing::{Hasher, Peppers},
        usage::Usage,
    },
};
use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::watch};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Server, ServerTlsConfig, server::TcpIncoming};

/// Opens the store and resolves the pepper: the part `serve` and `bootstrap` share.
pub async fn open_store(
    args: &StoreArgs,
    hash_queue: usize,
    metrics: Arc<Metrics>,
) -> Result<(Arc<dyn Store>, Hasher)> {
    // The pepper first: a configuration mistake should not wait on the database.
    let current = secrets::resolve_pepper(args).await?;
    let store = store::connect(args.database_url.expose(), &args.store_options()).await.map_err(|e| match e {
        Error::Unavailable { source, .. } => Error::Unavailable {
            message: "DATABASE_URL: cannot reach the database (the URL is not shown: it may hold a password)".into(),
            source,
        },
        e => e,
    })?;
    let previous = secrets::previous_peppers(args);
    let hasher = Hasher::with_queue(Peppers { current, previous }, args.hash_params(), hash_queue, metrics)?;
    Ok((store, hasher))
}

/// Accepts gzip- and zstd-compressed requests (what generated clients and
/// proxies send when compression is on) and compresses responses for callers
/// that advertise `grpc-accept-encoding`. A macro: the generated servers
/// share these methods but no trait.
macro_rules! compressed {
    ($server:expr) => {
        $server
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Zstd)
    };
}

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    store: Arc<dyn Store>,
    service: KeysService,
    ext_authz: ExtAuthz,
    verifier: Verifier,
    metrics: Arc<Metrics>,
    usage: Usage,
    usage_flush_interval: Duration,
    tls: Option<ServerTlsConfig>,
    max_request_bytes: usize,
    max_concurrent_streams: u32,
    metrics_listener: Option<TcpListener>,
    /// The public HTTP surface (`TAKUMO_HTTP_LISTEN`) and its routes.
    http: Option<(TcpListener, axum::Router)>,
    /// Sets the scrape-time gauges from their sources.
    gauges: Arc<dyn Fn() + Send + Sync>,
    shutdown_delay: Duration,
    shutdown_timeout: Duration,
}

impl Application {
    /// Connects, migrates and binds. Binding here, not in `run_until`, lets
    /// the caller learn the real address (port 0 in tests) before serving.
    pub async fn build(args: &ServeArgs) -> Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let (store, hasher) = open_store(&args.store, args.hash_queue, metrics.clone()).await?;
        let tokens = secrets::service_tokens(args).await?;
        let cert_services = match &args.mtls_services {
            Some(spec) => CertServices::parse(spec)?,
            None => CertServices::default(),
        };
        if tokens.is_empty() && cert_services.is_empty() {
            tracing::warn!(
                "no TAKUMO_SERVICE_TOKENS set: only API keys can call the service, and VerifyKey is unusable"
            );
        }
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(tls::server_config(cert, key, args.tls_client_ca.as_deref())?),
            _ => None,
        };
        let usage = Usage::new(store.clone(), metrics.clone());
        let cache = Arc::new(VerifyCache::new(args.cache_settings()));
        let verifier = Verifier::new(store.clone(), hasher.clone(), usage.clone(), cache.clone(), metrics.clone());
        let gauges: Arc<dyn Fn() + Send + Sync> = {
            let (metrics, store, usage, hasher) = (metrics.clone(), store.clone(), usage.clone(), hasher.clone());
            let changes = verifier.changes().clone();
            Arc::new(move || {
                metrics.change_subscribers.set(changes.subscribers() as i64);
                let (lag, keys) = usage.lag();
                let pool = store.pool_stats();
                metrics.cache_entries.set(cache.entry_count() as i64);
                metrics.argon2_queue_depth.set(hasher.queue_depth() as i64);
                metrics.usage_flush_lag_seconds.set(lag.as_secs_f64());
                metrics.usage_pending_keys.set(keys as i64);
                metrics.db_pool_in_use.set(i64::from(pool.size.saturating_sub(pool.idle)));
                metrics.db_pool_idle.set(i64::from(pool.idle));
            })
        };
        let metrics_listener = match args.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::invalid(format!("TAKUMO_METRICS_LISTEN {addr}: {e}")))?,
            ),
            None => None,
        };
        let http = match args.http_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::invalid(format!("TAKUMO_HTTP_LISTEN {addr}: {e}")))?;
                let intake = LeakIntake { verifier: verifier.clone(), store: store.clone(), action: args.leak_action };
                let github = GithubScanning::new(intake, args.github_scanning_keys_file.clone());
                let forward_auth = ForwardAuth { verifier: verifier.clone(), tokens: tokens.clone() };
                Some((listener, http::router(Arc::new(github), Arc::new(forward_auth))))
            }
            None => None,
        };
        let auth = Authenticator::new(tokens, cert_services, verifier.clone());
        let ext_authz = ExtAuthz { verifier: verifier.clone(), auth: auth.clone() };
        let service =
            KeysService::new(store.clone(), hasher, verifier.clone(), auth).with_leak_action(args.leak_action);
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| Error::invalid(format!("TAKUMO_LISTEN {}: {e}", args.listen)))?;
        Ok(Self {
            listener,
            store,
            service,
            ext_authz,
            verifier,
            metrics,
            usage,
            usage_flush_interval: Duration::from_millis(args.usage_flush_interval_ms.max(10)),
            tls,
            max_request_bytes: args.max_request_bytes,
            max_concurrent_streams: args.http2_max_concurrent_streams.max(1),
            metrics_listener,
            http,
            gauges,
            shutdown_delay: Duration::from_millis(args.shutdown_delay_ms),
            shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Where the metrics endpoint listens, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the public HTTP surface listens, when enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The usage counter, so tests and shutdown can force a flush.
    pub fn usage(&self) -> Usage {
        self.usage.clone()
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls and
    /// flushes usage counts before returning.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let flusher = self.usage.spawn_flusher(self.usage_flush_interval, stop_rx.clone());
        let watcher = {
            let store = self.store.clone();
            let sink: Arc<dyn ChangeSink> = Arc::new(self.verifier.clone());
            let stop = stop_rx.clone();
            tokio::spawn(async move { store.watch_changes(sink, stop).await })
        };

        let (metrics_listener, metrics, gauges) = (self.metrics_listener, self.metrics.clone(), self.gauges.clone());
        let metrics_task = metrics_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving metrics");
            }
            tokio::spawn(metrics::serve(listener, metrics, gauges, stop_rx.clone()))
        });

        let http_task = self.http.map(|(listener, router)| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving HTTP");
            }
            tokio::spawn(http::serve(listener, router, stop_rx.clone()))
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health::set_health(&health, true).await;
        // The prober stops when shutdown begins, so it cannot turn health back to SERVING.
        let (prober_stop, prober_rx) = watch::channel(false);
        let prober =
            tokio::spawn(health::probe_health(self.store.clone(), health.clone(), self.metrics.clone(), prober_rx));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(ENVOY_EXT_AUTHZ_DESCRIPTOR_SET)
            .build_v1()
            .map_err(Error::internal)?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(ENVOY_EXT_AUTHZ_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(Error::internal)?;

        let addr = self.listener.local_addr().map_err(Error::internal)?;
        // Small unary responses must not wait on Nagle's algorithm.
        let incoming =
            TcpIncoming::from(self.listener).with_nodelay(Some(true)).with_keepalive(Some(limits::TCP_KEEPALIVE));
        tracing::info!(%addr, backend = self.store.backend(), "serving gRPC");
        // The HTTP/2 limits a public gRPC server needs (see `limits`).
        let mut server = Server::builder()
            .trace_fn(spans::rpc_span)
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_header_list_size(limits::HTTP2_MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(limits::HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(limits::HTTP2_KEEPALIVE_TIMEOUT))
            .http2_max_pending_accept_reset_streams(Some(limits::HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS))
            .http2_max_local_error_reset_streams(Some(limits::HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS));
        if let Some(tls) = self.tls {
            server = server.tls_config(tls).map_err(|e| Error::invalid(format!("TAKUMO_TLS_*: {e}")))?;
        }
        let draining = Arc::new(tokio::sync::Notify::new());
        let (delay, timeout) = (self.shutdown_delay, self.shutdown_timeout);
        let begin_shutdown = {
            let draining = draining.clone();
            let changes = self.verifier.changes().clone();
            async move {
                shutdown.await;
                let _ = prober_stop.send(true);
                health::set_health(&health, false).await;
                tracing::info!(?delay, "shutting down: health is NOT_SERVING");
                tokio::time::sleep(delay).await;
                tracing::info!("closing the listener; draining in-flight calls");
                // Change streams never end by themselves: end them, so the
                // drain waits on real calls only and watchers move elsewhere.
                changes.stop();
                draining.notify_one();
            }
        };
        let serve = server
            .layer(tower::util::MapResponseLayer::new(limits::oversize_is_resource_exhausted))
            .layer(limits::MetadataLimitLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(compressed!(
                ApiKeyServiceServer::new(self.service).max_decoding_message_size(self.max_request_bytes)
            ))
            .add_service(compressed!(
                AuthorizationServer::new(self.ext_authz).max_decoding_message_size(self.max_request_bytes)
            ))
            .serve_with_incoming_shutdown(incoming, begin_shutdown);
        let result = tokio::select! {
            r = serve => r.map_err(Error::internal),
            _ = async { draining.notified().await; tokio::time::sleep(timeout).await } => {
                tracing::warn!(?timeout, "drain timeout: abandoning calls still in flight");
                Ok(())
            }
        };

        // Background work stops after the last call: the final usage flush
        // counts every verification that completed.
        let _ = stop_tx.send(true);
        let _ = prober.await;
        let _ = watcher.await;
        let _ = flusher.await;
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        if let Some(t) = http_task {
            let _ = t.await;
        }
        tracing::info!("stopped");
        result
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
