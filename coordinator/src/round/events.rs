//! What goes into the round engine ([`Input`]) and what it asks the I/O layer to do
//! ([`Action`]), and why a study ended ([`EndCause`]).

use super::*;

/// Something that happened, as the network layer or the store saw it.
#[derive(Debug)]
pub enum Input {
    /// A site is connected and can train for this study (`records`: its record count).
    SiteReady { site: String, records: u64 },
    /// A site's connection is gone.
    SiteGone { site: String },
    /// The store durably committed the spend of `round`.
    SpendCommitted { round: u64 },
    /// A complete update from a site (the transport already checked its shape).
    Update {
        site: String,
        round: u64,
        values: Vec<f32>,
    },
    /// A site started streaming an update (the transport already checked its header
    /// against the model). `upload` names this upload in the inputs and actions below;
    /// it must be unique among the network layer's uploads.
    UpdateBegin {
        site: String,
        round: u64,
        upload: u64,
    },
    /// The next values of an upload, in order: `offset` is the index of `values[0]`.
    UpdateChunk {
        upload: u64,
        offset: usize,
        values: Vec<f32>,
    },
    /// An upload ended: `Ok` when the transport received its whole body, else why not.
    UpdateEnd {
        upload: u64,
        result: Result<(), String>,
    },
    /// Values of `upload` that were folded and must come out again (after
    /// [`Action::Unfold`]), in order from `offset` 0.
    Unfold {
        upload: u64,
        offset: usize,
        values: Vec<f32>,
    },
    /// Every value [`Action::Unfold`] asked for was fed back (`ok`), or could not be.
    UnfoldDone { upload: u64, ok: bool },
    /// A site will not do a round.
    Declined {
        site: String,
        round: u64,
        reason: DeclineReason,
    },
    /// A site's noised evaluation vector for `round` (see [`fedpriv_common::evaluation`]).
    Evaluation {
        site: String,
        round: u64,
        values: Vec<f64>,
    },
    /// Time passed.
    Tick,
}

/// What the network layer and the store must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Durably record these sites' spend for `round`, then answer `SpendCommitted`.
    RecordSpend {
        round: u64,
        entries: Vec<SpendEntry>,
    },
    /// Send a task with the global model to a site.
    SendTask {
        site: String,
        task: Task,
        model: Arc<Vec<f32>>,
    },
    /// An update was folded into the round's aggregate. `norm` is `None` under central
    /// placement: there the update is an un-noised clipped delta, and nothing about it may be
    /// recorded, logged or answered (only that it arrived).
    UpdateAccepted {
        site: String,
        round: u64,
        norm: Option<f64>,
    },
    /// An update was refused; the round goes on without it.
    UpdateRejected {
        site: String,
        round: u64,
        reason: RejectReason,
    },
    /// Feed back the first `len` values of streamed upload `upload` (they were folded into
    /// the aggregate and must come out) as [`Input::Unfold`], then [`Input::UnfoldDone`].
    /// The round does not close until then.
    Unfold {
        site: String,
        round: u64,
        upload: u64,
        len: usize,
    },
    /// The coordinator leaves a site out of the study (its declared record count does not
    /// fit the study's delta): it takes no further part.
    SiteExcluded { site: String, reason: String },
    /// A site declined; for a permanent reason it takes no further part.
    SiteDeclined {
        site: String,
        round: u64,
        reason: DeclineReason,
    },
    /// A new model version: store it and its lineage. `epsilon` is the study's spend so far.
    Checkpoint {
        round: u64,
        model: Arc<Vec<f32>>,
        contributors: Vec<String>,
        epsilon: f64,
    },
    /// A site's evaluation vector was refused (not kept for the round's summary).
    EvaluationRejected {
        site: String,
        round: u64,
        reason: String,
    },
    /// The round's evaluation: the sum of the sites' noised vectors measuring the model
    /// after `model_round`, and what it says. Store and log it.
    Evaluated {
        round: u64,
        model_round: u64,
        sites: Vec<String>,
        sum: Vec<f64>,
        summary: fedpriv_common::evaluation::EvalSummary,
    },
    /// A record study's sigma was chosen from the sites' declared sizes (`target_epsilon`):
    /// store `config` as the study's, record why, and announce its terms again. No site was
    /// charged before this, and none is taken as ready until it accepts the new terms.
    Calibrated {
        config: Arc<StudyConfig>,
        /// The smallest site, whose sampling rate `q` set the noise, and its declared count.
        worst_site: String,
        records: u64,
        q: f64,
        /// DP-SGD steps over all planned rounds.
        steps: u64,
        target: f64,
    },
    /// The round ended without a model (too few updates); its spend stands.
    RoundAborted { round: u64, reason: String },
    /// The study is over; tell the sites.
    StudyEnded { reason: String },
}

/// Why a study ended, as a type (the reason text is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// Every planned round ran: the normal end.
    AllRoundsDone,
    /// Too few sites can afford another round: also a normal end.
    BudgetExhausted,
    /// Too few sites can take part at all (they refused for good, or cannot be priced).
    TooFewSites,
    /// No enrolled site joined within the join timeout.
    NobodyJoined,
    /// Ended before this start, or by an operator.
    Ended,
}

impl EndCause {
    /// Whether the study ended without doing what it was set up to do: an operator
    /// running with `--exit-when-done` hears of it in the exit status.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::TooFewSites | Self::NobodyJoined)
    }
}
