//! Checkpoints written off the owner's thread, so that sealing, hashing and syncing a new
//! model version (about a second of CPU at 600M parameters) is not on the path from one
//! round to the next.
//!
//! The owner decides: when the round engine aggregates a model it hands a
//! [`CheckpointJob`] out as an effect and the engine may begin the next round (its spend
//! recorded first, as always). The glue's [`Checkpointer`] writes jobs one at a time, in
//! the order they came, and posts each [`CheckpointDone`] back into the owner's inbox; only
//! then does the owner audit the round as finished and record the model version in the
//! store. A model version therefore exists in the store only once its file is durable.
//! If the process stops with a checkpoint unwritten, its round is still reserved, and a
//! restart aborts it like any interrupted round: its spend stands and the study resumes
//! from the last version on file (never a newer model than the ledger can account for).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedpriv_common::model::ModelSpec;
use fedpriv_common::seal::SealKey;

use super::{Event, OwnerTx};
use crate::checkpoint;

/// A new model version to be written: everything the write needs, taken when the round
/// ended (the engine may have moved on by the time it is written).
pub struct CheckpointJob {
    pub study: String,
    pub round: u64,
    pub model: Arc<Vec<f32>>,
    pub contributors: Vec<String>,
    /// The study's spend after this round.
    pub epsilon: f64,
    pub(crate) spec: ModelSpec,
    /// The model card (the file's metadata).
    pub(crate) card: BTreeMap<String, String>,
    /// FedAdam's moments after this round, written beside the model.
    pub(crate) optimizer: Option<Vec<f32>>,
    pub(crate) key: Arc<SealKey>,
    pub(crate) state_dir: PathBuf,
}

impl std::fmt::Debug for CheckpointJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointJob")
            .field("study", &self.study)
            .field("round", &self.round)
            .field("values", &self.model.len())
            .finish_non_exhaustive()
    }
}

/// A written (or failed) checkpoint, for the owner to record.
#[derive(Debug)]
pub struct CheckpointDone {
    pub study: String,
    pub round: u64,
    pub model: Arc<Vec<f32>>,
    pub contributors: Vec<String>,
    pub epsilon: f64,
    /// Whether an optimiser state was written beside the model.
    pub optimizer: bool,
    /// The model file relative to the state directory and the SHA-256 of its sealed bytes,
    /// or the file that could not be written and why.
    pub result: Result<(String, String), (PathBuf, std::io::Error)>,
}

impl CheckpointJob {
    /// Writes the model (sealed, hashed, synced, renamed into place) and then the optimiser
    /// state, if any. Blocks on the disk.
    pub fn write(self) -> CheckpointDone {
        let result = self.write_files();
        CheckpointDone {
            optimizer: self.optimizer.is_some(),
            study: self.study,
            round: self.round,
            model: self.model,
            contributors: self.contributors,
            epsilon: self.epsilon,
            result,
        }
    }

    fn write_files(&self) -> Result<(String, String), (PathBuf, std::io::Error)> {
        let path = checkpoint::model_path(&self.state_dir, &self.study, self.round);
        // Sealed and streamed from the model's own memory: no copy of the model.
        let digest = checkpoint::write_checkpoint(
            &self.key,
            &self.spec,
            &self.model,
            &self.card,
            &self.study,
            self.round,
            &path,
        )
        .map_err(|e| (path.clone(), e))?;
        // FedAdam's moments go beside it, so that a restart resumes the optimiser rather
        // than silently resetting it.
        if let Some(state) = &self.optimizer {
            let opt = checkpoint::optimizer_path(&self.state_dir, &self.study, self.round);
            checkpoint::write_optimizer_state(&self.key, state, &self.study, self.round, &opt)
                .map_err(|e| (opt.clone(), e))?;
        }
        Ok((relative(&self.state_dir, &path), digest))
    }
}

fn relative(state_dir: &Path, path: &Path) -> String {
    path.strip_prefix(state_dir)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The glue's checkpoint writer: one thread, jobs in order, each answered in the owner's
/// inbox. Dropping it lets the thread finish the jobs it has and stop.
#[derive(Debug)]
pub struct Checkpointer {
    jobs: std::sync::mpsc::Sender<CheckpointJob>,
    inbox: OwnerTx,
}

impl Checkpointer {
    pub fn start(inbox: OwnerTx) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<CheckpointJob>();
        let answers = inbox.clone();
        std::thread::Builder::new()
            .name("checkpoints".into())
            .spawn(move || {
                for job in queue {
                    let done = job.write();
                    if answers
                        .send(Event::CheckpointWritten(Box::new(done)))
                        .is_err()
                    {
                        // The owner is gone: nobody would record what comes next either.
                        break;
                    }
                }
            })?;
        Ok(Self { jobs, inbox })
    }

    /// Queues a job. Should the writer have stopped, the owner hears of the job as failed
    /// (and stops the study), so that it never waits for an answer that cannot come.
    pub fn submit(&self, job: CheckpointJob) {
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            let path = checkpoint::model_path(&job.state_dir, &job.study, job.round);
            let error = std::io::Error::other("the checkpoint writer has stopped");
            let done = CheckpointDone {
                optimizer: job.optimizer.is_some(),
                result: Err((path, error)),
                study: job.study,
                round: job.round,
                model: job.model,
                contributors: job.contributors,
                epsilon: job.epsilon,
            };
            let _ = self.inbox.send(Event::CheckpointWritten(Box::new(done)));
        }
    }
}
