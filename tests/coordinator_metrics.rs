//! The coordinator's Prometheus endpoint after real rounds: a coordinator and two real site
//! daemons over loopback QUIC run a record-level study and a central-placement study to
//! their end; a scraper then reads `/metrics` over HTTP (as `run --metrics-listen` serves
//! it) and every privacy figure must be the accountant's over the ledger's spends, with no
//! per-site figure for the central study, and one round duration per completed round. A
//! restarted coordinator shows the same figures, from the ledger alone.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedpriv_common::config::StudyConfig;
use fedpriv_common::dp::accountant;
use fedpriv_common::pki::Role;
use fedpriv_common::seal::SealKey;
use fedpriv_common::test_util::StudyBuilder as Study;
use fedpriv_coordinator::limits::Limits;
use fedpriv_coordinator::metrics::Metrics;
use fedpriv_coordinator::pki_cli;
use fedpriv_coordinator::server::{self, Notification, Options};
use fedpriv_coordinator::store::{RoundStatus, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

#[path = "support/pki_files.rs"]
mod pki_files;

const SITES: [&str; 2] = ["site-a", "site-b"];
const ROUNDS: u64 = 3;

fn studies() -> Vec<String> {
    let base = |id: &str| {
        Study::new(id)
            .named_features(&[("a", 0.0, 1.0), ("b", -1.0, 1.0)])
            .rounds(ROUNDS)
            .min_sites(2)
            .round_timeout_secs(30)
            .accountant(None)
            .enrolled(SITES)
    };
    vec![
        base("rec").record_unit(2, 8.0).noise(2.0, 6.0).toml(),
        base("cen").placement("central").noise(8.0, 6.0).toml(),
    ]
}

struct Coordinator {
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<Result<(), server::ServerError>>,
    notes: mpsc::UnboundedReceiver<Notification>,
    metrics: Metrics,
    addr: std::net::SocketAddr,
    scrape: std::net::SocketAddr,
}

async fn start(root: &Path, studies: &[String]) -> Coordinator {
    let tls = pki_files::server_tls(root, &[]);
    let opts = Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: root.join("state"),
        tls,
        studies: studies
            .iter()
            .map(|t| (StudyConfig::from_toml(t).unwrap(), t.clone()))
            .collect(),
        max_concurrent_uploads: 2,
        at_rest_key: Arc::new(SealKey::from_bytes(&[7; 32]).unwrap()),
    };
    let (stop, stop_rx) = watch::channel(false);
    let (tx, notes) = mpsc::unbounded_channel();
    let running = server::start(opts, Limits::default(), stop_rx.clone(), Some(tx), false)
        .await
        .unwrap();
    // As `run --metrics-listen 127.0.0.1:0` serves it.
    let listener = fedpriv_client::metrics_http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let scrape = listener.local_addr().unwrap();
    let m = running.metrics.clone();
    tokio::spawn(fedpriv_client::metrics_http::serve(
        listener,
        move || m.render(),
        stop_rx,
    ));
    Coordinator {
        stop,
        addr: running.addr,
        metrics: running.metrics.clone(),
        join: tokio::spawn(running.finished()),
        notes,
        scrape,
    }
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    reply.split("\r\n\r\n").nth(1).unwrap().to_string()
}

/// `name{labels}` -> value, for every sample of the text format.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse::<f64>().unwrap())
        })
        .collect()
}

/// Each site's epsilon in `study` by the accountant over the ledger's spends.
fn ledger_epsilons(state: &Path, study: &str) -> BTreeMap<String, f64> {
    let store = Store::open_read_only(state.join("coordinator.db")).unwrap();
    let cfg = StudyConfig::from_toml(&store.study(study).unwrap().unwrap().config_toml).unwrap();
    store
        .spent_by_site(study)
        .unwrap()
        .into_iter()
        .map(|(site, events)| {
            assert!(!events.is_empty(), "{site} never paid in {study}");
            let eps =
                accountant::epsilon(cfg.privacy.accountant, &events, cfg.privacy.delta).unwrap();
            (site, eps)
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// The privacy figures of both studies, as the ledger gives them.
fn check_privacy(m: &BTreeMap<String, f64>, state: &Path, text: &str) {
    for (study, per_site) in [("rec", true), ("cen", false)] {
        let eps = ledger_epsilons(state, study);
        let worst = eps.values().copied().fold(0.0, f64::max);
        assert!(worst > 0.0);
        let get = |name: &str| {
            *m.get(&format!("{name}{{study=\"{study}\"}}"))
                .unwrap_or_else(|| panic!("no {name} for {study} in\n{text}"))
        };
        assert!(close(get("fedpriv_study_epsilon_spent"), worst), "{study}");
        assert_eq!(get("fedpriv_study_epsilon_budget"), 6.0);
        assert!(
            close(get("fedpriv_study_epsilon_left"), 6.0 - worst),
            "{study}"
        );
        for (site, e) in &eps {
            let key =
                format!("fedpriv_study_site_epsilon_spent{{study=\"{study}\",site=\"{site}\"}}");
            match m.get(&key) {
                Some(v) if per_site => assert!(close(*v, *e), "{key}: {v} vs ledger {e}"),
                None if per_site => panic!("no {key} in\n{text}"),
                Some(_) => panic!("{key}: a central study's per-site figure is shown"),
                None => {}
            }
        }
    }
    assert!(
        !text.contains("site_epsilon_spent{study=\"cen\""),
        "central per-site figures:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scraper_reads_epsilon_budget_and_round_durations_after_real_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sites: Vec<(Role, &str)> = SITES.iter().map(|s| (Role::Site, *s)).collect();
    pki_files::make(root, "metrics test CA", &sites);
    let tomls = studies();
    let mut coord = start(root, &tomls).await;

    // Two real site daemons, each pinning both studies' terms.
    let cfgs: Vec<StudyConfig> = tomls
        .iter()
        .map(|t| StudyConfig::from_toml(t).unwrap())
        .collect();
    let (site_stop, _) = watch::channel(false);
    let mut daemons = Vec::new();
    for name in SITES {
        let site_dir = root.join(name);
        std::fs::create_dir_all(&site_dir).unwrap();
        let mut csv = String::from("a,b,y\n");
        for i in 0..40 {
            let x = i as f32 / 40.0;
            csv.push_str(&format!("{x},{},{}\n", 0.5 - x, i % 2));
        }
        std::fs::write(site_dir.join("patients.csv"), csv).unwrap();
        let issued = root.join("issued");
        let toml = fedpriv_client::config::SiteSetup {
            name,
            coordinator: coord.addr,
            ca: &root.join("ca").join(pki_cli::CA_CERT),
            cert: &issued.join(format!("{name}.pem")),
            key: &issued.join(format!("{name}.key")),
            data: Path::new("patients.csv"),
            records: 40,
            source_delta: 1e-5,
            source_cap: 100.0,
        }
        .toml(&cfgs.iter().map(|c| (c, 50.0)).collect::<Vec<_>>());
        std::fs::write(site_dir.join("site.toml"), toml).unwrap();
        let cfg = fedpriv_client::config::SiteConfig::load(&site_dir.join("site.toml")).unwrap();
        daemons.push(tokio::spawn(fedpriv_client::daemon::run(
            cfg,
            site_stop.subscribe(),
        )));
    }

    // Until both studies end.
    let mut completed: BTreeMap<String, u64> = BTreeMap::new();
    let mut ended = Vec::new();
    while ended.len() < 2 {
        let note = tokio::time::timeout(Duration::from_secs(120), coord.notes.recv())
            .await
            .expect("no progress for 2 minutes")
            .expect("the coordinator stopped");
        match note {
            Notification::RoundCompleted { study, .. } => *completed.entry(study).or_default() += 1,
            Notification::StudyEnded { study, reason, .. } => ended.push((study, reason)),
            _ => {}
        }
    }
    for study in ["rec", "cen"] {
        assert_eq!(completed.get(study), Some(&ROUNDS), "{study}: {ended:?}");
    }

    // Scraped while it runs.
    let text = scrape(coord.scrape).await;
    let m = samples(&text);
    let state = root.join("state");
    check_privacy(&m, &state, &text);
    assert!(text.contains("# TYPE fedpriv_round_duration_seconds histogram\n"));
    let store = Store::open_read_only(state.join("coordinator.db")).unwrap();
    for study in ["rec", "cen"] {
        let rounds = store.rounds(study).unwrap();
        let done = rounds
            .iter()
            .filter(|r| r.status == RoundStatus::Completed)
            .count() as f64;
        let l = format!("study=\"{study}\",outcome=\"completed\"");
        let count = m[&format!("fedpriv_round_duration_seconds_count{{{l}}}")];
        assert_eq!(count, done, "{study}: one duration per completed round");
        assert_eq!(
            m[&format!("fedpriv_round_duration_seconds_bucket{{{l},le=\"+Inf\"}}")],
            count
        );
        let sum = m[&format!("fedpriv_round_duration_seconds_sum{{{l}}}")];
        assert!(sum > 0.0 && sum < 3.0 * 30.0, "{study}: {sum} s");
        // Cumulative buckets, in order of their bounds.
        let buckets: Vec<f64> = text
            .lines()
            .filter(|x| x.starts_with(&format!("fedpriv_round_duration_seconds_bucket{{{l},")))
            .map(|x| x.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(
            buckets.len(),
            fedpriv_coordinator::metrics::ROUND_DURATION_BUCKETS.len() + 1
        );
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    }

    let _ = site_stop.send(true);
    for d in daemons {
        tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let _ = coord.stop.send(true);
    coord.join.await.unwrap().unwrap();

    // Restarted over the same state (the studies have ended): the same figures, from the
    // ledger alone; no round ran in this process, so no duration.
    let coord = start(root, &[]).await;
    let text = scrape(coord.scrape).await;
    check_privacy(&samples(&text), &state, &text);
    assert!(!text.contains("fedpriv_round_duration_seconds"), "{text}");
    assert_eq!(
        coord.metrics.study_epsilon("rec"),
        ledger_epsilons(&state, "rec")
            .values()
            .copied()
            .reduce(f64::max)
    );
    let _ = coord.stop.send(true);
    coord.join.await.unwrap().unwrap();
}
