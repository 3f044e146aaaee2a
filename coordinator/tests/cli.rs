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
