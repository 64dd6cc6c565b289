//! The HTTP client: requests to the service, each answer checked against the OpenAPI
//! document (`documented::check`), and the calls the tests repeat.

use reqwest::header::{CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::TestApp;

impl TestApp {
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let documented_method = method.clone();
        let mut request = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        super::documented::check(&documented_method, path, status, &value);
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Long-poll a job until it ends and return it.
    pub async fn wait_job_end(&self, job: &Value) -> Value {
        let id = job["id"]
            .as_str()
            .unwrap_or_else(|| panic!("not a job: {job}"));
        for _ in 0..20 {
            let (status, job) = self.get(&format!("/v1/jobs/{id}?wait=30")).await;
            assert_eq!(status, StatusCode::OK, "{job}");
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
        }
        panic!("job {id} did not end");
    }

    /// Expect a 202 with a job, wait for it and require success.
    pub async fn expect_job(&self, (status, job): (StatusCode, Value)) -> Value {
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let job = self.wait_job_end(&job).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        job
    }

    /// Create a VM with `disks` (name, size) and wait until it is ready.
    pub async fn create_vm(&self, name: &str, disks: &[(&str, u64)]) -> Value {
        let disks: Vec<Value> = disks
            .iter()
            .map(|(n, s)| json!({"name": n, "size_bytes": s}))
            .collect();
        let job = self
            .expect_job(
                self.post("/v1/vms", json!({"name": name, "disks": disks}))
                    .await,
            )
            .await;
        self.vm(job["target"]["id"].as_str().unwrap()).await
    }

    pub async fn vm(&self, id: &str) -> Value {
        let (status, vm) = self.get(&format!("/v1/vms/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{vm}");
        vm
    }

    /// Take a snapshot and return its id.
    pub async fn snapshot(&self, vm: &str, name: &str) -> String {
        let job = self
            .expect_job(
                self.post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": name}))
                    .await,
            )
            .await;
        job["target"]["id"].as_str().unwrap().to_owned()
    }

    pub async fn revert(&self, snapshot: &str) {
        self.expect_job(
            self.post(&format!("/v1/snapshots/{snapshot}/revert"), json!({}))
                .await,
        )
        .await;
    }

    /// Grow a disk and wait for the job.
    pub async fn resize(&self, vm: &str, disk: &str, size_bytes: u64) {
        let path = format!("/v1/vms/{vm}/disks/{disk}/resize");
        self.expect_job(self.post(&path, json!({ "size_bytes": size_bytes })).await)
            .await;
    }

    /// Delete a snapshot and return the finished job (with its merge detail).
    pub async fn delete_snapshot(&self, snapshot: &str) -> Value {
        self.expect_job(self.delete(&format!("/v1/snapshots/{snapshot}")).await)
            .await
    }

    /// Active path of the VM's disk named `disk`.
    pub async fn active_path(&self, vm: &str, disk: &str) -> String {
        let vm = self.vm(vm).await;
        let disk = vm["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == disk)
            .unwrap_or_else(|| panic!("no disk {disk}"));
        disk["active_path"].as_str().unwrap().to_owned()
    }

    /// Path of the layer a snapshot froze for `disk` (its chain is the snapshot's content).
    pub async fn snapshot_path(&self, vm: &str, snapshot: &str, disk: &str) -> String {
        let vm_view = self.vm(vm).await;
        let disk_id = vm_view["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == disk)
            .unwrap()["id"]
            .clone();
        let (status, snap) = self.get(&format!("/v1/snapshots/{snapshot}")).await;
        assert_eq!(status, StatusCode::OK, "{snap}");
        let volume = snap["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["disk_id"] == disk_id)
            .expect("snapshot covers disk");
        volume["path"].as_str().unwrap().to_owned()
    }
}

/// A well-formed id that no resource has.
pub const UNKNOWN_ID: &str = "01900000-0000-7000-8000-000000000000";

/// A response with its headers, for checks `TestApp::request` cannot make.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn content_type(&self) -> &str {
        self.headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// Send a request with an exact body and Content-Type (or none).
pub async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> Reply {
    let documented_method = method.clone();
    let mut request = app.client.request(method, format!("{}{}", app.base, path));
    if let Some(content_type) = content_type {
        request = request.header(CONTENT_TYPE, content_type);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    super::documented::check(&documented_method, path, status, &body);
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn send_json(app: &TestApp, method: Method, path: &str, body: &Value) -> Reply {
    send(
        app,
        method,
        path,
        Some("application/json"),
        Some(body.to_string().into_bytes()),
    )
    .await
}

/// Assert an RFC 9457 problem answer with `status` and `code`.
pub fn assert_problem(reply: &Reply, status: StatusCode, code: &str) {
    let problem = &reply.body;
    assert_eq!(reply.status, status, "expected {code}: {problem}");
    let content_type = reply.content_type();
    assert!(
        content_type.starts_with("application/problem+json"),
        "content type {content_type:?} for {problem}"
    );
    assert_eq!(problem["code"], code, "{problem}");
    assert_eq!(
        problem["type"],
        format!("urn:strata:problem:{code}"),
        "{problem}"
    );
    assert_eq!(problem["status"], status.as_u16(), "{problem}");
    assert!(
        problem["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{problem}"
    );
    assert!(
        problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{problem}"
    );
}

/// The `id` member of a resource or job.
pub fn id(value: &Value) -> String {
    value["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {value}"))
        .to_owned()
}
