//! The catalog's schema migrations, and the advisory lock that serialises
//! applying them across nodes.

/// Schema migrations, applied in order at start: `(version, name, SQL)`.
///
/// Rule (expand → migrate → contract): a migration only adds — tables,
/// nullable columns or columns with a default, indexes — so that nodes of the
/// previous release keep working against the new schema during a rolling
/// upgrade. Dropping or renaming comes in a later release, once no running
/// version reads the old column. Never edit a released migration; add one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "catalog tables",
        "CREATE TABLE bitclone_tenants (name text PRIMARY KEY);
        CREATE TABLE bitclone_datasets (
            tenant text NOT NULL REFERENCES bitclone_tenants (name), name text NOT NULL,
            max_fencing_token bigint NOT NULL, head_snapshot text,
            PRIMARY KEY (tenant, name));
        CREATE TABLE bitclone_snapshots (
            tenant text NOT NULL, dataset text NOT NULL,
            id text NOT NULL CHECK (id ~ '^[0-9a-f]{64}$'),
            parent text CHECK (parent ~ '^[0-9a-f]{64}$'),
            job text NOT NULL, fencing_token bigint NOT NULL,
            files bigint NOT NULL, bytes bigint NOT NULL, created_unix_ms bigint NOT NULL,
            PRIMARY KEY (tenant, dataset, id),
            FOREIGN KEY (tenant, dataset) REFERENCES bitclone_datasets (tenant, name));
        CREATE INDEX bitclone_snapshots_by_id ON bitclone_snapshots (id);
        CREATE TABLE bitclone_entries (
            tenant text NOT NULL, dataset text NOT NULL, snapshot text NOT NULL,
            path text NOT NULL, kind smallint NOT NULL, size bigint NOT NULL,
            mode integer NOT NULL, blake3 bytea CHECK (octet_length(blake3) = 32),
            chunk_count integer NOT NULL,
            PRIMARY KEY (tenant, dataset, snapshot, path),
            FOREIGN KEY (tenant, dataset, snapshot)
                REFERENCES bitclone_snapshots (tenant, dataset, id) ON DELETE CASCADE);",
    ),
    (
        2,
        "snapshots.committed_at",
        // Expand only: a default, so writers that do not know the column still work.
        "ALTER TABLE bitclone_snapshots
            ADD COLUMN committed_at timestamptz NOT NULL DEFAULT now();",
    ),
];

/// Session-level advisory lock serialising migrations across nodes ("bitclone").
pub(super) const MIGRATION_LOCK_KEY: i64 = 0x6269_7463_6c6f_6e65;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_strictly_increase_from_one() {
        assert_eq!(MIGRATIONS.first().map(|m| m.0), Some(1));
        for w in MIGRATIONS.windows(2) {
            assert!(w[0].0 < w[1].0, "{} then {}", w[0].0, w[1].0);
        }
    }
}
