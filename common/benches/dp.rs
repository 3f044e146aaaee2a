//! Criterion benches of the privacy core: accountants, clip + noise, the generator.
//!
//! Run: `cargo bench -p fedpriv-common --bench dp`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fedpriv_common::dp::{
    accountant, clip,
    noise::{Generator, NoiseSource},
    ClipNorm, Delta, Epsilon, NoiseMultiplier, SampleRate, SgmEvent,
};
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

    // The inverse questions of `fedpriv-coordinator budget`: the case (about 1.6M
    // steps) and a calibration.
    let mut g = c.benchmark_group("accountant_inverse");
    g.sample_size(10);
    let q = SampleRate::new(0.001).expect("valid");
    let sigma = NoiseMultiplier::new(1.0).expect("valid");
    let eps8 = Epsilon::new(8.0).expect("valid");
    for kind in [
        accountant::AccountantKind::Rdp,
        accountant::AccountantKind::Pld,
    ] {
        g.bench_function(format!("steps_q0.001_s1_e8/{}", kind.as_str()), |b| {
            b.iter(|| accountant::max_steps(kind, &[], q, sigma, eps8, delta).expect("answer"))
        });
        let q2 = SampleRate::new(0.01).expect("valid");
        let eps2 = Epsilon::new(2.0).expect("valid");
        g.bench_function(format!("noise_q0.01_T10000_e2/{}", kind.as_str()), |b| {
            b.iter(|| accountant::calibrate_noise(kind, q2, 10_000, eps2, delta).expect("sigma"))
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
    // The secure sampler per keystream: AES-256-CTR (what a CPU with AES instructions
    // uses) and ChaCha20 (the fallback), and each keystream alone.
    let mut words = vec![0u64; D];
    for gen in [Generator::Aes256Ctr, Generator::ChaCha20] {
        let mut s = NoiseSource::from_os().expect("os rng").with_generator(gen);
        g.bench_function(format!("normal_secure_four_draws/{}", gen.as_str()), |b| {
            b.iter(|| {
                out.iter_mut().for_each(|v| *v = 0.0);
                s.add_gaussian(&mut out, 1.0, 1);
            })
        });
        g.bench_function(format!("keystream_u64/{}", gen.as_str()), |b| {
            b.iter(|| s.raw_keystream(&mut words))
        });
    }
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
