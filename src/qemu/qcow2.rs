//! Native creation of empty qcow2 images (a snapshot's new overlay, or a blank disk),
//! so making one costs a few writes and two fsyncs instead of a `qemu-img` process.
//!
//! [`empty_image_bytes`] is the pure part: the exact bytes `qemu-img create -f qcow2
//! [-u -b NAME -F qcow2] PATH SIZE` (qemu-img 10, default options) writes, checked
//! byte for byte against qemu-img by this module's tests. [`create_overlay`] puts them
//! on disk durably. Nothing else here: reading, checking or changing existing images
//! stays with qemu-img.
//!
//! The layout qemu-img produces with its defaults (64 KiB clusters, version 3,
//! 16-bit refcounts, zlib, no lazy refcounts, no extended L2 entries):
//!
//! | offset            | what                                                           |
//! |-------------------|----------------------------------------------------------------|
//! | 0                 | header (112 bytes), header extensions, backing file name       |
//! | 0x10000           | refcount table: one cluster, entry 0 = 0x20000                 |
//! | 0x20000           | refcount block: refcount 1 for each cluster the file uses      |
//! | 0x30000           | L1 table: `ceil(size / 512 MiB)` zero entries (none if size 0) |
//!
//! The file ends right after the L1 table (`0x30000 + 8 * l1_entries`, not rounded to
//! a cluster); an image of size 0 has no L1 table, `l1_table_offset` 0 and is
//! 0x30000 bytes long.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const CLUSTER_BITS: u32 = 16;
const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
const L2_ENTRIES_PER_TABLE: u64 = CLUSTER_SIZE / 8;
/// The guest bytes one L1 entry maps (through one L2 table): 512 MiB.
const BYTES_PER_L1_ENTRY: u64 = CLUSTER_SIZE * L2_ENTRIES_PER_TABLE;
/// QEMU's `QCOW_MAX_L1_SIZE` (32 MiB of 8-byte entries): it refuses to grow an L1
/// table beyond it, which caps the virtual size at 64 KiB clusters.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// The largest virtual size qemu-img creates at 64 KiB clusters (2 PiB); it refuses
/// anything larger ("The image size is too large for file format 'qcow2'").
pub const MAX_VIRTUAL_SIZE: u64 = MAX_L1_ENTRIES * BYTES_PER_L1_ENTRY;

/// QEMU refuses a longer backing file name ("Could not assign backing file").
pub const MAX_BACKING_NAME_LEN: usize = 1023;

/// qemu-img rounds the virtual size up to whole 512-byte sectors.
const SECTOR_SIZE: u64 = 512;

const REFCOUNT_TABLE_OFFSET: u64 = CLUSTER_SIZE;
const REFCOUNT_BLOCK_OFFSET: u64 = 2 * CLUSTER_SIZE;
const L1_TABLE_OFFSET: u64 = 3 * CLUSTER_SIZE;
/// Header, refcount table and refcount block: the clusters every image has.
const FIXED_CLUSTERS: u64 = 3;

/// `refcount_order` 4: 16-bit refcounts, so one block counts 32768 clusters (2 GiB of
/// file), far more than the 3 + 512 clusters of the largest empty image: one refcount
/// block and a one-cluster refcount table always suffice.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNT_BYTES: u64 = 1 << (REFCOUNT_ORDER - 3);
const _: () = assert!(
    FIXED_CLUSTERS + (MAX_L1_ENTRIES * 8).div_ceil(CLUSTER_SIZE) <= CLUSTER_SIZE / REFCOUNT_BYTES
);

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const QCOW2_VERSION: u32 = 3;
/// The version 3 header up to and including `compression_type` (104 + 1 bytes),
/// padded to a multiple of 8 as the spec requires.
const HEADER_LENGTH: u32 = 112;

const EXTENSION_END: u32 = 0x0000_0000;
const EXTENSION_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXTENSION_FEATURE_NAME_TABLE: u32 = 0x6803_f857;

/// The feature name table qemu 10 writes into every image, in its order: (feature
/// type: 0 incompatible, 1 compatible, 2 autoclear; bit number; name). Each entry is
/// 48 bytes: type, bit, and the name NUL-padded to 46 bytes.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
const FEATURE_NAME_LEN: usize = 46;

/// Why an empty image cannot be described (before any file is touched).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageSpecError {
    #[error(
        "virtual size of {requested} bytes exceeds the qcow2 limit of {MAX_VIRTUAL_SIZE} bytes (2 PiB at 64 KiB clusters)"
    )]
    SizeTooLarge { requested: u64 },
    #[error("backing file name is empty")]
    BackingNameEmpty,
    #[error("backing file name is {len} bytes long; qcow2 allows at most {MAX_BACKING_NAME_LEN}")]
    BackingNameTooLong { len: usize },
    #[error("backing file name contains a NUL byte")]
    BackingNameHasNul,
}

impl From<ImageSpecError> for io::Error {
    fn from(err: ImageSpecError) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, err)
    }
}

/// The exact bytes of an empty qcow2 image of `size_bytes` (rounded up to 512 like
/// qemu-img), backed by `backing` in format qcow2 if given, as `qemu-img create -f
/// qcow2 [-u -b BACKING -F qcow2] PATH SIZE` writes it. `backing` is stored as given:
/// QEMU resolves a relative name against the overlay's directory.
pub fn empty_image_bytes(
    size_bytes: u64,
    backing: Option<&str>,
) -> Result<Vec<u8>, ImageSpecError> {
    if size_bytes > MAX_VIRTUAL_SIZE {
        return Err(ImageSpecError::SizeTooLarge {
            requested: size_bytes,
        });
    }
    if let Some(name) = backing {
        validate_backing_name(name)?;
    }
    // Cannot overflow: MAX_VIRTUAL_SIZE is a multiple of the sector size.
    let virtual_size = size_bytes.next_multiple_of(SECTOR_SIZE);
    let l1_entries = virtual_size.div_ceil(BYTES_PER_L1_ENTRY);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER_SIZE);
    let file_len = L1_TABLE_OFFSET + l1_entries * 8;

    let mut image = header_cluster(virtual_size, l1_entries, backing);

    // Refcount table: its single entry points at the single refcount block.
    let mut refcount_table = vec![0u8; CLUSTER_SIZE as usize];
    put_u64(&mut refcount_table, 0, REFCOUNT_BLOCK_OFFSET);
    image.extend_from_slice(&refcount_table);

    // Refcount block: every cluster the file occupies, the L1 table's last partial
    // cluster included, is referenced once.
    let mut refcount_block = vec![0u8; CLUSTER_SIZE as usize];
    for cluster in 0..FIXED_CLUSTERS + l1_clusters {
        put_u16(&mut refcount_block, (cluster * REFCOUNT_BYTES) as usize, 1);
    }
    image.extend_from_slice(&refcount_block);

    // L1 table: all zero (nothing allocated, every read falls through to the backing
    // file). Written out rather than left sparse, as qemu-img does.
    image.resize(file_len as usize, 0);
    Ok(image)
}

fn validate_backing_name(name: &str) -> Result<(), ImageSpecError> {
    if name.is_empty() {
        // qemu-img: "Expected backing file name, got empty string".
        return Err(ImageSpecError::BackingNameEmpty);
    }
    if name.len() > MAX_BACKING_NAME_LEN {
        return Err(ImageSpecError::BackingNameTooLong { len: name.len() });
    }
    if name.contains('\0') {
        // The name is stored with its length, but QEMU handles it as a C string.
        return Err(ImageSpecError::BackingNameHasNul);
    }
    Ok(())
}

/// The first cluster: header, header extensions (backing format if backed, feature
/// name table, end marker), then the backing file name, not NUL-terminated, right
/// after the end marker; the rest is zero.
fn header_cluster(virtual_size: u64, l1_entries: u64, backing: Option<&str>) -> Vec<u8> {
    let mut cluster = vec![0u8; HEADER_LENGTH as usize];
    cluster[0..4].copy_from_slice(QCOW2_MAGIC);
    put_u32(&mut cluster, 4, QCOW2_VERSION);
    // 8: backing_file_offset and 16: backing_file_size, filled in below.
    put_u32(&mut cluster, 20, CLUSTER_BITS);
    put_u64(&mut cluster, 24, virtual_size);
    // 32: crypt_method 0 (none).
    put_u32(&mut cluster, 36, l1_entries as u32);
    // An image without L1 entries has no L1 table, and qemu records offset 0.
    let l1_offset = if l1_entries == 0 { 0 } else { L1_TABLE_OFFSET };
    put_u64(&mut cluster, 40, l1_offset);
    put_u64(&mut cluster, 48, REFCOUNT_TABLE_OFFSET);
    put_u32(&mut cluster, 56, 1); // refcount_table_clusters
    // 60: nb_snapshots, 64: snapshots_offset, 72: incompatible, 80: compatible and
    // 88: autoclear feature bits all 0.
    put_u32(&mut cluster, 96, REFCOUNT_ORDER);
    put_u32(&mut cluster, 100, HEADER_LENGTH);
    // 104: compression_type 0 (zlib), then padding to 112.

    if backing.is_some() {
        push_extension(&mut cluster, EXTENSION_BACKING_FORMAT, b"qcow2");
    }
    let mut feature_table = Vec::with_capacity(FEATURE_NAMES.len() * (2 + FEATURE_NAME_LEN));
    for (kind, bit, name) in FEATURE_NAMES {
        feature_table.extend_from_slice(&[kind, bit]);
        let mut padded = [0u8; FEATURE_NAME_LEN];
        padded[..name.len()].copy_from_slice(name.as_bytes());
        feature_table.extend_from_slice(&padded);
    }
    push_extension(&mut cluster, EXTENSION_FEATURE_NAME_TABLE, &feature_table);
    push_extension(&mut cluster, EXTENSION_END, &[]);

    if let Some(name) = backing {
        let offset = cluster.len() as u64;
        put_u64(&mut cluster, 8, offset);
        put_u32(&mut cluster, 16, name.len() as u32);
        cluster.extend_from_slice(name.as_bytes());
    }
    cluster.resize(CLUSTER_SIZE as usize, 0);
    cluster
}

/// Appends a header extension: magic, data length, data padded to 8 bytes.
fn push_extension(buf: &mut Vec<u8>, magic: u32, data: &[u8]) {
    buf.extend_from_slice(&magic.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(8), 0);
}

fn put_u16(buf: &mut [u8], offset: usize, value: u16) {
    buf[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
}

fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_be_bytes());
}

/// Creates the empty qcow2 image [`empty_image_bytes`] describes at `path`, durably:
/// the file and its directory entry are on disk before this returns, so the overlay
/// can be referenced (in the database, or as a running VM's new top) right after.
/// Never replaces an existing file (`AlreadyExists`); an invalid size or backing name
/// is refused (`InvalidInput`) before anything is created. On a failure after the
/// file was created, it is removed (best effort) so no half-written image is left.
/// Blocking: call it from `spawn_blocking`.
pub fn create_overlay(path: &Path, size_bytes: u64, backing: Option<&str>) -> io::Result<()> {
    let bytes = empty_image_bytes(size_bytes, backing)?;
    let mut file = OpenOptions::new()
        .write(true)
        // O_EXCL: a name collision must fail, never truncate the file there (which
        // `qemu-img create` does: it opens with O_CREAT and truncates to 0).
        .create_new(true)
        // qemu-img's mode, so these files look like the ones it made.
        .mode(0o644)
        .open(path)?;
    // Every byte is written, zeros too, as qemu-img does: QEMU rewrites the header,
    // refcount and table clusters whole, in place, and a hole there would need new
    // blocks for it. On a full file system that turned the header rewrite of a
    // rollback (`qemu-img rebase -u`) into ENOSPC ("No space left in the file
    // header"), and the stream it undid could not roll back (found by the full-disk
    // test when writing only the blocks that are not zeros was tried).
    let written = file
        .write_all(&bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_parent_dir(path));
    if let Err(err) = written {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(err);
    }
    Ok(())
}

/// fsyncs the directory holding `path`, which makes a new entry in it durable.
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Output};

    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;
    const PIB: u64 = 1 << 50;

    fn run(program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("could not run {program}: {err}"))
    }

    fn run_ok(program: &str, args: &[&str]) -> String {
        let output = run(program, args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{program} {args:?} failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Runs `qemu-img create` the way strata used to and returns its file's bytes, or
    /// its stderr if it refused.
    fn qemu_img_create(
        dir: &Path,
        size_bytes: u64,
        backing: Option<&str>,
    ) -> Result<Vec<u8>, String> {
        let path = dir.join(format!(
            "qemu-img-{size_bytes}-{}.qcow2",
            backing.map_or(0, str::len)
        ));
        let path_arg = path.to_str().unwrap();
        let size_arg = size_bytes.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if let Some(name) = backing {
            args.extend(["-u", "-b", name, "-F", "qcow2"]);
        }
        args.extend([path_arg, &size_arg]);
        let output = run("qemu-img", &args);
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let bytes = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        Ok(bytes)
    }

    /// Like `assert_eq!`, but reports where two images differ instead of printing
    /// hundreds of kilobytes.
    fn assert_same_image(ours: &[u8], qemu_img: &[u8], case: &str) {
        if ours == qemu_img {
            return;
        }
        let differing: Vec<usize> = (0..ours.len().min(qemu_img.len()))
            .filter(|&i| ours[i] != qemu_img[i])
            .collect();
        let first: Vec<String> = differing
            .iter()
            .take(16)
            .map(|&i| {
                format!(
                    "{i:#x}: ours {:#04x}, qemu-img {:#04x}",
                    ours[i], qemu_img[i]
                )
            })
            .collect();
        panic!(
            "{case}: strata wrote {} bytes, qemu-img {}; {} bytes differ in the common part; first: {first:#?}",
            ours.len(),
            qemu_img.len(),
            differing.len()
        );
    }

    /// A name of exactly `len` bytes made of path characters strata's names use.
    fn backing_name(len: usize) -> String {
        "../vm-0f3a.disk-1.snap-2.qcow2/"
            .chars()
            .cycle()
            .take(len)
            .collect()
    }

    #[test]
    fn empty_image_without_backing_matches_qemu_img_for_every_size() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [
            0,
            1,
            511,
            512,
            1000,
            64 * KIB,
            MIB,
            123_456_789,
            GIB,
            GIB + 512,
            GIB + 1,
            100 * GIB,
            2 * TIB,
            2 * TIB + 512,
            16 * TIB,
            PIB - 1,
            MAX_VIRTUAL_SIZE - 1,
            MAX_VIRTUAL_SIZE,
        ];
        for size in sizes {
            let ours = empty_image_bytes(size, None).unwrap();
            let qemu_img = qemu_img_create(dir.path(), size, None).unwrap();
            assert_same_image(&ours, &qemu_img, &format!("size {size}, no backing"));
        }
    }

    #[test]
    fn overlay_matches_qemu_img_for_every_backing_name_length_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut names: Vec<String> = [1, 2, 7, 8, 9, 17, 200, 1000, MAX_BACKING_NAME_LEN]
            .into_iter()
            .map(backing_name)
            .collect();
        names.extend([
            "-".into(),
            ".".into(),
            "base-1.qcow2".into(),
            "/var/lib/strata/volumes/9f0c-e1.qcow2".into(),
        ]);
        names.push("é-ü.qcow2".into()); // multi-byte UTF-8: the length is in bytes
        let sizes = [
            0,
            512,
            1000,
            MIB,
            123_456_789,
            GIB,
            GIB + 512,
            2 * TIB,
            16 * TIB,
        ];
        for name in &names {
            for size in sizes {
                let ours = empty_image_bytes(size, Some(name)).unwrap();
                let qemu_img = qemu_img_create(dir.path(), size, Some(name)).unwrap();
                assert_same_image(
                    &ours,
                    &qemu_img,
                    &format!("size {size}, backing name of {} bytes {name:?}", name.len()),
                );
            }
        }
    }

    #[test]
    fn sizes_over_two_pib_are_refused_like_qemu_img_refuses_them() {
        let dir = tempfile::tempdir().unwrap();
        for size in [MAX_VIRTUAL_SIZE + 1, MAX_VIRTUAL_SIZE + 512, 4 * PIB] {
            assert_eq!(
                empty_image_bytes(size, None),
                Err(ImageSpecError::SizeTooLarge { requested: size })
            );
            let refusal = qemu_img_create(dir.path(), size, None).unwrap_err();
            assert!(refusal.contains("too large"), "qemu-img said: {refusal}");
        }
        // Past what qemu-img even parses: no overflow while rounding.
        assert_eq!(
            empty_image_bytes(u64::MAX, Some("base.qcow2")),
            Err(ImageSpecError::SizeTooLarge {
                requested: u64::MAX
            })
        );
    }

    #[test]
    fn backing_names_qemu_refuses_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let too_long = backing_name(MAX_BACKING_NAME_LEN + 1);
        assert_eq!(
            empty_image_bytes(GIB, Some(&too_long)),
            Err(ImageSpecError::BackingNameTooLong {
                len: MAX_BACKING_NAME_LEN + 1
            })
        );
        assert!(qemu_img_create(dir.path(), GIB, Some(&too_long)).is_err());
        assert_eq!(
            empty_image_bytes(GIB, Some("")),
            Err(ImageSpecError::BackingNameEmpty)
        );
        assert!(qemu_img_create(dir.path(), GIB, Some("")).is_err());
        assert_eq!(
            empty_image_bytes(GIB, Some("base\0.qcow2")),
            Err(ImageSpecError::BackingNameHasNul)
        );
    }

    #[test]
    fn create_overlay_writes_qemu_img_bytes_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overlay.qcow2");
        create_overlay(&path, 10 * GIB, Some("base.qcow2")).unwrap();

        let reference = dir.path().join("reference.qcow2");
        let reference_arg = reference.to_str().unwrap();
        let size_arg = (10 * GIB).to_string();
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                reference_arg,
                &size_arg,
            ],
        );
        assert_same_image(
            &fs::read(&path).unwrap(),
            &fs::read(&reference).unwrap(),
            "create_overlay",
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            fs::metadata(&reference).unwrap().permissions().mode() & 0o7777
        );
    }

    #[test]
    fn overlay_reads_its_base_through_and_takes_writes_with_check_clean() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base-1.qcow2");
        let base_arg = base.to_str().unwrap();
        let size_arg = GIB.to_string();
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", base_arg, &size_arg],
        );
        run_ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0xab 0 64k", base_arg],
        );

        let overlay = dir.path().join("overlay-1.qcow2");
        let overlay_arg = overlay.to_str().unwrap();
        // Relative, as strata names backing files: QEMU resolves it against the
        // overlay's directory.
        create_overlay(&overlay, GIB, Some("base-1.qcow2")).unwrap();

        let check = |path: &str| {
            run_ok("qemu-img", &["check", "-f", "qcow2", path]);
        };
        check(overlay_arg);
        let info = run_ok(
            "qemu-img",
            &["info", "--output=json", "-f", "qcow2", overlay_arg],
        );
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], GIB);
        assert_eq!(info["backing-filename"], "base-1.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");

        // The base's bytes, and zeros where it has none, through the overlay.
        run_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0xab 0 64k",
                "-c",
                "read -P 0 64k 64k",
                overlay_arg,
            ],
        );

        // Writes land in the overlay (one overwriting base data, one past it, one at
        // the far end of the disk) and leave the base as it was.
        run_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0xcd 32k 64k",
                "-c",
                "write -P 0xef 1023m 1m",
                overlay_arg,
            ],
        );
        check(overlay_arg);
        run_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0xab 0 32k",
                "-c",
                "read -P 0xcd 32k 64k",
                "-c",
                "read -P 0 96k 32k",
                "-c",
                "read -P 0xef 1023m 1m",
                overlay_arg,
            ],
        );
        run_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0xab 0 64k",
                "-c",
                "read -P 0 64k 64k",
                base_arg,
            ],
        );
        check(base_arg);
    }

    #[test]
    fn create_overlay_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken.qcow2");
        fs::write(&path, b"someone else's data").unwrap();

        let err = create_overlay(&path, GIB, Some("base.qcow2")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"someone else's data");
    }

    #[test]
    fn create_overlay_refuses_an_invalid_request_without_creating_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("never.qcow2");
        let too_long = backing_name(MAX_BACKING_NAME_LEN + 1);

        let err = create_overlay(&path, GIB, Some(&too_long)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("1024 bytes"), "{err}");
        let err = create_overlay(&path, MAX_VIRTUAL_SIZE + 1, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(!path.exists());
    }
}
