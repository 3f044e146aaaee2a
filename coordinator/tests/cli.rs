//! The `fedpriv-coordinator` binary as an operator uses it. (Being an integration test of
//! this package also makes `cargo test --workspace` build the binary, which the crash tests
//! in the root package run as a separate process.)

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedpriv-coordinator"))
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
}

#[test]
fn help_lists_the_commands() {
    let out = bin().arg("--help").output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["budget", "pki", "run", "ledger", "model", "audit"] {
        assert!(text.contains(cmd), "{cmd} missing from --help");
    }
}
