//! Privacy audits on record: what `privacy-audit --state` found for a study's terms, and
//! the query the export gate asks.

use rusqlite::params;

use super::{Store, StoreError};

/// One audit, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyAuditRow {
    pub study: String,
    /// [`fedpriv_common::config::StudyConfig::mechanism_digest`] of the audited terms.
    pub terms_sha256: String,
    pub audited_at: i64,
    pub epsilon_claimed: f64,
    pub epsilon_lower_bound: f64,
    pub delta: f64,
    pub confidence: f64,
    pub canaries: u64,
    pub guesses: u64,
    pub correct_guesses: u64,
    pub passed: bool,
    /// The whole report, as `privacy-audit --json` prints it.
    pub report_json: String,
}

impl PrivacyAuditRow {
    /// The audit log's record of this audit (the same figures, without the report).
    pub fn audit_record(&self) -> fedpriv_common::audit::details::PrivacyAudited {
        fedpriv_common::audit::details::PrivacyAudited {
            study: self.study.clone(),
            terms_sha256: self.terms_sha256.clone(),
            epsilon_claimed: self.epsilon_claimed,
            epsilon_lower_bound: self.epsilon_lower_bound,
            delta: self.delta,
            confidence: self.confidence,
            canaries: self.canaries,
            guesses: self.guesses,
            correct_guesses: self.correct_guesses,
            passed: self.passed,
        }
    }
}

impl Store {
    /// Records an audit (append-only).
    pub fn record_privacy_audit(&mut self, a: &PrivacyAuditRow) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO privacy_audits (study, terms_sha256, audited_at, epsilon_claimed,
                 epsilon_lower_bound, delta, confidence, canaries, guesses, correct_guesses,
                 passed, report_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                a.study,
                a.terms_sha256,
                a.audited_at,
                a.epsilon_claimed,
                a.epsilon_lower_bound,
                a.delta,
                a.confidence,
                a.canaries,
                a.guesses,
                a.correct_guesses,
                i64::from(a.passed),
                a.report_json
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The audits of `study`, oldest first.
    pub fn privacy_audits(&self, study: &str) -> Result<Vec<PrivacyAuditRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT study, terms_sha256, audited_at, epsilon_claimed, epsilon_lower_bound,
                    delta, confidence, canaries, guesses, correct_guesses, passed, report_json
             FROM privacy_audits WHERE study = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![study], |r| {
            Ok(PrivacyAuditRow {
                study: r.get(0)?,
                terms_sha256: r.get(1)?,
                audited_at: r.get(2)?,
                epsilon_claimed: r.get(3)?,
                epsilon_lower_bound: r.get(4)?,
                delta: r.get(5)?,
                confidence: r.get(6)?,
                canaries: r.get(7)?,
                guesses: r.get(8)?,
                correct_guesses: r.get(9)?,
                passed: r.get::<_, i64>(10)? == 1,
                report_json: r.get(11)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The latest passing audit of exactly these terms, if any.
    pub fn passing_privacy_audit(
        &self,
        study: &str,
        terms_sha256: &str,
    ) -> Result<Option<PrivacyAuditRow>, StoreError> {
        Ok(self
            .privacy_audits(study)?
            .into_iter()
            .rev()
            .find(|a| a.passed && a.terms_sha256 == terms_sha256))
    }
}
