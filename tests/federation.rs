//! End to end over loopback QUIC with real certificates: a coordinator and three site
//! daemons train on the bundled breast-cancer data; the ledgers on both sides must agree with
//! the accountant and each site's own cap must hold whatever the study's budget.

use fedpriv::demo::{self, DemoOptions, SITES};
use fedpriv_client::store::SiteLedger;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::dp::accountant::{self, AccountantKind};
use fedpriv_common::dp::Delta;
use fedpriv_coordinator::store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_train_and_both_ledgers_match_the_accountant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 8,
        epsilon: 3.0,
        non_iid: false,
        ..DemoOptions::default()
    };
    let report = demo::run(dir.path(), &opts, |_| {})
        .await
        .expect("demo runs");
    assert!(
        report.rounds.len() >= 4,
        "only {} rounds",
        report.rounds.len()
    );
    let first = report.rounds[0].accuracy;
    assert!(
        report.final_accuracy > 0.85,
        "final accuracy {}",
        report.final_accuracy
    );
    assert!(
        report.final_accuracy > first || first > 0.9,
        "accuracy did not rise: {first} -> {}",
        report.final_accuracy
    );

    let store = Store::open(report.state_dir.join("coordinator.db")).expect("store");
    let row = store.study(&report.study_id).expect("read").expect("study");
    let cfg = StudyConfig::from_toml(&row.config_toml).expect("config");
    let spent = store.spent_by_site(&report.study_id).expect("ledger");
    let delta = Delta::new(opts.delta).expect("delta");
    let mut worst = 0.0f64;
    for (site, dir) in SITES.iter().zip(&report.site_state_dirs) {
        let coordinator_events = &spent[*site];
        assert!(!coordinator_events.is_empty(), "{site} never paid");
        let eps =
            accountant::epsilon(cfg.privacy.accountant, coordinator_events, delta).expect("eps");
        assert!(eps <= opts.epsilon + 1e-9, "{site}: {eps}");
        worst = worst.max(eps);
        // The site's own ledger holds exactly what the coordinator charged it.
        let own = SiteLedger::open(dir.join("site-ledger.db")).expect("site ledger");
        assert_eq!(
            &own.events(&report.study_id).expect("events"),
            coordinator_events,
            "{site}"
        );
    }
    let last = report.rounds.last().expect("a round");
    assert!(
        (last.epsilon - worst).abs() < 1e-9,
        "reported {} vs ledger {worst}",
        last.epsilon
    );
    // The ledger's stored display figure agrees with a fresh accountant run over the
    // site's events up to and including that round.
    let rows = store.ledger(&report.study_id).expect("rows");
    assert!(!rows.is_empty());
    for r in &rows {
        let upto: Vec<_> = rows
            .iter()
            .filter(|o| o.site == r.site && o.round <= r.round)
            .map(|o| o.event)
            .collect();
        let fresh = accountant::epsilon(cfg.privacy.accountant, &upto, delta).expect("eps");
        assert!(
            (r.epsilon_after - fresh).abs() <= 1e-9 * fresh.max(1.0),
            "{} round {}: stored {} vs fresh {fresh}",
            r.site,
            r.round,
            r.epsilon_after
        );
        assert!(r.epsilon_after <= opts.epsilon + 1e-9);
    }
}

/// The coordinator charges every round it sends a site before the task leaves, whether or
/// not the site then takes part: for each site, every spend in the site's own ledger is in
/// the coordinator's with the same mechanism, so the coordinator's figure for the site is
/// never below the site's own.
fn coordinator_ledger_is_never_below_the_sites(
    store: &Store,
    study: &str,
    site: &str,
    own: &SiteLedger,
    accountant: AccountantKind,
    delta: Delta,
) {
    let charged: Vec<(u64, fedpriv_common::dp::SgmEvent)> = store
        .ledger(study)
        .expect("coordinator ledger")
        .into_iter()
        .filter(|r| r.site == site)
        .map(|r| (r.round, r.event))
        .collect();
    let paid = own.spends(study).expect("site ledger");
    for p in &paid {
        assert!(
            charged.contains(&(p.round, p.event)),
            "{site} paid round {} that the coordinator did not charge: {charged:?}",
            p.round
        );
    }
    let events = |v: Vec<fedpriv_common::dp::SgmEvent>| {
        accountant::epsilon(accountant, &v, delta).expect("eps")
    };
    let theirs = events(paid.iter().map(|p| p.event).collect());
    let ours = events(charged.iter().map(|c| c.1).collect());
    assert!(
        ours + 1e-12 >= theirs,
        "{site}: coordinator {ours} < site {theirs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sites_own_cap_holds_when_the_study_budget_is_larger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 30,
        epsilon: 4.0,
        site_cap: 1.0,
        non_iid: false,
        ..DemoOptions::default()
    };
    let report = demo::run(dir.path(), &opts, |_| {})
        .await
        .expect("demo runs");
    let delta = Delta::new(opts.delta).expect("delta");
    let store = Store::open(report.state_dir.join("coordinator.db")).expect("store");
    let row = store.study(&report.study_id).expect("read").expect("study");
    let cfg = StudyConfig::from_toml(&row.config_toml).expect("config");
    for (site, dir) in SITES.iter().zip(&report.site_state_dirs) {
        let own = SiteLedger::open(dir.join("site-ledger.db")).expect("site ledger");
        coordinator_ledger_is_never_below_the_sites(
            &store,
            &report.study_id,
            site,
            &own,
            cfg.privacy.accountant,
            delta,
        );
        let eps = accountant::epsilon(
            AccountantKind::Pld,
            &own.events(&report.study_id).expect("events"),
            delta,
        )
        .expect("eps");
        assert!(eps <= 1.0 + 1e-9, "{site} spent {eps} of its own cap 1.0");
        assert!(eps > 0.0, "{site} never took part");
    }
    // The coordinator charged rounds the sites refused: its ledger is never below theirs,
    // and the study ended because the sites retired, not because its own budget ran out.
    assert!(
        report.end_reason.contains("budget exhausted"),
        "{}",
        report.end_reason
    );
    assert!(report.rounds.last().map(|r| r.epsilon).unwrap_or(0.0) < 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_and_sites_reconnect() {
    use fedpriv::demo::Federation;
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 8,
        epsilon: 3.0,
        non_iid: false,
        ..DemoOptions::default()
    };
    let mut fed = Federation::prepare(dir.path(), &opts).expect("prepare");
    let mut first = fed.start_coordinator();
    fed.start_sites();
    // Run until two rounds are done, then stop the coordinator under the sites' feet.
    let mut completed = Vec::new();
    while completed.len() < 2 {
        match first.notes.recv().await.expect("notification") {
            fedpriv_coordinator::server::Notification::RoundCompleted { round, .. } => {
                completed.push(round)
            }
            fedpriv_coordinator::server::Notification::StudyEnded { reason, .. } => {
                panic!("ended early: {reason}")
            }
            _ => {}
        }
    }
    first.stop().await.expect("clean stop");
    let (spent_before, last_before) = {
        let store = Store::open(fed.state_dir.join("coordinator.db")).expect("store");
        let spent: usize = store
            .spent_by_site(fed.study_id())
            .expect("ledger")
            .values()
            .map(Vec::len)
            .sum();
        let last = store
            .last_completed_round(fed.study_id())
            .expect("read")
            .expect("a completed round")
            .0;
        (spent, last)
    };
    assert!(last_before >= 2);

    let mut second = fed.start_coordinator();
    let mut rounds = Vec::new();
    let reason = fed
        .follow(&mut second, &mut rounds, |_| {})
        .await
        .expect("resumes");
    fed.stop_sites().await.expect("sites stop");
    second.stop().await.expect("clean stop");
    assert!(
        reason.contains("planned rounds") || reason.contains("budget"),
        "{reason}"
    );
    // Numbering continues after the last round the first run reserved; nothing is redone.
    assert!(!rounds.is_empty(), "no round after the restart");
    assert!(
        rounds.iter().all(|r| r.round > last_before),
        "{:?}",
        rounds.iter().map(|r| r.round).collect::<Vec<_>>()
    );
    let store = Store::open(fed.state_dir.join("coordinator.db")).expect("store");
    let spent_after: usize = store
        .spent_by_site(fed.study_id())
        .expect("ledger")
        .values()
        .map(Vec::len)
        .sum();
    assert!(
        spent_after > spent_before,
        "the ledger lost or did not extend spends"
    );
    // The sites' own ledgers never hold a round twice (replays are refused) and agree with
    // the coordinator's for the rounds they did.
    for (site, sdir) in SITES.iter().zip(fed.site_state_dirs()) {
        let own = SiteLedger::open(sdir.join("site-ledger.db")).expect("site ledger");
        let rounds_paid: Vec<u64> = own
            .spends(fed.study_id())
            .expect("spends")
            .iter()
            .map(|r| r.round)
            .collect();
        let mut dedup = rounds_paid.clone();
        dedup.dedup();
        assert_eq!(rounds_paid, dedup, "{site}");
    }
}

/// DP evaluation end to end: every third round each site evaluates the model it was sent on
/// its own held-out records and releases one noised vector; both ledgers carry the
/// evaluation's charge beside the round's training, the coordinator stores what the sum says
/// with its noise scale, and `ledger show` lists the evaluation apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_evaluate_on_held_out_records_and_both_ledgers_carry_it() {
    use fedpriv_common::evaluation::{EvaluationPlan, Layout};
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 7,
        epsilon: 8.0,
        non_iid: false,
        evaluation: Some((3, 2.0, 1.0)),
        ..DemoOptions::default()
    };
    let report = demo::run(dir.path(), &opts, |_| {})
        .await
        .expect("demo runs");
    assert!(
        report.end_reason.contains("all 7 planned rounds"),
        "{}",
        report.end_reason
    );
    let store = Store::open(report.state_dir.join("coordinator.db")).expect("store");
    let row = store.study(&report.study_id).expect("read").expect("study");
    let cfg = StudyConfig::from_toml(&row.config_toml).expect("config");
    let plan: EvaluationPlan = cfg.evaluation.expect("the study has an evaluation plan");
    let delta = Delta::new(opts.delta).expect("delta");

    // Rounds 4 and 7 evaluate the models after rounds 3 and 6, from all three sites.
    let evals = store.evaluations(&report.study_id).expect("evaluations");
    let rounds: Vec<(u64, u64)> = evals.iter().map(|e| (e.round, e.model_round)).collect();
    assert_eq!(rounds, vec![(4, 3), (7, 6)]);
    let layout = Layout::of(&cfg.data);
    let site_sd = plan.noise_sd(&layout);
    for e in &evals {
        assert_eq!(e.sites.len(), 3, "{e:?}");
        assert_eq!(e.sum.len(), layout.len());
        assert!((e.summary.noise_sd - site_sd * 3f64.sqrt()).abs() < 1e-9);
        // About a fifth of the sites' training records are held out; the example count is
        // the sum of four noised confusion cells (6 standard deviations of slack).
        let train_rows: usize = report
            .site_state_dirs
            .iter()
            .map(|d| {
                let csv =
                    std::fs::read_to_string(d.parent().expect("site dir").join("patients.csv"))
                        .expect("site data");
                csv.lines().count() - 1
            })
            .sum();
        let expected = 0.2 * train_rows as f64;
        let slack = 6.0 * (2.0 * e.summary.noise_sd + (expected * 0.8).sqrt());
        assert!(
            (e.summary.examples - expected).abs() < slack,
            "{} held-out examples, expected about {expected}",
            e.summary.examples
        );
    }
    // The model after six rounds classifies well above chance, as far as the noise tells.
    let last = evals.last().expect("an evaluation");
    let acc = last.summary.accuracy.expect("accuracy");
    assert!(acc > 0.5, "noised accuracy {acc}");

    // Both ledgers: the evaluation charges sit beside rounds 4 and 7's training, the site's
    // own ledger holds the same events, and the epsilon composes them all.
    let eval_rows = store.evaluation_ledger(&report.study_id).expect("rows");
    assert_eq!(eval_rows.len(), 6);
    for r in &eval_rows {
        assert!([4, 7].contains(&r.round));
        assert_eq!(r.event, plan.event());
    }
    let spent = store.spent_by_site(&report.study_id).expect("ledger");
    for (site, dir) in SITES.iter().zip(&report.site_state_dirs) {
        let own = SiteLedger::open(dir.join("site-ledger.db")).expect("site ledger");
        let key = |e: &fedpriv_common::dp::SgmEvent| {
            (e.q.get().to_bits(), e.sigma.get().to_bits(), e.steps)
        };
        let mut theirs: Vec<_> = own
            .events(&report.study_id)
            .expect("events")
            .iter()
            .map(key)
            .collect();
        let mut ours: Vec<_> = spent[*site].iter().map(key).collect();
        theirs.sort();
        ours.sort();
        assert_eq!(theirs, ours, "{site}");
        assert_eq!(
            own.evaluation_rounds(&report.study_id).expect("rounds"),
            vec![4, 7]
        );
        let training_only: Vec<_> = store
            .ledger(&report.study_id)
            .expect("rows")
            .into_iter()
            .filter(|r| r.site == *site)
            .map(|r| r.event)
            .collect();
        let with = accountant::epsilon(cfg.privacy.accountant, &spent[*site], delta).expect("eps");
        let without =
            accountant::epsilon(cfg.privacy.accountant, &training_only, delta).expect("eps");
        assert!(
            with > without,
            "{site}: the evaluations cost nothing? {with} vs {without}"
        );
        assert!(with <= opts.epsilon + 1e-9);
    }

    // `ledger show` lists the evaluation charges and results apart from training.
    let v = fedpriv_coordinator::admin::ledger_json(&store, &report.study_id).expect("ledger");
    let text = fedpriv_coordinator::admin::ledger_text(&v);
    eprintln!("{text}");
    assert!(text.contains("evaluation charges"), "{text}");
    assert!(text.contains("DP evaluations"), "{text}");
    assert_eq!(v["evaluations"].as_array().map(Vec::len), Some(2), "{v}");
}

/// `target_epsilon` for a record study, end to end: the coordinator waits for every site's
/// declared size, chooses sigma at the smallest site's sampling rate so the planned rounds
/// fit the target, stores and audits the choice, announces the terms again, and only then
/// charges anyone; every charge is at that sigma and the smallest site ends at the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_calibrates_a_record_study_from_the_sites_declared_sizes() {
    use fedpriv::demo::NoisePlan;
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 3,
        epsilon: 3.0,
        non_iid: true,
        noise: NoisePlan::ByCoordinator,
        ..DemoOptions::default()
    };
    // Stopped after the first round and started again from the same study file (which
    // still says target_epsilon): it resumes with the sigma it chose, and chooses no other.
    let mut fed = demo::Federation::prepare(dir.path(), &opts).expect("prepare");
    let mut first = fed.start_coordinator();
    fed.start_sites();
    loop {
        match first.notes.recv().await.expect("notification") {
            fedpriv_coordinator::server::Notification::RoundCompleted { .. } => break,
            fedpriv_coordinator::server::Notification::StudyEnded { reason, .. } => {
                panic!("ended early: {reason}")
            }
            _ => {}
        }
    }
    first.stop().await.expect("clean stop");
    let mut second = fed.start_coordinator();
    let mut rounds = Vec::new();
    let end_reason = fed
        .follow(&mut second, &mut rounds, |_| {})
        .await
        .expect("the coordinator restarts over its calibrated study and resumes");
    fed.stop_sites().await.expect("sites stop");
    second.stop().await.expect("clean stop");
    assert!(end_reason.contains("all 3 planned rounds"), "{end_reason}");
    assert!(!rounds.is_empty(), "no round after the restart");
    struct Run {
        state_dir: std::path::PathBuf,
        study_id: String,
    }
    let report = Run {
        state_dir: fed.state_dir.clone(),
        study_id: fed.study_id().to_string(),
    };
    let store = Store::open(report.state_dir.join("coordinator.db")).expect("store");
    let row = store.study(&report.study_id).expect("read").expect("study");
    assert!(
        row.config_toml.contains("noise_multiplier"),
        "{}",
        row.config_toml
    );
    assert!(
        !row.config_toml.contains("target_epsilon"),
        "{}",
        row.config_toml
    );
    let cfg = StudyConfig::from_toml(&row.config_toml).expect("config");
    let sigma = cfg.privacy.noise_multiplier;
    let spent = store.spent_by_site(&report.study_id).expect("ledger");
    let delta = Delta::new(opts.delta).expect("delta");
    let mut worst = 0.0f64;
    for events in spent.values() {
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|e| e.sigma == sigma), "{events:?}");
        worst = worst.max(accountant::epsilon(cfg.privacy.accountant, events, delta).expect("eps"));
    }
    // The smallest site spends the target, to the calibration's tolerance, and no more.
    assert!(worst <= 3.0 + 1e-9 && worst > 2.8, "{worst}");
    // The choice and its reason are on the audit record.
    let log = std::fs::read_to_string(report.state_dir.join("audit.log")).expect("audit log");
    let calibrated = log
        .lines()
        .filter(|l| l.contains("study_changed") && l.contains("privacy.noise_multiplier"))
        .count();
    assert_eq!(calibrated, 1, "{log}");
    assert!(log.contains("the smallest"));
}
