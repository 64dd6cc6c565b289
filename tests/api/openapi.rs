//! The checked-in OpenAPI document is the one the code generates, and it describes
//! every route with its error answers.

use crate::support::TestApp;

const CHECKED_IN: &str = include_str!("../../openapi/openapi.json");

#[test]
fn the_checked_in_openapi_document_matches_the_code() {
    let generated = strata::api::openapi_json_pretty();
    assert!(
        generated == CHECKED_IN,
        "openapi/openapi.json is stale: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn every_operation_documents_its_responses_and_problem_answers() {
    let document: serde_json::Value = serde_json::from_str(CHECKED_IN).unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = document["paths"].as_object().unwrap();
    for expected in [
        "/v1/vms",
        "/v1/vms/{id}",
        "/v1/vms/{id}/snapshots",
        "/v1/snapshots/{id}/revert",
        "/v1/jobs/{id}/cancel",
        "/healthz",
        "/readyz",
        "/v1/openapi.json",
    ] {
        assert!(paths.contains_key(expected), "{expected} missing");
    }
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} has no responses"));
            assert!(!responses.is_empty());
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(
                        response["content"]
                            .get("application/problem+json")
                            .is_some(),
                        "{method} {path} {status} is not a problem document"
                    );
                }
            }
            if path.contains('{') {
                assert!(
                    operation["parameters"]
                        .as_array()
                        .is_some_and(|p| !p.is_empty()),
                    "{method} {path} lacks path parameters"
                );
            }
        }
    }
    assert!(document["components"]["schemas"]["Problem"]["example"].is_object());
}

#[tokio::test]
async fn the_service_serves_the_same_document() {
    let app = TestApp::spawn().await;
    let (status, served) = app.get("/v1/openapi.json").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let checked_in: serde_json::Value = serde_json::from_str(CHECKED_IN).unwrap();
    assert_eq!(served, checked_in);
}

/// The checked-in document is valid OpenAPI 3.1 and every example in it validates
/// against its own schema (scripts/check-openapi.py: openapi-spec-validator and
/// jsonschema, which .ci/run installs).
#[test]
fn the_document_is_valid_openapi_and_its_examples_match_their_schemas() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = std::process::Command::new("python3")
        .arg(format!("{root}/scripts/check-openapi.py"))
        .arg(format!("{root}/openapi/openapi.json"))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "scripts/check-openapi.py failed (needs `pip install openapi-spec-validator jsonschema`):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
