//! qemu-io and qemu-img, run on the files the service reports: write guest bytes,
//! check them, inspect chains, compare images and build plain ones. A check the bench
//! records as a problem instead of stopping has a `try_` form that returns what went
//! wrong; the other forms panic with it.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::MIB;

/// Run a tool to completion: its stdout, or what it said when it exited non-zero.
pub fn run_tool(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}{stdout}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(stdout)
}

/// Run a tool that must succeed; its stdout.
fn must_run(program: &str, args: &[&str]) -> String {
    run_tool(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// The files the tests and the bench handle all have UTF-8 paths (temporary dirs).
pub fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("path is not UTF-8: {}", path.display()))
}

/// qemu-io `commands` on the image, in one run. qemu-io reports a failed command
/// ("Pattern verification failed", "read failed") on stdout, not always through its
/// exit status.
fn qemu_io(path: &Path, commands: &[String], read_only: bool) -> Result<(), String> {
    let mut args = vec!["-f", "qcow2"];
    if read_only {
        args.push("-r");
    }
    for command in commands {
        args.extend(["-c", command.as_str()]);
    }
    args.push(path_str(path));
    let stdout = run_tool("qemu-io", &args)?;
    if stdout.contains("failed") {
        return Err(format!(
            "qemu-io {commands:?} on {}: {stdout}",
            path.display()
        ));
    }
    Ok(())
}

/// Write `pattern` over [offset, offset+len) bytes of the image.
pub fn write_bytes(path: impl AsRef<Path>, pattern: u8, offset: u64, len: u64) {
    let command = format!("write -P {pattern:#x} {offset} {len}");
    qemu_io(path.as_ref(), &[command], false).unwrap_or_else(|e| panic!("{e}"));
}

/// Check that the image reads each (pattern, offset, length) region, in bytes.
pub fn try_expect_bytes(path: impl AsRef<Path>, regions: &[(u8, u64, u64)]) -> Result<(), String> {
    let commands: Vec<String> = regions
        .iter()
        .map(|(pattern, offset, len)| format!("read -P {pattern:#x} {offset} {len}"))
        .collect();
    qemu_io(path.as_ref(), &commands, true)
}

/// Assert the image reads `pattern` over [offset, offset+len) bytes (`expect` takes
/// whole MiB; the upgrade fixture's regions are 64 KiB runs).
pub fn expect_bytes(path: impl AsRef<Path>, pattern: u8, offset: u64, len: u64) {
    try_expect_bytes(path, &[(pattern, offset, len)]).unwrap_or_else(|e| panic!("{e}"));
}

/// Write `pattern` over [offset, offset+len) MiB of the image.
pub fn write(path: impl AsRef<Path>, pattern: u8, offset_mib: u64, len_mib: u64) {
    write_bytes(path, pattern, offset_mib * MIB, len_mib * MIB);
}

/// Assert the image reads `pattern` over [offset, offset+len) MiB.
pub fn expect(path: impl AsRef<Path>, pattern: u8, offset_mib: u64, len_mib: u64) {
    expect_all(path, &[(pattern, offset_mib, len_mib)]);
}

/// Assert each (pattern, offset MiB, length MiB) region of the image.
pub fn expect_all(path: impl AsRef<Path>, regions: &[(u8, u64, u64)]) {
    let bytes: Vec<(u8, u64, u64)> = regions
        .iter()
        .map(|&(pattern, offset, len)| (pattern, offset * MIB, len * MIB))
        .collect();
    try_expect_bytes(path, &bytes).unwrap_or_else(|e| panic!("{e}"));
}

/// Virtual size of an image as qemu-img reports it.
pub fn virtual_size(path: impl AsRef<Path>) -> u64 {
    let stdout = must_run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "-f",
            "qcow2",
            path_str(path.as_ref()),
        ],
    );
    let info: Value = serde_json::from_str(&stdout).expect("info JSON");
    info["virtual-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no virtual-size in {info}"))
}

/// Assert `qemu-img check` finds every layer of the chain clean.
pub fn check_clean(path: impl AsRef<Path>) {
    for layer in chain(path) {
        must_run("qemu-img", &["check", "-f", "qcow2", &layer]);
    }
}

/// The file names of the backing chain, top first (fails if a backing file is missing).
/// Read with `-U`: it may be the chain of a running VM's disk.
pub fn chain(path: impl AsRef<Path>) -> Vec<String> {
    let stdout = must_run(
        "qemu-img",
        &[
            "info",
            "-U",
            "--output=json",
            "--backing-chain",
            "-f",
            "qcow2",
            path_str(path.as_ref()),
        ],
    );
    let infos: Vec<Value> = serde_json::from_str(&stdout).expect("info JSON");
    infos
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_owned())
        .collect()
}

/// Check that two images show identical guest content.
pub fn try_compare(a: impl AsRef<Path>, b: impl AsRef<Path>) -> Result<(), String> {
    let (a, b) = (path_str(a.as_ref()), path_str(b.as_ref()));
    run_tool("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", a, b]).map(drop)
}

/// Assert two images show identical guest content.
pub fn compare(a: impl AsRef<Path>, b: impl AsRef<Path>) {
    try_compare(a, b).unwrap_or_else(|e| panic!("{e}"));
}

/// Copy the guest-visible content of an image (its whole chain) into a standalone
/// reference file outside the data directory, for a later `compare`.
pub fn reference_copy(path: impl AsRef<Path>, name: &str) -> String {
    let dest = std::env::temp_dir().join(format!("strata-ref-{}-{name}.qcow2", std::process::id()));
    let dest = dest.display().to_string();
    let source = path_str(path.as_ref());
    must_run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "qcow2", source, &dest],
    );
    dest
}

/// Create a qcow2 image of `size` bytes, over `backing` (named relative to the new
/// file's directory) when given; `unsafe_backing` leaves the backing unopened (`-u`).
pub fn create_image(
    path: impl AsRef<Path>,
    size: u64,
    backing: Option<&str>,
    unsafe_backing: bool,
) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(backing) = backing {
        if unsafe_backing {
            args.push("-u");
        }
        args.extend(["-b", backing, "-F", "qcow2"]);
    }
    args.extend([path_str(path.as_ref()), &size]);
    must_run("qemu-img", &args);
}

pub fn exists(path: impl AsRef<Path>) -> bool {
    path.as_ref().exists()
}
