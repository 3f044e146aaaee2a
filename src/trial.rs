//! A federation over any study: a throw-away PKI, the real coordinator and one real site
//! daemon per data file, over loopback QUIC; every round's model is scored on a held-out
//! file with the sites' own preprocessing (`fedpriv_client::inference`). For the accuracy
//! experiments beyond the demo's breast-cancer data (multi-class tables, images).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedpriv_client::config::{SiteConfig, SourceFormat};
use fedpriv_client::data::Dataset;
use fedpriv_client::train::{self, Learner, LocalTraining};
use fedpriv_common::config::{DataSpec, StudyConfig};
use fedpriv_common::model::FlatModel;
use fedpriv_coordinator::server::{self, Notification, Options};
use tokio::sync::{mpsc, watch};

type R<T> = Result<T, String>;

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One site's data: a file the site reads as `format` (image paths relative to `root`).
#[derive(Debug, Clone)]
pub struct SiteData {
    pub name: String,
    pub path: PathBuf,
    pub format: SourceFormat,
    pub root: Option<PathBuf>,
    /// The record count the site declares.
    pub records: u64,
}

/// What one round's model scored on the held-out file.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialRound {
    pub round: u64,
    pub sites: usize,
    pub epsilon: f64,
    pub accuracy: Option<f64>,
    pub rmse: Option<f64>,
}

/// How a trial went.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialReport {
    pub rounds: Vec<TrialRound>,
    pub end_reason: String,
}

impl TrialReport {
    /// The last round's accuracy (NaN without rounds).
    pub fn final_accuracy(&self) -> f64 {
        self.rounds
            .last()
            .and_then(|r| r.accuracy)
            .unwrap_or(f64::NAN)
    }
}

/// Loads a held-out file with the sites' preprocessing for `data`.
pub fn load_eval(data: &DataSpec, path: &Path) -> R<Dataset> {
    fedpriv_client::inference::load_data(data, path, true).map(|(d, _)| d)
}

fn score(learner: &Learner, model: FlatModel, test: &Dataset) -> R<(Option<f64>, Option<f64>)> {
    let m = train::evaluate(learner, &model, test).map_err(s)?;
    Ok((m.accuracy, m.rmse))
}

/// Runs `study_toml` with one site per entry of `sites` (their names must be the study's
/// enrolled sites) under `root`; scores every round on `test`.
pub async fn run(root: &Path, study_toml: &str, sites: &[SiteData], test: &Path) -> R<TrialReport> {
    let study = StudyConfig::from_toml(study_toml).map_err(|e| format!("study: {e}"))?;
    let learner = Learner::for_data(&study.model, &study.data).map_err(s)?;
    let test = load_eval(&study.data, test)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::demo::free_port()?));
    let names: Vec<&str> = sites.iter().map(|site| site.name.as_str()).collect();
    let tls = crate::demo::loopback_pki(root, &names, addr, "fedpriv trial CA")?;
    let mut configs = Vec::new();
    for site in sites {
        let dir = root.join(&site.name);
        let mut toml = fedpriv_client::config::SiteSetup {
            name: &site.name,
            coordinator: addr,
            ca: Path::new("ca.pem"),
            cert: Path::new("site.pem"),
            key: Path::new("site.key"),
            data: &site.path,
            records: site.records,
            source_delta: study.privacy.delta.get(),
            source_cap: 1e6,
        }
        .toml(&[(&study, 1e6)]);
        let format = match site.format {
            SourceFormat::Csv => "csv",
            SourceFormat::Parquet => "parquet",
            SourceFormat::Npy => "npy",
            SourceFormat::Images => "images",
        };
        let mut extra = format!("format = \"{format}\"\n");
        if let Some(r) = &site.root {
            extra.push_str(&format!(
                "root = {}\n",
                toml::Value::String(r.display().to_string())
            ));
        }
        toml = toml.replacen("[studies.", &format!("{extra}\n[studies."), 1);
        std::fs::write(dir.join("site.toml"), &toml).map_err(s)?;
        configs.push(SiteConfig::load(&dir.join("site.toml")).map_err(|e| format!("{e}\n{toml}"))?);
    }
    let key_file = root.join("at-rest.key");
    fedpriv_coordinator::at_rest::write_new_key_file(&key_file).map_err(s)?;
    let key = fedpriv_coordinator::at_rest::load_key_from(Some(&key_file), None).map_err(s)?;
    let (stop, stop_rx) = watch::channel(false);
    let (note_tx, mut notes) = mpsc::unbounded_channel();
    let opts = Options {
        listen: addr,
        state_dir: root.join("coordinator"),
        tls,
        studies: vec![(study.clone(), study_toml.to_string())],
        max_concurrent_uploads: 2,
        at_rest_key: Arc::new(key),
    };
    let coordinator = tokio::spawn(server::run(opts, stop_rx, Some(note_tx), false));
    let (site_stop, _) = watch::channel(false);
    let daemons: Vec<_> = configs
        .into_iter()
        .map(|c| tokio::spawn(fedpriv_client::daemon::run(c, site_stop.subscribe())))
        .collect();
    let mut rounds = Vec::new();
    let end_reason = loop {
        let note = tokio::time::timeout(Duration::from_secs(600), notes.recv())
            .await
            .map_err(|_| "no progress for 10 minutes".to_string())?;
        match note {
            Some(Notification::RoundCompleted {
                round,
                model,
                contributors,
                epsilon,
                ..
            }) => {
                let m = FlatModel::new(learner.spec().clone(), model.to_vec()).map_err(s)?;
                let (accuracy, rmse) = score(&learner, m, &test)?;
                rounds.push(TrialRound {
                    round,
                    sites: contributors.len(),
                    epsilon,
                    accuracy,
                    rmse,
                });
            }
            Some(Notification::RoundAborted { round, reason, .. }) => {
                tracing::warn!(round, %reason, "round aborted")
            }
            Some(Notification::Evaluated { .. }) => {}
            Some(Notification::StudyEnded { reason, .. }) => break reason,
            None => return Err("the coordinator stopped unexpectedly".into()),
        }
    };
    let _ = site_stop.send(true);
    for d in daemons {
        d.await.map_err(s)?.map_err(s)?;
    }
    let _ = stop.send(true);
    coordinator.await.map_err(s)?.map_err(s)?;
    Ok(TrialReport { rounds, end_reason })
}

/// The same study without privacy, in process: FedAvg (equal weights) of plain local SGD on
/// each site's data, loaded and preprocessed as the sites do, for `rounds` rounds; scored on
/// `test`. The non-private federated baseline next to each DP figure.
pub fn non_private(
    study_toml: &str,
    sites: &[SiteData],
    test: &Path,
    rounds: u64,
    local: &LocalTraining,
    seed: u64,
) -> R<Option<f64>> {
    let study = StudyConfig::from_toml(study_toml).map_err(|e| format!("study: {e}"))?;
    let learner = Learner::for_data(&study.model, &study.data).map_err(s)?;
    let test = load_eval(&study.data, test)?;
    let shards: Vec<Dataset> = sites
        .iter()
        // Each site's file read with the held-out file's loader: same columns, same scaling
        // (image manifests name their files relative to their own folder).
        .map(|site| load_eval(&study.data, &site.path))
        .collect::<R<_>>()?;
    let mut global = learner.init(0).map_err(s)?;
    for r in 0..rounds.max(1) {
        let mut sum = vec![0f64; global.values.len()];
        for (i, shard) in shards.iter().enumerate() {
            let trained =
                train::train_local(&learner, &global, shard, local, seed ^ (r * 31 + i as u64))
                    .map_err(s)?;
            for ((acc, a), b) in sum.iter_mut().zip(&trained.values).zip(&global.values) {
                *acc += f64::from(a - b);
            }
        }
        let k = shards.len() as f64;
        for (g, d) in global.values.iter_mut().zip(&sum) {
            *g = (f64::from(*g) + d / k) as f32;
        }
    }
    Ok(score(&learner, global, &test)?.0)
}
