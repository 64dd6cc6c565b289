//! API tokens: their text form, how one is made, and what is stored of it.
//!
//! A token reads `strata_<id>_<secret>`: `id` (16 hex digits) names the stored row and
//! is not secret; `secret` (64 hex digits, 256 random bits from the OS) is stored only
//! as its SHA-256 digest. A presented token is found by its id and its secret's digest
//! compared with the stored one in constant time. A fast digest is enough: the secret is
//! random, not a password a slow hash must protect from guessing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{ApiToken, Scope, Timestamp, validate};
use crate::error::{Error, ErrorCode, Result};
use crate::store::{self, Db};

const PREFIX: &str = "strata_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Length of a token's text: prefix, id, separator, secret.
pub const TOKEN_LEN: usize = PREFIX.len() + 2 * ID_BYTES + 1 + 2 * SECRET_BYTES;

/// A token as a client presents it, parsed.
pub struct Presented {
    pub id: String,
    secret: [u8; SECRET_BYTES],
}

/// Why a presented token cannot be one of strata's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("a strata token is {TOKEN_LEN} characters long, this one is {0}")]
    Length(usize),
    #[error("a strata token reads strata_<16 hex digits>_<64 hex digits>")]
    Shape,
}

impl Presented {
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        if text.len() != TOKEN_LEN {
            return Err(FormatError::Length(text.chars().count()));
        }
        let rest = text.strip_prefix(PREFIX).ok_or(FormatError::Shape)?;
        let (id, secret) = rest.split_once('_').ok_or(FormatError::Shape)?;
        if id.len() != 2 * ID_BYTES || !is_lower_hex(id) {
            return Err(FormatError::Shape);
        }
        let secret = decode_hex::<SECRET_BYTES>(secret).ok_or(FormatError::Shape)?;
        Ok(Self {
            id: id.to_owned(),
            secret,
        })
    }

    /// Whether this token's secret is the one `digest` was made from (constant time).
    pub fn matches(&self, digest: &[u8]) -> bool {
        self.digest().ct_eq(digest).into()
    }

    fn digest(&self) -> Vec<u8> {
        Sha256::digest(self.secret).to_vec()
    }
}

/// A new token: its text (shown once, never stored) and what is stored of it.
pub struct NewToken {
    pub text: String,
    pub id: String,
    pub digest: Vec<u8>,
}

impl NewToken {
    /// 64 random bits of id and 256 of secret from the operating system.
    pub fn generate() -> std::io::Result<Self> {
        let mut id = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::fill(&mut id).map_err(std::io::Error::other)?;
        getrandom::fill(&mut secret).map_err(std::io::Error::other)?;
        let id = encode_hex(&id);
        let text = format!("{PREFIX}{id}_{}", encode_hex(&secret));
        let digest = Sha256::digest(secret).to_vec();
        Ok(Self { text, id, digest })
    }
}

/// Make a token named `name` with `scope`, usable until `expires_at`: its record, and
/// its text, which only this caller ever sees. The API and `strata token create` both
/// come here.
pub async fn issue(
    db: &Db,
    name: &str,
    scope: Scope,
    expires_at: Option<Timestamp>,
) -> Result<(ApiToken, String)> {
    validate::name("name", name).map_err(Error::validation)?;
    if name == crate::scheduler::SCHEDULER {
        return Err(Error::validation(
            "the name scheduler is reserved: jobs the scheduler makes are requested_by scheduler",
        ));
    }
    let now = store::now();
    if expires_at.is_some_and(|at| at <= now) {
        return Err(Error::validation("expires_at must be in the future"));
    }
    let new = NewToken::generate()
        .map_err(|e| Error::Internal(format!("no randomness for a token: {e}")))?;
    let token = ApiToken {
        id: new.id,
        name: name.to_owned(),
        scope,
        created_at: now,
        expires_at,
        revoked_at: None,
    };
    let mut tx = db.begin().await?;
    store::tokens::insert(&mut tx, &token, &new.digest).await?;
    tx.commit().await?;
    Ok((token, new.text))
}

/// Revoke the token named `name`: refused from the next request on.
pub async fn revoke(db: &Db, name: &str) -> Result<ApiToken> {
    let mut tx = db.begin().await?;
    let revoked = store::tokens::revoke(&mut tx, name, store::now()).await?;
    tx.commit().await?;
    revoked.ok_or_else(|| {
        Error::problem(
            ErrorCode::TokenNotFound,
            format!("no token named {name} (or it is revoked already)"),
        )
    })
}

/// A scope by name, or a clear refusal.
pub fn parse_scope(text: &str) -> Result<Scope> {
    Scope::parse(text)
        .ok_or_else(|| Error::validation(format!("unknown scope {text:?}: read, operate or admin")))
}

/// A lifetime such as `90m`, `12h`, `30d` or `2w` (whole numbers, one unit).
pub fn parse_lifetime(text: &str) -> Result<chrono::Duration> {
    let refuse = || {
        Error::validation(format!(
            "unknown lifetime {text:?}: a whole number and a unit, e.g. 90m, 12h, 30d or 2w"
        ))
    };
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let number: i64 = number.parse().map_err(|_| refuse())?;
    if number <= 0 || number > 100_000 {
        return Err(refuse());
    }
    Ok(match unit {
        "m" => chrono::Duration::minutes(number),
        "h" => chrono::Duration::hours(number),
        "d" => chrono::Duration::days(number),
        "w" => chrono::Duration::weeks(number),
        _ => return Err(refuse()),
    })
}

/// A ticket's text (`ticket_<64 hex digits>`, 256 random bits) and the digest it is
/// kept under: a ticket lets a browser authorise one request that cannot carry the
/// `Authorization` header (a download link, an `EventSource`) without putting the token
/// in a URL.
pub fn new_ticket() -> std::io::Result<(String, Vec<u8>)> {
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut secret).map_err(std::io::Error::other)?;
    let text = format!("ticket_{}", encode_hex(&secret));
    Ok((text.clone(), ticket_digest(&text)))
}

/// What a ticket is kept under.
pub fn ticket_digest(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !is_lower_hex(text) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_parses_back_and_matches_only_its_own_digest() {
        let token = NewToken::generate().unwrap();
        assert_eq!(token.text.len(), TOKEN_LEN);
        let presented = Presented::parse(&token.text).unwrap();
        assert_eq!(presented.id, token.id);
        assert!(presented.matches(&token.digest));
        let other = NewToken::generate().unwrap();
        assert_ne!(other.id, token.id);
        assert!(!presented.matches(&other.digest));
        assert!(!presented.matches(&token.digest[..31]));
    }

    #[test]
    fn lifetimes_and_scopes_parse_or_are_refused() {
        assert_eq!(
            parse_lifetime("90m").unwrap(),
            chrono::Duration::minutes(90)
        );
        assert_eq!(parse_lifetime("30d").unwrap(), chrono::Duration::days(30));
        for bad in ["", "d", "0d", "-1d", "1y", "1.5h", "12"] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_scope("operate").unwrap(), Scope::Operate);
        assert!(parse_scope("root").is_err());
        assert!(Scope::Admin > Scope::Operate && Scope::Operate > Scope::Read);
    }

    #[test]
    fn malformed_tokens_are_told_apart_from_unknown_ones() {
        let token = NewToken::generate().unwrap().text;
        assert_eq!(
            Presented::parse(&token[..40]).err(),
            Some(FormatError::Length(40))
        );
        let upper = token.to_uppercase();
        assert_eq!(Presented::parse(&upper).err(), Some(FormatError::Shape));
        let no_prefix = format!("xtrata_{}", &token[7..]);
        assert_eq!(Presented::parse(&no_prefix).err(), Some(FormatError::Shape));
        let bad_hex = format!("{}g", &token[..token.len() - 1]);
        assert_eq!(Presented::parse(&bad_hex).err(), Some(FormatError::Shape));
    }
}
