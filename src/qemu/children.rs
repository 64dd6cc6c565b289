//! Keeping qemu-img children from outliving the service.
//!
//! A qemu-img that outlives a killed strata keeps writing a layer (and holding its
//! lock) while the next start recovers the same job: two writers on one file. Three
//! defences, in order:
//! - every child asks the kernel for SIGKILL when its parent dies
//!   (`PR_SET_PDEATHSIG`), and exits at once if the parent already died between fork
//!   and that request;
//! - every child carries `STRATA_CHILD_OF=<data dir>` in its environment, so a new
//!   start can find any that slipped through (the signal is per thread, and a child
//!   in uninterruptible I/O takes a while to die);
//! - before recovery touches a file, [`reap_orphans`] kills those and waits until they
//!   are gone, so no one else holds a layer.

use std::path::Path;
use std::time::{Duration, Instant};

/// Environment variable naming the data directory whose service started a child.
pub const CHILD_TAG_VAR: &str = "STRATA_CHILD_OF";

/// Kill every process tagged as a child of a service over `tag` (other than this
/// process) and wait until each has exited. Returns how many there were.
pub fn reap_orphans(tag: &str, wait: Duration) -> std::io::Result<usize> {
    let me = std::process::id();
    let orphans: Vec<u32> = tagged_processes(tag)?
        .into_iter()
        .filter(|&pid| pid != me)
        .collect();
    for &pid in &orphans {
        tracing::warn!(pid, "killing a qemu-img left by a previous run");
        // SAFETY: kill(2) with a pid read from /proc; at worst the process is gone.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + wait;
    for &pid in &orphans {
        while is_alive(pid) {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "process {pid} (qemu-img of a previous run) does not exit; it may still hold a layer"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(orphans.len())
}

fn tagged_processes(tag: &str) -> std::io::Result<Vec<u32>> {
    let needle = format!("{CHILD_TAG_VAR}={tag}").into_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes of other users, or gone since the listing, are not ours.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_slice())
        {
            found.push(pid);
        }
    }
    Ok(found)
}

/// A process that exited but was not reaped yet (a zombie) holds no file any more.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tagged_process_is_found_killed_and_waited_for() {
        let tag = format!("/tmp/strata-reap-test-{}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(CHILD_TAG_VAR, &tag)
            .spawn()
            .expect("sleep");
        // Until the child has exec'd, /proc shows the environment it was forked with.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tagged_processes(&tag).unwrap() != vec![child.id()] {
            assert!(
                Instant::now() < deadline,
                "the tagged child never showed up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reap_orphans(&tag, Duration::from_secs(10)).unwrap(), 1);
        assert!(!child.wait().unwrap().success());
        assert!(tagged_processes(&tag).unwrap().is_empty());
    }
}
