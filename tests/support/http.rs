//! Untyped requests: the answer as `(StatusCode, serde_json::Value)`, or a `Reply`
//! with its headers for a request sent with an exact body and Content-Type. For tests
//! that check exact JSON shapes or send bad input; the typed client (`client.rs`) is
//! built on them. Every answer is checked against the OpenAPI document
//! (`documented::check`).

use reqwest::header::{CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::TestApp;

impl TestApp {
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let reply = match body {
            Some(body) => send_json(self, method, path, &body).await,
            None => send(self, method, path, None, None).await,
        };
        (reply.status, reply.body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.request(Method::DELETE, path, None).await
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
    if let Some(token) = &app.token {
        request = request.bearer_auth(token);
    }
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
