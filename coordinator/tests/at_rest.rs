//! Encryption at rest on a real state directory: a real SQLite store filled through its
//! API, a real sealed checkpoint written by the server's own writer, the real server
//! restarted over it in-process, and the binary for the operator's commands (`at-rest-key`,
//! `model export`, `run`'s key checks).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use fedpriv_common::config::StudyConfig;
use fedpriv_common::dp::SgmEvent;
use fedpriv_common::model::FlatModel;
use fedpriv_common::pki;
use fedpriv_common::seal::{self, SealKey};
use fedpriv_coordinator::at_rest::{self, KEY_ENV};
use fedpriv_coordinator::server::{self, Options, ServerError};
use fedpriv_coordinator::store::{RoundStatus, Store};

const STUDY_TOML: &str = include_str!("../../examples/configs/study-record.toml");
const NOW: i64 = 1_700_000_000;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedpriv-coordinator"));
    // Only what a test passes on purpose.
    cmd.env_remove(KEY_ENV);
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn study() -> StudyConfig {
    StudyConfig::from_toml(STUDY_TOML).expect("study config")
}

/// A state directory where round 1 completed (its checkpoint sealed with `key`) and round
/// 2 was paid for but never finished (a restart marks it aborted). Returns the model.
fn state_with_checkpoint(dir: &Path, key: &SealKey) -> Vec<f32> {
    state_with_checkpoint_of(dir, key, STUDY_TOML)
}

fn state_with_checkpoint_of(dir: &Path, key: &SealKey, toml: &str) -> Vec<f32> {
    let cfg = StudyConfig::from_toml(toml).expect("study config");
    let spec = server::study_spec(&cfg).expect("spec");
    let mut store = Store::open(dir.join("coordinator.db")).expect("store");
    store
        .create_study(&cfg.id, toml, &cfg.enrolled, NOW)
        .expect("create");
    let ev = SgmEvent::new(0.1, 1.0, 5).expect("event");
    let paid: Vec<_> = cfg.enrolled[..2]
        .iter()
        .map(|s| (s.clone(), ev, 0.1))
        .collect();
    store.record_spend(&cfg.id, 1, &paid, NOW).expect("spend");
    // Distinctive values, so their bytes can be looked for on disk.
    let values: Vec<f32> = (0..spec.num_values())
        .map(|i| 0.123_456_79 + i as f32)
        .collect();
    let path = server::model_path(dir, &cfg.id, 1);
    let sha = server::write_checkpoint(
        key,
        &spec,
        &values,
        &fedpriv_common::model_card::ModelCard::for_round(&cfg, 1, 0.5).metadata(),
        &cfg.id,
        1,
        &path,
    )
    .expect("write");
    let rel = path.strip_prefix(dir).expect("inside").to_string_lossy();
    store
        .complete_round(&cfg.id, 1, &rel, &sha, &cfg.enrolled[..2], NOW + 60)
        .expect("complete");
    store
        .record_spend(&cfg.id, 2, &paid, NOW + 120)
        .expect("spend");
    values
}

fn random_key() -> SealKey {
    SealKey::from_material(seal::generate_key_hex().expect("rng").as_bytes()).expect("key")
}

/// What a restart could change: the ledger, the rounds, the model versions.
fn ledger_state(dir: &Path) -> String {
    let store = Store::open(dir.join("coordinator.db")).expect("store");
    let id = study().id;
    format!(
        "{:?}\n{:?}\n{:?}",
        store.ledger(&id).expect("ledger"),
        store.rounds(&id).expect("rounds"),
        store.model_versions(&id).expect("versions")
    )
}

/// Starts the real server over `dir` with `key` and asks it to stop at once: it loads
/// every study (and its last checkpoint) before it serves.
fn restart(dir: &Path, key: SealKey) -> Result<(), ServerError> {
    let ca = pki::generate_ca("at-rest test CA", 1).expect("CA");
    let cert = pki::issue_server_cert(&ca, &["localhost".into()], &[], 1).expect("cert");
    let tls = pki::server_config(
        ca.cert_pem.as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
        &[],
    )
    .expect("tls");
    let opts = Options {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        state_dir: dir.to_path_buf(),
        tls,
        studies: vec![(study(), STUDY_TOML.to_string())],
        max_concurrent_uploads: 2,
        at_rest_key: Arc::new(key),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        stop.send(true).expect("stop");
        server::run(opts, stop_rx, None, false).await
    })
}

fn config_error(r: Result<(), ServerError>) -> String {
    match r {
        Err(ServerError::Config(m)) => m,
        Err(ServerError::Checkpoint(e)) if e.is_operators() => e.to_string(),
        other => panic!("expected an operator error, got {other:?}"),
    }
}

#[test]
fn restart_with_the_wrong_key_or_a_damaged_checkpoint_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path();
    let material = seal::generate_key_hex().expect("rng");
    let key = || SealKey::from_material(material.as_bytes()).expect("key");
    state_with_checkpoint(state, &key());
    let path = server::model_path(state, &study().id, 1);
    let before = ledger_state(state);
    let sealed = std::fs::read(&path).expect("checkpoint");

    let m = config_error(restart(state, random_key()));
    assert!(m.contains("another at-rest key"), "{m}");
    assert!(m.contains(&path.display().to_string()), "{m}");
    assert_eq!(
        ledger_state(state),
        before,
        "a refused start changed the ledger"
    );

    // A changed byte in the header, the body or the tag; the file cut short.
    let mut damaged: Vec<Vec<u8>> = [30, sealed.len() / 2, sealed.len() - 3]
        .iter()
        .map(|&at| {
            let mut bad = sealed.clone();
            bad[at] ^= 0x04;
            bad
        })
        .collect();
    damaged.push(sealed[..sealed.len() - 1].to_vec());
    for bad in damaged {
        std::fs::write(&path, &bad).expect("write");
        let m = config_error(restart(state, key()));
        assert!(
            m.contains("does not authenticate") && m.contains("restore it from backup"),
            "{m}"
        );
        assert_eq!(ledger_state(state), before);
    }

    // With the file restored and the right key, the study resumes: the unfinished round 2
    // is closed as aborted, as on any restart.
    std::fs::write(&path, &sealed).expect("write");
    restart(state, key()).expect("resumes with the right key");
    let store = Store::open(state.join("coordinator.db")).expect("store");
    let round2 = store.rounds(&study().id).expect("rounds")[1].status;
    assert_eq!(round2, RoundStatus::Aborted);
}

fn key_file(dir: &Path, name: &str) -> (PathBuf, SealKey) {
    let path = dir.join(name);
    let out = bin()
        .args(["at-rest-key", "--out"])
        .arg(&path)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let key = at_rest::load_key_from(Some(&path), None).expect("loads");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&key.id_hex()),
        "prints the key id"
    );
    (path, key)
}

fn export(state: &Path, out: &Path, key_file: Option<&Path>, env: Option<&str>) -> Output {
    let mut cmd = bin();
    cmd.args(["model", "export", "--study", &study().id, "--state"])
        .arg(state)
        .arg("--out")
        .arg(out);
    if let Some(k) = key_file {
        cmd.arg("--at-rest-key-file").arg(k);
    }
    if let Some(v) = env {
        cmd.env(KEY_ENV, v);
    }
    cmd.output().expect("runs")
}

#[test]
fn model_export_decrypts_with_the_right_key_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let (key_path, key) = key_file(dir.path(), "at-rest.key");
    let mode = std::fs::metadata(&key_path)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Never overwritten.
    let again = bin()
        .args(["at-rest-key", "--out"])
        .arg(&key_path)
        .output()
        .expect("runs");
    assert!(!again.status.success() && stderr(&again).contains("already exists"));
    assert_eq!(
        at_rest::load_key_from(Some(&key_path), None)
            .expect("loads")
            .id_hex(),
        key.id_hex()
    );

    let values = state_with_checkpoint(&state, &key);
    let spec = server::study_spec(&study()).expect("spec");
    let sealed = std::fs::read(server::model_path(&state, &study().id, 1)).expect("read");
    assert!(sealed.starts_with(seal::STREAM_MAGIC));
    let needle: Vec<u8> = values[..4].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(
        !sealed.windows(16).any(|w| w == &needle[..]),
        "plaintext model on disk"
    );

    let out = dir.path().join("model.safetensors");
    let res = export(&state, &out, Some(&key_path), None);
    assert!(res.status.success(), "{}", stderr(&res));
    let plain = std::fs::read(&out).expect("exported");
    let model = FlatModel::from_safetensors_bytes(&plain, Some(&spec)).expect("loads");
    assert_eq!(model.values, values);
    let mode = std::fs::metadata(&out).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "an exported model is not for every local user");
    // On record, by whom and where to, before the file appeared.
    let log = std::fs::read_to_string(state.join("audit.log")).expect("audit log");
    let export_line = log
        .lines()
        .find(|l| l.contains("\"model_exported\""))
        .expect("an export record");
    assert!(export_line.contains("\"actor\":\"local/"), "{export_line}");
    assert!(export_line.contains("model.safetensors"), "{export_line}");

    // The same key through the environment variable.
    let material = std::fs::read_to_string(&key_path).expect("key");
    let out_env = dir.path().join("model-env.safetensors");
    let res = export(&state, &out_env, None, Some(material.trim()));
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(std::fs::read(&out_env).expect("exported"), plain);

    // Another key: refused, and no model (not even a partial one) is left behind.
    let (other_path, _) = key_file(dir.path(), "other.key");
    let out_bad = dir.path().join("model-bad.safetensors");
    let res = export(&state, &out_bad, Some(&other_path), None);
    assert!(!res.status.success());
    assert!(
        stderr(&res).contains("another at-rest key"),
        "{}",
        stderr(&res)
    );
    assert!(!material.is_empty() && !stderr(&res).contains(material.trim()));
    assert!(!out_bad.exists());
    assert!(!dir.path().join("model-bad.safetensors.partial").exists());
    // The attempt went on record before the file was decrypted, and so did its failure.
    let log = std::fs::read_to_string(state.join("audit.log")).expect("audit log");
    let tail: Vec<&str> = log.lines().rev().take(2).collect();
    assert!(
        tail[1].contains("\"model_exported\"") && tail[1].contains("model-bad.safetensors"),
        "{log}"
    );
    assert!(
        tail[0].contains("\"refused\"") && tail[0].contains("model export"),
        "{log}"
    );

    // Both a file and the variable: which key is meant is a guess, so refused.
    let res = export(&state, &out_bad, Some(&key_path), Some(material.trim()));
    assert!(stderr(&res).contains("give only one"), "{}", stderr(&res));
    // No key at all.
    let res = export(&state, &out_bad, None, None);
    assert!(stderr(&res).contains("no at-rest key"), "{}", stderr(&res));
    assert!(!out_bad.exists());
}

#[test]
fn a_key_file_readable_by_others_is_refused_by_run_and_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let (key_path, key) = key_file(dir.path(), "at-rest.key");
    state_with_checkpoint(&state, &key);
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let before = ledger_state(&state);

    let out = dir.path().join("model.safetensors");
    let res = export(&state, &out, Some(&key_path), None);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("chmod 600"), "{}", stderr(&res));
    assert!(!out.exists());

    let study_file = dir.path().join("study.toml");
    std::fs::write(&study_file, STUDY_TOML).expect("write");
    let run = |key: Option<&Path>| {
        let mut cmd = bin();
        cmd.args(["run", "--study"])
            .arg(&study_file)
            .arg("--state")
            .arg(&state)
            .args(["--pki"])
            .arg(dir.path().join("no-pki"))
            .args(["--listen", "127.0.0.1:0"]);
        if let Some(k) = key {
            cmd.arg("--at-rest-key-file").arg(k);
        }
        cmd.output().expect("runs")
    };
    let res = run(Some(&key_path));
    assert_eq!(res.status.code(), Some(2), "{}", stderr(&res));
    assert!(stderr(&res).contains("chmod 600"), "{}", stderr(&res));
    let res = run(None);
    assert_eq!(res.status.code(), Some(2), "{}", stderr(&res));
    assert!(stderr(&res).contains("no at-rest key"), "{}", stderr(&res));
    assert_eq!(ledger_state(&state), before);
}

#[test]
fn a_study_that_requires_a_privacy_audit_exports_only_after_a_passing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let (key_path, key) = key_file(dir.path(), "at-rest.key");
    let toml = format!("{STUDY_TOML}\n[release]\nrequire_privacy_audit = true\n");
    let study_file = dir.path().join("study.toml");
    std::fs::write(&study_file, &toml).expect("write");
    let values = state_with_checkpoint_of(&state, &key, &toml);
    let out_file = dir.path().join("model.safetensors");

    let refused = export(&state, &out_file, Some(&key_path), None);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("requires a passing privacy audit"),
        "{}",
        stderr(&refused)
    );
    assert!(!out_file.exists());

    // An audit of other terms does not count: here, a different noise multiplier.
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        toml.replace("noise_multiplier = 2.5", "noise_multiplier = 3.0"),
    )
    .expect("write");
    let audit = |file: &Path| {
        bin()
            .args([
                "privacy-audit",
                "--records",
                "200",
                "--canaries",
                "100",
                "--seed",
                "2",
            ])
            .arg("--study")
            .arg(file)
            .arg("--state")
            .arg(&state)
            .output()
            .expect("runs")
    };
    let ran = audit(&other);
    assert!(ran.status.success(), "{}", stderr(&ran));
    assert!(!export(&state, &out_file, Some(&key_path), None)
        .status
        .success());

    let ran = audit(&study_file);
    assert!(ran.status.success(), "{}", stderr(&ran));
    let ok = export(&state, &out_file, Some(&key_path), None);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let bytes = std::fs::read(&out_file).expect("exported");
    let spec = server::study_spec(&study()).expect("spec");
    assert_eq!(
        FlatModel::from_safetensors_bytes(&bytes, Some(&spec))
            .expect("reads")
            .values,
        values
    );
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
    let audit: serde_json::Value = serde_json::from_str(
        header["__metadata__"]["fedpriv.privacy_audit"]
            .as_str()
            .expect("the audit travels with the model"),
    )
    .expect("json");
    assert_eq!(audit["canaries"], 100);
    assert_eq!(audit["terms_sha256"], study_config_digest(&toml));
    let log = std::fs::read_to_string(state.join("audit.log")).expect("log");
    assert_eq!(log.matches("\"privacy_audited\"").count(), 2, "{log}");
}

fn study_config_digest(toml: &str) -> String {
    StudyConfig::from_toml(toml)
        .expect("study")
        .mechanism_digest()
}
