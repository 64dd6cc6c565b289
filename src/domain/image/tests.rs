use super::*;

const GIB: u64 = 1 << 30;
const LIMIT: u64 = 16 << 40;

/// A qcow2 version 3 header like qemu-img writes for a 1 GiB image (64 KiB clusters),
/// padded to `len` bytes; `edit` changes it before use.
fn qcow2(len: usize, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut h = vec![0u8; len];
    h[0..4].copy_from_slice(QCOW2_MAGIC);
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
    h[24..32].copy_from_slice(&GIB.to_be_bytes()); // size
    h[36..40].copy_from_slice(&1u32.to_be_bytes()); // l1_size
    h[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes()); // l1_table_offset
    h[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes()); // refcount_table_offset
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
    h[100..104].copy_from_slice(&112u32.to_be_bytes()); // header_length
    edit(&mut h);
    h
}

const FILE_LEN: u64 = 4 << 16;

fn extension(h: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
    h[at..at + 4].copy_from_slice(&kind.to_be_bytes());
    h[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
    h[at + 8..at + 8 + data.len()].copy_from_slice(data);
    at + 8 + data.len().next_multiple_of(8)
}

#[test]
fn a_plain_qcow2_header_passes_with_its_size() {
    let head = qcow2(4096, |_| {});
    assert_eq!(
        inspect(&head, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Ok(Inspection {
            format: ImageFormat::Qcow2,
            virtual_size: GIB
        })
    );
    // Known extensions (backing format, feature table) are fine.
    let head = qcow2(4096, |h| {
        let next = extension(h, 112, 0x6803_f857, &[0; 48]);
        extension(h, next, EXT_END, &[]);
    });
    assert!(inspect(&head, FILE_LEN, ImageFormat::Qcow2, LIMIT).is_ok());
}

#[test]
fn a_backing_file_is_refused_and_named() {
    let head = qcow2(4096, |h| {
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        h[512..523].copy_from_slice(b"/etc/passwd");
    });
    let refused = inspect(&head, FILE_LEN, ImageFormat::Qcow2, LIMIT).unwrap_err();
    assert!(matches!(&refused, Rejection::BackingFile(name) if name.contains("/etc/passwd")));
}

#[test]
fn an_external_data_file_is_refused_by_feature_bit_or_extension() {
    let by_bit = qcow2(4096, |h| {
        h[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes())
    });
    assert_eq!(
        inspect(&by_bit, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::ExternalDataFile)
    );
    let by_extension = qcow2(4096, |h| {
        extension(h, 112, EXT_DATA_FILE, b"/dev/sda");
    });
    assert_eq!(
        inspect(&by_extension, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::ExternalDataFile)
    );
}

#[test]
fn absurd_sizes_encryption_and_unknown_features_are_refused() {
    let huge = qcow2(4096, |h| {
        h[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes())
    });
    assert!(matches!(
        inspect(&huge, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::TooLarge { .. })
    ));
    let encrypted = qcow2(4096, |h| h[32..36].copy_from_slice(&1u32.to_be_bytes()));
    assert_eq!(
        inspect(&encrypted, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::Encrypted)
    );
    let luks = qcow2(4096, |h| {
        extension(h, 112, EXT_ENCRYPTION, &[0; 16]);
    });
    assert_eq!(
        inspect(&luks, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::Encrypted)
    );
    let future = qcow2(4096, |h| {
        h[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())
    });
    assert!(matches!(
        inspect(&future, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::Invalid(_))
    ));
    let corrupt = qcow2(4096, |h| {
        h[72..80].copy_from_slice(&INCOMPAT_CORRUPT.to_be_bytes())
    });
    assert!(matches!(
        inspect(&corrupt, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::Invalid(_))
    ));
    let bad_clusters = qcow2(4096, |h| h[20..24].copy_from_slice(&30u32.to_be_bytes()));
    assert!(matches!(
        inspect(&bad_clusters, FILE_LEN, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::Invalid(_))
    ));
}

#[test]
fn truncated_headers_and_tables_past_the_end_are_refused() {
    let full = qcow2(4096, |_| {});
    for cut in [0, 3, 40, 90] {
        let refused = inspect(&full[..cut], cut as u64, ImageFormat::Qcow2, LIMIT);
        assert!(
            matches!(
                refused,
                Err(Rejection::Truncated(_) | Rejection::FormatMismatch(_))
            ),
            "{cut}: {refused:?}"
        );
    }
    // Header intact, but the file ends before its L1 table.
    assert!(matches!(
        inspect(&full, 2 << 16, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::Truncated(_))
    ));
}

#[test]
fn a_declared_format_must_match_the_content() {
    let head = qcow2(4096, |_| {});
    assert!(matches!(
        inspect(&head, FILE_LEN, ImageFormat::Raw, LIMIT),
        Err(Rejection::FormatMismatch(_))
    ));
    let raw = vec![0xabu8; 4096];
    assert!(matches!(
        inspect(&raw, 1 << 20, ImageFormat::Qcow2, LIMIT),
        Err(Rejection::FormatMismatch(_))
    ));
    let mut vmdk = vec![0u8; 4096];
    vmdk[..4].copy_from_slice(b"KDMV");
    assert!(matches!(
        inspect(&vmdk, 1 << 20, ImageFormat::Raw, LIMIT),
        Err(Rejection::FormatMismatch(m)) if m.contains("vmdk")
    ));
    assert_eq!(
        inspect(&raw, 1 << 20, ImageFormat::Raw, LIMIT),
        Ok(Inspection {
            format: ImageFormat::Raw,
            virtual_size: 1 << 20
        })
    );
}

#[test]
fn raw_images_are_whole_sectors_within_the_limit() {
    let raw = vec![0u8; 512];
    assert!(inspect(&raw, 1000, ImageFormat::Raw, LIMIT).is_err());
    assert!(inspect(&raw, 0, ImageFormat::Raw, LIMIT).is_err());
    assert!(matches!(
        inspect(&raw, 2 << 20, ImageFormat::Raw, 1 << 20),
        Err(Rejection::TooLarge { .. })
    ));
}
