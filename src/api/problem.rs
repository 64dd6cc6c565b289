//! RFC 9457 problem answers: the only `IntoResponse` for errors. 5xx answers are logged
//! with their cause; 4xx answers are the client's business and are not.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};

use crate::error::{Error, ErrorCode};

/// An error answer (`application/problem+json`). Clients branch on `code`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:strata:problem:name_taken",
    "title": "The name is already in use",
    "status": 409,
    "detail": "a VM named web-01 already exists",
    "code": "name_taken"
}))]
pub struct Problem {
    /// URI naming the problem type: `urn:strata:problem:<code>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable code.
    pub code: String,
    /// Extra members for some codes (e.g. `needed_bytes` and `available_bytes` with
    /// `insufficient_storage`), flattened into the object.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub extra: Option<serde_json::Value>,
}

impl Problem {
    pub fn new(code: ErrorCode, detail: String, extra: Option<serde_json::Value>) -> Self {
        Self {
            type_uri: format!("urn:strata:problem:{}", code.as_str()),
            title: code.title().to_owned(),
            status: code.status().as_u16(),
            detail,
            code: code.as_str().to_owned(),
            extra,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> HttpResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> HttpResponse {
        let code = self.code();
        let retry_after = match &self {
            Error::Problem {
                extra: Some(extra), ..
            } => extra["retry_after_seconds"].as_u64(),
            _ => None,
        };
        let mut response = self.into_problem(code);
        let headers = response.headers_mut();
        match code {
            // Long enough for a typical inspection to finish.
            ErrorCode::ImportsBusy => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ErrorCode::TooManyAttempts => {
                let seconds = retry_after.unwrap_or(60).to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    headers.insert(header::RETRY_AFTER, value);
                }
            }
            ErrorCode::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, super::auth::challenge());
            }
            _ => {}
        }
        response
    }
}

impl Error {
    fn into_problem(self, code: ErrorCode) -> HttpResponse {
        match self {
            Error::Problem {
                code,
                detail,
                extra,
            } => Problem::new(code, detail, extra).into_response(),
            other => {
                let mut chain = other.to_string();
                let mut source = std::error::Error::source(&other);
                while let Some(cause) = source {
                    chain.push_str(": ");
                    chain.push_str(&cause.to_string());
                    source = cause.source();
                }
                if code.status().is_server_error() {
                    tracing::error!(error = %chain, "request failed");
                }
                let detail = if code == ErrorCode::InsufficientStorage {
                    format!("the data file system is full; nothing was changed ({chain})")
                } else {
                    format!("{}: {chain}", code.title())
                };
                Problem::new(code, detail, None).into_response()
            }
        }
    }
}

/// The problem answers of every operation, declared next to its handler from the
/// shared sets below, and rendered into the OpenAPI document by one function: one
/// response per status, whose description lists each code with its title from
/// `error.rs`'s table. What every operation can answer (an unknown query parameter,
/// 408, 500, 507 for writes) is added to all of them by `openapi.rs`.
///
/// `tests/api/documented.rs` checks every problem the test suite meets against the
/// document, so a handler that starts returning a code its declaration lacks fails the
/// tests that drive it.
pub mod sets {
    use crate::error::ErrorCode::{self, *};

    /// A JSON request body: not JSON, the wrong shape, a rule broken, too large.
    pub const JSON_BODY: &[ErrorCode] = &[
        InvalidJson,
        ValidationFailed,
        PayloadTooLarge,
        UnsupportedMediaType,
    ];
    /// A page of a list: a cursor that is not one this service gave.
    pub const PAGED: &[ErrorCode] = &[InvalidCursor];
    /// A request that names a new resource.
    pub const NAMED: &[ErrorCode] = &[NameTaken];
    pub const VM: &[ErrorCode] = &[VmNotFound];
    pub const DISK: &[ErrorCode] = &[VmNotFound, DiskNotFound];
    pub const SNAPSHOT: &[ErrorCode] = &[SnapshotNotFound];
    pub const TEMPLATE: &[ErrorCode] = &[TemplateNotFound];
    pub const SCHEDULE: &[ErrorCode] = &[ScheduleNotFound];
    pub const JOB: &[ErrorCode] = &[JobNotFound];
    /// A job that changes a VM's chain: the VM must be stopped and not busy with a
    /// job of its own, and the plan must fit in the free space.
    pub const CHAIN_JOB: &[ErrorCode] = &[VmRunning, VmNotReady, InsufficientStorage];
    /// A job that rewrites or removes files linked clones may read.
    pub const READ_BY_CLONES: &[ErrorCode] = &[HasDependents];
}

/// Declares the type that stands for an operation's problem answers in its
/// `utoipa::path` (`responses(..., CreateVmProblems)`): the shared [`sets`] it meets,
/// then, after `;`, the codes of its own.
macro_rules! problems {
    ($name:ident = $($set:ident),* $(; $($code:ident),+)?) => {
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
            > {
                $crate::api::problem::problem_responses(&[
                    $($crate::api::problem::sets::$set,)*
                    $(&[$($crate::error::ErrorCode::$code),+],)?
                ])
            }
        }
    };
}
pub(crate) use problems;

/// One response per status for these codes (see [`sets`]).
pub fn problem_responses(sets: &[&[ErrorCode]]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for &code in sets.iter().copied().flatten() {
        let codes = by_status.entry(code.status().as_u16()).or_default();
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    by_status
        .into_iter()
        .map(|(status, codes)| {
            let mut description = status_heading(status);
            for code in &codes {
                description.push('\n');
                description.push_str(&code_line(*code));
            }
            let mut response = ResponseBuilder::new().description(description).content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            );
            if codes.contains(&ErrorCode::ImportsBusy) || codes.contains(&ErrorCode::TooManyAttempts)
            {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                        .description(Some("Seconds to wait before trying again"))
                        .build(),
                );
            }
            if codes.contains(&ErrorCode::Unauthorized) {
                response = response.header(
                    "WWW-Authenticate",
                    HeaderBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                        .description(Some("`Bearer realm=\"strata\"`: send a token as `Authorization: Bearer <token>`"))
                        .build(),
                );
            }
            (status.to_string(), RefOr::T(response.build()))
        })
        .collect()
}

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The first line of a problem response's description: the status's reason phrase.
pub fn status_heading(status: u16) -> String {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!("{reason}:")
}

/// How a problem response's description names one code (clients and tests find the
/// code between the backticks).
pub fn code_line(code: ErrorCode) -> String {
    format!("- `{}`: {}", code.as_str(), code.title())
}
