//! Rounds, model versions and their lineage (which sites' updates made which version), and
//! the prunes the retention policy recorded.

use rusqlite::{params, OptionalExtension};

use super::{
    bad_text, constraint, ModelVersionRow, Pruned, RoundRow, RoundStatus, Store, StoreError,
};

impl Store {
    /// Marks a reserved round completed with its model version and the sites whose updates
    /// made it; one transaction. Every contributor must have paid for the round.
    pub fn complete_round(
        &mut self,
        study: &str,
        round: u64,
        model_file: &str,
        sha256: &str,
        contributors: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        if !(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(StoreError::Invalid(format!(
                "{sha256:?} is not a hex SHA-256 digest"
            )));
        }
        if contributors.is_empty() {
            return Err(StoreError::Invalid(format!(
                "round {round} of study {study:?}: a model version needs contributors"
            )));
        }
        let tx = self.write()?;
        finish_round(&tx, study, round, RoundStatus::Completed, None, now)?;
        tx.execute(
            "INSERT INTO model_versions (study, round, file, sha256, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![study, round, model_file, sha256, now],
        )?;
        {
            let mut ins =
                tx.prepare_cached("INSERT INTO lineage (study, round, site) VALUES (?1, ?2, ?3)")?;
            for site in contributors {
                ins.execute(params![study, round, site]).map_err(|e| {
                    constraint(e, || {
                        format!(
                            "contributor {site:?} is listed twice or did not pay for round \
                             {round} of study {study:?}"
                        )
                    })
                })?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks a reserved round aborted. Its spends stand.
    pub fn abort_round(
        &mut self,
        study: &str,
        round: u64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        finish_round(&tx, study, round, RoundStatus::Aborted, Some(reason), now)?;
        tx.commit()?;
        Ok(())
    }

    /// The latest completed round with its model file and digest: where a restart resumes.
    pub fn last_completed_round(
        &self,
        study: &str,
    ) -> Result<Option<(u64, String, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.round, m.file, m.sha256 FROM model_versions m
             JOIN rounds r ON r.study = m.study AND r.round = m.round
             WHERE m.study = ?1 AND r.status = 'completed'
             ORDER BY m.round DESC LIMIT 1",
        )?;
        Ok(stmt
            .query_row([study], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?)
    }

    /// Every round of the study, in order.
    pub fn rounds(&self, study: &str) -> Result<Vec<RoundRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, status, started_at, finished_at, reason FROM rounds
             WHERE study = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([study], |r| {
            let status: String = r.get(1)?;
            Ok(RoundRow {
                round: r.get(0)?,
                status: RoundStatus::parse(&status).ok_or_else(|| bad_text(1, &status))?,
                started_at: r.get(2)?,
                finished_at: r.get(3)?,
                reason: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Which sites contributed to each completed round's model, by round; sites sorted.
    pub fn lineage(&self, study: &str) -> Result<Vec<(u64, Vec<String>)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, site FROM lineage WHERE study = ?1 ORDER BY round, site",
        )?;
        let rows = stmt.query_map([study], |r| Ok((r.get::<_, u64>(0)?, r.get(1)?)))?;
        let mut out: Vec<(u64, Vec<String>)> = Vec::new();
        for row in rows {
            let (round, site) = row?;
            match out.last_mut() {
                Some((r, sites)) if *r == round => sites.push(site),
                _ => out.push((round, vec![site])),
            }
        }
        Ok(out)
    }

    /// Every model version of the study, in round order, with its prune record if the
    /// retention policy removed its file.
    pub fn model_versions(&self, study: &str) -> Result<Vec<ModelVersionRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.round, m.file, m.sha256, m.created_at, p.pruned_at, p.audit_seq
             FROM model_versions m
             LEFT JOIN model_prunes p ON p.study = m.study AND p.round = m.round
             WHERE m.study = ?1 ORDER BY m.round",
        )?;
        let rows = stmt.query_map([study], |r| {
            let pruned_at: Option<i64> = r.get(4)?;
            let seq: Option<u64> = r.get(5)?;
            Ok(ModelVersionRow {
                round: r.get(0)?,
                file: r.get(1)?,
                sha256: r.get(2)?,
                created_at: r.get(3)?,
                pruned: pruned_at
                    .zip(seq)
                    .map(|(at, audit_seq)| Pruned { at, audit_seq }),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that the files of `rounds` of `study` are removed under the retention policy,
    /// announced by audit record `audit_seq`; one transaction. Call it after the audit
    /// record is on disk and before deleting the files. Refused, recording nothing, for a
    /// round without a model version, one already pruned, or the study's latest version
    /// (a restart resumes from it: it is never pruned).
    pub fn record_prunes(
        &mut self,
        study: &str,
        rounds: &[u64],
        audit_seq: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        if audit_seq == 0 {
            return Err(StoreError::Invalid(
                "a prune needs the seq of the audit record that announced it".into(),
            ));
        }
        let tx = self.write()?;
        let latest: Option<u64> = tx.query_row(
            "SELECT max(round) FROM model_versions WHERE study = ?1",
            [study],
            |r| r.get(0),
        )?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO model_prunes (study, round, pruned_at, audit_seq)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for &round in rounds {
                if Some(round) == latest {
                    return Err(StoreError::Conflict(format!(
                        "round {round} is the latest model version of study {study:?}: it is \
                         never pruned (a restart resumes from it)"
                    )));
                }
                ins.execute(params![study, round, now, audit_seq])
                    .map_err(|e| {
                        constraint(e, || {
                            format!(
                                "round {round} of study {study:?} has no model version or was \
                                 already pruned"
                            )
                        })
                    })?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

fn finish_round(
    tx: &rusqlite::Transaction<'_>,
    study: &str,
    round: u64,
    to: RoundStatus,
    reason: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    let status: Option<String> = tx
        .query_row(
            "SELECT status FROM rounds WHERE study = ?1 AND round = ?2",
            params![study, round],
            |r| r.get(0),
        )
        .optional()?;
    match status.as_deref() {
        None => Err(StoreError::NotFound(format!(
            "round {round} of study {study:?}"
        ))),
        Some("reserved") => {
            tx.execute(
                "UPDATE rounds SET status = ?3, finished_at = ?4, reason = ?5
                 WHERE study = ?1 AND round = ?2",
                params![study, round, to.as_str(), now, reason],
            )?;
            Ok(())
        }
        Some(s) => Err(StoreError::Conflict(format!(
            "round {round} of study {study:?} is already {s}"
        ))),
    }
}
