//! `/v1/tokens`: API tokens, for an `admin` token (as `strata token` on the data
//! directory). A token's text is shown once, in the answer that creates it.
//! `/v1/tickets`: one-use tickets standing for the caller's token where a browser
//! cannot send the `Authorization` header. `/v1/whoami`: the caller's token and scope.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::Json;
use super::problem::problems;
use chrono::{DateTime, Utc};

use crate::domain::{ApiToken, Scope, TokenStatus};
use crate::error::Result;
use crate::store;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(create_ticket))
        .routes(routes!(whoami))
}

/// Who a request is made as, so that a client (the dashboard) can show what it may do
/// before it tries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"authenticated": true, "name": "ops", "scope": "operate"}))]
pub struct WhoAmI {
    /// Whether the request came with a token. False only where no token is needed
    /// (`--insecure-no-auth`, or loopback before the first token is made); the scope is
    /// then `admin`, since every operation is allowed.
    pub authenticated: bool,
    /// The token's name, as jobs and events record it in `requested_by`.
    pub name: Option<String>,
    /// What the request may do: `read` < `operate` < `admin`.
    pub scope: Scope,
}

problems!(WhoAmIProblems =);

/// The caller's token name and scope.
#[utoipa::path(get, path = "/v1/whoami", tag = "tokens",
    responses(
        (status = 200, description = "Who the request is made as", body = WhoAmI),
        WhoAmIProblems,
    ))]
async fn whoami(caller: super::auth::Caller) -> axum::Json<WhoAmI> {
    axum::Json(match caller {
        super::auth::Caller::Anonymous => WhoAmI {
            authenticated: false,
            name: None,
            scope: Scope::Admin,
        },
        super::auth::Caller::Token { name, scope, .. } => WhoAmI {
            authenticated: true,
            name: Some(name),
            scope,
        },
    })
}

/// A ticket: use it once, within a minute, as `?ticket=` where the operation says so.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"ticket": "ticket_52ba5b80284d865b869bf40a2a244b0cab1d1250c1392c99b914260aa1a02098",
    "expires_at": "2026-12-04T10:01:00Z"}))]
pub struct TicketView {
    pub ticket: String,
    pub expires_at: DateTime<Utc>,
}

problems!(CreateTicketProblems =);

/// A ticket for one request a browser makes without the `Authorization` header (a
/// template export's download link): it stands for the token that asked for it,
/// checked again when it is used, and the token never appears in a URL.
#[utoipa::path(post, path = "/v1/tickets", tag = "tokens",
    responses(
        (status = 201, description = "The ticket", body = TicketView),
        CreateTicketProblems,
    ))]
async fn create_ticket(
    State(state): State<AppState>,
    caller: super::auth::Caller,
) -> Result<Response> {
    let ticket = state
        .auth
        .issue_ticket(caller.token_id().map(str::to_owned))?;
    let expires_at =
        store::now() + chrono::Duration::from_std(super::auth::TICKET_LIFETIME).expect("a minute");
    let view = TicketView { ticket, expires_at };
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// A token, without its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"name": "scheduler", "scope": "operate", "status": "active",
    "created_at": "2026-12-04T10:00:00Z", "expires_at": null, "revoked_at": null}))]
pub struct TokenView {
    pub name: String,
    pub scope: Scope,
    pub status: TokenStatus,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TokenView {
    fn of(token: ApiToken, now: DateTime<Utc>) -> Self {
        Self {
            status: token.status_at(now),
            name: token.name,
            scope: token.scope,
            created_at: token.created_at,
            expires_at: token.expires_at,
            revoked_at: token.revoked_at,
        }
    }
}

/// Every token, revoked and expired ones too, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenView>,
}

/// A new token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "scheduler", "scope": "operate", "expires_at": "2027-03-01T00:00:00Z"}))]
pub struct CreateToken {
    /// Unique among tokens not revoked; jobs the token asks for record it as
    /// `requested_by`.
    pub name: String,
    pub scope: Scope,
    /// When the token stops working (in the future); never when absent.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A token just made: its text, shown this once (only a digest is kept).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"token": "strata_9bbd7d9cb0d1d683_52ba5b80284d865b869bf40a2a244b0cab1d1250c1392c99b914260aa1a02098",
    "name": "scheduler", "scope": "operate", "status": "active",
    "created_at": "2026-12-04T10:00:00Z", "expires_at": null, "revoked_at": null}))]
pub struct CreatedToken {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    #[serde(flatten)]
    pub view: TokenView,
}

problems!(ListTokensProblems =);

/// List the tokens (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses(
        (status = 200, description = "Every token", body = TokenList),
        ListTokensProblems,
    ))]
async fn list_tokens(State(state): State<AppState>) -> Result<axum::Json<TokenList>> {
    let now = store::now();
    let tokens = store::tokens::list(&mut *state.db.reader().await?).await?;
    Ok(axum::Json(TokenList {
        items: tokens.into_iter().map(|t| TokenView::of(t, now)).collect(),
    }))
}

problems!(CreateTokenProblems = JSON_BODY, NAMED);

/// Create a token. Its text is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses(
        (status = 201, description = "The token, with its text", body = CreatedToken),
        CreateTokenProblems,
    ))]
async fn create_token(
    State(state): State<AppState>,
    Json(body): Json<CreateToken>,
) -> Result<Response> {
    let (token, text) = crate::auth::issue(
        &state.db,
        &state.auth.key,
        &body.name,
        body.scope,
        body.expires_at,
    )
    .await?;
    state.auth.forget_tokens();
    let created = CreatedToken {
        token: text,
        view: TokenView::of(token, store::now()),
    };
    Ok((StatusCode::CREATED, axum::Json(created)).into_response())
}

problems!(RevokeTokenProblems = ; TokenNotFound);

/// Revoke a token: every request with it is refused from now on. Its record stays
/// (jobs name it), and its name can be given to a new token.
#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "tokens",
    params(("name" = String, Path, description = "Token name")),
    responses(
        (status = 204, description = "Revoked"),
        RevokeTokenProblems,
    ))]
async fn revoke_token(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    crate::auth::revoke(&state.db, &name).await?;
    state.auth.forget_tokens();
    Ok(StatusCode::NO_CONTENT)
}
