//! The errors that stop the coordinator from starting or running, and whose they are.

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::store::StoreError;
use crate::transport;

/// Errors that stop the coordinator from starting or running. Operator's (config, state)
/// or ours.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Endpoint(#[from] transport::EndpointError),
    /// A model checkpoint cannot be used (wrong key, altered, not the recorded file).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("config error: {0}")]
    Config(String),
    #[error("state directory {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("audit log {}: {source}; check it with `fedpriv-coordinator audit verify --log {}` (a crash's torn last line is repaired by the recovery path; an edited log must be restored from backup)", path.display(), path.display())]
    Audit {
        path: PathBuf,
        source: fedpriv_common::audit_file::AuditError,
    },
}
