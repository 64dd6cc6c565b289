//! The crate error and the one table that maps each client-facing error code to its
//! HTTP status and title. Codes are stable API: clients branch on them.

use axum::http::StatusCode;

use crate::qemu::QemuError;
use crate::qemu::qmp::QmpError;

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:ident, $title:literal)),+ $(,)?) => {
        /// Machine-readable error codes; `code` in every problem answer.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant),+ }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),+];
            pub fn as_str(self) -> &'static str { match self { $(Self::$variant => $code),+ } }
            pub fn status(self) -> StatusCode { match self { $(Self::$variant => StatusCode::$status),+ } }
            pub fn title(self) -> &'static str { match self { $(Self::$variant => $title),+ } }
        }
    };
}

error_codes! {
    ValidationFailed => ("validation_failed", BAD_REQUEST, "The request is not valid"),
    InvalidJson => ("invalid_json", BAD_REQUEST, "The request body is not valid JSON for this endpoint"),
    InvalidQuery => ("invalid_query", BAD_REQUEST, "A query parameter is not valid"),
    InvalidCursor => ("invalid_cursor", BAD_REQUEST, "The pagination cursor is not valid"),
    UnsupportedMediaType => ("unsupported_media_type", UNSUPPORTED_MEDIA_TYPE, "The request body must be application/json"),
    PayloadTooLarge => ("payload_too_large", PAYLOAD_TOO_LARGE, "The request body is too large"),
    ImportPathRefused => ("import_path_refused", BAD_REQUEST, "The import path is not allowed"),
    SocketRefused => ("socket_refused", BAD_REQUEST, "The socket is not a unix socket inside --runtime-dir"),
    Unauthorized => ("unauthorized", UNAUTHORIZED, "A valid token is needed"),
    Forbidden => ("forbidden", FORBIDDEN, "The token's scope does not allow this"),
    TooManyAttempts => ("too_many_attempts", TOO_MANY_REQUESTS, "Too many failed attempts from this address"),
    RouteNotFound => ("route_not_found", NOT_FOUND, "No such endpoint"),
    MethodNotAllowed => ("method_not_allowed", METHOD_NOT_ALLOWED, "The endpoint does not support this method"),
    VmNotFound => ("vm_not_found", NOT_FOUND, "No such VM"),
    DiskNotFound => ("disk_not_found", NOT_FOUND, "No such disk"),
    SnapshotNotFound => ("snapshot_not_found", NOT_FOUND, "No such snapshot"),
    JobNotFound => ("job_not_found", NOT_FOUND, "No such job"),
    TemplateNotFound => ("template_not_found", NOT_FOUND, "No such template"),
    ScheduleNotFound => ("schedule_not_found", NOT_FOUND, "No such schedule"),
    RunNotFound => ("run_not_found", NOT_FOUND, "No such schedule run"),
    TokenNotFound => ("token_not_found", NOT_FOUND, "No such token"),
    NameTaken => ("name_taken", CONFLICT, "The name is already in use"),
    VmRunning => ("vm_running", CONFLICT, "The VM is running"),
    VmNotReady => ("vm_not_ready", CONFLICT, "The VM is not ready for this operation"),
    VmBusy => ("vm_busy", CONFLICT, "Jobs are still working on the VM's files"),
    VmHasNoDisks => ("vm_has_no_disks", CONFLICT, "The VM has no disks"),
    GuestAgentUnavailable => ("guest_agent_unavailable", CONFLICT, "The VM has no guest-agent socket to freeze its file systems with"),
    QuiesceFailed => ("quiesce_failed", CONFLICT, "The guest's file systems could not be frozen"),
    ThawFailed => ("thaw_failed", CONFLICT, "The guest's file systems may still be frozen: they could not be thawed"),
    DiskNotReady => ("disk_not_ready", CONFLICT, "The disk is not ready for this operation"),
    DiskShrinkRefused => ("disk_shrink_refused", CONFLICT, "Disks can only grow"),
    SnapshotNotReady => ("snapshot_not_ready", CONFLICT, "The snapshot is not ready for this operation"),
    SnapshotBusy => ("snapshot_busy", CONFLICT, "Another job is using the snapshot"),
    HasDependents => ("has_dependents", CONFLICT, "Linked clones read the files this would change"),
    DiskNotLinked => ("disk_not_linked", CONFLICT, "The disk is not a linked clone"),
    ScheduleBusy => ("schedule_busy", CONFLICT, "A run of the schedule is still in progress"),
    JobNotCancellable => ("job_not_cancellable", CONFLICT, "The job can no longer be cancelled"),
    RuntimeMismatch => ("runtime_mismatch", CONFLICT, "The VM's QEMU does not read the chains strata records"),
    ImageFormatMismatch => ("image_format_mismatch", UNPROCESSABLE_ENTITY, "The image is not in the declared format"),
    ImageHasBackingFile => ("image_has_backing_file", UNPROCESSABLE_ENTITY, "The image names a backing file"),
    ImageHasDataFile => ("image_has_data_file", UNPROCESSABLE_ENTITY, "The image uses an external data file"),
    ImageEncrypted => ("image_encrypted", UNPROCESSABLE_ENTITY, "The image is encrypted"),
    ImageTooLarge => ("image_too_large", UNPROCESSABLE_ENTITY, "The image's virtual size is above the limit"),
    ImageTruncated => ("image_truncated", UNPROCESSABLE_ENTITY, "The image is truncated"),
    ImageCorrupt => ("image_corrupt", UNPROCESSABLE_ENTITY, "The image is corrupt"),
    ImageInvalid => ("image_invalid", UNPROCESSABLE_ENTITY, "The image is not valid"),
    QmpUnavailable => ("qmp_unavailable", UNPROCESSABLE_ENTITY, "The socket does not answer as a QEMU monitor"),
    InsufficientStorage => ("insufficient_storage", INSUFFICIENT_STORAGE, "Not enough free space for the operation"),
    RequestTimeout => ("request_timeout", REQUEST_TIMEOUT, "The request took too long"),
    ImportsBusy => ("imports_busy", SERVICE_UNAVAILABLE, "Every import slot is in use; try again later"),
    NotReady => ("not_ready", SERVICE_UNAVAILABLE, "The service is not ready"),
    Internal => ("internal_error", INTERNAL_SERVER_ERROR, "Internal error"),
    QemuFailed => ("qemu_failed", INTERNAL_SERVER_ERROR, "A qemu-img operation failed"),
    Interrupted => ("interrupted", INTERNAL_SERVER_ERROR, "The job could not be resumed"),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An answer meant for the client, with optional extension members.
    #[error("{detail}")]
    Problem {
        code: ErrorCode,
        detail: String,
        extra: Option<serde_json::Value>,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// Anything but a refusal from QEMU: a lost connection, a timeout, an answer that
    /// does not fit. What QEMU did is not known.
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    /// QEMU answered a graph-changing command with an error: it did not happen.
    #[error("QEMU refused: {0}")]
    QemuRefused(QmpError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn problem(code: ErrorCode, detail: impl Into<String>) -> Self {
        Error::Problem {
            code,
            detail: detail.into(),
            extra: None,
        }
    }

    pub fn with_extra(
        code: ErrorCode,
        detail: impl Into<String>,
        extra: serde_json::Value,
    ) -> Self {
        Error::Problem {
            code,
            detail: detail.into(),
            extra: Some(extra),
        }
    }

    pub fn validation(detail: impl Into<String>) -> Self {
        Self::problem(ErrorCode::ValidationFailed, detail)
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Problem { code, .. } => *code,
            Error::Qemu(QemuError::Cancelled) => ErrorCode::Internal,
            _ if self.is_out_of_space() => ErrorCode::InsufficientStorage,
            Error::Qemu(_) | Error::Qmp(_) | Error::QemuRefused(_) => ErrorCode::QemuFailed,
            _ => ErrorCode::Internal,
        }
    }

    /// QEMU refused the command that would have changed its graph: nothing happened
    /// (unlike a lost connection or a timeout, after which nothing is known).
    pub fn is_refused_by_qemu(&self) -> bool {
        matches!(self, Error::QemuRefused(_))
    }

    /// `QemuRefused` for QEMU's own error answer, else what nothing can be concluded from.
    pub fn from_graph_change(e: QmpError) -> Self {
        match e {
            QmpError::Command { .. } => Error::QemuRefused(e),
            other => Error::Qmp(other),
        }
    }

    /// The same failure told to another party to it (the other transactions of a
    /// group commit): of the same kind, so a full disk still answers 507.
    pub fn shared(&self) -> Error {
        if self.is_out_of_space() {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                self.to_string(),
            ))
        } else {
            Error::Internal(self.to_string())
        }
    }

    /// A write failed because a file system is full: SQLite's `SQLITE_FULL` (13), an
    /// `ENOSPC` from a file write, or qemu-img saying so. The client gets
    /// `507 insufficient_storage`, not a 500: freeing space fixes it.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            Error::Qemu(e) => e.is_out_of_space(),
            Error::Io(e) => is_enospc(e),
            Error::Database(sqlx::Error::Io(e)) => is_enospc(e),
            Error::Database(sqlx::Error::Database(db)) => {
                // Extended result codes keep the primary code in the low byte.
                db.code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .is_some_and(|c| c & 0xff == SQLITE_FULL)
            }
            _ => false,
        }
    }
}

/// SQLite's primary result code for "database or disk is full".
const SQLITE_FULL: i32 = 13;

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull
}

impl From<crate::domain::plan::PlanError> for Error {
    fn from(e: crate::domain::plan::PlanError) -> Self {
        Error::Internal(format!("inconsistent volume tree: {e}"))
    }
}
