//! Unknown query parameters are refused (`400 invalid_query`, naming the parameter)
//! instead of being silently ignored: `GET /v1/vms?colour=red` must not answer the
//! whole list as if the filter had been applied. The parameters each operation takes
//! are read from the OpenAPI document, so the document is the one list: an endpoint
//! that gains a parameter documents it or refuses it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, ErrorCode};

/// The query parameters of every documented operation, by method and route template.
#[derive(Clone)]
pub struct DocumentedQueries(Arc<HashMap<(Method, String), BTreeSet<String>>>);

impl DocumentedQueries {
    pub fn from_document(api: &serde_json::Value) -> Self {
        let mut known = HashMap::new();
        let paths = api["paths"].as_object().into_iter().flatten();
        for (path, item) in paths {
            let shared = query_names(&item["parameters"]);
            for (key, method) in [
                ("get", Method::GET),
                ("post", Method::POST),
                ("put", Method::PUT),
                ("patch", Method::PATCH),
                ("delete", Method::DELETE),
            ] {
                let operation = &item[key];
                if !operation.is_object() {
                    continue;
                }
                let mut names = shared.clone();
                names.extend(query_names(&operation["parameters"]));
                known.insert((method, path.clone()), names);
            }
        }
        Self(Arc::new(known))
    }
}

/// The names of the query parameters in a `parameters` list.
fn query_names(parameters: &serde_json::Value) -> BTreeSet<String> {
    parameters
        .as_array()
        .into_iter()
        .flatten()
        .filter(|parameter| parameter["in"] == "query")
        .filter_map(|parameter| parameter["name"].as_str().map(str::to_owned))
        .collect()
}

/// Middleware (after routing, so the route template is known): refuse a query
/// parameter the operation does not document. Requests to undocumented routes (the
/// fallbacks) pass through untouched.
pub async fn refuse_unknown_parameters(
    State(known): State<DocumentedQueries>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    if let (Some(matched), Some(_)) = (&matched, request.uri().query())
        && let Some(allowed) = known
            .0
            .get(&(request.method().clone(), matched.as_str().to_owned()))
    {
        // Decoded as the handlers' own extractors decode them; a malformed query is
        // left for them to refuse with their own message.
        if let Ok(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri())
            && let Some((unknown, _)) = pairs.0.iter().find(|(key, _)| !allowed.contains(key))
        {
            let takes = if allowed.is_empty() {
                "this endpoint takes no query parameters".to_owned()
            } else {
                format!(
                    "this endpoint takes {}",
                    allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            return Error::problem(
                ErrorCode::InvalidQuery,
                format!("unknown query parameter `{unknown}`; {takes}"),
            )
            .into_response();
        }
    }
    next.run(request).await
}
