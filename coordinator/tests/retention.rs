//! Retention (`prune`) and inventory on a real state directory: a real SQLite store filled
//! through its API, real checkpoint files, the real audit log, and the binary for the
//! operator's view (`model export` of a pruned round, `inventory --json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use fedpriv_common::audit::{decode_line, AuditEvent};
use fedpriv_common::audit_file::{verify_file, AuditLog};
use fedpriv_common::dp::SgmEvent;
use fedpriv_coordinator::inventory::inventory_of;
use fedpriv_coordinator::retention::{prune, RetentionError, RetentionPolicy};
use fedpriv_coordinator::store::Store;

const DAY: i64 = 86_400;
const NOW: i64 = 1_700_000_000;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedpriv-coordinator"))
}

fn rel(study: &str, round: u64) -> String {
    format!("models/{study}/round-{round:05}.safetensors")
}

fn sha(study: &str, round: u64) -> String {
    let seed = format!("{study}{round}");
    let mut out = String::new();
    while out.len() < 64 {
        for b in seed.bytes() {
            out.push_str(&format!("{:02x}", b));
        }
    }
    out.truncate(64);
    out
}

/// (study, round, sites charged, sites whose updates made the version, age in days).
type Round<'a> = (&'a str, u64, &'a [&'a str], &'a [&'a str], i64);

/// Study s1 (sites a, b, c): round 0 by a+b 100 days ago, round 1 by b 50 days ago,
/// round 2 by a+c 40 days ago (b paid but its update is not in it), round 3 by all a day
/// ago, round 4 aborted (a paid). Study s2 (sites a, b): round 0 by a, 100 days ago, its
/// only and so latest version.
fn state_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path().join("coordinator.db")).expect("store");
    let sites = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    store
        .create_study("s1", "", &sites(&["a", "b", "c"]), NOW - 200 * DAY)
        .expect("s1");
    store
        .create_study("s2", "", &sites(&["a", "b"]), NOW - 200 * DAY)
        .expect("s2");
    let ev = SgmEvent::new(0.1, 1.0, 5).expect("event");
    let rounds: &[Round] = &[
        ("s1", 0, &["a", "b"], &["a", "b"], 100),
        ("s1", 1, &["b"], &["b"], 50),
        ("s1", 2, &["a", "b", "c"], &["a", "c"], 40),
        ("s1", 3, &["a", "b", "c"], &["a", "b", "c"], 1),
        ("s2", 0, &["a"], &["a"], 100),
    ];
    for &(study, round, paid, made, age) in rounds {
        let at = NOW - age * DAY;
        let spend: Vec<_> = paid.iter().map(|s| (s.to_string(), ev, 0.1)).collect();
        store
            .record_spend(study, round, &spend, at - 60)
            .expect("spend");
        let path = dir.path().join(rel(study, round));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, format!("checkpoint {study} {round}")).expect("write");
        store
            .complete_round(
                study,
                round,
                &rel(study, round),
                &sha(study, round),
                &sites(made),
                at,
            )
            .expect("complete");
    }
    store
        .record_spend("s1", 4, &[("a".to_string(), ev, 0.1)], NOW - 3600)
        .expect("spend");
    store
        .abort_round("s1", 4, "too few updates", NOW - 3000)
        .expect("abort");
    drop(store);
    dir
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).expect("read"));
            }
        }
    }
    out
}

fn pruned_records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .expect("log")
        .lines()
        .filter_map(decode_line)
        .filter(|r| r.event == AuditEvent::Pruned)
        .map(|r| r.details)
        .collect()
}

fn policy(days: u32, keep_last: u32) -> RetentionPolicy {
    RetentionPolicy::new(days, keep_last).expect("policy")
}

#[test]
fn prune_removes_old_versions_keeps_latest_and_recent_and_records_first() {
    let dir = state_dir();
    let state = dir.path();
    let report = prune(state, policy(30, 1), NOW, false).expect("prune");
    let removed: Vec<(String, u64)> = report
        .plan
        .remove
        .iter()
        .map(|r| (r.study.clone(), r.round))
        .collect();
    let s1 = |r: u64| ("s1".to_string(), r);
    assert_eq!(removed, vec![s1(0), s1(1), s1(2)]);
    assert_eq!(
        report.plan.kept, 2,
        "s1 round 3 (recent) and s2 round 0 (latest)"
    );
    for r in 0..3 {
        assert!(!state.join(rel("s1", r)).exists(), "round {r} removed");
    }
    assert!(state.join(rel("s1", 3)).exists());
    assert!(
        state.join(rel("s2", 0)).exists(),
        "a study's latest version stays, however old"
    );

    let log = state.join("audit.log");
    assert!(verify_file(&log).expect("verify").is_ok());
    let records = pruned_records(&log);
    assert_eq!(records.len(), 1);
    let rec = &records[0];
    assert_eq!(rec["kept"], 2);
    assert_eq!(rec["policy"]["keep_models_days"], 30);
    let named: Vec<(String, u64, String)> = rec["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .map(|r| {
            (
                r["study"].as_str().expect("study").to_string(),
                r["round"].as_u64().expect("round"),
                r["sha256"].as_str().expect("sha").to_string(),
            )
        })
        .collect();
    assert_eq!(
        named,
        (0..3)
            .map(|r| ("s1".to_string(), r, sha("s1", r)))
            .collect::<Vec<_>>()
    );
    let store = Store::open(state.join("coordinator.db")).expect("store");
    let pruned: Vec<(u64, bool)> = store
        .model_versions("s1")
        .expect("versions")
        .iter()
        .map(|v| (v.round, v.pruned.is_some()))
        .collect();
    assert_eq!(pruned, vec![(0, true), (1, true), (2, true), (3, false)]);
    drop(store);

    // Nothing more to remove: a second run records that it ran, and removes nothing.
    let again = prune(state, policy(30, 1), NOW + 60, false).expect("again");
    assert!(again.plan.remove.is_empty());
    assert_eq!(pruned_records(&log).len(), 2);
    assert!(verify_file(&log).expect("verify").is_ok());
}

#[test]
fn keep_last_keeps_the_newest_versions_whatever_their_age() {
    let dir = state_dir();
    let report = prune(dir.path(), policy(0, 3), NOW, false).expect("prune");
    let removed: Vec<u64> = report.plan.remove.iter().map(|r| r.round).collect();
    assert_eq!(
        removed,
        vec![0],
        "s1 keeps rounds 1-3; s2 keeps its only version"
    );
}

#[test]
fn prune_records_before_deleting_and_a_later_run_finishes() {
    let dir = state_dir();
    let state = dir.path();
    // A file prune cannot delete (a directory in its place: refused even for root).
    let stuck = state.join(rel("s1", 1));
    std::fs::remove_file(&stuck).expect("rm");
    std::fs::create_dir_all(stuck.join("x")).expect("mkdir");
    let err = prune(state, policy(30, 1), NOW, false).expect_err("a deletion fails");
    assert!(matches!(err, RetentionError::Delete { .. }), "{err}");
    assert!(err.to_string().contains("run prune again"), "{err}");
    // The record and the store mark were written before the deletions were tried.
    let log = state.join("audit.log");
    let records = pruned_records(&log);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["removed"].as_array().expect("removed").len(), 3);
    assert!(!state.join(rel("s1", 0)).exists());
    assert!(!state.join(rel("s1", 2)).exists());

    std::fs::remove_dir_all(&stuck).expect("rm dir");
    std::fs::write(&stuck, b"came back").expect("write");
    let report = prune(state, policy(30, 1), NOW + 60, false).expect("finish");
    assert!(report.plan.remove.is_empty());
    assert_eq!(report.plan.leftovers.len(), 1);
    assert!(!stuck.exists(), "the leftover is deleted");
    let records = pruned_records(&log);
    assert_eq!(records[1]["finishing"][0]["round"], 1);
    assert!(verify_file(&log).expect("verify").is_ok());
}

#[test]
fn prune_refuses_while_the_audit_log_is_held() {
    let dir = state_dir();
    let state = dir.path();
    // As a running coordinator does.
    let held = AuditLog::open(state.join("audit.log")).expect("log");
    let before = snapshot(state);
    let err = prune(state, policy(30, 1), NOW, false).expect_err("refused");
    assert!(
        matches!(err, RetentionError::CoordinatorRunning(_)),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("coordinator is running"), "{msg}");
    assert!(msg.contains("--dry-run"), "{msg}");
    assert_eq!(snapshot(state), before, "nothing changed");
    // A dry run works beside it.
    let dry = prune(state, policy(30, 1), NOW, true).expect("dry run");
    assert_eq!(dry.plan.remove.len(), 3);
    drop(held);
}

#[test]
fn dry_run_changes_nothing() {
    let dir = state_dir();
    let state = dir.path();
    let before = snapshot(state);
    let dry = prune(state, policy(30, 1), NOW, true).expect("dry run");
    assert_eq!(dry.plan.remove.len(), 3);
    assert!(dry.audit_seqs.is_empty());
    assert!(dry.to_string().contains("nothing deleted or recorded"));
    let mut after = snapshot(state);
    // A SQLite reader of a WAL database leaves an empty WAL and its index beside it.
    let wal = after
        .remove(&state.join("coordinator.db-wal"))
        .unwrap_or_default();
    assert!(wal.is_empty(), "a dry run writes nothing to the WAL");
    after.remove(&state.join("coordinator.db-shm"));
    assert_eq!(after, before);
    assert!(
        !state.join("audit.log").exists(),
        "no audit log was created"
    );
    // The real run removes what the dry run listed.
    let real = prune(state, policy(30, 1), NOW, false).expect("prune");
    assert_eq!(real.plan.remove, dry.plan.remove);
}

#[test]
fn export_of_a_pruned_round_says_when_it_was_pruned() {
    let dir = state_dir();
    let state = dir.path();
    prune(state, policy(30, 1), NOW, false).expect("prune");
    let out_file = state.join("out.safetensors");
    let out = bin()
        .args([
            "model", "export", "--study", "s1", "--round", "1", "--state",
        ])
        .arg(state)
        .arg("--out")
        .arg(&out_file)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was pruned on 2023-11-14"), "{err}");
    assert!(!err.contains("No such file"), "{err}");
    assert!(!out_file.exists());
}

#[test]
fn inventory_lists_exactly_the_rounds_a_site_contributed_to() {
    let dir = state_dir();
    let state = dir.path();
    prune(state, policy(30, 1), NOW, false).expect("prune");
    let contributed = |site: &str| -> BTreeMap<String, Vec<u64>> {
        let inv = inventory_of(state, None, Some(site)).expect("inventory");
        assert_eq!(inv.sites.len(), 1);
        inv.sites[0]
            .studies
            .iter()
            .map(|s| {
                (
                    s.study.clone(),
                    s.contributed_rounds.iter().map(|c| c.round).collect(),
                )
            })
            .collect()
    };
    let m = |v: &[(&str, &[u64])]| -> BTreeMap<String, Vec<u64>> {
        v.iter().map(|(s, r)| (s.to_string(), r.to_vec())).collect()
    };
    assert_eq!(contributed("a"), m(&[("s1", &[0, 2, 3]), ("s2", &[0])]));
    assert_eq!(contributed("b"), m(&[("s1", &[0, 1, 3]), ("s2", &[])]));
    assert_eq!(contributed("c"), m(&[("s1", &[2, 3])]));

    // The binary's JSON, as an auditor reads it.
    let out = bin()
        .args(["inventory", "--json", "--site", "b", "--state"])
        .arg(state)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let s1 = &v["sites"][0]["studies"][0];
    assert_eq!(v["sites"][0]["site"], "b");
    assert_eq!(s1["study"], "s1");
    let rounds = |key: &str| -> Vec<u64> {
        s1[key]
            .as_array()
            .expect(key)
            .iter()
            .map(|r| r["round"].as_u64().expect("round"))
            .collect()
    };
    assert_eq!(rounds("contributed_rounds"), vec![0, 1, 3]);
    // Round 2 was charged to b (its task went out) but only a and c made its model.
    assert_eq!(rounds("charged_rounds"), vec![0, 1, 2, 3]);
    let first = &s1["contributed_rounds"][0]["model"];
    assert_eq!(first["sha256"], sha("s1", 0));
    assert!(first["file"].is_null());
    assert!(first["pruned_at"].is_i64());
    let last = &s1["contributed_rounds"][2]["model"];
    assert_eq!(last["file"], rel("s1", 3));
    assert!(last["pruned_at"].is_null());
    // Per study, the sites behind each version.
    let study = v["studies"]
        .as_array()
        .expect("studies")
        .iter()
        .find(|s| s["study"] == "s1")
        .expect("s1");
    assert_eq!(study["versions"][2]["sites"], serde_json::json!(["a", "c"]));
    assert_eq!(study["enrolled"], serde_json::json!(["a", "b", "c"]));

    let text = bin()
        .args(["inventory", "--study", "s1", "--state"])
        .arg(state)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("site b\n"), "{text}");
    assert!(text.contains("pruned on 2023-11-14"), "{text}");
    assert!(!text.contains("study s2"), "{text}");

    let missing = inventory_of(state, None, Some("zed")).expect_err("unknown site");
    assert!(
        missing.to_string().contains("enrolled in no study"),
        "{missing}"
    );
}

#[test]
fn inventory_runs_beside_a_writer_and_never_creates_a_database() {
    let dir = state_dir();
    let state = dir.path();
    let _writer = Store::open(state.join("coordinator.db")).expect("writer");
    let _log = AuditLog::open(state.join("audit.log")).expect("held log");
    assert_eq!(
        inventory_of(state, Some("s2"), None)
            .expect("inventory")
            .studies
            .len(),
        1
    );
    let empty = tempfile::tempdir().expect("tempdir");
    let err = inventory_of(empty.path(), None, None).expect_err("no state");
    assert!(err.to_string().contains("no state database"), "{err}");
    assert!(!empty.path().join("coordinator.db").exists());
}
