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
use crate::qemu::qmp::{BlockNode, Qmp, QmpError};

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

    /// Greet the VM's monitor: its QEMU version and whether it can pause its guest, or
    /// `qmp_unavailable` when nothing answers or what answers is not QEMU's monitor.
    pub async fn probe_qmp(&self, vm: Uuid, socket: &str) -> Result<(String, bool)> {
        let answer = Qmp::connect(Path::new(socket), PROBE_TIMEOUT).await;
        self.record_contact(vm, answer.is_ok());
        let unavailable = |e: QmpError| {
            let why = match e {
                QmpError::NotQmp(_) => format!("{socket} does not speak QMP ({e})"),
                other => format!("{socket} does not answer as a QEMU monitor: {other}"),
            };
            Error::problem(ErrorCode::QmpUnavailable, why)
        };
        let mut qmp = answer.map_err(unavailable)?;
        let can_pause = qmp.can_pause().await.map_err(unavailable)?;
        Ok((qmp.version().to_string(), can_pause))
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

/// One disk as strata records it: the files of its chain, active layer first.
#[derive(Debug, Clone)]
pub struct DiskChain {
    pub disk: Uuid,
    pub name: String,
    pub files: Vec<String>,
}

/// The node QEMU reads a disk through: the format node of its active layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskNode {
    pub disk: Uuid,
    pub node_name: String,
}

/// Find each disk's node in QEMU's graph by the file it has open, and check QEMU reads
/// exactly the chain strata records. Every difference is listed, for a
/// `runtime_mismatch` answer: strata never guesses which node is meant.
pub fn match_disks(nodes: &[BlockNode], disks: &[DiskChain]) -> Result<Vec<DiskNode>, Vec<String>> {
    let format_nodes: Vec<&BlockNode> = nodes.iter().filter(|n| n.drv == "qcow2").collect();
    let mut found = Vec::with_capacity(disks.len());
    let mut differences = Vec::new();
    for disk in disks {
        let Some(active) = disk.files.first() else {
            differences.push(format!("disk {}: strata records no file", disk.name));
            continue;
        };
        let opened: Vec<&&BlockNode> = format_nodes
            .iter()
            .filter(|n| n.image.file_name() == *active)
            .collect();
        let node = match opened.as_slice() {
            [] => {
                differences.push(format!("disk {}: QEMU has not opened {active}", disk.name));
                continue;
            }
            [node] => node,
            several => {
                let names: Vec<&str> = several.iter().map(|n| n.node_name.as_str()).collect();
                differences.push(format!(
                    "disk {}: QEMU opened {active} {} times ({names:?})",
                    disk.name,
                    several.len()
                ));
                continue;
            }
        };
        let reads = node.image.chain();
        if reads != disk.files {
            differences.push(format!(
                "disk {}: QEMU reads {reads:?}, strata records {:?}",
                disk.name, disk.files
            ));
            continue;
        }
        // A layer above the active one (a snapshot taken behind strata's back) would
        // take the guest's writes that strata does not know of.
        for other in &format_nodes {
            let chain = other.image.chain();
            if chain.len() > 1 && chain[1..].contains(active) {
                differences.push(format!(
                    "disk {}: QEMU has {} above {active}, which strata does not record",
                    disk.name, chain[0]
                ));
            }
        }
        found.push(DiskNode {
            disk: disk.disk,
            node_name: node.node_name.clone(),
        });
    }
    if differences.is_empty() {
        Ok(found)
    } else {
        Err(differences)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::qmp::ImageInfo;

    fn image(files: &[&str]) -> ImageInfo {
        let (first, rest) = files.split_first().unwrap();
        ImageInfo {
            filename: first.to_string(),
            virtual_size: 1 << 30,
            backing_filename: rest.first().map(|f| f.to_string()),
            backing_image: (!rest.is_empty()).then(|| Box::new(image(rest))),
        }
    }

    fn node(name: &str, files: &[&str]) -> BlockNode {
        BlockNode {
            node_name: name.into(),
            drv: "qcow2".into(),
            file: files[0].into(),
            ro: false,
            image: image(files),
        }
    }

    fn disk(name: &str, files: &[&str]) -> DiskChain {
        DiskChain {
            disk: crate::domain::new_id(),
            name: name.into(),
            files: files.iter().map(|f| f.to_string()).collect(),
        }
    }

    /// QEMU lists every format node, and each with the chain below it.
    fn graph(chains: &[(&str, &[&str])]) -> Vec<BlockNode> {
        let mut nodes = Vec::new();
        for (name, files) in chains {
            for depth in 0..files.len() {
                let node_name = if depth == 0 {
                    name.to_string()
                } else {
                    format!("#block{name}{depth}")
                };
                nodes.push(node(&node_name, &files[depth..]));
            }
            nodes.push(BlockNode {
                drv: "file".into(),
                ..node(&format!("#file-{name}"), files)
            });
        }
        nodes
    }

    #[test]
    fn each_disk_is_found_by_its_active_file_with_its_whole_chain() {
        let nodes = graph(&[
            ("root", &["/v/c.qcow2", "/v/b.qcow2", "/v/a.qcow2"]),
            ("data", &["/v/d.qcow2"]),
        ]);
        let disks = [
            disk("root", &["/v/c.qcow2", "/v/b.qcow2", "/v/a.qcow2"]),
            disk("data", &["/v/d.qcow2"]),
        ];
        let found = match_disks(&nodes, &disks).unwrap();
        assert_eq!(found[0].node_name, "root");
        assert_eq!(found[1].node_name, "data");
        assert_eq!(found[1].disk, disks[1].disk);
    }

    #[test]
    fn a_file_qemu_has_not_opened_or_a_different_chain_is_a_mismatch() {
        let nodes = graph(&[("root", &["/v/c.qcow2", "/v/a.qcow2"])]);
        let missing = match_disks(&nodes, &[disk("data", &["/v/d.qcow2"])]).unwrap_err();
        assert_eq!(missing, ["disk data: QEMU has not opened /v/d.qcow2"]);
        let shorter = match_disks(
            &nodes,
            &[disk("root", &["/v/c.qcow2", "/v/b.qcow2", "/v/a.qcow2"])],
        )
        .unwrap_err();
        assert!(
            shorter[0].contains("QEMU reads [\"/v/c.qcow2\", \"/v/a.qcow2\"]"),
            "{shorter:?}"
        );
    }

    #[test]
    fn an_overlay_strata_does_not_know_above_the_active_layer_is_a_mismatch() {
        // Someone took a snapshot with QEMU directly: x.qcow2 now takes the writes.
        let nodes = graph(&[("root", &["/v/x.qcow2", "/v/c.qcow2", "/v/a.qcow2"])]);
        let differences =
            match_disks(&nodes, &[disk("root", &["/v/c.qcow2", "/v/a.qcow2"])]).unwrap_err();
        assert_eq!(
            differences,
            ["disk root: QEMU has /v/x.qcow2 above /v/c.qcow2, which strata does not record"]
        );
    }

    #[test]
    fn a_node_qemu_names_with_a_json_description_is_matched_by_its_file() {
        // What blockdev-snapshot makes of an overlay opened with `backing: null`.
        let mut nodes = graph(&[("root", &["/v/b.qcow2", "/v/a.qcow2"])]);
        nodes[0].image.filename = r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/v/a.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/v/b.qcow2"}}"#.into();
        let found = match_disks(&nodes, &[disk("root", &["/v/b.qcow2", "/v/a.qcow2"])]).unwrap();
        assert_eq!(found[0].node_name, "root");
    }

    #[test]
    fn a_file_opened_twice_is_not_guessed() {
        let mut nodes = graph(&[("root", &["/v/c.qcow2"])]);
        nodes.push(node("copy", &["/v/c.qcow2"]));
        let differences = match_disks(&nodes, &[disk("root", &["/v/c.qcow2"])]).unwrap_err();
        assert!(differences[0].contains("2 times"), "{differences:?}");
    }
}
