//! Templates: converting a VM into one and back, copying a VM into one, deploying
//! single VMs and batches (linked and full), and the protection of a template's files
//! while VMs are linked to it.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

const DISK: u64 = 32 * MIB;

/// `POST path` with `{}` (a conversion or a flatten), run to its end.
async fn post_job(app: &TestApp, path: &str) -> JobView {
    app.run_job(Method::POST, path, Some(json!({}))).await
}

/// A VM with a snapshot tree (two disks), converted into a template.
async fn golden(app: &TestApp, name: &str) -> (Uuid, Vec<String>) {
    let vm = app
        .create_vm(name, &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(app.active_path(vm, "root").await, 0x71, 0, 2);
    app.snapshot(vm, "installed").await;
    write(app.active_path(vm, "root").await, 0x72, 2, 1);
    write(app.active_path(vm, "data").await, 0x73, 0, 1);
    let job = post_job(app, &format!("/v1/vms/{vm}/convert-to-template")).await;
    assert_eq!(job.kind, JobKind::VmToTemplate);
    let view = app.template(vm).await;
    let paths = view
        .disks
        .into_iter()
        .map(|d| d.path.expect("a ready template's disk has a file"))
        .collect();
    (vm, paths)
}

/// Deploy `count` linked VMs `web-1`.. from the template in one job; their ids.
async fn deploy_linked(app: &TestApp, template_id: Uuid, count: u32) -> Vec<Uuid> {
    let job = app
        .run_job(
            Method::POST,
            &format!("/v1/templates/{template_id}/deploy"),
            Some(json!({"name": "web", "mode": "linked", "count": count})),
        )
        .await;
    assert_eq!(job.kind, JobKind::TemplateDeploy);
    job.vm_ids().to_vec()
}

#[tokio::test]
async fn a_vm_converted_to_a_template_is_collapsed_and_converts_back() {
    let app = TestApp::spawn().await;
    let (id, paths) = golden(&app, "golden").await;
    // No longer a VM; one file per disk holding the present state.
    let (status, problem) = app.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let vms: VmList = app.get_as("/v1/vms").await;
    assert!(vms.items.is_empty());
    let view = app.template(id).await;
    assert_eq!(view.status, ResourceStatus::Ready);
    assert_eq!(view.name, "golden");
    assert_eq!(view.linked_vm_count, 0);
    assert_eq!(chain(&paths[0]).len(), 1);
    expect_all(&paths[0], &[(0x71, 0, 2), (0x72, 2, 1)]);
    expect_all(&paths[1], &[(0x73, 0, 1)]);
    check_clean(&paths[0]);
    assert_eq!(app.volume_files().len(), 2);
    let list: TemplateList = app.get_as("/v1/templates?name=golden").await;
    assert_eq!(list.items[0].id, id);
    // VM endpoints do not reach a template.
    app.expect_problem(
        Method::POST,
        &format!("/v1/vms/{id}/snapshots"),
        Some(json!({"name": "x"})),
        StatusCode::NOT_FOUND,
        "vm_not_found",
    )
    .await;

    let job = post_job(&app, &format!("/v1/templates/{id}/convert-to-vm")).await;
    assert_eq!(job.kind, JobKind::TemplateToVm);
    let vm = app.vm(id).await;
    assert_eq!(vm.status, ResourceStatus::Ready);
    assert_eq!(vm.state, VmState::Stopped);
    let (status, _) = app.get(&format!("/v1/templates/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    expect_all(
        app.active_path(id, "root").await,
        &[(0x71, 0, 2), (0x72, 2, 1)],
    );
}

#[tokio::test]
async fn a_batch_of_linked_vms_deploys_in_one_job_and_protects_the_template() {
    let app = TestApp::spawn().await;
    let (template_id, paths) = golden(&app, "base").await;
    let ids = deploy_linked(&app, template_id, 5).await;
    assert_eq!(ids.len(), 5);
    for (i, vm_id) in ids.iter().enumerate() {
        let vm = app.vm(vm_id).await;
        assert_eq!(vm.name, format!("web-{}", i + 1));
        assert_eq!(vm.status, ResourceStatus::Ready);
        assert_eq!(vm.template_id, Some(template_id));
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
    expect(app.active_path(ids[0], "root").await, 0x80, 8, 1);
    expect(&paths[0], 0, 8, 1);
    assert_eq!(app.template(template_id).await.linked_vm_count, 5);

    // While VMs are linked, the template can neither go nor become a VM again.
    let template = format!("/v1/templates/{template_id}");
    for (method, path, body) in [
        (Method::DELETE, template.clone(), None),
        (
            Method::POST,
            format!("{template}/convert-to-vm"),
            Some(json!({})),
        ),
    ] {
        let refused = app
            .expect_problem(method, &path, body, StatusCode::CONFLICT, "has_dependents")
            .await;
        assert_eq!(refused.dependent_vms.map(|vms| vms.len()), Some(5));
    }
    assert_eq!(
        app.template(template_id).await.status,
        ResourceStatus::Ready
    );

    // Deleted or flattened, they let it go; the flattened one keeps its bytes.
    for vm_id in &ids[1..] {
        app.delete_vm(vm_id).await;
    }
    let vm = app.vm(ids[0]).await;
    for disk in &vm.disks {
        post_job(
            &app,
            &format!("/v1/vms/{}/disks/{}/flatten", vm.id, disk.id),
        )
        .await;
    }
    app.run_job(Method::DELETE, &template, None).await;
    let root = app.active_path(ids[0], "root").await;
    expect_all(&root, &[(0x71, 0, 2), (0x72, 2, 1), (0x80, 8, 1)]);
    expect(app.active_path(ids[0], "data").await, 0x73, 0, 1);
    check_clean(&root);
    assert_eq!(app.volume_files().len(), 2);
}

#[tokio::test]
async fn a_full_deploy_and_a_template_copied_from_a_vm_are_independent() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("builder", &[("root", DISK)]).await.id;
    write(app.active_path(vm, "root").await, 0x91, 0, 3);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x92, 3, 1);

    // A template copied from the VM's snapshot; the VM stays and keeps its tree.
    let job = app
        .run_job(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "from-s1", "from_vm_id": vm, "snapshot_id": s1})),
        )
        .await;
    assert_eq!(job.kind, JobKind::TemplateCreate);
    let template_id = job.target.id;
    let view = app.template(template_id).await;
    assert_eq!(view.source_vm_id, Some(vm));
    let template_path = view.disks[0].path.clone().expect("a file");
    assert_eq!(chain(&template_path).len(), 1);
    compare(&template_path, app.snapshot_path(vm, s1, "root").await);
    assert_eq!(app.vm(vm).await.current_snapshot_id, Some(s1));

    let template = format!("/v1/templates/{template_id}");
    let job = app
        .run_job(
            Method::POST,
            &format!("{template}/deploy"),
            Some(json!({"name": "solo", "mode": "full"})),
        )
        .await;
    let solo_root = app.active_path(job.target.id, "root").await;
    assert_eq!(chain(&solo_root).len(), 1);
    assert_eq!(app.template(template_id).await.linked_vm_count, 0);
    // Nothing depends on the template or the VM: both can go, the copies stay.
    app.run_job(Method::DELETE, &template, None).await;
    app.delete_vm(vm).await;
    expect_all(&solo_root, &[(0x91, 0, 3), (0, 3, 1)]);
    check_clean(&solo_root);
}

#[tokio::test]
async fn template_requests_are_validated_and_change_nothing_when_refused() {
    let app = TestApp::spawn().await;
    let (template_id, _) = golden(&app, "t").await;
    let vm = app.create_vm("v", &[("root", DISK)]).await.id;
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
        app.expect_problem(Method::POST, &path, Some(body), status, expected)
            .await;
    }
    // A 1,000-name batch where one name is taken changes nothing either.
    let vms: VmList = app.get_as("/v1/vms").await;
    assert_eq!(vms.items.len(), 1);
    // Running VMs are not converted.
    app.patch(&format!("/v1/vms/{vm}"), json!({"state": "running"}))
        .await;
    app.expect_problem(
        Method::POST,
        &format!("/v1/vms/{vm}/convert-to-template"),
        Some(json!({})),
        StatusCode::CONFLICT,
        "vm_running",
    )
    .await;
    app.expect_problem(
        Method::DELETE,
        &format!("/v1/templates/{UNKNOWN_ID}"),
        None,
        StatusCode::NOT_FOUND,
        "template_not_found",
    )
    .await;
}

#[tokio::test]
async fn a_conversion_that_cannot_go_ahead_leaves_the_vm_and_its_snapshots_usable() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=1500")]).await;
    let vm = app.create_vm("convertible", &[("root", DISK)]).await.id;
    write(app.active_path(vm, "root").await, 0x55, 0, 1);
    let s1 = app.snapshot(vm, "s1").await.id;
    // A linked clone of s1 is accepted first; the conversion would collapse the layer
    // the clone is about to read, so it is refused at once, not accepted and failed.
    let clone_job = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{vm}/clone"),
            Some(json!({"name": "reader", "mode": "linked", "snapshot_id": s1})),
        )
        .await;
    let convert = format!("/v1/vms/{vm}/convert-to-template");
    let refuse_conversion = async || {
        let body = Some(json!({}));
        app.expect_problem(
            Method::POST,
            &convert,
            body,
            StatusCode::CONFLICT,
            "has_dependents",
        )
        .await
    };
    refuse_conversion().await;
    let clone_job = app.wait_job(clone_job.id).await;
    assert_eq!(clone_job.status, JobStatus::Succeeded);
    // Once the clone exists, the same answer.
    refuse_conversion().await;
    assert_eq!(app.vm(vm).await.status, ResourceStatus::Ready);
    let snapshot = app.get_snapshot(s1).await;
    assert_eq!(snapshot.status, ResourceStatus::Ready, "{snapshot:?}");
    // Still a VM that works: it takes snapshots and reverts.
    let s2 = app.snapshot(vm, "s2").await.id;
    app.revert(s1).await;
    app.delete_snapshot(s2).await;
    expect(app.active_path(vm, "root").await, 0x55, 0, 1);
}

#[tokio::test]
async fn a_cancelled_conversion_puts_the_vm_back() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_to_template:planned:pause=1500")]).await;
    let vm = app.create_vm("undecided", &[("root", DISK)]).await.id;
    write(app.active_path(vm, "root").await, 0x56, 0, 1);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x57, 1, 1);
    let convert = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{vm}/convert-to-template"),
            Some(json!({})),
        )
        .await;
    assert_eq!(app.vm(vm).await.status, ResourceStatus::Creating);
    // Wait for the job to reach its pause, then cancel it.
    for _ in 0..100 {
        if app.job(convert.id).await.status == JobStatus::Running {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.post(&format!("/v1/jobs/{}/cancel", convert.id), json!({}))
        .await;
    let ended = app.wait_job(convert.id).await;
    assert_eq!(ended.status, JobStatus::Cancelled, "{ended:?}");
    assert_eq!(app.vm(vm).await.status, ResourceStatus::Ready);
    assert_eq!(app.get_snapshot(s1).await.status, ResourceStatus::Ready);
    expect_all(
        app.active_path(vm, "root").await,
        &[(0x56, 0, 1), (0x57, 1, 1)],
    );
    check_clean(app.active_path(vm, "root").await);
}

#[tokio::test]
async fn deleting_a_template_with_flatten_dependents_makes_its_linked_vms_standalone_first() {
    let app = TestApp::spawn().await;
    let (template_id, _) = golden(&app, "base").await;
    let ids = deploy_linked(&app, template_id, 2).await;
    let root = app.active_path(ids[0], "root").await;
    write(&root, 0x90, 8, 1);

    // A linked VM that runs cannot be flattened: refused, nothing changes.
    app.patch(&format!("/v1/vms/{}", ids[1]), json!({"state": "running"}))
        .await;
    let path = format!("/v1/templates/{template_id}?flatten_dependents=true");
    app.expect_problem(
        Method::DELETE,
        &path,
        None,
        StatusCode::CONFLICT,
        "vm_running",
    )
    .await;
    assert_eq!(
        app.template(template_id).await.status,
        ResourceStatus::Ready
    );
    assert_eq!(chain(&root).len(), 2);
    app.patch(&format!("/v1/vms/{}", ids[1]), json!({"state": "stopped"}))
        .await;

    let job = app.run_job(Method::DELETE, &path, None).await;
    assert_eq!(job.kind, JobKind::VmDelete);
    let (status, _) = app.get(&format!("/v1/templates/{template_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for vm_id in &ids {
        let vm = app.vm(vm_id).await;
        for disk in &vm.disks {
            let path = disk.path();
            assert_eq!(chain(path).len(), 1, "standalone: {path}");
            check_clean(path);
        }
        let data = app.active_path(vm_id, "data").await;
        expect(&data, 0x73, 0, 1);
    }
    expect_all(&root, &[(0x71, 0, 2), (0x72, 2, 1), (0x90, 8, 1)]);
    expect_all(
        app.active_path(ids[1], "root").await,
        &[(0x71, 0, 2), (0x72, 2, 1)],
    );
    // Only the two VMs' files are left, one per disk.
    assert_eq!(app.volume_files().len(), 4);
}
