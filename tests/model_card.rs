//! A model from a real federation describes itself, and using it with the card's
//! preprocessing (`model evaluate`'s code) scores exactly as the federation scored it.

use fedpriv::demo::{self, DemoOptions};
use fedpriv_common::model_card::ModelCard;
use fedpriv_coordinator::server;
use fedpriv_coordinator::store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federations_model_carries_its_card_and_scores_the_same_from_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 2,
        epsilon: 2.0,
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

    // The last checkpoint, decrypted as `model export` does.
    let study = fed.study_id().to_string();
    let store = Store::open(fed.state_dir.join("coordinator.db")).expect("store");
    let (round, ..) = store
        .last_completed_round(&study)
        .expect("query")
        .expect("a completed round");
    let key = fedpriv_coordinator::at_rest::load_key_from(Some(&fed.at_rest_key_file), None)
        .expect("key");
    let mut plain = Vec::new();
    server::read_checkpoint(
        &key,
        &server::model_path(&fed.state_dir, &study, round),
        &study,
        round,
        None,
        &mut plain,
    )
    .expect("decrypts");
    let card = ModelCard::from_safetensors(&plain).expect("the model has a card");
    assert_eq!((card.study.as_str(), card.round), (study.as_str(), round));
    let epsilon = rounds.last().expect("rounds").epsilon;
    assert!(
        (card.epsilon - epsilon).abs() < 1e-9,
        "{} vs {epsilon}",
        card.epsilon
    );
    assert_eq!(card.delta, opts.delta);
    assert_eq!(
        card.data.features,
        demo::split(&opts).expect("split").features
    );

    // Scored from a file with the card alone: the federation's own figure.
    let file = dir.path().join("model.safetensors");
    std::fs::write(&file, &plain).expect("write");
    let released = fedpriv_client::inference::load_model(&file).expect("loads");
    let test_csv = dir.path().join("test.csv");
    let split = demo::split(&opts).expect("split");
    // The held-out rows as a hospital holds them: unscaled, the card scales them.
    let (all, ..) = demo::load(opts.data, None).expect("load");
    let (_, raw_test) =
        fedpriv_client::data::train_test_split(&all, 0.2, opts.seed).expect("same split");
    fedpriv_client::data::write_csv(&raw_test, &test_csv).expect("write test set");
    let e = fedpriv_client::inference::evaluate(&released, &test_csv).expect("evaluates");
    let want = fed.score(&released.model.values).expect("score");
    assert_eq!(e.records, split.test.n);
    assert_eq!(e.accuracy, want.accuracy);
    assert!(e.auroc.is_some_and(|a| (0.5..=1.0).contains(&a)), "{e:?}");

    // The site tests the released model against its own patients: its shard are the
    // members, the held-out rows split between reference training and non-members.
    let site = &fed.site_configs()[0];
    let mut log = fedpriv_client::leakage::open_log(site).expect("the daemon has stopped");
    let opts = fedpriv_client::leakage::LeakageOptions {
        references: 4,
        seed: 3,
        ..Default::default()
    };
    let report = fedpriv_client::leakage::run(site, &study, &released, &test_csv, &opts)
        .expect("leakage test");
    assert_eq!(report.members, split.shards[0].n);
    assert_eq!(report.non_members + report.reference_records, raw_test.n);
    // This site's own epsilon, which the coordinator's figure never undercuts.
    let own = report.epsilon.expect("the site paid for rounds");
    assert!(
        own > 0.0 && own <= card.epsilon + 1e-9,
        "{own} vs {}",
        card.epsilon
    );
    assert_eq!(report.attacks.len(), 2);
    for a in &report.attacks {
        assert!((0.0..=1.0).contains(&a.auc), "{a:?}");
        let most = a.max_auc_under_dp.expect("a bound");
        assert!(most > 0.5 && most < 1.0, "{a:?}");
        // Under 1,000 non-members neither rate can be measured, and none is made up.
        assert!(a
            .rates
            .iter()
            .all(|r| r.tpr.is_none() && r.max_tpr_under_dp.is_some()));
    }
    fedpriv_client::leakage::record(&mut log, site, &report, &file).expect("recorded");
    drop(log);
    let text = std::fs::read_to_string(fedpriv_client::daemon::audit_path(site)).expect("log");
    let last = text.lines().last().expect("a record");
    assert!(
        last.contains("leakage_tested") && last.contains("offline_lira"),
        "{last}"
    );
}
