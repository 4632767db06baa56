//! The master's error type and its single mapping to `tonic::Status`.
use tonic::{Code, Status};

/// Everything that can go wrong in the master, classified by what the client should do.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The request is malformed; nothing was stored.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such build/subjob/atom/slave.
    #[error("{0}")]
    NotFound(String),
    /// The object exists but its state does not allow this (e.g. archives not ready yet).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Bad credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The master is shutting down.
    #[error("the master is shutting down")]
    ShuttingDown,
    /// The database failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Stored data could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

impl MasterError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::ShuttingDown => Code::Unavailable,
            Self::Storage(_) | Self::Io { .. } | Self::Corrupt(_) => Code::Internal,
        }
    }
}

impl From<MasterError> for Status {
    fn from(e: MasterError) -> Self {
        match e.code() {
            // Internal details go to the log, not to clients.
            Code::Internal => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error in the master (see its log)")
            }
            code => Status::new(code, e.to_string()),
        }
    }
}

/// Result alias for the master.
pub type Result<T, E = MasterError> = std::result::Result<T, E>;
