//! Flood resilience under load, end to end over loopback QUIC with real certificates: 100
//! sites take part in one round while 1,000 handshakes with bad certificates (none,
//! another CA's, expired) and 1,000 malformed messages (garbage frames, oversized length
//! prefixes, truncated frames, unknown studies, unenrolled sites, NaN and infinite values,
//! wrong shapes, out-of-round and replayed updates) hit the same coordinator. The round
//! must complete with every site's contribution, the ledger must hold the spend, the audit
//! log must verify and hold each kind of rejection, and the refusals must be counted in
//! full but audited only up to the per-source cap. Figures: `examples/load.rs`.

#[path = "support/load_harness.rs"]
mod harness;

use harness::Scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_of_100_sites_completes_through_a_flood_of_bad_handshakes_and_messages() {
    let scenario = Scenario {
        sites: 100,
        bad_handshakes: 1000,
        malformed: 1000,
    };
    let out = harness::run(scenario).await;
    let figures = out.to_json(&scenario);
    println!("{figures}");

    // Nothing valid lost: every site's update is in the round, every site's spend in the ledger.
    assert_eq!(out.contributors.len(), 100, "{figures}");
    assert_eq!(out.ledger_rows, 100, "{figures}");
    assert!(out.epsilon > 0.0);

    // No bad certificate got in: the coordinator accepted exactly one connection per
    // site and per attacker (whose certificates are valid), nothing else. (The foreign
    // and expired certificates name site-000: had either been accepted, it would show.)
    let mut want: std::collections::BTreeMap<String, usize> =
        (0..100).map(|i| (format!("site/site-{i:03}"), 1)).collect();
    want.extend((0..10).map(|i| (format!("site/mallory-{i}"), 1)));
    assert_eq!(out.accepted, want, "{figures}");
    // The per-source rate limit (bursts of 16, then 2 per second, from each of the 10
    // flooding addresses) let only a few of the bad handshakes reach TLS; the rest were
    // refused before any cryptography. Without it, nearly all 1,000 would reach TLS.
    let h = &out.handshakes;
    let load = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
    let reached_tls = load(&h.failed_tls) + load(&h.unconfirmed);
    let allowed = 10.0 * (16.0 + 2.0 * (out.flood_ms as f64 / 1000.0 + 1.0));
    assert!((reached_tls as f64) <= allowed, "{figures}");
    assert!(load(&h.refused_early) > 0, "{figures}");

    // The audit log verifies and holds each kind of rejected update, with its reason.
    assert!(out.audit_verified, "{figures}");
    let has = |needle: &str| out.rejected_reasons.iter().any(|r| r.contains(needle));
    for needle in [
        "not finite",
        "wrong shape",
        "but round 1 is collecting",
        "duplicate update",
    ] {
        assert!(
            has(needle),
            "no update_rejected with {needle:?}: {:?}",
            out.rejected_reasons
        );
    }
    // Refusals are all counted, but audited one by one only up to the cap per source
    // (10 per source per minute): not one fsynced record per bad handshake.
    // (Every refusal a bad peer saw was counted; under loopback bursts a few attempts'
    // packets are lost on the way in, so the count is not exactly 1,000.)
    assert!(
        out.connections_refused >= (load(&h.refused_early) + load(&h.failed_tls)) as u64,
        "{figures}"
    );
    let refused_records = out
        .audit_events
        .get("connection_refused")
        .copied()
        .unwrap_or(0);
    assert!(
        refused_records > 0 && refused_records <= 10 * 10 + 10,
        "{figures}"
    );
    let other_refusals = out.audit_events.get("refused").copied().unwrap_or(0);
    assert!(
        other_refusals > 0 && other_refusals <= 10 * 10 + 10 + 20,
        "{figures}"
    );
    assert!(out.audit_suppressed > 0, "{figures}");
}
