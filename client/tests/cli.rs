//! The `fedpriv-client` binary as a hospital's IT team uses it. (Being an integration test of
//! this package also makes `cargo test --workspace` build the binary, which the crash tests
//! in the root package run as a separate process.)

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedpriv-client"))
}

#[test]
fn a_bad_config_names_the_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("site.toml");
    std::fs::write(
        &cfg,
        "[site]\nname = \"st-marys\"\nstate_dir = \"state\"\n[coordinator]\naddress = \"127.0.0.1:7443\"\nserver_name = \"localhost\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[sources.wards]\npath = \"a.csv\"\nrecords = 100\ndelta = 5.0\nepsilon_cap = 1.0\n[studies]\n",
    )
    .expect("write");
    let out = bin()
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sources.wards.delta"), "{err}");
}

const STUDY: &str = r#"
[study]
id = "bc"
model = { kind = "logistic_regression" }
rounds = 10
min_sites = 1
round_timeout_secs = 30
[data]
task = "binary"
label = "y"
features = ["a", "b"]
ranges = { a = [0.0, 10.0], b = [-1.0, 1.0] }
[training]
strategy = "fedavg"
learning_rate = 0.5
server_learning_rate = 1.0
local_steps = 10
expected_batch = 25.0
[privacy]
unit = "record"
clip_norm = 1.0
noise_multiplier = 1.1
epsilon = 4.0
delta = 1e-6
[sites]
enrolled = ["st-marys"]
"#;

fn terms_command(dir: &std::path::Path) -> Command {
    let study = dir.join("study.toml");
    std::fs::write(&study, STUDY).expect("write");
    let mut cmd = bin();
    cmd.args(["terms", "--study"]).arg(&study).args([
        "--source",
        "wards",
        "--records",
        "500",
        "--epsilon-cap",
        "2.5",
    ]);
    cmd
}

#[test]
fn terms_prints_the_table_a_site_config_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = terms_command(dir.path()).output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).expect("utf-8");
    let site = format!(
        "[site]\nname = \"st-marys\"\nstate_dir = \"state\"\n[coordinator]\naddress = \"127.0.0.1:7443\"\nserver_name = \"localhost\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[sources.wards]\npath = \"a.csv\"\nrecords = 500\ndelta = 1e-5\nepsilon_cap = 8.0\n{table}"
    );
    let cfg = fedpriv_client::config::SiteConfig::from_toml(&site, dir.path()).expect(&site);
    let s = &cfg.studies["bc"];
    assert_eq!(s.epsilon_cap.get(), 2.5);
    assert_eq!(s.terms.max_steps_per_round, Some(10));
    assert_eq!(s.terms.max_sample_rate.map(|q| q.get()), Some(0.05));
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    // `fedpriv-client ... | head` used to panic on the broken pipe.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = terms_command(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn audit_verify_reports_a_tampered_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.log");
    {
        let mut audit = fedpriv_common::audit_file::AuditLog::open(&log).expect("log");
        for i in 0..3 {
            audit
                .append(
                    "st-marys",
                    fedpriv_common::audit::AuditEvent::Refused,
                    serde_json::json!({"n": i}),
                    1_700_000_000 + i,
                )
                .expect("append");
        }
    }
    let ok = bin()
        .args(["audit", "verify", "--log"])
        .arg(&log)
        .output()
        .expect("runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let text = std::fs::read_to_string(&log)
        .expect("read")
        .replace("\"n\":1", "\"n\":7");
    std::fs::write(&log, text).expect("tamper");
    let bad = bin()
        .args(["audit", "verify", "--log"])
        .arg(&log)
        .output()
        .expect("runs");
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
}
