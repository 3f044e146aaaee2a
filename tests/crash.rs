//! Crash safety by fault injection, with the real binaries as separate processes.
//!
//! A coordinator (`fedpriv-coordinator run --exit-when-done`) and three site daemons
//! (`fedpriv-client run`) train on the bundled breast-cancer data over loopback QUIC. The
//! coordinator is killed with SIGKILL at seeded random moments and restarted over the same
//! state directory until the study ends. The site daemons are killed with it and restarted
//! with the next run (a site notices a killed coordinator only at its QUIC idle timeout,
//! a minute); in one run, one site is also killed on its own right after it paid for a
//! round, mid-round, and restarted. After every kill the state on disk must be consistent:
//! the coordinator's ledger never shows less spent than before (entries are append-only and
//! no site's count or epsilon falls), every completed round has its model file with the
//! digest the database recorded, every site still holds every spend it recorded and each of
//! them is one the coordinator charged (never a round paid twice), and the audit logs
//! verify. The study then ends with a reason. A second test checks that a damaged state
//! database stops the coordinator with a clear error and is left as it was.
//!
//! The binaries must be built first (`cargo build -p fedpriv-coordinator -p
//! fedpriv-client`): Cargo builds a package's binaries for that package's own integration
//! tests only, and these tests live in the root package. `FEDPRIV_CRASH_KEEP=1` keeps the
//! temporary folders (state, configs, logs) for inspection.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fedpriv::demo::{self, DemoOptions, SITES};
use fedpriv_client::store::{SiteLedger, SpendRow};
use fedpriv_common::digest::sha256_hex;
use fedpriv_common::pki::{self, Identity, Role};
use fedpriv_coordinator::checkpoint::model_path;
use fedpriv_coordinator::store::{RoundStatus, Store};

/// Coordinator kills (each at a seeded random moment of its run) before the final run.
const KILLS: usize = 8;
/// Planned rounds: enough that the study outlives the kills.
const ROUNDS: u64 = 70;
/// Range of a coordinator's run before it is killed.
const KILL_AFTER_MS: (u64, u64) = (100, 1500);
/// Index of the coordinator run during which one site daemon is killed too.
const SITE_KILL_RUN: usize = 1;
/// Bound on the final, uninterrupted run that finishes the study (it takes about 10 s in
/// the debug profile); only there so that a hang fails instead of blocking CI.
const FINAL_RUN_LIMIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// Processes

/// Where Cargo put the workspace's binaries: next to the `deps` folder holding this test.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build -p fedpriv-coordinator -p \
         fedpriv-client` (same profile as the tests). `cargo test` builds a package's binaries \
         only for that package's own integration tests, and this test is in the root package.",
        path.display()
    );
    path
}

/// A child process that is killed (SIGKILL) and reaped when dropped, also when a test
/// panics, so no daemon outlives a failed test.
struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `bin args...` with stdout and stderr appended to `log`.
    fn start(what: &str, bin: &Path, args: &[&str], log: &Path) -> Proc {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the log file");
        let err = out.try_clone().expect("clone the log file handle");
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what} ({}): {e}", bin.display()));
        Proc {
            what: what.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    /// Panics, with the process's own error message, if it has exited.
    fn assert_running(&mut self) {
        let status = self
            .child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.what));
        if let Some(status) = status {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let error = log
                .rfind("error: ")
                .map_or("(no error message)", |at| &log[at..]);
            panic!("{} exited on its own ({status}): {error}", self.what);
        }
    }

    /// Whether a site daemon has stopped cleanly because every study it serves ended (it
    /// does so on the coordinator's StudyEnded, just before the coordinator exits).
    fn stopped_after_its_studies_ended(&mut self) -> bool {
        match self.child.try_wait() {
            Ok(Some(status)) if status.success() => std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains("every study this site serves has ended"),
            _ => false,
        }
    }

    /// SIGKILL (std's `Child::kill`) and reap.
    fn kill(mut self) {
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("kill {}: {e}", self.what));
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("reap {}: {e}", self.what));
    }

    /// Waits up to `limit` for the process to exit on its own.
    fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("wait for {}: {e}", self.what))
            {
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// On a failing test, prints the end of every log, so the failure can be understood.
struct LogsOnPanic(Vec<PathBuf>);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for path in &self.0 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- {} (last {} lines)", path.display(), tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// SplitMix64: the seeded generator of the kill moments (the run is reproducible).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

// ---------------------------------------------------------------------------------------
// The federation on disk

struct Fixture {
    _root: tempfile::TempDir,
    study: String,
    study_file: PathBuf,
    pki_dir: PathBuf,
    state_dir: PathBuf,
    /// The coordinator's at-rest key (0600), passed with `--at-rest-key-file`.
    at_rest_key: PathBuf,
    listen: SocketAddr,
    /// Per site: (name, config file, site ledger file, log file).
    sites: Vec<(String, PathBuf, PathBuf, PathBuf)>,
    coordinator_log: PathBuf,
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create folder");
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn free_udp_port() -> u16 {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    sock.local_addr().expect("local address").port()
}

/// PKI, three site folders with their shard of the breast-cancer data and their config,
/// and the study file. Nothing runs yet.
fn fixture(opts: &DemoOptions) -> Fixture {
    let mut root = tempfile::tempdir().expect("tempdir");
    if std::env::var_os("FEDPRIV_CRASH_KEEP").is_some() {
        // For debugging: keep the state, configs and logs.
        root.disable_cleanup(true);
        eprintln!("keeping {}", root.path().display());
    }
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_udp_port()));

    let split = demo::split(opts).expect("split the bundled data");
    let sigma = demo::noise_multiplier(opts, &split.shards).expect("noise multiplier");
    // A site killed mid-round stalls its round until the round timeout: keep that short.
    let toml = demo::study_toml(opts, &split, sigma)
        .replace("round_timeout_secs = 60", "round_timeout_secs = 3");
    assert!(toml.contains("round_timeout_secs = 3"), "{toml}");
    let study_file = root.path().join("study.toml");
    write(&study_file, toml.as_bytes());
    let study = fedpriv_common::config::StudyConfig::from_toml(&toml).expect("the study is valid");

    let ca = pki::generate_ca("fedpriv crash test CA", 1).expect("CA");
    let server = pki::issue_server_cert(&ca, &["localhost".to_string()], &[listen.ip()], 1)
        .expect("server certificate");
    let pki_dir = root.path().join("pki");
    write(&pki_dir.join("ca.pem"), ca.cert_pem.as_bytes());
    write(&pki_dir.join("server.pem"), server.cert_pem.as_bytes());
    write(&pki_dir.join("server.key"), server.key_pem.as_bytes());

    let mut sites = Vec::new();
    for (name, shard) in SITES.iter().zip(&split.shards) {
        let dir = root.path().join(name);
        let cert = pki::issue_identity_cert(&ca, &Identity::new(Role::Site, *name).expect("id"), 1)
            .expect("site certificate");
        write(&dir.join("ca.pem"), ca.cert_pem.as_bytes());
        write(&dir.join("site.pem"), cert.cert_pem.as_bytes());
        write(&dir.join("site.key"), cert.key_pem.as_bytes());
        fedpriv_client::data::write_csv(shard, dir.join("patients.csv")).expect("write shard");
        let site_toml = fedpriv_client::config::SiteSetup {
            name,
            coordinator: listen,
            ca: Path::new("ca.pem"),
            cert: Path::new("site.pem"),
            key: Path::new("site.key"),
            data: Path::new("patients.csv"),
            records: shard.n as u64,
            source_delta: study.privacy.delta.get(),
            source_cap: 3.0 * opts.site_cap,
        }
        .toml(&[(&study, opts.site_cap)]);
        let config = dir.join("site.toml");
        write(&config, site_toml.as_bytes());
        fedpriv_client::config::SiteConfig::load(&config).expect("the site config is valid");
        sites.push((
            name.to_string(),
            config,
            dir.join("state").join("site-ledger.db"),
            root.path().join(format!("{name}.log")),
        ));
    }
    let at_rest_key = root.path().join("at-rest.key");
    fedpriv_coordinator::at_rest::write_new_key_file(&at_rest_key).expect("at-rest key");
    Fixture {
        study: opts.data.study_id().to_string(),
        study_file,
        pki_dir,
        at_rest_key,
        state_dir: root.path().join("coordinator"),
        listen,
        sites,
        coordinator_log: root.path().join("coordinator.log"),
        _root: root,
    }
}

impl Fixture {
    fn logs(&self) -> LogsOnPanic {
        let mut logs = vec![self.coordinator_log.clone()];
        logs.extend(self.sites.iter().map(|s| s.3.clone()));
        LogsOnPanic(logs)
    }

    fn start_coordinator(&self, bin: &Path) -> Proc {
        let listen = self.listen.to_string();
        Proc::start(
            "coordinator",
            bin,
            &[
                "run",
                "--study",
                path_str(&self.study_file),
                "--state",
                path_str(&self.state_dir),
                "--pki",
                path_str(&self.pki_dir),
                "--listen",
                &listen,
                "--exit-when-done",
                "--at-rest-key-file",
                path_str(&self.at_rest_key),
            ],
            &self.coordinator_log,
        )
    }

    /// Starts every site daemon.
    fn start_sites(&self, bin: &Path) -> Vec<Option<Proc>> {
        (0..self.sites.len())
            .map(|i| Some(self.start_site(bin, i)))
            .collect()
    }

    fn start_site(&self, bin: &Path, i: usize) -> Proc {
        let (name, config, _, log) = &self.sites[i];
        Proc::start(
            &format!("site {name}"),
            bin,
            &["run", "--config", path_str(config)],
            log,
        )
    }

    fn db(&self) -> PathBuf {
        self.state_dir.join("coordinator.db")
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

// ---------------------------------------------------------------------------------------
// What is on disk

/// One coordinator ledger entry as `ledger show --json` prints it: (q, sigma, steps).
type Mechanism = (f64, f64, u64);

/// The coordinator's ledger as `ledger show --json` reports it.
#[derive(Debug, Clone, Default)]
struct LedgerView {
    /// (site, round) -> mechanism.
    entries: BTreeMap<(String, u64), Mechanism>,
    per_site_epsilon: BTreeMap<String, f64>,
    status: String,
    end_reason: Option<String>,
}

impl LedgerView {
    fn entries_of(&self, site: &str) -> usize {
        self.entries.keys().filter(|(s, _)| s == site).count()
    }
}

/// `fedpriv-coordinator ledger show --json`, parsed. `None` when the coordinator died
/// before it created the study (nothing spent yet).
fn ledger_show(bin: &Path, fx: &Fixture) -> Option<LedgerView> {
    if !fx.db().exists() {
        // `ledger show` would create an empty database; the coordinator had not yet.
        return None;
    }
    let out = Command::new(bin)
        .args([
            "ledger",
            "show",
            "--study",
            &fx.study,
            "--state",
            path_str(&fx.state_dir),
            "--json",
        ])
        .output()
        .expect("run ledger show");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert!(stderr.contains("no study"), "ledger show failed: {stderr}");
        return None;
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("ledger show --json prints JSON");
    let mut view = LedgerView {
        status: v["status"].as_str().expect("status").to_string(),
        end_reason: v["end_reason"].as_str().map(str::to_string),
        ..LedgerView::default()
    };
    for e in v["entries"].as_array().expect("entries") {
        let site = e["site"].as_str().expect("site").to_string();
        let round = e["round"].as_u64().expect("round");
        let ev = &e["event"];
        let mech = (
            ev["q"].as_f64().expect("q"),
            ev["sigma"].as_f64().expect("sigma"),
            ev["steps"].as_u64().expect("steps"),
        );
        assert!(
            view.entries.insert((site.clone(), round), mech).is_none(),
            "site {site} charged twice for round {round}"
        );
    }
    for (site, eps) in v["per_site_epsilon"].as_object().expect("per_site_epsilon") {
        view.per_site_epsilon
            .insert(site.clone(), eps.as_f64().expect("epsilon"));
    }
    Some(view)
}

/// The ledger never shows less than before: every earlier entry is still there, unchanged,
/// and no site's entry count or epsilon went down.
fn assert_never_less(before: &LedgerView, now: &LedgerView, when: &str) {
    for (key, mech) in &before.entries {
        assert_eq!(
            now.entries.get(key),
            Some(mech),
            "{when}: ledger entry {key:?} vanished or changed"
        );
    }
    for site in SITES {
        assert!(
            now.entries_of(site) >= before.entries_of(site),
            "{when}: site {site} has fewer ledger entries"
        );
        let (b, n) = (
            before.per_site_epsilon.get(site).copied().unwrap_or(0.0),
            now.per_site_epsilon.get(site).copied().unwrap_or(0.0),
        );
        assert!(
            n >= b - 1e-12,
            "{when}: site {site} epsilon fell from {b} to {n}"
        );
    }
}

/// Every completed round has its model file, whose SHA-256 matches what the database
/// recorded (read through the store while the coordinator is down; `digests` remembers the
/// digest of each round seen as the latest, and is checked again on every later call).
/// Returns the number of completed rounds.
fn assert_models_whole(fx: &Fixture, digests: &mut BTreeMap<u64, String>, when: &str) -> usize {
    if !fx.db().exists() {
        return 0;
    }
    let store = Store::open(fx.db()).unwrap_or_else(|e| panic!("{when}: open the store: {e}"));
    if store.study(&fx.study).expect("read study").is_none() {
        return 0;
    }
    let rounds = store.rounds(&fx.study).expect("read rounds");
    let completed: Vec<u64> = rounds
        .iter()
        .filter(|r| r.status == RoundStatus::Completed)
        .map(|r| r.round)
        .collect();
    let lineage: BTreeMap<u64, Vec<String>> = store
        .lineage(&fx.study)
        .expect("lineage")
        .into_iter()
        .collect();
    for &round in &completed {
        let path = model_path(&fx.state_dir, &fx.study, round);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{when}: round {round} completed but {}: {e}",
                path.display()
            )
        });
        assert!(
            bytes.starts_with(fedpriv_common::seal::STREAM_MAGIC)
                && !bytes.windows(12).any(|w| w == b"__metadata__"),
            "{when}: model file of round {round} is not sealed at rest"
        );
        if let Some(recorded) = digests.get(&round) {
            assert_eq!(
                &sha256_hex(&bytes),
                recorded,
                "{when}: model file of round {round} changed or is half-written"
            );
        }
        assert!(
            lineage.get(&round).is_some_and(|sites| !sites.is_empty()),
            "{when}: completed round {round} has no contributors"
        );
    }
    if let Some((round, file, sha)) = store.last_completed_round(&fx.study).expect("last round") {
        assert_eq!(
            fx.state_dir.join(&file),
            model_path(&fx.state_dir, &fx.study, round),
            "{when}: model file name"
        );
        let bytes = std::fs::read(fx.state_dir.join(&file)).expect("read the latest model");
        assert_eq!(
            sha256_hex(&bytes),
            sha,
            "{when}: the latest model file (round {round}) does not match its recorded digest"
        );
        digests.insert(round, sha);
    }
    completed.len()
}

/// A site's own spends: each is a round the coordinator charged it for, at the same price.
fn assert_site_spends_charged(view: &LedgerView, site: &str, spends: &[SpendRow], when: &str) {
    // JSON carries the floats in their shortest form; allow for the last bit.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs());
    for s in spends {
        let charged = view.entries.get(&(site.to_string(), s.round));
        assert!(
            charged.is_some_and(|&(q, sigma, steps)| close(q, s.event.q.get())
                && close(sigma, s.event.sigma.get())
                && steps == s.event.steps),
            "{when}: site {site} paid for round {} ({:?}) but the coordinator's ledger \
             charges it {charged:?}",
            s.round,
            s.event
        );
    }
}

fn site_spends(ledger_file: &Path, study: &str) -> Vec<SpendRow> {
    if !ledger_file.exists() {
        return Vec::new();
    }
    let ledger = SiteLedger::open(ledger_file)
        .unwrap_or_else(|e| panic!("open {}: {e}", ledger_file.display()));
    let spends = ledger.spends(study).expect("read the site's spends");
    let rounds: BTreeSet<u64> = spends.iter().map(|s| s.round).collect();
    assert_eq!(rounds.len(), spends.len(), "a site paid twice for a round");
    spends
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn killed_coordinator_and_site_lose_no_spend_and_the_study_finishes() {
    let coordinator_bin = binary("fedpriv-coordinator");
    let client_bin = binary("fedpriv-client");
    let opts = DemoOptions {
        rounds: ROUNDS,
        epsilon: 8.0,
        non_iid: false,
        ..DemoOptions::default()
    };
    let fx = fixture(&opts);
    let _logs = fx.logs();
    let started = Instant::now();
    let mut rng = SplitMix64(0x5EED_C4A5);
    let mut before = LedgerView::default();
    let mut paid_before: Vec<Vec<SpendRow>> = vec![Vec::new(); SITES.len()];
    let mut digests = BTreeMap::new();
    let mut mid_round_kill: Option<(usize, usize)> = None;
    let mut finished_early = None;
    let mut kills = 0;

    for run in 0..KILLS {
        let wait = Duration::from_millis(rng.between(KILL_AFTER_MS.0, KILL_AFTER_MS.1));
        let mut coordinator = fx.start_coordinator(&coordinator_bin);
        let run_started = Instant::now();
        let mut sites = fx.start_sites(&client_bin);
        if run == SITE_KILL_RUN {
            // Kill the first site as soon as it has paid for a round, while it trains or
            // sends its update: mid-round. Bounded: if it pays for nothing, it is killed
            // anyway. It is restarted at once and serves the rest of the run.
            let ledger_file = &fx.sites[0].2;
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until
                && site_spends(ledger_file, &fx.study).len() == paid_before[0].len()
            {
                for site in sites.iter_mut().flatten() {
                    site.assert_running();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if let Some(site) = sites[0].take() {
                site.kill();
            }
            let spends = site_spends(ledger_file, &fx.study);
            assert_kept(
                &paid_before[0],
                &spends,
                &fx.sites[0].0,
                "after the site's kill",
            );
            mid_round_kill = Some((paid_before[0].len(), spends.len()));
            paid_before[0] = spends;
            sites[0] = Some(fx.start_site(&client_bin, 0));
        }
        if let Some(status) = run_until(
            &mut coordinator,
            &mut sites,
            wait.saturating_sub(run_started.elapsed()),
        ) {
            finished_early = Some(status);
            break;
        }
        coordinator.kill();
        kills += 1;
        // The sites go down too (SIGKILL, wherever they were): a site notices a killed
        // coordinator only at its QUIC idle timeout, and the restarted sites reconnect at
        // once to the next run.
        for site in sites.into_iter().flatten() {
            site.kill();
        }
        let when = format!(
            "after kill {} ({} ms into the run)",
            run + 1,
            wait.as_millis()
        );
        let now = ledger_show(&coordinator_bin, &fx).unwrap_or_else(|| {
            assert!(before.entries.is_empty(), "{when}: the ledger vanished");
            LedgerView::default()
        });
        assert_never_less(&before, &now, &when);
        let completed = assert_models_whole(&fx, &mut digests, &when);
        for (i, (name, _, ledger_file, _)) in fx.sites.iter().enumerate() {
            let spends = site_spends(ledger_file, &fx.study);
            assert_kept(&paid_before[i], &spends, name, &when);
            assert_site_spends_charged(&now, name, &spends, &when);
            paid_before[i] = spends;
            assert_audit_verifies(&client_bin, &ledger_file.with_file_name("audit.log"), &when);
        }
        assert_audit_verifies(&coordinator_bin, &fx.state_dir.join("audit.log"), &when);
        eprintln!(
            "{when}: {} ledger entries, {completed} completed rounds, {:.1} s",
            now.entries.len(),
            started.elapsed().as_secs_f64()
        );
        before = now;
    }

    // The last run is left alone until the study ends.
    let status = match finished_early {
        Some(status) => status,
        None => {
            let mut coordinator = fx.start_coordinator(&coordinator_bin);
            let mut sites = fx.start_sites(&client_bin);
            run_until(&mut coordinator, &mut sites, FINAL_RUN_LIMIT)
                .unwrap_or_else(|| panic!("the study did not finish within {FINAL_RUN_LIMIT:?}"))
        }
    };
    assert!(
        status.success(),
        "the coordinator's last run failed: {status}"
    );
    let when = "at the end";
    let end = ledger_show(&coordinator_bin, &fx).expect("the study exists");
    assert_never_less(&before, &end, when);
    assert_ne!(end.status, "active", "the study ended");
    let reason = end.end_reason.clone().unwrap_or_default();
    assert!(!reason.is_empty(), "the study ended without a reason");
    let completed = assert_models_whole(&fx, &mut digests, when);
    assert!(completed > 0, "no round completed");
    for (i, (name, _, ledger_file, _)) in fx.sites.iter().enumerate() {
        let spends = site_spends(ledger_file, &fx.study);
        assert_kept(&paid_before[i], &spends, name, when);
        assert_site_spends_charged(&end, name, &spends, when);
        assert_audit_verifies(&client_bin, &ledger_file.with_file_name("audit.log"), when);
    }
    assert_audit_verifies(&coordinator_bin, &fx.state_dir.join("audit.log"), when);
    // Every round has its end on the trail, those a kill interrupted (aborted at the next
    // start, a model version aggregated in them never written) included.
    let store = Store::open(fx.state_dir.join("coordinator.db")).expect("store");
    let log = std::fs::read_to_string(fx.state_dir.join("audit.log")).expect("audit log");
    let finished: BTreeMap<u64, String> = log
        .lines()
        .map(|l| fedpriv_common::audit::decode_line(l).expect("a record"))
        .filter(|r| r.event.as_str() == "round_finished")
        .map(|r| {
            let round = r.details["round"].as_u64().expect("round");
            (
                round,
                r.details["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for row in store.rounds(&fx.study).expect("rounds") {
        let want = match row.status {
            RoundStatus::Completed => "completed",
            RoundStatus::Aborted => "aborted",
            RoundStatus::Reserved => continue,
        };
        assert_eq!(
            finished.get(&row.round).map(String::as_str),
            Some(want),
            "round {} is {want} in the store but not so on the audit log",
            row.round
        );
    }
    let (paid, kept) = mid_round_kill.expect("a site was killed on its own");
    eprintln!(
        "study ended ({reason}) after {kills} coordinator kills and a site kill after its \
         spend {kept} (it had {paid} before): {completed} completed rounds, {} ledger entries, \
         {:.1} s",
        end.entries.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Lets the coordinator run for up to `limit`; returns its exit status if it exits on its
/// own (the study ended). Every site daemon must keep running meanwhile, unless it stopped
/// cleanly because its studies ended.
fn run_until(
    coordinator: &mut Proc,
    sites: &mut [Option<Proc>],
    limit: Duration,
) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = coordinator.wait_for_exit(Duration::ZERO) {
            return Some(status);
        }
        for slot in sites.iter_mut() {
            if let Some(site) = slot {
                if site.stopped_after_its_studies_ended() {
                    *slot = None;
                } else {
                    site.assert_running();
                }
            }
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `<bin> audit verify --log <log>` succeeds when the log exists (the hash chain is intact
/// after the kill).
fn assert_audit_verifies(bin: &Path, log: &Path, when: &str) {
    if !log.exists() {
        return;
    }
    let out = Command::new(bin)
        .args(["audit", "verify", "--log", path_str(log)])
        .output()
        .expect("run audit verify");
    assert!(
        out.status.success(),
        "{when}: audit log {} does not verify: {}{}",
        log.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A restarted site still holds every spend it had recorded, unchanged.
fn assert_kept(before: &[SpendRow], now: &[SpendRow], site: &str, when: &str) {
    for s in before {
        assert!(
            now.contains(s),
            "{when}: site {site} lost or changed its spend for round {}",
            s.round
        );
    }
}

/// A damaged state database stops `run` with an error naming the file, and is left
/// exactly as it was: the budget is never silently reset.
#[test]
fn a_corrupt_state_database_is_a_clear_error_and_is_left_alone() {
    let coordinator_bin = binary("fedpriv-coordinator");
    let fx = fixture(&DemoOptions {
        rounds: 2,
        ..DemoOptions::default()
    });
    let _logs = fx.logs();
    let db = fx.db();
    std::fs::create_dir_all(&fx.state_dir).expect("state folder");

    // Garbage, a database truncated to nothing, and a real database with a damaged page.
    let mut rng = SplitMix64(7);
    let garbage: Vec<u8> = (0..8192).map(|_| rng.next_u64() as u8).collect();
    let damaged = {
        let scratch = fx.state_dir.join("scratch.db");
        let mut store = Store::open(&scratch).expect("create a store");
        store
            .create_study(&fx.study, "x", &SITES.map(String::from), 1)
            .expect("create a study");
        drop(store);
        let mut bytes = std::fs::read(&scratch).expect("read the store");
        assert!(bytes.len() >= 4096 * 3, "{} bytes", bytes.len());
        // Page 2 onwards: table b-tree pages; overwrite one in the middle.
        for b in &mut bytes[4096 + 8..4096 + 600] {
            *b = 0xA5;
        }
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", scratch.display()));
        }
        bytes
    };
    for (what, bytes, expect) in [
        ("garbage", garbage, "not a SQLite database"),
        ("empty", Vec::new(), "empty"),
        ("damaged", damaged, "damaged"),
    ] {
        write(&db, &bytes);
        let mut coordinator = fx.start_coordinator(&coordinator_bin);
        let status = coordinator
            .wait_for_exit(Duration::from_secs(20))
            .unwrap_or_else(|| {
                panic!("{what}: the coordinator kept running over a corrupt database")
            });
        assert!(!status.success(), "{what}: exit status {status}");
        let log = std::fs::read_to_string(&fx.coordinator_log).expect("coordinator log");
        // The binary's own error line (the problem's text may span lines).
        let last = log.rfind("error: ").map_or("", |at| &log[at..]);
        assert!(
            last.contains(path_str(&db)) && last.contains(expect),
            "{what}: the error does not name the file and the problem: {last}"
        );
        assert!(
            last.contains("backup") || last.contains("remove it"),
            "{what}: no recovery hint: {last}"
        );
        assert_eq!(
            std::fs::read(&db).expect("the database is still there"),
            bytes,
            "{what}: the database was changed"
        );
        std::fs::remove_file(fx.state_dir.join("coordinator.db-wal")).ok();
        std::fs::remove_file(fx.state_dir.join("coordinator.db-shm")).ok();
        drop(File::create(&fx.coordinator_log).expect("truncate the log"));
    }
}
