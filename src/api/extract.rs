//! Extractors that turn axum's rejections into problem answers, so malformed JSON, bad
//! query strings and unparseable ids all get a stable `code`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
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
        serde_json::from_value(value).map(Json).map_err(|e| {
            Error::problem(ErrorCode::InvalidJson, format!("invalid request body: {e}"))
        })
    }
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
