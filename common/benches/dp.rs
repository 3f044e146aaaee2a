//! Criterion benches of the privacy core: accountants, clip + noise, the generator.
//!
//! Run: `cargo bench -p fedpriv-common --bench dp`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fedpriv_common::dp::{accountant, clip, noise::NoiseSource, ClipNorm, Delta, SgmEvent};
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::StandardNormal;

fn accountants(c: &mut Criterion) {
    let ev = [SgmEvent::new(0.01, 1.0, 10_000).expect("valid")];
    let delta = Delta::new(1e-5).expect("valid");
    let mut g = c.benchmark_group("accountant_q0.01_s1_T10000");
    g.measurement_time(Duration::from_secs(5));
    for kind in [
        accountant::AccountantKind::Rdp,
        accountant::AccountantKind::Pld,
    ] {
        g.bench_function(kind.as_str(), |b| {
            b.iter(|| accountant::epsilon(kind, &ev, delta).expect("finite"))
        });
    }
    g.finish();
}

const D: usize = 10_000_000;

fn clip_noise(c: &mut Criterion) {
    let mut g = c.benchmark_group("clip_noise_10M");
    g.sample_size(10).throughput(Throughput::Elements(D as u64));
    let base: Vec<f32> = (0..D).map(|i| ((i % 101) as f32 - 50.0) * 1e-4).collect();
    let clip_norm = ClipNorm::new(1.0).expect("valid");
    let mut src = NoiseSource::from_os().expect("os rng");
    for threads in [1usize, 2] {
        g.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, &t| {
            let mut v = base.clone();
            b.iter(|| {
                v.copy_from_slice(&base);
                clip::clip_l2(&mut v, clip_norm);
                src.add_gaussian(&mut v, 1.0, t);
            })
        });
    }
    g.finish();

    // The generator's raw output rate and the cost of the float-attack defence, on one core.
    let mut g = c.benchmark_group("generator_one_core");
    g.sample_size(10).throughput(Throughput::Elements(D as u64));
    let mut bytes = vec![0u8; D * 8];
    g.bench_function("chacha20_raw_u64", |b| b.iter(|| src.raw_fill(&mut bytes)));
    let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
    let mut out = vec![0f32; D];
    g.bench_function("normal_single_draw_no_defence", |b| {
        b.iter(|| {
            for v in out.iter_mut() {
                *v = rng.sample::<f64, _>(StandardNormal) as f32;
            }
        })
    });
    // The four-draw construction as this crate computed it before block-wise generation
    // (rand_distr's sampler on the stream, word by word): same output, for the comparison.
    g.bench_function("normal_secure_four_draws_word_by_word", |b| {
        b.iter(|| {
            for v in out.iter_mut() {
                let a: f64 = rng.sample(StandardNormal);
                let b: f64 = rng.sample(StandardNormal);
                let c: f64 = rng.sample(StandardNormal);
                let d: f64 = rng.sample(StandardNormal);
                *v = ((a + b + c + d) * 0.5) as f32;
            }
        })
    });
    g.bench_function("normal_secure_four_draws", |b| {
        b.iter(|| {
            out.iter_mut().for_each(|v| *v = 0.0);
            src.add_gaussian(&mut out, 1.0, 1);
        })
    });
    // What fewer ChaCha rounds would save (not used: see docs/performance.md).
    let mut r12 = rand_chacha::ChaCha12Rng::from_os_rng();
    g.bench_function("chacha12_raw_u64", |b| {
        b.iter(|| r12.fill_bytes(&mut bytes))
    });
    let mut r8 = rand_chacha::ChaCha8Rng::from_os_rng();
    g.bench_function("chacha8_raw_u64", |b| b.iter(|| r8.fill_bytes(&mut bytes)));
    g.finish();
    let _ = rng.next_u64();
}

criterion_group!(benches, accountants, clip_noise);
criterion_main!(benches);
