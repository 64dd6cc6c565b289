//! Every problem answer a test meets must be documented for its operation: the
//! operation's response for that status names the `code` (the document's descriptions
//! list the codes in backticks). Checked on every reply the harness receives, so the
//! whole suite (which drives every documented bad input) keeps openapi/openapi.json
//! in step with what the handlers return.

use std::sync::OnceLock;

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// (method, path template split in segments, responses)
type Operation = (String, Vec<String>, Value);

fn operations() -> &'static [Operation] {
    static OPERATIONS: OnceLock<Vec<Operation>> = OnceLock::new();
    OPERATIONS.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut operations = Vec::new();
        for (template, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let segments = template.split('/').map(str::to_owned).collect();
                operations.push((
                    method.to_uppercase(),
                    segments,
                    operation["responses"].clone(),
                ));
            }
        }
        operations
    })
}

/// The documented operation a request reaches: literal segments beat parameters
/// (`/v1/templates/import` over `/v1/templates/{id}`).
fn operation(method: &Method, path: &str) -> Option<&'static Operation> {
    let path = path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').collect();
    operations()
        .iter()
        .filter(|(m, template, _)| {
            m == method.as_str()
                && template.len() == segments.len()
                && template
                    .iter()
                    .zip(&segments)
                    .all(|(t, s)| t == s || t.starts_with('{'))
        })
        .max_by_key(|(_, template, _)| template.iter().filter(|t| !t.starts_with('{')).count())
}

/// Panic if `body` is a problem answer the document does not give for this request.
pub fn check(method: &Method, path: &str, status: StatusCode, body: &Value) {
    let Some(code) = body["code"].as_str() else {
        return;
    };
    if !body["type"]
        .as_str()
        .is_some_and(|t| t.starts_with("urn:strata:problem:"))
    {
        return;
    }
    // Answers of no operation: the router's fallbacks.
    if matches!(code, "route_not_found" | "method_not_allowed") {
        return;
    }
    let Some((_, template, responses)) = operation(method, path) else {
        panic!("{method} {path} answered {status} {code}, but no documented operation matches");
    };
    let documented = responses[status.as_str()]["description"]
        .as_str()
        .is_some_and(|d| d.contains(&format!("`{code}`")));
    assert!(
        documented,
        "{method} {} answered {status} `{code}`, which openapi/openapi.json does not document for it: {body}",
        template.join("/")
    );
}
