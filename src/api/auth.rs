//! Who may call what: the one table that gives each route the scope it needs (the
//! OpenAPI document, the docs' table and the middleware all read it), and the
//! middleware that checks a request's bearer token against it.
//!
//! With no usable token defined and a loopback listen address, the service answers
//! without authentication (as before tokens existed), so a first start on a laptop
//! needs no setup; once a token exists every route but the public ones needs one.
//! A non-loopback listen address with no token refuses to start (see `app`), unless
//! `--insecure-no-auth` turns authentication off altogether.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::auth::Presented;
use crate::domain::Scope;
use crate::error::{Error, ErrorCode, Result};
use crate::store;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health, readiness and the API's own description.
    Public,
    /// A token with this scope or a higher one.
    Scope(Scope),
}

/// The scope each route needs: every GET is `read`; the changes an orchestrator makes
/// day to day are `operate`; deletions of VMs, disks and templates, imports, template
/// conversions, schedule management and tokens are `admin`. `None` for a route not in
/// the table: the middleware refuses it, and a test walks every route of the router
/// so that none is left out.
pub fn access(method: &Method, path: &str) -> Option<Access> {
    use Scope::{Admin, Operate, Read};
    let scope = match (method.as_str(), path) {
        ("GET", "/healthz" | "/readyz" | "/v1/openapi.json") => return Some(Access::Public),
        ("GET", "/v1/tokens") => Admin,
        ("GET", _) => Read,
        // VMs and disks.
        ("POST", "/v1/vms") => Operate,
        ("PATCH", "/v1/vms/{id}") => Operate,
        ("DELETE", "/v1/vms/{id}") => Admin,
        ("POST", "/v1/vms/{id}/disks") => Operate,
        ("POST", "/v1/vms/{vm_id}/disks/{disk_id}/resize") => Operate,
        ("POST", "/v1/vms/{vm_id}/disks/{disk_id}/flatten") => Operate,
        ("DELETE", "/v1/vms/{vm_id}/disks/{disk_id}") => Admin,
        // Snapshots and clones.
        ("POST", "/v1/vms/{id}/snapshots") => Operate,
        ("DELETE", "/v1/vms/{id}/snapshots") => Operate,
        ("PATCH", "/v1/snapshots/{id}") => Operate,
        ("DELETE", "/v1/snapshots/{id}") => Operate,
        ("POST", "/v1/snapshots/{id}/revert") => Operate,
        ("POST", "/v1/vms/{id}/clone") => Operate,
        // Templates.
        ("POST", "/v1/templates/{id}/deploy") => Operate,
        ("POST", "/v1/templates") => Admin,
        ("POST", "/v1/templates/import") => Admin,
        ("POST", "/v1/templates/{id}/convert-to-vm") => Admin,
        ("POST", "/v1/vms/{id}/convert-to-template") => Admin,
        ("DELETE", "/v1/templates/{id}") => Admin,
        // Schedules and jobs.
        ("POST", "/v1/schedules/{id}/run") => Operate,
        ("POST", "/v1/schedules") => Admin,
        ("PATCH", "/v1/schedules/{id}") => Admin,
        ("DELETE", "/v1/schedules/{id}") => Admin,
        ("POST", "/v1/jobs/{id}/cancel") => Operate,
        // Tokens.
        ("POST", "/v1/tokens") => Admin,
        ("DELETE", "/v1/tokens/{name}") => Admin,
        _ => return None,
    };
    Some(Access::Scope(scope))
}

/// The scope table as Markdown, one row per operation of the OpenAPI document (sorted
/// by scope, then path), as the README shows it: generated from `access`, so the
/// documentation cannot drift from what the middleware checks.
pub fn scope_table_markdown() -> String {
    let (_, api) = super::api_router().split_for_parts();
    let mut rows: Vec<(u8, String, String, &'static str)> = Vec::new();
    for (path, item) in &api.paths.paths {
        let operations = [
            (Method::GET, item.get.as_ref()),
            (Method::POST, item.post.as_ref()),
            (Method::PUT, item.put.as_ref()),
            (Method::PATCH, item.patch.as_ref()),
            (Method::DELETE, item.delete.as_ref()),
        ];
        for (method, operation) in operations {
            if operation.is_none() {
                continue;
            }
            let (rank, scope) = match access(&method, path) {
                Some(Access::Public) => (0, "none"),
                Some(Access::Scope(scope)) => (scope as u8 + 1, scope.as_str()),
                None => (9, "undeclared (refused)"),
            };
            rows.push((rank, path.clone(), method.to_string(), scope));
        }
    }
    rows.sort();
    let mut table = String::from("| Operation | Scope |\n|---|---|\n");
    for (_, path, method, scope) in rows {
        table.push_str(&format!("| `{method} {path}` | {scope} |\n"));
    }
    table
}

/// Whether requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every request but the public ones needs a token (a non-loopback address: the
    /// service did not start without one, and revoking the last one does not open it).
    Required,
    /// A loopback address: a token is needed once one usable token exists; before
    /// that (or once none is left) requests are anonymous, as on a first start.
    WhenDefined,
    /// `--insecure-no-auth`: every request is anonymous.
    Off,
}

/// The authentication state handlers share.
pub struct Auth {
    pub mode: Mode,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

/// Failed attempts of one client address within the current window.
struct Failures {
    since: Instant,
    count: u32,
}

/// Failed attempts one client address may make per window before it is refused.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl Auth {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `client` may try again, when it failed too often.
    fn blocked_for(&self, client: IpAddr) -> Option<u64> {
        let failures = self.failures.lock().expect("failures lock");
        let entry = failures.get(&client)?;
        let elapsed = entry.since.elapsed();
        (entry.count >= MAX_FAILURES && elapsed < FAILURE_WINDOW)
            .then(|| (FAILURE_WINDOW - elapsed).as_secs().max(1))
    }

    fn record_failure(&self, client: IpAddr) {
        let mut failures = self.failures.lock().expect("failures lock");
        // Forget windows that ended, so the map stays as small as the clients failing.
        failures.retain(|_, f| f.since.elapsed() < FAILURE_WINDOW);
        let entry = failures.entry(client).or_insert(Failures {
            since: Instant::now(),
            count: 0,
        });
        entry.count += 1;
    }
}

/// Who made a request: the token's name and scope, or nobody when authentication is
/// off or no token exists yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    Token { name: String, scope: Scope },
}

impl Caller {
    /// What jobs record as `requested_by`.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Token { name, .. } => Some(name),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous))
    }
}

/// Check the request's token against the scope its route needs; the caller goes into
/// the request's extensions for the handler.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    // What the check reads, taken out first: the request's body is not `Sync`.
    let asked = Asked {
        method: request.method().clone(),
        path: request
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned()),
        authorization: request.headers().get(header::AUTHORIZATION).cloned(),
        client: request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip()),
    };
    match check(&state, asked).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// What `check` needs of a request.
struct Asked {
    method: Method,
    /// The route's template (`/v1/vms/{id}`); none for the fallbacks.
    path: Option<String>,
    authorization: Option<HeaderValue>,
    client: IpAddr,
}

async fn check(state: &AppState, asked: Asked) -> Result<Caller> {
    let Asked {
        method,
        path,
        authorization,
        client,
    } = asked;
    let Some(path) = path else {
        // Fallbacks (unknown paths and methods) answer their own problems.
        return Ok(Caller::Anonymous);
    };
    let needed = match access(&method, &path) {
        Some(Access::Public) => return Ok(Caller::Anonymous),
        Some(Access::Scope(scope)) => scope,
        None => {
            return Err(Error::problem(
                ErrorCode::Forbidden,
                format!("{method} {path} has no declared scope, so no token may call it"),
            ));
        }
    };
    let auth = &state.auth;
    if auth.mode == Mode::Off {
        return Ok(Caller::Anonymous);
    }
    if let Some(seconds) = auth.blocked_for(client) {
        return Err(Error::with_extra(
            ErrorCode::TooManyAttempts,
            format!("too many failed attempts from {client}; try again in {seconds} s"),
            serde_json::json!({ "retry_after_seconds": seconds }),
        ));
    }
    let now = store::now();
    let Some(header) = authorization else {
        if auth.mode == Mode::WhenDefined {
            let mut conn = state.db.reader().await?;
            if !store::tokens::any_usable(&mut conn, now).await? {
                return Ok(Caller::Anonymous);
            }
        }
        return Err(unauthorized(
            "this endpoint needs a token: send Authorization: Bearer <token>",
        ));
    };
    let refused = |reason: &str| {
        auth.record_failure(client);
        tracing::warn!(%client, %method, path, reason, "request refused: bad token");
        unauthorized(reason)
    };
    let Some(text) = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return Err(refused("the Authorization header must read Bearer <token>"));
    };
    let presented = match Presented::parse(text) {
        Ok(presented) => presented,
        Err(e) => return Err(refused(&e.to_string())),
    };
    let found = store::tokens::get(&mut *state.db.reader().await?, &presented.id).await?;
    let Some((token, digest)) = found.filter(|(_, digest)| presented.matches(digest)) else {
        return Err(refused("unknown token"));
    };
    drop(digest);
    if let Some(at) = token.revoked_at {
        return Err(refused(&format!(
            "token {} was revoked at {at}",
            token.name
        )));
    }
    if let Some(at) = token.expires_at.filter(|&at| now >= at) {
        return Err(refused(&format!("token {} expired at {at}", token.name)));
    }
    if token.scope < needed {
        return Err(Error::with_extra(
            ErrorCode::Forbidden,
            format!(
                "{method} {path} needs a token with scope {} or higher; token {} has scope {}",
                needed.as_str(),
                token.name,
                token.scope.as_str()
            ),
            serde_json::json!({ "required_scope": needed.as_str() }),
        ));
    }
    Ok(Caller::Token {
        name: token.name,
        scope: token.scope,
    })
}

fn unauthorized(detail: &str) -> Error {
    Error::problem(ErrorCode::Unauthorized, detail.to_owned())
}

/// The `WWW-Authenticate` challenge of every 401 (RFC 6750).
pub fn challenge() -> HeaderValue {
    HeaderValue::from_static("Bearer realm=\"strata\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route of the router (its OpenAPI document is generated from the same
    /// handler list) has a declared access, so a route added later cannot be left
    /// open, or shut, by accident.
    #[test]
    fn every_route_of_the_router_declares_who_may_call_it() {
        let (_, api) = super::super::api_router().split_for_parts();
        let mut missing = Vec::new();
        let mut routes = 0;
        for (path, item) in &api.paths.paths {
            let operations = [
                (Method::GET, item.get.is_some()),
                (Method::POST, item.post.is_some()),
                (Method::PUT, item.put.is_some()),
                (Method::PATCH, item.patch.is_some()),
                (Method::DELETE, item.delete.is_some()),
            ];
            for (method, present) in operations {
                if present {
                    routes += 1;
                    if access(&method, path).is_none() {
                        missing.push(format!("{method} {path}"));
                    }
                }
            }
        }
        assert!(routes > 40, "only {routes} routes found");
        assert!(
            missing.is_empty(),
            "routes with no declared scope: {missing:?}"
        );
    }

    #[test]
    fn reads_are_read_and_public_routes_are_only_health_and_the_description() {
        let get = |path| access(&Method::GET, path);
        assert_eq!(get("/v1/vms/{id}"), Some(Access::Scope(Scope::Read)));
        assert_eq!(get("/v1/tokens"), Some(Access::Scope(Scope::Admin)));
        assert_eq!(get("/healthz"), Some(Access::Public));
        assert_eq!(access(&Method::POST, "/healthz"), None);
        assert_eq!(
            access(&Method::DELETE, "/v1/vms/{id}"),
            Some(Access::Scope(Scope::Admin))
        );
        assert_eq!(access(&Method::PUT, "/v1/vms/{id}"), None);
    }
}
