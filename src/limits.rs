//! Request size limits at the transport edge.

use tonic::codegen::http::{HeaderValue, Response};

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
