//! A file system that runs full: every refusal is `507 insufficient_storage` with
//! nothing changed, nothing acknowledged is lost (before or after a kill -9), and a
//! copy that runs out of space in the middle rolls back or resumes cleanly.
//!
//! The tests mount small tmpfs file systems, which needs root (CI runs as root); run
//! as another user they say so and do nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

/// A tmpfs of a fixed size, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// `None` when this process may not mount (not root).
    fn mount(path: &Path, size_mib: u64) -> Option<Self> {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn skip_without_root() {
    eprintln!("skipped: mounting a tmpfs needs root");
}

/// Fill the file system holding `path` (a new file) until a write fails; returns the
/// file so a test can free the space again by removing it.
fn fill(path: &Path) -> PathBuf {
    let mut file = std::fs::File::create(path).expect("filler");
    for chunk in [1 << 20, 64 << 10, 4 << 10, 512] {
        let bytes = vec![0xeeu8; chunk];
        while file.write_all(&bytes).and_then(|_| file.flush()).is_ok() {}
    }
    path.to_owned()
}

/// Fill the file system of `path` so that about `leave_mib` MiB stay free.
fn fill_leaving(path: &Path, leave_mib: u64) -> PathBuf {
    let filler = fill(path);
    let len = std::fs::metadata(&filler).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap();
    file.set_len(len.saturating_sub(leave_mib * MIB)).unwrap();
    filler
}

fn assert_507(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["code"], "insufficient_storage", "{body}");
}

fn schedule_body(vm: &Uuid, name: &str) -> Value {
    json!({"name": name, "vm_id": vm, "cron": "0 3 * * *", "retention": {"keep_last": 3}})
}

async fn schedule_names(app: &TestApp) -> Vec<String> {
    let (status, list) = app.get("/v1/schedules?limit=1000").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn metadata_writes_on_a_full_file_system_answer_507_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(dir.path(), 48) else {
        return skip_without_root();
    };
    let filler_path = dir.path().join("filler");
    let mut app = TestApp::spawn_in(dir, &[]).await;
    let vm = app.create_vm("full", &[("root", 16 * MIB)]).await.id;
    let filler = fill(&filler_path);

    // Rows are added until the database cannot grow; every answer is a 201 that
    // stays, or a 507 that leaves nothing.
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    let long = "x".repeat(100);
    for i in 0..2000 {
        let name = format!("s{i:04}-{long}");
        let (status, body) = app.post("/v1/schedules", schedule_body(&vm, &name)).await;
        match status {
            StatusCode::CREATED => {
                let (status, _) = app.get(&format!("/v1/schedules/{}", id(&body))).await;
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "acknowledged schedule {name} is not there"
                );
                acknowledged.push(name);
            }
            _ => {
                assert_507(status, &body);
                refused.push(name);
                if refused.len() >= 3 {
                    break;
                }
            }
        }
    }
    assert!(!refused.is_empty(), "the file system never filled up");

    // On the full file system, later writes are refused or stay; never a 200 that
    // is then forgotten.
    let mut description = String::new();
    for j in 0..5 {
        let wanted = format!("after-full-{j}-{long}");
        let (status, body) = app
            .patch(&format!("/v1/vms/{vm}"), json!({"description": wanted}))
            .await;
        match status {
            StatusCode::OK => description = wanted,
            _ => assert_507(status, &body),
        }
        assert_eq!(app.vm(&vm).await.description, description);
    }
    let (status, body) = app
        .post(
            &format!("/v1/vms/{vm}/snapshots"),
            json!({"name": "on-full"}),
        )
        .await;
    let snapshot_job = match status {
        StatusCode::ACCEPTED => {
            let (status, _) = app.get(&format!("/v1/jobs/{}", id(&body))).await;
            assert_eq!(status, StatusCode::OK, "an acknowledged job must exist");
            Some(body)
        }
        _ => {
            assert_507(status, &body);
            None
        }
    };

    // Space comes back: writes work again on the same service.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = app
        .patch(
            &format!("/v1/vms/{vm}"),
            json!({"description": "space is back"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    if let Some(job) = &snapshot_job {
        app.wait_job(id(job)).await;
    }
    let snapshot = app.snapshot(&vm, "after").await.id;

    // And everything acknowledged survives a kill -9, nothing refused appears.
    app.kill();
    app.restart(&[]).await;
    let names = schedule_names(&app).await;
    for name in &acknowledged {
        assert!(names.contains(name), "acknowledged schedule {name} lost");
    }
    for name in &refused {
        assert!(!names.contains(name), "refused schedule {name} exists");
    }
    assert_eq!(names.len(), acknowledged.len());
    assert_eq!(app.vm(&vm).await.description, "space is back");
    let (status, _) = app.get(&format!("/v1/snapshots/{snapshot}")).await;
    assert_eq!(status, StatusCode::OK);
    for file in app.volume_files() {
        if file.extension().is_some_and(|e| e == "qcow2") {
            check_clean(&file);
        }
    }
}

/// The database has room, the volumes' file system (mounted on `volumes/`) does not.
async fn app_with_small_volumes(volumes_mib: u64) -> Option<(TestApp, Tmpfs, Tmpfs, PathBuf)> {
    let dir = tempfile::tempdir().unwrap();
    let data_fs = Tmpfs::mount(dir.path(), 256)?;
    let volumes = dir.path().join("data").join("volumes");
    let volumes_fs = Tmpfs::mount(&volumes, volumes_mib)?;
    let app = TestApp::spawn_in(dir, &[("STRATA_RESERVED_SPACE", "1048576")]).await;
    Some((app, volumes_fs, data_fs, volumes))
}

#[tokio::test]
async fn merges_and_snapshots_that_do_not_fit_are_refused_up_front_with_nothing_changed() {
    let Some((app, _volumes_fs, _data_fs, volumes)) = app_with_small_volumes(96).await else {
        return skip_without_root();
    };
    let vm = app.create_vm("tight", &[("root", 64 * MIB)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x11, 0, 30);
    let s1 = app.snapshot(&vm, "s1").await.id;
    write(&app.active_path(&vm, "root").await, 0x22, 30, 30);
    let regions = [(0x11, 0, 30), (0x22, 30, 30), (0, 60, 4)];

    // The merge copies 30 MiB; 10 are free.
    let filler = fill_leaving(&volumes.join("filler.bin"), 10);
    let (status, body) = app.delete(&format!("/v1/snapshots/{s1}")).await;
    assert_507(status, &body);
    assert!(body["needed_bytes"].as_u64().unwrap() > body["available_bytes"].as_u64().unwrap());
    let (_, snapshot) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(snapshot["status"], "ready", "{snapshot}");
    expect_all(&app.active_path(&vm, "root").await, &regions);

    // Nothing free at all: not even an empty overlay fits.
    std::fs::remove_file(&filler).unwrap();
    let filler = fill(&volumes.join("filler.bin"));
    let (status, body) = app
        .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s2"}))
        .await;
    assert_507(status, &body);
    let (_, list) = app.get(&format!("/v1/vms/{vm}/snapshots")).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");

    // Once space is back, the same requests work.
    std::fs::remove_file(&filler).unwrap();
    app.delete_snapshot(&s1).await;
    let active = app.active_path(&vm, "root").await;
    expect_all(&active, &regions);
    check_clean(&active);
}

#[tokio::test]
async fn a_merge_that_runs_out_of_space_in_the_middle_waits_and_resumes() {
    let Some((app, _volumes_fs, _data_fs, volumes)) = app_with_small_volumes(128).await else {
        return skip_without_root();
    };
    let vm = app.create_vm("squeezed", &[("root", 64 * MIB)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x11, 0, 40);
    let s1 = app.snapshot(&vm, "s1").await.id;
    // New clusters for the base: the commit has to allocate them.
    write(&app.active_path(&vm, "root").await, 0x22, 40, 20);
    let regions = [(0x11, 0, 40), (0x22, 40, 20), (0, 60, 4)];

    // Hold the job after it planned (the space check passed), fill the disk, let go:
    // the commit (past its point of no return) runs out of space.
    let mut app = app;
    app.restart(&[
        ("STRATA_FAULT", "snapshot_delete:planned:pause=1500"),
        ("STRATA_RESERVED_SPACE", "1048576"),
    ])
    .await;
    let (status, job) = app.delete(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let filler = fill(&volumes.join("filler.bin"));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (_, running) = app.get(&format!("/v1/jobs/{}", id(&job))).await;
    assert_eq!(running["status"], "running", "{running}");

    std::fs::remove_file(&filler).unwrap();
    let job = app.wait_job(id(&job)).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let active = app.active_path(&vm, "root").await;
    expect_all(&active, &regions);
    check_clean(&active);
    assert_eq!(chain(&active).len(), 1);
}

#[tokio::test]
async fn a_stream_that_runs_out_of_space_rolls_back_with_every_byte_in_place() {
    let Some((app, _volumes_fs, _data_fs, volumes)) = app_with_small_volumes(128).await else {
        return skip_without_root();
    };
    let vm = app.create_vm("rolled", &[("root", 96 * MIB)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x11, 0, 30);
    let s1 = app.snapshot(&vm, "s1").await.id;
    write(&app.active_path(&vm, "root").await, 0x22, 40, 40);
    let regions = [(0x11, 0, 30), (0, 30, 10), (0x22, 40, 40), (0, 80, 16)];

    let mut app = app;
    app.restart(&[
        ("STRATA_FAULT", "snapshot_delete:planned:pause=1500"),
        ("STRATA_RESERVED_SPACE", "1048576"),
    ])
    .await;
    let (status, job) = app.delete(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let filler = fill(&volumes.join("filler.bin"));
    let job = app.wait_job(id(&job)).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    assert_eq!(
        job.error.as_ref().map(|e| e.code.as_str()),
        Some("insufficient_storage"),
        "{job:?}"
    );
    std::fs::remove_file(&filler).unwrap();

    let (_, snapshot) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(snapshot["status"], "ready", "{snapshot}");
    let active = app.active_path(&vm, "root").await;
    expect_all(&active, &regions);
    check_clean(&active);
    expect(&app.snapshot_path(&vm, &s1, "root").await, 0x11, 0, 30);
    // And the delete works once there is room.
    app.delete_snapshot(&s1).await;
    expect_all(&app.active_path(&vm, "root").await, &regions);
}

/// The file name of a path.
fn name_of(path: &str) -> String {
    Path::new(path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Every volume file the API shows (each disk's chain and each snapshot's layers, of
/// every VM and template), with every file their backing chains read.
async fn referenced_files(app: &TestApp) -> std::collections::BTreeSet<String> {
    let mut shown = Vec::new();
    for list in ["/v1/vms?limit=1000", "/v1/templates?limit=1000"] {
        let (status, page) = app.get(list).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for item in page["items"].as_array().unwrap() {
            for disk in item["disks"].as_array().unwrap() {
                for layer in disk["chain"].as_array().unwrap() {
                    shown.push(layer["path"].as_str().unwrap().to_owned());
                }
            }
            let (_, snapshots) = app
                .get(&format!("/v1/vms/{}/snapshots?limit=1000", id(item)))
                .await;
            for snapshot in snapshots["items"].as_array().into_iter().flatten() {
                for volume in snapshot["volumes"].as_array().into_iter().flatten() {
                    shown.push(volume["path"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    shown
        .iter()
        .flat_map(chain)
        .map(|path| name_of(&path))
        .collect()
}

/// The qcow2 files in the volume directory are exactly those the API shows (or their
/// chains read), and each is clean.
async fn assert_files_match_records(app: &TestApp) {
    let on_disk: std::collections::BTreeSet<String> = app
        .volume_files()
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "qcow2"))
        .map(|f| name_of(&f.display().to_string()))
        .collect();
    assert_eq!(
        on_disk,
        referenced_files(app).await,
        "files on disk against the records"
    );
    for file in app.volume_files() {
        if file.extension().is_some_and(|e| e == "qcow2") {
            check_clean(&file);
        }
    }
}

#[tokio::test]
async fn clones_and_imports_that_do_not_fit_are_refused_up_front_with_nothing_changed() {
    let Some((app, _volumes_fs, _data_fs, volumes)) = app_with_small_volumes(96).await else {
        return skip_without_root();
    };
    let vm = app.create_vm("source", &[("root", 64 * MIB)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x33, 0, 30);
    let image = volumes.parent().unwrap().join("upload.qcow2");
    let image_text = image.display().to_string();
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &image_text, "64M"])
        .status()
        .unwrap();
    assert!(created.success());
    write(&image_text, 0x44, 0, 20);
    let before = referenced_files(&app).await;

    // A full clone copies 30 MiB and an import 20 MiB; 10 are free.
    let filler = fill_leaving(&volumes.join("filler.bin"), 10);
    let (status, body) = app
        .post(
            &format!("/v1/vms/{vm}/clone"),
            json!({"name": "copy", "mode": "full"}),
        )
        .await;
    assert_507(status, &body);
    let response = app
        .client
        .post(format!(
            "{}/v1/templates/import?name=imported&format=qcow2",
            app.base
        ))
        .header("content-type", "application/octet-stream")
        .body(std::fs::read(&image).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_507(status, &body);
    let (_, vms) = app.get("/v1/vms?limit=1000").await;
    assert_eq!(vms["items"].as_array().unwrap().len(), 1, "{vms}");
    let (_, templates) = app.get("/v1/templates?limit=1000").await;
    assert_eq!(
        templates["items"].as_array().unwrap().len(),
        0,
        "{templates}"
    );
    assert_eq!(referenced_files(&app).await, before);
    let uploads = volumes.parent().unwrap().join("imports");
    let left: Vec<_> = std::fs::read_dir(&uploads)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "an upload was left behind: {left:?}");

    // A linked clone copies nothing: it fits.
    let (status, job) = app
        .post(
            &format!("/v1/vms/{vm}/clone"),
            json!({"name": "linked", "mode": "linked"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(app.wait_job(id(&job)).await.status, JobStatus::Succeeded);

    // With the space back, the full clone and the import work.
    std::fs::remove_file(&filler).unwrap();
    let (status, job) = app
        .post(
            &format!("/v1/vms/{vm}/clone"),
            json!({"name": "copy", "mode": "full"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(app.wait_job(id(&job)).await.status, JobStatus::Succeeded);
    expect_all(&app.active_path(&vm, "root").await, &[(0x33, 0, 30)]);
    assert_files_match_records(&app).await;
}

/// The data directory (and so the database) on a small file system that is full, the
/// volumes on another with room: requests and jobs either are refused with 507 and
/// change nothing, or are acknowledged and happen, also across a kill -9, once space
/// is back.
#[tokio::test]
async fn with_the_database_file_system_full_jobs_are_refused_or_happen_whole() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_data_fs) = Tmpfs::mount(dir.path(), 48) else {
        return skip_without_root();
    };
    let volumes = dir.path().join("data").join("volumes");
    let Some(_volumes_fs) = Tmpfs::mount(&volumes, 256) else {
        return skip_without_root();
    };
    let filler_path = dir.path().join("filler");
    let mut app = TestApp::spawn_in(dir, &[("STRATA_RESERVED_SPACE", "1048576")]).await;
    let vm = app.create_vm("db-full", &[("root", 64 * MIB)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x11, 0, 20);
    let s1 = app.snapshot(&vm, "s1").await.id;
    write(&app.active_path(&vm, "root").await, 0x22, 20, 30);
    let s2 = app.snapshot(&vm, "s2").await.id;
    write(&app.active_path(&vm, "root").await, 0x33, 50, 4);
    let present = [(0x11, 0, 20), (0x22, 20, 30), (0x33, 50, 4)];

    // Fill the file system, then grow the database until it cannot grow any more.
    let filler = fill(&filler_path);
    let long = "y".repeat(100);
    let mut refused = 0;
    for i in 0..4000 {
        let (status, body) = app
            .post(
                "/v1/schedules",
                schedule_body(&vm, &format!("fill-{i:04}-{long}")),
            )
            .await;
        if status != StatusCode::CREATED {
            assert_507(status, &body);
            refused += 1;
            if refused >= 3 {
                break;
            }
        }
    }
    assert!(refused > 0, "the database never filled up");

    // Each request: a 507 that changed nothing, or a 202 whose job happens.
    let mut jobs = Vec::new();
    for (method, path, body) in [
        ("DELETE", format!("/v1/snapshots/{s1}"), None),
        (
            "POST",
            format!("/v1/vms/{vm}/snapshots"),
            Some(json!({"name": "s3"})),
        ),
        ("POST", format!("/v1/snapshots/{s2}/revert"), None),
    ] {
        let (status, answer) = match (method, body) {
            ("DELETE", _) => app.delete(&path).await,
            (_, Some(body)) => app.post(&path, body).await,
            (_, None) => app.post(&path, json!({})).await,
        };
        println!("{method} {path} on a full database: {status}");
        match status {
            StatusCode::ACCEPTED => jobs.push((path, answer)),
            _ => assert_507(status, &answer),
        }
    }
    let snapshots_while_full = app.get(&format!("/v1/vms/{vm}/snapshots")).await.1;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    // Space comes back: every acknowledged job ends, and nothing it did is lost.
    std::fs::remove_file(&filler).unwrap();
    for (path, job) in &jobs {
        let ended = app.wait_job(id(job)).await;
        assert_eq!(ended.status, JobStatus::Succeeded, "{path}: {ended:?}");
    }
    app.kill();
    app.restart(&[("STRATA_RESERVED_SPACE", "1048576")]).await;
    for (path, job) in &jobs {
        let (_, after) = app.get(&format!("/v1/jobs/{}", id(job))).await;
        assert_eq!(after["status"], "succeeded", "{path}: {after}");
    }
    let reverted = jobs.iter().any(|(path, _)| path.ends_with("/revert"));
    let active = app.active_path(&vm, "root").await;
    if reverted {
        expect_all(&active, &[(0x11, 0, 20), (0x22, 20, 30), (0, 50, 4)]);
    } else {
        expect_all(&active, &present);
    }
    expect_all(
        &app.snapshot_path(&vm, &s2, "root").await,
        &[(0x11, 0, 20), (0x22, 20, 30), (0, 50, 14)],
    );
    let s1_deleted = jobs.iter().any(|(path, _)| path.ends_with(&s1.to_string()));
    let (status, _) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(
        status,
        if s1_deleted {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        },
        "s1 while full: {snapshots_while_full}"
    );
    assert_files_match_records(&app).await;
    if s1_deleted || reverted {
        return; // the merge below needs s1 and the present as they were
    }

    // A merge in flight when the database fills: held after it planned, the file
    // system fills, and every journal entry it writes from then on fails. Once space
    // is back it finishes from its journal.
    app.kill();
    app.restart(&[
        ("STRATA_RESERVED_SPACE", "1048576"),
        ("STRATA_FAULT", "snapshot_delete:planned:pause=3000"),
    ])
    .await;
    let (status, job) = app.delete(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let filler = fill(&filler_path);
    for i in 0..4000 {
        let (status, _) = app
            .post(
                "/v1/schedules",
                schedule_body(&vm, &format!("again-{i:04}-{long}")),
            )
            .await;
        if status == StatusCode::INSUFFICIENT_STORAGE {
            break;
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    std::fs::remove_file(&filler).unwrap();
    let ended = app.wait_job(id(&job)).await;
    assert_eq!(ended.status, JobStatus::Succeeded, "{ended:?}");
    app.kill();
    app.restart(&[("STRATA_RESERVED_SPACE", "1048576")]).await;
    let (status, _) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    expect_all(&app.active_path(&vm, "root").await, &present);
    expect_all(
        &app.snapshot_path(&vm, &s2, "root").await,
        &[(0x11, 0, 20), (0x22, 20, 30), (0, 50, 14)],
    );
    assert_files_match_records(&app).await;
}
