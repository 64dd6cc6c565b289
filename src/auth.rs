//! API tokens: their text form, how one is made, and what is stored of it.
//!
//! A token reads `strata_<id>_<secret>`: `id` (16 hex digits) names the stored row and
//! is not secret; `secret` (64 hex digits, 256 random bits from the OS) is stored only
//! as a keyed digest, HMAC-SHA256 under the data directory's `token.key` of the
//! secret's SHA-256 digest. A presented token is found by its id and its digest
//! compared with the stored one in constant time. The key keeps a copy of the database
//! (a backup, a dump) from checking guesses offline; a fast digest is enough, since the
//! secret is random, not a password a slow hash must protect.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
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

    /// Whether this token's secret is the one `digest` was made from under `key`
    /// (constant time).
    pub fn matches(&self, key: &TokenKey, digest: &[u8]) -> bool {
        key.digest(&self.secret).ct_eq(digest).into()
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
    pub fn generate(key: &TokenKey) -> std::io::Result<Self> {
        let mut id = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::fill(&mut id).map_err(std::io::Error::other)?;
        getrandom::fill(&mut secret).map_err(std::io::Error::other)?;
        let id = encode_hex(&id);
        let text = format!("{PREFIX}{id}_{}", encode_hex(&secret));
        let digest = key.digest(&secret);
        Ok(Self { text, id, digest })
    }
}

/// Make a token named `name` with `scope`, usable until `expires_at`: its record, and
/// its text, which only this caller ever sees. The API and `strata token create` both
/// come here.
pub async fn issue(
    db: &Db,
    key: &TokenKey,
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
    let new = NewToken::generate(key)
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
    tokens_changed(db);
    Ok((token, new.text))
}

/// Tell a running service the tokens changed (see `Db::tokens_marker`). Should that
/// fail, it reads them again within a second anyway.
fn tokens_changed(db: &Db) {
    if let Err(e) = db.mark_tokens_changed() {
        tracing::warn!(error = %e, marker = %db.tokens_marker().display(), "cannot mark the tokens as changed; a running service sees the change within a second");
    }
}

/// Revoke the token named `name`: refused from the next request on.
pub async fn revoke(db: &Db, name: &str) -> Result<ApiToken> {
    let mut tx = db.begin().await?;
    let revoked = store::tokens::revoke(&mut tx, name, store::now()).await?;
    tx.commit().await?;
    tokens_changed(db);
    revoked.ok_or_else(|| {
        Error::problem(
            ErrorCode::TokenNotFound,
            format!("no token named {name} (or it is revoked already)"),
        )
    })
}

/// The key token digests are made under: 32 random bytes in `<data dir>/token.key`
/// (mode 0600), made on first use by the service or `strata token`. Back it up with
/// the database: without it no stored token can be checked, and only new tokens work.
pub struct TokenKey([u8; KEY_BYTES]);

const KEY_BYTES: usize = 32;
const KEY_FILE: &str = "token.key";

impl TokenKey {
    /// The data directory's key, made if it has none yet. Two processes making it at
    /// once (the service's first start and a `strata token create`) agree on one: each
    /// writes its own file in full and links it into place, which only one link can
    /// win; the other reads the winner's.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join(KEY_FILE);
        match Self::load(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let mut key = [0u8; KEY_BYTES];
        getrandom::fill(&mut key).map_err(std::io::Error::other)?;
        let staged = data_dir.join(format!("{KEY_FILE}.{}.new", encode_hex(&key[..8])));
        let written =
            write_private(&staged, &key).and_then(|()| match std::fs::hard_link(&staged, &path) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                other => other,
            });
        let _ = std::fs::remove_file(&staged);
        written?;
        crate::files::fsync_dir(data_dir)?;
        Self::load(&path)
    }

    fn load(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        let key = <[u8; KEY_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
            std::io::Error::other(format!(
                "{} holds {} bytes, not a {KEY_BYTES}-byte key: restore it from a backup (or remove it and create new tokens; no existing token will work)",
                path.display(),
                bytes.len()
            ))
        })?;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the token key is readable by other users; chmod 600 it");
        }
        Ok(Self(key))
    }

    /// Where the key of `data_dir` lives.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(KEY_FILE)
    }

    fn digest(&self, secret: &[u8; SECRET_BYTES]) -> Vec<u8> {
        self.keyed(&Sha256::digest(secret))
    }

    /// The keyed digest of a secret whose plain SHA-256 digest is `plain`: how rows of
    /// the release before, which kept the plain digest, are brought under the key.
    pub fn keyed(&self, plain: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(plain);
        mac.finalize().into_bytes().to_vec()
    }
}

/// Write `bytes` to a new file only its owner can read, and make it durable.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Open the key of `data_dir` (making it if needed) and bring any digest still kept the
/// old, unkeyed way under it, in one transaction. The service and `strata token` both
/// do this right after opening the database.
pub async fn open_key(db: &Db, data_dir: &Path) -> Result<TokenKey> {
    let had_key = TokenKey::path(data_dir).exists();
    let key = TokenKey::load_or_create(data_dir).map_err(|e| {
        Error::Internal(format!(
            "cannot open the token key {}: {e}",
            TokenKey::path(data_dir).display()
        ))
    })?;
    if !had_key {
        let lost = store::tokens::count_keyed(&mut *db.reader().await?).await?;
        if lost > 0 {
            tracing::warn!(
                tokens = lost,
                path = %TokenKey::path(data_dir).display(),
                "the token key was missing and a new one was made: the tokens made under the old key no longer work; restore the old key from a backup to bring them back, or create new tokens"
            );
        }
    }
    let mut tx = db.begin().await?;
    let upgraded = store::tokens::key_plain_digests(&mut tx, &key).await?;
    tx.commit().await?;
    if upgraded > 0 {
        tracing::info!(upgraded, "token digests now kept under the token key");
    }
    Ok(key)
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

    fn key(dir: &tempfile::TempDir) -> TokenKey {
        TokenKey::load_or_create(dir.path()).unwrap()
    }

    #[test]
    fn a_new_token_parses_back_and_matches_only_its_own_digest_under_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = key(&dir);
        let token = NewToken::generate(&key).unwrap();
        assert_eq!(token.text.len(), TOKEN_LEN);
        let presented = Presented::parse(&token.text).unwrap();
        assert_eq!(presented.id, token.id);
        assert!(presented.matches(&key, &token.digest));
        let other = NewToken::generate(&key).unwrap();
        assert_ne!(other.id, token.id);
        assert!(!presented.matches(&key, &other.digest));
        assert!(!presented.matches(&key, &token.digest[..31]));
        // The stored digest is useless without the key: not the plain digest, and
        // another data directory's key does not check it.
        assert_ne!(token.digest, Sha256::digest(presented.secret).to_vec());
        let elsewhere = tempfile::tempdir().unwrap();
        assert!(!presented.matches(&self::key(&elsewhere), &token.digest));
        // A plain digest of the release before, brought under the key, matches.
        let plain = Sha256::digest(presented.secret);
        assert!(presented.matches(&key, &key.keyed(&plain)));
    }

    #[test]
    fn the_key_is_made_once_private_and_durable_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Many makers at once agree on one key and leave no staged file behind.
        let keys: Vec<[u8; KEY_BYTES]> = std::thread::scope(|scope| {
            let makers: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| TokenKey::load_or_create(dir.path()).unwrap().0))
                .collect();
            makers.into_iter().map(|m| m.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from(KEY_FILE)]);
        let path = TokenKey::path(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(key(&dir).0, keys[0], "the key is read back, not remade");

        std::fs::write(&path, [7u8; 31]).unwrap();
        let refused = TokenKey::load_or_create(dir.path()).err().unwrap();
        assert!(refused.to_string().contains("31 bytes"), "{refused}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![7u8; 31],
            "left for the operator"
        );
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
        let dir = tempfile::tempdir().unwrap();
        let token = NewToken::generate(&key(&dir)).unwrap().text;
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
