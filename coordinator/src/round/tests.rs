//! Simulation tests: fake sites and a virtual clock drive the state machine through
//! drop-outs, late, duplicate, wrong-round and bad updates, declines and disconnects, and
//! check the invariants after every step.
#![allow(clippy::unwrap_used)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use fedpriv_common::model::TensorSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fedpriv_common::test_util::StudyBuilder;

use super::drive::MemSpools;
use super::*;

const D: usize = 16;

/// The simulations' study: four sites, site-level local noise (sigma 4), a budget of
/// epsilon 6 for up to 40 rounds; `change` adjusts it.
fn config(change: impl FnOnce(StudyBuilder) -> StudyBuilder) -> Arc<StudyConfig> {
    let base = StudyBuilder::new("sim")
        .rounds(40)
        .min_sites(2)
        .round_timeout_secs(10)
        .noise(4.0, 6.0)
        .enrolled(["s1", "s2", "s3", "s4"]);
    Arc::new(change(base).config().unwrap())
}

fn engine(cfg: Arc<StudyConfig>) -> StudyEngine {
    let spec = ModelSpec::new(vec![TensorSpec::new("w", &[D as u64])]).unwrap();
    StudyEngine::new(cfg, spec, vec![0.0; D], 1, BTreeMap::new(), BTreeMap::new())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    Honest,
    Dropout,
    Late,
    Duplicate,
    WrongRound,
    NaN,
    HugeNorm,
    LeaveMidUpload,
    CapReached,
    /// The upload stops part-way: the connection drops.
    CutOff,
}

/// The fake world: a store, sites that stream their updates as the server does (chunks of
/// random sizes, uploads interleaved, some cut off), spools, and a clock that jumps to the
/// next event or to the engine's next deadline (there is no periodic tick: a study that
/// needed one it did not ask for would stall, and the test would see it never end).
struct World {
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Input>,
    seq: u64,
    /// Deadlines a tick is already scheduled for.
    ticks: BTreeSet<u64>,
    spools: MemSpools,
    next_upload: u64,
    committed: BTreeMap<(String, u64), SgmEvent>,
    /// Evaluation charges recorded, and the vectors the sites sent.
    committed_eval: BTreeMap<(String, u64), SgmEvent>,
    eval_sent: BTreeMap<(String, u64), Vec<f64>>,
    evaluated: Vec<(u64, Vec<String>, Vec<f64>)>,
    eval_rejected: Vec<(String, u64)>,
    tasks_sent: BTreeMap<u64, Vec<String>>,
    checkpoints: Vec<(u64, Vec<String>)>,
    accepted: Vec<(String, u64)>,
    rejected: Vec<(String, u64, String)>,
    aborted: Vec<u64>,
    ended: Option<String>,
    rng: ChaCha8Rng,
}

impl World {
    fn new(seed: u64) -> Self {
        Self {
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            ticks: BTreeSet::new(),
            spools: MemSpools::default(),
            next_upload: 1,
            committed: BTreeMap::new(),
            committed_eval: BTreeMap::new(),
            eval_sent: BTreeMap::new(),
            evaluated: Vec::new(),
            eval_rejected: Vec::new(),
            tasks_sent: BTreeMap::new(),
            checkpoints: Vec::new(),
            accepted: Vec::new(),
            rejected: Vec::new(),
            aborted: Vec::new(),
            ended: None,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn at(&mut self, t: u64, input: Input) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.events.insert(self.seq, input);
    }

    /// An honest noised update: small values, well within the norm bound.
    fn update(&mut self) -> Vec<f32> {
        (0..D)
            .map(|_| self.rng.random_range(-0.5f32..0.5))
            .collect()
    }

    /// Streams `values` from `t` on as the server forwards an upload: a begin, chunks of
    /// random sizes a few milliseconds apart, and an end; with `cut_after`, the connection
    /// drops after that many values.
    fn stream(
        &mut self,
        t: u64,
        site: &str,
        round: u64,
        values: Vec<f32>,
        cut_after: Option<usize>,
    ) {
        let upload = self.next_upload;
        self.next_upload += 1;
        let begin = Input::UpdateBegin {
            site: site.to_string(),
            round,
            upload,
        };
        self.at(t, begin);
        let stop = cut_after.unwrap_or(values.len()).min(values.len());
        let (mut at, mut when) = (0usize, t);
        while at < stop {
            let size = self.rng.random_range(1..=D / 2).min(stop - at);
            when += self.rng.random_range(1..20);
            let chunk = Input::UpdateChunk {
                upload,
                offset: at,
                values: values[at..at + size].to_vec(),
            };
            self.at(when, chunk);
            at += size;
        }
        let result = match cut_after {
            Some(_) => Err("connection lost".to_string()),
            None => Ok(()),
        };
        self.at(when + 1, Input::UpdateEnd { upload, result });
    }

    /// Carries out one action, checking the invariants that concern it.
    fn act(&mut self, eng: &StudyEngine, a: Action, behaviour: &dyn Fn(&str, u64) -> Behaviour) {
        let budget = eng.config().privacy.epsilon.get();
        let timeout = eng.config().round_timeout_secs * 1000;
        match a {
            Action::RecordSpend { round, entries } => {
                for e in &entries {
                    // Never record a spend that takes a site over the budget.
                    assert!(e.epsilon_after <= budget, "spend above budget: {e:?}");
                    if let Some(ev) = e.evaluation {
                        self.committed_eval.insert((e.site.clone(), round), ev);
                    }
                    let prev = self.committed.insert((e.site.clone(), round), e.event);
                    assert!(
                        prev.is_none(),
                        "spend recorded twice for {} round {round}",
                        e.site
                    );
                }
                // The store answers a little later.
                let t = self.now + self.rng.random_range(1..50);
                self.at(t, Input::SpendCommitted { round });
            }
            Action::SendTask { site, task, .. } => {
                let round = task.round;
                // The invariant: the cost of a task is durable before the task leaves.
                assert!(
                    self.committed.contains_key(&(site.clone(), round)),
                    "task sent to {site} for round {round} before its spend was recorded"
                );
                assert_eq!(self.committed[&(site.clone(), round)], task.cost);
                // So is its evaluation's.
                assert_eq!(
                    self.committed_eval.get(&(site.clone(), round)).copied(),
                    task.evaluation
                );
                self.tasks_sent.entry(round).or_default().push(site.clone());
                let b = behaviour(&site, round);
                let reply = self.now + self.rng.random_range(100..3000);
                if task.evaluation.is_some() {
                    // A noised vector of the study's layout, sent before the update.
                    let len = evaluation::Layout::of(&eng.config().data).len();
                    let mut v: Vec<f64> = (0..len)
                        .map(|_| self.rng.random_range(-5.0..30.0))
                        .collect();
                    let when = match b {
                        Behaviour::Late => self.now + timeout + 400,
                        _ => reply - 1,
                    };
                    if b == Behaviour::NaN {
                        v[0] = f64::NAN;
                    }
                    if !matches!(b, Behaviour::Dropout | Behaviour::CapReached) {
                        self.at(
                            when,
                            Input::Evaluation {
                                site: site.clone(),
                                round,
                                values: v.clone(),
                            },
                        );
                        if b == Behaviour::Duplicate {
                            self.at(
                                when,
                                Input::Evaluation {
                                    site: site.clone(),
                                    round,
                                    values: v.iter().map(|x| x + 1000.0).collect(),
                                },
                            );
                        }
                        if b == Behaviour::WrongRound {
                            self.at(
                                when,
                                Input::Evaluation {
                                    site: site.clone(),
                                    round: round + 1,
                                    values: v.clone(),
                                },
                            );
                        }
                        if b != Behaviour::NaN && b != Behaviour::Late {
                            self.eval_sent.insert((site.clone(), round), v);
                        }
                    }
                }
                let honest = self.update();
                match b {
                    Behaviour::Honest => self.stream(reply, &site, round, honest, None),
                    Behaviour::Dropout => {}
                    Behaviour::Late => {
                        self.stream(self.now + timeout + 500, &site, round, honest, None)
                    }
                    Behaviour::Duplicate => {
                        self.stream(reply, &site, round, honest.clone(), None);
                        self.stream(reply + 10, &site, round, honest, None);
                    }
                    Behaviour::WrongRound => {
                        let earlier = round.saturating_sub(1);
                        self.stream(reply, &site, earlier, honest.clone(), None);
                        self.stream(reply + 5, &site, round + 1, honest, None);
                    }
                    Behaviour::NaN => {
                        let mut v = honest;
                        v[3] = f32::NAN;
                        self.stream(reply, &site, round, v, None);
                    }
                    Behaviour::HugeNorm => {
                        self.stream(reply, &site, round, vec![1e6f32; D], None);
                    }
                    Behaviour::CutOff => {
                        let cut = self.rng.random_range(0..D);
                        self.stream(reply, &site, round, honest, Some(cut));
                    }
                    Behaviour::LeaveMidUpload => {
                        self.at(reply, Input::SiteGone { site: site.clone() });
                        self.at(reply + 2000, Input::SiteReady { site, records: 100 });
                    }
                    Behaviour::CapReached => self.at(
                        reply,
                        Input::Declined {
                            site,
                            round,
                            reason: DeclineReason::OverCap,
                        },
                    ),
                }
            }
            Action::UpdateAccepted { site, round, .. } => {
                assert!(
                    self.tasks_sent
                        .get(&round)
                        .is_some_and(|s| s.contains(&site)),
                    "accepted an update nobody asked for"
                );
                assert!(
                    !self.accepted.contains(&(site.clone(), round)),
                    "accepted twice"
                );
                self.accepted.push((site, round));
            }
            Action::UpdateRejected {
                site,
                round,
                reason,
            } => self.rejected.push((site, round, reason.to_string())),
            // Answered from the spools by `drive` before it got here.
            Action::Unfold { .. } => {}
            Action::SiteDeclined { .. } | Action::SiteExcluded { .. } => {}
            // The noise is chosen before anyone is charged.
            Action::Calibrated { .. } => assert!(self.committed.is_empty()),
            Action::EvaluationRejected { site, round, .. } => {
                self.eval_rejected.push((site, round));
            }
            Action::Evaluated {
                round,
                model_round,
                sites,
                sum,
                summary,
            } => {
                assert_eq!(model_round + 1, round);
                assert!(
                    !self.evaluated.iter().any(|(r, ..)| *r == round),
                    "evaluated twice"
                );
                // Only charged sites' vectors, each once, summed exactly.
                let mut want = vec![0.0; sum.len()];
                for s in &sites {
                    assert!(
                        self.committed_eval.contains_key(&(s.clone(), round)),
                        "{s}'s evaluation of round {round} was summed without a charge"
                    );
                    let v = &self.eval_sent[&(s.clone(), round)];
                    for (w, x) in want.iter_mut().zip(v) {
                        *w += x;
                    }
                }
                for (a, b) in sum.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-9, "{sum:?} != {want:?}");
                }
                assert_eq!(summary.sites, sites.len());
                self.evaluated.push((round, sites, sum));
            }
            Action::Checkpoint {
                round,
                contributors,
                model,
                epsilon,
            } => {
                assert!(epsilon <= budget);
                assert!(model.iter().all(|v| v.is_finite()));
                for c in &contributors {
                    assert!(
                        self.accepted.contains(&(c.clone(), round)),
                        "{c} in lineage of round {round} without an accepted update"
                    );
                }
                assert!(contributors.len() >= eng.config().min_sites);
                self.checkpoints.push((round, contributors));
            }
            Action::RoundAborted { round, .. } => self.aborted.push(round),
            Action::StudyEnded { reason } => {
                assert!(self.ended.is_none(), "study ended twice");
                self.ended = Some(reason);
            }
        }
    }

    /// The invariants that hold after every step.
    fn check(&self, eng: &StudyEngine) {
        let budget = eng.config().privacy.epsilon.get();
        // The ledger never shows a site above the budget.
        let mut per_site: BTreeMap<&str, Vec<SgmEvent>> = BTreeMap::new();
        for ((s, _), e) in self.committed.iter().chain(&self.committed_eval) {
            per_site.entry(s).or_default().push(*e);
        }
        for (s, ev) in per_site {
            let e = accountant::epsilon(
                eng.config().privacy.accountant,
                &ev,
                eng.config().privacy.delta,
            )
            .unwrap();
            assert!(e <= budget + 1e-9, "{s} spent {e} > {budget}");
        }
    }

    fn run(
        &mut self,
        eng: &mut StudyEngine,
        behaviour: &dyn Fn(&str, u64) -> Behaviour,
        sites: &[&str],
    ) {
        let mut noise = NoiseSource::insecure_from_seed(1);
        for (i, s) in sites.iter().enumerate() {
            self.at(
                i as u64 * 10,
                Input::SiteReady {
                    site: s.to_string(),
                    records: 100,
                },
            );
        }
        // As the owner does when it starts.
        self.at(0, Input::Tick);
        let mut steps = 0;
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            steps += 1;
            assert!(steps < 100_000, "simulation does not terminate");
            self.now = t;
            let input = self.events.remove(&seq).unwrap();
            if let Input::Tick = input {
                self.ticks.remove(&t);
            }
            if let Input::UpdateChunk { upload, values, .. } = &input {
                // Spooled before it is forwarded, as the server does.
                self.spools.spool(*upload, values);
            }
            let mut spools = std::mem::take(&mut self.spools);
            let done = drive(eng, input, t, &mut noise, &mut spools, |eng, a| {
                self.act(eng, a, behaviour);
                Ok::<_, std::convert::Infallible>(None)
            });
            assert!(done.is_ok());
            self.spools = spools;
            self.check(eng);
            // Wake the engine when it asked to be woken, and only then.
            if let Some(deadline) = eng.next_deadline() {
                let deadline = deadline.max(t);
                if self.ticks.insert(deadline) {
                    self.at(deadline, Input::Tick);
                }
            }
        }
    }
}

#[test]
fn honest_sites_run_until_the_budget_is_spent() {
    let mut eng = engine(config(|b| b));
    let mut w = World::new(1);
    w.run(
        &mut eng,
        &|_, _| Behaviour::Honest,
        &["s1", "s2", "s3", "s4"],
    );
    let reason = w.ended.clone().unwrap();
    assert!(reason.contains("budget exhausted"), "{reason}");
    assert!(w.checkpoints.len() > 5, "{} rounds", w.checkpoints.len());
    assert!(w.aborted.is_empty() && w.rejected.is_empty());
    // Every round used every site (the first waited for all four to connect).
    assert!(
        w.checkpoints.iter().all(|(_, c)| c.len() == 4),
        "{:?}",
        w.checkpoints
    );
    // One more round would have gone over: the budget is used, not wasted.
    let ev: Vec<SgmEvent> = w
        .committed
        .iter()
        .filter(|((s, _), _)| s == "s1")
        .map(|(_, e)| *e)
        .collect();
    let mut more = ev.clone();
    more.push(ev[0]);
    let d = eng.config().privacy.delta;
    assert!(accountant::epsilon(eng.config().privacy.accountant, &more, d).unwrap() > 6.0);
}

#[test]
fn planned_rounds_end_the_study_when_budget_is_ample() {
    let mut eng = engine(config(|b| b.rounds(3).epsilon(50.0)));
    let mut w = World::new(2);
    w.run(&mut eng, &|_, _| Behaviour::Honest, &["s1", "s2", "s3"]);
    assert!(w.ended.clone().unwrap().contains("all 3 planned rounds"));
    assert_eq!(w.checkpoints.len(), 3);
    // s4 never connected: it was never charged.
    assert!(!w.committed.keys().any(|(s, _)| s == "s4"));
}

#[test]
fn misbehaving_sites_are_rejected_and_rounds_go_on() {
    for (bad, expect_reject) in [
        (Behaviour::Duplicate, true),
        (Behaviour::WrongRound, true),
        (Behaviour::NaN, true),
        (Behaviour::HugeNorm, true),
        (Behaviour::Late, true),
        (Behaviour::Dropout, false),
        (Behaviour::LeaveMidUpload, false),
        (Behaviour::CutOff, true),
    ] {
        let mut eng = engine(config(|b| b.rounds(6).epsilon(50.0)));
        let mut w = World::new(3);
        let behaviour =
            move |site: &str, _round: u64| if site == "s3" { bad } else { Behaviour::Honest };
        w.run(&mut eng, &behaviour, &["s1", "s2", "s3"]);
        assert!(w.ended.is_some(), "{bad:?}: study did not end");
        assert_eq!(w.checkpoints.len() + w.aborted.len(), 6, "{bad:?}");
        assert!(
            w.aborted.is_empty(),
            "{bad:?}: rounds aborted {:?}",
            w.aborted
        );
        for (round, contributors) in &w.checkpoints {
            let s3_in = contributors.iter().any(|c| c == "s3");
            assert_eq!(
                s3_in,
                bad == Behaviour::Duplicate,
                "{bad:?} round {round}: {contributors:?}"
            );
        }
        assert_eq!(
            w.rejected.iter().any(|(s, ..)| s == "s3"),
            expect_reject,
            "{bad:?}: {:?}",
            w.rejected
        );
        // A dropped or late site still paid: spends are never refunded.
        assert!(w.committed.keys().any(|(s, _)| s == "s3"));
    }
}

#[test]
fn too_few_updates_abort_the_round_without_refund() {
    let mut eng = engine(config(|b| b.rounds(3).epsilon(50.0).min_sites(3)));
    let mut w = World::new(4);
    let behaviour = |site: &str, round: u64| {
        if site != "s1" && round == 2 {
            Behaviour::Dropout
        } else {
            Behaviour::Honest
        }
    };
    w.run(&mut eng, &behaviour, &["s1", "s2", "s3"]);
    assert_eq!(w.aborted, vec![2]);
    assert_eq!(
        w.checkpoints.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(w.committed.keys().filter(|(_, r)| *r == 2).count(), 3);
}

#[test]
fn a_site_at_its_own_cap_sits_out_and_the_study_goes_on() {
    let mut eng = engine(config(|b| b.rounds(5).epsilon(50.0)));
    let mut w = World::new(5);
    let behaviour = |site: &str, round: u64| {
        if site == "s2" && round >= 2 {
            Behaviour::CapReached
        } else {
            Behaviour::Honest
        }
    };
    w.run(&mut eng, &behaviour, &["s1", "s2", "s3"]);
    assert_eq!(w.checkpoints.len(), 5);
    // After declining in round 2, s2 gets no more tasks.
    for r in 3..=5 {
        assert!(!w.tasks_sent[&r].contains(&"s2".to_string()), "round {r}");
    }
}

#[test]
fn study_stops_when_too_few_sites_can_afford_a_round() {
    let mut eng = engine(config(|b| b.min_sites(3)));
    let mut w = World::new(6);
    // s3 and s4 reach their own caps in round 2: only s1 and s2 remain, fewer than 3.
    let behaviour = |site: &str, round: u64| {
        if (site == "s3" || site == "s4") && round >= 2 {
            Behaviour::CapReached
        } else {
            Behaviour::Honest
        }
    };
    w.run(&mut eng, &behaviour, &["s1", "s2", "s3", "s4"]);
    let reason = w.ended.unwrap();
    assert!(reason.contains("needs 3"), "{reason}");
}

#[test]
fn randomised_fault_mix_keeps_every_invariant() {
    let all = [
        Behaviour::Honest,
        Behaviour::Honest,
        Behaviour::Honest,
        Behaviour::Dropout,
        Behaviour::Late,
        Behaviour::Duplicate,
        Behaviour::WrongRound,
        Behaviour::NaN,
        Behaviour::HugeNorm,
        Behaviour::LeaveMidUpload,
        Behaviour::CutOff,
    ];
    for seed in 0..12u64 {
        let cfg = if seed % 2 == 0 {
            config(|b| b)
        } else {
            config(|b| b.placement("central").noise_multiplier(1.5))
        };
        let mut eng = engine(cfg);
        let mut w = World::new(100 + seed);
        let table: Vec<Behaviour> = {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..400)
                .map(|_| all[r.random_range(0..all.len())])
                .collect()
        };
        let behaviour = move |site: &str, round: u64| {
            let i = site.as_bytes()[1] as usize * 97 + round as usize;
            table[i % table.len()]
        };
        w.run(&mut eng, &behaviour, &["s1", "s2", "s3", "s4"]);
        assert!(w.ended.is_some(), "seed {seed}: did not end");
    }
}

#[test]
fn record_unit_refuses_sites_too_small_for_delta() {
    let cfg = config(|b| b.record_unit(2, 4.0).delta(0.002));
    let mut eng = engine(cfg);
    let mut noise = NoiseSource::insecure_from_seed(1);
    // 1000 records: delta 0.002 is not below 1/1000.
    let out = eng.handle(
        Input::SiteReady {
            site: "s1".into(),
            records: 1000,
        },
        0,
        &mut noise,
    );
    assert!(matches!(&out[..], [Action::SiteExcluded { .. }]), "{out:?}");
    let out = eng.handle(
        Input::SiteReady {
            site: "s2".into(),
            records: 100,
        },
        0,
        &mut noise,
    );
    assert!(out.is_empty(), "{out:?}");
    // s2 and a large s3 are priced with q = expected_batch / n and run.
    let out = eng.handle(
        Input::SiteReady {
            site: "s3".into(),
            records: 400,
        },
        5000,
        &mut noise,
    );
    let out = if out.is_empty() {
        eng.handle(Input::Tick, 9000, &mut noise)
    } else {
        out
    };
    let Some(Action::RecordSpend { entries, .. }) = out.first() else {
        panic!("{out:?}")
    };
    let s2 = entries.iter().find(|e| e.site == "s2").unwrap();
    assert!((s2.event.q.get() - 4.0 / 100.0).abs() < 1e-12 && s2.event.steps == 2);
    assert!(!entries.iter().any(|e| e.site == "s1"));
}

#[test]
fn central_placement_noises_the_aggregate_before_release() {
    // Sites send clipped deltas of zeros; only the coordinator's noise can move the model.
    let cfg = config(|b| b.placement("central").rounds(1).epsilon(50.0));
    let mut eng = engine(cfg);
    let mut noise = NoiseSource::insecure_from_seed(5);
    let mut out = Vec::new();
    for s in ["s1", "s2", "s3", "s4"] {
        out.extend(eng.handle(
            Input::SiteReady {
                site: s.into(),
                records: 100,
            },
            0,
            &mut noise,
        ));
    }
    let Some(Action::RecordSpend { round, .. }) =
        out.iter().find(|a| matches!(a, Action::RecordSpend { .. }))
    else {
        panic!("{out:?}")
    };
    let round = *round;
    let sent = eng.handle(Input::SpendCommitted { round }, 10, &mut noise);
    let sites: Vec<String> = sent
        .iter()
        .filter_map(|a| {
            if let Action::SendTask { site, .. } = a {
                Some(site.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(sites.len(), 4);
    let mut released = None;
    for s in sites {
        for a in eng.handle(
            Input::Update {
                site: s,
                round,
                values: vec![0.0; D],
            },
            20,
            &mut noise,
        ) {
            if let Action::Checkpoint { model, .. } = a {
                released = Some(model);
            }
        }
    }
    let model = released.expect("the round closed");
    assert!(model.iter().all(|v| v.is_finite()));
    // Every coordinate carries noise of std sigma * C / n (here 4 * 1 / 4).
    assert!(
        model.iter().filter(|v| **v != 0.0).count() == D,
        "un-noised aggregate released: {model:?}"
    );
}

#[test]
fn central_placement_is_priced_at_q_one_divided_by_the_enrolled_count_and_tells_no_norm() {
    let cfg = config(|b| {
        b.placement("central")
            .rounds(1)
            .epsilon(1000.0)
            .noise_multiplier(0.05)
    });
    let mut eng = engine(cfg);
    let mut noise = NoiseSource::insecure_from_seed(9);
    // Two of the four enrolled sites are there: the round starts after the gathering wait.
    let mut out = Vec::new();
    for s in ["s1", "s2"] {
        out.extend(eng.handle(
            Input::SiteReady {
                site: s.into(),
                records: 100,
            },
            0,
            &mut noise,
        ));
    }
    out.extend(eng.handle(Input::Tick, 60_000, &mut noise));
    let Some(Action::RecordSpend { round, entries }) =
        out.iter().find(|a| matches!(a, Action::RecordSpend { .. }))
    else {
        panic!("{out:?}")
    };
    // Every taking-part site pays (q = 1, sigma): no amplification by site sampling.
    assert_eq!(entries.len(), 2);
    for e in entries {
        assert_eq!(e.event.q.get(), 1.0);
        assert_eq!(e.event.sigma.get(), 0.05);
    }
    let round = *round;
    eng.handle(Input::SpendCommitted { round }, 60_010, &mut noise);
    // Each site sends a clipped delta of 0.4 / sqrt(D) per value (norm 0.4 < C = 1).
    let v = 0.4 / (D as f32).sqrt();
    let mut released = None;
    for s in ["s1", "s2"] {
        for a in eng.handle(
            Input::Update {
                site: s.into(),
                round,
                values: vec![v; D],
            },
            60_020,
            &mut noise,
        ) {
            match a {
                Action::UpdateAccepted { norm, .. } => assert_eq!(norm, None),
                Action::Checkpoint { model, .. } => released = Some(model),
                _ => {}
            }
        }
    }
    let model = released.expect("the round closed");
    // The mean divides by the 4 enrolled sites, not the 2 that sent: 2v / 4 = v / 2 per
    // value, give or take the noise (sigma C / 4 = 0.0125 per value, averaged over D).
    let mean = model.iter().map(|&x| f64::from(x)).sum::<f64>() / D as f64;
    let se = 0.0125 / (D as f64).sqrt();
    assert!(
        (mean - f64::from(v) / 2.0).abs() < 6.0 * se,
        "mean {mean}, want {} (se {se})",
        v / 2.0
    );
}

#[test]
fn a_central_update_over_the_clip_norm_is_refused_without_its_norm() {
    let cfg = config(|b| b.placement("central").rounds(1));
    let mut eng = engine(cfg);
    let mut noise = NoiseSource::insecure_from_seed(3);
    let mut out = Vec::new();
    for s in ["s1", "s2", "s3", "s4"] {
        out.extend(eng.handle(
            Input::SiteReady {
                site: s.into(),
                records: 100,
            },
            0,
            &mut noise,
        ));
    }
    let round = out
        .iter()
        .find_map(|a| match a {
            Action::RecordSpend { round, .. } => Some(*round),
            _ => None,
        })
        .expect("a round starts");
    eng.handle(Input::SpendCommitted { round }, 10, &mut noise);
    let out = eng.handle(
        Input::Update {
            site: "s1".into(),
            round,
            values: vec![1.0; D],
        },
        20,
        &mut noise,
    );
    let reason = out
        .iter()
        .find_map(|a| match a {
            Action::UpdateRejected { reason, .. } => Some(reason.to_string()),
            _ => None,
        })
        .expect("rejected");
    assert!(!reason.chars().any(|c| c.is_ascii_digit()), "{reason}");
}

#[test]
fn a_study_no_site_can_take_part_in_ends_with_the_sites_reasons() {
    let mut eng = engine(config(|b| b));
    let mut noise = NoiseSource::insecure_from_seed(2);
    let mut ended = None;
    for (s, reason) in [
        ("s1", DeclineReason::Unavailable),
        ("s2", DeclineReason::TermsDiffer),
        ("s3", DeclineReason::Unavailable),
    ] {
        for a in eng.handle(
            Input::Declined {
                site: s.into(),
                round: 0,
                reason,
            },
            0,
            &mut noise,
        ) {
            if let Action::StudyEnded { reason } = a {
                ended = Some(reason);
            }
        }
    }
    let reason = ended.expect("the study ended once too few sites could take part");
    assert!(reason.contains("too few sites can take part"), "{reason}");
    assert!(
        reason.contains("s1: unavailable") && reason.contains("s2: terms_differ"),
        "{reason}"
    );
    assert!(!reason.contains("budget"), "{reason}");
}

#[test]
fn a_study_nobody_joins_ends_at_its_join_timeout() {
    let mut eng = engine(config(|b| b.join_timeout_secs(30)));
    let mut noise = NoiseSource::insecure_from_seed(2);
    assert!(eng.handle(Input::Tick, 0, &mut noise).is_empty());
    // The owner is told when to wake the study (it has no periodic tick).
    assert_eq!(eng.next_deadline(), Some(30_000));
    assert!(eng.handle(Input::Tick, 29_999, &mut noise).is_empty());
    let out = eng.handle(Input::Tick, 30_000, &mut noise);
    assert!(
        matches!(&out[..], [Action::StudyEnded { reason }] if reason.contains("join timeout of 30 s")),
        "{out:?}"
    );
    // A study some site joined does not time out.
    let mut eng = engine(config(|b| b.join_timeout_secs(30)));
    eng.handle(Input::Tick, 0, &mut noise);
    eng.handle(
        Input::SiteReady {
            site: "s1".into(),
            records: 100,
        },
        1_000,
        &mut noise,
    );
    assert!(!eng
        .handle(Input::Tick, 40_000, &mut noise)
        .iter()
        .any(|a| matches!(a, Action::StudyEnded { .. })));
}

#[test]
fn a_site_that_cannot_be_priced_is_named_not_blamed_on_the_budget() {
    // Record unit with an expected batch of 50: a site declaring 20 records has no rate.
    let mut eng = engine(config(|b| b.record_unit(5, 50.0).min_sites(2)));
    let mut noise = NoiseSource::insecure_from_seed(3);
    let mut out = Vec::new();
    for s in ["s1", "s2", "s3", "s4"] {
        out.extend(eng.handle(
            Input::SiteReady {
                site: s.into(),
                records: 20,
            },
            0,
            &mut noise,
        ));
    }
    out.extend(eng.handle(Input::Tick, 1, &mut noise));
    let reason = out
        .iter()
        .find_map(|a| match a {
            Action::StudyEnded { reason } => Some(reason.clone()),
            _ => None,
        })
        .expect("the study ends");
    assert!(!reason.contains("budget exhausted"), "{reason}");
    assert!(
        reason.contains("cannot be priced")
            && reason.contains("s1:")
            && reason.contains("fewer than the expected batch"),
        "{reason}"
    );
}

/// The simulations' record-unit study with DP evaluation every 2 rounds.
fn eval_config(change: impl FnOnce(StudyBuilder) -> StudyBuilder) -> Arc<StudyConfig> {
    let base = StudyBuilder::new("sim")
        .rounds(9)
        .min_sites(2)
        .round_timeout_secs(10)
        .record_unit(5, 10.0)
        .noise(1.0, 50.0)
        .evaluation(2, 3.0, 4.0)
        .enrolled(["s1", "s2", "s3", "s4"]);
    Arc::new(change(base).config().unwrap())
}

#[test]
fn evaluations_are_charged_before_they_are_asked_for_and_summed_once() {
    for bad in [
        Behaviour::Honest,
        Behaviour::Duplicate,
        Behaviour::WrongRound,
        Behaviour::NaN,
        Behaviour::Late,
        Behaviour::Dropout,
    ] {
        let mut eng = engine(eval_config(|b| b));
        let mut w = World::new(11);
        let behaviour =
            move |site: &str, _round: u64| if site == "s3" { bad } else { Behaviour::Honest };
        w.run(&mut eng, &behaviour, &["s1", "s2", "s3", "s4"]);
        assert!(
            w.ended.clone().unwrap().contains("all 9 planned rounds"),
            "{bad:?}"
        );
        // Rounds 3, 5, 7 and 9 carry an evaluation (of the models after 2, 4, 6, 8); every
        // site that was sent one of them paid for it, and no other round charged one.
        let eval_rounds: BTreeSet<u64> = w.committed_eval.keys().map(|(_, r)| *r).collect();
        assert_eq!(eval_rounds, BTreeSet::from([3, 5, 7, 9]), "{bad:?}");
        let rounds: Vec<u64> = w.evaluated.iter().map(|(r, ..)| *r).collect();
        assert_eq!(rounds, vec![3, 5, 7, 9], "{bad:?}");
        for (_, sites, _) in &w.evaluated {
            assert_eq!(
                sites.contains(&"s3".to_string()),
                matches!(
                    bad,
                    Behaviour::Honest | Behaviour::Duplicate | Behaviour::WrongRound
                ),
                "{bad:?}: {sites:?}"
            );
        }
        let s3_refused = w.eval_rejected.iter().any(|(s, _)| s == "s3");
        assert_eq!(
            s3_refused,
            matches!(
                bad,
                Behaviour::Duplicate | Behaviour::WrongRound | Behaviour::NaN | Behaviour::Late
            ),
            "{bad:?}: {:?}",
            w.eval_rejected
        );
    }
}

#[test]
fn a_study_without_evaluation_refuses_vectors() {
    let mut eng = engine(config(|b| b.rounds(2).epsilon(50.0)));
    let mut noise = NoiseSource::insecure_from_seed(1);
    let out = eng.handle(
        Input::Evaluation {
            site: "s1".into(),
            round: 1,
            values: vec![1.0; 6],
        },
        0,
        &mut noise,
    );
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::EvaluationRejected { site, .. } if site == "s1")),
        "{out:?}"
    );
}

/// A record study with `target_epsilon`: the engine charges nobody until every enrolled
/// site has declared its size, then chooses sigma at the smallest site's rate, announces it
/// (the action), takes no site as ready until it accepts the new terms, and then every
/// charge uses the calibrated sigma, the planned rounds fitting the target.
#[test]
fn a_target_epsilon_is_calibrated_from_the_smallest_declared_site_before_any_charge() {
    let toml = StudyBuilder::new("cal")
        .rounds(4)
        .min_sites(2)
        .round_timeout_secs(10)
        .record_unit(5, 10.0)
        .noise(1.0, 6.0)
        .enrolled(["s1", "s2", "s3"])
        .toml()
        .replace("noise_multiplier = 1.0", "target_epsilon = 3.0");
    let cfg = Arc::new(StudyConfig::from_toml(&toml).unwrap());
    let upper = cfg.privacy.noise_multiplier.get();
    assert!(cfg.privacy.calibrate_to.is_some());
    let mut eng = engine(cfg);
    let mut noise = NoiseSource::insecure_from_seed(1);
    let mut all = Vec::new();
    for (i, (site, n)) in [("s1", 400u64), ("s2", 100), ("s3", 250)]
        .into_iter()
        .enumerate()
    {
        let out = eng.handle(
            Input::SiteReady {
                site: site.into(),
                records: n,
            },
            i as u64,
            &mut noise,
        );
        // Nobody is charged, and nothing is chosen before the last site declares.
        assert!(
            !out.iter().any(|a| matches!(a, Action::RecordSpend { .. })),
            "{out:?}"
        );
        if i < 2 {
            assert!(out.is_empty(), "{out:?}");
        }
        all.extend(out);
    }
    let Some(Action::Calibrated {
        config,
        worst_site,
        records,
        q,
        steps,
        ..
    }) = all.pop()
    else {
        panic!("no calibration: {all:?}");
    };
    assert_eq!((worst_site.as_str(), records, steps), ("s2", 100, 20));
    assert!((q - 0.1).abs() < 1e-12);
    let sigma = config.privacy.noise_multiplier;
    assert!(
        sigma.get() < upper,
        "{sigma} is not below the q = 1 bound {upper}"
    );
    assert!(config.privacy.calibrate_to.is_none());
    // Exactly the target over the planned steps at the smallest site's q (to the search's
    // tolerance), and more than it with a little less noise.
    let p = &config.privacy;
    let ev = |s: f64| SgmEvent::new(0.1, s, 20).unwrap();
    let at = accountant::epsilon(p.accountant, &[ev(sigma.get())], p.delta).unwrap();
    assert!(at <= 3.0 && at > 2.9, "{at}");
    let less = accountant::epsilon(p.accountant, &[ev(sigma.get() * 0.97)], p.delta).unwrap();
    assert!(less > 3.0, "{less}");

    // A site that now declares fewer records than the calibration assumed is left out.
    let out = eng.handle(
        Input::SiteReady {
            site: "s3".into(),
            records: 60,
        },
        4000,
        &mut noise,
    );
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::SiteExcluded { site, .. } if site == "s3")),
        "{out:?}"
    );
    // Sites must say yes to the new terms: a tick alone starts nothing.
    let out = eng.handle(Input::Tick, 5000, &mut noise);
    assert!(
        !out.iter().any(|a| matches!(a, Action::RecordSpend { .. })),
        "{out:?}"
    );
    let mut w = World::new(5);
    w.run(&mut eng, &|_, _| Behaviour::Honest, &["s1", "s2"]);
    assert!(w.ended.clone().unwrap().contains("all 4 planned rounds"));
    assert!(!w.committed.keys().any(|(s, _)| s == "s3"));
    assert!(!w.committed.is_empty());
    for ((site, _), e) in &w.committed {
        assert_eq!(e.sigma, sigma, "{site} charged at another sigma");
    }
}
