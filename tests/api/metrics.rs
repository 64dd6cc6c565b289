//! `GET /metrics`: the Prometheus text format as the Prometheus project's own parser
//! reads it (scripts/parse-metrics.py), with figures that match what the service did.

use std::io::Write;
use std::process::{Command, Stdio};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::auth::create_token;
use crate::support::*;

/// The samples of a scrape: `(name, labels) -> value`.
async fn scrape(app: &TestApp) -> Vec<(String, Value, f64)> {
    let mut request = app.client.get(format!("{}/metrics", app.base));
    if let Some(token) = &app.token {
        request = request.bearer_auth(token);
    }
    let reply = request.send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let content_type = reply.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = reply.text().await.unwrap();
    let mut parser = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/parse-metrics.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = parser.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused the metrics (needs `pip install prometheus-client`):\n{}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    samples
        .into_iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["labels"].clone(),
                s["value"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn value(samples: &[(String, Value, f64)], name: &str, labels: Value) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == labels)
        .map(|(_, _, v)| *v)
}

#[tokio::test]
async fn a_scrape_parses_and_counts_requests_jobs_merges_space_and_the_inventory() {
    let mut app = TestApp::spawn().await;
    let vm = app.create_vm("a", &[("root", 4 * MIB)]).await;
    // Data on both sides of s1's layer, so either direction of its merge copies some.
    write_bytes(app.active_path(vm.id, "root").await, 0x11, 0, MIB);
    let s1 = app.snapshot(vm.id, "s1").await;
    write_bytes(app.active_path(vm.id, "root").await, 0x22, MIB, MIB);
    app.snapshot(vm.id, "s2").await;
    let merge = app.delete_snapshot(s1.id).await;
    let (status, _) = app.get(&format!("/v1/vms/{UNKNOWN_ID}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let samples = scrape(&app).await;
    let get = |name: &str, labels: Value| value(&samples, name, labels);
    assert_eq!(
        get(
            "strata_http_requests_total",
            json!({"method": "POST", "route": "/v1/vms", "status": "202"})
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "strata_http_requests_total",
            json!({"method": "GET", "route": "/v1/vms/{id}", "status": "404"})
        ),
        Some(1.0)
    );
    // Route templates, never paths: ids do not become series.
    for (_, labels, _) in &samples {
        let route = labels["route"].as_str().unwrap_or_default();
        assert!(
            !route.contains(&vm.id.to_string()) && !route.contains(UNKNOWN_ID),
            "{route}"
        );
    }
    assert!(
        get(
            "strata_http_request_duration_seconds_count",
            json!({"method": "POST", "route": "/v1/vms"})
        )
        .is_some()
    );

    for kind in ["vm_create", "snapshot_create", "snapshot_delete"] {
        let count = if kind == "snapshot_create" { 2.0 } else { 1.0 };
        let labels = json!({"kind": kind, "outcome": "succeeded"});
        assert_eq!(
            get("strata_jobs_finished_total", labels),
            Some(count),
            "{kind}"
        );
        assert_eq!(
            get("strata_job_duration_seconds_count", json!({"kind": kind})),
            Some(count),
            "{kind}"
        );
    }
    // The merge's bytes are its plan's estimate for the action it took.
    let planned: u64 = merge.merges().iter().map(|m| m.bytes_to_copy).sum();
    assert!(planned > 0, "the merge copies the MiB written over s1");
    assert_eq!(
        get(
            "strata_job_bytes_copied_total",
            json!({"kind": "snapshot_delete"})
        ),
        Some(planned as f64)
    );

    assert_eq!(get("strata_jobs", json!({"status": "queued"})), Some(0.0));
    assert_eq!(get("strata_jobs", json!({"status": "running"})), Some(0.0));
    assert_eq!(get("strata_resources", json!({"kind": "vm"})), Some(1.0));
    assert_eq!(
        get("strata_resources", json!({"kind": "snapshot"})),
        Some(1.0)
    );
    assert_eq!(
        get("strata_resources", json!({"kind": "template"})),
        Some(0.0)
    );
    // The present's layer over s2's.
    assert_eq!(get("strata_longest_chain_layers", json!({})), Some(2.0));
    let on_disk: u64 = app.volume_files().iter().map(|f| allocated(f)).sum();
    assert_eq!(
        get("strata_data_dir_bytes", json!({"space": "volumes"})),
        Some(on_disk as f64)
    );
    assert!(get("strata_data_dir_bytes", json!({"space": "free"})).unwrap() > 0.0);

    // With tokens defined, metrics need a read token like every other read.
    let reader = create_token(&app, "prometheus", "read");
    let anonymous = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    app.token = Some(reader);
    let samples = scrape(&app).await;
    assert!(value(&samples, "strata_resources", json!({"kind": "vm"})).is_some());
    let _ = Method::GET;
}

fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}
