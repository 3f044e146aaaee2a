//! One tracker of refusals for the whole coordinator (handshakes, site messages, admin
//! requests): each source (an address, an IPv6 /64, or a certificate identity) gets its
//! first refusals of a window audited one by one, the rest counted and summarised when the
//! window closes, and an alert at the 20th (see [`RefusalTracker`]).
//!
//! One policy when the tracker's lock is poisoned (a panic elsewhere while it was held):
//! go on with the tracker as it is. Its state is a few counters, so the worst a poisoned
//! lock can leave is one refusal miscounted; a refusal is never silently dropped for it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use fedpriv_common::audit::details::{Details, Refused};
use fedpriv_common::audit::AuditEvent;

use crate::audit::{AuditFailed, AuditHandle, COORDINATOR};
use crate::metrics::{self, Metrics, RefusalTracker, RefusalVerdict};

/// Refusals per source audited one by one per minute; the alert fires at the 20th.
pub const REFUSAL_WINDOW_MS: u64 = 60_000;
pub const REFUSALS_AUDITED_PER_WINDOW: u32 = 10;
pub const REFUSALS_ALERT_AT: u32 = 20;
/// Over all sources together (a flood sprayed from many addresses).
pub const REFUSALS_AUDITED_PER_WINDOW_ALL: u32 = 200;

/// The coordinator's refusal tracker and where its records go. Cheap to clone; every
/// clone counts into the same windows.
#[derive(Debug, Clone)]
pub struct Refusals {
    tracker: Arc<Mutex<RefusalTracker>>,
    /// The clock origin of the windows.
    started: Instant,
    audit: AuditHandle,
    metrics: Metrics,
}

impl Refusals {
    pub fn new(audit: AuditHandle, metrics: Metrics) -> Self {
        Self {
            tracker: Arc::new(Mutex::new(RefusalTracker::with_global_cap(
                REFUSAL_WINDOW_MS,
                REFUSALS_AUDITED_PER_WINDOW,
                REFUSALS_ALERT_AT,
                REFUSALS_AUDITED_PER_WINDOW_ALL,
            ))),
            started: Instant::now(),
            audit,
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn tracker(&self) -> MutexGuard<'_, RefusalTracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a refusal, writes the summaries of windows that just closed, and says whether
    /// this refusal is within the source's cap (to be audited one by one) and whether the
    /// repeated-refusals alert is due. `anonymous`: a failed handshake, which names no
    /// identity we issued (only its address).
    fn tally(&self, source: &str, anonymous: bool) -> RefusalVerdict {
        let now = self.now_ms();
        let verdict = {
            let mut t = self.tracker();
            if anonymous {
                t.refused_anonymous(source, now)
            } else {
                t.refused(source, now)
            }
        };
        let counter = if anonymous {
            metrics::CONNECTIONS_REFUSED
        } else {
            metrics::REFUSALS
        };
        self.metrics.inc(counter, &[]);
        if verdict.suppressed_in_closed_window > 0 {
            self.summary(source, verdict.suppressed_in_closed_window);
        }
        if verdict.suppressed_globally_in_closed_window > 0 {
            self.summary("all", verdict.suppressed_globally_in_closed_window);
        }
        if !verdict.audit {
            self.metrics.inc(metrics::AUDIT_SUPPRESSED, &[]);
        }
        verdict
    }

    fn summary(&self, source: &str, n: u32) {
        self.audit.record_detached(
            COORDINATOR,
            &Refused::Summary {
                source: source.to_string(),
                suppressed_refusals: n,
                window_s: REFUSAL_WINDOW_MS / 1000,
            },
        );
    }

    fn alert(&self, source: &str) {
        self.metrics.alert(
            Some(&self.audit),
            metrics::alert::REPEATED_REFUSALS,
            source,
            &format!(
                "{REFUSALS_ALERT_AT} refusals within {} s",
                REFUSAL_WINDOW_MS / 1000
            ),
        );
    }

    /// Audits a refusal keyed by `source` unless the source already had its share this
    /// window (then it is counted, and summarised when the window closes), and raises the
    /// repeated-refusals alert. Not waited for: the refusal itself is the safe outcome.
    pub fn note<D: Details>(&self, source: &str, details: &D) {
        let anonymous = D::EVENT == AuditEvent::ConnectionRefused;
        let verdict = self.tally(source, anonymous);
        if verdict.audit {
            self.audit.record_detached(source, details);
        }
        if verdict.alert {
            self.alert(source);
        }
    }

    /// As [`Refusals::note`], but a refusal within the cap is on disk before this returns:
    /// the requester is told of it next, and what it is told of must already be on record.
    /// Err if that record could not be written.
    pub async fn note_durably<D: Details>(
        &self,
        source: &str,
        details: &D,
    ) -> Result<(), AuditFailed> {
        let anonymous = D::EVENT == AuditEvent::ConnectionRefused;
        let verdict = self.tally(source, anonymous);
        let written = if verdict.audit {
            self.audit.record(source, details).await.map(|_| ())
        } else {
            Ok(())
        };
        if verdict.alert {
            self.alert(source);
        }
        written
    }

    /// Writes the summaries of refusals the caps kept out of the log (see
    /// [`RefusalTracker::flush`]); `all` at shutdown.
    pub fn flush(&self, all: bool) {
        let due = self.tracker().flush(self.now_ms(), all);
        for (source, n) in due {
            self.summary(&source, n);
        }
    }
}
