//! The studies' owner: one [`Owner`] holds every study's round engine, the state database,
//! the connected sites' outboxes and the upload spools, and changes them only in
//! [`Owner::step`], a synchronous `step(event, now) -> effects`.
//!
//! Inside a step the owner makes its durable writes (the ledger, the audit log), in the
//! order the round engine's actions ask for them; a new model version is written by the
//! checkpoint writer ([`super::checkpointer`]) and recorded in the step that receives its
//! answer; what must leave the process (messages to sites, admin replies, notifications,
//! a new directory for the connection tasks, a model version to write) comes back as
//! [`Effect`]s, which [`run`] carries out after the step.
//! So an effect that sends a round's task is only ever produced after that round's spend
//! was committed by the store, and a failed ledger or audit write stops the study before
//! anything it would have paid for can leave (fail closed). A model version is the one
//! exception to "durable before it leaves": the next round's tasks may carry it while its
//! checkpoint is still being written (see [`super::checkpointer`]); if that write fails,
//! the study stops, later versions are not recorded, and the rounds stay reserved until
//! the next start aborts them (their spends stand). The simulation in `owner_sim.rs` drives this very
//! code over the real store with injected failures and checks that after every step.
//!
//! [`run`] is the thin glue around it, on a thread of its own (like the audit writer): it
//! waits for the next event or the engines' next deadline, steps, and carries out the
//! effects. It never blocks a runtime worker on the disk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedpriv_common::admin::AdminResponse;
use fedpriv_common::audit::details::{
    BudgetSpent, ModelEvaluated, RoundFinished, RoundOutcome, RoundStarted, StudyChanged,
    StudyStopped, UpdateRejected,
};
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::protocol::{CoordinatorMessage, PROTOCOL_VERSION};
use fedpriv_common::seal::SealKey;
use tokio::sync::{mpsc, oneshot, watch};

use super::checkpointer::{CheckpointDone, CheckpointJob, Checkpointer, ModelVersion};
use super::refusals::Refusals;
use super::spool::Spools;
use super::state::StateStore;
use super::studies::{Directory, Studies, StudyMeta, StudyRuntime};
use super::{Event, Notification, Now, Outgoing, SiteTx};
use crate::audit::{AuditFailed, AuditHandle, COORDINATOR};
use crate::checkpoint;
use crate::error::ServerError;
use crate::metrics::{self, Metrics};
use crate::round::{self, Action, Input, StudyEngine};
use crate::store::{Charge, EvaluationRow, StoreError, StudyStatus};

mod writes;

/// Share of a study's budget spent at which the near-budget alert fires (once per study
/// and process).
const BUDGET_ALERT_FRACTION: f64 = 0.9;

/// How often the glue writes `metrics.prom` and the refusal summaries that are due.
const HOUSEKEEPING: Duration = Duration::from_secs(5);

/// What the glue must do after a step, in order.
// Effects live for one step; boxing the common `Send` would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Effect {
    /// Hand `msg` to a connected site's writer.
    Send {
        site: String,
        tx: SiteTx,
        msg: Outgoing,
    },
    /// Tell the observers.
    Notify(Notification),
    /// Answer an operator's write.
    Reply {
        to: oneshot::Sender<AdminResponse>,
        response: AdminResponse,
    },
    /// The connection tasks' new view of the studies.
    Publish(Directory),
    /// Write a new model version (off the owner's thread); the owner records it when the
    /// answer comes back as [`Event::CheckpointWritten`].
    WriteCheckpoint(Box<CheckpointJob>),
}

/// Why an action could not be carried out: the ledger, a checkpoint or the audit log
/// failed. Either way the study stops (fail closed).
#[derive(Debug, thiserror::Error)]
enum ActError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditFailed),
}

/// The studies' owner. See the module documentation.
pub struct Owner<S> {
    studies: Studies,
    spools: Spools,
    noise: NoiseSource,
    ctx: Ctx<S>,
}

impl<S> std::fmt::Debug for Owner<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("studies", &self.studies.ids())
            .finish_non_exhaustive()
    }
}

/// Everything of the owner but the studies, so that a study's engine and the rest can be
/// borrowed at once.
struct Ctx<S> {
    store: S,
    state_dir: PathBuf,
    at_rest_key: Arc<SealKey>,
    audit: AuditHandle,
    metrics: Metrics,
    /// Connected sites: the connection's id and its outbox.
    sites: HashMap<String, (u64, SiteTx)>,
    /// Studies whose near-budget alert has fired.
    budget_alerted: HashSet<String>,
    /// When each round in progress had its spend recorded (owner clock, ms): the start of
    /// its duration in the metrics. A round resumed after a restart has none.
    round_opened: HashMap<(String, u64), u64>,
    /// Model versions handed to the checkpoint writer and not yet answered.
    checkpoints_pending: HashSet<(String, u64)>,
    /// Studies whose end waits for their last model versions to be on record (so that the
    /// trail and the sites see the last round finished before the study ends).
    ends_deferred: HashMap<String, String>,
    exit_when_done: bool,
    /// A failure that ends the run: the ledger or the audit log cannot be written.
    fatal: Option<ServerError>,
    effects: Vec<Effect>,
}

impl<S: StateStore> Owner<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        studies: Studies,
        store: S,
        state_dir: &Path,
        at_rest_key: Arc<SealKey>,
        audit: AuditHandle,
        metrics: Metrics,
        noise: NoiseSource,
        exit_when_done: bool,
    ) -> Self {
        let owner = Self {
            studies,
            spools: Spools::default(),
            noise,
            ctx: Ctx {
                store,
                state_dir: state_dir.to_path_buf(),
                at_rest_key,
                audit,
                metrics,
                sites: HashMap::new(),
                budget_alerted: HashSet::new(),
                round_opened: HashMap::new(),
                checkpoints_pending: HashSet::new(),
                ends_deferred: HashMap::new(),
                exit_when_done,
                fatal: None,
                effects: Vec::new(),
            },
        };
        // Before the endpoint is up: the first scrape sees the ledger's figures.
        owner.ctx.load_privacy_metrics();
        owner
    }

    pub fn studies(&self) -> &Studies {
        &self.studies
    }

    pub fn store(&self) -> &S {
        &self.ctx.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.ctx.store
    }

    /// The first step: publishes the directory and lets every study decide what it can
    /// without an event (a resumed study whose rounds are all done ends now).
    pub fn start(&mut self, now: Now) -> Vec<Effect> {
        self.ctx
            .effects
            .push(Effect::Publish(self.studies.directory()));
        for id in self.studies.ids() {
            self.feed(&id, Input::Tick, now);
        }
        std::mem::take(&mut self.ctx.effects)
    }

    /// When the owner next needs an [`Event::Tick`] if no other event comes.
    pub fn next_deadline(&self) -> Option<u64> {
        self.studies.next_deadline()
    }

    /// Whether the run is over: a fatal failure, or (with `exit_when_done`) every study
    /// has ended.
    pub fn is_done(&self) -> bool {
        self.ctx.fatal.is_some()
            || (self.ctx.exit_when_done
                && self.studies.all_finished()
                && !self.checkpoints_pending())
    }

    /// Whether a model version is still being written (a run that stops waits for it, unless
    /// a fatal failure ended it).
    pub fn checkpoints_pending(&self) -> bool {
        self.ctx.fatal.is_none() && !self.ctx.checkpoints_pending.is_empty()
    }

    /// The store, once the owner has stopped.
    pub fn into_store(self) -> S {
        self.ctx.store
    }

    /// How the run ended.
    pub fn into_result(self) -> Result<(), ServerError> {
        match self.ctx.fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Handles one event at time `now`; returns what the glue must do, in order.
    pub fn step(&mut self, event: Event, now: Now) -> Vec<Effect> {
        match event {
            Event::Admin(cmd) => {
                let (response, touched) = self.admin_write(cmd.request, &cmd.by, now);
                // Before any announcement leaves: the sites' answers must find the study.
                self.ctx
                    .effects
                    .insert(0, Effect::Publish(self.studies.directory()));
                self.ctx.effects.insert(
                    1,
                    Effect::Reply {
                        to: cmd.reply,
                        response,
                    },
                );
                // A new or changed study may have something to decide at once.
                if let Some(study) = touched {
                    // Its budget in the metrics (created, or lowered by a change).
                    if let Some(rt) = self.studies.get(&study) {
                        self.ctx
                            .metrics
                            .set_study(rt.engine().config(), Default::default());
                    }
                    self.feed(&study, Input::Tick, now);
                }
            }
            Event::Tick => {
                for id in self.studies.ids() {
                    self.feed(&id, Input::Tick, now);
                }
            }
            Event::Connected { site, conn_id, tx } => {
                // A study created before this is in the welcome, one created after is
                // announced to the site (it is in `sites` by then).
                let welcome = CoordinatorMessage::Welcome {
                    version: PROTOCOL_VERSION,
                    studies: self.studies.announcements_for(&site),
                };
                self.ctx.effects.push(Effect::Send {
                    site: site.clone(),
                    tx: tx.clone(),
                    msg: Outgoing::Message(welcome),
                });
                self.ctx.sites.insert(site, (conn_id, tx));
            }
            Event::Disconnected { site, conn_id } => {
                if self
                    .ctx
                    .sites
                    .get(&site)
                    .is_some_and(|(id, _)| *id == conn_id)
                {
                    self.ctx.sites.remove(&site);
                    for id in self.studies.ids() {
                        let gone = Input::SiteGone { site: site.clone() };
                        self.feed(&id, gone, now);
                    }
                }
            }
            Event::Study { study, input } => {
                if let Input::SiteReady { site, records } = &input {
                    if let Err(e) = self.ctx.store.set_site_records(&study, site, *records) {
                        tracing::error!(%study, %site, error = %e, "cannot record the site's record count");
                    }
                }
                self.feed(&study, input, now);
            }
            Event::Upload {
                study,
                input,
                spool,
                permit,
            } => {
                let began = spool.as_ref().map(|(id, _)| *id);
                if let Some((id, spool)) = spool {
                    self.spools.insert(id, spool);
                }
                let ended = match &input {
                    Input::UpdateEnd { upload, .. } => Some(*upload),
                    _ => None,
                };
                self.feed(&study, input, now);
                // Held until the chunk it came with is folded.
                drop(permit);
                if let Some(id) = began {
                    // Not admitted: its sender stops and drains the rest.
                    let admitted = self
                        .studies
                        .iter()
                        .any(|(_, s)| s.engine().is_receiving(id));
                    if !admitted {
                        self.spools.refuse(id);
                    }
                }
                if let Some(id) = ended {
                    self.spools.remove(id);
                }
            }
            Event::CheckpointWritten(done) => self.checkpoint_written(*done, now),
            // The glue stops on it; a step has nothing to do.
            Event::Shutdown => {}
        }
        std::mem::take(&mut self.ctx.effects)
    }

    /// Records a model version the writer has made durable (the round is finished on the
    /// audit log, then the version and its lineage in the store), or stops the study whose
    /// checkpoint could not be written.
    fn checkpoint_written(&mut self, done: CheckpointDone, now: Now) {
        let Self { studies, ctx, .. } = self;
        let study = done.version.study.clone();
        // A version whose study was stopped by a failure after it was handed over (an
        // earlier version's write, the ledger) is not recorded: its round stays reserved
        // and is aborted at the next start, like any round after the failure.
        if !ctx
            .checkpoints_pending
            .remove(&(study.clone(), done.version.round))
        {
            return;
        }
        let Some(rt) = studies.get_mut(&study) else {
            return;
        };
        let engine = &mut rt.engine;
        let mut result = ctx.record_model_version(engine, done, now);
        let written = !ctx.checkpoints_pending.iter().any(|(s, _)| *s == study);
        if result.is_ok() && written {
            if let Some(reason) = ctx.ends_deferred.remove(&study) {
                result = ctx.end_study(&study, engine, reason);
            }
        }
        if let Err(e) = result {
            ctx.fail_closed(&study, engine, e);
        }
    }

    /// Feeds one study an input and carries out everything that follows.
    fn feed(&mut self, study: &str, input: Input, now: Now) {
        let Self {
            studies,
            spools,
            noise,
            ctx,
        } = self;
        let Some(rt) = studies.get_mut(study) else {
            return;
        };
        let StudyRuntime { engine, meta } = rt;
        let result = round::drive(engine, input, now.ms, noise, spools, |eng, action| {
            ctx.act(study, eng, meta, action, now)
        });
        meta.drop_task_body();
        if let Err(e) = result {
            ctx.fail_closed(study, engine, e);
        }
    }
}

impl<S: StateStore> Ctx<S> {
    /// Every study's privacy figures from the ledger, once at start: each site's epsilon by
    /// the study's accountant over the site's recorded spends. A study whose figures cannot
    /// be computed is left out of the metrics (and said so in the log); it still runs.
    fn load_privacy_metrics(&self) {
        let rows = match self.store.studies() {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the studies for the metrics");
                return;
            }
        };
        for row in rows {
            let figures = fedpriv_common::config::StudyConfig::from_toml(&row.config_toml)
                .map_err(|e| e.to_string())
                .and_then(|cfg| {
                    let sites = self
                        .store
                        .spent_by_site(&row.id)
                        .map_err(|e| e.to_string())?;
                    let mut out = std::collections::BTreeMap::new();
                    for (site, events) in sites {
                        let eps = if events.is_empty() {
                            0.0
                        } else {
                            fedpriv_common::dp::accountant::epsilon(
                                cfg.privacy.accountant,
                                &events,
                                cfg.privacy.delta,
                            )
                            .map_err(|e| e.to_string())?
                        };
                        out.insert(site, eps);
                    }
                    Ok((cfg, out))
                });
            match figures {
                Ok((cfg, sites)) => self.metrics.set_study(&cfg, sites),
                Err(e) => {
                    tracing::warn!(study = %row.id, error = %e, "no privacy metrics for this study")
                }
            }
        }
    }

    /// Queues `msg` for each of `study`'s enrolled sites that is connected.
    fn broadcast(&mut self, enrolled: &[String], msg: &CoordinatorMessage) {
        for site in enrolled {
            if let Some((_, tx)) = self.sites.get(site) {
                self.effects.push(Effect::Send {
                    site: site.clone(),
                    tx: tx.clone(),
                    msg: Outgoing::Message(msg.clone()),
                });
            }
        }
    }

    /// Without a durable ledger no task may leave: the study stops, its sites are told, and
    /// a database or audit log that cannot be written ends the run.
    fn fail_closed(&mut self, study: &str, engine: &mut StudyEngine, e: ActError) {
        tracing::error!(%study, error = %e, "state write failed; stopping the study");
        let reason = format!("stopped: the state database failed ({e})");
        let _ = self
            .store
            .set_study_status(study, StudyStatus::Stopped, Some(&reason));
        engine.mark_ended(&reason);
        self.ends_deferred.remove(study);
        self.checkpoints_pending.retain(|(s, _)| s != study);
        self.tell_sites_ended(study, engine, reason);
        match e {
            ActError::Store(e @ (StoreError::Sqlite(_) | StoreError::Io { .. })) => {
                self.fatal.get_or_insert(ServerError::Store(e));
            }
            ActError::Audit(e) => {
                self.fatal
                    .get_or_insert(ServerError::Internal(e.to_string()));
            }
            ActError::Store(_) => {}
        }
    }

    /// The last of a study's end, however it ended: no round of it is open any more, and
    /// its enrolled sites are told.
    fn tell_sites_ended(&mut self, study: &str, eng: &StudyEngine, reason: String) {
        self.round_opened.retain(|(s, _), _| s != study);
        let ended = CoordinatorMessage::StudyEnded {
            study: study.to_string(),
            reason,
        };
        let enrolled = eng.config().enrolled.clone();
        self.broadcast(&enrolled, &ended);
    }

    /// A round's duration into the metrics, if this process saw its spend recorded.
    fn round_closed(&mut self, study: &str, round: u64, outcome: &'static str, now: Now) {
        if let Some(opened) = self.round_opened.remove(&(study.to_string(), round)) {
            let seconds = now.ms.saturating_sub(opened) as f64 / 1000.0;
            self.metrics.observe_round(study, outcome, seconds);
        }
    }

    fn record<D: fedpriv_common::audit::details::Details>(
        &self,
        details: &D,
    ) -> Result<u64, AuditFailed> {
        self.audit.record_blocking(COORDINATOR, details)
    }

    /// A study's end: on the audit log, in the store, told to its sites and observers.
    fn end_study(
        &mut self,
        study: &str,
        eng: &StudyEngine,
        reason: String,
    ) -> Result<(), ActError> {
        self.record(&StudyStopped {
            study: study.to_string(),
            by: COORDINATOR.to_string(),
            reason: reason.clone(),
        })?;
        self.store
            .set_study_status(study, StudyStatus::Completed, Some(&reason))?;
        tracing::info!(%study, %reason, "study ended");
        self.tell_sites_ended(study, eng, reason.clone());
        self.effects.push(Effect::Notify(Notification::StudyEnded {
            study: study.to_string(),
            reason,
            cause: eng.end_cause(),
        }));
        Ok(())
    }

    /// The second half of a checkpoint, once its file is durable: the round is finished on
    /// the audit log, then the model version is recorded in the store.
    fn record_model_version(
        &mut self,
        eng: &StudyEngine,
        done: CheckpointDone,
        now: Now,
    ) -> Result<(), ActError> {
        let CheckpointDone {
            version:
                ModelVersion {
                    study,
                    round,
                    model,
                    contributors,
                    epsilon,
                },
            optimizer,
            result,
        } = done;
        let (rel, digest) = result.map_err(|(path, source)| StoreError::Io { path, source })?;
        // The model version exists once the store commits it: record it first.
        self.record(&RoundFinished {
            study: study.clone(),
            round,
            outcome: RoundOutcome::Completed {
                model_version: round,
                file: rel.clone(),
                sha256: digest.clone(),
                contributors: contributors.clone(),
                epsilon,
            },
        })?;
        self.store
            .complete_round(&study, round, &rel, &digest, &contributors, now.unix)?;
        if optimizer {
            checkpoint::remove_older_optimizer_states(&self.state_dir, &study, round);
        }
        self.metrics
            .inc(metrics::ROUNDS_COMPLETED, &[("study", study.as_str())]);
        self.round_closed(&study, round, metrics::outcome::COMPLETED, now);
        let budget = eng.config().privacy.epsilon.get();
        tracing::info!(%study, round, sites = contributors.len(), epsilon = format!("{epsilon:.4}"), budget, "round completed");
        self.effects
            .push(Effect::Notify(Notification::RoundCompleted {
                study,
                round,
                model,
                contributors,
                epsilon,
                budget,
            }));
        Ok(())
    }

    /// Carries out one action. Returns an input to feed back (the spend's commit, a site
    /// that is gone).
    fn act(
        &mut self,
        study: &str,
        eng: &mut StudyEngine,
        meta: &mut StudyMeta,
        action: Action,
        now: Now,
    ) -> Result<Option<Input>, ActError> {
        let metrics = self.metrics.clone();
        match action {
            Action::RecordSpend { round, entries } => {
                let rows: Vec<Charge> = entries
                    .iter()
                    .map(|e| Charge {
                        site: e.site.clone(),
                        event: e.event,
                        evaluation: e.evaluation,
                        epsilon_after: e.epsilon_after,
                    })
                    .collect();
                self.store.record_charges(study, round, &rows, now.unix)?;
                // A further call for the same round (a late site) keeps the first time.
                self.round_opened
                    .entry((study.to_string(), round))
                    .or_insert(now.ms);
                for e in &entries {
                    metrics.set_site_epsilon(study, &e.site, e.epsilon_after);
                }
                // Both durable before `SpendCommitted` lets the round's tasks leave.
                let delta = eng.config().privacy.delta.get();
                for e in &entries {
                    self.record(&BudgetSpent {
                        study: study.to_string(),
                        round,
                        site: e.site.clone(),
                        q: e.event.q.get(),
                        sigma: e.event.sigma.get(),
                        steps: e.event.steps,
                        epsilon: e.epsilon_after,
                        delta,
                        evaluation: e.evaluation,
                    })?;
                }
                self.record(&RoundStarted {
                    study: study.to_string(),
                    round,
                    sites: entries.iter().map(|e| e.site.clone()).collect(),
                })?;
                tracing::info!(%study, round, sites = rows.len(), "budget spent and recorded");
                let budget = eng.config().privacy.epsilon.get();
                let worst = entries.iter().map(|e| e.epsilon_after).fold(0.0, f64::max);
                if worst >= BUDGET_ALERT_FRACTION * budget
                    && self.budget_alerted.insert(study.to_string())
                {
                    metrics.alert(
                        Some(&self.audit),
                        metrics::alert::BUDGET_NEAR,
                        study,
                        &format!("epsilon {worst:.4} of {budget} spent after round {round}"),
                    );
                }
                return Ok(Some(Input::SpendCommitted { round }));
            }
            Action::SendTask { site, task, model } => {
                let round = task.round;
                match self.sites.get(&site) {
                    Some((_, tx)) if !tx.is_closed() => {
                        let body = meta.task_body(round, model, task.header.dtype);
                        self.effects.push(Effect::Send {
                            site: site.clone(),
                            tx: tx.clone(),
                            msg: Outgoing::WithModel(CoordinatorMessage::Task(task), body),
                        });
                        tracing::info!(%study, round, %site, "task sent");
                    }
                    _ => {
                        tracing::warn!(%study, round, %site, "site went away before its task could be sent");
                        return Ok(Some(Input::SiteGone { site }));
                    }
                }
            }
            Action::UpdateAccepted {
                site,
                round,
                norm: None,
            } => {
                tracing::info!(%study, round, %site, "update accepted");
                metrics.inc(metrics::UPDATES_ACCEPTED, &[("study", study)]);
            }
            Action::UpdateAccepted {
                site,
                round,
                norm: Some(norm),
            } => {
                tracing::info!(%study, round, %site, norm = format!("{norm:.3}"), "update accepted");
                metrics.inc(metrics::UPDATES_ACCEPTED, &[("study", study)]);
                let floor = round::norm_floor(eng.config(), meta.spec().num_values());
                if norm < floor {
                    metrics.alert(
                        Some(&self.audit),
                        metrics::alert::NORM_ANOMALY,
                        &format!("site/{site}"),
                        &format!("study {study} round {round}: update norm {norm:.4} is below {floor:.4}, the least the study's noise allows: the site may not be adding its noise"),
                    );
                }
            }
            Action::UpdateRejected {
                site,
                round,
                reason,
            } => {
                tracing::warn!(%study, round, %site, %reason, "update rejected");
                metrics.inc(metrics::UPDATES_REJECTED, &[("study", study)]);
                self.record(&UpdateRejected {
                    study: study.to_string(),
                    round,
                    site: site.clone(),
                    reason: reason.to_string(),
                })?;
                if reason.is_norm() {
                    metrics.alert(
                        Some(&self.audit),
                        metrics::alert::NORM_ANOMALY,
                        &format!("site/{site}"),
                        &format!("study {study} round {round}: {reason}"),
                    );
                }
            }
            // Answered from the spools by `round::drive` before it got here.
            Action::Unfold {
                site, round, len, ..
            } => {
                tracing::info!(%study, round, %site, values = len, "partly folded update taken back out of the aggregate (or the round's aggregate is lost if it could not be read back)");
            }
            Action::SiteDeclined {
                site,
                round,
                reason,
            } => {
                tracing::info!(%study, round, %site, reason = reason.as_str(), "site declined the round")
            }
            Action::Calibrated {
                config,
                worst_site,
                records,
                q,
                steps,
                target,
            } => {
                let sigma = config.privacy.noise_multiplier.get();
                let stored = self
                    .store
                    .study(study)?
                    .ok_or_else(|| StoreError::NotFound(format!("study {study:?}")))?
                    .config_toml;
                let (text, checked) = fedpriv_common::admin::calibrated_study(&stored, sigma)
                    .map_err(|e| StoreError::Invalid(format!("calibrating {study}: {e}")))?;
                if checked != *config {
                    return Err(StoreError::Invalid(format!(
                        "calibrating {study}: the stored study does not match the running one"
                    ))
                    .into());
                }
                // On record before the new terms go out: the chosen sigma and why.
                self.record(&StudyChanged {
                    study: study.to_string(),
                    by: COORDINATOR.to_string(),
                    changes: vec![
                        ("privacy.noise_multiplier".into(), sigma.to_string()),
                        (
                            "why".into(),
                            format!("target epsilon {target} over {steps} DP-SGD steps at q = {q} (site {worst_site}, {records} declared records, the smallest)"),
                        ),
                    ],
                    sha256: fedpriv_common::digest::sha256_hex(text.as_bytes()),
                })?;
                self.store.set_study_config(study, &text)?;
                tracing::info!(%study, sigma, target, q, %worst_site, records, steps, "noise calibrated from the sites' declared sizes; terms announced again");
                let ann = meta.reannounce(&config).clone();
                let enrolled = config.enrolled.clone();
                self.broadcast(
                    &enrolled,
                    &CoordinatorMessage::StudyAnnounced(Box::new(ann)),
                );
            }
            Action::EvaluationRejected {
                site,
                round,
                reason,
            } => {
                tracing::warn!(%study, round, %site, %reason, "evaluation refused");
                metrics.inc(metrics::UPDATES_REJECTED, &[("study", study)]);
                self.record(&UpdateRejected {
                    study: study.to_string(),
                    round,
                    site,
                    reason: format!("evaluation: {reason}"),
                })?;
            }
            Action::Evaluated {
                round,
                model_round,
                sites,
                sum,
                summary,
            } => {
                let (metric, value) = summary.headline();
                let row = EvaluationRow {
                    round,
                    model_round,
                    sites,
                    sum,
                    summary: summary.clone(),
                    recorded_at: now.unix,
                };
                self.store.record_evaluation(study, &row)?;
                self.record(&ModelEvaluated {
                    study: study.to_string(),
                    round,
                    model_version: model_round,
                    sites: row.sites.len() as u64,
                    metric: metric.to_string(),
                    value,
                    noise_sd: summary.noise_sd,
                })?;
                tracing::info!(
                    %study,
                    round,
                    model_version = model_round,
                    sites = row.sites.len(),
                    metric,
                    value = format!("{value:.4}"),
                    mean_loss = format!("{:.4}", summary.mean_loss),
                    noise_sd = format!("{:.2}", summary.noise_sd),
                    "DP evaluation"
                );
                self.effects.push(Effect::Notify(Notification::Evaluated {
                    study: study.to_string(),
                    round,
                    model_round,
                    summary,
                }));
            }
            Action::SiteExcluded { site, reason } => {
                tracing::warn!(%study, %site, %reason, "site left out of the study")
            }
            Action::Checkpoint {
                round,
                model,
                contributors,
                epsilon,
            } => {
                if let Some(index) = fedpriv_common::model::first_non_finite(&model) {
                    return Err(StoreError::Invalid(format!(
                        "round {round}: model value {index} is not finite"
                    ))
                    .into());
                }
                // The model describes itself: its study, data contract, layers and guarantee.
                let card =
                    fedpriv_common::model_card::ModelCard::for_round(eng.config(), round, epsilon)
                        .metadata();
                self.checkpoints_pending.insert((study.to_string(), round));
                self.effects
                    .push(Effect::WriteCheckpoint(Box::new(CheckpointJob {
                        version: ModelVersion {
                            study: study.to_string(),
                            round,
                            model,
                            contributors,
                            epsilon,
                        },
                        spec: meta.spec().clone(),
                        card,
                        optimizer: eng.optimizer_state(),
                        key: Arc::clone(&self.at_rest_key),
                        state_dir: self.state_dir.clone(),
                    })));
            }
            Action::RoundAborted { round, reason } => {
                self.record(&RoundFinished {
                    study: study.to_string(),
                    round,
                    outcome: RoundOutcome::Aborted {
                        reason: reason.clone(),
                    },
                })?;
                metrics.inc(metrics::ROUNDS_ABORTED, &[("study", study)]);
                self.round_closed(study, round, metrics::outcome::ABORTED, now);
                self.store.abort_round(study, round, &reason, now.unix)?;
                tracing::warn!(%study, round, %reason, "round aborted");
                self.effects
                    .push(Effect::Notify(Notification::RoundAborted {
                        study: study.to_string(),
                        round,
                        reason,
                    }));
            }
            Action::StudyEnded { reason } => {
                if self.checkpoints_pending.iter().any(|(s, _)| s == study) {
                    self.ends_deferred.insert(study.to_string(), reason);
                } else {
                    self.end_study(study, eng, reason)?;
                }
            }
        }
        Ok(None)
    }
}

/// Where the effects go.
#[derive(Debug)]
pub struct Outlets {
    pub directory: watch::Sender<Directory>,
    pub notify: Option<mpsc::UnboundedSender<Notification>>,
    pub checkpoints: Checkpointer,
}

impl Outlets {
    /// Carries out a step's effects, in order. None of them blocks.
    pub fn carry_out(&self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send { site, tx, msg } => {
                    if tx.send(msg).is_err() {
                        // Its connection ended; the owner hears of it as `Disconnected`.
                        tracing::debug!(%site, "site's writer is gone; message dropped");
                    }
                }
                Effect::Notify(n) => {
                    if let Some(tx) = &self.notify {
                        let _ = tx.send(n);
                    }
                }
                Effect::Reply { to, response } => {
                    let _ = to.send(response);
                }
                Effect::Publish(dir) => {
                    self.directory.send_replace(dir);
                }
                Effect::WriteCheckpoint(job) => self.checkpoints.submit(*job),
            }
        }
    }
}

/// The owner's clock: milliseconds since it started, and Unix seconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: Instant,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    pub fn now(&self) -> Now {
        Now {
            ms: self.started.elapsed().as_millis() as u64,
            unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }
}

/// The owner's loop (the glue around [`Owner::step`]): runs until `Shutdown`, until every
/// sender of `inbox` is gone, or until the owner is done, then waits for the model versions
/// still being written; returns how the run ended. Every
/// few seconds it also writes the metrics file and the refusal summaries that are due.
pub fn run<S: StateStore>(
    mut owner: Owner<S>,
    inbox: Receiver<Event>,
    outlets: &Outlets,
    refusals: &Refusals,
) -> Result<(), ServerError> {
    let clock = Clock::start();
    outlets.carry_out(owner.start(clock.now()));
    let mut housekeeping_at = Instant::now() + HOUSEKEEPING;
    while !owner.is_done() {
        let now = clock.now();
        let until_deadline = owner
            .next_deadline()
            .map(|d| Duration::from_millis(d.saturating_sub(now.ms)))
            .unwrap_or(HOUSEKEEPING);
        let until_housekeeping = housekeeping_at.saturating_duration_since(Instant::now());
        // A few milliseconds at least: a deadline just past is met by the next tick.
        let wait = until_deadline
            .min(until_housekeeping)
            .max(Duration::from_millis(2));
        let event = match inbox.recv_timeout(wait) {
            Ok(Event::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => Event::Tick,
        };
        if Instant::now() >= housekeeping_at {
            housekeeping_at = Instant::now() + HOUSEKEEPING;
            refusals.flush(false);
            if let Err(e) = owner.ctx.metrics.write_file(&owner.ctx.state_dir) {
                tracing::warn!(error = %e, "cannot write metrics.prom");
            }
        }
        outlets.carry_out(owner.step(event, clock.now()));
    }
    // A safe point: the model versions being written are finished and recorded first
    // (every job is answered, a failed one too). Nothing else is taken on now; a second
    // shutdown stops the wait, leaving those rounds to be aborted at the next start.
    while owner.checkpoints_pending() {
        match inbox.recv() {
            Ok(done @ Event::CheckpointWritten(_)) => {
                outlets.carry_out(owner.step(done, clock.now()))
            }
            Ok(Event::Shutdown) | Err(_) => break,
            Ok(_) => {}
        }
    }
    owner.into_result()
}
