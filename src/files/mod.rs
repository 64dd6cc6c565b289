//! The data directory's files outside jobs: where volumes, uploads and exports live
//! and how much room they take (this module), template exports (`exports`), staged
//! uploads (`uploads`), and the inspection of an uploaded image (`intake`), the one
//! file work a request does itself, because an import must be refused before it is
//! accepted. Jobs do every other file change.

pub mod exports;
pub mod intake;
pub mod uploads;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::domain::Uuid;
use crate::domain::plan::DiskGraph;
use crate::error::{Error, ErrorCode};
use crate::qemu::Qemu;
use crate::store::Db;

/// What file work outside jobs needs: the data directory, the reserve a copy must
/// leave free, qemu-img and the records.
#[derive(Clone)]
pub struct Files {
    volumes_dir: PathBuf,
    reserved_bytes: u64,
    qemu: Qemu,
    db: Db,
}

impl Files {
    pub fn new(volumes_dir: PathBuf, reserved_bytes: u64, qemu: Qemu, db: Db) -> Self {
        Self {
            volumes_dir,
            reserved_bytes,
            qemu,
            db,
        }
    }

    /// The directory every volume file sits in.
    pub fn volumes_dir(&self) -> &Path {
        &self.volumes_dir
    }

    pub fn volume_path(&self, volume: Uuid) -> PathBuf {
        volume_path(&self.volumes_dir, volume)
    }

    /// Free space a copy must leave untouched on the data file system
    /// (`--reserved-space`).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    /// Refuse with `507 insufficient_storage` unless `needed` bytes are free on the
    /// volumes' file system.
    pub fn require_free(&self, needed: u64) -> crate::error::Result<()> {
        let available = available_bytes(&self.volumes_dir)?;
        if available < needed {
            return Err(insufficient_storage(needed, available));
        }
        Ok(())
    }

    /// Refuse unless a copy of up to `bytes` fits and leaves the reserve free.
    pub fn require_room_for_copy(&self, bytes: u64) -> crate::error::Result<()> {
        self.require_free(bytes.saturating_add(self.reserved_bytes))
    }
}

/// Every volume sits in one directory, so a backing reference is just a file name and
/// the data directory can be moved or mounted elsewhere.
pub fn volume_file_name(volume: Uuid) -> String {
    format!("{}.qcow2", volume.hyphenated())
}

pub fn volume_path(volumes_dir: &Path, volume: Uuid) -> PathBuf {
    volumes_dir.join(volume_file_name(volume))
}

/// Bytes a file occupies on disk (0 when it is missing).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// How long views may show a file's allocation before measuring it again.
const SHOWN_ALLOCATION_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// Files whose allocation is remembered before the figures nothing holds and that are
/// past their age are forgotten.
const SHOWN_ALLOCATIONS: usize = 100_000;

/// A file's allocation as views show it: measured at most once every
/// `SHOWN_ALLOCATION_AGE`. A read of a VM stats each layer of each disk's chain, which
/// cost more than the rest of a read served from memory; a figure a second old is as
/// good to a reader (a guest's writes move it all the time). Never for planning: the
/// planner measures with `allocated_bytes`.
///
/// One per file (see `allocation`): a view the read model keeps holds those of its
/// files, so a read finds each figure without a look-up by path (which, over a page
/// of 100 VMs and 1,100 files, cost a third of the page).
#[derive(Debug)]
pub struct Allocation {
    path: PathBuf,
    /// When `bytes` was measured, in nanoseconds since `epoch` (0: never).
    measured_at: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl Allocation {
    /// The figure, measured again if it is older than `SHOWN_ALLOCATION_AGE`.
    pub fn shown(&self) -> u64 {
        use std::sync::atomic::Ordering;
        let now = since_epoch();
        if self.fresh(now) {
            return self.bytes.load(Ordering::Relaxed);
        }
        let bytes = allocated_bytes_in_dir(&self.path);
        // Two readers measuring at once both store a figure just measured.
        self.bytes.store(bytes, Ordering::Relaxed);
        self.measured_at.store(now, Ordering::Release);
        bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fresh(&self, now: u64) -> bool {
        let at = self.measured_at.load(std::sync::atomic::Ordering::Acquire);
        at != 0 && now.saturating_sub(at) < SHOWN_ALLOCATION_AGE.as_nanos() as u64
    }
}

/// Nanoseconds since the first call (never 0).
fn since_epoch() -> u64 {
    use std::sync::LazyLock;
    use std::time::Instant;
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    EPOCH.elapsed().as_nanos() as u64 + 1
}

/// The one `Allocation` of the file at `path`.
pub fn allocation(path: &Path) -> std::sync::Arc<Allocation> {
    use std::collections::HashMap;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::{Arc, LazyLock, Mutex};
    struct Known {
        files: HashMap<Box<[u8]>, Arc<Allocation>>,
        /// Size at which the unheld, stale figures are forgotten.
        sweep_at: usize,
    }
    static KNOWN: LazyLock<Mutex<Known>> = LazyLock::new(|| {
        Mutex::new(Known {
            files: HashMap::new(),
            sweep_at: SHOWN_ALLOCATIONS,
        })
    });
    let key = path.as_os_str().as_bytes();
    let mut known = KNOWN.lock().expect("allocations lock");
    if let Some(found) = known.files.get(key) {
        return Arc::clone(found);
    }
    if known.files.len() >= known.sweep_at {
        let now = since_epoch();
        known
            .files
            .retain(|_, kept| Arc::strong_count(kept) > 1 || kept.fresh(now));
        // Held figures stay: sweep again once as many more are known.
        known.sweep_at = SHOWN_ALLOCATIONS.max(2 * known.files.len());
    }
    let made = Arc::new(Allocation {
        path: path.to_owned(),
        measured_at: 0.into(),
        bytes: 0.into(),
    });
    known.files.insert(key.into(), Arc::clone(&made));
    made
}

/// The allocation views show for the file at `path` (see `Allocation`).
pub fn shown_allocation(path: &Path) -> u64 {
    allocation(path).shown()
}

/// `allocated_bytes`, from `stat_in_dir`.
fn allocated_bytes_in_dir(path: &Path) -> u64 {
    stat_in_dir(path).map_or(0, |stat| stat.st_blocks as u64 * 512)
}

/// A file's `stat` (following links), looked up from a descriptor of its directory
/// kept open (`fstatat`), so the kernel resolves one name instead of the whole path:
/// for files in directories that live as long as the service (the volumes, the
/// database's). None when it is missing. Falls back to the path.
///
/// A directory replaced at its path (a file system mounted over it, or it moved and
/// made again) would keep answering through the old descriptor: at most once a second
/// the descriptor is checked against the path and opened again if they differ, and a
/// name the descriptor cannot find is looked up by path too.
pub fn stat_in_dir(path: &Path) -> Option<libc::stat> {
    use std::collections::HashMap;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::sync::{LazyLock, Mutex};
    use std::time::{Duration, Instant};
    struct Dir {
        fd: OwnedFd,
        checked: Instant,
    }
    #[derive(Default)]
    struct Dirs {
        open: HashMap<PathBuf, Dir>,
        /// Descriptors replaced by a fresh one: never closed, so a descriptor read
        /// from the map stays valid (and names the same directory) once the lock is
        /// released.
        retired: Vec<OwnedFd>,
    }
    static DIRS: LazyLock<Mutex<Dirs>> = LazyLock::new(Mutex::default);
    /// Directories kept open (normally two: the volumes and the database's), and
    /// descriptors retired; past either, the path is used.
    const MAX_DIRS: usize = 16;
    const CHECK_EVERY: Duration = Duration::from_secs(1);
    let by_path = |path: &Path| {
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid NUL-terminated path and a writable struct stat.
        (unsafe { libc::stat(c_path.as_ptr(), &mut stat) } == 0).then_some(stat)
    };
    let same_dir = |fd: &OwnedFd, dir: &Path| {
        let mut held: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: an open descriptor and a writable struct stat.
        let held_ok = unsafe { libc::fstat(fd.as_raw_fd(), &mut held) } == 0;
        held_ok
            && by_path(dir)
                .is_some_and(|now| (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino))
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return by_path(path);
    };
    let Ok(name) = std::ffi::CString::new(name.as_bytes()) else {
        return by_path(path);
    };
    let mut guard = DIRS.lock().expect("directories lock");
    let dirs = &mut *guard;
    if let Some(held) = dirs.open.get_mut(dir)
        && held.checked.elapsed() >= CHECK_EVERY
    {
        if same_dir(&held.fd, dir) {
            held.checked = Instant::now();
        } else {
            if dirs.retired.len() >= MAX_DIRS {
                return by_path(path);
            }
            let old = dirs.open.remove(dir).expect("found above");
            dirs.retired.push(old.fd);
        }
    }
    let fd = match dirs.open.get(dir) {
        Some(held) => held.fd.as_raw_fd(),
        None => {
            if dirs.open.len() >= MAX_DIRS {
                return by_path(path);
            }
            let Ok(opened) = std::fs::File::open(dir) else {
                return by_path(path);
            };
            let fd = OwnedFd::from(opened);
            let raw = fd.as_raw_fd();
            let checked = Instant::now();
            dirs.open.insert(dir.to_owned(), Dir { fd, checked });
            raw
        }
    };
    drop(guard);
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open directory descriptor never closed, `name` a valid
    // NUL-terminated string and `stat` a writable struct stat.
    let found = unsafe { libc::fstatat(fd, name.as_ptr(), &mut stat, 0) } == 0;
    if found { Some(stat) } else { by_path(path) }
}

/// Fill the planner's allocation figures from the files.
pub fn measure(volumes_dir: &Path, graphs: &mut [DiskGraph]) {
    for graph in graphs {
        for volume in &mut graph.volumes {
            volume.allocated_bytes = allocated_bytes(&volume_path(volumes_dir, volume.id));
        }
    }
}

/// Bytes available to unprivileged writers on the file system holding `dir`.
pub fn available_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stats a writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// Whether files in `dir` can be opened for `O_DIRECT` writes (tmpfs refuses them).
/// Probed with a file of its own, removed after.
pub fn takes_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt as _;
    let probe = dir.join(".direct-io-probe");
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    opened.is_ok()
}

/// Make the entries of `dir` (a file just created, linked or renamed in it) survive a
/// power cut: fsync of the file alone does not promise its name.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A directory beside the volumes in the data directory (`exports`, `imports`).
pub fn data_subdir(volumes_dir: &Path, name: &str) -> PathBuf {
    volumes_dir
        .parent()
        .map_or_else(|| PathBuf::from(name), |data| data.join(name))
}

/// Where an accepted upload waits for its import job.
pub fn upload_path(volumes_dir: &Path, upload: Uuid) -> PathBuf {
    data_subdir(volumes_dir, "imports").join(format!("{upload}.upload"))
}

/// Bytes the files of a chain hold (a volume and everything below it, across disks):
/// the most a copy of what it shows can take.
pub async fn chain_bytes(
    volumes_dir: &Path,
    conn: &mut sqlx::SqliteConnection,
    top: Uuid,
) -> crate::error::Result<u64> {
    layers_bytes(volumes_dir, conn, top, None).await
}

/// Bytes the files of the layers from `top` down to `stop` (not included; `None`: the
/// whole chain) hold, as the records chain them: the most a merge of those layers
/// copies (the planner's figure, `allocated_bytes` summed over the layers).
pub async fn layers_bytes(
    volumes_dir: &Path,
    conn: &mut sqlx::SqliteConnection,
    top: Uuid,
    stop: Option<Uuid>,
) -> crate::error::Result<u64> {
    Ok(crate::store::vms::volume_chain(conn, top)
        .await?
        .iter()
        .take_while(|v| Some(**v) != stop)
        .map(|v| allocated_bytes(&volume_path(volumes_dir, *v)))
        .sum())
}

/// Build an `insufficient_storage` problem with the figures.
pub fn insufficient_storage(needed: u64, available: u64) -> Error {
    Error::with_extra(
        ErrorCode::InsufficientStorage,
        format!(
            "the operation needs {needed} free bytes on the data file system (including the reserve) but only {available} are available"
        ),
        serde_json::json!({ "needed_bytes": needed, "available_bytes": available }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by review: a directory replaced at its path (moved, made again; or a
    /// mount over it) kept answering through the descriptor of the old one.
    #[test]
    fn a_directory_replaced_at_its_path_is_measured_anew() {
        let root = tempfile::tempdir().unwrap();
        let volumes = root.path().join("volumes");
        std::fs::create_dir(&volumes).unwrap();
        let path = volumes.join("a.qcow2");
        std::fs::write(&path, vec![1u8; 64 * 1024]).unwrap();
        let small = allocated_bytes(&path);
        assert_eq!(allocated_bytes_in_dir(&path), small);
        std::fs::rename(&volumes, root.path().join("old")).unwrap();
        std::fs::create_dir(&volumes).unwrap();
        std::fs::write(&path, vec![1u8; 1024 * 1024]).unwrap();
        let big = allocated_bytes(&path);
        assert!(big > small, "{big} {small}");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(allocated_bytes_in_dir(&path), big);
        // And a name the old directory never had is found by its path at once.
        let fresh = volumes.join("b.qcow2");
        std::fs::write(&fresh, vec![1u8; 128 * 1024]).unwrap();
        assert_eq!(allocated_bytes_in_dir(&fresh), allocated_bytes(&fresh));
    }

    #[test]
    fn a_file_measured_from_its_directory_takes_what_its_path_says() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.qcow2");
        std::fs::write(&path, vec![7u8; 256 * 1024]).unwrap();
        let expected = allocated_bytes(&path);
        assert!(expected >= 256 * 1024, "{expected}");
        assert_eq!(allocated_bytes_in_dir(&path), expected);
        assert_eq!(shown_allocation(&path), expected);
        // One figure per file, whoever asks.
        assert!(std::sync::Arc::ptr_eq(
            &allocation(&path),
            &allocation(&path)
        ));
        assert_eq!(allocation(&path).shown(), expected);
        // A missing file, in a directory already open and in one that does not exist.
        assert_eq!(allocated_bytes_in_dir(&dir.path().join("gone.qcow2")), 0);
        assert_eq!(allocated_bytes_in_dir(&dir.path().join("no/such.qcow2")), 0);
    }
}
