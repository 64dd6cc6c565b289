//! Template export and import: a round trip gives identical content, the manifest's
//! digests match the downloads, and every hostile import is refused with its own code
//! and leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

const DISK: u64 = 32 * MIB;

fn qemu_img(args: &[&str]) {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        output.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

async fn download(app: &TestApp, path: &str, to: &Path) -> reqwest::header::HeaderMap {
    let response = app
        .client
        .get(format!("{}{path}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    std::fs::write(to, response.bytes().await.unwrap()).unwrap();
    headers
}

async fn upload(app: &TestApp, query: &str, file: Option<&Path>) -> (StatusCode, Value) {
    let body = file.map(|f| std::fs::read(f).unwrap()).unwrap_or_default();
    let response = app
        .client
        .post(format!("{}/v1/templates/import?{query}", app.base))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A template with two disks, made from a VM with a snapshot.
async fn template(app: &TestApp) -> Value {
    let vm = app
        .create_vm("golden", &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(&app.active_path(&vm, "root").await, 0x71, 0, 2);
    app.snapshot(&vm, "s1").await;
    write(&app.active_path(&vm, "root").await, 0x72, 4, 1);
    write(&app.active_path(&vm, "data").await, 0x73, 1, 1);
    app.expect_job(
        app.post(&format!("/v1/vms/{vm}/convert-to-template"), json!({}))
            .await,
    )
    .await;
    app.get(&format!("/v1/templates/{vm}")).await.1
}

#[tokio::test]
async fn an_exported_template_imports_to_identical_content_with_matching_digests() {
    let app = TestApp::spawn().await;
    let original = template(&app).await;
    let tid = id(&original);
    let work = tempfile::tempdir().unwrap();
    let (_, manifest) = app.get(&format!("/v1/templates/{tid}/manifest")).await;
    assert_eq!(manifest["disks"].as_array().unwrap().len(), 2, "{manifest}");
    for (n, disk) in manifest["disks"].as_array().unwrap().iter().enumerate() {
        let file = work.path().join(format!("disk{n}.qcow2"));
        let headers = download(&app, disk["url"].as_str().unwrap(), &file).await;
        assert_eq!(
            headers["content-length"].to_str().unwrap(),
            disk["export_bytes"].as_u64().unwrap().to_string()
        );
        assert!(
            headers["content-disposition"]
                .to_str()
                .unwrap()
                .contains("golden-")
        );
        assert_eq!(sha256(&file), disk["sha256"].as_str().unwrap());
        let source = original["disks"][n]["path"].as_str().unwrap();
        compare(file.to_str().unwrap(), source);
        assert_eq!(
            chain(file.to_str().unwrap()).len(),
            1,
            "the export is self-contained"
        );

        // Imported elsewhere (here: the same service), the content is identical.
        let (status, job) = upload(&app, &format!("name=copy-{n}&format=qcow2"), Some(&file)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let job = app.wait_job(id(&job)).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
        assert_eq!(job.kind, JobKind::TemplateImport);
        let (_, imported) = app.get(&format!("/v1/templates/{}", job.target.id)).await;
        assert_eq!(imported["status"], "ready");
        assert_eq!(imported["disks"][0]["name"], "root");
        assert_eq!(imported["disks"][0]["size_bytes"], DISK);
        compare(imported["disks"][0]["path"].as_str().unwrap(), source);
        check_clean(imported["disks"][0]["path"].as_str().unwrap());
    }

    // Compressed: made on the fly (chunked), identical content, cached afterwards.
    let packed = work.path().join("packed.qcow2");
    let headers = download(
        &app,
        &format!("/v1/templates/{tid}/export?disk=root&compress=true"),
        &packed,
    )
    .await;
    assert!(
        headers.get("content-length").is_none(),
        "made while streaming: chunked"
    );
    compare(
        packed.to_str().unwrap(),
        original["disks"][0]["path"].as_str().unwrap(),
    );
    let (_, compressed) = app
        .get(&format!("/v1/templates/{tid}/manifest?compress=true"))
        .await;
    assert_eq!(compressed["compressed"], true);
    assert_eq!(
        sha256(&packed),
        compressed["disks"][0]["sha256"].as_str().unwrap()
    );
    let again = work.path().join("again.qcow2");
    let headers = download(
        &app,
        &format!("/v1/templates/{tid}/export?disk=root&compress=true"),
        &again,
    )
    .await;
    assert!(
        headers.get("content-length").is_some(),
        "kept: sent with its length"
    );

    // A raw image imports too.
    let raw = work.path().join("disk.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        original["disks"][1]["path"].as_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let (status, job) = upload(&app, "name=from-raw&format=raw&disk_name=data", Some(&raw)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job = app.wait_job(id(&job)).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let (_, imported) = app.get(&format!("/v1/templates/{}", job.target.id)).await;
    compare(
        imported["disks"][0]["path"].as_str().unwrap(),
        original["disks"][1]["path"].as_str().unwrap(),
    );

    // Asking without naming one of several disks, or a disk that does not exist.
    let (status, problem) = app.get(&format!("/v1/templates/{tid}/export")).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query"))
    );
    let (status, problem) = app
        .get(&format!("/v1/templates/{tid}/export?disk=nope"))
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("disk_not_found"))
    );
    // The uploads are gone once imported.
    let staged: Vec<_> = std::fs::read_dir(app.data_dir.join("imports"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
}

/// Files to refuse, each with the format it is declared as and the code expected.
fn hostile_images(dir: &Path) -> Vec<(String, PathBuf, &'static str, &'static str)> {
    let path = |name: &str| dir.join(name);
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let mut cases = Vec::new();

    let backing = path("backing.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        &s(&backing),
        "1M",
    ]);
    cases.push((
        "backing file /etc/passwd".into(),
        backing,
        "qcow2",
        "image_has_backing_file",
    ));

    let data_file = path("data-file.qcow2");
    let data_target = path("data-file.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&data_target)),
        &s(&data_file),
        "1M",
    ]);
    cases.push((
        "external data file".into(),
        data_file,
        "qcow2",
        "image_has_data_file",
    ));

    let huge = path("huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&huge), "100T"]);
    cases.push((
        "virtual size of 100 TiB".into(),
        huge,
        "qcow2",
        "image_too_large",
    ));

    let truncated = path("truncated.qcow2");
    let whole = path("whole.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&whole), "16M"]);
    std::fs::write(&truncated, &std::fs::read(&whole).unwrap()[..60]).unwrap();
    cases.push((
        "truncated header".into(),
        truncated,
        "qcow2",
        "image_truncated",
    ));

    let cut_tables = path("cut.qcow2");
    std::fs::write(&cut_tables, &std::fs::read(&whole).unwrap()[..4096]).unwrap();
    cases.push((
        "tables past the end of the file".into(),
        cut_tables,
        "qcow2",
        "image_truncated",
    ));

    let raw = path("plain.raw");
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    cases.push((
        "raw file declared qcow2".into(),
        raw,
        "qcow2",
        "image_format_mismatch",
    ));

    cases.push((
        "qcow2 file declared raw".into(),
        whole,
        "raw",
        "image_format_mismatch",
    ));

    let encrypted = path("encrypted.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=hunter2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        &s(&encrypted),
        "1M",
    ]);
    cases.push((
        "LUKS-encrypted qcow2".into(),
        encrypted,
        "qcow2",
        "image_encrypted",
    ));

    let empty = path("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    cases.push(("empty file".into(), empty, "raw", "image_invalid"));
    cases
}

#[tokio::test]
async fn hostile_imports_are_refused_with_their_code_and_leave_nothing_behind() {
    let import_dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn_with(&[
        ("STRATA_IMPORT_DIR", import_dir.path().to_str().unwrap()),
        ("STRATA_IMPORT_MAX_BYTES", &(8 * MIB).to_string()),
    ])
    .await;
    let files_before = app.volume_files();
    for (what, file, format, code) in hostile_images(import_dir.path()) {
        let (status, problem) =
            upload(&app, &format!("name=evil&format={format}"), Some(&file)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}: {problem}"
        );
        assert_eq!(problem["code"], code, "{what}: {problem}");
        // The same file named by path inside the import directory: the same answer.
        let name = file.file_name().unwrap().to_str().unwrap();
        let (status, by_path) = upload(
            &app,
            &format!("name=evil&format={format}&path={name}"),
            None,
        )
        .await;
        assert_eq!(
            (status, &by_path["code"]),
            (StatusCode::UNPROCESSABLE_ENTITY, &problem["code"]),
            "{what} by path: {by_path}"
        );
    }
    // Paths out of the import directory, and bodies over the limit.
    for path in ["../etc/passwd", "/etc/passwd", "nope.qcow2", "."] {
        let (status, problem) =
            upload(&app, &format!("name=evil&format=raw&path={path}"), None).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("import_path_refused")),
            "{path}: {problem}"
        );
    }
    std::os::unix::fs::symlink("/etc/passwd", import_dir.path().join("link")).unwrap();
    let (status, problem) = upload(&app, "name=evil&format=raw&path=link", None).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("import_path_refused")),
        "{problem}"
    );
    std::fs::hard_link(
        import_dir.path().join("plain.raw"),
        import_dir.path().join("twin.raw"),
    )
    .unwrap();
    let (status, problem) = upload(&app, "name=evil&format=raw&path=twin.raw", None).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("import_path_refused")),
        "a hard link: {problem}"
    );
    let big = import_dir.path().join("big.raw");
    std::fs::write(&big, vec![0u8; 9 << 20]).unwrap();
    let (status, problem) = upload(&app, "name=evil&format=raw", Some(&big)).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")),
        "{problem}"
    );
    let small = import_dir.path().join("plain.raw");
    let (status, problem) = upload(&app, "name=evil&format=vmdk", Some(&small)).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query")),
        "{problem}"
    );

    // Nothing was recorded or left on disk.
    let (_, templates) = app.get("/v1/templates").await;
    assert!(
        templates["items"].as_array().unwrap().is_empty(),
        "{templates}"
    );
    assert_eq!(app.volume_files(), files_before);
    let staged: Vec<_> = std::fs::read_dir(app.data_dir.join("imports"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "uploads left behind: {staged:?}");
    // The import directory's files are untouched (copied, never moved).
    assert!(import_dir.path().join("whole.qcow2").exists());
}

#[tokio::test]
async fn a_template_flattened_under_its_exports_gets_fresh_ones() {
    let app = TestApp::spawn().await;
    let source = app.create_vm("source", &[("root", DISK)]).await.id;
    write(&app.active_path(&source, "root").await, 0x21, 0, 1);
    let s1 = app.snapshot(&source, "s1").await.id;
    let job = app
        .expect_job(
            app.post(
                &format!("/v1/vms/{source}/clone"),
                json!({"name": "linked", "mode": "linked", "snapshot_id": s1}),
            )
            .await,
        )
        .await;
    let linked = job.target.id.to_string();
    write(&app.active_path(&linked, "root").await, 0x22, 1, 1);
    app.expect_job(
        app.post(&format!("/v1/vms/{linked}/convert-to-template"), json!({}))
            .await,
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let (_, before) = app.get(&format!("/v1/templates/{linked}/manifest")).await;
    let first = work.path().join("first.qcow2");
    download(&app, before["disks"][0]["url"].as_str().unwrap(), &first).await;
    assert_eq!(
        sha256(&first),
        before["disks"][0]["sha256"].as_str().unwrap()
    );

    // Deleting the source flattens the template: its file changes, its bytes do not.
    app.expect_job(
        app.delete(&format!("/v1/vms/{source}?flatten_dependents=true"))
            .await,
    )
    .await;
    let (_, after) = app.get(&format!("/v1/templates/{linked}/manifest")).await;
    let second = work.path().join("second.qcow2");
    let headers = download(&app, after["disks"][0]["url"].as_str().unwrap(), &second).await;
    assert_eq!(
        sha256(&second),
        after["disks"][0]["sha256"].as_str().unwrap()
    );
    assert_eq!(
        headers["content-length"].to_str().unwrap(),
        after["disks"][0]["export_bytes"]
            .as_u64()
            .unwrap()
            .to_string()
    );
    compare(first.to_str().unwrap(), second.to_str().unwrap());
    expect_all(second.to_str().unwrap(), &[(0x21, 0, 1), (0x22, 1, 1)]);
}

#[tokio::test]
async fn a_deleted_template_takes_its_export_files_with_it() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("golden", &[("root", DISK)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x31, 0, 1);
    app.expect_job(
        app.post(&format!("/v1/vms/{vm}/convert-to-template"), json!({}))
            .await,
    )
    .await;
    // A compressed export is written into <data>/exports and kept for later requests.
    let (_, manifest) = app
        .get(&format!("/v1/templates/{vm}/manifest?compress=true"))
        .await;
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("root.qcow2");
    download(&app, manifest["disks"][0]["url"].as_str().unwrap(), &file).await;
    expect(file.to_str().unwrap(), 0x31, 0, 1);
    let exports = app.data_dir.join("exports");
    let listed = || -> Vec<String> {
        std::fs::read_dir(&exports)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(listed().len(), 1, "{:?}", listed());

    app.expect_job(app.delete(&format!("/v1/templates/{vm}")).await)
        .await;
    assert!(listed().is_empty(), "exports left behind: {:?}", listed());
    assert!(app.volume_files().is_empty());
}

#[tokio::test]
async fn a_stalled_upload_is_ended_and_leaves_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(&[("STRATA_REQUEST_TIMEOUT", "1")]).await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /v1/templates/import?name=slow&format=raw HTTP/1.1\r\nHost: {address}\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // One chunk of 512 bytes, then nothing: the service must not wait for ever.
    stream.write_all(b"200\r\n").await.unwrap();
    stream.write_all(&[0u8; 512]).await.unwrap();
    stream.write_all(b"\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "the service kept waiting for the stalled upload"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    let staged: Vec<_> = std::fs::read_dir(app.data_dir.join("imports"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    let (_, templates) = app.get("/v1/templates").await;
    assert!(templates["items"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn imports_beyond_the_slots_are_refused_with_503_and_retry_after() {
    // One slot, held by an import whose conversion is paused.
    let app = TestApp::spawn_with(&[
        ("STRATA_IMPORT_SLOTS", "1"),
        ("STRATA_FAULT", "template_import:planned:pause=3000"),
    ])
    .await;
    app.wait_ready().await;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("small.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        "16M",
    ]);

    let (status, first) = upload(&app, "name=first&format=qcow2", Some(&image)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    for _ in 0..100 {
        let (_, job) = app.get(&format!("/v1/jobs/{}", id(&first))).await;
        if job["status"] == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let body = std::fs::read(&image).unwrap();
    let reply = send(
        &app,
        reqwest::Method::POST,
        "/v1/templates/import?name=second&format=qcow2",
        Some("application/octet-stream"),
        Some(body),
    )
    .await;
    assert_problem(&reply, StatusCode::SERVICE_UNAVAILABLE, "imports_busy");
    assert_eq!(reply.headers["retry-after"], "5");
    let (_, templates) = app.get("/v1/templates").await;
    assert_eq!(
        templates["items"].as_array().unwrap().len(),
        1,
        "{templates}"
    );
    assert_eq!(
        std::fs::read_dir(app.data_dir.join("imports"))
            .map(|d| d.count())
            .unwrap_or(0),
        1,
        "only the first upload is kept"
    );

    // The slot comes back when the first import ends.
    assert_eq!(app.wait_job(id(&first)).await.status, JobStatus::Succeeded);
    let (status, second) = upload(&app, "name=second&format=qcow2", Some(&image)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{second}");
    assert_eq!(app.wait_job(id(&second)).await.status, JobStatus::Succeeded);
}
