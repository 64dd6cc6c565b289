//! The qemu-img runner (this module), the native writer of empty qcow2 images
//! (`qcow2`: a snapshot's overlays and new disks, without a process each), the QMP
//! client for running VMs (`qmp`) and the guest-agent client that freezes and thaws
//! their file systems (`guest_agent`). Every qemu-img call names its formats
//! explicitly (`-f`, `-F`, `-O`) so qemu-img never probes one, reads `--output=json`
//! into typed structs, runs under a timeout, dies with the service (PR_SET_PDEATHSIG)
//! and is killed when its job is cancelled. Knows nothing of HTTP or the database.

pub mod children;
pub mod guest_agent;
pub mod qcow2;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        program: String,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("{program} {args} did not finish within {seconds} s")]
    Timeout {
        program: String,
        args: String,
        seconds: u64,
    },
    /// Killed by a signal strata did not send (the OOM killer, an operator): the
    /// file it wrote may be half-written, and the step can be tried again.
    #[error("{program} {args} was killed ({status})")]
    Killed {
        program: String,
        args: String,
        status: String,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("unexpected output from {program}: {message}")]
    Output { program: String, message: String },
}

impl QemuError {
    /// qemu-img reports a full file system as "No space left on device".
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, QemuError::Failed { stderr, .. } if stderr.contains("No space left"))
    }

    /// Another process holds the image's lock (`Failed to get "write" lock`, or a
    /// shared one).
    pub fn is_image_locked(&self) -> bool {
        matches!(self, QemuError::Failed { stderr, .. } if stderr.contains("Failed to get") && stderr.contains("lock"))
    }
}

/// `qemu-img info --output=json` (the fields strata reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    #[serde(default)]
    pub actual_size: Option<u64>,
    #[serde(default)]
    pub cluster_size: Option<u64>,
    #[serde(default)]
    pub backing_filename: Option<String>,
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    #[serde(default)]
    pub dirty_flag: Option<bool>,
    /// Format details; for qcow2, `data.data-file` names an external data file.
    #[serde(default)]
    pub format_specific: Option<serde_json::Value>,
}

impl ImageInfo {
    /// The external data file a qcow2 image names, if any.
    pub fn data_file(&self) -> Option<String> {
        let data = self.format_specific.as_ref()?.get("data")?;
        data.get("data-file")
            .and_then(|f| f.as_str())
            .map(str::to_owned)
    }
}

/// Resource limits for qemu-img reading a file nobody vouches for (an import), as
/// OpenStack runs `qemu-img info` under prlimit: a crafted header must not be able to
/// spin the CPU or balloon memory on the host.
#[derive(Debug, Clone, Copy)]
pub struct UntrustedLimits {
    pub cpu_seconds: u64,
    pub address_space_bytes: u64,
}

impl Default for UntrustedLimits {
    fn default() -> Self {
        Self {
            cpu_seconds: 30,
            address_space_bytes: 1 << 30,
        }
    }
}

/// `qemu-img check --output=json`; counters are absent when zero.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    #[serde(default)]
    pub corruptions: u64,
    #[serde(default)]
    pub leaks: u64,
    #[serde(default)]
    pub check_errors: u64,
}

/// Where the binaries are and how long each kind of call may take.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub qemu_img: PathBuf,
    /// Limit for calls that only touch metadata (create, info, repoint).
    pub quick_timeout: Duration,
    /// Limit for calls that copy data (commit, stream).
    pub copy_timeout: Duration,
    /// Put in every child's environment (see `children`), so a later start finds and
    /// kills any child this process left behind.
    pub child_tag: Option<String>,
    /// The volumes' file system takes `O_DIRECT` writes (ext4, xfs; not tmpfs): a
    /// full copy then writes around the page cache (see `convert`).
    pub direct_io: bool,
}

/// How long a call waits for an image another process holds locked.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Reports the fraction done (0.0..=1.0) of a data-copying call.
pub type Progress<'a> = &'a (dyn Fn(f32) + Send + Sync);

impl Qemu {
    pub fn new(qemu_img: PathBuf, copy_timeout: Duration) -> Self {
        Self {
            qemu_img,
            quick_timeout: Duration::from_secs(120),
            copy_timeout,
            child_tag: None,
            direct_io: false,
        }
    }

    /// Write full copies with `O_DIRECT` (see `direct_io`).
    pub fn with_direct_io(mut self, direct_io: bool) -> Self {
        self.direct_io = direct_io;
        self
    }

    /// Tag every child with `tag` (the data directory): see `children::reap_orphans`.
    pub fn with_child_tag(mut self, tag: String) -> Self {
        self.child_tag = Some(tag);
        self
    }

    /// Copy `top`'s clusters (and those of any layer between) into `base`, keeping
    /// `top` as it is (`-d`): it is removed later, after the metadata switch.
    pub async fn commit(
        &self,
        top: &Path,
        base: &Path,
        cancel: Option<&watch::Receiver<bool>>,
        progress: Option<Progress<'_>>,
    ) -> Result<(), QemuError> {
        let args = ["commit", "-p", "-f", "qcow2", "-d", "-b"]
            .map(String::from)
            .into_iter()
            .chain([path_arg(base), path_arg(top)]);
        self.run(
            &args.collect::<Vec<_>>(),
            self.copy_timeout,
            cancel,
            progress,
        )
        .await
        .map(drop)
    }

    /// Write `target`, a new standalone qcow2 file with what the chain topped by
    /// `source` shows. Sparse: clusters reading as zeros are not allocated. `compress`
    /// compresses the clusters written (for exports).
    pub async fn convert(
        &self,
        source: &Path,
        target: &Path,
        compress: bool,
        cancel: Option<&watch::Receiver<bool>>,
        progress: Option<Progress<'_>>,
    ) -> Result<(), QemuError> {
        let mut args = ["convert", "-p", "-f", "qcow2", "-O", "qcow2"]
            .map(String::from)
            .to_vec();
        if compress {
            args.push("-c".into());
        } else if self.direct_io {
            // The copy is fsynced before anything records it. Through the page cache,
            // its gigabytes are copied twice and then flushed at that fsync in one
            // burst; written with O_DIRECT (`-t none`) they reach the disk as they go,
            // and the copy beats `qemu-img convert` + `sync` instead of trailing it.
            args.extend(["-t".into(), "none".into()]);
        }
        args.extend([path_arg(source), path_arg(target)]);
        self.run(&args, self.copy_timeout, cancel, progress)
            .await
            .map(drop)
    }

    /// Safe rebase: copy into `volume` what differs between its backing chain and the new
    /// backing (`None`: everything, making it standalone), then repoint it.
    pub async fn stream(
        &self,
        volume: &Path,
        backing: Option<&str>,
        cancel: Option<&watch::Receiver<bool>>,
        progress: Option<Progress<'_>>,
    ) -> Result<(), QemuError> {
        let mut args = ["rebase", "-p", "-f", "qcow2"].map(String::from).to_vec();
        match backing {
            Some(name) => args.extend(["-b".into(), name.into(), "-F".into(), "qcow2".into()]),
            None => args.extend(["-b".into(), String::new()]),
        }
        args.push(path_arg(volume));
        self.run(&args, self.copy_timeout, cancel, progress)
            .await
            .map(drop)
    }

    /// Unsafe rebase: rewrite only the backing pointer (the caller knows both backings
    /// show the same content).
    pub async fn repoint(&self, volume: &Path, backing: &str) -> Result<(), QemuError> {
        let args = ["rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2"]
            .map(String::from)
            .into_iter()
            .chain([path_arg(volume)]);
        self.run(&args.collect::<Vec<_>>(), self.quick_timeout, None, None)
            .await
            .map(drop)
    }

    pub async fn resize(&self, volume: &Path, size_bytes: u64) -> Result<(), QemuError> {
        let args = vec![
            "resize".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            path_arg(volume),
            size_bytes.to_string(),
        ];
        self.run(&args, self.quick_timeout, None, None)
            .await
            .map(drop)
    }

    /// Header facts of one file (without following its backing chain).
    pub async fn info(&self, path: &Path) -> Result<ImageInfo, QemuError> {
        let args = ["info", "--output=json", "-f", "qcow2"]
            .map(String::from)
            .into_iter()
            .chain([path_arg(path)]);
        let out = self
            .run(&args.collect::<Vec<_>>(), self.quick_timeout, None, None)
            .await?;
        serde_json::from_slice(&out).map_err(|e| self.output_error(e))
    }

    /// The byte ranges `path` itself maps (data or zero clusters of its own, not of its
    /// backing chain), as its file on disk says now: read with `-U`, so it works on a
    /// file a running VM's QEMU holds open, and sees only what QEMU has written out of
    /// its caches. Sorted, adjacent ranges joined.
    pub async fn own_ranges(&self, path: &Path) -> Result<Vec<(u64, u64)>, QemuError> {
        #[derive(Deserialize)]
        struct Extent {
            start: u64,
            length: u64,
            depth: u64,
            present: bool,
        }
        let args = ["map", "-U", "--output=json", "-f", "qcow2"]
            .map(String::from)
            .into_iter()
            .chain([path_arg(path)]);
        let out = self
            .run(&args.collect::<Vec<_>>(), self.quick_timeout, None, None)
            .await?;
        let extents: Vec<Extent> =
            serde_json::from_slice(&out).map_err(|e| self.output_error(e))?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for extent in extents.iter().filter(|e| e.present && e.depth == 0) {
            let end = extent.start + extent.length;
            match ranges.last_mut() {
                Some(last) if last.1 == extent.start => last.1 = end,
                _ => ranges.push((extent.start, end)),
            }
        }
        Ok(ranges)
    }

    /// Consistency check; leaks alone (exit 3) are reported, not treated as failure.
    pub async fn check(&self, path: &Path) -> Result<CheckReport, QemuError> {
        let args = ["check", "--output=json", "-f", "qcow2"]
            .map(String::from)
            .into_iter()
            .chain([path_arg(path)]);
        let out = self
            .run_limited(
                &args.collect::<Vec<_>>(),
                self.copy_timeout,
                &[0, 2, 3],
                None,
            )
            .await?;
        serde_json::from_slice(&out).map_err(|e| self.output_error(e))
    }

    /// `qemu-img info` of an untrusted file, read as the declared `format` only (never
    /// probed), under `limits`.
    pub async fn info_untrusted(
        &self,
        path: &Path,
        format: &str,
        limits: UntrustedLimits,
    ) -> Result<ImageInfo, QemuError> {
        let args = vec![
            "info".into(),
            "--output=json".into(),
            "-f".into(),
            format.into(),
            path_arg(path),
        ];
        let out = self
            .run_limited(&args, self.quick_timeout, &[0], Some(limits))
            .await?;
        serde_json::from_slice(&out).map_err(|e| self.output_error(e))
    }

    /// Bytes a qcow2 copy of the untrusted file would take (`qemu-img measure`): what an
    /// import writes, whatever the file's own size (clusters may be shared in a crafted
    /// file, making the copy far larger than the upload).
    pub async fn measure_untrusted(
        &self,
        path: &Path,
        format: &str,
        limits: UntrustedLimits,
    ) -> Result<u64, QemuError> {
        #[derive(Deserialize)]
        struct Measure {
            required: u64,
        }
        let args = vec![
            "measure".into(),
            "--output=json".into(),
            "-f".into(),
            format.into(),
            "-O".into(),
            "qcow2".into(),
            path_arg(path),
        ];
        let out = self
            .run_limited(&args, self.quick_timeout, &[0], Some(limits))
            .await?;
        let measure: Measure = serde_json::from_slice(&out).map_err(|e| self.output_error(e))?;
        Ok(measure.required)
    }

    /// `qemu-img check` of an untrusted qcow2 file under `limits`.
    pub async fn check_untrusted(
        &self,
        path: &Path,
        limits: UntrustedLimits,
    ) -> Result<CheckReport, QemuError> {
        let args = ["check", "--output=json", "-f", "qcow2"]
            .map(String::from)
            .into_iter()
            .chain([path_arg(path)])
            .collect::<Vec<_>>();
        let out = self
            .run_limited(&args, self.quick_timeout, &[0, 2, 3], Some(limits))
            .await?;
        serde_json::from_slice(&out).map_err(|e| self.output_error(e))
    }

    /// Write `target`, a new qcow2 file with the content of the untrusted `source` read
    /// as `format` (an import, after its header and `info`/`check` passed), with its
    /// address space capped (no CPU cap: a large legitimate image takes a while; the
    /// copy timeout bounds it).
    pub async fn import(
        &self,
        source: &Path,
        format: &str,
        target: &Path,
        cancel: Option<&watch::Receiver<bool>>,
        progress: Option<Progress<'_>>,
    ) -> Result<(), QemuError> {
        let args = vec![
            "convert".into(),
            "-p".into(),
            "-f".into(),
            format.into(),
            "-O".into(),
            "qcow2".into(),
            path_arg(source),
            path_arg(target),
        ];
        let limits = UntrustedLimits {
            cpu_seconds: libc::RLIM_INFINITY,
            address_space_bytes: 4 << 30,
        };
        self.run_child(
            &args,
            self.copy_timeout,
            cancel,
            progress,
            Some(limits),
            &[0],
        )
        .await
        .map(drop)
    }

    /// Repair leaked clusters: what an interrupted qemu-img leaves in the file it wrote.
    pub async fn repair_leaks(&self, path: &Path) -> Result<(), QemuError> {
        let args = ["check", "-q", "-r", "leaks", "-f", "qcow2"]
            .map(String::from)
            .into_iter()
            .chain([path_arg(path)]);
        self.run_limited(&args.collect::<Vec<_>>(), self.copy_timeout, &[0, 3], None)
            .await
            .map(drop)
    }

    fn output_error(&self, e: serde_json::Error) -> QemuError {
        QemuError::Output {
            program: self.qemu_img.display().to_string(),
            message: e.to_string(),
        }
    }

    async fn run_limited(
        &self,
        args: &[String],
        timeout: Duration,
        ok: &[i32],
        limits: Option<UntrustedLimits>,
    ) -> Result<Vec<u8>, QemuError> {
        self.run_child(args, timeout, None, None, limits, ok).await
    }

    /// Run qemu-img, feeding `-p` progress lines to `progress` and killing the child on
    /// cancel or timeout.
    async fn run(
        &self,
        args: &[String],
        timeout: Duration,
        cancel: Option<&watch::Receiver<bool>>,
        progress: Option<Progress<'_>>,
    ) -> Result<Vec<u8>, QemuError> {
        self.run_child(args, timeout, cancel, progress, None, &[0])
            .await
    }

    /// The one way a child runs. Exit codes in `ok` count as success.
    ///
    /// An image another process holds locked is waited for (up to `LOCK_WAIT`): after a
    /// kill -9, the previous run's qemu-img may still be exiting (its environment is
    /// gone, so `children::reap_orphans` cannot see it, while its files, and their
    /// locks, are not closed yet).
    async fn run_child(
        &self,
        args: &[String],
        timeout: Duration,
        cancel: Option<&watch::Receiver<bool>>,
        progress: Option<Progress<'_>>,
        limits: Option<UntrustedLimits>,
        ok: &[i32],
    ) -> Result<Vec<u8>, QemuError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match self
                .run_once(args, timeout, cancel, progress, limits, ok)
                .await
            {
                Err(e) if e.is_image_locked() && std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "the image is locked by another process; waiting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                result => return result,
            }
        }
    }

    /// One run. A child stopped on cancel or timeout is killed *and waited for* before
    /// this returns: the caller goes on to repair or remove the file it wrote, which
    /// must not race a dying writer that still holds the image lock.
    async fn run_once(
        &self,
        args: &[String],
        timeout: Duration,
        cancel: Option<&watch::Receiver<bool>>,
        progress: Option<Progress<'_>>,
        limits: Option<UntrustedLimits>,
        ok: &[i32],
    ) -> Result<Vec<u8>, QemuError> {
        let mut child = self.spawn_limited(args, limits)?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf).await;
            buf
        });
        let mut cancel = cancel.cloned();
        let ended = {
            let work = async {
                let mut out = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = stdout.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&chunk[..n]);
                    if let (Some(report), Some(fraction)) = (progress, last_progress(&out)) {
                        report(fraction);
                    }
                }
                let status = child.wait().await;
                (out, status)
            };
            let cancelled = async {
                match cancel.as_mut() {
                    Some(rx) => {
                        let _ = rx.wait_for(|c| *c).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                result = tokio::time::timeout(timeout, work) => result.ok(),
                _ = cancelled => None,
            }
        };
        let Some((out, status)) = ended else {
            // `kill` sends SIGKILL and reaps the child.
            let _ = child.kill().await;
            let cancelled = cancel.as_ref().is_some_and(|rx| *rx.borrow());
            return Err(if cancelled {
                QemuError::Cancelled
            } else {
                self.timeout_error(args, timeout)
            });
        };
        let status = status.map_err(|source| QemuError::Spawn {
            program: self.program(),
            source,
        })?;
        let stderr = stderr_task.await.unwrap_or_default();
        match status.code() {
            Some(code) if ok.contains(&code) => Ok(out),
            _ => Err(self.failed(args, status, &stderr)),
        }
    }

    fn spawn_limited(
        &self,
        args: &[String],
        limits: Option<UntrustedLimits>,
    ) -> Result<tokio::process::Child, QemuError> {
        let mut command = Command::new(&self.qemu_img);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches strata, which stops
            // its children in order, instead of killing qemu-img mid-write.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(tag) = &self.child_tag {
            command.env(children::CHILD_TAG_VAR, tag);
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl, getppid and setrlimit are async-signal-safe and touch no memory
        // of the parent. PDEATHSIG asks the kernel to kill qemu-img if strata dies (e.g.
        // kill -9), so a restarted service never races an orphaned writer on the same
        // file. It is tied to the thread that forks, which is a runtime worker living as
        // long as the process.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // strata died between the fork and the request: the signal will never
                // come, so do not start at all.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other(
                        "the parent exited before qemu-img started",
                    ));
                }
                // setrlimit is async-signal-safe too; past the CPU limit the kernel
                // kills the child (SIGKILL after SIGXCPU), past the address space
                // limit its allocations fail.
                if let Some(limits) = limits {
                    for (resource, value) in [
                        (libc::RLIMIT_CPU, limits.cpu_seconds),
                        (libc::RLIMIT_AS, limits.address_space_bytes),
                    ] {
                        let limit = libc::rlimit {
                            rlim_cur: value as libc::rlim_t,
                            rlim_max: value as libc::rlim_t,
                        };
                        if libc::setrlimit(resource, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
        tracing::debug!(program = %self.qemu_img.display(), ?args, "running");
        command.spawn().map_err(|source| QemuError::Spawn {
            program: self.program(),
            source,
        })
    }

    fn program(&self) -> String {
        self.qemu_img.display().to_string()
    }

    fn failed(
        &self,
        args: &[String],
        status: std::process::ExitStatus,
        stderr: &[u8],
    ) -> QemuError {
        use std::os::unix::process::ExitStatusExt;
        if status.signal().is_some() {
            return QemuError::Killed {
                program: self.program(),
                args: args.join(" "),
                status: status.to_string(),
            };
        }
        QemuError::Failed {
            program: self.program(),
            args: args.join(" "),
            status: status.to_string(),
            stderr: String::from_utf8_lossy(stderr).trim().to_owned(),
        }
    }

    fn timeout_error(&self, args: &[String], timeout: Duration) -> QemuError {
        QemuError::Timeout {
            program: self.program(),
            args: args.join(" "),
            seconds: timeout.as_secs(),
        }
    }
}

/// Whether the sorted, disjoint ranges `held` cover every range of `needed` (any order).
pub fn ranges_cover(held: &[(u64, u64)], needed: &[(u64, u64)]) -> bool {
    needed.iter().all(|&(start, end)| {
        let mut at = start;
        for &(from, to) in held {
            if from > at {
                break;
            }
            if to > at {
                at = to;
            }
            if at >= end {
                break;
            }
        }
        at >= end
    })
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// The newest `(NN.NN/100%)` figure that qemu-img's `-p` printed so far.
pub fn last_progress(output: &[u8]) -> Option<f32> {
    let text = String::from_utf8_lossy(output);
    let last = text
        .rsplit('(')
        .find_map(|tail| tail.split_once("/100%").map(|(n, _)| n))?;
    last.trim()
        .parse::<f32>()
        .ok()
        .map(|p| (p / 100.0).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_takes_the_newest_figure() {
        assert_eq!(
            last_progress(b"    (0.00/100%)\r    (12.50/100%)\r"),
            Some(0.125)
        );
        assert_eq!(last_progress(b"    (100.00/100%)\r"), Some(1.0));
        assert_eq!(last_progress(b""), None);
        assert_eq!(last_progress(b"    (12.5"), None);
    }

    #[test]
    fn ranges_cover_needs_every_byte_of_every_needed_range() {
        let held = [(0, 4), (4, 8), (16, 20)];
        assert!(ranges_cover(&held, &[(0, 8), (17, 19), (5, 5)]));
        assert!(ranges_cover(&held, &[]));
        assert!(!ranges_cover(&held, &[(6, 10)]));
        assert!(!ranges_cover(&held, &[(12, 14)]));
        assert!(!ranges_cover(&[], &[(0, 1)]));
        assert!(!ranges_cover(&held, &[(0, 8), (15, 20)]));
    }

    #[test]
    fn check_report_counters_default_to_zero() {
        let report: CheckReport = serde_json::from_str(r#"{"image-end-offset": 1, "total-clusters": 2, "check-errors": 0, "filename": "x", "format": "qcow2"}"#).unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0));
    }
}
