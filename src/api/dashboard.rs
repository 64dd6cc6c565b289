//! The web dashboard (`/`) and the API's browsable documentation (`/docs`): static
//! files built from `web/` (`npm run build` writes `web/dist/`, checked in) and
//! embedded in the binary, so a fresh clone serves them with no npm step. They are
//! not API operations: they stay out of the OpenAPI document and are public, since
//! they hold no data; everything they show comes from the API, with the user's token.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{MethodRouter, get};
use rust_embed::RustEmbed;

use crate::error::{Error, ErrorCode};

/// `web/dist/`: in a release build the files are inside the binary; a debug build
/// reads them from the source tree, which is the same checked-in build.
#[derive(RustEmbed)]
#[folder = "web/dist/"]
struct Built;

/// What a page may load: only this origin (no CDN, no external font), and no framing.
/// Styles may be inline: the tree picture and Swagger UI set element styles.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
    style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'; \
    frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub fn routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route("/", one("index.html"))
        .route("/ui", get(|| async { Redirect::permanent("/") }))
        .route("/favicon.svg", one("favicon.svg"))
        .route("/assets/{*path}", under("assets"))
        .route("/docs", get(|| async { Redirect::permanent("/docs/") }))
        .route("/docs/", one("docs/index.html"))
        .route("/docs/{*path}", under("docs"))
}

/// A route serving the built file `path`.
fn one<S: Clone + Send + Sync + 'static>(path: &'static str) -> MethodRouter<S> {
    get(move |headers: HeaderMap| async move { file(path, &headers) })
}

/// A route serving the built files under `dir`, by the rest of the request's path.
fn under<S: Clone + Send + Sync + 'static>(dir: &'static str) -> MethodRouter<S> {
    get(
        move |Path(path): Path<String>, headers: HeaderMap| async move {
            file(&format!("{dir}/{path}"), &headers)
        },
    )
}

/// One built file, with its type, caching and an ETag from its digest.
fn file(path: &str, request: &HeaderMap) -> Response {
    let Some(found) = Built::get(path) else {
        return Error::problem(ErrorCode::RouteNotFound, "no such file of the dashboard")
            .into_response();
    };
    let etag = format!(
        "\"{}\"",
        found
            .metadata
            .sha256_hash()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    // Vite names the files under assets/ by their content: they never change. The
    // rest (the pages, the docs' files) are checked again on every load.
    let cache = if path.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if path.ends_with(".html") {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    let unchanged = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (headers, found.data.into_owned()).into_response()
}

/// The types of the files a Vite build and Swagger UI's distribution hold.
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map_or("", |(_, ext)| ext) {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" | "map" => "application/json",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_dashboard_and_docs_are_embedded() {
        let index = Built::get("index.html").expect("web/dist/index.html");
        let text = std::str::from_utf8(&index.data).expect("utf-8");
        assert!(
            text.contains("/assets/"),
            "index.html loads the built script"
        );
        assert!(Built::get("docs/index.html").is_some());
        assert!(Built::get("docs/swagger-ui-bundle.js").is_some());
    }

    #[test]
    fn types_follow_the_extension() {
        assert_eq!(
            content_type("assets/index-abc.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            content_type("docs/swagger-ui.css"),
            "text/css; charset=utf-8"
        );
        assert_eq!(content_type("favicon.svg"), "image/svg+xml");
        assert_eq!(content_type("LICENSE"), "application/octet-stream");
    }
}
