//! API tokens: their records and the keyed digests of their secrets.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{get_enum, get_opt_ts, get_ts, is_unique_violation, ts};
use crate::auth::TokenKey;
use crate::domain::{ApiToken, Scope, Timestamp};
use crate::error::{Error, ErrorCode, Result};

fn from_row(row: &SqliteRow) -> Result<ApiToken> {
    Ok(ApiToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        scope: get_enum(row, "scope", Scope::parse)?,
        created_at: get_ts(row, "created_at")?,
        expires_at: get_opt_ts(row, "expires_at")?,
        revoked_at: get_opt_ts(row, "revoked_at")?,
    })
}

/// Store a new token; a name a token not revoked has is `name_taken`.
pub async fn insert(conn: &mut SqliteConnection, token: &ApiToken, digest: &[u8]) -> Result<()> {
    let inserted = sqlx::query(
        "INSERT INTO tokens (id, name, scope, digest, digest_kind, created_at, expires_at, revoked_at)
         VALUES (?, ?, ?, ?, 'keyed', ?, ?, NULL)",
    )
    .bind(&token.id)
    .bind(&token.name)
    .bind(token.scope.as_str())
    .bind(digest)
    .bind(ts(token.created_at))
    .bind(token.expires_at.map(ts))
    .execute(&mut *conn)
    .await
    .map_err(Error::from);
    match inserted {
        Err(e) if is_unique_violation(&e) => Err(Error::problem(
            ErrorCode::NameTaken,
            format!("a token named {} exists; revoke it first", token.name),
        )),
        other => other.map(|_| ()),
    }
}

/// The token with this id and its secret's digest.
pub async fn get(conn: &mut SqliteConnection, id: &str) -> Result<Option<(ApiToken, Vec<u8>)>> {
    let row = sqlx::query("SELECT * FROM tokens WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|row| Ok((from_row(&row)?, row.try_get("digest")?)))
        .transpose()
}

/// Every token, revoked ones too, oldest first.
pub async fn list(conn: &mut SqliteConnection) -> Result<Vec<ApiToken>> {
    let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at, id")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(from_row).collect()
}

/// Revoke the token named `name` (not revoked yet); the revoked record, if any.
pub async fn revoke(
    conn: &mut SqliteConnection,
    name: &str,
    now: Timestamp,
) -> Result<Option<ApiToken>> {
    let row = sqlx::query(
        "UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING *",
    )
    .bind(ts(now))
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Whether any token can be used at `now`: with none, a service on a loopback address
/// serves without authentication.
pub async fn any_usable(conn: &mut SqliteConnection, now: Timestamp) -> Result<bool> {
    let found = sqlx::query(
        "SELECT 1 FROM tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) LIMIT 1",
    )
    .bind(ts(now))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

/// Whether a token was ever made (revoked and expired ones count): a loopback service
/// is open only before the first.
pub async fn any_ever(conn: &mut SqliteConnection) -> Result<bool> {
    let found = sqlx::query("SELECT 1 FROM tokens LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?;
    Ok(found.is_some())
}

/// Bring every digest still kept as a plain SHA-256 (rows of the release before keyed
/// digests) under `key`; how many were.
pub async fn key_plain_digests(conn: &mut SqliteConnection, key: &TokenKey) -> Result<u64> {
    let plain: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT id, digest FROM tokens WHERE digest_kind = 'sha256'")
            .fetch_all(&mut *conn)
            .await?;
    for (id, digest) in &plain {
        sqlx::query("UPDATE tokens SET digest = ?, digest_kind = 'keyed' WHERE id = ?")
            .bind(key.keyed(digest))
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(plain.len() as u64)
}

/// How many tokens were made under a key (revoked ones too).
pub async fn count_keyed(conn: &mut SqliteConnection) -> Result<u64> {
    let (count,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM tokens WHERE digest_kind = 'keyed'")
            .fetch_one(&mut *conn)
            .await?;
    Ok(count as u64)
}
