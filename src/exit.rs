//! Stable exit codes, documented in `nbackup --help` and the man page.

use std::process::ExitCode;

use nbackup_daemon::agent::{BackupError, ConnectError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    Unreachable = 3,
    Refused = 4,
    /// A restore wrote nothing.
    NoneRestored = 5,
    /// A restore left some selected members out.
    Partial = 6,
    /// An archive differs from its manifest or does not decompress.
    Mismatch = 7,
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// An error that decides its own exit code.
#[derive(Debug)]
pub struct ExitError {
    pub code: Exit,
    pub error: anyhow::Error,
}

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for ExitError {}

pub fn fail(code: Exit, error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(ExitError { code, error: error.into() })
}

/// The exit code a failed backup maps to.
pub fn for_backup_error(e: &BackupError) -> Exit {
    match e {
        BackupError::Cancelled => Exit::Interrupted,
        // Still restarting after the whole retry budget: not a refusal of this backup.
        _ if e.refusal().is_some_and(|r| r.reason == nbackup_protocol::wire::Reason::Draining) => Exit::Unreachable,
        BackupError::Connect(ConnectError::Refused(_)) | BackupError::Refused(_) => Exit::Refused,
        BackupError::Connect(ConnectError::Unreachable { .. } | ConnectError::Timeout { .. }) => Exit::Unreachable,
        _ if e.refusal().is_some() => Exit::Refused,
        _ => Exit::Failed,
    }
}

pub fn for_connect_error(e: &ConnectError) -> Exit {
    match e {
        ConnectError::Refused(_) => Exit::Refused,
        ConnectError::Unreachable { .. } | ConnectError::Timeout { .. } => Exit::Unreachable,
        _ => Exit::Failed,
    }
}
