//! Counters an operator's monitoring scrapes, and alerts.
//!
//! The counters are written in the Prometheus text format to `metrics.prom` in the state
//! directory (for node_exporter's textfile collector, the usual way a hospital's monitoring
//! picks up a service's figures without opening a port), replaced atomically every few
//! seconds and at shutdown. They hold counts and names only: never a value of an update.
//!
//! Beside the counters, per study: the epsilon spent (the worst site's, at the study's
//! delta, as `ledger show` reports it), the budget and what is left of it, each site's
//! epsilon, and a histogram of round durations. The epsilons come from the ledger's
//! mechanism parameters through the study's accountant (composed, never added up): once
//! per study at start, then per round from the figure the round engine computed when the
//! spend was recorded (nothing is recomputed per scrape). A study with central placement
//! shows no per-site figure: its guarantee is one for the study, and which sites paid for
//! which rounds stays out of monitoring (`ledger show`, access-controlled and audited,
//! still lists them).
//!
//! An alert is a warning in the log, a counter (`fedpriv_alerts_total{kind=...}`) and an
//! audit record: repeated refusals from one address or identity, a site whose updates do
//! not fit its clip norm and noise, a study close to its budget.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fedpriv_common::audit::details::Alert;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::exposition::escape_label;

use crate::audit::{AuditHandle, COORDINATOR};

/// Counter names (with their help text).
pub const CONNECTIONS_ACCEPTED: &str = "fedpriv_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "fedpriv_connections_refused_total";
pub const REFUSALS: &str = "fedpriv_refusals_total";
pub const UPDATES_ACCEPTED: &str = "fedpriv_updates_accepted_total";
pub const UPDATES_REJECTED: &str = "fedpriv_updates_rejected_total";
pub const UPDATE_BYTES: &str = "fedpriv_update_bytes_total";
pub const ROUNDS_COMPLETED: &str = "fedpriv_rounds_completed_total";
pub const ROUNDS_ABORTED: &str = "fedpriv_rounds_aborted_total";
pub const ALERTS: &str = "fedpriv_alerts_total";
pub const AUDIT_SUPPRESSED: &str = "fedpriv_audit_records_suppressed_total";

/// Gauge and histogram names.
pub const STUDY_EPSILON_SPENT: &str = "fedpriv_study_epsilon_spent";
pub const STUDY_EPSILON_BUDGET: &str = "fedpriv_study_epsilon_budget";
pub const STUDY_EPSILON_LEFT: &str = "fedpriv_study_epsilon_left";
pub const STUDY_SITE_EPSILON_SPENT: &str = "fedpriv_study_site_epsilon_spent";
pub const ROUND_DURATION: &str = "fedpriv_round_duration_seconds";

/// Upper bounds (seconds) of the round-duration buckets: a round takes from about a second
/// (small models on fast sites; a tenth of one on loopback) to its timeout (minutes), and
/// `+Inf` beyond.
pub const ROUND_DURATION_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// How a round ended, the label of its duration.
pub mod outcome {
    pub const COMPLETED: &str = "completed";
    pub const ABORTED: &str = "aborted";
}

fn help(name: &str) -> &'static str {
    match name {
        CONNECTIONS_ACCEPTED => "mTLS connections accepted",
        CONNECTIONS_REFUSED => "connections or handshakes refused",
        REFUSALS => "requests refused (role, enrolment, rate limit, cap)",
        UPDATES_ACCEPTED => "site updates accepted into a round",
        UPDATES_REJECTED => "site updates rejected",
        UPDATE_BYTES => "bytes of update bodies received",
        ROUNDS_COMPLETED => "rounds completed",
        ROUNDS_ABORTED => "rounds aborted",
        ALERTS => "alerts raised",
        AUDIT_SUPPRESSED => "repeated refusals counted but not written one by one to the audit log",
        _ => "fedpriv counter",
    }
}

/// Alert kinds.
pub mod alert {
    /// Many refusals from one remote address or identity.
    pub const REPEATED_REFUSALS: &str = "repeated_refusals";
    /// An update's norm does not fit the study's clip norm and noise.
    pub const NORM_ANOMALY: &str = "norm_anomaly";
    /// A study has spent most of its budget.
    pub const BUDGET_NEAR: &str = "budget_near_limit";
}

type Key = (&'static str, Vec<(&'static str, String)>);

/// Whether a study's metrics leave out per-site figures: the study report's rule
/// ([`crate::report::Visibility`]), so that monitoring never shows what the report hides
/// (central placement, and any future placement that keeps participants from the
/// coordinator's readers).
pub fn hides_sites(cfg: &StudyConfig) -> bool {
    crate::report::Visibility::of(cfg.privacy.unit, cfg.privacy.placement)
        == crate::report::Visibility::StudyOnly
}

/// One study's privacy figures.
#[derive(Debug, Clone, Default)]
struct StudyPrivacy {
    budget: f64,
    hide_sites: bool,
    /// Each site's epsilon at the study's delta (0 before its first spend).
    sites: BTreeMap<String, f64>,
}

impl StudyPrivacy {
    /// The study's epsilon: the worst site's (sites hold disjoint data).
    fn spent(&self) -> f64 {
        self.sites.values().copied().fold(0.0, f64::max)
    }
}

/// Round durations of one study and outcome: per bucket (not cumulative), sum, count.
#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: [u64; ROUND_DURATION_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = ROUND_DURATION_BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Shared counters, gauges and histograms. Cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    counters: Arc<Mutex<BTreeMap<Key, u64>>>,
    privacy: Arc<Mutex<BTreeMap<String, StudyPrivacy>>>,
    rounds: Arc<Mutex<BTreeMap<(String, &'static str), Histogram>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by` to a counter with the given labels.
    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], by: u64) {
        let key = (
            name,
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        );
        if let Ok(mut c) = self.counters.lock() {
            *c.entry(key).or_insert(0) += by;
        }
    }

    pub fn inc(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        self.add(name, labels, 1);
    }

    /// A counter's value (0 if never touched).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let Ok(c) = self.counters.lock() else {
            return 0;
        };
        c.iter()
            .find(|((n, l), _)| {
                *n == name
                    && l.len() == labels.len()
                    && l.iter()
                        .zip(labels)
                        .all(|((k, v), (k2, v2))| k == k2 && v == v2)
            })
            .map_or(0, |(_, v)| *v)
    }

    /// A study's budget and whether its per-site figures are hidden (at start, and when an
    /// operator creates or changes it), with `sites` (each enrolled site's epsilon so far)
    /// when known; sites already known keep their figures.
    pub fn set_study(&self, cfg: &StudyConfig, sites: BTreeMap<String, f64>) {
        if let Ok(mut p) = self.privacy.lock() {
            let st = p.entry(cfg.id.clone()).or_default();
            st.budget = cfg.privacy.epsilon.get();
            st.hide_sites = hides_sites(cfg);
            for site in &cfg.enrolled {
                st.sites.entry(site.clone()).or_insert(0.0);
            }
            st.sites.extend(sites);
        }
    }

    /// A site's epsilon in a study after a recorded spend (the accountant's figure over
    /// every spend of the site, as the ledger stores it).
    pub fn set_site_epsilon(&self, study: &str, site: &str, epsilon: f64) {
        if let Ok(mut p) = self.privacy.lock() {
            p.entry(study.to_string())
                .or_default()
                .sites
                .insert(site.to_string(), epsilon);
        }
    }

    /// The study's epsilon spent (the worst site's), if the study is known.
    pub fn study_epsilon(&self, study: &str) -> Option<f64> {
        let p = self.privacy.lock().ok()?;
        p.get(study).map(StudyPrivacy::spent)
    }

    /// One round's duration, from its spend being recorded to its model or its abort.
    pub fn observe_round(&self, study: &str, outcome: &'static str, seconds: f64) {
        if let Ok(mut r) = self.rounds.lock() {
            r.entry((study.to_string(), outcome))
                .or_default()
                .observe(seconds);
        }
    }

    /// Everything in the Prometheus text exposition format: counters, then the privacy
    /// gauges, then the round-duration histogram.
    pub fn render(&self) -> String {
        let mut out = self.render_counters();
        self.render_privacy(&mut out);
        self.render_rounds(&mut out);
        out
    }

    fn render_privacy(&self, out: &mut String) {
        let Ok(p) = self.privacy.lock() else {
            return;
        };
        if p.is_empty() {
            return;
        }
        let study = |id: &str| format!("study=\"{}\"", escape_label(id));
        let mut family = |name: &str, help: &str, samples: Vec<(String, f64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for (labels, v) in samples {
                out.push_str(&format!("{name}{{{labels}}} {v}\n"));
            }
        };
        family(
            STUDY_EPSILON_SPENT,
            "epsilon a study has spent at its delta (the worst site's, by the study's accountant)",
            p.iter().map(|(id, s)| (study(id), s.spent())).collect(),
        );
        family(
            STUDY_EPSILON_BUDGET,
            "a study's epsilon budget",
            p.iter().map(|(id, s)| (study(id), s.budget)).collect(),
        );
        family(
            STUDY_EPSILON_LEFT,
            "a study's epsilon budget less the epsilon spent (not a count of rounds: epsilons compose, they do not add)",
            p.iter()
                .map(|(id, s)| (study(id), (s.budget - s.spent()).max(0.0)))
                .collect(),
        );
        family(
            STUDY_SITE_EPSILON_SPENT,
            "epsilon a site has spent in a study at its delta (not shown for central placement)",
            p.iter()
                .filter(|(_, s)| !s.hide_sites)
                .flat_map(|(id, s)| {
                    s.sites.iter().map(move |(site, v)| {
                        (format!("{},site=\"{}\"", study(id), escape_label(site)), *v)
                    })
                })
                .collect(),
        );
    }

    fn render_rounds(&self, out: &mut String) {
        let Ok(r) = self.rounds.lock() else {
            return;
        };
        if r.is_empty() {
            return;
        }
        let name = ROUND_DURATION;
        out.push_str(&format!(
            "# HELP {name} seconds from a round's spend being recorded to its model (completed) or its abort\n# TYPE {name} histogram\n"
        ));
        for ((study, outcome), h) in r.iter() {
            let labels = format!("study=\"{}\",outcome=\"{outcome}\"", escape_label(study));
            let mut cumulative = 0;
            for (bound, n) in ROUND_DURATION_BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                out.push_str(&format!(
                    "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}\n"
                ));
            }
            out.push_str(&format!(
                "{name}_bucket{{{labels},le=\"+Inf\"}} {}\n",
                h.count
            ));
            out.push_str(&format!("{name}_sum{{{labels}}} {}\n", h.sum));
            out.push_str(&format!("{name}_count{{{labels}}} {}\n", h.count));
        }
    }

    /// The counters in the Prometheus text exposition format.
    fn render_counters(&self) -> String {
        let Ok(c) = self.counters.lock() else {
            return String::new();
        };
        let mut out = String::new();
        let mut last: Option<&str> = None;
        for ((name, labels), value) in c.iter() {
            if last != Some(name) {
                out.push_str(&format!(
                    "# HELP {name} {}\n# TYPE {name} counter\n",
                    help(name)
                ));
                last = Some(name);
            }
            out.push_str(name);
            if !labels.is_empty() {
                let l: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                    .collect();
                out.push_str(&format!("{{{}}}", l.join(",")));
            }
            out.push_str(&format!(" {value}\n"));
        }
        out
    }

    /// Replaces `dir/metrics.prom` atomically (write, then rename).
    pub fn write_file(&self, dir: &Path) -> std::io::Result<()> {
        let path = dir.join("metrics.prom");
        let tmp = dir.join("metrics.prom.tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, &path)
    }

    /// Raises an alert: a warning in the log, the alerts counter, and an audit record
    /// (not waited for: an alert reports, it does not gate an action).
    pub fn alert(
        &self,
        audit: Option<&AuditHandle>,
        kind: &'static str,
        subject: &str,
        detail: &str,
    ) {
        tracing::warn!(alert = kind, %subject, %detail, "ALERT");
        self.inc(ALERTS, &[("kind", kind)]);
        if let Some(a) = audit {
            a.record_detached(
                COORDINATOR,
                &Alert {
                    kind: kind.to_string(),
                    subject: subject.to_string(),
                    detail: detail.to_string(),
                },
            );
        }
    }
}

/// Counts refusals per source (a remote address or an identity) in fixed windows and says
/// when to alert and whether to write this one to the audit log.
///
/// Why: a flood of bad handshakes must not turn into a flood of fsynced audit records that
/// delays valid sites' records; the first refusals from a source in a window are audited
/// one by one, the rest are counted and summarised when the window closes.
#[derive(Debug)]
pub struct RefusalTracker {
    window_ms: u64,
    audit_per_window: u32,
    alert_at: u32,
    sources: BTreeMap<String, Window>,
    /// All sources together: a flood sprayed from many addresses (an IPv6 prefix holds
    /// millions) must not buy ten fsynced records per address either.
    audit_all_per_window: u32,
    all: Window,
    all_unaudited: u32,
    /// Refusals not audited one by one from sources forgotten to keep the map bounded,
    /// reported by the next [`RefusalTracker::flush`].
    evicted_unaudited: u32,
    last_sweep_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start_ms: u64,
    count: u32,
}

/// Sources (addresses, identities) with a window of their own; beyond it a flood's new
/// addresses are tallied only against the global cap.
const MAX_TRACKED_SOURCES: usize = 100_000;

/// What to do about one refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalVerdict {
    /// Write this refusal to the audit log.
    pub audit: bool,
    /// Raise the repeated-refusals alert now (once per window per source).
    pub alert: bool,
    /// Refusals from this source in the window that closed with this one and were not
    /// audited one by one (to be written as one summary record).
    pub suppressed_in_closed_window: u32,
    /// Refusals from any source, in the global window that closed with this one, that were
    /// not audited one by one because of the global cap (one summary record).
    pub suppressed_globally_in_closed_window: u32,
}

impl RefusalTracker {
    /// Audits the first `audit_per_window` refusals per source per window and alerts at the
    /// `alert_at`-th.
    pub fn new(window_ms: u64, audit_per_window: u32, alert_at: u32) -> Self {
        Self::with_global_cap(window_ms, audit_per_window, alert_at, u32::MAX)
    }

    /// As [`RefusalTracker::new`], and at most `audit_all_per_window` refusals audited one
    /// by one per window over all sources together.
    pub fn with_global_cap(
        window_ms: u64,
        audit_per_window: u32,
        alert_at: u32,
        audit_all_per_window: u32,
    ) -> Self {
        Self {
            window_ms,
            audit_per_window,
            alert_at,
            sources: BTreeMap::new(),
            audit_all_per_window,
            all: Window {
                start_ms: 0,
                count: 0,
            },
            all_unaudited: 0,
            evicted_unaudited: 0,
            last_sweep_ms: 0,
        }
    }

    /// Summaries due: per source whose window has closed (or every source with `all`, at
    /// shutdown), the refusals its cap kept out of the log; `"all"` for the global cap and
    /// for forgotten sources. Those windows are forgotten. Called on a timer, so a burst
    /// followed by silence is still summarised.
    pub fn flush(&mut self, now_ms: u64, all: bool) -> Vec<(String, u32)> {
        let (window, cap) = (self.window_ms, self.audit_per_window);
        let closed = |w: &Window| all || now_ms.saturating_sub(w.start_ms) >= window;
        let mut out: Vec<(String, u32)> = self
            .sources
            .iter()
            .filter(|(_, w)| closed(w) && w.count > cap)
            .map(|(s, w)| (s.clone(), w.count - cap))
            .collect();
        self.sources.retain(|_, w| !closed(w));
        let mut global = std::mem::take(&mut self.evicted_unaudited);
        if closed(&self.all) {
            global = global.saturating_add(std::mem::take(&mut self.all_unaudited));
            self.all = Window {
                start_ms: now_ms,
                count: 0,
            };
        }
        if global > 0 {
            out.push(("all".into(), global));
        }
        out
    }

    /// One refusal of an authenticated identity `source` at `now_ms` (a monotonic clock):
    /// capped per identity only (identities are as many as the PKI issued, so they cannot
    /// be sprayed, and what they were refused is worth keeping).
    pub fn refused(&mut self, source: &str, now_ms: u64) -> RefusalVerdict {
        self.tally(source, now_ms, false)
    }

    /// One refusal of an unauthenticated source (an address): capped per source and, over
    /// all such sources together, by the global cap.
    pub fn refused_anonymous(&mut self, source: &str, now_ms: u64) -> RefusalVerdict {
        self.tally(source, now_ms, true)
    }

    fn tally(&mut self, source: &str, now_ms: u64, anonymous: bool) -> RefusalVerdict {
        if self.sources.len() >= MAX_TRACKED_SOURCES && !self.sources.contains_key(source) {
            self.sweep(now_ms);
        }
        if self.sources.len() >= MAX_TRACKED_SOURCES && !self.sources.contains_key(source) {
            // The table is full of live windows (an address-spraying flood): this source
            // is tallied only against the global cap, so memory stays bounded.
            let mut suppressed_globally = 0;
            if now_ms.saturating_sub(self.all.start_ms) >= self.window_ms {
                suppressed_globally = std::mem::take(&mut self.all_unaudited);
                self.all = Window {
                    start_ms: now_ms,
                    count: 0,
                };
            }
            let audit = self.all.count < self.audit_all_per_window;
            if audit {
                self.all.count = self.all.count.saturating_add(1);
            } else {
                self.all_unaudited = self.all_unaudited.saturating_add(1);
            }
            return RefusalVerdict {
                audit,
                alert: false,
                suppressed_in_closed_window: 0,
                suppressed_globally_in_closed_window: suppressed_globally,
            };
        }
        let mut suppressed = 0;
        let w = self.sources.entry(source.to_string()).or_insert(Window {
            start_ms: now_ms,
            count: 0,
        });
        if now_ms.saturating_sub(w.start_ms) >= self.window_ms {
            suppressed = w.count.saturating_sub(self.audit_per_window);
            *w = Window {
                start_ms: now_ms,
                count: 0,
            };
        }
        w.count = w.count.saturating_add(1);
        let per_source_ok = w.count <= self.audit_per_window;
        let alert = w.count == self.alert_at;
        let mut suppressed_globally = 0;
        if now_ms.saturating_sub(self.all.start_ms) >= self.window_ms {
            suppressed_globally = self.all_unaudited;
            self.all = Window {
                start_ms: now_ms,
                count: 0,
            };
            self.all_unaudited = 0;
        }
        let within_global = self.all.count < self.audit_all_per_window;
        let audit = per_source_ok && (!anonymous || within_global);
        if audit && anonymous {
            self.all.count = self.all.count.saturating_add(1);
        } else if anonymous && (per_source_ok || !within_global) {
            // Over the global cap: only the global summary reports it.
            self.all_unaudited = self.all_unaudited.saturating_add(1);
        }
        // Past the global cap an address flood must not buy records any other way either:
        // no per-address alert, no per-address summary (both fold into the global one).
        let quiet = anonymous && !within_global;
        if quiet {
            self.all_unaudited = self.all_unaudited.saturating_add(suppressed);
        }
        RefusalVerdict {
            audit,
            alert: alert && !quiet,
            suppressed_in_closed_window: if quiet { 0 } else { suppressed },
            suppressed_globally_in_closed_window: suppressed_globally,
        }
    }

    /// Forgets closed windows, keeping what their caps held back for the next summary; at
    /// most once per window (it walks the whole map).
    fn sweep(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_sweep_ms) < self.window_ms {
            return;
        }
        self.last_sweep_ms = now_ms;
        let (window, cap) = (self.window_ms, self.audit_per_window);
        let mut evicted = 0u32;
        self.sources.retain(|_, w| {
            let keep = now_ms.saturating_sub(w.start_ms) < window;
            if !keep {
                evicted = evicted.saturating_add(w.count.saturating_sub(cap));
            }
            keep
        });
        self.evicted_unaudited = self.evicted_unaudited.saturating_add(evicted);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counters_render_in_prometheus_text_format() {
        let m = Metrics::new();
        m.inc(ALERTS, &[("kind", alert::NORM_ANOMALY)]);
        m.inc(ALERTS, &[("kind", alert::NORM_ANOMALY)]);
        m.add(UPDATE_BYTES, &[("study", "s\"1")], 40);
        let text = m.render();
        assert!(text.contains("# TYPE fedpriv_alerts_total counter"));
        assert!(text.contains("fedpriv_alerts_total{kind=\"norm_anomaly\"} 2\n"));
        assert!(text.contains("fedpriv_update_bytes_total{study=\"s\\\"1\"} 40\n"));
        assert_eq!(m.get(ALERTS, &[("kind", "norm_anomaly")]), 2);
        assert_eq!(m.get(ALERTS, &[("kind", "other")]), 0);
    }

    fn study(id: &str, placement: &str, epsilon: f64) -> StudyConfig {
        fedpriv_common::test_util::StudyBuilder::new(id)
            .placement(placement)
            .epsilon(epsilon)
            .enrolled(["a", "b"])
            .config()
            .unwrap()
    }

    #[test]
    fn privacy_gauges_show_the_worst_site_the_budget_left_and_per_site_unless_central() {
        let m = Metrics::new();
        m.set_study(&study("local", "local", 3.0), BTreeMap::new());
        m.set_site_epsilon("local", "a", 0.5);
        m.set_site_epsilon("local", "b", 1.25);
        m.set_study(
            &study("cen", "central", 2.0),
            [("a".to_string(), 0.75)].into_iter().collect(),
        );
        let text = m.render();
        assert!(text.contains("# TYPE fedpriv_study_epsilon_spent gauge\n"));
        assert!(text.contains("fedpriv_study_epsilon_spent{study=\"local\"} 1.25\n"));
        assert!(text.contains("fedpriv_study_epsilon_budget{study=\"local\"} 3\n"));
        assert!(text.contains("fedpriv_study_epsilon_left{study=\"local\"} 1.75\n"));
        assert!(text.contains("fedpriv_study_site_epsilon_spent{study=\"local\",site=\"a\"} 0.5\n"));
        // Central: the study's figures, no site's.
        assert!(text.contains("fedpriv_study_epsilon_spent{study=\"cen\"} 0.75\n"));
        assert!(text.contains("fedpriv_study_epsilon_left{study=\"cen\"} 1.25\n"));
        assert!(!text.contains("site_epsilon_spent{study=\"cen"), "{text}");
        assert_eq!(m.study_epsilon("local"), Some(1.25));
        // A lowered budget: what is left never goes below 0.
        m.set_study(&study("local", "local", 1.0), BTreeMap::new());
        assert!(m
            .render()
            .contains("fedpriv_study_epsilon_left{study=\"local\"} 0\n"));
        assert_eq!(m.study_epsilon("local"), Some(1.25), "sites kept");
    }

    #[test]
    fn round_durations_render_as_a_cumulative_histogram() {
        let m = Metrics::new();
        assert!(
            !m.render().contains(ROUND_DURATION),
            "nothing before a round"
        );
        for s in [0.2, 3.0, 3.0, 7200.0] {
            m.observe_round("s", outcome::COMPLETED, s);
        }
        m.observe_round("s", outcome::ABORTED, 120.0);
        let text = m.render();
        assert_eq!(
            text.matches("# TYPE fedpriv_round_duration_seconds histogram\n")
                .count(),
            1
        );
        let l = "study=\"s\",outcome=\"completed\"";
        for (le, n) in [("0.5", 1), ("2.5", 1), ("5", 3), ("3600", 3), ("+Inf", 4)] {
            let line = format!("fedpriv_round_duration_seconds_bucket{{{l},le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains(&format!(
            "fedpriv_round_duration_seconds_sum{{{l}}} 7206.2\n"
        )));
        assert!(text.contains(&format!("fedpriv_round_duration_seconds_count{{{l}}} 4\n")));
        let a = "study=\"s\",outcome=\"aborted\"";
        assert!(text.contains(&format!(
            "fedpriv_round_duration_seconds_bucket{{{a},le=\"60\"}} 0\n"
        )));
        assert!(text.contains(&format!(
            "fedpriv_round_duration_seconds_bucket{{{a},le=\"120\"}} 1\n"
        )));
    }

    #[test]
    fn repeated_refusals_are_audited_up_to_a_cap_alerted_once_and_summarised() {
        let mut t = RefusalTracker::new(1000, 3, 5);
        let v: Vec<RefusalVerdict> = (0..8).map(|i| t.refused("10.0.0.9", i)).collect();
        assert_eq!(v.iter().filter(|v| v.audit).count(), 3);
        assert_eq!(v.iter().filter(|v| v.alert).count(), 1);
        assert!(v[4].alert);
        // Another source is counted on its own.
        assert!(t.refused("10.0.0.10", 9).audit);
        // The window closes: the 5 not audited are reported, counting starts again.
        let next = t.refused("10.0.0.9", 1500);
        assert_eq!(next.suppressed_in_closed_window, 5);
        assert!(next.audit && !next.alert);
    }

    #[test]
    fn a_burst_then_silence_is_summarised_by_the_timer_and_at_shutdown() {
        let mut t = RefusalTracker::new(1000, 3, 100);
        for i in 0..8 {
            t.refused("10.0.0.1", i);
        }
        t.refused("10.0.0.2", 500);
        for i in 0..5 {
            t.refused("10.0.0.2", 500 + i);
        }
        assert!(t.flush(900, false).is_empty(), "windows still open");
        assert_eq!(t.flush(1100, false), vec![("10.0.0.1".to_string(), 5)]);
        assert!(t.flush(1100, false).is_empty(), "reported once");
        // Shutdown: open windows too.
        assert_eq!(t.flush(1200, true), vec![("10.0.0.2".to_string(), 3)]);
    }

    #[test]
    fn a_flood_from_many_sources_is_capped_globally_and_summarised() {
        let mut t = RefusalTracker::with_global_cap(1000, 10, 20, 50);
        let audited = (0..1000u64)
            .filter(|i| {
                t.refused_anonymous(&format!("10.0.{}.{}", i / 256, i % 256), *i / 10)
                    .audit
            })
            .count();
        assert_eq!(audited, 50, "one record per source would be 1000");
        // An authenticated identity's refusals are not crowded out by the flood.
        assert!(t.refused("site/st-marys", 100).audit);
        // Past the global cap an address reaching the alert threshold raises no alert of
        // its own (each would be an fsynced record).
        let alerts = (0..30)
            .filter(|i| t.refused_anonymous("10.8.8.8", 200 + i).alert)
            .count();
        assert_eq!(alerts, 0);
        let next = t.refused_anonymous("10.9.9.9", 5000);
        // 950 from the spray, 30 from the address past the cap.
        assert_eq!(next.suppressed_globally_in_closed_window, 980);
        assert!(next.audit);
    }
}
