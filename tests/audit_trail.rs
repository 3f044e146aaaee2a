//! The coordinator's audit trail over a real federation (loopback QUIC, real certificates,
//! the three demo site daemons): every event the issue names is on record, in an order that
//! shows each action was recorded before it took effect, the chain verifies, and a tampered
//! log stops the coordinator from starting instead of being extended.

use std::collections::BTreeMap;

use fedpriv::demo::{self, DemoOptions, SITES};
use fedpriv_common::audit::{decode_line, AuditRecord};
use fedpriv_common::audit_file::verify_file;
use fedpriv_coordinator::store::Store;

fn records(path: &std::path::Path) -> Vec<AuditRecord> {
    std::fs::read_to_string(path)
        .expect("audit log")
        .lines()
        .map(|l| decode_line(l).expect("a record"))
        .collect()
}

fn of<'a>(recs: &'a [AuditRecord], event: &str) -> Vec<&'a AuditRecord> {
    recs.iter().filter(|r| r.event.as_str() == event).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_leaves_a_complete_ordered_verifiable_trail_and_tampering_stops_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 3,
        epsilon: 2.0,
        non_iid: false,
        ..DemoOptions::default()
    };
    let mut fed = demo::Federation::prepare(dir.path(), &opts).expect("prepare");
    let mut coord = fed.start_coordinator();
    fed.start_sites();
    let mut rounds = Vec::new();
    fed.follow(&mut coord, &mut rounds, |_| {})
        .await
        .expect("study runs");
    fed.stop_sites().await.expect("sites stop");
    coord.stop().await.expect("coordinator stops");
    assert!(!rounds.is_empty());

    let log = fed.state_dir.join("audit.log");
    let report = verify_file(&log).expect("verify");
    assert!(report.is_ok(), "{report}");
    let recs = records(&log);
    let study = fed.study_id().to_string();

    // Start: service, the study's configuration and its creation, in that order.
    let names: Vec<&str> = recs.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(
        &names[..3],
        ["service_started", "config_loaded", "study_created"],
        "{names:?}"
    );
    assert_eq!(recs[2].details["study"], study.as_str());
    assert_eq!(names.last(), Some(&"service_stopped"));

    // Every site's connection is on record with its certificate identity.
    for site in SITES {
        assert!(
            of(&recs, "connection_accepted")
                .iter()
                .any(|r| r.actor == format!("site/{site}")),
            "no connection record for {site}"
        );
    }

    // Per round: every spend, then the round's start, before any update of that round
    // arrives; the round's finish (with the model's digest the store holds) after them.
    let store = Store::open(fed.state_dir.join("coordinator.db")).expect("store");
    let spent = store.spent_by_site(&study).expect("ledger");
    let pos = |event: &str, round: u64| -> Vec<usize> {
        recs.iter()
            .enumerate()
            .filter(|(_, r)| r.event.as_str() == event && r.details["round"] == round)
            .map(|(i, _)| i)
            .collect()
    };
    let completed: Vec<u64> = rounds.iter().map(|r| r.round).collect();
    let mut spends_per_site: BTreeMap<String, usize> = BTreeMap::new();
    for r in of(&recs, "budget_spent") {
        *spends_per_site
            .entry(r.details["site"].as_str().expect("site").to_string())
            .or_default() += 1;
    }
    for (site, events) in &spent {
        assert_eq!(
            spends_per_site.get(site).copied().unwrap_or(0),
            events.len(),
            "{site}: audit and ledger disagree on the rounds paid for"
        );
    }
    for &round in &completed {
        let spends = pos("budget_spent", round);
        let started = pos("round_started", round);
        let updates = pos("update_received", round);
        let finished = pos("round_finished", round);
        assert!(!spends.is_empty() && started.len() == 1 && finished.len() == 1);
        assert!(!updates.is_empty(), "round {round}: no update on record");
        let last_spend = *spends.iter().max().expect("spend");
        assert!(last_spend < started[0] && started[0] < updates[0]);
        assert!(*updates.iter().max().expect("update") < finished[0]);
        let fin = &recs[finished[0]];
        assert_eq!(fin.details["outcome"], "completed");
        for u in updates {
            let d = &recs[u].details;
            assert!(d["bytes"].as_u64().expect("bytes") > 0);
            assert!(d["norm"].as_f64().expect("norm").is_finite());
        }
    }
    let (last_round, _, sha) = store
        .last_completed_round(&study)
        .expect("read")
        .expect("a model version");
    let fin = &recs[pos("round_finished", last_round)[0]];
    assert_eq!(fin.details["sha256"], sha.as_str());

    // The near-budget alert is on record, once, exactly when the worst site's epsilon
    // reached 90% of the budget (a site that joined late may keep the study below it).
    let alerts: Vec<_> = of(&recs, "alert")
        .into_iter()
        .filter(|r| r.details["kind"] == "budget_near_limit")
        .collect();
    let worst = of(&recs, "budget_spent")
        .iter()
        .map(|r| r.details["epsilon"].as_f64().expect("epsilon"))
        .fold(0.0, f64::max);
    let expected = usize::from(worst >= 0.9 * opts.epsilon);
    assert_eq!(alerts.len(), expected, "worst {worst}: {names:?}");
    if let Some(a) = alerts.first() {
        assert_eq!(a.details["subject"], study.as_str());
    }

    // The counters the monitoring scrapes.
    let prom = std::fs::read_to_string(fed.state_dir.join("metrics.prom")).expect("metrics");
    assert!(
        prom.contains(&format!(
            "fedpriv_rounds_completed_total{{study=\"{study}\"}} {}",
            completed.len()
        )),
        "{prom}"
    );

    // A lost ledger is never recreated silently: with the audit log and models still
    // there, a start without the database is refused with the recovery path.
    let db = fed.state_dir.join("coordinator.db");
    let aside = dir.path().join("db-aside");
    std::fs::rename(&db, &aside).expect("move db");
    let coord = fed.start_coordinator();
    let err = coord
        .stop()
        .await
        .expect_err("a missing ledger must stop the start");
    assert!(err.contains("restore the database"), "{err}");
    assert!(!db.exists(), "a fresh ledger was created");
    std::fs::rename(&aside, &db).expect("restore db");

    // Tamper with one record in the middle: the coordinator refuses to start on it, names
    // the log, and appends nothing.
    let text = std::fs::read_to_string(&log).expect("log");
    let tampered = text.replacen("\"outcome\":\"completed\"", "\"outcome\":\"aborted\"", 1);
    assert_ne!(tampered, text);
    std::fs::write(&log, &tampered).expect("tamper");
    let coord = fed.start_coordinator();
    let err = coord
        .stop()
        .await
        .expect_err("a tampered log must stop the start");
    assert!(err.contains("audit log"), "{err}");
    assert_eq!(std::fs::read_to_string(&log).expect("log"), tampered);
    assert!(!verify_file(&log).expect("verify").is_ok());
}
