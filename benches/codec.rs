//! Criterion benches of the wire and file codecs on a 1M-value (4 MB) model: control
//! frames, the tensor body decoder (aligned network chunks and unaligned packet-sized
//! pieces), and checkpoint serialisation (the streamed writer against building the whole
//! safetensors image in memory).
//!
//! `cargo bench --bench codec`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fedpriv_common::config::{LocalPlan, Placement, PrivacyUnit};
use fedpriv_common::dp::SgmEvent;
use fedpriv_common::model::{FlatModel, ModelSpec, TensorSpec};
use fedpriv_common::protocol::{CoordinatorMessage, Task};
use fedpriv_common::wire::{
    decode_frame, encode_frame, f32_body_bytes, Dtype, TensorBodyDecoder, TensorHeader,
};
use fedpriv_coordinator::server::write_safetensors;

const D: usize = 1_000_000;

fn spec() -> ModelSpec {
    match ModelSpec::new(vec![
        TensorSpec::new("hidden.weight", &[999, 1000]),
        TensorSpec::new("hidden.bias", &[999]),
        TensorSpec::new("out.weight", &[1, 1]),
    ]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 1021) as f32 * 1e-3 - 0.5).collect()
}

fn frames(c: &mut Criterion) {
    let spec = spec();
    let task = CoordinatorMessage::Task(Task {
        study: "breast-cancer".into(),
        round: 17,
        header: TensorHeader::for_spec(&spec, Dtype::F32),
        cost: match SgmEvent::new(1.0, 0.5, 1) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        },
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        unit: PrivacyUnit::Site,
        placement: Placement::Local,
        local: LocalPlan::Sgd {
            epochs: 1,
            batch_size: 16,
            learning_rate: 0.1,
        },
        delta: 1e-5,
    });
    let frame = match encode_frame(&task) {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    let mut g = c.benchmark_group("control_frame_task");
    g.bench_function("encode", |b| b.iter(|| encode_frame(black_box(&task))));
    g.bench_function("decode", |b| {
        b.iter(|| decode_frame::<CoordinatorMessage>(black_box(&frame)))
    });
    g.finish();
}

fn body_decoder(c: &mut Criterion) {
    let spec = spec();
    let header = TensorHeader::for_spec(&spec, Dtype::F32);
    let v = values(D);
    let bytes = f32_body_bytes(&v).into_owned();
    let mut g = c.benchmark_group("tensor_body_decode_4MB");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.measurement_time(Duration::from_secs(5));
    for (name, piece) in [
        ("aligned_1MiB_chunks", 1usize << 20),
        ("unaligned_1451B", 1451),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut dec = match TensorBodyDecoder::new(&header, &spec) {
                    Ok(d) => d,
                    Err(e) => panic!("{e}"),
                };
                let mut seen = 0usize;
                let mut sink = |_: usize, v: &[f32]| seen += black_box(v).len();
                for p in bytes.chunks(piece) {
                    if let Err(e) = dec.feed(p, &mut sink) {
                        panic!("{e}");
                    }
                }
                seen
            })
        });
    }
    g.finish();
}

fn checkpoint(c: &mut Criterion) {
    let spec = spec();
    let v = values(D);
    let mut g = c.benchmark_group("checkpoint_4MB");
    g.throughput(Throughput::Bytes((D * 4) as u64));
    g.measurement_time(Duration::from_secs(5));
    // What the coordinator did before: copy the model, build the file image, hash it.
    g.bench_function("image_in_memory_then_sha256", |b| {
        b.iter(|| {
            let flat = match FlatModel::new(spec.clone(), v.clone()) {
                Ok(f) => f,
                Err(e) => panic!("{e}"),
            };
            let bytes = match flat.to_safetensors_bytes() {
                Ok(b) => b,
                Err(e) => panic!("{e}"),
            };
            ring::digest::digest(&ring::digest::SHA256, &bytes)
        })
    });
    // What it does now: stream from the model's memory, hashing as it writes.
    g.bench_function("streamed_with_sha256", |b| {
        b.iter(|| write_safetensors(&spec, black_box(&v), &mut std::io::sink()))
    });
    g.finish();
}

criterion_group!(benches, frames, body_decoder, checkpoint);
criterion_main!(benches);
