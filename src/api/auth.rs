//! Who may call what: the one table that gives each route the scope it needs (the
//! OpenAPI document, the docs' table and the middleware all read it), and the
//! middleware that checks a request's bearer token against it.
//!
//! With a loopback listen address and no token ever made, the service answers
//! requests addressed to the loopback interface without authentication (as before
//! tokens existed), so a first start on a laptop needs no setup; once a token was
//! made every route but the public ones needs one. Tokens are managed only with a
//! token (or the command line), in every mode.
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
use crate::domain::{ApiToken, Scope};
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
        // Tokens, and tickets for what a browser cannot send a header with.
        ("POST", "/v1/tickets") => Read,
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
    let mut rows: Vec<(u8, String, String, &'static str)> = routes()
        .into_iter()
        .map(|(method, path)| {
            let (rank, scope) = match access(&method, &path) {
                Some(Access::Public) => (0, "none"),
                Some(Access::Scope(scope)) => (scope as u8 + 1, scope.as_str()),
                None => (9, "undeclared (refused)"),
            };
            (rank, path, method.to_string(), scope)
        })
        .collect();
    rows.sort();
    let mut table = String::from("| Operation | Scope |\n|---|---|\n");
    for (_, path, method, scope) in rows {
        table.push_str(&format!("| `{method} {path}` | {scope} |\n"));
    }
    table
}

/// Routes a ticket (`?ticket=`, from `POST /v1/tickets`) may authorise instead of the
/// `Authorization` header: what a browser fetches without being able to set a header
/// (a download link; later an `EventSource`).
pub fn accepts_ticket(method: &Method, path: &str) -> bool {
    method == Method::GET && matches!(path, "/v1/templates/{id}/export" | "/v1/events")
}

/// How long a ticket can be used, once.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(60);
/// Tickets outstanding at once (each is used or expires within a minute).
const MAX_TICKETS: usize = 10_000;

/// A ticket not used yet: for which token (none when it was issued anonymously).
struct Ticket {
    token_id: Option<String>,
    expires: Instant,
}

/// Every (method, route template) of the router: its OpenAPI document is generated
/// from the same handler list.
fn routes() -> Vec<(Method, String)> {
    let (_, api) = super::api_router().split_for_parts();
    let mut routes = Vec::new();
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
                routes.push((method, path.clone()));
            }
        }
    }
    routes
}

/// Whether requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every request but the public ones needs a token (a non-loopback address: the
    /// service did not start without one, and revoking the last one does not open it).
    Required,
    /// A loopback address: requests addressed to it (`Host` localhost, 127.0.0.1,
    /// [::1]) are anonymous until the first token is made, as on a first start; from
    /// then on a token is needed, also once every token expired or was revoked.
    WhenDefined,
    /// `--insecure-no-auth`: every request is anonymous.
    Off,
}

/// The authentication state handlers share.
pub struct Auth {
    pub mode: Mode,
    /// What token digests are made under.
    pub key: crate::auth::TokenKey,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// Outstanding tickets by their text's digest.
    tickets: Mutex<HashMap<Vec<u8>, Ticket>>,
    /// Token rows recently read, so a request does not wait for the database.
    known: TokenCache,
}

/// What requests ask of the tokens table, each answer kept for `TOKEN_CACHE_FOR`: a
/// token's row by id (or that there is none), and whether any token ever existed.
/// Every change to the table, by this process or by `strata token` in another,
/// replaces the database's `tokens_marker` file; each lookup first compares the
/// marker's inode with the one this cache holds open (so it cannot be reused by a new
/// file) and forgets everything when it differs. A change takes effect from the next
/// request, as it did when each request read the table; the lifetime only bounds what
/// a lost marker update could keep.
#[derive(Default)]
struct TokenCache {
    /// The marker as last seen: held open, with its inode.
    marker: Mutex<Option<(std::fs::File, u64)>>,
    rows: Mutex<HashMap<String, (Instant, Option<TokenRow>)>>,
    any_ever: Mutex<Option<(Instant, bool)>>,
    /// Counts the clears: a row read before one is not kept (it may predate the
    /// change that caused it).
    clears: std::sync::atomic::AtomicU64,
}

/// A token and its digest, as the table holds them.
type TokenRow = (ApiToken, Vec<u8>);

const TOKEN_CACHE_FOR: Duration = Duration::from_secs(1);
/// Token ids kept at once (unknown ids a client presents count too).
const TOKEN_CACHE_SIZE: usize = 10_000;

impl TokenCache {
    /// Forget everything if the tokens changed since the marker was last seen.
    fn check_marker(&self, db: &crate::store::Db) {
        use std::os::unix::fs::MetadataExt;
        let path = db.tokens_marker();
        let mut marker = self.marker.lock().expect("token cache lock");
        // Every request asks: looked up by its name in the database's directory (a
        // whole path's walk was 7% of a read served from memory).
        let now = crate::files::stat_in_dir(path).map(|stat| stat.st_ino);
        if now.is_some() && marker.as_ref().map(|(_, ino)| *ino) == now {
            return;
        }
        // Opened before its inode is read again: if it is replaced in between, the
        // next lookup sees a difference and reads the rows again.
        *marker = std::fs::File::open(path)
            .and_then(|file| Ok((file.metadata()?.ino(), file)))
            .ok()
            .map(|(ino, file)| (file, ino));
        if marker.is_none() {
            // Missing (or unreadable): nothing to compare with, so nothing is kept.
            if let Err(e) = db.mark_tokens_changed() {
                tracing::debug!(error = %e, "cannot make the tokens marker");
            }
        }
        drop(marker);
        self.clear();
    }

    async fn get(&self, db: &crate::store::Db, id: &str) -> Result<Option<TokenRow>> {
        self.check_marker(db);
        if let Some((at, row)) = self.rows.lock().expect("token cache lock").get(id)
            && at.elapsed() < TOKEN_CACHE_FOR
        {
            return Ok(row.clone());
        }
        let clears = self.clears.load(std::sync::atomic::Ordering::SeqCst);
        let row = store::tokens::get(&mut *db.reader().await?, id).await?;
        let mut rows = self.rows.lock().expect("token cache lock");
        if self.clears.load(std::sync::atomic::Ordering::SeqCst) != clears {
            return Ok(row);
        }
        if rows.len() >= TOKEN_CACHE_SIZE {
            rows.clear();
        }
        rows.insert(id.to_owned(), (Instant::now(), row.clone()));
        Ok(row)
    }

    /// Once a token existed, the answer never changes back.
    async fn any_ever(&self, db: &crate::store::Db) -> Result<bool> {
        self.check_marker(db);
        if let Some((at, any)) = *self.any_ever.lock().expect("token cache lock")
            && (any || at.elapsed() < TOKEN_CACHE_FOR)
        {
            return Ok(any);
        }
        let clears = self.clears.load(std::sync::atomic::Ordering::SeqCst);
        let any = store::tokens::any_ever(&mut *db.reader().await?).await?;
        let mut kept = self.any_ever.lock().expect("token cache lock");
        if self.clears.load(std::sync::atomic::Ordering::SeqCst) == clears {
            *kept = Some((Instant::now(), any));
        }
        Ok(any)
    }

    fn clear(&self) {
        let mut rows = self.rows.lock().expect("token cache lock");
        let mut any_ever = self.any_ever.lock().expect("token cache lock");
        self.clears
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        rows.clear();
        *any_ever = None;
    }
}

/// Failed attempts of one client address within the current window.
struct Failures {
    since: Instant,
    count: u32,
}

/// Failed attempts one client address may make per window before it is refused.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses whose failures are counted at once.
const MAX_TRACKED: usize = 10_000;
/// Tickets one token may have outstanding.
const MAX_TICKETS_PER_TOKEN: usize = 100;

impl Auth {
    pub fn new(mode: Mode, key: crate::auth::TokenKey) -> Self {
        Self {
            mode,
            key,
            failures: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
            known: TokenCache::default(),
        }
    }

    /// The service changed the tokens table: read it again.
    pub fn forget_tokens(&self) {
        self.known.clear();
    }

    /// A ticket for one request of `token_id`'s holder (none: an anonymous caller),
    /// usable once within `TICKET_LIFETIME`.
    pub fn issue_ticket(&self, token_id: Option<String>) -> Result<String> {
        let (text, digest) = crate::auth::new_ticket()
            .map_err(|e| Error::Internal(format!("no randomness for a ticket: {e}")))?;
        let mut tickets = self.tickets.lock().expect("tickets lock");
        tickets.retain(|_, t| t.expires > Instant::now());
        let own = tickets.values().filter(|t| t.token_id == token_id).count();
        if tickets.len() >= MAX_TICKETS || own >= MAX_TICKETS_PER_TOKEN {
            return Err(Error::with_extra(
                ErrorCode::TooManyAttempts,
                "too many tickets outstanding; use or let some expire first",
                serde_json::json!({ "retry_after_seconds": TICKET_LIFETIME.as_secs() }),
            ));
        }
        let expires = Instant::now() + TICKET_LIFETIME;
        tickets.insert(digest, Ticket { token_id, expires });
        Ok(text)
    }

    /// Use a ticket (it is gone afterwards): the token it was issued for, if it was
    /// one of ours and is still valid.
    fn redeem(&self, text: &str) -> Option<Option<String>> {
        let digest = crate::auth::ticket_digest(text);
        let ticket = self.tickets.lock().expect("tickets lock").remove(&digest)?;
        (ticket.expires > Instant::now()).then_some(ticket.token_id)
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
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&client) {
            // Forget windows that ended; past the bound, new addresses go uncounted
            // rather than letting the map (and this lock's hold) grow.
            failures.retain(|_, f| f.since.elapsed() < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED {
                return;
            }
        }
        let entry = failures.entry(client).or_insert(Failures {
            since: Instant::now(),
            count: 0,
        });
        if entry.since.elapsed() >= FAILURE_WINDOW {
            *entry = Failures {
                since: Instant::now(),
                count: 0,
            };
        }
        entry.count += 1;
    }
}

/// Who made a request: the token's name and scope, or nobody when authentication is
/// off or no token exists yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    Token {
        /// The public part of the token's text (what a ticket refers to).
        id: String,
        name: String,
        scope: Scope,
    },
}

impl Caller {
    /// The token the request came with.
    pub fn token_id(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Token { id, .. } => Some(id),
        }
    }

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
        query: request.uri().query().map(str::to_owned),
        host: request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
        client: request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip()),
    };
    let (method, path) = (asked.method.clone(), asked.path.clone());
    match check(&state, asked).await {
        Ok(caller) => {
            let name = caller.name().unwrap_or("anonymous").to_owned();
            request.extensions_mut().insert(caller);
            let response = next.run(request).await;
            // Who changed what, for every change, a job's or not (a rename, a
            // schedule, a token, a cancel).
            if !matches!(method, Method::GET | Method::HEAD) {
                let status = response.status().as_u16();
                let path = path.unwrap_or_default();
                tracing::info!(requested_by = %name, %method, path, status, "change requested");
            }
            response
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
    /// The query string, for a route that takes a ticket.
    query: Option<String>,
    host: Option<String>,
    client: IpAddr,
}

async fn check(state: &AppState, asked: Asked) -> Result<Caller> {
    let Asked {
        method,
        path,
        authorization,
        query,
        host,
        client,
    } = asked;
    let Some(path) = path else {
        // Fallbacks (unknown paths and methods) answer their own problems.
        return Ok(Caller::Anonymous);
    };
    // HEAD is a GET without the body (axum answers it with the GET handler).
    let asked_as = if method == Method::HEAD {
        Method::GET
    } else {
        method.clone()
    };
    let needed = match access(&asked_as, &path) {
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
    // Only a token manages tokens, whatever the mode: nobody anonymous mints one that
    // would outlive an open first start or `--insecure-no-auth`.
    let manages_tokens = path.starts_with("/v1/tokens");
    if auth.mode == Mode::Off && !manages_tokens {
        return Ok(Caller::Anonymous);
    }
    let now = store::now();
    let key = client_key(client);
    // A client that failed too often is told to wait, but only when it fails again: a
    // valid token is never refused, so one bad client behind a shared address (a
    // proxy) cannot lock the others out.
    let blocked = auth.blocked_for(key);
    let refused = |reason: &str| {
        auth.record_failure(key);
        tracing::warn!(%client, %method, path, reason, "request refused: bad token");
        match blocked {
            Some(seconds) => Error::with_extra(
                ErrorCode::TooManyAttempts,
                format!("too many failed attempts from {client}; try again in {seconds} s"),
                serde_json::json!({ "retry_after_seconds": seconds }),
            ),
            None => unauthorized(reason),
        }
    };
    let ticket = query.as_deref().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("ticket="))
            .map(str::to_owned)
    });
    // A ticket stands for the token it was issued to, checked again now (revoked or
    // expired since: refused); only where a browser cannot send the header.
    let ticket_token = match ticket {
        Some(text) if authorization.is_none() && accepts_ticket(&asked_as, &path) => {
            match auth.redeem(&text) {
                Some(token_id) => Some(token_id),
                None => return Err(refused("unknown, used or expired ticket")),
            }
        }
        _ => None,
    };
    if let Some(Some(token_id)) = ticket_token {
        let found = auth.known.get(&state.db, &token_id).await?;
        let Some((token, _)) = found.filter(|(t, _)| t.usable_at(now)) else {
            return Err(refused("the ticket's token was revoked or has expired"));
        };
        return allow(token, needed, &method, &path);
    }
    let Some(header) = authorization else {
        // Open only until the first token is made: once one existed, its expiry or
        // revocation does not open the service again.
        if auth.mode == Mode::WhenDefined
            && !manages_tokens
            && !auth.known.any_ever(&state.db).await?
        {
            // A web page can point a name of its own at 127.0.0.1 (DNS rebinding); the
            // browser then sends that name as Host.
            if host.as_deref().is_some_and(is_loopback_host) {
                return Ok(Caller::Anonymous);
            }
            return Err(unauthorized(
                "without a token, only requests addressed to the loopback interface (Host localhost, 127.0.0.1 or [::1]) are served",
            ));
        }
        return Err(unauthorized(
            "this endpoint needs a token: send Authorization: Bearer <token>",
        ));
    };
    // The scheme's name is case-insensitive (RFC 9110).
    let text = header.to_str().ok().and_then(|h| {
        let (scheme, rest) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let Some(text) = text else {
        return Err(refused("the Authorization header must read Bearer <token>"));
    };
    let presented = match Presented::parse(text) {
        Ok(presented) => presented,
        Err(e) => return Err(refused(&e.to_string())),
    };
    let found = auth.known.get(&state.db, &presented.id).await?;
    let Some((token, _)) = found.filter(|(_, digest)| presented.matches(&state.auth.key, digest))
    else {
        return Err(refused("unknown token"));
    };
    if let Some(at) = token.revoked_at {
        return Err(refused(&format!(
            "token {} was revoked at {at}",
            token.name
        )));
    }
    if let Some(at) = token.expires_at.filter(|&at| now >= at) {
        return Err(refused(&format!("token {} expired at {at}", token.name)));
    }
    allow(token, needed, &method, &path)
}

/// Whether a `Host` header names the loopback interface.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The address failures are counted under: an IPv6 client by its /64 (one host
/// usually holds a whole /64), an IPv4-mapped one as IPv4.
fn client_key(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

/// A valid token's caller, if its scope is enough for the route.
fn allow(token: ApiToken, needed: Scope, method: &Method, path: &str) -> Result<Caller> {
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
        id: token.id,
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
        let routes = routes();
        let missing: Vec<String> = routes
            .iter()
            .filter(|(method, path)| access(method, path).is_none())
            .map(|(method, path)| format!("{method} {path}"))
            .collect();
        assert!(routes.len() > 40, "only {} routes found", routes.len());
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
