//! The demo federation, shared by `examples/hospitals.rs` and the end-to-end tests: a
//! throw-away PKI, the breast-cancer data split across three hospitals (uneven, non-IID),
//! one coordinator and three site daemons on loopback QUIC with mutual TLS, a study run to
//! its budget, and a held-out test set to score every model version.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpriv_client::config::SiteConfig;
use fedpriv_client::data::{self, ColumnSelection, Dataset, LoadOptions};
use fedpriv_client::train::{self, LocalTraining};
use fedpriv_common::arch;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::model::{Architecture, FlatModel};
use fedpriv_common::pki::{self, Identity, Role};
use fedpriv_coordinator::server::{self, Notification, Options};
use tokio::sync::{mpsc, watch};

/// The hospitals of the demo.
pub const SITES: [&str; 3] = ["st-marys", "general", "childrens"];

/// Where the bundled data lives (relative to the workspace root).
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("data")
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// `record` (DP-SGD at each site, the default) or `site` (DP-FedAvg, local noise).
    pub unit: String,
    pub epsilon: f64,
    pub delta: f64,
    pub rounds: u64,
    pub seed: u64,
    /// Uneven, label-skewed split (true) or an even IID one.
    pub non_iid: bool,
    /// A site's own cap, applied to every site.
    pub site_cap: f64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            unit: "record".into(),
            epsilon: 2.0,
            delta: 1e-5,
            rounds: 40,
            seed: 42,
            non_iid: true,
            site_cap: 10.0,
        }
    }
}

/// One completed round as the demo saw it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u64,
    pub sites: Vec<String>,
    pub loss: f64,
    pub accuracy: f64,
    pub epsilon: f64,
    pub budget: f64,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub rounds: Vec<RoundReport>,
    pub end_reason: String,
    pub final_accuracy: f64,
    pub state_dir: PathBuf,
    pub site_state_dirs: Vec<PathBuf>,
    pub study_id: String,
}

type DemoResult<T> = Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// The bundled breast-cancer data: every feature, scaled by its public range.
pub fn breast_cancer() -> DemoResult<(Dataset, Vec<String>, Vec<[f32; 2]>)> {
    let ranges = data::load_ranges(data_dir().join("breast_cancer_ranges.toml")).map_err(s)?;
    let features: Vec<String> = ranges.features.keys().cloned().collect();
    let sel = ColumnSelection {
        features: features.clone(),
        label: "malignant".into(),
    };
    let ds = data::load_csv(
        data_dir().join("breast_cancer_wisconsin.csv"),
        &sel,
        &LoadOptions::binary(),
    )
    .map_err(s)?;
    let fr = ranges.for_features(&features).map_err(s)?;
    let bounds = fr.iter().map(|r| [r.lo(), r.hi()]).collect();
    Ok((ds, features, bounds))
}

/// Scales a dataset by the declared ranges, as every site does.
pub fn scaled(mut ds: Dataset, bounds: &[[f32; 2]]) -> DemoResult<Dataset> {
    let fr = bounds
        .iter()
        .map(|b| data::FeatureRange::new(f64::from(b[0]), f64::from(b[1])))
        .collect::<Result<Vec<_>, _>>()
        .map_err(s)?;
    data::scale_features(&mut ds, &fr).map_err(s)?;
    Ok(ds)
}

/// The train shards (one per site, unscaled, as CSV files would hold them), the scaled
/// held-out test set, and the feature names with their public ranges.
#[derive(Debug, Clone)]
pub struct Split {
    pub shards: Vec<Dataset>,
    pub test: Dataset,
    pub features: Vec<String>,
    pub bounds: Vec<[f32; 2]>,
}

/// Splits the bundled data as `opts` says.
pub fn split(opts: &DemoOptions) -> DemoResult<Split> {
    let (ds, features, bounds) = breast_cancer()?;
    let (train, test) = data::train_test_split(&ds, 0.2, opts.seed).map_err(s)?;
    let shards = if opts.non_iid {
        data::split_non_iid(&train, &[0.5, 0.3, 0.2], 0.6, opts.seed).map_err(s)?
    } else {
        data::split_iid(&train, SITES.len(), opts.seed).map_err(s)?
    };
    Ok(Split {
        shards,
        test: scaled(test, &bounds)?,
        features,
        bounds,
    })
}

/// The study's TOML. The hyperparameters are the README's recommended defaults, chosen
/// before looking at test results.
pub fn study_toml(opts: &DemoOptions, features: &[String], bounds: &[[f32; 2]]) -> String {
    let ranges: Vec<String> = features
        .iter()
        .zip(bounds)
        .map(|(f, b)| format!("{f} = [{:?}, {:?}]", b[0], b[1]))
        .collect();
    let enrolled: Vec<String> = SITES.iter().map(|s| format!("{s:?}")).collect();
    let (training, privacy) = match opts.unit.as_str() {
        "site" => (
            "strategy = \"fedavg\"\nlocal_epochs = 2\nbatch_size = 16\nlearning_rate = 0.5\nserver_learning_rate = 1.0".to_string(),
            "unit = \"site\"\nplacement = \"local\"\nsite_sample_rate = 1.0\nclip_norm = 1.0".to_string(),
        ),
        _ => (
            "strategy = \"fedavg\"\nlocal_steps = 5\nexpected_batch = 16.0\nlearning_rate = 1.0\nserver_learning_rate = 1.0".to_string(),
            "unit = \"record\"\nclip_norm = 1.0\nnoise_multiplier = 2.5".to_string(),
        ),
    };
    let noise = if opts.unit == "site" {
        format!("target_epsilon = {:?}", opts.epsilon)
    } else {
        String::new()
    };
    format!(
        "[study]\nid = \"breast-cancer-demo\"\nmodel = {{ kind = \"logistic_regression\" }}\nrounds = {}\nmin_sites = 2\nround_timeout_secs = 60\n\n\
         [data]\ntask = \"binary\"\nlabel = \"malignant\"\nfeatures = [{}]\nranges = {{ {} }}\n\n\
         [training]\n{training}\n\n[privacy]\n{privacy}\n{noise}\nepsilon = {:?}\ndelta = {:?}\naccountant = \"pld\"\n\n[sites]\nenrolled = [{}]\n",
        opts.rounds,
        features.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", "),
        ranges.join(", "),
        opts.epsilon,
        opts.delta,
        enrolled.join(", ")
    )
}

fn write(path: &Path, bytes: &[u8]) -> DemoResult<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(s)?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// A free UDP port on loopback (the coordinator binds it right after).
fn free_port() -> DemoResult<u16> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(s)?;
    Ok(sock.local_addr().map_err(s)?.port())
}

/// Creates the PKI, the site folders and configs; returns the server TLS config and the
/// site configs.
fn setup(
    root: &Path,
    opts: &DemoOptions,
    shards: &[Dataset],
    addr: SocketAddr,
) -> DemoResult<(rustls::ServerConfig, Vec<SiteConfig>)> {
    let ca = pki::generate_ca("fedpriv demo CA", 2).map_err(s)?;
    let server_cert =
        pki::issue_server_cert(&ca, &["localhost".to_string()], &[addr.ip()], 2).map_err(s)?;
    let tls = pki::server_config(
        ca.cert_pem.as_bytes(),
        server_cert.cert_pem.as_bytes(),
        server_cert.key_pem.as_bytes(),
        &[],
    )
    .map_err(s)?;
    let mut sites = Vec::new();
    for (name, shard) in SITES.iter().zip(shards) {
        let dir = root.join(name);
        let id = Identity::new(Role::Site, *name).map_err(s)?;
        let cert = pki::issue_identity_cert(&ca, &id, 2).map_err(s)?;
        write(&dir.join("ca.pem"), ca.cert_pem.as_bytes())?;
        write(&dir.join("site.pem"), cert.cert_pem.as_bytes())?;
        write(&dir.join("site.key"), cert.key_pem.as_bytes())?;
        data::write_csv(shard, dir.join("patients.csv")).map_err(s)?;
        let toml = format!(
            "[site]\nname = \"{name}\"\nstate_dir = \"state\"\nmax_delta = 1e-5\n\n[coordinator]\naddress = \"{addr}\"\nserver_name = \"localhost\"\n\n\
             [tls]\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n\n[studies.breast-cancer-demo]\ndata = \"patients.csv\"\nepsilon_cap = {:?}\n",
            opts.site_cap
        );
        write(&dir.join("site.toml"), toml.as_bytes())?;
        sites.push(SiteConfig::load(&dir.join("site.toml")).map_err(s)?);
    }
    Ok((tls, sites))
}

/// A running coordinator started by [`Federation::start_coordinator`].
#[derive(Debug)]
pub struct CoordinatorHandle {
    stop: watch::Sender<bool>,
    pub notes: mpsc::UnboundedReceiver<Notification>,
    join: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

impl CoordinatorHandle {
    /// Asks the coordinator to stop and waits for it.
    pub async fn stop(self) -> DemoResult<()> {
        let _ = self.stop.send(true);
        self.join.await.map_err(s)?.map_err(s)
    }
}

/// The demo's pieces: PKI, site folders and configs, the study, the test set.
#[derive(Debug)]
pub struct Federation {
    pub addr: SocketAddr,
    tls: rustls::ServerConfig,
    study: (StudyConfig, String),
    pub arch: Architecture,
    pub spec: fedpriv_common::model::ModelSpec,
    pub test: Dataset,
    pub state_dir: PathBuf,
    sites: Vec<SiteConfig>,
    site_stop: watch::Sender<bool>,
    daemons: Vec<tokio::task::JoinHandle<Result<(), fedpriv_client::daemon::DaemonError>>>,
}

impl Federation {
    /// Writes the PKI, the site shards and configs under `root`; starts nothing.
    pub fn prepare(root: &Path, opts: &DemoOptions) -> DemoResult<Self> {
        let Split {
            shards,
            test,
            features,
            bounds,
        } = split(opts)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let (tls, sites) = setup(root, opts, &shards, addr)?;
        let toml = study_toml(opts, &features, &bounds);
        let cfg = StudyConfig::from_toml(&toml).map_err(|e| format!("demo study config: {e}"))?;
        let arch_kind = cfg.model;
        let spec = arch::model_spec(arch_kind, features.len(), 1).map_err(s)?;
        let (site_stop, _) = watch::channel(false);
        Ok(Self {
            addr,
            tls,
            study: (cfg, toml),
            arch: arch_kind,
            spec,
            test,
            state_dir: root.join("coordinator"),
            sites,
            site_stop,
            daemons: Vec::new(),
        })
    }

    pub fn study_id(&self) -> &str {
        &self.study.0.id
    }

    pub fn site_state_dirs(&self) -> Vec<PathBuf> {
        self.sites.iter().map(|c| c.state_dir.clone()).collect()
    }

    /// Starts the three site daemons (they dial the coordinator, retrying until it is up).
    pub fn start_sites(&mut self) {
        for c in &self.sites {
            self.daemons.push(tokio::spawn(fedpriv_client::daemon::run(
                c.clone(),
                self.site_stop.subscribe(),
            )));
        }
    }

    /// Stops the site daemons and waits for them.
    pub async fn stop_sites(&mut self) -> DemoResult<()> {
        let _ = self.site_stop.send(true);
        for d in self.daemons.drain(..) {
            d.await.map_err(s)?.map_err(s)?;
        }
        Ok(())
    }

    /// Starts (or restarts, over the same state directory) the coordinator.
    pub fn start_coordinator(&self) -> CoordinatorHandle {
        let (stop, stop_rx) = watch::channel(false);
        let (note_tx, notes) = mpsc::unbounded_channel();
        let opts = Options {
            listen: self.addr,
            state_dir: self.state_dir.clone(),
            tls: self.tls.clone(),
            studies: vec![self.study.clone()],
            max_concurrent_uploads: 2,
        };
        let join = tokio::spawn(server::run(opts, stop_rx, Some(note_tx), false));
        CoordinatorHandle { stop, notes, join }
    }

    /// Loss and accuracy of a model version on the held-out test set.
    pub fn evaluate(&self, model: &[f32]) -> DemoResult<(f64, f64)> {
        let m = FlatModel::new(self.spec.clone(), model.to_vec()).map_err(s)?;
        let metrics = train::evaluate(&m, self.arch, &self.test).map_err(s)?;
        Ok((metrics.loss, metrics.accuracy.unwrap_or(f64::NAN)))
    }

    /// Follows the coordinator's notifications until the study ends.
    pub async fn follow(
        &self,
        coord: &mut CoordinatorHandle,
        rounds: &mut Vec<RoundReport>,
        mut on_round: impl FnMut(&RoundReport),
    ) -> DemoResult<String> {
        loop {
            let note = tokio::time::timeout(Duration::from_secs(300), coord.notes.recv())
                .await
                .map_err(|_| "no progress for 5 minutes".to_string())?;
            match note {
                Some(Notification::RoundCompleted {
                    round,
                    model,
                    contributors,
                    epsilon,
                    budget,
                    ..
                }) => {
                    let (loss, accuracy) = self.evaluate(&model)?;
                    let r = RoundReport {
                        round,
                        sites: contributors,
                        loss,
                        accuracy,
                        epsilon,
                        budget,
                    };
                    on_round(&r);
                    rounds.push(r);
                }
                Some(Notification::RoundAborted { round, reason, .. }) => {
                    tracing::warn!(round, %reason, "round aborted")
                }
                Some(Notification::StudyEnded { reason, .. }) => return Ok(reason),
                None => return Err("the coordinator stopped unexpectedly".into()),
            }
        }
    }
}

/// Runs the demo federation in `root`; `on_round` sees every completed round as it happens.
pub async fn run(
    root: &Path,
    opts: &DemoOptions,
    on_round: impl FnMut(&RoundReport),
) -> DemoResult<DemoReport> {
    let mut fed = Federation::prepare(root, opts)?;
    let mut coord = fed.start_coordinator();
    fed.start_sites();
    let mut rounds = Vec::new();
    let end_reason = fed.follow(&mut coord, &mut rounds, on_round).await?;
    fed.stop_sites().await?;
    coord.stop().await?;
    let final_accuracy = rounds.last().map(|r| r.accuracy).unwrap_or(f64::NAN);
    Ok(DemoReport {
        rounds,
        end_reason,
        final_accuracy,
        state_dir: fed.state_dir.clone(),
        site_state_dirs: fed.site_state_dirs(),
        study_id: fed.study_id().to_string(),
    })
}

/// The same federation without privacy: FedAvg of plain local SGD, same rounds and split.
pub fn non_private_baseline(opts: &DemoOptions, rounds: u64) -> DemoResult<f64> {
    let Split {
        shards,
        test,
        bounds,
        ..
    } = split(opts)?;
    let arch_kind = Architecture::LogisticRegression;
    let mut global = arch::init_model(arch_kind, test.d, 1, 0).map_err(s)?;
    let shards: Vec<Dataset> = shards
        .into_iter()
        .map(|d| scaled(d, &bounds))
        .collect::<Result<_, _>>()?;
    let local = LocalTraining {
        epochs: 1,
        batch_size: 32,
        learning_rate: 0.5,
    };
    for r in 0..rounds.max(1) {
        let mut sum = vec![0f32; global.values.len()];
        for (i, shard) in shards.iter().enumerate() {
            let trained = train::train_local(
                &global,
                arch_kind,
                shard,
                &local,
                opts.seed ^ (r * 31 + i as u64),
            )
            .map_err(s)?;
            for ((acc, a), b) in sum.iter_mut().zip(&trained.values).zip(&global.values) {
                *acc += a - b;
            }
        }
        let k = shards.len() as f32;
        for (g, d) in global.values.iter_mut().zip(&sum) {
            *g += d / k;
        }
    }
    Ok(train::evaluate(&global, arch_kind, &test)
        .map_err(s)?
        .accuracy
        .unwrap_or(f64::NAN))
}
