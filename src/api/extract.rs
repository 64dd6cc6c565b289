//! Extractors that turn axum's rejections into problem answers, so malformed JSON, bad
//! query strings and unparseable ids all get a stable `code`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::domain::Uuid;
use crate::error::{Error, ErrorCode};

/// `axum::Json` with problem answers on rejection.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(value)) => value,
            Err(JsonRejection::MissingJsonContentType(_)) => {
                return Err(Error::problem(
                    ErrorCode::UnsupportedMediaType,
                    "send the body with Content-Type: application/json",
                ));
            }
            Err(JsonRejection::BytesRejection(e))
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
            {
                return Err(Error::problem(ErrorCode::PayloadTooLarge, e.body_text()));
            }
            Err(e) => return Err(Error::problem(ErrorCode::InvalidJson, e.body_text())),
        };
        // serde would read a struct from an array by position; every body here is an object.
        if !value.is_object() {
            return Err(Error::problem(
                ErrorCode::InvalidJson,
                "the request body must be a JSON object",
            ));
        }
        serde_path_to_error::deserialize(value)
            .map(Json)
            .map_err(body_problem)
    }
}

/// A body that does not deserialise: `validation_failed` naming the field when a value
/// of the right JSON type breaks a rule (an unknown enum value, a malformed time, id
/// or duration, a number out of range), `invalid_json` when the shape is wrong (a
/// value of the wrong type, a missing or unknown field).
fn body_problem(error: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let field = error.path().to_string();
    let inner = error.into_inner().to_string();
    let shape = ["invalid type:", "missing field", "unknown field"];
    if field == "." || shape.iter().any(|prefix| inner.starts_with(prefix)) {
        let at = if field == "." {
            String::new()
        } else {
            format!(" (at {field})")
        };
        return Error::problem(
            ErrorCode::InvalidJson,
            format!("invalid request body{at}: {inner}"),
        );
    }
    Error::problem(ErrorCode::ValidationFailed, format!("{field}: {inner}"))
}

/// `axum::extract::Query` with problem answers on rejection.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| Error::problem(ErrorCode::InvalidQuery, e.body_text()))
    }
}

/// Parse a path id; an id that cannot exist is reported as not found.
pub fn parse_id(text: &str, not_found: ErrorCode, what: &str) -> Result<Uuid, Error> {
    text.parse()
        .map_err(|_| Error::problem(not_found, format!("{what} {text} does not exist")))
}

/// For a PATCH field that can be cleared: absent leaves it as is (`None`), `null`
/// clears it (`Some(None)`), a value sets it.
pub fn present<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}
