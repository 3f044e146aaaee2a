//! The privacy audit on the site's real DP-SGD code: an honest mechanism is never caught
//! (several runs, each at confidence 1 - 0.05 / runs), and, in a build whose noise is
//! scaled down (`--features audit-weak-noise`, tests only), the audit catches it.

use fedpriv_client::privacy_audit::{self, AuditError, AuditOptions};
use fedpriv_common::config::StudyConfig;

/// A record-unit MLP study with more parameters than canaries (one coordinate each):
/// q = 30 / 1000, sigma 2, 2 rounds of 50 steps; the accountant says epsilon ~ 1.
fn record_study() -> StudyConfig {
    StudyConfig::from_toml(
        r#"
[study]
id = "audit"
model = { kind = "mlp", hidden = 48 }
rounds = 2
min_sites = 1
round_timeout_secs = 60

[data]
task = "binary"
label = "y"
features = ["x0..x19"]
default_range = [-1.0, 1.0]

[training]
strategy = "fedavg"
local_steps = 50
expected_batch = 30.0
learning_rate = 0.5
server_learning_rate = 1.0

[privacy]
unit = "record"
clip_norm = 1.0
noise_multiplier = 2.0
epsilon = 10.0
delta = 1e-5
accountant = "pld"

[sites]
enrolled = ["a"]
"#,
    )
    .expect("study")
}

fn site_study(placement: &str, sigma: f64) -> StudyConfig {
    StudyConfig::from_toml(&format!(
        r#"
[study]
id = "audit-site"
model = {{ kind = "mlp", hidden = 48 }}
rounds = 10
min_sites = 1
round_timeout_secs = 60

[data]
task = "binary"
label = "y"
features = ["x0..x19"]
default_range = [-1.0, 1.0]

[training]
strategy = "fedavg"
local_epochs = 1
batch_size = 16
learning_rate = 0.5
server_learning_rate = 1.0

[privacy]
unit = "site"
placement = "{placement}"
clip_norm = 1.0
noise_multiplier = {sigma}
epsilon = 10.0
delta = 1e-5
accountant = "pld"

[sites]
enrolled = ["a"]
"#
    ))
    .expect("study")
}

fn opts(seed: u64, confidence: f64) -> AuditOptions {
    AuditOptions {
        canaries: 1000,
        seed: Some(seed),
        records: Some(1000),
        confidence,
        guesses: None,
    }
}

#[cfg(not(feature = "audit-weak-noise"))]
#[test]
fn an_honest_record_level_mechanism_is_never_caught() {
    let study = record_study();
    const RUNS: u64 = 3;
    for seed in 0..RUNS {
        let r = privacy_audit::run(&study, &opts(seed, 1.0 - 0.05 / RUNS as f64)).expect("audit");
        assert!(
            (0.3..3.0).contains(&r.epsilon_claimed),
            "claim {}",
            r.epsilon_claimed
        );
        assert_eq!(
            r.canary_directions,
            privacy_audit::CanaryDirections::Coordinate
        );
        assert_eq!((r.canaries, r.guesses), (1000, 200));
        assert_eq!(r.steps, 100);
        assert!((r.q - 0.03).abs() < 1e-12);
        assert!(!r.failed(), "seed {seed}: {r:?}");
        // (At a claim under 1 the honest white-box guesses may sit at chance; the audit's
        // power is what the weak-noise build's tests check.)
        assert!(r.black_box.is_some());
    }
}

#[cfg(not(feature = "audit-weak-noise"))]
#[test]
fn honest_site_level_mechanisms_are_never_caught_under_either_placement() {
    for placement in ["central", "local"] {
        let study = site_study(placement, 6.0);
        const RUNS: u64 = 2;
        for seed in 0..RUNS {
            let mut o = opts(seed, 1.0 - 0.05 / RUNS as f64);
            o.records = None;
            let r = privacy_audit::run(&study, &o).expect("audit");
            assert_eq!((r.q, r.steps), (1.0, 10));
            assert!(r.black_box.is_none());
            assert!(!r.failed(), "{placement} seed {seed}: {r:?}");
            assert!(r.correct_guesses > 100, "{placement}: {r:?}");
        }
    }
}

#[test]
fn requests_that_do_not_fit_the_study_are_refused() {
    let study = record_study();
    let mut o = opts(1, 0.95);
    o.records = None;
    assert!(matches!(
        privacy_audit::run(&study, &o),
        Err(AuditError::Request(m)) if m.contains("--records")
    ));
    let mut o = opts(1, 0.95);
    o.canaries = 1;
    assert!(matches!(
        privacy_audit::run(&study, &o),
        Err(AuditError::Request(_))
    ));
    let mut o = opts(1, 0.95);
    o.guesses = Some((900, 200));
    assert!(matches!(
        privacy_audit::run(&study, &o),
        Err(AuditError::Request(_))
    ));
    // Fewer records than the expected batch: no q the site would accept.
    let mut o = opts(1, 0.95);
    o.records = Some(10);
    assert!(matches!(
        privacy_audit::run(&study, &o),
        Err(AuditError::Request(_))
    ));
}

/// With the noise scaled down the accountant's claim is false, and the audit says so.
#[cfg(feature = "audit-weak-noise")]
#[test]
fn a_mechanism_with_too_little_noise_is_caught() {
    let r = privacy_audit::run(&record_study(), &opts(7, 0.95)).expect("audit");
    assert!(r.epsilon_claimed <= 2.0, "claim {}", r.epsilon_claimed);
    assert!(r.failed(), "{r:?}");
    assert!(r.epsilon_lower_bound > r.epsilon_claimed, "{r:?}");
    let r = privacy_audit::run(&site_study("central", 6.0), &{
        let mut o = opts(7, 0.95);
        o.records = None;
        o
    })
    .expect("audit");
    // Site-level noise is added by the audit's own stand-in for the coordinator, not by
    // the DP-SGD code the feature weakens: it stays honest.
    assert!(!r.failed(), "{r:?}");
}

/// A weakened build cannot be used as a site daemon by mistake.
#[cfg(feature = "audit-weak-noise")]
#[tokio::test]
async fn a_weakened_build_refuses_to_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = fedpriv_client::config::SiteConfig::from_toml(
        &fedpriv_client::config::SiteSetup {
            name: "a",
            coordinator: "127.0.0.1:9".parse().expect("addr"),
            ca: std::path::Path::new("ca.pem"),
            cert: std::path::Path::new("site.pem"),
            key: std::path::Path::new("site.key"),
            data: std::path::Path::new("data.csv"),
            records: 1000,
            source_delta: 1e-5,
            source_cap: 10.0,
        }
        .toml(&[(&record_study(), 5.0)]),
        dir.path(),
    )
    .expect("site config");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = fedpriv_client::daemon::run(cfg, rx)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("audit-weak-noise"), "{err}");
}

/// Site unit, local noise: the site's own noising code, weakened, is caught too.
#[cfg(feature = "audit-weak-noise")]
#[test]
fn a_site_that_noises_its_delta_too_little_is_caught() {
    let study = site_study("local", 20.0);
    let mut o = opts(3, 0.95);
    o.records = None;
    let r = privacy_audit::run(&study, &o).expect("audit");
    assert!(r.epsilon_claimed <= 2.0, "claim {}", r.epsilon_claimed);
    assert!(r.failed(), "{r:?}");
}
