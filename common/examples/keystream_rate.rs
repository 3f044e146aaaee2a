//! AES-256 counter-mode keystream per CPU-second, two ways, on one core: counter blocks
//! encrypted in place by RustCrypto's `aes` (what the noise uses where the CPU has VAES with
//! AVX-512, which `aes` takes there; AES-NI only on a CPU without AVX-512) and ring's
//! AES-256-GCM over zeros (what the noise uses elsewhere; 256-bit VAES or AES-NI); and, as
//! a bound, `aes` encrypting blocks with no counters to write. The figures behind
//! docs/performance.md's choice between them. (The counter blocks here are written one by
//! one; `dp::noise` writes them from a table, vectorised.)
//! One JSON line per way; the load is printed with them, as with `noise_rate`.
//!
//! Run: `cargo run --release --locked -p fedpriv-common --example keystream_rate [-- SECONDS]`

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

#[path = "support/cpu.rs"]
mod cpu;
use cpu::load;

/// CPU seconds used by this thread so far.
fn thread_cpu_seconds() -> f64 {
    cpu::thread_cpu_seconds().expect("Linux /proc")
}

/// Bytes per CPU-second of `fill` over a buffer of `len` bytes, for about `seconds`.
fn rate(seconds: f64, len: usize, mut fill: impl FnMut(&mut [u64])) -> f64 {
    let mut buf = vec![0u64; len / 8];
    fill(&mut buf);
    let (start, mut bytes) = (thread_cpu_seconds(), 0usize);
    while thread_cpu_seconds() - start < seconds {
        for _ in 0..256 {
            fill(&mut buf);
        }
        bytes += 256 * len;
    }
    bytes as f64 / (thread_cpu_seconds() - start)
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let key = [7u8; 32];

    let cipher = aes::Aes256::new(&key.into());
    let mut next = 0u64;
    let counter_blocks = rate(seconds, 4096, |buf| {
        for pair in buf.chunks_exact_mut(2) {
            pair[0] = u64::from_le_bytes(5u64.to_be_bytes());
            pair[1] = u64::from_le_bytes(next.to_be_bytes());
            next += 1;
        }
        let (blocks, _) = aes::Block::slice_as_chunks_mut(bytemuck::cast_slice_mut::<u64, u8>(buf));
        cipher.encrypt_blocks(blocks);
    });

    // The cipher alone, the same 8 KiB encrypted again and again (no counters to write):
    // what any counter mode built on `aes` could at best reach.
    let blocks_only = rate(seconds, 8192, |buf| {
        let (blocks, _) = aes::Block::slice_as_chunks_mut(bytemuck::cast_slice_mut::<u64, u8>(buf));
        cipher.encrypt_blocks(blocks);
    });

    let gcm = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("a 256-bit key"));
    let mut message = 0u32;
    let ring_gcm = rate(seconds, 8192, |buf| {
        let mut nonce = [0u8; 12];
        nonce[8..].copy_from_slice(&message.to_be_bytes());
        message = message.wrapping_add(1);
        let bytes = bytemuck::cast_slice_mut::<u64, u8>(buf);
        bytes.fill(0);
        let _tag = gcm
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), bytes)
            .expect("sealed");
    });

    for (way, r) in [
        ("rustcrypto-aes counter blocks, 4 KiB", counter_blocks),
        (
            "rustcrypto-aes blocks only, no counters, 8 KiB",
            blocks_only,
        ),
        ("ring aes-256-gcm over zeros, 8 KiB", ring_gcm),
    ] {
        println!(
            "{{\"keystream\":\"{way}\",\"bytes_per_cpu_s\":{r:.4e},\"load_1m\":{}}}",
            load()
        );
    }
}
