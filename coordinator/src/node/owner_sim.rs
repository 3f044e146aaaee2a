//! Simulation of the studies' owner on the path production uses: [`Owner::step`] over the
//! real store (SQLite in a temporary directory) with failures injected into its writes, the
//! real audit writer, real spool files and checkpoints; fake sites that answer each task by
//! streaming their update in chunks of random sizes (some cut off, some never sent), and a
//! virtual clock that jumps to the next event or to the owner's next deadline, as quinn's
//! tests drive a connection over a `Pair`.
//!
//! After every step: no effect sends a round's task unless that round's spend for that
//! site is committed in the store, no site's recorded spend is above the budget, a study
//! whose write failed takes no further round, and a failure of the database itself ends the
//! run.
#![allow(clippy::unwrap_used)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::path::Path;
use std::sync::Arc;

use fedpriv_common::config::StudyConfig;
use fedpriv_common::dp::accountant;
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::dp::SgmEvent;
use fedpriv_common::protocol::{CoordinatorMessage, DeclineReason};
use fedpriv_common::seal::SealKey;
use fedpriv_common::test_util::StudyBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::owner::{Effect, Owner};
use super::spool::{Spool, SpoolMemory};
use super::state::StateStore;
use super::studies;
use super::{Event, Now};
use crate::audit::{AuditHandle, AuditThread};
use crate::metrics::Metrics;
use crate::round::Input;
use crate::store::{Charge, EvaluationRow, RoundRow, Store, StoreError, StudyRow, StudyStatus};

/// How a write of the faulty store fails.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Refused before anything was written (a conflict: the study stops, the run goes on).
    Refused,
    /// The disk failed before the write (the run ends).
    Disk,
    /// Written, but the caller hears of an error (an fsync error after the commit).
    AfterCommit,
}

/// The real store, with failures injected into its writes.
struct FaultyStore {
    inner: Store,
    rng: ChaCha8Rng,
    /// Chance that a write fails.
    rate: f64,
    /// Writes that failed, and how.
    faults: Vec<(&'static str, Fault)>,
}

impl FaultyStore {
    fn fault(&mut self, op: &'static str) -> Option<Fault> {
        if self.rate == 0.0 || !self.rng.random_bool(self.rate) {
            return None;
        }
        let fault = match self.rng.random_range(0..3) {
            0 => Fault::Refused,
            1 => Fault::Disk,
            _ => Fault::AfterCommit,
        };
        self.faults.push((op, fault));
        Some(fault)
    }

    fn error(op: &str, fault: Fault) -> StoreError {
        match fault {
            Fault::Refused => StoreError::Conflict(format!("injected: {op} refused")),
            Fault::Disk | Fault::AfterCommit => StoreError::Io {
                path: "coordinator.db".into(),
                source: std::io::Error::other(format!("injected: {op} failed")),
            },
        }
    }

    /// Runs a write under the fault plan.
    fn write(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Store) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        match self.fault(op) {
            None => f(&mut self.inner),
            Some(Fault::AfterCommit) => {
                f(&mut self.inner)?;
                Err(Self::error(op, Fault::AfterCommit))
            }
            Some(fault) => Err(Self::error(op, fault)),
        }
    }
}

impl StateStore for FaultyStore {
    fn study_instance(&mut self, id: &str, fresh: &str) -> Result<String, StoreError> {
        self.inner.study_instance(id, fresh)
    }
    fn study(&self, id: &str) -> Result<Option<StudyRow>, StoreError> {
        self.inner.study(id)
    }
    fn studies(&self) -> Result<Vec<StudyRow>, StoreError> {
        self.inner.studies()
    }
    fn create_study(
        &mut self,
        id: &str,
        config_toml: &str,
        enrolled: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner.create_study(id, config_toml, enrolled, now)
    }
    fn set_study_config(&mut self, id: &str, config_toml: &str) -> Result<(), StoreError> {
        self.write("set_study_config", |s| s.set_study_config(id, config_toml))
    }
    fn set_study_status(
        &mut self,
        id: &str,
        status: StudyStatus,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write("set_study_status", |s| {
            s.set_study_status(id, status, reason)
        })
    }
    fn record_charges(
        &mut self,
        study: &str,
        round: u64,
        entries: &[Charge],
        now: i64,
    ) -> Result<(), StoreError> {
        self.write("record_spend", |s| {
            s.record_charges(study, round, entries, now)
        })
    }
    fn record_evaluation(&mut self, study: &str, e: &EvaluationRow) -> Result<(), StoreError> {
        self.write("record_evaluation", |s| {
            StateStore::record_evaluation(s, study, e)
        })
    }
    fn complete_round(
        &mut self,
        study: &str,
        round: u64,
        model_file: &str,
        sha256: &str,
        contributors: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        self.write("complete_round", |s| {
            s.complete_round(study, round, model_file, sha256, contributors, now)
        })
    }
    fn abort_round(
        &mut self,
        study: &str,
        round: u64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write("abort_round", |s| s.abort_round(study, round, reason, now))
    }
    fn last_completed_round(
        &self,
        study: &str,
    ) -> Result<Option<(u64, String, String)>, StoreError> {
        self.inner.last_completed_round(study)
    }
    fn rounds(&self, study: &str) -> Result<Vec<RoundRow>, StoreError> {
        self.inner.rounds(study)
    }
    fn spent_by_site(&self, study: &str) -> Result<BTreeMap<String, Vec<SgmEvent>>, StoreError> {
        self.inner.spent_by_site(study)
    }
    fn site_records(&self, study: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        self.inner.site_records(study)
    }
    // Not injected: a failure here is logged and the round goes on (the site says it again
    // when it reconnects).
    fn set_site_records(&mut self, study: &str, site: &str, n: u64) -> Result<(), StoreError> {
        self.inner.set_site_records(study, site, n)
    }
}

/// What a fake site does with a task.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reply {
    Honest,
    /// The connection drops part-way through the upload.
    CutOff,
    Silent,
    Decline(DeclineReason),
}

const SITES: [&str; 4] = ["s1", "s2", "s3", "s4"];

/// A study the simulations run: four sites, local noise, a budget for several rounds.
fn study_toml(id: &str, rounds: u64, strategy: &str) -> String {
    StudyBuilder::new(id)
        .features(3)
        .rounds(rounds)
        .min_sites(2)
        .round_timeout_secs(10)
        .noise(2.0, 40.0)
        .strategy(strategy)
        .enrolled(SITES)
        .toml()
}

/// The owner, its world and what the checks need.
struct Sim {
    dir: tempfile::TempDir,
    owner: Option<Owner<FaultyStore>>,
    audit: Option<(AuditHandle, AuditThread)>,
    key: Arc<SealKey>,
    rng: ChaCha8Rng,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    seq: u64,
    ticks: BTreeSet<u64>,
    next_upload: u64,
    /// Tasks that left, as (study, site, round).
    tasks: Vec<(String, String, u64)>,
    /// Models released, by study and round.
    released: BTreeMap<(String, u64), Vec<f32>>,
    ended: BTreeMap<String, String>,
    outboxes: Vec<tokio::sync::mpsc::UnboundedReceiver<super::Outgoing>>,
    /// Model versions handed to the writer and not yet answered, as (study, round).
    writing: BTreeSet<(String, u64)>,
    /// Tasks that left while an earlier round's model was still being written.
    overlapped: usize,
    /// When the writer's last answer is due (answers come in order).
    answered: u64,
    /// Checkpoint jobs handed over and not yet written, with when the writer gets to them.
    jobs: std::collections::VecDeque<(u64, super::checkpointer::CheckpointJob)>,
    /// The spools' memory: none for odd seeds (every upload in its sealed file), room for
    /// every upload for even ones.
    spool_memory: Arc<SpoolMemory>,
}

impl Sim {
    fn new(seed: u64, studies: &[String], fault_rate: f64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("spool")).unwrap();
        let key = Arc::new(SealKey::from_bytes(&[9; 32]).unwrap());
        let mut sim = Self {
            dir,
            owner: None,
            audit: None,
            key,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            ticks: BTreeSet::new(),
            next_upload: 1,
            tasks: Vec::new(),
            released: BTreeMap::new(),
            ended: BTreeMap::new(),
            outboxes: Vec::new(),
            writing: BTreeSet::new(),
            overlapped: 0,
            answered: 0,
            jobs: std::collections::VecDeque::new(),
            spool_memory: SpoolMemory::new(if seed.is_multiple_of(2) { 64 << 20 } else { 0 }),
        };
        sim.start(seed, studies, fault_rate);
        sim
    }

    fn now(&self) -> Now {
        Now {
            ms: self.now,
            unix: 1_700_000_000 + (self.now / 1000) as i64,
        }
    }

    /// (Re)starts the owner over the state directory, as a coordinator start does.
    fn start(&mut self, seed: u64, studies: &[String], fault_rate: f64) {
        let state = self.dir.path();
        let store = Store::open(state.join("coordinator.db")).unwrap();
        let log = fedpriv_common::audit_file::AuditLog::open(state.join("audit.log")).unwrap();
        let (audit, thread) = crate::audit::start(log).unwrap();
        let mut store = FaultyStore {
            inner: store,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed),
            rate: 0.0,
            faults: Vec::new(),
        };
        let configs: Vec<(StudyConfig, String)> = studies
            .iter()
            .map(|t| (StudyConfig::from_toml(t).unwrap(), t.clone()))
            .collect();
        let loaded =
            studies::load_studies(&mut store, state, &configs, &self.key, self.now().unix).unwrap();
        store.rate = fault_rate;
        let mut owner = Owner::new(
            loaded,
            store,
            state,
            Arc::clone(&self.key),
            audit.clone(),
            Metrics::new(),
            NoiseSource::insecure_from_seed(seed),
            true,
        );
        let effects = owner.start(self.now());
        self.owner = Some(owner);
        self.audit = Some((audit, thread));
        self.carry_out(effects, &|_, _| Reply::Honest);
        for (i, site) in SITES.iter().enumerate() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            // The writer's end: kept open so the owner sees the site as connected.
            self.outboxes.push(rx);
            let connected = Event::Connected {
                site: site.to_string(),
                conn_id: i as u64 + 1,
                tx,
            };
            self.at(self.now + i as u64, connected);
        }
    }

    /// Stops the owner (between steps, as a shutdown does) and its audit writer.
    fn stop(&mut self) -> Store {
        let owner = self.owner.take().unwrap();
        let (audit, thread) = self.audit.take().unwrap();
        let store = owner_store(owner);
        drop(audit);
        thread.finish();
        self.queue.clear();
        self.events.clear();
        self.ticks.clear();
        // Jobs the writer had not got to are lost, as in a crash.
        self.jobs.clear();
        store
    }

    fn owner(&self) -> &Owner<FaultyStore> {
        self.owner.as_ref().unwrap()
    }

    fn at(&mut self, t: u64, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Streams an update from `t` on as a site connection forwards it: a begin with its
    /// spool, chunks of random sizes (each written to the spool first), an end.
    fn stream(&mut self, t: u64, study: &str, site: &str, round: u64, values: Vec<f32>, cut: bool) {
        let upload = self.next_upload;
        self.next_upload += 1;
        let spool = Spool::new(&self.spool_memory, &self.dir.path().join("spool"), upload);
        let begin = Input::UpdateBegin {
            site: site.to_string(),
            round,
            upload,
        };
        let ev = |input, spool| Event::Upload {
            study: study.to_string(),
            input,
            spool,
            permit: None,
        };
        self.at(t, ev(begin, Some((upload, spool.clone()))));
        let stop = if cut {
            self.rng.random_range(0..values.len())
        } else {
            values.len()
        };
        let (mut at, mut when) = (0usize, t);
        while at < stop {
            let size = self.rng.random_range(1..=values.len()).min(stop - at);
            when += self.rng.random_range(1..30);
            let chunk = values[at..at + size].to_vec();
            spool.write(&chunk, at).unwrap();
            let input = Input::UpdateChunk {
                upload,
                offset: at,
                values: chunk,
            };
            self.at(when, ev(input, None));
            at += size;
        }
        let result = if cut {
            Err("connection lost".to_string())
        } else {
            Ok(())
        };
        self.at(when + 1, ev(Input::UpdateEnd { upload, result }, None));
    }

    /// Carries out a step's effects as the glue and the sites would, checking the
    /// invariants that concern each.
    fn carry_out(&mut self, effects: Vec<Effect>, reply: &dyn Fn(&str, u64) -> Reply) {
        for effect in effects {
            if let Effect::WriteCheckpoint(job) = effect {
                // The writer writes it later, while the next round may be under way, and
                // answers in the order the jobs were handed over (see `run`).
                self.writing
                    .insert((job.version.study.clone(), job.version.round));
                let t = (self.now + self.rng.random_range(1..400)).max(self.answered + 1);
                self.answered = t;
                self.jobs.push_back((t, *job));
                self.at(t, Event::Tick);
                continue;
            }
            let Effect::Send { site, msg, .. } = effect else {
                if let Effect::Notify(super::Notification::RoundCompleted {
                    study,
                    round,
                    model,
                    ..
                }) = effect
                {
                    // Versions are recorded in round order.
                    let last = self.released.keys().rfind(|(s, _)| *s == study);
                    assert!(
                        last.is_none_or(|(_, r)| *r < round),
                        "{study} {round} after {last:?}"
                    );
                    self.released.insert((study, round), model.to_vec());
                }
                continue;
            };
            match msg.message() {
                CoordinatorMessage::Welcome { studies, .. } => {
                    for ann in studies.clone() {
                        self.ready(&ann.study, &site);
                    }
                }
                CoordinatorMessage::Task(task) => {
                    let (study, round) = (task.study.clone(), task.round);
                    // No round of a study whose write failed.
                    let faults = &self.owner().store().faults;
                    assert!(faults.is_empty(), "a task after {faults:?}");
                    // The invariant: the spend that pays for this task is committed.
                    let store = &self.owner().store().inner;
                    let paid = store
                        .ledger(&study)
                        .unwrap()
                        .iter()
                        .any(|r| r.site == site && r.round == round && r.event == task.cost);
                    assert!(
                        paid,
                        "task for {site} in round {round} of {study} left before its spend was committed"
                    );
                    // So is its evaluation's, when it carries one.
                    if let Some(ev) = task.evaluation {
                        let paid = store
                            .evaluation_ledger(&study)
                            .unwrap()
                            .iter()
                            .any(|r| r.site == site && r.round == round && r.event == ev);
                        assert!(
                            paid,
                            "an evaluation for {site} in round {round} of {study} left before its charge was committed"
                        );
                    }
                    let d = task.header.num_values as usize;
                    self.tasks.push((study.clone(), site.clone(), round));
                    if self.writing.iter().any(|(s, r)| *s == study && *r < round) {
                        self.overlapped += 1;
                    }
                    let t = self.now + self.rng.random_range(50..2000);
                    let values: Vec<f32> = (0..d)
                        .map(|_| self.rng.random_range(-0.3f32..0.3))
                        .collect();
                    let answers = matches!(reply(&site, round), Reply::Honest | Reply::CutOff);
                    if task.evaluation.is_some() && answers {
                        // A binary study's vector: [correct, 2 x 2 confusion, loss], noised.
                        let vector: Vec<f64> =
                            (0..6).map(|_| self.rng.random_range(0.0..40.0)).collect();
                        let input = Input::Evaluation {
                            site: site.clone(),
                            round,
                            values: vector,
                        };
                        self.at(
                            t - 1,
                            Event::Study {
                                study: study.clone(),
                                input,
                            },
                        );
                    }
                    match reply(&site, round) {
                        Reply::Honest => self.stream(t, &study, &site, round, values, false),
                        Reply::CutOff => self.stream(t, &study, &site, round, values, true),
                        Reply::Silent => {}
                        Reply::Decline(reason) => {
                            let declined = Event::Study {
                                study,
                                input: Input::Declined {
                                    site: site.clone(),
                                    round,
                                    reason,
                                },
                            };
                            self.at(t, declined);
                        }
                    }
                }
                CoordinatorMessage::StudyEnded { study, reason } => {
                    self.ended.insert(study.clone(), reason.clone());
                }
                // Terms announced again (a calibrated sigma): the site accepts them anew.
                CoordinatorMessage::StudyAnnounced(ann) => self.ready(&ann.study, &site),
                CoordinatorMessage::Refused { .. } => {}
            }
        }
    }

    /// `site` answers an announcement of `study`: ready, with its declared 500 records.
    fn ready(&mut self, study: &str, site: &str) {
        let ready = Event::Study {
            study: study.to_string(),
            input: Input::SiteReady {
                site: site.to_string(),
                records: 500,
            },
        };
        self.at(self.now + 5, ready);
    }

    /// The invariants that hold after every step.
    fn check(&self) {
        let owner = self.owner();
        let store = &owner.store().inner;
        for (id, rt) in owner.studies().iter() {
            let cfg = rt.engine().config();
            for (site, events) in store.spent_by_site(id).unwrap() {
                let eps = accountant::epsilon(cfg.privacy.accountant, &events, cfg.privacy.delta)
                    .unwrap();
                assert!(
                    eps <= cfg.privacy.epsilon.get() + 1e-9,
                    "{site} spent {eps} in {id}"
                );
            }
        }
        // A model version is on record only once its file is on disk.
        for (id, _) in owner.studies().iter() {
            for row in store.rounds(id).unwrap() {
                if row.status == crate::store::RoundStatus::Completed {
                    let path = crate::checkpoint::model_path(self.dir.path(), id, row.round);
                    assert!(
                        path.exists(),
                        "{id} round {} recorded without its file",
                        row.round
                    );
                }
            }
        }
        // A failed write stops its study at once.
        if !owner.store().faults.is_empty() {
            assert!(owner
                .studies()
                .iter()
                .all(|(_, rt)| rt.engine().is_finished()));
        }
    }

    /// Runs until the owner is done or nothing more happens.
    fn run(&mut self, reply: &dyn Fn(&str, u64) -> Reply) {
        self.run_until(reply, &|_| false);
    }

    /// [`Self::run`], stopping early (between steps) once `stop` holds.
    fn run_until(&mut self, reply: &dyn Fn(&str, u64) -> Reply, stop: &dyn Fn(&Sim) -> bool) {
        let mut steps = 0;
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            steps += 1;
            assert!(steps < 200_000, "simulation does not terminate");
            if self.owner().is_done() || stop(self) {
                break;
            }
            // The writer's turn: a job due by now is written (its file appears only now)
            // and answered before this event is taken.
            if self.jobs.front().is_some_and(|(due, _)| *due <= t) {
                let (due, job) = self.jobs.pop_front().unwrap();
                self.queue.push(Reverse((t, seq)));
                self.now = due;
                let mut done = job.write();
                // With faults injected, some checkpoints fail too (a full disk).
                let rate = self.owner().store().rate;
                if rate > 0.0 && self.rng.random_bool(rate / 2.0) {
                    let path = self.dir.path().join("models");
                    let error = std::io::Error::other("injected: checkpoint write failed");
                    done.result = Err((path, error));
                }
                self.at(due, Event::CheckpointWritten(Box::new(done)));
                continue;
            }
            self.now = t;
            let ev = self.events.remove(&seq).unwrap();
            if let Event::Tick = ev {
                self.ticks.remove(&t);
            }
            if let Event::CheckpointWritten(done) = &ev {
                self.writing
                    .remove(&(done.version.study.clone(), done.version.round));
                if done.result.is_err() {
                    let store = self.owner.as_mut().unwrap().store_mut();
                    store.faults.push(("checkpoint", Fault::Disk));
                }
            }
            let now = self.now();
            let effects = self.owner.as_mut().unwrap().step(ev, now);
            self.carry_out(effects, reply);
            self.check();
            if let Some(deadline) = self.owner().next_deadline() {
                let deadline = deadline.max(t);
                if self.ticks.insert(deadline) {
                    self.at(deadline, Event::Tick);
                }
            }
        }
    }
}

/// The store of an owner that has stopped.
fn owner_store(owner: Owner<FaultyStore>) -> Store {
    owner.into_store().inner
}

fn audit_verifies(dir: &Path) {
    let report = fedpriv_common::audit_file::verify_file(dir.join("audit.log")).unwrap();
    assert!(report.is_ok(), "{report}");
}

#[test]
fn streamed_rounds_over_the_real_store_keep_every_invariant() {
    let toml = study_toml("sim", 6, "fedavg");
    let mut sim = Sim::new(1, &[toml], 0.0);
    let reply = |site: &str, round: u64| match (site, round % 3) {
        ("s3", 1) => Reply::CutOff,
        ("s4", 2) => Reply::Silent,
        _ => Reply::Honest,
    };
    sim.run(&reply);
    assert!(sim.owner().is_done());
    let reason = sim.ended.get("sim").cloned().unwrap_or_default();
    assert!(reason.contains("all 6 planned rounds"), "{reason}");
    assert_eq!(sim.released.len(), 6, "{:?}", sim.released.keys());
    // Rounds went on while the previous model was being written.
    assert!(sim.overlapped > 0, "no round overlapped a checkpoint");
    let store = sim.stop();
    assert_eq!(store.lineage("sim").unwrap().len(), 6);
    audit_verifies(sim.dir.path());
}

#[test]
fn injected_store_failures_never_let_a_task_out_unpaid() {
    let (mut failed_runs, mut checkpoint_failures) = (0, 0);
    for seed in 0..24u64 {
        let toml = study_toml("sim", 8, "fedavg");
        let mut sim = Sim::new(100 + seed, &[toml], 0.08);
        let reply = move |site: &str, round: u64| match (site.as_bytes()[1] as u64 * 7
            + round
            + seed)
            % 9
        {
            0 => Reply::CutOff,
            1 => Reply::Silent,
            2 => Reply::Decline(DeclineReason::Internal),
            _ => Reply::Honest,
        };
        // The checks run after every step.
        sim.run(&reply);
        assert!(sim.owner().is_done(), "seed {seed}");
        let faults = sim.owner().store().faults.clone();
        if !faults.is_empty() {
            failed_runs += 1;
            checkpoint_failures += usize::from(faults[0].0 == "checkpoint");
            // The study stopped on the failure and its sites were told why.
            let reason = sim.ended.get("sim").cloned().unwrap_or_default();
            assert!(
                reason.contains("state database failed"),
                "seed {seed}: {faults:?}: {reason}"
            );
            // A failing disk ends the run with its error.
            let disk = faults[0].1 != Fault::Refused;
            let owner = sim.owner.take().unwrap();
            assert_eq!(
                owner.into_result().is_err(),
                disk,
                "seed {seed}: {faults:?}"
            );
            continue;
        }
        sim.stop();
        audit_verifies(sim.dir.path());
    }
    assert!(failed_runs >= 5, "only {failed_runs} runs had a failure");
    // Some of them a checkpoint that could not be written, answered while the next round
    // was under way: the study stopped all the same.
    assert!(checkpoint_failures >= 1, "no checkpoint failed");
}

/// Record-unit studies over the real store with failures injected: one with DP evaluation
/// (every charge of an evaluation committed before its task leaves, checked at every task),
/// one whose sigma the coordinator calibrates from the sites' sizes (terms announced again,
/// accepted anew, stored).
#[test]
fn evaluation_and_calibration_over_the_real_store_keep_every_invariant() {
    let record = |id: &str| {
        StudyBuilder::new(id)
            .features(3)
            .rounds(6)
            .min_sites(2)
            .round_timeout_secs(10)
            .record_unit(3, 20.0)
            .noise(1.5, 40.0)
            .enrolled(SITES)
    };
    let mut clean = 0;
    for seed in 0..10u64 {
        let evaluated = record("ev").evaluation(2, 3.0, 1.0).toml();
        let calibrated = record("cal")
            .toml()
            .replace("noise_multiplier = 1.5", "target_epsilon = 6.0");
        let fault_rate = if seed < 3 { 0.0 } else { 0.05 };
        for (id, toml) in [("ev", evaluated), ("cal", calibrated)] {
            let mut sim = Sim::new(300 + seed, &[toml], fault_rate);
            let reply = move |site: &str, round: u64| match (site.as_bytes()[1] as u64
                + round
                + seed)
                % 7
            {
                0 => Reply::CutOff,
                1 => Reply::Silent,
                _ => Reply::Honest,
            };
            // The checks (every task's charges committed first) run after every step.
            sim.run(&reply);
            assert!(sim.owner().is_done(), "{id} seed {seed}");
            if !sim.owner().store().faults.is_empty() {
                continue;
            }
            clean += 1;
            let store = sim.stop();
            if id == "ev" {
                // Rounds 3 and 5 carried evaluations that arrived and were stored.
                let rounds: Vec<u64> = store
                    .evaluations(id)
                    .unwrap()
                    .iter()
                    .map(|e| e.round)
                    .collect();
                assert_eq!(rounds, vec![3, 5], "seed {seed}");
            } else {
                // The sigma is stored in place of the target, every charge at it.
                let row = store.study(id).unwrap().unwrap();
                let cfg = StudyConfig::from_toml(&row.config_toml).unwrap();
                assert!(cfg.privacy.calibrate_to.is_none(), "seed {seed}");
                assert!(!store.ledger(id).unwrap().is_empty(), "seed {seed}");
                for events in store.spent_by_site(id).unwrap().values() {
                    assert!(events
                        .iter()
                        .all(|e| e.sigma == cfg.privacy.noise_multiplier));
                }
            }
            audit_verifies(sim.dir.path());
        }
    }
    assert!(clean >= 6, "only {clean} clean runs");
}

#[test]
fn a_stop_while_a_checkpoint_is_written_resumes_from_the_last_version_on_file() {
    let toml = study_toml("crash", 8, "fedavg");
    let mut sim = Sim::new(3, std::slice::from_ref(&toml), 0.0);
    // Stop (as a crash would: nothing more is carried out) once a round's tasks have left
    // while the previous model was still being written, after some version is on file.
    let overlapping = |sim: &Sim| {
        !sim.released.is_empty()
            && sim
                .writing
                .iter()
                .any(|(_, w)| sim.tasks.iter().any(|(_, _, r)| r > w))
    };
    sim.run_until(&|_, _| Reply::Honest, &overlapping);
    assert!(overlapping(&sim));
    let unwritten: Vec<u64> = sim.writing.iter().map(|(_, r)| *r).collect();
    assert!(!unwritten.is_empty());
    let mut store = sim.stop();
    let spent_before = store.spent_by_site("crash").unwrap();
    let cfg = StudyConfig::from_toml(&toml).unwrap();
    let loaded = studies::load_studies(
        &mut store,
        sim.dir.path(),
        &[(cfg, toml.clone())],
        &sim.key,
        1_800_000_000,
    )
    .unwrap();
    // The rounds whose models were not on record are aborted; their spends stand.
    let rounds = store.rounds("crash").unwrap();
    for r in &unwritten {
        let row = rounds.iter().find(|row| row.round == *r).unwrap();
        assert_eq!(row.status, crate::store::RoundStatus::Aborted, "round {r}");
    }
    assert_eq!(store.spent_by_site("crash").unwrap(), spent_before);
    // The study resumes from the last version on file: the model released for it.
    let (last, ..) = store
        .last_completed_round("crash")
        .unwrap()
        .unwrap_or_default();
    assert!(unwritten.iter().all(|r| *r > last));
    let engine = loaded.get("crash").unwrap().engine();
    assert_eq!(
        engine.global().as_slice(),
        &sim.released[&("crash".to_string(), last)][..]
    );
    assert_eq!(engine.current_round(), None);
}

#[test]
fn fedadam_resumes_its_moments_after_a_restart() {
    let toml = study_toml("adam", 3, "fedadam");
    let mut sim = Sim::new(7, std::slice::from_ref(&toml), 0.0);
    sim.run(&|_, _| Reply::Honest);
    assert_eq!(sim.released.len(), 3);
    let mut store = sim.stop();
    let models = sim.dir.path().join("models").join("adam");
    // Only the last completed round's state is kept.
    let kept: Vec<String> = std::fs::read_dir(&models)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".optimizer"))
        .collect();
    assert_eq!(kept, ["round-00003.optimizer"]);
    let path = crate::checkpoint::optimizer_path(sim.dir.path(), "adam", 3);
    let saved = crate::checkpoint::read_optimizer_state(&sim.key, &path, "adam", 3).unwrap();
    assert!(saved.iter().any(|&v| v != 0.0));

    // What a restart loads: the engine carries the moments on.
    let cfg = StudyConfig::from_toml(&toml).unwrap();
    let configs = vec![(cfg, toml.clone())];
    let loaded = studies::load_studies(
        &mut store,
        sim.dir.path(),
        &configs,
        &sim.key,
        1_800_000_000,
    )
    .unwrap();
    let engine = loaded.get("adam").unwrap().engine();
    assert_eq!(engine.optimizer_state().unwrap(), saved);
    assert_eq!(saved.len(), 2 * engine.global().len());

    // A state bound to another round does not authenticate; a missing one stops the resume
    // instead of silently resetting the optimiser.
    assert!(crate::checkpoint::read_optimizer_state(&sim.key, &path, "adam", 2).is_err());
    std::fs::remove_file(&path).unwrap();
    let Err(err) = studies::load_studies(
        &mut store,
        sim.dir.path(),
        &configs,
        &sim.key,
        1_800_000_000,
    ) else {
        panic!("a missing optimiser state must stop the resume");
    };
    assert!(err.to_string().contains("FedAdam"), "{err}");
}
