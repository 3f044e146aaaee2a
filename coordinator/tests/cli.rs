//! The `fedpriv-coordinator` binary as an operator uses it. (Being an integration test of
//! this package also makes `cargo test --workspace` build the binary, which the crash tests
//! in the root package run as a separate process.)

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedpriv-coordinator"))
}

/// Runs a command that prints one JSON object; it must succeed (its stderr otherwise).
fn json_of(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn budget_prints_one_json_object() {
    let out = bin()
        .args([
            "budget",
            "epsilon",
            "--sample-rate",
            "0.01",
            "--noise-multiplier",
            "1.0",
            "--steps",
            "1000",
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let eps = v["epsilon"].as_f64().expect("epsilon");
    assert!((eps - 2.1014).abs() / 2.1014 < 0.01, "{eps}");
}

#[test]
fn bad_arguments_exit_non_zero_with_one_line() {
    let out = bin()
        .args([
            "budget",
            "epsilon",
            "--sample-rate",
            "2",
            "--noise-multiplier",
            "1.0",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("sample rate"), "{err}");
}

#[test]
fn read_only_commands_never_create_a_ledger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .args(["ledger", "show", "--study", "x", "--state"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no state database"));
    assert!(!dir.path().join("coordinator.db").exists());
    let out = bin()
        .args(["report", "--study", "x", "--state"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("r.html"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no state database"));
    assert!(!dir.path().join("coordinator.db").exists());
    assert!(!dir.path().join("r.html").exists());
}

/// `report` writes the page from a state directory; a central-placement study's page names
/// no site (the per-site figures and participants stay hidden).
#[test]
fn report_writes_a_page_that_names_no_site_under_central_placement() {
    use fedpriv_common::dp::SgmEvent;
    use fedpriv_common::test_util::StudyBuilder;
    let dir = tempfile::tempdir().expect("tempdir");
    let b = StudyBuilder::new("central-study")
        .placement("central")
        .enrolled(["hospital-ab", "hospital-cd"])
        .noise(1.0, 20.0);
    let cfg = b.config().expect("config");
    {
        let mut store = fedpriv_coordinator::store::Store::open(dir.path().join("coordinator.db"))
            .expect("store");
        store
            .create_study("central-study", &b.toml(), &cfg.enrolled, 1_700_000_000)
            .expect("create");
        let ev = SgmEvent::new(1.0, 2.0, 1).expect("event");
        let entries: Vec<_> = cfg.enrolled.iter().map(|s| (s.clone(), ev, 0.5)).collect();
        store
            .record_spend("central-study", 0, &entries, 1_700_000_001)
            .expect("spend");
    }
    let page = dir.path().join("report.html");
    let out = bin()
        .args(["report", "--study", "central-study", "--state"])
        .arg(dir.path())
        .arg("--out")
        .arg(&page)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&page).expect("the page");
    assert!(html.contains("central-study"));
    assert!(html.contains("data-plot=\"epsilon\""));
    assert!(
        !html.contains("hospital-"),
        "a site named under central placement"
    );
}

#[test]
fn help_lists_the_commands() {
    let out = bin().arg("--help").output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    // Matched as the first word of a line of the command list, not anywhere in the text.
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("  ")?.split_whitespace().next())
        .collect();
    for cmd in [
        "budget",
        "pki",
        "run",
        "at-rest-key",
        "ledger",
        "model",
        "admin",
        "audit",
        "prune",
        "inventory",
        "report",
    ] {
        assert!(
            listed.contains(&cmd),
            "{cmd} missing from --help: {listed:?}"
        );
    }
}

#[test]
fn audit_recover_repairs_a_torn_tail_and_refuses_an_edited_log() {
    use fedpriv_common::audit::AuditEvent;
    use fedpriv_common::audit_file::AuditLog;
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path();
    let log_path = state.join("audit.log");
    {
        let mut log = AuditLog::open(&log_path).expect("log");
        for round in 1..=3 {
            log.append_now(
                "coordinator",
                AuditEvent::RoundStarted,
                serde_json::json!({"round": round}),
            )
            .expect("append");
        }
    }
    let verify = |what: &str| {
        bin()
            .args(["audit", "verify", "--state"])
            .arg(state)
            .output()
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    assert!(verify("clean").status.success());
    // A power loss mid-write: half a line at the end.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .expect("open");
    f.write_all(b"{\"seq\":4,\"ts\":17").expect("tear");
    drop(f);
    assert_eq!(verify("torn").status.code(), Some(1));
    let out = bin()
        .args(["audit", "recover", "--state"])
        .arg(state)
        .output()
        .expect("recover");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(verify("recovered").status.success());
    let text = std::fs::read_to_string(&log_path).expect("log");
    assert!(text
        .lines()
        .last()
        .expect("a line")
        .contains("audit_recovered"));

    // An edited record is not something a crash explains: recovery refuses it.
    let edited = text.replacen("\"round\":2", "\"round\":9", 1);
    std::fs::write(&log_path, edited).expect("edit");
    let out = bin()
        .args(["audit", "recover", "--state"])
        .arg(state)
        .output()
        .expect("recover");
    assert!(!out.status.success());
    assert_eq!(verify("edited").status.code(), Some(1));
}

#[test]
fn run_refuses_a_limits_file_with_an_unknown_key_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("limits.toml");
    std::fs::write(&limits, "handshakes_in_flight = 64\nmax_handshakes = 10\n").expect("write");
    let state = dir.path().join("state");
    let out = bin()
        .args(["run", "--listen", "127.0.0.1:0", "--pki"])
        .arg(dir.path().join("no-pki"))
        .arg("--state")
        .arg(&state)
        .arg("--limits")
        .arg(&limits)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_handshakes") && err.contains("limits.toml"),
        "{err}"
    );
    // Refused before the state directory (or anything in it) was made.
    assert!(!state.exists());

    std::fs::write(&limits, "connections_per_identity = 0\n").expect("write");
    let out = bin()
        .args(["run", "--listen", "127.0.0.1:0", "--pki"])
        .arg(dir.path().join("no-pki"))
        .arg("--state")
        .arg(&state)
        .arg("--limits")
        .arg(&limits)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connections_per_identity"));
}

/// A 3-class model over two numeric features and one categorical column, with its card.
fn write_model(dir: &std::path::Path) -> std::path::PathBuf {
    let study = fedpriv_common::config::StudyConfig::from_toml(
        r#"
[study]
id = "wine"
model = { kind = "logistic_regression" }
rounds = 1
min_sites = 1
round_timeout_secs = 30
[data]
task = "multiclass"
labels = ["red", "white", "rose"]
label = "kind"
features = ["a", "b"]
ranges = { a = [0.0, 10.0], b = [0.0, 10.0] }
fills = { b = 5.0 }
[data.categorical]
region = ["north", "south"]
[training]
strategy = "fedavg"
learning_rate = 0.5
server_learning_rate = 1.0
local_steps = 1
expected_batch = 10.0
[privacy]
unit = "record"
clip_norm = 1.0
noise_multiplier = 1.0
epsilon = 4.0
delta = 1e-6
[sites]
enrolled = ["a"]
"#,
    )
    .expect("study");
    let spec = fedpriv_common::arch::spec_for_data(&study.model, &study.data, study.n_outputs())
        .expect("spec");
    // Input: a, b scaled to [-1, 1], then region one-hot (north, south, other). Logits: red
    // follows a, white follows b, rose follows "south".
    let mut w = vec![0f32; spec.num_values()];
    let width = 5;
    w[0] = 5.0; // red <- a
    w[width + 1] = 5.0; // white <- b
    w[2 * width + 3] = 20.0; // rose <- south
    let path = dir.join("model.safetensors");
    let mut f = std::fs::File::create(&path).expect("create");
    let card = fedpriv_common::model_card::ModelCard::for_round(&study, 7, 1.25).metadata();
    fedpriv_coordinator::server::write_safetensors(&spec, &w, &card, &mut f).expect("write");
    path
}

#[test]
fn model_evaluate_and_predict_use_the_cards_preprocessing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_model(dir.path());
    // a high -> red; b high -> white; south -> rose. One record has b missing (filled with
    // 5, in range), one has an unknown label (skipped).
    std::fs::write(
        dir.path().join("test.csv"),
        "a,b,region,kind\n9,1,north,red\n1,9,north,white\n1,1,south,rose\n9,,north,red\n2,2,north,purple\n",
    )
    .expect("write");
    let v = json_of(
        bin()
            .args(["model", "evaluate", "--json", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(dir.path().join("test.csv")),
    );
    assert_eq!(v["records"], 4);
    assert_eq!(v["skipped"], 1);
    assert_eq!(v["accuracy"], 1.0);
    assert_eq!(v["auroc"], 1.0);
    assert_eq!(v["recall"], serde_json::json!([1.0, 1.0, 1.0]));
    assert!(v.get("rmse").is_none());
    // Text output names the study, round and guarantee from the card.
    let out = bin()
        .args(["model", "evaluate", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(dir.path().join("test.csv"))
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("study wine round 7") && text.contains("epsilon 1.2500"),
        "{text}"
    );
    // Predictions for a file without labels.
    std::fs::write(
        dir.path().join("new.csv"),
        "region,b,a\nsouth,0,0\nnorth,0,10\n",
    )
    .expect("write");
    let out = bin()
        .args(["model", "predict", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(dir.path().join("new.csv"))
        .arg("--out")
        .arg(dir.path().join("pred.csv"))
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pred = std::fs::read_to_string(dir.path().join("pred.csv")).expect("read");
    let lines: Vec<&str> = pred.lines().collect();
    assert_eq!(lines[0], "p_red,p_white,p_rose,predicted");
    assert!(
        lines[1].ends_with(",rose") && lines[2].ends_with(",red"),
        "{pred}"
    );
    // A file without a card is refused by name.
    std::fs::write(dir.path().join("bare.safetensors"), b"not a model").expect("write");
    let out = bin()
        .args(["model", "evaluate", "--model"])
        .arg(dir.path().join("bare.safetensors"))
        .arg("--data")
        .arg(dir.path().join("test.csv"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bare.safetensors"));
}

/// `privacy-audit --json` of `study` at 200 records and 200 canaries, seed 5.
fn privacy_audit(study: &str) -> Command {
    let mut cmd = bin();
    cmd.args(["privacy-audit", "--study", study]).args([
        "--records",
        "200",
        "--canaries",
        "200",
        "--seed",
        "5",
        "--json",
    ]);
    cmd
}

#[test]
fn privacy_audit_reports_its_bound_next_to_the_claim() {
    let study = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/configs/study-record.toml"
    );
    let v = json_of(&mut privacy_audit(study));
    for field in [
        "epsilon_claimed",
        "epsilon_lower_bound",
        "delta",
        "confidence",
    ] {
        assert!(v[field].is_f64(), "{field}: {v}");
    }
    assert_eq!(v["canaries"], 200);
    assert_eq!(v["guesses"], 40);
    assert!(v["correct_guesses"].as_u64().expect("count") <= 40);
    assert!(v["epsilon_lower_bound"].as_f64() <= v["epsilon_claimed"].as_f64());
    // q = expected batch 16 / 200 records, 40 rounds of 5 steps: the study's own terms.
    assert!((v["q"].as_f64().expect("q") - 0.08).abs() < 1e-12);
    assert_eq!(v["steps"], 200);

    // With --state, the same audit is on record twice, with the same figures: a row in the
    // state database (what the release gate reads) and a record in the audit log.
    let dir = tempfile::tempdir().expect("tempdir");
    let v = json_of(privacy_audit(study).arg("--state").arg(dir.path()));
    let store =
        fedpriv_coordinator::store::Store::open_read_only(dir.path().join("coordinator.db"))
            .expect("state database");
    let rows = store.privacy_audits("breast-cancer").expect("audits");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        Some(rows[0].epsilon_lower_bound),
        v["epsilon_lower_bound"].as_f64()
    );
    let log = std::fs::read_to_string(dir.path().join("audit.log")).expect("audit log");
    let record = log
        .lines()
        .map(|l| fedpriv_common::audit::decode_line(l).expect("a record"))
        .find(|r| r.event == fedpriv_common::audit::AuditEvent::PrivacyAudited)
        .expect("a privacy_audited record");
    use fedpriv_common::audit::details::Details;
    assert_eq!(record.details, rows[0].audit_record().to_value());

    // A record-unit audit without a record count is the operator's mistake: exit 2, a reason.
    let out = bin()
        .args(["privacy-audit", "--study", study])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--records"));
}

#[test]
fn exit_when_done_fails_a_study_no_site_joined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(bin()
        .args(["pki", "init", "--out"])
        .arg(&pki)
        .output()
        .expect("runs"));
    let key = dir.path().join("at-rest.key");
    ok(bin()
        .args(["at-rest-key", "--out"])
        .arg(&key)
        .output()
        .expect("runs"));
    let toml = include_str!("../../examples/configs/study-record.toml").replace(
        "round_timeout_secs = 120",
        "round_timeout_secs = 120\njoin_timeout_secs = 1",
    );
    let study = dir.path().join("study.toml");
    std::fs::write(&study, toml).expect("write");
    let state = dir.path().join("state");
    let out = bin()
        .args([
            "--log-format",
            "json",
            "run",
            "--exit-when-done",
            "--listen",
            "127.0.0.1:0",
            "--study",
        ])
        .arg(&study)
        .arg("--state")
        .arg(&state)
        .arg("--pki")
        .arg(&pki)
        .arg("--at-rest-key-file")
        .arg(&key)
        .env_remove("FEDPRIV_AT_REST_KEY")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Not a success, not the operator's files (2): a study that did not do its work.
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("study breast-cancer ended without completing")
            && stderr.contains("no enrolled site joined"),
        "{stderr}"
    );
    // `--log-format json`: the log is one JSON object per line, the study's end among them.
    let logged: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a log line is one JSON object"))
        .collect();
    assert!(
        logged
            .iter()
            .any(|v| v["level"] == "INFO" && v["message"] == "study ended"),
        "{stderr}"
    );
}
