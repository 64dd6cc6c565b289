//! RFC 9457 problem answers: the only `IntoResponse` for errors. 5xx answers are logged
//! with their cause; 4xx answers are the client's business and are not.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

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
    fn into_response(self) -> Response {
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
    fn into_response(self) -> Response {
        let code = self.code();
        let mut response = self.into_problem(code);
        if code == ErrorCode::ImportsBusy {
            // Long enough for a typical inspection to finish.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

impl Error {
    fn into_problem(self, code: ErrorCode) -> Response {
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
