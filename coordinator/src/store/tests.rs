//! The store's tests: durability, refusals, migrations, read-only opens.

use super::schema::{APPLICATION_ID, MIGRATIONS, READ_ONLY_STANDINS};
use super::*;
use fedpriv_common::state_db::{configure, migrate};

fn ev(q: f64, sigma: f64, steps: u64) -> SgmEvent {
    SgmEvent::new(q, sigma, steps).expect("valid event")
}

fn sites(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn fresh() -> (tempfile::TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.db");
    let mut store = Store::open(&path).expect("open fresh");
    store
        .create_study("s1", "rounds = 3", &sites(&["a", "b", "c"]), 100)
        .expect("create study");
    (dir, path, store)
}

fn file_problem(e: StoreError) -> FileProblem {
    match e {
        StoreError::File { problem, .. } => problem,
        other => panic!("expected a file problem, got {other:?}"),
    }
}

#[test]
fn reopen_persists_everything() {
    let (_dir, path, mut store) = fresh();
    store.set_site_records("s1", "a", 120).expect("records");
    store
        .set_site_records("s1", "a", 130)
        .expect("records replaced");
    let spend = vec![
        ("a".to_string(), ev(0.1, 1.1, 5), 0.5),
        ("b".to_string(), ev(0.2, 1.2, 5), 0.7),
    ];
    store.record_spend("s1", 0, &spend, 110).expect("spend");
    store
        .complete_round(
            "s1",
            0,
            "model-0.safetensors",
            SHA,
            &sites(&["a", "b"]),
            120,
        )
        .expect("complete");
    store
        .set_study_status("s1", StudyStatus::Stopped, Some("operator"))
        .expect("status");
    let before = (
        store.studies().expect("studies"),
        store.ledger("s1").expect("ledger"),
        store.rounds("s1").expect("rounds"),
        store.site_records("s1").expect("records"),
        store.lineage("s1").expect("lineage"),
    );
    drop(store);

    let store = Store::open(&path).expect("reopen");
    let after = (
        store.studies().expect("studies"),
        store.ledger("s1").expect("ledger"),
        store.rounds("s1").expect("rounds"),
        store.site_records("s1").expect("records"),
        store.lineage("s1").expect("lineage"),
    );
    assert_eq!(before, after);
    let study = store.study("s1").expect("query").expect("exists");
    assert_eq!(study.status, StudyStatus::Stopped);
    assert_eq!(study.end_reason.as_deref(), Some("operator"));
    assert_eq!(study.config_toml, "rounds = 3");
    assert_eq!(
        store.enrolments("s1").expect("enrolments"),
        sites(&["a", "b", "c"])
    );
    assert_eq!(store.site_records("s1").expect("records")["a"], 130);
    assert_eq!(
        store.site_events("s1", "b").expect("events"),
        vec![ev(0.2, 1.2, 5)]
    );
    assert_eq!(
        store.last_completed_round("s1").expect("query"),
        Some((0, "model-0.safetensors".to_string(), SHA.to_string()))
    );
    assert!(store.study("nope").expect("query").is_none());
}

#[test]
fn spend_is_visible_without_a_clean_close() {
    let (_dir, path, mut store) = fresh();
    store
        .record_spend("s1", 0, &[("a".into(), ev(0.1, 1.0, 3), 0.2)], 1)
        .expect("spend");
    // As after a crash: no close, no checkpoint; the commit lives in the WAL.
    std::mem::forget(store);
    let store = Store::open(&path).expect("reopen");
    assert_eq!(
        store.site_events("s1", "a").expect("events"),
        vec![ev(0.1, 1.0, 3)]
    );
    assert_eq!(
        store.rounds("s1").expect("rounds")[0].status,
        RoundStatus::Reserved
    );
}

#[test]
fn durability_settings_are_on() {
    let (_dir, _path, store) = fresh();
    let get = |p: &str| -> String {
        store
            .conn
            .pragma_query_value(None, p, |r| r.get::<_, rusqlite::types::Value>(0))
            .map(|v| format!("{v:?}"))
            .expect("pragma")
    };
    assert_eq!(get("journal_mode"), "Text(\"wal\")");
    assert_eq!(get("synchronous"), "Integer(2)"); // FULL
    assert_eq!(get("foreign_keys"), "Integer(1)");
    assert_eq!(get("application_id"), format!("Integer({APPLICATION_ID})"));
}

#[test]
fn duplicate_spend_is_refused_and_the_original_survives() {
    let (_dir, path, mut store) = fresh();
    store
        .record_spend("s1", 0, &[("a".into(), ev(0.1, 1.0, 10), 0.4)], 1)
        .expect("first spend");
    let again = store.record_spend("s1", 0, &[("a".into(), ev(0.5, 0.5, 99), 9.0)], 2);
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    // The ledger refuses edits even when asked directly.
    assert!(store
        .conn
        .execute("UPDATE ledger SET steps = 0", [])
        .is_err());
    assert!(store.conn.execute("DELETE FROM ledger", []).is_err());
    drop(store);
    let store = Store::open(&path).expect("reopen");
    assert_eq!(
        store.site_events("s1", "a").expect("events"),
        vec![ev(0.1, 1.0, 10)]
    );
    let ledger = store.ledger("s1").expect("ledger");
    assert_eq!(ledger.len(), 1);
    assert_eq!((ledger[0].epsilon_after, ledger[0].recorded_at), (0.4, 1));
}

#[test]
fn record_spend_is_all_or_nothing() {
    let (_dir, _path, mut store) = fresh();
    // The same site twice in one call: nothing of round 1 is kept, not even its row.
    let dup = vec![
        ("c".to_string(), ev(0.1, 1.0, 1), 0.1),
        ("a".to_string(), ev(0.1, 1.0, 1), 0.1),
        ("a".to_string(), ev(0.2, 1.0, 1), 0.2),
    ];
    assert!(matches!(
        store.record_spend("s1", 1, &dup, 5),
        Err(StoreError::Conflict(_))
    ));
    assert!(store.ledger("s1").expect("ledger").is_empty());
    assert!(store.rounds("s1").expect("rounds").is_empty());
    // A site that is not enrolled.
    let stranger = vec![
        ("b".to_string(), ev(0.1, 1.0, 1), 0.1),
        ("zed".to_string(), ev(0.1, 1.0, 1), 0.1),
    ];
    assert!(matches!(
        store.record_spend("s1", 1, &stranger, 5),
        Err(StoreError::Conflict(_))
    ));
    assert!(store.ledger("s1").expect("ledger").is_empty());
    // A later call for a reserved round adds sites but cannot overwrite one.
    store
        .record_spend("s1", 2, &[("a".into(), ev(0.1, 1.0, 1), 0.1)], 6)
        .expect("spend");
    let mixed = vec![
        ("b".to_string(), ev(0.1, 1.0, 1), 0.1),
        ("a".to_string(), ev(0.3, 1.0, 1), 0.3),
    ];
    assert!(store.record_spend("s1", 2, &mixed, 7).is_err());
    assert!(store.site_events("s1", "b").expect("events").is_empty());
    store
        .record_spend("s1", 2, &[("b".into(), ev(0.1, 1.0, 1), 0.1)], 8)
        .expect("second site joins the reserved round");
    let by_site = store.spent_by_site("s1").expect("by site");
    assert_eq!(by_site.len(), 3);
    assert_eq!(by_site["a"], vec![ev(0.1, 1.0, 1)]);
    assert!(by_site["c"].is_empty());
    // Bad input is refused before anything is written.
    assert!(matches!(
        store.record_spend("s1", 3, &[], 9),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.record_spend("s1", 3, &[("a".into(), ev(0.1, 1.0, 1), f64::NAN)], 9),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.record_spend("nope", 3, &[("a".into(), ev(0.1, 1.0, 1), 0.1)], 9),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn finished_rounds_and_studies_take_no_spends() {
    let (_dir, _path, mut store) = fresh();
    let spend = [("a".to_string(), ev(0.1, 1.0, 1), 0.1)];
    store.record_spend("s1", 0, &spend, 1).expect("spend");
    store.abort_round("s1", 0, "timeout", 2).expect("abort");
    let b = [("b".to_string(), ev(0.1, 1.0, 1), 0.1)];
    assert!(matches!(
        store.record_spend("s1", 0, &b, 3),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.complete_round("s1", 0, "m", SHA, &sites(&["a"]), 3),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.abort_round("s1", 9, "x", 3),
        Err(StoreError::NotFound(_))
    ));
    // The aborted round's spend stands.
    assert_eq!(store.site_events("s1", "a").expect("events").len(), 1);
    let rounds = store.rounds("s1").expect("rounds");
    assert_eq!(rounds[0].status, RoundStatus::Aborted);
    assert_eq!(rounds[0].reason.as_deref(), Some("timeout"));
    assert_eq!(rounds[0].finished_at, Some(2));
    assert_eq!(store.last_completed_round("s1").expect("query"), None);

    store
        .set_study_status("s1", StudyStatus::Completed, Some("budget spent"))
        .expect("status");
    assert!(matches!(
        store.record_spend("s1", 1, &b, 4),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.set_study_status("nope", StudyStatus::Stopped, None),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.create_study("s1", "", &[], 5),
        Err(StoreError::Conflict(_))
    ));
}

#[test]
fn lineage_round_trips_and_needs_a_spend() {
    let (_dir, path, mut store) = fresh();
    for round in 0..3u64 {
        let entries: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|s| (s.to_string(), ev(0.1, 1.0, 2), 0.1 * (round + 1) as f64))
            .collect();
        store
            .record_spend("s1", round, &entries, 10 + round as i64)
            .expect("spend");
    }
    store
        .complete_round("s1", 0, "m0", SHA, &sites(&["c", "a"]), 20)
        .expect("round 0");
    store
        .abort_round("s1", 1, "too few updates", 21)
        .expect("round 1");
    store
        .complete_round("s1", 2, "m2", SHA, &sites(&["a", "b", "c"]), 22)
        .expect("round 2");
    // A contributor that did not pay for the round is refused, and nothing is kept.
    store
        .record_spend("s1", 3, &[("a".into(), ev(0.1, 1.0, 2), 0.4)], 23)
        .expect("spend");
    assert!(matches!(
        store.complete_round("s1", 3, "m3", SHA, &sites(&["a", "b"]), 24),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.rounds("s1").expect("rounds")[3].status,
        RoundStatus::Reserved
    );
    assert!(matches!(
        store.complete_round("s1", 3, "m3", "not-hex", &sites(&["a"]), 24),
        Err(StoreError::Invalid(_))
    ));
    drop(store);
    let store = Store::open(&path).expect("reopen");
    assert_eq!(
        store.lineage("s1").expect("lineage"),
        vec![(0, sites(&["a", "c"])), (2, sites(&["a", "b", "c"]))]
    );
    assert_eq!(
        store.last_completed_round("s1").expect("query"),
        Some((2, "m2".to_string(), SHA.to_string()))
    );
}

#[test]
fn garbage_and_empty_files_are_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.db");
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).expect("write");
    let err = Store::open(&path).expect_err("garbage must be refused");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert_eq!(file_problem(err), FileProblem::NotSqlite);
    assert_eq!(std::fs::read(&path).expect("read"), garbage);

    std::fs::write(&path, b"").expect("write");
    assert_eq!(
        file_problem(Store::open(&path).expect_err("empty")),
        FileProblem::Empty
    );
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
}

#[test]
fn someone_elses_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.db");
    {
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .expect("sql");
    }
    let err = Store::open(&path).expect_err("foreign");
    assert!(matches!(
        file_problem(err),
        FileProblem::NotOurs { found: 0, .. }
    ));
}

fn populated(path: &Path) {
    let mut store = Store::open(path).expect("open");
    store
        .create_study("s1", &"x".repeat(20_000), &sites(&["a", "b"]), 1)
        .expect("study");
    for round in 0..200u64 {
        let e = vec![
            ("a".to_string(), ev(0.01, 1.0, 50), 0.01),
            ("b".to_string(), ev(0.02, 1.0, 50), 0.02),
        ];
        store.record_spend("s1", round, &e, 2).expect("spend");
    }
    drop(store);
    let mut wal = path.as_os_str().to_os_string();
    wal.push("-wal");
    assert!(!Path::new(&wal).exists(), "closing checkpoints the WAL");
}

#[test]
fn truncated_database_is_refused_not_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.db");
    populated(&path);
    let len = std::fs::metadata(&path).expect("meta").len();
    assert!(len > 8 * 4096, "{len}");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(len / 2).expect("truncate");
    drop(file);
    let err = Store::open(&path).expect_err("truncated");
    assert!(err.to_string().contains("restore it from backup"), "{err}");
    assert!(matches!(file_problem(err), FileProblem::Corrupt(_)));
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), len / 2);
}

#[test]
fn damaged_page_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.db");
    populated(&path);
    let mut bytes = std::fs::read(&path).expect("read");
    let page = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
    let at = bytes.len() / 2 / page * page;
    bytes[at..at + page].fill(0x55);
    std::fs::write(&path, &bytes).expect("write");
    let err = Store::open(&path).expect_err("damaged");
    assert!(matches!(file_problem(err), FileProblem::Corrupt(_)));
}

#[test]
fn newer_schema_is_refused() {
    let (_dir, path, store) = fresh();
    store
        .conn
        .execute("UPDATE schema_version SET version = 99", [])
        .expect("bump");
    drop(store);
    let err = Store::open(&path).expect_err("newer");
    assert_eq!(
        file_problem(err),
        FileProblem::NewerSchema {
            found: 99,
            supported: MIGRATIONS.len() as i64
        }
    );
    let conn = Connection::open(&path).expect("raw open");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM studies", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 1, "the data is still there");
}

#[test]
fn missing_schema_version_is_corrupt() {
    let (_dir, path, store) = fresh();
    store
        .conn
        .execute("DELETE FROM schema_version", [])
        .expect("delete");
    drop(store);
    assert!(matches!(
        file_problem(Store::open(&path).expect_err("no version")),
        FileProblem::Corrupt(_)
    ));
}

#[test]
fn leftover_init_file_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.db");
    std::fs::write(dir.path().join("coordinator.db.init"), b"half-written").expect("write");
    std::fs::write(dir.path().join("coordinator.db.init-wal"), b"stale").expect("write");
    Store::open(&path).expect("open over leftovers");
    assert!(!dir.path().join("coordinator.db.init").exists());
    Store::open(&path).expect("reopen");
}

/// A file as the first schema wrote it, with one completed round.
fn version_one_file(path: &Path) {
    let mut conn = Connection::open(path).expect("open");
    configure(&conn).expect("configure");
    let tx = conn.transaction().expect("tx");
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .expect("app id");
    migrate(&tx, 0, &MIGRATIONS[..1]).expect("v1");
    tx.execute_batch(&format!(
        "INSERT INTO studies VALUES ('s1', '', 1, 'active', NULL);
         INSERT INTO enrolments VALUES ('s1', 'a');
         INSERT INTO rounds VALUES ('s1', 0, 'completed', 2, 3, NULL);
         INSERT INTO ledger VALUES ('s1', 'a', 0, 0.1, 1.0, 1, 0.1, 2);
         INSERT INTO model_versions VALUES ('s1', 0, 'm0', '{SHA}', 3);
         INSERT INTO lineage VALUES ('s1', 0, 'a');"
    ))
    .expect("rows");
    tx.commit().expect("commit");
    conn.close().expect("close");
}

fn schema_version(path: &Path) -> i64 {
    Connection::open(path)
        .expect("raw open")
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .expect("version")
}

#[test]
fn version_one_file_reads_without_migrating_and_migrates_on_open() {
    assert_eq!(READ_ONLY_STANDINS.len(), MIGRATIONS.len());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.db");
    version_one_file(&path);
    let before = std::fs::read(&path).expect("read");
    {
        let mut ro = Store::open_read_only(&path).expect("read-only open of a v1 file");
        let versions = ro.model_versions("s1").expect("versions");
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].pruned, None);
        assert!(ro.record_prunes("s1", &[0], 1, 9).is_err(), "read-only");
    }
    assert_eq!(schema_version(&path), 1, "a read-only open never migrates");
    assert_eq!(std::fs::read(&path).expect("read"), before);
    let store = Store::open(&path).expect("read-write open migrates");
    assert_eq!(store.model_versions("s1").expect("versions")[0].sha256, SHA);
    assert_eq!(
        store.lineage("s1").expect("lineage"),
        vec![(0, sites(&["a"]))]
    );
    drop(store);
    assert_eq!(schema_version(&path), MIGRATIONS.len() as i64);
}

#[test]
fn read_only_open_never_creates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.db");
    match Store::open_read_only(&path) {
        Err(StoreError::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!path.exists());
}

#[test]
fn read_only_open_reads_beside_a_writer() {
    let (_dir, path, mut store) = fresh();
    let ro = Store::open_read_only(&path).expect("read-only beside the writer");
    store
        .record_spend("s1", 0, &[("a".into(), ev(0.1, 1.0, 1), 0.1)], 1)
        .expect("the writer is not blocked");
    assert_eq!(ro.ledger("s1").expect("ledger").len(), 1);
}

#[test]
fn prunes_are_recorded_once_and_never_the_latest() {
    let (_dir, path, mut store) = fresh();
    for round in 0..3u64 {
        store
            .record_spend("s1", round, &[("a".into(), ev(0.1, 1.0, 1), 0.1)], 1)
            .expect("spend");
        store
            .complete_round("s1", round, &format!("m{round}"), SHA, &sites(&["a"]), 10)
            .expect("complete");
    }
    assert!(matches!(
        store.record_prunes("s1", &[0, 2], 5, 20),
        Err(StoreError::Conflict(m)) if m.contains("latest")
    ));
    assert!(matches!(
        store.record_prunes("s1", &[0, 7], 5, 20),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.record_prunes("s1", &[0], 0, 20),
        Err(StoreError::Invalid(_))
    ));
    assert!(store
        .model_versions("s1")
        .expect("versions")
        .iter()
        .all(|v| v.pruned.is_none()));
    store.record_prunes("s1", &[0, 1], 5, 20).expect("prune");
    assert!(matches!(
        store.record_prunes("s1", &[1], 6, 21),
        Err(StoreError::Conflict(_))
    ));
    assert!(store.conn.execute("DELETE FROM model_prunes", []).is_err());
    drop(store);
    let store = Store::open(&path).expect("reopen");
    let pruned: Vec<_> = store
        .model_versions("s1")
        .expect("versions")
        .iter()
        .map(|v| v.pruned)
        .collect();
    let p = Some(Pruned {
        at: 20,
        audit_seq: 5,
    });
    assert_eq!(pruned, vec![p, p, None]);
}
