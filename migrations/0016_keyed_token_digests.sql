-- Token digests become keyed: HMAC-SHA256 under the data directory's token.key of the
-- secret's SHA-256 digest, so a copy of the database alone cannot check a guessed
-- token. Rows of the release before keep their plain SHA-256 digest ('sha256') until
-- the next start (or `strata token`) rewrites them under the key ('keyed'); the plain
-- digest is the keyed digest's input, so no secret is needed for that.
ALTER TABLE tokens ADD COLUMN digest_kind TEXT NOT NULL DEFAULT 'sha256'
    CHECK (digest_kind IN ('sha256', 'keyed'));
