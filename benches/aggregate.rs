//! Criterion benches of the coordinator's aggregation: N updates of D values folded into
//! the round engine, streamed in the server's chunks or whole (the reference path). One
//! more site is enrolled than sends, so the round stays open and only the checks (finite
//! values, running norm) and folds are timed; closing a round also runs the accountant,
//! which `cargo bench -p fedpriv-common --bench dp` measures. Setup (sites ready, spend
//! committed, update buffers) is not timed.
//!
//! `cargo bench --bench aggregate`; `FEDPRIV_BENCH_D=10000000` for a bigger model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use fedpriv_common::config::StudyConfig;
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::model::{ModelSpec, TensorSpec};
use fedpriv_common::test_util::StudyBuilder;
use fedpriv_coordinator::round::{Action, Input, StudyEngine};

/// Values per streamed chunk, as the server hands them over.
const CHUNK: usize = fedpriv_coordinator::server::UPLOAD_CHUNK_VALUES;

fn study(sites: usize) -> Arc<StudyConfig> {
    let cfg = StudyBuilder::new("bench")
        .rounds(1_000_000)
        .min_sites(sites)
        .round_timeout_secs(600)
        .noise(1.0, 1_000_000.0)
        .enrolled((0..sites).map(|i| format!("s{i}")))
        .config();
    match cfg {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("bench study: {e}"),
    }
}

/// An engine collecting round 1 from `sites` sites, and a noise source.
fn collecting(sites: usize, d: usize) -> (StudyEngine, NoiseSource) {
    let spec = match ModelSpec::new(vec![TensorSpec::new("w", &[d as u64])]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let mut noise = match NoiseSource::from_os() {
        Ok(n) => n,
        Err(e) => panic!("{e}"),
    };
    let mut eng = StudyEngine::new(
        study(sites),
        spec,
        vec![0.0; d],
        1,
        BTreeMap::new(),
        BTreeMap::new(),
    );
    for i in 0..sites {
        eng.handle(
            Input::SiteReady {
                site: format!("s{i}"),
                records: 100,
            },
            0,
            &mut noise,
        );
    }
    let out = eng.handle(Input::SpendCommitted { round: 1 }, 0, &mut noise);
    assert_eq!(out.len(), sites, "tasks: {out:?}");
    (eng, noise)
}

fn update(d: usize, seed: usize) -> Vec<f32> {
    (0..d)
        .map(|i| ((i * 7 + seed * 13) % 101) as f32 * 1e-6 - 5e-5)
        .collect()
}

fn accepted(out: &[Action]) -> bool {
    matches!(out, [Action::UpdateAccepted { .. }])
}

/// Folds every update (streamed or whole) into a round that has one more site enrolled,
/// so it stays open: only checks and folds are timed.
fn rounds(c: &mut Criterion) {
    let d: usize = std::env::var("FEDPRIV_BENCH_D")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut g = c.benchmark_group(format!("fold_updates_d{d}"));
    g.measurement_time(Duration::from_secs(8)).sample_size(20);
    for sites in [4usize, 8] {
        g.throughput(Throughput::Bytes((sites * d * 4) as u64));
        let updates: Vec<Vec<f32>> = (0..sites).map(|s| update(d, s)).collect();
        g.bench_with_input(
            BenchmarkId::new("streamed_chunks", sites),
            &sites,
            |b, &n| {
                b.iter_batched(
                    || {
                        let (eng, noise) = collecting(n + 1, d);
                        // The chunks as the network layer hands them over (owned vectors).
                        let chunks: Vec<Vec<Vec<f32>>> = updates
                            .iter()
                            .map(|u| u.chunks(CHUNK).map(<[f32]>::to_vec).collect())
                            .collect();
                        (eng, noise, chunks)
                    },
                    |(mut eng, mut noise, chunks)| {
                        for (i, site_chunks) in chunks.into_iter().enumerate() {
                            let upload = i as u64 + 1;
                            let begin = Input::UpdateBegin {
                                site: format!("s{i}"),
                                round: 1,
                                upload,
                            };
                            eng.handle(begin, 1, &mut noise);
                            for (k, values) in site_chunks.into_iter().enumerate() {
                                let chunk = Input::UpdateChunk {
                                    upload,
                                    offset: k * CHUNK,
                                    values,
                                };
                                eng.handle(chunk, 1, &mut noise);
                            }
                            let end = Input::UpdateEnd {
                                upload,
                                result: Ok(()),
                            };
                            let out = eng.handle(end, 1, &mut noise);
                            assert!(accepted(&out), "{out:?}");
                        }
                        eng
                    },
                    BatchSize::PerIteration,
                )
            },
        );
        g.bench_with_input(BenchmarkId::new("whole_updates", sites), &sites, |b, &n| {
            b.iter_batched(
                || {
                    let (eng, noise) = collecting(n + 1, d);
                    (eng, noise, updates.clone())
                },
                |(mut eng, mut noise, updates)| {
                    for (i, values) in updates.into_iter().enumerate() {
                        let input = Input::Update {
                            site: format!("s{i}"),
                            round: 1,
                            values,
                        };
                        let out = eng.handle(input, 1, &mut noise);
                        assert!(accepted(&out), "{out:?}");
                    }
                    eng
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, rounds);
criterion_main!(benches);
