//! Why the round engine refuses an update: a type to decide on, and the text records and
//! logs carry.

/// Why an update was refused. Decided on by type (alerting asks [`RejectReason::is_norm`]);
/// the text (`Display`) is what records and logs carry.
#[derive(Debug, Clone, PartialEq)]
pub enum RejectReason {
    StudyEnded,
    NotCollecting,
    WrongRound {
        round: u64,
        current: u64,
    },
    NotChosen,
    Duplicate,
    /// The site declined, went away, or the round is closing.
    LeftRound,
    AlreadySending,
    UploadIdInUse {
        upload: u64,
    },
    /// A whole update, or a streamed one at its end, with the wrong number of values.
    WrongLength {
        got: usize,
        model: usize,
    },
    /// A chunk ran past the model's end.
    TooManyValues {
        model: usize,
    },
    /// A chunk did not start where the last one ended.
    OutOfOrder {
        offset: usize,
        expected: usize,
    },
    NotFinite {
        index: usize,
    },
    /// The norm is over what clipping and noise allow. `figures` is `None` under central
    /// placement, where the update is an un-noised clipped delta and no figure computed
    /// from it may be told.
    NormExceeded {
        figures: Option<NormFigures>,
    },
    /// The transport could not receive the whole body (the peer's text, or ours).
    UploadFailed(String),
    RoundClosed,
}

/// The figures of a norm refusal (local noise only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormFigures {
    pub norm: f64,
    pub bound: f64,
    /// For a streamed update: how many of the model's values had arrived.
    pub after: Option<(usize, usize)>,
}

impl RejectReason {
    /// Whether the update was refused for its norm (what the norm-anomaly alert is about).
    pub fn is_norm(&self) -> bool {
        matches!(self, Self::NormExceeded { .. })
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::StudyEnded => f.write_str("the study has ended"),
            Self::NotCollecting => f.write_str("no round is collecting updates"),
            Self::WrongRound { round, current } => write!(
                f,
                "update for round {round}, but round {current} is collecting"
            ),
            Self::NotChosen => f.write_str("the site was not chosen for this round"),
            Self::Duplicate => f.write_str("duplicate update for this round"),
            Self::LeftRound => f.write_str("the site already left this round"),
            Self::AlreadySending => {
                f.write_str("the site is already sending an update for this round")
            }
            Self::UploadIdInUse { upload } => write!(f, "upload id {upload} is already in use"),
            Self::WrongLength { got, model } => write!(f, "{got} values, the model has {model}"),
            Self::TooManyValues { model } => write!(f, "more values than the model's {model}"),
            Self::OutOfOrder { offset, expected } => {
                write!(f, "chunk at value {offset}, expected value {expected}")
            }
            Self::NotFinite { index } => write!(f, "value {index} is not finite"),
            Self::NormExceeded { figures: None } => f.write_str("norm exceeds the clip norm"),
            Self::NormExceeded {
                figures:
                    Some(NormFigures {
                        norm,
                        bound,
                        after: Some((n, d)),
                    }),
            } => write!(
                f,
                "norm {norm:.3} after {n} of {d} values exceeds what clipping and noise allow ({bound:.3})"
            ),
            Self::NormExceeded {
                figures:
                    Some(NormFigures {
                        norm,
                        bound,
                        after: None,
                    }),
            } => write!(
                f,
                "norm {norm:.3} exceeds what clipping and noise allow ({bound:.3})"
            ),
            Self::UploadFailed(why) => write!(f, "upload failed: {why}"),
            Self::RoundClosed => f.write_str("the round closed before the upload ended"),
        }
    }
}
