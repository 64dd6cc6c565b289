//! Templates: converting a VM into one and back, copying a VM into one, deploying
//! single VMs and batches (linked and full), and the protection of a template's files
//! while VMs are linked to it.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

const DISK: u64 = 32 * MIB;

fn code(reply: &(StatusCode, Value)) -> (StatusCode, &str) {
    (reply.0, reply.1["code"].as_str().unwrap_or_default())
}

async fn template(app: &TestApp, id: &str) -> Value {
    let (status, view) = app.get(&format!("/v1/templates/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

/// A VM with a snapshot tree (two disks), converted into a template.
async fn golden(app: &TestApp, name: &str) -> (String, Vec<String>) {
    let vm = id(&app.create_vm(name, &[("root", DISK), ("data", DISK)]).await);
    write(&app.active_path(&vm, "root").await, 0x71, 0, 2);
    app.snapshot(&vm, "installed").await;
    write(&app.active_path(&vm, "root").await, 0x72, 2, 1);
    write(&app.active_path(&vm, "data").await, 0x73, 0, 1);
    let job = app
        .expect_job(
            app.post(&format!("/v1/vms/{vm}/convert-to-template"), json!({}))
                .await,
        )
        .await;
    assert_eq!(job["kind"], "vm_to_template");
    let view = template(app, &vm).await;
    let paths = view["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_owned())
        .collect();
    (vm, paths)
}

/// Deploy `count` linked VMs `web-1`.. from the template in one job; their ids.
async fn deploy_linked(app: &TestApp, template_id: &str, count: u32) -> Vec<String> {
    let job = app
        .expect_job(
            app.post(
                &format!("/v1/templates/{template_id}/deploy"),
                json!({"name": "web", "mode": "linked", "count": count}),
            )
            .await,
        )
        .await;
    assert_eq!(job["kind"], "template_deploy");
    job["detail"]["vm_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_vm_converted_to_a_template_is_collapsed_and_converts_back() {
    let app = TestApp::spawn().await;
    let (id, paths) = golden(&app, "golden").await;
    // No longer a VM; one file per disk holding the present state.
    let (status, problem) = app.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let (_, vms) = app.get("/v1/vms").await;
    assert!(vms["items"].as_array().unwrap().is_empty());
    let view = template(&app, &id).await;
    assert_eq!(view["status"], "ready");
    assert_eq!(view["name"], "golden");
    assert_eq!(view["linked_vm_count"], 0);
    assert_eq!(chain(&paths[0]).len(), 1);
    expect_all(&paths[0], &[(0x71, 0, 2), (0x72, 2, 1)]);
    expect_all(&paths[1], &[(0x73, 0, 1)]);
    check_clean(&paths[0]);
    assert_eq!(app.volume_files().len(), 2);
    let (_, list) = app.get("/v1/templates?name=golden").await;
    assert_eq!(list["items"][0]["id"], id.as_str());
    // VM endpoints do not reach a template.
    let reply = app
        .post(&format!("/v1/vms/{id}/snapshots"), json!({"name": "x"}))
        .await;
    assert_eq!(code(&reply), (StatusCode::NOT_FOUND, "vm_not_found"));

    let job = app
        .expect_job(
            app.post(&format!("/v1/templates/{id}/convert-to-vm"), json!({}))
                .await,
        )
        .await;
    assert_eq!(job["kind"], "template_to_vm");
    let vm = app.vm(&id).await;
    assert_eq!(vm["status"], "ready");
    assert_eq!(vm["state"], "stopped");
    let (status, _) = app.get(&format!("/v1/templates/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    expect_all(
        &app.active_path(&id, "root").await,
        &[(0x71, 0, 2), (0x72, 2, 1)],
    );
}

#[tokio::test]
async fn a_batch_of_linked_vms_deploys_in_one_job_and_protects_the_template() {
    let app = TestApp::spawn().await;
    let (template_id, paths) = golden(&app, "base").await;
    let ids = deploy_linked(&app, &template_id, 5).await;
    assert_eq!(ids.len(), 5);
    for (i, vm_id) in ids.iter().enumerate() {
        let vm = app.vm(vm_id).await;
        assert_eq!(vm["name"], format!("web-{}", i + 1));
        assert_eq!(vm["status"], "ready");
        assert_eq!(vm["template_id"], template_id.as_str());
        let root = app.active_path(vm_id, "root").await;
        assert_eq!(
            chain(&root).len(),
            2,
            "a linked VM is an overlay on the template"
        );
        expect_all(&root, &[(0x71, 0, 2), (0x72, 2, 1)]);
        // Each VM writes only to itself.
        write(&root, 0x80 + i as u8, 8, 1);
    }
    expect(&app.active_path(&ids[0], "root").await, 0x80, 8, 1);
    expect(&paths[0], 0, 8, 1);
    let view = template(&app, &template_id).await;
    assert_eq!(view["linked_vm_count"], 5);

    // While VMs are linked, the template can neither go nor become a VM again.
    for reply in [
        app.delete(&format!("/v1/templates/{template_id}")).await,
        app.post(
            &format!("/v1/templates/{template_id}/convert-to-vm"),
            json!({}),
        )
        .await,
    ] {
        assert_eq!(code(&reply), (StatusCode::CONFLICT, "has_dependents"));
        assert_eq!(reply.1["dependent_vms"].as_array().unwrap().len(), 5);
    }
    assert_eq!(template(&app, &template_id).await["status"], "ready");

    // Deleted or flattened, they let it go; the flattened one keeps its bytes.
    for vm_id in &ids[1..] {
        app.expect_job(app.delete(&format!("/v1/vms/{vm_id}")).await)
            .await;
    }
    let vm = app.vm(&ids[0]).await;
    for disk in vm["disks"].as_array().unwrap() {
        let disk_id = disk["id"].as_str().unwrap();
        app.expect_job(
            app.post(
                &format!("/v1/vms/{}/disks/{disk_id}/flatten", ids[0]),
                json!({}),
            )
            .await,
        )
        .await;
    }
    app.expect_job(app.delete(&format!("/v1/templates/{template_id}")).await)
        .await;
    let root = app.active_path(&ids[0], "root").await;
    expect_all(&root, &[(0x71, 0, 2), (0x72, 2, 1), (0x80, 8, 1)]);
    expect(&app.active_path(&ids[0], "data").await, 0x73, 0, 1);
    check_clean(&root);
    assert_eq!(app.volume_files().len(), 2);
}

#[tokio::test]
async fn a_full_deploy_and_a_template_copied_from_a_vm_are_independent() {
    let app = TestApp::spawn().await;
    let vm = id(&app.create_vm("builder", &[("root", DISK)]).await);
    write(&app.active_path(&vm, "root").await, 0x91, 0, 3);
    let s1 = app.snapshot(&vm, "s1").await;
    write(&app.active_path(&vm, "root").await, 0x92, 3, 1);

    // A template copied from the VM's snapshot; the VM stays and keeps its tree.
    let job = app
        .expect_job(
            app.post(
                "/v1/templates",
                json!({"name": "from-s1", "from_vm_id": vm, "snapshot_id": s1}),
            )
            .await,
        )
        .await;
    assert_eq!(job["kind"], "template_create");
    let template_id = job["target"]["id"].as_str().unwrap().to_owned();
    let view = template(&app, &template_id).await;
    assert_eq!(view["source_vm_id"], vm.as_str());
    let template_path = view["disks"][0]["path"].as_str().unwrap().to_owned();
    assert_eq!(chain(&template_path).len(), 1);
    compare(&template_path, &app.snapshot_path(&vm, &s1, "root").await);
    assert_eq!(app.vm(&vm).await["current_snapshot_id"], s1.as_str());

    let job = app
        .expect_job(
            app.post(
                &format!("/v1/templates/{template_id}/deploy"),
                json!({"name": "solo", "mode": "full"}),
            )
            .await,
        )
        .await;
    let solo = job["target"]["id"].as_str().unwrap().to_owned();
    let solo_root = app.active_path(&solo, "root").await;
    assert_eq!(chain(&solo_root).len(), 1);
    assert_eq!(template(&app, &template_id).await["linked_vm_count"], 0);
    // Nothing depends on the template or the VM: both can go, the copies stay.
    app.expect_job(app.delete(&format!("/v1/templates/{template_id}")).await)
        .await;
    app.expect_job(app.delete(&format!("/v1/vms/{vm}")).await)
        .await;
    expect_all(&solo_root, &[(0x91, 0, 3), (0, 3, 1)]);
    check_clean(&solo_root);
}

#[tokio::test]
async fn template_requests_are_validated_and_change_nothing_when_refused() {
    let app = TestApp::spawn().await;
    let (template_id, _) = golden(&app, "t").await;
    let vm = id(&app.create_vm("v", &[("root", DISK)]).await);
    let deploy = format!("/v1/templates/{template_id}/deploy");
    let cases: Vec<(String, Value, StatusCode, &str)> = vec![
        (
            deploy.clone(),
            json!({"name": "x", "mode": "linked", "count": 0}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            deploy.clone(),
            json!({"name": "x", "mode": "linked", "count": 1001}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            deploy.clone(),
            json!({"name": "", "mode": "linked"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            deploy.clone(),
            json!({"name": "x", "mode": "copy"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            deploy.clone(),
            json!({"name": "v", "mode": "linked"}),
            StatusCode::CONFLICT,
            "name_taken",
        ),
        (
            deploy.clone(),
            json!({"name": "t", "mode": "full"}),
            StatusCode::CONFLICT,
            "name_taken",
        ),
        (
            format!("/v1/templates/{UNKNOWN_ID}/deploy"),
            json!({"name": "x", "mode": "linked"}),
            StatusCode::NOT_FOUND,
            "template_not_found",
        ),
        (
            format!("/v1/templates/{vm}/deploy"),
            json!({"name": "x", "mode": "linked"}),
            StatusCode::NOT_FOUND,
            "template_not_found",
        ),
        (
            "/v1/templates".into(),
            json!({"name": "n", "from_vm_id": UNKNOWN_ID}),
            StatusCode::NOT_FOUND,
            "vm_not_found",
        ),
        (
            "/v1/templates".into(),
            json!({"name": "n", "from_vm_id": template_id}),
            StatusCode::NOT_FOUND,
            "vm_not_found",
        ),
        (
            "/v1/templates".into(),
            json!({"name": "v", "from_vm_id": vm}),
            StatusCode::CONFLICT,
            "name_taken",
        ),
        (
            "/v1/templates".into(),
            json!({"name": "n"}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            format!("/v1/vms/{template_id}/convert-to-template"),
            json!({}),
            StatusCode::NOT_FOUND,
            "vm_not_found",
        ),
        (
            format!("/v1/templates/{vm}/convert-to-vm"),
            json!({}),
            StatusCode::NOT_FOUND,
            "template_not_found",
        ),
    ];
    for (path, body, status, expected) in cases {
        let reply = app.post(&path, body.clone()).await;
        assert_eq!(
            code(&reply),
            (status, expected),
            "{path} {body}: {}",
            reply.1
        );
    }
    // A 1,000-name batch where one name is taken changes nothing either.
    let (_, vms) = app.get("/v1/vms").await;
    assert_eq!(vms["items"].as_array().unwrap().len(), 1);
    // Running VMs are not converted.
    app.patch(&format!("/v1/vms/{vm}"), json!({"state": "running"}))
        .await;
    let reply = app
        .post(&format!("/v1/vms/{vm}/convert-to-template"), json!({}))
        .await;
    assert_eq!(code(&reply), (StatusCode::CONFLICT, "vm_running"));
    let reply = app.delete(&format!("/v1/templates/{UNKNOWN_ID}")).await;
    assert_eq!(code(&reply), (StatusCode::NOT_FOUND, "template_not_found"));
}

#[tokio::test]
async fn a_conversion_that_cannot_go_ahead_leaves_the_vm_and_its_snapshots_usable() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=1500")]).await;
    let vm = id(&app.create_vm("convertible", &[("root", DISK)]).await);
    write(&app.active_path(&vm, "root").await, 0x55, 0, 1);
    let s1 = app.snapshot(&vm, "s1").await;
    // A linked clone of s1 is accepted first; the conversion would collapse the layer
    // the clone is about to read, so it is refused at once, not accepted and failed.
    let (status, clone_job) = app
        .post(
            &format!("/v1/vms/{vm}/clone"),
            json!({"name": "reader", "mode": "linked", "snapshot_id": s1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{clone_job}");
    let (status, refusal) = app
        .post(&format!("/v1/vms/{vm}/convert-to-template"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refusal}");
    assert_eq!(refusal["code"], "has_dependents");
    assert_eq!(app.wait_job_end(&clone_job).await["status"], "succeeded");
    // Once the clone exists, the same answer.
    let (status, refusal) = app
        .post(&format!("/v1/vms/{vm}/convert-to-template"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refusal}");
    assert_eq!(refusal["code"], "has_dependents");
    assert_eq!(app.vm(&vm).await["status"], "ready");
    let (_, snapshot) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(snapshot["status"], "ready", "{snapshot}");
    // Still a VM that works: it takes snapshots and reverts.
    let s2 = app.snapshot(&vm, "s2").await;
    app.revert(&s1).await;
    app.delete_snapshot(&s2).await;
    expect(&app.active_path(&vm, "root").await, 0x55, 0, 1);
}

#[tokio::test]
async fn a_cancelled_conversion_puts_the_vm_back() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_to_template:planned:pause=1500")]).await;
    let vm = id(&app.create_vm("undecided", &[("root", DISK)]).await);
    write(&app.active_path(&vm, "root").await, 0x56, 0, 1);
    let s1 = app.snapshot(&vm, "s1").await;
    write(&app.active_path(&vm, "root").await, 0x57, 1, 1);
    let (status, convert) = app
        .post(&format!("/v1/vms/{vm}/convert-to-template"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(app.vm(&vm).await["status"], "creating");
    // Wait for the job to reach its pause, then cancel it.
    for _ in 0..100 {
        let (_, job) = app
            .get(&format!("/v1/jobs/{}", convert["id"].as_str().unwrap()))
            .await;
        if job["status"] == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.post(
        &format!("/v1/jobs/{}/cancel", convert["id"].as_str().unwrap()),
        json!({}),
    )
    .await;
    let ended = app.wait_job_end(&convert).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!(app.vm(&vm).await["status"], "ready");
    let (_, snapshot) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(snapshot["status"], "ready");
    expect_all(
        &app.active_path(&vm, "root").await,
        &[(0x56, 0, 1), (0x57, 1, 1)],
    );
    check_clean(&app.active_path(&vm, "root").await);
}

#[tokio::test]
async fn deleting_a_template_with_flatten_dependents_makes_its_linked_vms_standalone_first() {
    let app = TestApp::spawn().await;
    let (template_id, _) = golden(&app, "base").await;
    let ids = deploy_linked(&app, &template_id, 2).await;
    let root = app.active_path(&ids[0], "root").await;
    write(&root, 0x90, 8, 1);

    // A linked VM that runs cannot be flattened: refused, nothing changes.
    app.patch(&format!("/v1/vms/{}", ids[1]), json!({"state": "running"}))
        .await;
    let path = format!("/v1/templates/{template_id}?flatten_dependents=true");
    let reply = app.delete(&path).await;
    assert_eq!(code(&reply), (StatusCode::CONFLICT, "vm_running"));
    assert_eq!(template(&app, &template_id).await["status"], "ready");
    assert_eq!(chain(&root).len(), 2);
    app.patch(&format!("/v1/vms/{}", ids[1]), json!({"state": "stopped"}))
        .await;

    let job = app.expect_job(app.delete(&path).await).await;
    assert_eq!(job["kind"], "vm_delete");
    let (status, _) = app.get(&format!("/v1/templates/{template_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for vm_id in &ids {
        let vm = app.vm(vm_id).await;
        for disk in vm["disks"].as_array().unwrap() {
            let path = disk["active_path"].as_str().unwrap();
            assert_eq!(chain(path).len(), 1, "standalone: {path}");
            check_clean(path);
        }
        let data = app.active_path(vm_id, "data").await;
        expect(&data, 0x73, 0, 1);
    }
    expect_all(&root, &[(0x71, 0, 2), (0x72, 2, 1), (0x90, 8, 1)]);
    expect_all(
        &app.active_path(&ids[1], "root").await,
        &[(0x71, 0, 2), (0x72, 2, 1)],
    );
    // Only the two VMs' files are left, one per disk.
    assert_eq!(app.volume_files().len(), 4);
}
