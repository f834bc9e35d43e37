//! The CA's API boundary error and the one place that maps errors to gRPC statuses.
//!
//! Module errors convert into [`ApiError`]; [`ApiError::into_status`] decides the code and what
//! detail a caller may see (internal failures are logged in full and answered generically).

use tonic::{Code, Status};

/// An error as an API caller sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or has an invalid field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An equal object already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller is authenticated but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller did not prove who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// The object changed concurrently (e.g. a revision check failed).
    #[error("{0}")]
    Aborted(String),
    /// The system is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Temporarily unable; retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a storage failure; the detail is logged, not returned.
    #[error("internal: {0}")]
    Internal(String),
    /// The caller is over a rate limit.
    #[error("{0}")]
    ResourceExhausted(String),
}

impl ApiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
        }
    }

    /// The gRPC status for this error: the code, and the message a caller may see.
    pub fn into_status(self) -> Status {
        let code = self.code();
        let msg = match self {
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                "internal error; see the CA log".to_owned()
            }
            ApiError::InvalidArgument(m)
            | ApiError::NotFound(m)
            | ApiError::AlreadyExists(m)
            | ApiError::PermissionDenied(m)
            | ApiError::Unauthenticated(m)
            | ApiError::Aborted(m)
            | ApiError::FailedPrecondition(m)
            | ApiError::Unavailable(m)
            | ApiError::ResourceExhausted(m) => m,
        };
        Status::new(code, msg)
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        e.into_status()
    }
}

impl From<ward_store::StoreError> for ApiError {
    fn from(e: ward_store::StoreError) -> Self {
        match e {
            ward_store::StoreError::Conflict { .. } => {
                ApiError::Aborted(format!("concurrent modification: {e}"))
            }
            // Over the store's per-transaction limits (etcd): the request must be smaller.
            ward_store::StoreError::TooLarge(_) => ApiError::InvalidArgument(e.to_string()),
            // The store cannot be reached or failed: fail closed, the caller may retry.
            ward_store::StoreError::Backend(_) => ApiError::Unavailable(e.to_string()),
            // Singleton work after this replica lost leadership: the new leader redoes it.
            ward_store::StoreError::Deposed(_) => ApiError::FailedPrecondition(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}
