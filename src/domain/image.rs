//! Inspecting an uploaded disk image before any qemu tool opens it. Imported files are
//! hostile until proven otherwise: a qcow2 header can make qemu-img open arbitrary
//! host files (a backing file like `/etc/passwd`, an external data file), claim an
//! absurd size, or be cut short. This reads the header bytes itself and refuses all of
//! that, and refuses a file whose content does not match its declared format (raw
//! declared for a qcow2 file would hand the guest the qcow2 metadata; qcow2 declared
//! for raw bytes is simply wrong).
//!
//! Formats follow qemu's docs/interop/qcow2.txt (versions 2 and 3).

string_enum!(
    /// Formats accepted for import.
    ImageFormat { Qcow2 => "qcow2", Raw => "raw" }
);

/// Bytes of the header `inspect` wants (the header and its extensions fit in the first
/// cluster; 64 KiB covers the default cluster size).
pub const HEADER_BYTES: usize = 64 << 10;

/// Why an image is refused. Each maps to its own problem code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    FormatMismatch(String),
    #[error("the image names a backing file{0}; imported images must be self-contained")]
    BackingFile(String),
    #[error(
        "the image keeps its data in an external data file; imported images must be self-contained"
    )]
    ExternalDataFile,
    #[error("the image is encrypted; import the decrypted image")]
    Encrypted,
    #[error("the image's virtual size {size} is above the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("the image is truncated: {0}")]
    Truncated(String),
    #[error("the image is not valid: {0}")]
    Invalid(String),
}

/// What the header says about an accepted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspection {
    pub format: ImageFormat,
    pub virtual_size: u64,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Incompatible feature bits qemu knows: dirty (bit 0: refcounts may be stale, which
/// the conversion into a fresh file makes harmless), corrupt, external data file,
/// compression type, extended L2 entries.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_KNOWN: u64 = 0b1_1111;
const EXT_END: u32 = 0;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_ENCRYPTION: u32 = 0x0537_be77;

/// Magic numbers of other image formats, which must not pass as raw (their metadata
/// would become guest data) nor as qcow2.
const OTHER_FORMATS: &[(usize, &[u8], &str)] = &[
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk (descriptor)"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc/vhd"),
    (0, b"QED\0", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"OOOM", "cloop"),
    (0, b"QEVM", "bochs"),
];

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Check an image from its first bytes (`head`, up to `HEADER_BYTES`) and its length.
pub fn inspect(
    head: &[u8],
    file_len: u64,
    declared: ImageFormat,
    max_virtual_size: u64,
) -> Result<Inspection, Rejection> {
    let is_qcow2 = head.starts_with(QCOW2_MAGIC);
    let other = OTHER_FORMATS
        .iter()
        .find(|(at, magic, _)| {
            head.len() >= at + magic.len() && &head[*at..at + magic.len()] == *magic
        })
        .map(|(_, _, name)| *name);
    match declared {
        ImageFormat::Raw => {
            if is_qcow2 {
                return Err(Rejection::FormatMismatch(
                    "the file is a qcow2 image but was declared raw".into(),
                ));
            }
            if let Some(name) = other {
                return Err(Rejection::FormatMismatch(format!(
                    "the file is a {name} image but was declared raw"
                )));
            }
            if file_len == 0 {
                return Err(Rejection::Invalid("the file is empty".into()));
            }
            if !file_len.is_multiple_of(512) {
                return Err(Rejection::Invalid(format!(
                    "a raw image must be a whole number of 512-byte sectors; this one is {file_len} bytes"
                )));
            }
            if file_len > max_virtual_size {
                return Err(Rejection::TooLarge {
                    size: file_len,
                    limit: max_virtual_size,
                });
            }
            Ok(Inspection {
                format: ImageFormat::Raw,
                virtual_size: file_len,
            })
        }
        ImageFormat::Qcow2 => {
            if !is_qcow2 {
                return Err(Rejection::FormatMismatch(match other {
                    Some(name) => format!("the file is a {name} image but was declared qcow2"),
                    None if head.len() < 4 => {
                        "the file is too short to be a qcow2 image".into()
                    }
                    None => "the file is not a qcow2 image (no QFI magic); declare raw if it is a raw disk".into(),
                }));
            }
            inspect_qcow2(head, file_len, max_virtual_size)
        }
    }
}

fn inspect_qcow2(
    head: &[u8],
    file_len: u64,
    max_virtual_size: u64,
) -> Result<Inspection, Rejection> {
    const V2_HEADER: usize = 72;
    const V3_HEADER: usize = 104;
    if head.len() < V2_HEADER {
        return Err(Rejection::Truncated(format!(
            "{} bytes, shorter than a qcow2 header",
            head.len()
        )));
    }
    let version = be_u32(head, 4);
    if version != 2 && version != 3 {
        return Err(Rejection::Invalid(format!(
            "unknown qcow2 version {version}"
        )));
    }
    let header_length = if version == 3 {
        if head.len() < V3_HEADER {
            return Err(Rejection::Truncated(format!(
                "{} bytes, shorter than a qcow2 version 3 header",
                head.len()
            )));
        }
        be_u32(head, 100) as usize
    } else {
        V2_HEADER
    };
    if header_length < V2_HEADER || header_length > head.len() {
        return Err(Rejection::Truncated(format!(
            "the header claims {header_length} bytes"
        )));
    }
    let backing_offset = be_u64(head, 8);
    let backing_size = be_u32(head, 16) as usize;
    if backing_offset != 0 {
        let start = backing_offset as usize;
        let name = head
            .get(start..start.saturating_add(backing_size.min(1023)))
            .map(|b| format!(" ({:?})", String::from_utf8_lossy(b)))
            .unwrap_or_default();
        return Err(Rejection::BackingFile(name));
    }
    let cluster_bits = be_u32(head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(Rejection::Invalid(format!(
            "cluster_bits {cluster_bits} is outside 9..=21"
        )));
    }
    let virtual_size = be_u64(head, 24);
    if virtual_size > max_virtual_size {
        return Err(Rejection::TooLarge {
            size: virtual_size,
            limit: max_virtual_size,
        });
    }
    if virtual_size == 0 {
        return Err(Rejection::Invalid("the virtual size is zero".into()));
    }
    if be_u32(head, 32) != 0 {
        return Err(Rejection::Encrypted);
    }
    let cluster_size = 1u64 << cluster_bits;
    // The file must at least hold the tables the header points at.
    for (what, offset) in [
        ("L1 table", be_u64(head, 40)),
        ("refcount table", be_u64(head, 48)),
    ] {
        if offset == 0 || offset % cluster_size != 0 {
            return Err(Rejection::Invalid(format!(
                "the {what} offset {offset} is not a cluster boundary"
            )));
        }
        if offset >= file_len {
            return Err(Rejection::Truncated(format!(
                "the {what} lies at byte {offset} of a {file_len}-byte file"
            )));
        }
    }
    if version == 3 {
        let incompatible = be_u64(head, 72);
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Rejection::ExternalDataFile);
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Rejection::Invalid("the image is marked corrupt".into()));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Rejection::Invalid(format!(
                "unknown incompatible features {unknown:#x}"
            )));
        }
    }
    // Header extensions follow the header, each 8-byte aligned, up to an end marker.
    let mut at = header_length.next_multiple_of(8);
    loop {
        if at + 8 > head.len() {
            return Err(Rejection::Truncated(
                "the header extensions run past the first cluster".into(),
            ));
        }
        let kind = be_u32(head, at);
        let length = be_u32(head, at + 4) as usize;
        match kind {
            EXT_END => break,
            EXT_DATA_FILE => return Err(Rejection::ExternalDataFile),
            EXT_ENCRYPTION => return Err(Rejection::Encrypted),
            _ => {}
        }
        at = at
            .checked_add(8 + length.next_multiple_of(8))
            .ok_or_else(|| Rejection::Invalid("a header extension is too long".into()))?;
    }
    Ok(Inspection {
        format: ImageFormat::Qcow2,
        virtual_size,
    })
}

#[cfg(test)]
mod tests;
