//! The inspection of an uploaded image, before its import is accepted: the header
//! check (`domain::image`), then `qemu-img info`, `check` and `measure` under limits
//! (a crafted file must not exhaust memory or CPU). This is the one file work a request
//! does itself rather than in a job: an image that is not what it claims, or would not
//! fit, is refused (422, 507) before anything is recorded.

use std::path::Path;

use tokio::io::AsyncReadExt;

use super::Files;
use crate::domain::image::{self, ImageFormat, Rejection};
use crate::error::{Error, ErrorCode, Result};
use crate::qemu::UntrustedLimits;

impl Files {
    /// The header check, then `qemu-img info` and (qcow2) `check` under limits.
    pub async fn inspect_image(
        &self,
        path: &Path,
        declared: ImageFormat,
        max_disk_size: u64,
    ) -> Result<image::Inspection> {
        let file_len = tokio::fs::metadata(path).await?.len();
        let mut head = vec![0u8; image::HEADER_BYTES.min(file_len as usize)];
        tokio::fs::File::open(path)
            .await?
            .read_exact(&mut head)
            .await?;
        let inspection =
            image::inspect(&head, file_len, declared, max_disk_size).map_err(rejection)?;
        let qemu = &self.qemu;
        let limits = UntrustedLimits::default();
        let info = qemu
            .info_untrusted(path, declared.as_str(), limits)
            .await
            .map_err(|e| {
                Error::problem(
                    ErrorCode::ImageInvalid,
                    format!(
                        "qemu-img cannot read the image as {}: {e}",
                        declared.as_str()
                    ),
                )
            })?;
        // The header passed; qemu-img must agree with it on every point that matters.
        if info.format != declared.as_str() {
            return Err(rejection(Rejection::FormatMismatch(format!(
                "qemu-img reads the file as {}, not {}",
                info.format,
                declared.as_str()
            ))));
        }
        if let Some(backing) = info
            .backing_filename
            .clone()
            .or(info.full_backing_filename.clone())
        {
            return Err(rejection(Rejection::BackingFile(format!(" ({backing:?})"))));
        }
        if info.data_file().is_some() {
            return Err(rejection(Rejection::ExternalDataFile));
        }
        if info.virtual_size != inspection.virtual_size || info.virtual_size > max_disk_size {
            return Err(rejection(Rejection::Invalid(format!(
                "qemu-img reports a virtual size of {} bytes, the header {}",
                info.virtual_size, inspection.virtual_size
            ))));
        }
        if declared == ImageFormat::Qcow2 {
            let report = qemu.check_untrusted(path, limits).await.map_err(|e| {
                Error::problem(
                    ErrorCode::ImageCorrupt,
                    format!("qemu-img check failed on the image: {e}"),
                )
            })?;
            if report.corruptions > 0 || report.check_errors > 0 {
                return Err(Error::problem(
                    ErrorCode::ImageCorrupt,
                    format!(
                        "qemu-img check found {} corruptions and {} errors",
                        report.corruptions, report.check_errors
                    ),
                ));
            }
        }
        Ok(inspection)
    }

    /// What copying the image into a volume writes (`qemu-img measure`), which a
    /// crafted file can make far more than its size.
    pub async fn measure_image(&self, path: &Path, format: ImageFormat) -> Result<u64> {
        self.qemu
            .measure_untrusted(path, format.as_str(), UntrustedLimits::default())
            .await
            .map_err(|e| {
                Error::problem(
                    ErrorCode::ImageInvalid,
                    format!("qemu-img cannot measure the image: {e}"),
                )
            })
    }
}

fn rejection(rejection: Rejection) -> Error {
    let code = match &rejection {
        Rejection::FormatMismatch(_) => ErrorCode::ImageFormatMismatch,
        Rejection::BackingFile(_) => ErrorCode::ImageHasBackingFile,
        Rejection::ExternalDataFile => ErrorCode::ImageHasDataFile,
        Rejection::Encrypted => ErrorCode::ImageEncrypted,
        Rejection::TooLarge { .. } => ErrorCode::ImageTooLarge,
        Rejection::Truncated(_) => ErrorCode::ImageTruncated,
        Rejection::Invalid(_) => ErrorCode::ImageInvalid,
    };
    Error::problem(code, rejection.to_string())
}
