//! Secure noise values per second on one core, per keystream, measured in CPU time.
//!
//! The project's machine is shared (its load is printed with every figure); wall-clock
//! throughput there says more about the neighbours than about the generator. This measures
//! the CPU time the filling thread itself used (`/proc/thread-self/stat`, utime + stime), so
//! the figure is what one otherwise idle core would deliver, give or take what the
//! neighbours do to the caches. One JSON line per generator.
//!
//! Run: `cargo run --release -p fedpriv-common --example noise_rate [-- SECONDS [GENERATOR]]`
//! (GENERATOR `aes256-ctr` or `chacha20`; both when not given).

use fedpriv_common::dp::noise::{Generator, NoiseSource};

#[path = "support/cpu.rs"]
mod cpu;
use cpu::{load, thread_cpu_seconds};

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    const D: usize = 10_000_000;
    let mut out = vec![0f32; D];
    // Keystream alone, in a buffer that stays in cache (as the sampler's blocks do).
    let mut words = vec![0u64; 1 << 16];
    let only = std::env::args().nth(2);
    for g in [Generator::Aes256Ctr, Generator::ChaCha20]
        .into_iter()
        .filter(|g| only.as_deref().is_none_or(|o| o == g.as_str()))
    {
        let mut src = NoiseSource::from_os()
            .expect("the OS random generator")
            .with_generator(g);
        // Warm-up: page in the buffers, settle the clocks.
        src.add_gaussian(&mut out, 1.0, 1);
        let (mut n, start) = (0u64, thread_cpu_seconds().expect("Linux /proc"));
        let wall = std::time::Instant::now();
        while thread_cpu_seconds().unwrap_or(start) - start < seconds {
            out.iter_mut().for_each(|v| *v = 0.0);
            src.add_gaussian(&mut out, 1.0, 1);
            n += D as u64;
        }
        let cpu = thread_cpu_seconds().unwrap_or(start) - start;
        let wall = wall.elapsed().as_secs_f64();
        let (mut k, kstart) = (0u64, thread_cpu_seconds().unwrap_or(0.0));
        while thread_cpu_seconds().unwrap_or(kstart) - kstart < seconds / 2.0 {
            src.raw_keystream(&mut words);
            k += words.len() as u64;
        }
        let kcpu = thread_cpu_seconds().unwrap_or(kstart) - kstart;
        println!(
            "{{\"generator\":\"{}\",\"implementation\":\"{}\",\"detected\":\"{}\",\"secure_values_per_cpu_s\":{:.4e},\"secure_values_per_wall_s\":{:.4e},\"keystream_bytes_per_cpu_s\":{:.4e},\"cpu_s\":{cpu:.2},\"load_1m\":{}}}",
            g.as_str(),
            g.implementation(),
            Generator::detect().as_str(),
            n as f64 / cpu,
            n as f64 / wall,
            8.0 * k as f64 / kcpu,
            load()
        );
    }
}
