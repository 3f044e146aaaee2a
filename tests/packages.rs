//! The Debian packages of both daemons: built with cargo-deb from the binaries this test
//! run already has (`--no-build --profile dev`: no second, release build in CI), then read
//! back with `dpkg-deb` and checked: the binary, the systemd unit (and `systemd-analyze
//! verify` where it exists), the conffiles, that no private key is shipped, and what the
//! postinst does, run against stub commands (the system user with no login shell, the state
//! directory 0700 and owned by that user), without touching this machine.
//!
//! Needs `cargo-deb` (`.ci/run` installs the pinned version, see [`CARGO_DEB`]) and
//! `dpkg-deb`; the packages it builds are test artifacts (debug binaries), not releases:
//! `cargo deb -p fedpriv-coordinator` makes a release package.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use fedpriv_client::config::SiteConfig;
use fedpriv_common::config::StudyConfig;
use fedpriv_coordinator::limits::Limits;

/// The cargo-deb version `.ci/run` installs.
const CARGO_DEB: &str = "3.8.0";

/// What one package must hold.
struct Expected {
    package: &'static str,
    user: &'static str,
    state_dir: &'static str,
    /// Every file under /etc, all of them conffiles.
    conffiles: &'static [&'static str],
    /// A config path the unit's ExecStart names, shipped as a conffile.
    unit_config: &'static str,
}

const COORDINATOR: Expected = Expected {
    package: "fedpriv-coordinator",
    user: "fedpriv-coordinator",
    state_dir: "/var/lib/fedpriv-coordinator",
    conffiles: &[
        "/etc/default/fedpriv-coordinator",
        "/etc/fedpriv/limits.toml",
    ],
    unit_config: "--limits /etc/fedpriv/limits.toml",
};

const CLIENT: Expected = Expected {
    package: "fedpriv-client",
    user: "fedpriv-client",
    state_dir: "/var/lib/fedpriv-client",
    conffiles: &["/etc/default/fedpriv-client", "/etc/fedpriv/site.toml"],
    unit_config: "--config /etc/fedpriv/site.toml",
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Says something in the test's output even when the harness captures it (`print!` is
/// captured; a write to the stderr handle is not).
fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "packages: {msg}");
}

/// The profile directory this test binary was built into (`target/debug`), where the
/// daemons' binaries of the same `cargo test` run are.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/packages-HASH
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds `package`'s .deb from the binary in `profile_dir` into `out`.
fn build_deb(package: &str, profile_dir: &Path, out: &Path) -> PathBuf {
    let bin = profile_dir.join(package);
    assert!(
        bin.is_file(),
        "{} is missing: run the whole suite (`cargo test --workspace`), which builds it",
        bin.display()
    );
    let target_dir = profile_dir.parent().expect("target dir");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile in {}", profile_dir.display()),
    };
    let deb = out.join(format!("{package}.deb"));
    let started = std::time::Instant::now();
    run(cargo()
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["deb", "--locked", "--no-build", "--fast", "-p", package])
        .args(["--profile", profile, "--output"])
        .arg(&deb));
    note(&format!(
        "built {} in {:.1} s",
        deb.display(),
        started.elapsed().as_secs_f64()
    ));
    deb
}

/// One entry of `dpkg-deb -c`.
#[derive(Debug)]
struct Entry {
    mode: String,
    owner: String,
    path: String,
}

fn listing(deb: &Path) -> Vec<Entry> {
    let out = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "unexpected dpkg-deb -c line {l:?}");
            Entry {
                mode: f[0].to_string(),
                owner: f[1].to_string(),
                // ./usr/bin/x -> /usr/bin/x (and directories without their trailing /)
                path: f[5]
                    .trim_start_matches('.')
                    .trim_end_matches('/')
                    .to_string(),
            }
        })
        .collect()
}

fn field<'a>(control: &'a str, name: &str) -> &'a str {
    control
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in control:\n{control}"))
}

/// Runs the package's postinst with `configure` against stub commands that only log what
/// they were asked, and returns the log. `user_exists`: what the stub `getent` answers.
fn run_postinst(postinst: &Path, scratch: &Path, user_exists: bool) -> Vec<String> {
    let stubs = scratch.join(if user_exists { "stubs-user" } else { "stubs" });
    std::fs::create_dir_all(&stubs).expect("stubs dir");
    let log = stubs.join("log");
    for cmd in [
        "adduser",
        "mkdir",
        "chown",
        "chmod",
        "getent",
        "systemctl",
        "deb-systemd-helper",
        "deb-systemd-invoke",
    ] {
        let exit = if cmd == "getent" && !user_exists {
            2
        } else {
            0
        };
        let path = stubs.join(cmd);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{cmd} $*\" >> '{}'\nexit {exit}\n",
                log.display()
            ),
        )
        .expect("stub");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    run(Command::new("/bin/sh")
        .arg(postinst)
        .arg("configure")
        .env_clear()
        .env("PATH", &stubs));
    std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn check_package(exp: &Expected, deb: &Path, scratch: &Path) {
    let pkg = exp.package;
    let entries = listing(deb);
    let find = |p: &str| entries.iter().find(|e| e.path == p);

    // The binary, executable, root-owned.
    let bin = format!("/usr/bin/{pkg}");
    let e = find(&bin).unwrap_or_else(|| panic!("{pkg}: no {bin} in {entries:#?}"));
    assert_eq!(e.mode, "-rwxr-xr-x", "{bin}");
    // Nothing writable by group or others, nothing setuid, every file root's.
    for e in &entries {
        let m = e.mode.as_bytes();
        assert!(
            m[5] != b'w' && m[8] != b'w' && !e.mode.contains('s'),
            "{pkg}: {} has mode {}",
            e.path,
            e.mode
        );
        assert!(
            e.owner == "0/0" || e.owner == "root/root",
            "{pkg}: {} is owned by {}",
            e.path,
            e.owner
        );
    }

    // No private key, by name or by content.
    let root = scratch.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    for e in entries.iter().filter(|e| e.mode.starts_with('-')) {
        assert!(
            !(e.path.ends_with(".key") || e.path.ends_with(".pem")),
            "{pkg} ships a key or certificate: {}",
            e.path
        );
        if e.path.starts_with("/usr/bin/") {
            continue; // the binary parses PEM, so it holds the marker text
        }
        let bytes = std::fs::read(root.join(&e.path[1..])).expect("extracted file");
        assert!(
            !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
            "{pkg} ships a private key in {}",
            e.path
        );
    }

    // The packaged (stripped) binary runs.
    let version = run(Command::new(root.join(&bin[1..])).arg("--version"));
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with(&format!("{pkg} ")),
        "{pkg} --version"
    );

    // The unit: where systemd looks, the repository's file as it is, running the packaged
    // binary as the package's user with its state directory 0700.
    let unit_path = format!("/usr/lib/systemd/system/{pkg}.service");
    let e = find(&unit_path).unwrap_or_else(|| panic!("{pkg}: no {unit_path}"));
    assert_eq!(e.mode, "-rw-r--r--", "{unit_path}");
    let unit = std::fs::read_to_string(root.join(&unit_path[1..])).expect("unit");
    assert_eq!(
        unit,
        std::fs::read_to_string(repo().join(format!("deploy/{pkg}.service"))).expect("deploy"),
        "the packaged unit is deploy/{pkg}.service"
    );
    let unit_lines: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    let has = |line: &str| unit_lines.contains(&line);
    assert!(has(&format!("User={}", exp.user)), "{pkg}: User=");
    assert!(has(&format!("Group={}", exp.user)), "{pkg}: Group=");
    let state_name = exp.state_dir.trim_start_matches("/var/lib/");
    assert!(has(&format!("StateDirectory={state_name}")), "{pkg}");
    assert!(has("StateDirectoryMode=0700"), "{pkg}");
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "UMask=0077",
        "MemorySwapMax=0",
        "LimitCORE=0",
    ] {
        assert!(has(hardening), "{pkg}: {hardening}");
    }
    let exec = unit_lines
        .iter()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(exec.starts_with(&format!("{bin} run ")), "{pkg}: {exec}");
    assert!(exec.contains(exp.unit_config), "{pkg}: {exec}");

    // Conffiles: exactly the files under /etc, and the unit's config among them.
    let control_dir = scratch.join("control");
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb)
        .arg(&control_dir));
    let conffiles: BTreeSet<String> = std::fs::read_to_string(control_dir.join("conffiles"))
        .expect("conffiles")
        .lines()
        .map(str::to_string)
        .collect();
    let under_etc: BTreeSet<String> = entries
        .iter()
        .filter(|e| e.mode.starts_with('-') && e.path.starts_with("/etc/"))
        .map(|e| e.path.clone())
        .collect();
    let expected: BTreeSet<String> = exp.conffiles.iter().map(|s| s.to_string()).collect();
    assert_eq!(conffiles, expected, "{pkg}: conffiles");
    assert_eq!(under_etc, expected, "{pkg}: files under /etc");
    let unit_config = exp.unit_config.split(' ').nth(1).expect("path");
    assert!(conffiles.contains(unit_config), "{pkg}: {unit_config}");

    // Control: the name, and adduser (the postinst needs it).
    let control = std::fs::read_to_string(control_dir.join("control")).expect("control");
    assert_eq!(field(&control, "Package"), pkg);
    assert!(
        field(&control, "Depends")
            .split(',')
            .any(|d| d.trim() == "adduser"),
        "{pkg}: Depends"
    );

    // The postinst, run against stubs: a system user with no login shell and its own group,
    // then the state directory, owned by it, 0700. A second install with the user already
    // there leaves the user alone and still sets the directory right.
    let postinst = control_dir.join("postinst");
    let log = run_postinst(&postinst, scratch, false);
    let adduser = log
        .iter()
        .find(|l| l.starts_with("adduser "))
        .unwrap_or_else(|| panic!("{pkg}: postinst created no user: {log:?}"));
    for flag in ["--system", "--group", "--shell /usr/sbin/nologin"] {
        assert!(adduser.contains(flag), "{pkg}: {adduser} lacks {flag}");
    }
    assert!(
        adduser.ends_with(&format!(" {}", exp.user)),
        "{pkg}: {adduser}"
    );
    let dir_steps = [
        format!("chown {0}:{0} {1}", exp.user, exp.state_dir),
        format!("chmod 0700 {}", exp.state_dir),
    ];
    let pos = |line: &str| log.iter().position(|l| l == line);
    let at_user = pos(adduser).expect("adduser");
    for step in &dir_steps {
        let at = pos(step).unwrap_or_else(|| panic!("{pkg}: postinst did not {step}: {log:?}"));
        assert!(at > at_user, "{pkg}: {step} before the user exists");
    }
    let again = run_postinst(&postinst, scratch, true);
    assert!(
        !again.iter().any(|l| l.starts_with("adduser ")),
        "{pkg}: {again:?}"
    );
    for step in &dir_steps {
        assert!(again.contains(step), "{pkg}: reinstall did not {step}");
    }
    // Nothing in any maintainer script removes the state directory (the ledger).
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        if let Ok(text) = std::fs::read_to_string(control_dir.join(script)) {
            assert!(
                !text.contains("rm -r") && !text.contains("deluser"),
                "{pkg}: {script} removes state or the user"
            );
        }
    }

    // systemd's own check of the unit, pointing at the extracted binary (ExecStart must
    // exist for `verify`). Any complaint fails the test.
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(v) if v.status.success() => {
            let unit_copy = scratch.join(format!("{pkg}.service"));
            let extracted_bin = root.join(&bin[1..]);
            std::fs::write(
                &unit_copy,
                unit.replace(&bin, &extracted_bin.display().to_string()),
            )
            .expect("unit copy");
            let out = Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(&unit_copy)
                .output()
                .expect("systemd-analyze");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && said.trim().is_empty(),
                "systemd-analyze verify {pkg}.service: {said}"
            );
            note(&format!("systemd-analyze verify {pkg}.service: ok"));
        }
        _ => note(&format!(
            "systemd-analyze not found: {pkg}.service not verified by systemd (the content checks ran)"
        )),
    }
}

#[test]
fn debian_packages_hold_the_daemons_units_users_and_conffiles() {
    let version = cargo().args(["deb", "--version"]).output();
    match version {
        Ok(v) if v.status.success() => note(&format!(
            "using {} (CI pins {CARGO_DEB})",
            String::from_utf8_lossy(&v.stdout).trim()
        )),
        _ => panic!(
            "cargo-deb is not installed: cargo install cargo-deb --locked --version {CARGO_DEB} \
             (.ci/run does this)"
        ),
    }
    let ci = std::fs::read_to_string(repo().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.contains(&format!("CARGO_DEB_VERSION={CARGO_DEB}\n")),
        ".ci/run installs another cargo-deb than this test names"
    );
    let profile_dir = profile_dir();
    let scratch = tempfile::tempdir().expect("tempdir");
    for exp in [&COORDINATOR, &CLIENT] {
        let dir = scratch.path().join(exp.package);
        std::fs::create_dir_all(&dir).expect("dir");
        let deb = build_deb(exp.package, &profile_dir, &dir);
        check_package(exp, &deb, &dir);
    }
}

/// The packaged config templates are the examples with the package's layout: they parse,
/// the site's state directory is the unit's, and its study terms are the example's.
#[test]
fn packaged_config_templates_parse_and_match_the_units() {
    let site = SiteConfig::load(&repo().join("deploy/etc/fedpriv/site.toml")).expect("site.toml");
    assert_eq!(site.state_dir, PathBuf::from(CLIENT.state_dir));
    let example = SiteConfig::load(&repo().join("examples/configs/site.toml")).expect("example");
    assert_eq!(site.name, example.name);
    assert_eq!(
        site.studies, example.studies,
        "the pinned terms are the example's"
    );
    // TLS files resolve into pki/ beside the config: /etc/fedpriv/pki once installed.
    let pki = repo().join("deploy/etc/fedpriv/pki");
    for file in [&site.ca, &site.cert, &site.key] {
        assert!(file.starts_with(&pki), "{}", file.display());
    }

    let limits =
        std::fs::read_to_string(repo().join("examples/configs/limits.toml")).expect("limits.toml");
    Limits::from_toml(&limits).expect("limits.toml parses");
    for study in ["study-record.toml", "study-audit.toml"] {
        let text =
            std::fs::read_to_string(repo().join("examples/configs").join(study)).expect("study");
        StudyConfig::from_toml(&text).unwrap_or_else(|e| panic!("{study}: {e}"));
    }
}
