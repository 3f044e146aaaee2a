//! Streaming aggregation: updates folded chunk by chunk must give the same aggregate as
//! whole updates, and a refused or cut-short upload must leave no trace in it once its
//! folded prefix is fed back. Values are small multiples of 2^-10, so every sum here is
//! exact in f32 and results can be compared bit for bit.
#![allow(clippy::unwrap_used)]

use fedpriv_common::model::TensorSpec;
use fedpriv_common::test_util::StudyBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::drive::MemSpools;
use super::*;

const D: usize = 40;
const SITES: [&str; 3] = ["s1", "s2", "s3"];
const TIMEOUT_MS: u64 = 10_000;

fn engine() -> StudyEngine {
    let cfg = StudyBuilder::new("stream")
        .rounds(3)
        .round_timeout_secs(10)
        .noise(1.0, 500.0)
        .enrolled(SITES)
        .config()
        .unwrap();
    let spec = ModelSpec::new(vec![TensorSpec::new("w", &[D as u64])]).unwrap();
    StudyEngine::new(
        Arc::new(cfg),
        spec,
        vec![0.0; D],
        1,
        BTreeMap::new(),
        BTreeMap::new(),
    )
}

/// An exactly summable update: multiples of 2^-10 in [-0.0625, 0.0625].
fn update(rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..D)
        .map(|_| rng.random_range(-64i32..=64) as f32 / 1024.0)
        .collect()
}

/// The engine and a stand-in for the network layer: it remembers what each upload sent
/// (its spool) and answers [`Action::Unfold`] from it through [`drive`], the loop the
/// server runs.
struct Harness {
    eng: StudyEngine,
    noise: NoiseSource,
    now: u64,
    spools: MemSpools,
    next_upload: u64,
}

impl Harness {
    /// An engine collecting round 1 from all three sites.
    fn collecting() -> Self {
        let mut h = Self {
            eng: engine(),
            noise: NoiseSource::insecure_from_seed(5),
            now: 0,
            spools: MemSpools::default(),
            next_upload: 1,
        };
        for s in SITES {
            h.feed(Input::SiteReady {
                site: s.into(),
                records: 100,
            });
        }
        let tasks = h.feed(Input::SpendCommitted { round: 1 });
        assert_eq!(
            tasks
                .iter()
                .filter(|a| matches!(a, Action::SendTask { .. }))
                .count(),
            3,
            "{tasks:?}"
        );
        h
    }

    fn feed(&mut self, input: Input) -> Vec<Action> {
        let mut all = Vec::new();
        let fed = drive(
            &mut self.eng,
            input,
            self.now,
            &mut self.noise,
            &mut self.spools,
            |_, a| {
                all.push(a);
                Ok::<_, std::convert::Infallible>(None)
            },
        );
        assert!(fed.is_ok());
        all
    }

    fn begin(&mut self, site: &str, round: u64) -> (u64, Vec<Action>) {
        let upload = self.next_upload;
        self.next_upload += 1;
        let out = self.feed(Input::UpdateBegin {
            site: site.into(),
            round,
            upload,
        });
        (upload, out)
    }

    fn chunk(&mut self, upload: u64, offset: usize, values: &[f32]) -> Vec<Action> {
        self.spools.spool(upload, values);
        self.feed(Input::UpdateChunk {
            upload,
            offset,
            values: values.to_vec(),
        })
    }

    fn end(&mut self, upload: u64, result: Result<(), String>) -> Vec<Action> {
        self.feed(Input::UpdateEnd { upload, result })
    }

    /// Streams a whole update in chunks of `size`; returns every action.
    fn stream(&mut self, site: &str, values: &[f32], size: usize) -> Vec<Action> {
        let (id, mut out) = self.begin(site, 1);
        for (i, c) in values.chunks(size).enumerate() {
            out.extend(self.chunk(id, i * size, c));
        }
        out.extend(self.end(id, Ok(())));
        out
    }

    fn tick_at_deadline(&mut self) -> Vec<Action> {
        self.now = TIMEOUT_MS + 1;
        self.feed(Input::Tick)
    }
}

fn checkpoint(actions: &[Action]) -> Option<(Vec<f32>, Vec<String>)> {
    actions.iter().find_map(|a| match a {
        Action::Checkpoint {
            model,
            contributors,
            ..
        } => Some((model.to_vec(), contributors.clone())),
        _ => None,
    })
}

fn rejected(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::UpdateRejected { site, reason, .. } => Some((site.clone(), reason.to_string())),
            _ => None,
        })
        .collect()
}

fn unfold_len(actions: &[Action]) -> Option<usize> {
    actions.iter().find_map(|a| match a {
        Action::Unfold { len, .. } => Some(*len),
        _ => None,
    })
}

/// The model a round makes from these whole updates (the reference path).
fn reference(updates: &[(&str, Vec<f32>)]) -> (Vec<f32>, Vec<String>) {
    let mut h = Harness::collecting();
    let mut out = Vec::new();
    for (site, values) in updates {
        out.extend(h.feed(Input::Update {
            site: site.to_string(),
            round: 1,
            values: values.clone(),
        }));
    }
    if checkpoint(&out).is_none() {
        out.extend(h.tick_at_deadline());
    }
    checkpoint(&out).unwrap()
}

#[test]
fn streamed_updates_aggregate_exactly_like_whole_ones() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..50 {
        let updates: Vec<(&str, Vec<f32>)> = SITES.iter().map(|s| (*s, update(&mut rng))).collect();
        let want = reference(&updates);
        // Interleave the three uploads' chunks at random, each with its own chunk sizes.
        let mut h = Harness::collecting();
        let mut ids = Vec::new();
        for (s, _) in &updates {
            let (id, out) = h.begin(s, 1);
            assert!(out.is_empty(), "{out:?}");
            ids.push((id, 0usize, 1 + rng.random_range(0..D)));
        }
        let mut out = Vec::new();
        while ids.iter().any(|(_, at, _)| *at < D) {
            let k = rng.random_range(0..ids.len());
            let (id, at, size) = &mut ids[k];
            if *at == D {
                continue;
            }
            let end = (*at + *size).min(D);
            let values = updates[k].1[*at..end].to_vec();
            out.extend(h.chunk(*id, *at, &values));
            *at = end;
            if *at == D {
                out.extend(h.end(*id, Ok(())));
            }
        }
        assert!(rejected(&out).is_empty(), "{out:?}");
        let got = checkpoint(&out).expect("the round closes when all three are in");
        assert_eq!(got, want);
    }
}

#[test]
fn a_norm_violation_mid_stream_is_refused_and_taken_back_out() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (u1, u2) = (update(&mut rng), update(&mut rng));
    let want = reference(&[("s1", u1.clone()), ("s2", u2.clone())]);
    let mut h = Harness::collecting();
    let mut out = h.stream("s1", &u1, 9);
    // s3's first 20 values are fine, then one value alone breaks the norm bound.
    let mut bad = update(&mut rng);
    bad[25] = 1e4;
    let (id, _) = h.begin("s3", 1);
    out.extend(h.chunk(id, 0, &bad[..10]));
    out.extend(h.chunk(id, 10, &bad[10..20]));
    let refused = h.chunk(id, 20, &bad[20..30]);
    assert_eq!(unfold_len(&refused), Some(20), "{refused:?}");
    let r = rejected(&refused);
    assert!(r[0].0 == "s3" && r[0].1.contains("exceeds"), "{r:?}");
    // The rest of the upload is ignored, its end too.
    out.extend(h.chunk(id, 30, &bad[30..]));
    out.extend(h.end(id, Ok(())));
    out.extend(h.stream("s2", &u2, 40));
    assert!(checkpoint(&out).is_none(), "s3 is still outstanding");
    let closed = h.tick_at_deadline();
    assert_eq!(checkpoint(&closed), Some(want));
}

#[test]
fn a_non_finite_chunk_is_never_folded() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (u1, u2) = (update(&mut rng), update(&mut rng));
    let want = reference(&[("s1", u1.clone()), ("s2", u2.clone())]);
    let mut h = Harness::collecting();
    let mut bad = update(&mut rng);
    bad[13] = f32::NAN;
    let (id, _) = h.begin("s3", 1);
    assert!(h.chunk(id, 0, &bad[..12]).is_empty());
    let refused = h.chunk(id, 12, &bad[12..24]);
    assert_eq!(unfold_len(&refused), Some(12), "{refused:?}");
    assert!(rejected(&refused)[0].1.contains("value 13 is not finite"));
    let mut out = h.stream("s1", &u1, 5);
    out.extend(h.stream("s2", &u2, 3));
    out.extend(h.tick_at_deadline());
    assert_eq!(checkpoint(&out), Some(want));
}

#[test]
fn interrupted_short_and_disordered_uploads_are_taken_back_out() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (u1, u2) = (update(&mut rng), update(&mut rng));
    let want = reference(&[("s1", u1.clone()), ("s2", u2.clone())]);
    for case in 0..3 {
        let mut h = Harness::collecting();
        let bad = update(&mut rng);
        let (id, _) = h.begin("s3", 1);
        h.chunk(id, 0, &bad[..16]);
        let refused = match case {
            // The connection dropped.
            0 => h.end(id, Err("connection lost".into())),
            // The stream ended early.
            1 => h.end(id, Ok(())),
            // A chunk that does not follow the last one.
            _ => h.chunk(id, 20, &bad[20..30]),
        };
        assert_eq!(unfold_len(&refused), Some(16), "case {case}: {refused:?}");
        assert_eq!(rejected(&refused).len(), 1, "case {case}");
        let mut out = h.stream("s1", &u1, 40);
        out.extend(h.stream("s2", &u2, 11));
        out.extend(h.tick_at_deadline());
        assert_eq!(checkpoint(&out), Some(want.clone()), "case {case}");
    }
}

#[test]
fn the_deadline_takes_out_uploads_in_flight_then_closes() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (u1, u2) = (update(&mut rng), update(&mut rng));
    let want = reference(&[("s1", u1.clone()), ("s2", u2.clone())]);
    let mut h = Harness::collecting();
    let mut out = h.stream("s1", &u1, 8);
    out.extend(h.stream("s2", &u2, 8));
    let slow = update(&mut rng);
    let (id, _) = h.begin("s3", 1);
    h.chunk(id, 0, &slow[..30]);
    assert!(checkpoint(&out).is_none());
    // Unfolds are fed back synchronously (as the server does), so the round closes at once.
    let closed = h.tick_at_deadline();
    assert_eq!(unfold_len(&closed), Some(30), "{closed:?}");
    assert!(rejected(&closed)[0].1.contains("round closed"));
    assert_eq!(checkpoint(&closed), Some(want));
    // The rest of s3's upload arrives after the round: ignored.
    assert!(h.chunk(id, 30, &slow[30..]).is_empty());
    assert!(h.end(id, Ok(())).is_empty());
}

#[test]
fn a_round_whose_aggregate_cannot_be_repaired_is_aborted() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut h = Harness::collecting();
    h.spools.broken = true;
    let mut out = h.stream("s1", &update(&mut rng), 8);
    out.extend(h.stream("s2", &update(&mut rng), 8));
    let (id, _) = h.begin("s3", 1);
    h.chunk(id, 0, &update(&mut rng)[..10]);
    out.extend(h.end(id, Err("reset".into())));
    out.extend(h.tick_at_deadline());
    assert!(checkpoint(&out).is_none(), "{out:?}");
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::RoundAborted { round: 1, .. })),
        "{out:?}"
    );
    // The study goes on with the next round.
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::RecordSpend { round: 2, .. })),
        "{out:?}"
    );
}

#[test]
fn uploads_are_admitted_like_whole_updates() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut h = Harness::collecting();
    let (_, out) = h.begin("s1", 2);
    assert!(
        rejected(&out)[0].1.contains("round 1 is collecting"),
        "{out:?}"
    );
    let (_, out) = h.begin("s9", 1);
    assert!(rejected(&out)[0].1.contains("not chosen"), "{out:?}");
    // A second upload while one is in flight.
    let (first, out) = h.begin("s1", 1);
    assert!(out.is_empty());
    let (second, out) = h.begin("s1", 1);
    assert!(rejected(&out)[0].1.contains("already sending"), "{out:?}");
    // Chunks of a refused upload are dropped: nothing folded, nothing to unfold.
    assert!(h.chunk(second, 0, &update(&mut rng)).is_empty());
    let u = update(&mut rng);
    h.chunk(first, 0, &u);
    let out = h.end(first, Ok(()));
    assert!(
        matches!(&out[..], [Action::UpdateAccepted { site, .. }] if site == "s1"),
        "{out:?}"
    );
    let (_, out) = h.begin("s1", 1);
    assert!(rejected(&out)[0].1.contains("duplicate"), "{out:?}");
    // A refusal at the first chunk folded nothing: no unfold is needed.
    let (id, _) = h.begin("s2", 1);
    let mut bad = update(&mut rng);
    bad[0] = f32::INFINITY;
    let out = h.chunk(id, 0, &bad);
    assert_eq!(rejected(&out).len(), 1);
    assert_eq!(unfold_len(&out), None, "{out:?}");
}
