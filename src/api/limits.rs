//! Request size limits at the transport edge.

use std::{
    task::{Context, Poll},
    time::Duration,
};
use tonic::codegen::http::{self, HeaderMap, HeaderValue, Response};

/// In-flight calls per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
/// Bounds what one connection can make the server hold at once; gRPC
/// clients open further connections, or queue, when they need more.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// HTTP/2 PING every 30 s on an idle connection, and drop it when the
/// answer takes over 10 s: a vanished peer does not hold streams forever.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on accepted sockets, for peers that vanish without a FIN.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Streams a client may reset before the server has handled them (the
/// HTTP/2 "rapid reset" attack, CVE-2023-44487), and streams the server may
/// reset for a client's protocol errors ("MadeYouReset", 2025), before the
/// connection is closed with ENHANCE_YOUR_CALM.
pub const HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
pub const HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// Largest header list (all request metadata) HTTP/2 takes in, advertised as
/// SETTINGS_MAX_HEADER_LIST_SIZE. Set far above [`MAX_METADATA_BYTES`] so an
/// oversized request still reaches [`MetadataLimit`] and gets a gRPC status a
/// person can act on, instead of HTTP/2's bare 431 and stream reset (which
/// clients report as INTERNAL with no message). Beyond it, clients refuse to
/// send and name this limit themselves.
pub const HTTP2_MAX_HEADER_LIST_BYTES: u32 = 1024 * 1024;

/// Most request metadata accepted, counted as HTTP/2 does (name + value + 32
/// per entry). Legitimate metadata (a bearer of at most 1 KiB, a traceparent,
/// a request id) is far below it.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

fn metadata_bytes(headers: &HeaderMap) -> usize {
    headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum()
}

/// Answers RESOURCE_EXHAUSTED, before any other work, to a request whose
/// metadata is larger than [`MAX_METADATA_BYTES`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MetadataLimitLayer;

impl<S> tower::Layer<S> for MetadataLimitLayer {
    type Service = MetadataLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetadataLimit { inner }
    }
}

#[derive(Debug, Clone)]
pub struct MetadataLimit<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for MetadataLimit<S>
where
    S: tower::Service<http::Request<B>, Response = Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<futures::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let size = metadata_bytes(req.headers());
        if size > MAX_METADATA_BYTES {
            let status = tonic::Status::resource_exhausted(format!(
                "the request metadata is {size} bytes; at most {MAX_METADATA_BYTES} are accepted: send the API key \
                 or service token alone in `authorization` and drop oversized headers"
            ));
            return futures::future::Either::Left(futures::future::ready(Ok(status.into_http())));
        }
        futures::future::Either::Right(self.inner.call(req))
    }
}

/// Largest request message accepted, in bytes. Far above any legitimate
/// request (100 scopes and a 64-character name fit in a few KiB), far below
/// what would let one call pin megabytes.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 256 * 1024;

/// tonic reports an oversized request as OUT_OF_RANGE; gRPC's own servers,
/// and this service's contract, say RESOURCE_EXHAUSTED. Rewrites exactly that
/// trailers-only response, and nothing else.
pub fn oversize_is_resource_exhausted<B>(mut resp: Response<B>) -> Response<B> {
    let headers = resp.headers_mut();
    let oversize = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("length%20too%20large") || m.contains("length too large"));
    if oversize {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("the%20request%20message%20is%20larger%20than%20this%20server%20accepts"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_oversize_status_is_rewritten() {
        let resp = |status: &'static str, msg: &'static str| {
            let mut r = Response::new(());
            r.headers_mut().insert("grpc-status", HeaderValue::from_static(status));
            r.headers_mut().insert("grpc-message", HeaderValue::from_static(msg));
            oversize_is_resource_exhausted(r)
        };
        let r = resp("11", "Error,%20decoded%20message%20length%20too%20large:%20found%201%20bytes");
        assert_eq!(r.headers()["grpc-status"], "8");
        let r = resp("11", "something%20else");
        assert_eq!(r.headers()["grpc-status"], "11");
        let r = resp("3", "length%20too%20large");
        assert_eq!(r.headers()["grpc-status"], "3");
    }
}
