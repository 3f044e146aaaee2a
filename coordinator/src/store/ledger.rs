//! The privacy-budget ledger: each site's spend per round, append-only.

use std::collections::BTreeMap;

use fedpriv_common::dp::SgmEvent;
use rusqlite::{params, OptionalExtension};

use super::{
    constraint, sgm_event, Charge, LedgerRow, RoundStatus, Store, StoreError, StudyStatus,
};

impl Store {
    /// Records what `round` of `study` costs each site, as `(site, event, epsilon_after)`,
    /// and marks the round reserved; one transaction, on disk when this returns `Ok`.
    ///
    /// Called before any task of the round leaves the process. Refused, storing nothing of
    /// this call, when a site already paid for this round, a site is not enrolled, the round
    /// has already completed or aborted, or the study is not active. A reserved round may
    /// receive further sites' spends in a later call.
    pub fn record_spend(
        &mut self,
        study: &str,
        round: u64,
        entries: &[(String, SgmEvent, f64)],
        now: i64,
    ) -> Result<(), StoreError> {
        let charges: Vec<Charge> = entries
            .iter()
            .map(|(site, event, eps)| Charge {
                site: site.clone(),
                event: *event,
                evaluation: None,
                epsilon_after: *eps,
            })
            .collect();
        self.record_charges(study, round, &charges, now)
    }

    /// [`Self::record_spend`] with each site's evaluation charge, when the round carries
    /// one: both events in the same transaction.
    pub fn record_charges(
        &mut self,
        study: &str,
        round: u64,
        entries: &[Charge],
        now: i64,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Err(StoreError::Invalid(format!(
                "round {round} of study {study:?}: a spend needs at least one site"
            )));
        }
        if let Some(Charge {
            site,
            epsilon_after: eps,
            ..
        }) = entries
            .iter()
            .find(|c| !(c.epsilon_after.is_finite() && c.epsilon_after >= 0.0))
        {
            return Err(StoreError::Invalid(format!(
                "epsilon_after {eps} for site {site:?} is not a finite, non-negative number"
            )));
        }
        let tx = self.write()?;
        let status: Option<String> = tx
            .query_row("SELECT status FROM studies WHERE id = ?1", [study], |r| {
                r.get(0)
            })
            .optional()?;
        match status.as_deref() {
            None => return Err(StoreError::NotFound(format!("study {study:?}"))),
            Some(s) if s != StudyStatus::Active.as_str() => {
                return Err(StoreError::Conflict(format!(
                    "study {study:?} is {s}: no further spends"
                )))
            }
            Some(_) => {}
        }
        tx.execute(
            "INSERT INTO rounds (study, round, status, started_at) VALUES (?1, ?2, 'reserved', ?3)
             ON CONFLICT (study, round) DO NOTHING",
            params![study, round, now],
        )?;
        let rs: String = tx.query_row(
            "SELECT status FROM rounds WHERE study = ?1 AND round = ?2",
            params![study, round],
            |r| r.get(0),
        )?;
        if rs != RoundStatus::Reserved.as_str() {
            return Err(StoreError::Conflict(format!(
                "round {round} of study {study:?} is already {rs}"
            )));
        }
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO ledger (study, site, round, q, sigma, steps, epsilon_after, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let mut eval = tx.prepare_cached(
                "INSERT INTO evaluation_spends (study, site, round, q, sigma, steps, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for Charge {
                site,
                event: ev,
                evaluation,
                epsilon_after: eps,
            } in entries
            {
                ins.execute(params![
                    study,
                    site,
                    round,
                    ev.q.get(),
                    ev.sigma.get(),
                    ev.steps,
                    eps,
                    now
                ])
                .map_err(|e| {
                    constraint(e, || {
                        format!(
                            "site {site:?} already paid for round {round} of study {study:?} \
                             (spends are never overwritten), or is not enrolled in it"
                        )
                    })
                })?;
                if let Some(e) = evaluation {
                    eval.execute(params![
                        study,
                        site,
                        round,
                        e.q.get(),
                        e.sigma.get(),
                        e.steps,
                        now
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every spend of `site` in `study`, in round order.
    pub fn site_events(&self, study: &str, site: &str) -> Result<Vec<SgmEvent>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT q, sigma, steps FROM ledger WHERE study = ?1 AND site = ?2
             UNION ALL
             SELECT q, sigma, steps FROM evaluation_spends WHERE study = ?1 AND site = ?2",
        )?;
        let rows = stmt.query_map([study, site], |r| sgm_event(r, 0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The study's ledger, by round then site.
    pub fn ledger(&self, study: &str) -> Result<Vec<LedgerRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, round, q, sigma, steps, epsilon_after, recorded_at FROM ledger
             WHERE study = ?1 ORDER BY round, site",
        )?;
        let rows = stmt.query_map([study], ledger_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The study's evaluation charges, by round then site (apart from [`Self::ledger`]).
    pub fn evaluation_ledger(&self, study: &str) -> Result<Vec<LedgerRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT e.site, e.round, e.q, e.sigma, e.steps, l.epsilon_after, e.recorded_at
             FROM evaluation_spends e JOIN ledger l USING (study, site, round)
             WHERE e.study = ?1 ORDER BY e.round, e.site",
        )?;
        let rows = stmt.query_map([study], ledger_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Each enrolled site's spends in round order; a site that has spent nothing maps to an
    /// empty list.
    pub fn spent_by_site(
        &self,
        study: &str,
    ) -> Result<BTreeMap<String, Vec<SgmEvent>>, StoreError> {
        let mut out: BTreeMap<String, Vec<SgmEvent>> = self
            .enrolments(study)?
            .into_iter()
            .map(|s| (s, Vec::new()))
            .collect();
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, q, sigma, steps, round FROM ledger WHERE study = ?1
             UNION ALL
             SELECT site, q, sigma, steps, round FROM evaluation_spends WHERE study = ?1
             ORDER BY 5",
        )?;
        let rows = stmt.query_map([study], |r| Ok((r.get::<_, String>(0)?, sgm_event(r, 1)?)))?;
        for row in rows {
            let (site, ev) = row?;
            out.entry(site).or_default().push(ev);
        }
        Ok(out)
    }
}

/// A ledger row from `site, round, q, sigma, steps, epsilon_after, recorded_at`.
fn ledger_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LedgerRow> {
    Ok(LedgerRow {
        site: r.get(0)?,
        round: r.get(1)?,
        event: sgm_event(r, 2)?,
        epsilon_after: r.get(5)?,
        recorded_at: r.get(6)?,
    })
}
