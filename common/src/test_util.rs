//! Test fixtures shared by every crate's tests (feature `test-util`; never in a binary).
//!
//! [`StudyBuilder`] writes a study's TOML: a binary task trained with fedavg under
//! site-level DP by default (one round of a logistic regression with local noise, sigma 2,
//! epsilon 50, the RDP accountant, two sites needed, a 120 s round timeout); each test
//! changes what it needs. The text goes through the same parser a `--study` file does.

use crate::config::{ConfigError, StudyConfig};

/// How each site trains in a round.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// Site unit: epochs of plain training, then the site's delta is clipped and noised.
    Epochs { local_epochs: u32, batch_size: u32 },
    /// Record unit: DP-SGD steps with Poisson batches of this expected size.
    DpSgd { steps: u64, expected_batch: f64 },
}

/// A builder for a study's TOML text; [`StudyBuilder::toml`] writes it.
#[derive(Debug, Clone)]
pub struct StudyBuilder {
    id: String,
    hidden: Option<usize>,
    features: Vec<(String, f64, f64)>,
    rounds: u64,
    min_sites: usize,
    round_timeout_secs: u64,
    join_timeout_secs: Option<u64>,
    encoding: Option<String>,
    plan: Plan,
    learning_rate: f64,
    strategy: String,
    server_learning_rate: f64,
    placement: String,
    clip_norm: f64,
    noise_multiplier: f64,
    epsilon: f64,
    delta: f64,
    accountant: Option<String>,
    enrolled: Vec<String>,
    /// `[evaluation]`: every, noise multiplier, loss clip.
    evaluation: Option<(u64, f64, f64)>,
}

impl StudyBuilder {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            hidden: None,
            features: vec![("a".into(), 0.0, 1.0)],
            rounds: 1,
            min_sites: 2,
            round_timeout_secs: 120,
            join_timeout_secs: None,
            encoding: None,
            plan: Plan::Epochs {
                local_epochs: 1,
                batch_size: 8,
            },
            learning_rate: 0.1,
            strategy: "fedavg".into(),
            server_learning_rate: 1.0,
            placement: "local".into(),
            clip_norm: 1.0,
            noise_multiplier: 2.0,
            epsilon: 50.0,
            delta: 1e-5,
            accountant: Some("rdp".into()),
            enrolled: Vec::new(),
            evaluation: None,
        }
    }

    /// An MLP with one hidden layer of this width instead of a logistic regression.
    pub fn mlp(mut self, hidden: usize) -> Self {
        self.hidden = Some(hidden);
        self
    }

    /// `n` features `f0`, `f1`, ..., each in [0, 1] (default: one feature `a`).
    pub fn features(mut self, n: usize) -> Self {
        self.features = (0..n).map(|i| (format!("f{i}"), 0.0, 1.0)).collect();
        self
    }

    /// Features with their own names and ranges.
    pub fn named_features(mut self, features: &[(&str, f64, f64)]) -> Self {
        self.features = features
            .iter()
            .map(|&(name, lo, hi)| (name.into(), lo, hi))
            .collect();
        self
    }

    pub fn rounds(mut self, rounds: u64) -> Self {
        self.rounds = rounds;
        self
    }

    pub fn min_sites(mut self, min_sites: usize) -> Self {
        self.min_sites = min_sites;
        self
    }

    pub fn round_timeout_secs(mut self, secs: u64) -> Self {
        self.round_timeout_secs = secs;
        self
    }

    /// How long the study waits for any enrolled site before it ends (unset by default).
    pub fn join_timeout_secs(mut self, secs: u64) -> Self {
        self.join_timeout_secs = Some(secs);
        self
    }

    /// The wire encoding of the model and updates (`encoding = "..."`); unset by default.
    pub fn encoding(mut self, encoding: &str) -> Self {
        self.encoding = Some(encoding.into());
        self
    }

    /// Where the noise is added under the site unit: `"local"` (the default) or
    /// `"central"`.
    pub fn placement(mut self, placement: &str) -> Self {
        self.placement = placement.into();
        self
    }

    /// The record unit with DP-SGD: `steps` per round with Poisson batches of
    /// `expected_batch` records.
    pub fn record_unit(mut self, steps: u64, expected_batch: f64) -> Self {
        self.plan = Plan::DpSgd {
            steps,
            expected_batch,
        };
        self
    }

    /// The site unit's local training: `epochs` over the site's data in batches of
    /// `batch_size` (default 1 epoch, batches of 8).
    pub fn local_epochs(mut self, epochs: u32, batch_size: u32) -> Self {
        self.plan = Plan::Epochs {
            local_epochs: epochs,
            batch_size,
        };
        self
    }

    /// The local learning rate (default 0.1).
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.learning_rate = lr;
        self
    }

    /// The server optimiser (`"fedavg"`, `"fedadam"`).
    pub fn strategy(mut self, strategy: &str) -> Self {
        self.strategy = strategy.into();
        self
    }

    pub fn server_learning_rate(mut self, lr: f64) -> Self {
        self.server_learning_rate = lr;
        self
    }

    pub fn clip_norm(mut self, clip_norm: f64) -> Self {
        self.clip_norm = clip_norm;
        self
    }

    pub fn noise(mut self, noise_multiplier: f64, epsilon: f64) -> Self {
        self.noise_multiplier = noise_multiplier;
        self.epsilon = epsilon;
        self
    }

    pub fn noise_multiplier(mut self, noise_multiplier: f64) -> Self {
        self.noise_multiplier = noise_multiplier;
        self
    }

    pub fn epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = epsilon;
        self
    }

    pub fn delta(mut self, delta: f64) -> Self {
        self.delta = delta;
        self
    }

    /// The accountant line; `None` leaves it out (the config's default applies).
    pub fn accountant(mut self, accountant: Option<&str>) -> Self {
        self.accountant = accountant.map(str::to_string);
        self
    }

    /// DP evaluation every `every` rounds (record unit).
    pub fn evaluation(mut self, every: u64, noise_multiplier: f64, loss_clip: f64) -> Self {
        self.evaluation = Some((every, noise_multiplier, loss_clip));
        self
    }

    pub fn enrolled<S: Into<String>>(mut self, sites: impl IntoIterator<Item = S>) -> Self {
        self.enrolled = sites.into_iter().map(Into::into).collect();
        self
    }

    /// The study's TOML, as a `--study` file or an operator's `admin create` gives it.
    pub fn toml(&self) -> String {
        let model = match self.hidden {
            Some(hidden) => format!("{{ kind = \"mlp\", hidden = {hidden} }}"),
            None => "{ kind = \"logistic_regression\" }".into(),
        };
        let join = self
            .join_timeout_secs
            .map(|s| format!("join_timeout_secs = {s}\n"))
            .unwrap_or_default();
        let encoding = self
            .encoding
            .as_ref()
            .map(|e| format!("encoding = {e:?}\n"))
            .unwrap_or_default();
        let accountant = self
            .accountant
            .as_ref()
            .map(|a| format!("accountant = {a:?}\n"))
            .unwrap_or_default();
        let names: Vec<String> = self.features.iter().map(|f| format!("{:?}", f.0)).collect();
        let ranges: Vec<String> = self
            .features
            .iter()
            .map(|(name, lo, hi)| format!("{name} = [{lo:?}, {hi:?}]"))
            .collect();
        let enrolled: Vec<String> = self.enrolled.iter().map(|s| format!("{s:?}")).collect();
        let evaluation = self
            .evaluation
            .map(|(every, z, l)| {
                format!("\n[evaluation]\nevery = {every}\nnoise_multiplier = {z:?}\nloss_clip = {l:?}\n")
            })
            .unwrap_or_default();
        let (plan, unit) = match &self.plan {
            Plan::Epochs {
                local_epochs,
                batch_size,
            } => (
                format!("local_epochs = {local_epochs}\nbatch_size = {batch_size}\n"),
                format!(
                    "unit = \"site\"\nplacement = {:?}\nsite_sample_rate = 1.0\n",
                    self.placement
                ),
            ),
            Plan::DpSgd {
                steps,
                expected_batch,
            } => (
                format!("local_steps = {steps}\nexpected_batch = {expected_batch:?}\n"),
                "unit = \"record\"\n".to_string(),
            ),
        };
        format!(
            r#"[study]
id = {id:?}
model = {model}
rounds = {rounds}
min_sites = {min_sites}
round_timeout_secs = {timeout}
{join}{encoding}
[data]
task = "binary"
label = "y"
features = [{names}]
ranges = {{ {ranges} }}

[training]
strategy = {strategy:?}
{plan}learning_rate = {lr:?}
server_learning_rate = {slr:?}

[privacy]
{unit}clip_norm = {clip:?}
noise_multiplier = {noise:?}
epsilon = {epsilon:?}
delta = {delta:?}
{accountant}
[sites]
enrolled = [{enrolled}]
{evaluation}"#,
            id = self.id,
            rounds = self.rounds,
            min_sites = self.min_sites,
            timeout = self.round_timeout_secs,
            strategy = self.strategy,
            lr = self.learning_rate,
            slr = self.server_learning_rate,
            clip = self.clip_norm,
            noise = self.noise_multiplier,
            epsilon = self.epsilon,
            delta = self.delta,
            names = names.join(", "),
            ranges = ranges.join(", "),
            enrolled = enrolled.join(", "),
        )
    }

    /// The validated config of [`StudyBuilder::toml`].
    pub fn config(&self) -> Result<StudyConfig, ConfigError> {
        StudyConfig::from_toml(&self.toml())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_the_builder_writes_parses() {
        let site = StudyBuilder::new("s")
            .enrolled(["a", "b"])
            .strategy("fedadam")
            .placement("central")
            .mlp(4)
            .features(3);
        let cfg = site.config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.enrolled, ["a", "b"]);
        let record = StudyBuilder::new("r")
            .enrolled(["a"])
            .min_sites(1)
            .record_unit(2, 4.0)
            .delta(0.002)
            .accountant(None);
        let cfg = record.config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.privacy.delta.get(), 0.002);
    }
}
