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
//! restart aborts it like any interrupted round (on the audit log too): its spend stands
//! and the study resumes from the last version on file. The next round's tasks may already
//! have carried that model to the sites: a model paid for in the ledger, but with no
//! digest on the trail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedpriv_common::model::ModelSpec;
use fedpriv_common::seal::SealKey;

use super::{Event, OwnerTx};
use crate::checkpoint;

/// A model version: what the store and the audit log record of it once it is written.
#[derive(Debug, Clone)]
pub struct ModelVersion {
    pub study: String,
    pub round: u64,
    pub model: Arc<Vec<f32>>,
    pub contributors: Vec<String>,
    /// The study's spend after this round.
    pub epsilon: f64,
}

/// A new model version to be written: everything the write needs, taken when the round
/// ended (the engine may have moved on by the time it is written).
pub struct CheckpointJob {
    pub version: ModelVersion,
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
            .field("study", &self.version.study)
            .field("round", &self.version.round)
            .field("values", &self.version.model.len())
            .finish_non_exhaustive()
    }
}

/// A written (or failed) checkpoint, for the owner to record.
#[derive(Debug)]
pub struct CheckpointDone {
    pub version: ModelVersion,
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
            version: self.version,
            result,
        }
    }

    /// The answer for a job that could not be written, without touching the disk (the
    /// model is shared, not copied).
    fn failed(&self, why: &str) -> CheckpointDone {
        let v = &self.version;
        let path = checkpoint::model_path(&self.state_dir, &v.study, v.round);
        CheckpointDone {
            version: v.clone(),
            optimizer: self.optimizer.is_some(),
            result: Err((path, std::io::Error::other(why.to_string()))),
        }
    }

    fn write_files(&self) -> Result<(String, String), (PathBuf, std::io::Error)> {
        let ModelVersion {
            study,
            round,
            model,
            ..
        } = &self.version;
        let path = checkpoint::model_path(&self.state_dir, study, *round);
        // Sealed and streamed from the model's own memory: no copy of the model.
        let digest = checkpoint::write_checkpoint(
            &self.key, &self.spec, model, &self.card, study, *round, &path,
        )
        .map_err(|e| (path.clone(), e))?;
        // FedAdam's moments go beside it, so that a restart resumes the optimiser rather
        // than silently resetting it.
        if let Some(state) = &self.optimizer {
            let opt = checkpoint::optimizer_path(&self.state_dir, study, *round);
            checkpoint::write_optimizer_state(&self.key, state, study, *round, &opt)
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
    jobs: std::sync::mpsc::SyncSender<CheckpointJob>,
    inbox: OwnerTx,
}

impl Checkpointer {
    pub fn start(inbox: OwnerTx) -> std::io::Result<Self> {
        // One job queued behind the one being written: beyond that, handing over the next
        // waits (each job holds a model version, and FedAdam's moments, in memory).
        let (jobs, queue) = std::sync::mpsc::sync_channel::<CheckpointJob>(1);
        let answers = inbox.clone();
        std::thread::Builder::new()
            .name("checkpoints".into())
            .spawn(move || {
                for job in queue {
                    let failed = job.failed("the checkpoint writer failed");
                    // Every job is answered, even one whose write panicked: the owner waits
                    // for the answer before it ends a study or the run.
                    let done =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.write()))
                            .unwrap_or(failed);
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

    /// Hands a job to the writer (waiting while two are ahead of it). Should the writer have
    /// stopped, the owner hears of the job as failed (and stops the study), so that it
    /// never waits for an answer that cannot come.
    pub fn submit(&self, job: CheckpointJob) {
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            let done = job.failed("the checkpoint writer has stopped");
            let _ = self.inbox.send(Event::CheckpointWritten(Box::new(done)));
        }
    }
}
