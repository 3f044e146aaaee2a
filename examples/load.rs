//! The load test's figures: one round of N sites without a flood, then the same under a
//! flood of bad handshakes and malformed messages (see `tests/load.rs`). Prints one JSON
//! object per scenario.
//!
//! `cargo run --release --example load -- [sites] [bad_handshakes] [malformed]`
//! (defaults 100 1000 1000).

#[path = "../tests/support/load_harness.rs"]
mod harness;

use harness::Scenario;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or_else(|_| panic!("not a count: {a}")))
        .collect();
    let sites = args.first().copied().unwrap_or(100);
    let bad_handshakes = args.get(1).copied().unwrap_or(1000);
    let malformed = args.get(2).copied().unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    for scenario in [
        Scenario {
            sites,
            bad_handshakes: 0,
            malformed: 0,
        },
        Scenario {
            sites,
            bad_handshakes,
            malformed,
        },
    ] {
        let out = rt.block_on(harness::run(scenario));
        let mut json = out.to_json(&scenario);
        json["scenario"] = if scenario.bad_handshakes + scenario.malformed == 0 {
            "baseline".into()
        } else {
            "flood".into()
        };
        println!("{json}");
    }
}
