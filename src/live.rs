//! What strata knows of running VMs outside jobs: where their sockets may live
//! (`--runtime-dir`), the checks a socket passes before it is recorded, and the outcome
//! of the last contact with each VM's monitor. Live jobs (issue 10) reach QEMU through
//! `qemu::qmp` and `qemu::guest_agent`; requests reach it only through here.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::domain::Uuid;
use crate::error::{Error, ErrorCode, Result};
use crate::qemu::qmp::{Qmp, QmpError};

/// How long a monitor may take to greet and negotiate when a socket is checked.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Live {
    /// `--runtime-dir`, canonical; live operations are off without it.
    runtime_dir: Option<PathBuf>,
    /// Per VM: whether the last contact with its monitor succeeded (absent: no contact
    /// since this process started).
    contacts: Mutex<HashMap<Uuid, bool>>,
}

impl Live {
    /// Fails when `--runtime-dir` is given but cannot be resolved.
    pub fn new(runtime_dir: Option<&Path>) -> std::io::Result<Self> {
        Ok(Self {
            runtime_dir: runtime_dir.map(std::fs::canonicalize).transpose()?,
            contacts: Mutex::new(HashMap::new()),
        })
    }

    /// `field`'s socket, canonical, once it lies inside `--runtime-dir` and is a unix
    /// socket (`socket_refused` otherwise).
    pub fn check_socket(&self, field: &str, path: &str) -> Result<String> {
        let refuse =
            |why: String| Error::problem(ErrorCode::SocketRefused, format!("{field}: {why}"));
        let Some(dir) = &self.runtime_dir else {
            return Err(refuse(
                "live operations are off: start strata with --runtime-dir and put the VMs' sockets there".into(),
            ));
        };
        if !Path::new(path).is_absolute() {
            return Err(refuse(format!("{path:?} is not an absolute path")));
        }
        // Canonical, so neither `..` nor a symbolic link leads outside the directory.
        let resolved = std::fs::canonicalize(path)
            .map_err(|e| refuse(format!("{path:?} cannot be opened: {e}")))?;
        if !resolved.starts_with(dir) {
            return Err(refuse(format!(
                "{path:?} is outside --runtime-dir ({})",
                dir.display()
            )));
        }
        let kind = std::fs::metadata(&resolved)
            .map_err(|e| refuse(format!("{path:?} cannot be opened: {e}")))?
            .file_type();
        if !kind.is_socket() {
            return Err(refuse(format!("{path:?} is not a unix socket")));
        }
        resolved
            .into_os_string()
            .into_string()
            .map_err(|_| refuse(format!("{path:?} is not valid UTF-8")))
    }

    /// Greet the VM's monitor: its QEMU version, or `qmp_unavailable` when nothing
    /// answers or what answers is not QEMU's monitor.
    pub async fn probe_qmp(&self, vm: Uuid, socket: &str) -> Result<String> {
        let answer = Qmp::connect(Path::new(socket), PROBE_TIMEOUT).await;
        self.record_contact(vm, answer.is_ok());
        let qmp = answer.map_err(|e| {
            let why = match e {
                QmpError::NotQmp(_) => format!("{socket} does not speak QMP ({e})"),
                other => format!("{socket} does not answer as a QEMU monitor: {other}"),
            };
            Error::problem(ErrorCode::QmpUnavailable, why)
        })?;
        Ok(qmp.version().to_string())
    }

    pub fn record_contact(&self, vm: Uuid, reached: bool) {
        self.contacts.lock().expect("contacts").insert(vm, reached);
    }

    /// Whether the last contact with the VM's monitor succeeded (None: not tried since
    /// this process started).
    pub fn last_contact(&self, vm: Uuid) -> Option<bool> {
        self.contacts.lock().expect("contacts").get(&vm).copied()
    }

    /// Forget a VM that stopped or went away.
    pub fn forget(&self, vm: Uuid) {
        self.contacts.lock().expect("contacts").remove(&vm);
    }
}
