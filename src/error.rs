//! The one error type of the service and its one mapping to `tonic::Status`.
//!
//! Variants are what a caller can act on; everything else is `Internal`, whose
//! cause chain is logged here and never sent to the caller.

use crate::domain::model::Plan;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(
        "the {plan} plan allows at most {limit} active or disabled keys; revoke or delete a key, or upgrade the plan"
    )]
    LimitExceeded { plan: Plan, limit: i64 },
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        Self::Internal(err.into())
    }

    /// The store could not be reached: the caller may retry, and must never
    /// read this as "invalid key".
    pub fn unavailable(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable {
            message: "the key store is unavailable; retry with backoff".into(),
            source: Some(Box::new(err)),
        }
    }
}

/// Writes an error with its whole cause chain, for logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(cause) = cur {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        cur = cause.source();
    }
    out
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use tonic::{Code, Status};
        // Messages may quote caller input: whatever field a key was pasted
        // into, no more than its public prefix leaves here.
        let status = |code: Code, m: &str| Status::new(code, crate::domain::keys::redact_keys(m));
        match err {
            Error::InvalidArgument(m) => status(Code::InvalidArgument, &m),
            Error::NotFound(m) => status(Code::NotFound, &m),
            Error::Unauthenticated(m) => status(Code::Unauthenticated, &m),
            Error::PermissionDenied(m) => status(Code::PermissionDenied, &m),
            Error::FailedPrecondition(m) => status(Code::FailedPrecondition, &m),
            e @ Error::LimitExceeded { .. } => Status::resource_exhausted(e.to_string()),
            Error::ResourceExhausted(m) => status(Code::ResourceExhausted, &m),
            e @ Error::Unavailable { .. } => {
                tracing::warn!(error = %error_chain(&e), "store unavailable");
                match e {
                    Error::Unavailable { message, .. } => Status::unavailable(message),
                    _ => unreachable!(),
                }
            }
            Error::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                Status::internal("internal error; it has been logged")
            }
        }
    }
}
