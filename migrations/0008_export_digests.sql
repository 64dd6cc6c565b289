-- Size and SHA-256 of each template export (plain or compressed), computed once per
-- generation of the template (its updated_at, which converting it to a VM and back
-- changes): a template's files never change while it is one. Gone with the volume.
CREATE TABLE export_digests (
    volume_id  TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    compressed INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    PRIMARY KEY (volume_id, compressed, generation)
);
