//! Criterion benches of the wire and file codecs on a 1M-value (4 MB) model: control
//! frames, the tensor body decoder (f32 in aligned network chunks and in unaligned
//! packet-sized pieces; f16 and bf16), the 16-bit encoders, and checkpoint serialisation
//! (the streamed writer against building the whole safetensors image in memory).
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
    decode_frame, encode_body, encode_frame, Dtype, TensorBodyDecoder, TensorHeader,
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
        evaluation: None,
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
    let v = values(D);
    let mut g = c.benchmark_group("tensor_body_decode_1M_values");
    // Throughput in values (the sink reads every value).
    g.throughput(Throughput::Elements(D as u64));
    g.measurement_time(Duration::from_secs(5));
    let cases = [
        ("f32_1MiB_chunks", Dtype::F32, 1usize << 20),
        ("f32_unaligned_1451B", Dtype::F32, 1451),
        ("f16_1451B", Dtype::F16, 1451),
        ("bf16_1451B", Dtype::Bf16, 1451),
    ];
    for (name, dtype, piece) in cases {
        let header = TensorHeader::for_spec(&spec, dtype);
        let bytes = encode_body(&v, dtype).into_owned();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut dec = match TensorBodyDecoder::new_accepting(&header, &spec, &Dtype::ALL) {
                    Ok(d) => d,
                    Err(e) => panic!("{e}"),
                };
                // Reads every value, cheaply (an xor of the bits vectorises).
                let mut acc = 0u32;
                let mut sink =
                    |_: usize, v: &[f32]| acc ^= v.iter().fold(0, |a, x| a ^ x.to_bits());
                for p in bytes.chunks(piece) {
                    if let Err(e) = dec.feed(black_box(p), &mut sink) {
                        panic!("{e}");
                    }
                }
                acc
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("tensor_body_encode_1M_values");
    g.throughput(Throughput::Elements(D as u64));
    for dtype in [Dtype::F16, Dtype::Bf16] {
        g.bench_function(dtype.as_str(), |b| {
            b.iter(|| encode_body(black_box(&v), dtype).len())
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
    // The plaintext stream alone.
    g.bench_function("streamed", |b| {
        b.iter(|| {
            write_safetensors(
                &spec,
                black_box(&v),
                &Default::default(),
                &mut std::io::sink(),
            )
        })
    });
    // What the coordinator writes: the stream sealed (AES-256-GCM, 1 MiB segments) and the
    // sealed bytes hashed (SHA-256), as `server::write_checkpoint` does, minus the disk.
    let key = match fedpriv_common::seal::generate_key_hex()
        .and_then(|m| fedpriv_common::seal::SealKey::from_material(m.as_bytes()))
    {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    };
    g.bench_function("streamed_sealed_with_sha256", |b| {
        b.iter(|| {
            let hashing = Sha256Sink(ring::digest::Context::new(&ring::digest::SHA256));
            let mut w = match fedpriv_common::seal::SealWriter::new(&key, hashing, b"bench") {
                Ok(w) => w,
                Err(e) => panic!("{e}"),
            };
            if let Err(e) = write_safetensors(&spec, black_box(&v), &Default::default(), &mut w) {
                panic!("{e}");
            }
            match w.finish() {
                Ok(h) => h.0.finish(),
                Err(e) => panic!("{e}"),
            }
        })
    });
    g.finish();
}

/// Hashes what is written and keeps nothing.
struct Sha256Sink(ring::digest::Context);

impl std::io::Write for Sha256Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

criterion_group!(benches, frames, body_decoder, checkpoint);
criterion_main!(benches);
