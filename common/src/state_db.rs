//! Opening a fedpriv state database (feature `sqlite`): the coordinator's store and the
//! site's ledger are each one SQLite file, and both are opened, checked, created and migrated
//! here, so the two binaries refuse a bad file in exactly the same way.
//!
//! A file is used only when it is ours (its `application_id`), intact (`integrity_check`,
//! `foreign_key_check`) and not from a newer fedpriv; anything else is refused with the path
//! and a recovery hint ([`FileProblem`]), and nothing is reset, rebuilt or written first.
//! A new file is created complete or not at all (built under a temporary name, then linked
//! into place). Read-write connections run WAL with `synchronous=FULL`: a commit that has
//! returned survives power loss.
//!
//! Each store supplies only its [`DbSpec`] and its own queries, and wraps [`DbFileError`] in
//! its own error type.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

/// Why a state database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbFileError {
    /// The file cannot be used as this database. The operator's to resolve (the message says
    /// how); nothing was reset.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: FileProblem },
    /// Creating or inspecting the file failed at the file-system level.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Any other SQLite failure: ours, not the file's.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// What is wrong with a state file. The messages carry the recovery hint.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FileProblem {
    #[error(
        "the file exists but is empty, so it holds no ledger; fedpriv never creates a ledger \
         over an existing file: remove it if this is a new installation, otherwise restore \
         it from backup"
    )]
    Empty,
    #[error(
        "not a SQLite database (bad header): check the path; if it is the fedpriv state file \
         it is damaged: restore it from backup"
    )]
    NotSqlite,
    #[error("a SQLite database but not a {expected} (application id {found:#x}): check the path")]
    NotOurs { expected: &'static str, found: i32 },
    #[error(
        "written by a newer fedpriv (schema version {found}, this build knows up to \
         {supported}): run that version; nothing was changed"
    )]
    NewerSchema { found: i64, supported: i64 },
    #[error(
        "the database is damaged ({0}): restore it from backup (the ledger and the audit \
         trail are never rebuilt from scratch); nothing was reset"
    )]
    Corrupt(String),
}

/// What identifies one kind of state database.
#[derive(Debug)]
pub struct DbSpec {
    /// Written to the file header (`PRAGMA application_id`), so one kind of fedpriv file is
    /// never taken for another or for someone else's database.
    pub app_id: i32,
    /// Named in [`FileProblem::NotOurs`], e.g. "fedpriv site ledger".
    pub kind: &'static str,
    /// `migrations[i]` takes the schema from version i to i + 1; the first creates the
    /// `schema_version` table.
    pub migrations: &'static [&'static str],
    /// One entry per migration: what a read-only open creates in TEMP for a file that
    /// predates it ("" when the migration needs no stand-in).
    pub read_only_standins: &'static [&'static str],
}

/// How [`open_db`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Create if missing, migrate, WAL with `synchronous=FULL`.
    ReadWrite,
    /// Never create, migrate or write (inventories that run beside the writer).
    ReadOnly,
}

/// Opens `path`, creating it if missing, after checking it is ours, intact and not newer.
/// With [`Access::ReadOnly`] a missing file is an `Io` error of kind `NotFound`.
pub fn open_db(path: &Path, spec: &DbSpec, access: Access) -> Result<Connection, DbFileError> {
    let io = |e: std::io::Error| DbFileError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let bad = |problem: FileProblem| DbFileError::File {
        path: path.to_path_buf(),
        problem,
    };
    // Any SQLite failure while checking the file: corruption is the operator's, the rest ours.
    let check = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            bad(FileProblem::Corrupt(e.to_string()))
        }
        _ => DbFileError::Sqlite(e),
    };
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && access == Access::ReadWrite => {
            create_db(path, spec)?
        }
        Err(e) => return Err(io(e)),
    }
    // Look at the header ourselves: SQLite treats an empty file as a new database, and that
    // would silently reset a ledger that was truncated to nothing.
    let mut header = Vec::with_capacity(100);
    {
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|f| f.take(100).read_to_end(&mut header))
            .map_err(io)?;
    }
    if header.is_empty() {
        return Err(bad(FileProblem::Empty));
    }
    if !header.starts_with(b"SQLite format 3\0") {
        return Err(bad(FileProblem::NotSqlite));
    }
    if header.len() < 100 {
        return Err(bad(FileProblem::Corrupt(
            "file shorter than its header".into(),
        )));
    }
    // No CREATE flag: if the file vanished since the check, fail rather than make a new one.
    let mode = match access {
        Access::ReadWrite => OpenFlags::SQLITE_OPEN_READ_WRITE,
        Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
    };
    let conn =
        Connection::open_with_flags(path, mode | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(check)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // The file may have been edited: never run functions named in its schema.
    conn.pragma_update(None, "trusted_schema", false)?;
    // Before anything that writes (journal mode): a foreign file is left as it was.
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(check)?;
    if app_id != spec.app_id {
        return Err(bad(FileProblem::NotOurs {
            expected: spec.kind,
            found: app_id,
        }));
    }
    let mut problems: Vec<String> = Vec::new();
    conn.pragma_query(None, "integrity_check", |r| {
        problems.push(r.get(0)?);
        Ok(())
    })
    .map_err(check)?;
    if problems != ["ok"] {
        problems.truncate(3);
        return Err(bad(FileProblem::Corrupt(problems.join("; "))));
    }
    let mut dangling = 0usize;
    conn.pragma_query(None, "foreign_key_check", |_| {
        dangling += 1;
        Ok(())
    })
    .map_err(check)?;
    if dangling > 0 {
        return Err(bad(FileProblem::Corrupt(format!(
            "{dangling} rows refer to rows that do not exist"
        ))));
    }
    if access == Access::ReadWrite {
        configure(&conn).map_err(check)?;
    }
    let has_version: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .map_err(check)?;
    let versions: Vec<i64> = if has_version {
        let mut stmt = conn.prepare("SELECT version FROM schema_version")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<Result<_, _>>().map_err(check)?
    } else {
        Vec::new()
    };
    let &[version] = versions.as_slice() else {
        return Err(bad(FileProblem::Corrupt(
            "no single schema version recorded".into(),
        )));
    };
    let supported = spec.migrations.len() as i64;
    if version > supported {
        return Err(bad(FileProblem::NewerSchema {
            found: version,
            supported,
        }));
    }
    if access == Access::ReadOnly {
        let from = usize::try_from(version)
            .map_err(|_| bad(FileProblem::Corrupt(format!("schema version {version}"))))?;
        for standin in spec.read_only_standins.get(from..).unwrap_or_default() {
            conn.execute_batch(standin)?;
        }
        return Ok(conn);
    }
    let mut conn = conn;
    if version < supported {
        let from = usize::try_from(version)
            .map_err(|_| bad(FileProblem::Corrupt(format!("schema version {version}"))))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        migrate(&tx, from, spec.migrations)?;
        tx.commit()?;
    }
    Ok(conn)
}

/// Per-connection settings: WAL, and a commit that has returned survives power loss.
pub fn configure(conn: &Connection) -> rusqlite::Result<()> {
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode stayed {mode:?}; the file system may not support WAL"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)
}

/// Runs `migrations[from..]` in `tx` and records the schema version they reach. The caller
/// has checked `from <= migrations.len()`.
pub fn migrate(
    tx: &rusqlite::Transaction<'_>,
    from: usize,
    migrations: &[&str],
) -> rusqlite::Result<()> {
    for m in &migrations[from..] {
        tx.execute_batch(m)?;
    }
    tx.execute("DELETE FROM schema_version", [])?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES (?1)",
        [migrations.len() as i64],
    )?;
    Ok(())
}

/// Creates a migrated database under a temporary name and links it into place, so `path`
/// either does not exist or holds a complete database, whenever the process dies.
fn create_db(path: &Path, spec: &DbSpec) -> Result<(), DbFileError> {
    let io = |e: std::io::Error| DbFileError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".init");
    let tmp = path.with_file_name(tmp_name);
    // Leftovers of an earlier attempt that died; a stale WAL would otherwise be replayed.
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = tmp.clone().into_os_string();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    }
    let mut conn = Connection::open(&tmp)?;
    configure(&conn)?;
    let tx = conn.transaction()?;
    tx.pragma_update(None, "application_id", spec.app_id)?;
    migrate(&tx, 0, spec.migrations)?;
    tx.commit()?;
    // Closing checkpoints the WAL into the file, so the file alone is the database.
    conn.close().map_err(|(_, e)| e)?;
    // A hard link, unlike rename, never replaces a file that appeared at `path` meanwhile.
    match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(e)),
        _ => {}
    }
    std::fs::remove_file(&tmp).map_err(io)?;
    sync_dir(path).map_err(io)
}

/// Makes the new directory entry itself durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A two-version schema of its own, so the migration path and the stand-ins are tested
    // here independently of either store's schema.
    const MIGRATIONS: &[&str] = &[
        "CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
         CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL) STRICT;",
        "CREATE TABLE notes (item INTEGER NOT NULL REFERENCES items(id), note TEXT) STRICT;",
    ];
    const SPEC: DbSpec = DbSpec {
        app_id: 0x7465_7374, // "test"
        kind: "test database",
        migrations: MIGRATIONS,
        read_only_standins: &["", "CREATE TEMP TABLE notes (item INTEGER, note TEXT);"],
    };
    const V1: DbSpec = DbSpec {
        migrations: &[MIGRATIONS[0]],
        read_only_standins: &[""],
        ..SPEC
    };
    const OTHER: DbSpec = DbSpec {
        app_id: 0x6f74_6872, // "othr"
        kind: "second test database",
        ..SPEC
    };

    fn problem(e: DbFileError) -> FileProblem {
        match e {
            DbFileError::File { problem, .. } => problem,
            other => panic!("expected a file problem, got {other:?}"),
        }
    }

    fn version(conn: &Connection) -> i64 {
        conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .expect("version")
    }

    #[test]
    fn creates_migrates_and_reads_an_older_file_without_writing_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let conn = open_db(&path, &V1, Access::ReadWrite).expect("create v1");
        conn.execute("INSERT INTO items (id, name) VALUES (1, 'a')", [])
            .expect("insert");
        assert_eq!(version(&conn), 1);
        drop(conn);
        assert!(!dir.path().join("state.db.init").exists());

        let before = std::fs::read(&path).expect("read");
        let ro = open_db(&path, &SPEC, Access::ReadOnly).expect("read-only open of v1");
        let notes: i64 = ro
            .query_row("SELECT count(*) FROM notes", [], |r| r.get(0))
            .expect("the stand-in answers");
        assert_eq!((notes, version(&ro)), (0, 1));
        assert!(ro
            .execute("INSERT INTO items (id, name) VALUES (2, 'b')", [])
            .is_err());
        drop(ro);
        assert_eq!(std::fs::read(&path).expect("read"), before, "never written");

        let rw = open_db(&path, &SPEC, Access::ReadWrite).expect("migrate to v2");
        assert_eq!(version(&rw), 2);
        rw.execute("INSERT INTO notes (item, note) VALUES (1, 'x')", [])
            .expect("the migrated table");
        let journal: String = rw
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("journal mode");
        assert_eq!(journal, "wal");
    }

    #[test]
    fn refusals_carry_the_path_and_leave_the_file_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        drop(open_db(&path, &SPEC, Access::ReadWrite).expect("create"));
        let before = std::fs::read(&path).expect("read");

        let err = open_db(&path, &OTHER, Access::ReadWrite).expect_err("another kind");
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
        assert!(
            err.to_string().contains("not a second test database"),
            "{err}"
        );
        assert_eq!(
            problem(err),
            FileProblem::NotOurs {
                expected: "second test database",
                found: SPEC.app_id
            }
        );
        assert_eq!(
            problem(open_db(&path, &V1, Access::ReadWrite).expect_err("newer")),
            FileProblem::NewerSchema {
                found: 2,
                supported: 1
            }
        );
        assert_eq!(std::fs::read(&path).expect("read"), before);

        let missing = dir.path().join("missing.db");
        match open_db(&missing, &SPEC, Access::ReadOnly) {
            Err(DbFileError::Io { path: p, source }) => {
                assert_eq!(
                    (p, source.kind()),
                    (missing.clone(), std::io::ErrorKind::NotFound)
                )
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert!(!missing.exists());
    }
}
