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
        "[site]\nname = \"st-marys\"\nstate_dir = \"state\"\nmax_delta = 5.0\n[coordinator]\naddress = \"127.0.0.1:7443\"\nserver_name = \"localhost\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[studies]\n",
    )
    .expect("write");
    let out = bin()
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site.max_delta"), "{err}");
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
