//! The PLD accountant's memory stays bounded at any step count.
//!
//! One test in its own binary, so nothing else runs in the process while it reads the
//! process's peak resident memory (Linux `VmHWM`) before and after.

use fedpriv_common::dp::accountant::{calibrate_noise, epsilon, max_steps, AccountantKind};
use fedpriv_common::dp::{Delta, Epsilon, NoiseMultiplier, SampleRate, SgmEvent};

fn peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn pld_memory_stays_under_64_mib_at_any_step_count() {
    let Some(before) = peak_kib() else {
        eprintln!("no /proc/self/status here: nothing to measure");
        return;
    };
    let d = Delta::new(1e-5).expect("delta");
    let pld = AccountantKind::Pld;
    let mut answers = Vec::new();
    // From a few steps to a billion, heterogeneous compositions, and both inverse
    // questions at the size the issue measured (about 1.6M steps).
    for (q, s, t) in [
        (0.01, 1.0, 10_000u64),
        (0.001, 1.0, 1_600_000),
        (0.01, 1.0, 1_000_000_000),
        (1.0, 0.5, 100_000),
        (0.001, 0.5, 935_000),
    ] {
        let ev = SgmEvent::new(q, s, t).expect("event");
        answers.push(epsilon(pld, &[ev], d).expect("finite"));
    }
    let mixed = [
        SgmEvent::new(0.01, 1.0, 50_000).expect("event"),
        SgmEvent::new(0.1, 2.0, 2_000).expect("event"),
        SgmEvent::new(0.001, 0.8, 3_000_000).expect("event"),
    ];
    answers.push(epsilon(pld, &mixed, d).expect("finite"));
    let q = SampleRate::new(0.001).expect("q");
    let t = max_steps(
        pld,
        &[],
        q,
        NoiseMultiplier::new(1.0).expect("sigma"),
        Epsilon::new(8.0).expect("eps"),
        d,
    )
    .expect("steps");
    assert!(t > 1_000_000, "{t}");
    let s = calibrate_noise(pld, q, 1_600_000, Epsilon::new(8.0).expect("eps"), d).expect("sigma");
    assert!(s.get() > 0.5, "{s}");
    let after = peak_kib().expect("still readable");
    let grown_mib = (after.saturating_sub(before)) as f64 / 1024.0;
    eprintln!("peak before {before} KiB, after {after} KiB: +{grown_mib:.1} MiB; {answers:?}");
    assert!(
        grown_mib < 64.0,
        "the PLD accountant's peak memory grew by {grown_mib:.1} MiB"
    );
}
