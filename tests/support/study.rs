//! The study TOML the end-to-end tests (and `examples/load.rs`, through the load harness)
//! hand the coordinator: a binary task trained with fedavg under site-level DP. The defaults
//! are one round of a logistic regression with local noise (sigma 2, epsilon 50, the RDP
//! accountant), two sites needed and a 120 s round timeout; each test changes what it needs.

/// A builder for a study's TOML text; [`Study::toml`] writes it.
pub struct Study {
    id: String,
    hidden: Option<usize>,
    features: Vec<(String, f64, f64)>,
    rounds: u64,
    min_sites: usize,
    round_timeout_secs: u64,
    encoding: Option<&'static str>,
    placement: &'static str,
    noise_multiplier: f64,
    epsilon: f64,
    accountant: Option<&'static str>,
    enrolled: Vec<String>,
}

impl Study {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            hidden: None,
            features: Vec::new(),
            rounds: 1,
            min_sites: 2,
            round_timeout_secs: 120,
            encoding: None,
            placement: "local",
            noise_multiplier: 2.0,
            epsilon: 50.0,
            accountant: Some("rdp"),
            enrolled: Vec::new(),
        }
    }

    /// An MLP with one hidden layer of this width instead of a logistic regression.
    pub fn mlp(mut self, hidden: usize) -> Self {
        self.hidden = Some(hidden);
        self
    }

    /// `n` features `f0`, `f1`, ..., each in [0, 1].
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

    /// The wire encoding of the model and updates (`encoding = "..."`); unset by default.
    pub fn encoding(mut self, encoding: &'static str) -> Self {
        self.encoding = Some(encoding);
        self
    }

    /// Where the noise is added: `"local"` (the default) or `"central"`.
    pub fn placement(mut self, placement: &'static str) -> Self {
        self.placement = placement;
        self
    }

    pub fn noise(mut self, noise_multiplier: f64, epsilon: f64) -> Self {
        self.noise_multiplier = noise_multiplier;
        self.epsilon = epsilon;
        self
    }

    /// The accountant line; `None` leaves it out (the config's default applies).
    pub fn accountant(mut self, accountant: Option<&'static str>) -> Self {
        self.accountant = accountant;
        self
    }

    pub fn enrolled<S: Into<String>>(mut self, sites: impl IntoIterator<Item = S>) -> Self {
        self.enrolled = sites.into_iter().map(Into::into).collect();
        self
    }

    pub fn toml(&self) -> String {
        let model = match self.hidden {
            Some(hidden) => format!("{{ kind = \"mlp\", hidden = {hidden} }}"),
            None => "{ kind = \"logistic_regression\" }".into(),
        };
        let encoding = self
            .encoding
            .map(|e| format!("encoding = {e:?}\n"))
            .unwrap_or_default();
        let accountant = self
            .accountant
            .map(|a| format!("accountant = {a:?}\n"))
            .unwrap_or_default();
        let names: Vec<String> = self.features.iter().map(|f| format!("{:?}", f.0)).collect();
        let ranges: Vec<String> = self
            .features
            .iter()
            .map(|(name, lo, hi)| format!("{name} = [{lo:?}, {hi:?}]"))
            .collect();
        let enrolled: Vec<String> = self.enrolled.iter().map(|s| format!("{s:?}")).collect();
        format!(
            r#"[study]
id = {id:?}
model = {model}
rounds = {rounds}
min_sites = {min_sites}
round_timeout_secs = {timeout}
{encoding}
[data]
task = "binary"
label = "y"
features = [{names}]
ranges = {{ {ranges} }}

[training]
strategy = "fedavg"
local_epochs = 1
batch_size = 8
learning_rate = 0.1
server_learning_rate = 1.0

[privacy]
unit = "site"
placement = "{placement}"
site_sample_rate = 1.0
clip_norm = 1.0
noise_multiplier = {noise:?}
epsilon = {epsilon:?}
delta = 1e-5
{accountant}
[sites]
enrolled = [{enrolled}]
"#,
            id = self.id,
            rounds = self.rounds,
            min_sites = self.min_sites,
            timeout = self.round_timeout_secs,
            placement = self.placement,
            noise = self.noise_multiplier,
            epsilon = self.epsilon,
            names = names.join(", "),
            ranges = ranges.join(", "),
            enrolled = enrolled.join(", "),
        )
    }
}
