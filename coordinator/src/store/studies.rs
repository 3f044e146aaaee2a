//! Studies, their enrolled sites and the record counts sites declared.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};

use super::{constraint, study_row, Store, StoreError, StudyRow, StudyStatus};

impl Store {
    /// Creates an active study with its enrolled sites. Refused if the id exists.
    pub fn create_study(
        &mut self,
        id: &str,
        config_toml: &str,
        enrolled: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO studies (id, config_toml, created_at, status) VALUES (?1, ?2, ?3, ?4)",
            params![id, config_toml, now, StudyStatus::Active.as_str()],
        )
        .map_err(|e| constraint(e, || format!("study {id:?} already exists")))?;
        for site in enrolled {
            tx.execute(
                "INSERT INTO enrolments (study, site) VALUES (?1, ?2)",
                params![id, site],
            )
            .map_err(|e| constraint(e, || format!("site {site:?} is listed twice")))?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces a study's stored config (an operator's runtime change, already checked by
    /// [`fedpriv_common::admin::apply_changes`]).
    pub fn set_study_config(&mut self, id: &str, config_toml: &str) -> Result<(), StoreError> {
        let tx = self.write()?;
        let n = tx.execute(
            "UPDATE studies SET config_toml = ?2 WHERE id = ?1",
            params![id, config_toml],
        )?;
        if n == 0 {
            return Err(StoreError::Invalid(format!("no study {id:?}")));
        }
        tx.commit()?;
        Ok(())
    }

    /// The study's run id: the stored one, or `fresh`, stored now, if it has none yet (a
    /// study created before run ids existed gets one at its next start).
    pub fn study_instance(&mut self, id: &str, fresh: &str) -> Result<String, StoreError> {
        let tx = self.write()?;
        let stored: Option<Option<String>> = tx
            .query_row("SELECT instance FROM studies WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        let instance = match stored {
            None => return Err(StoreError::Invalid(format!("no study {id:?}"))),
            Some(Some(i)) => i,
            Some(None) => {
                tx.execute(
                    "UPDATE studies SET instance = ?2 WHERE id = ?1",
                    params![id, fresh],
                )?;
                fresh.to_string()
            }
        };
        tx.commit()?;
        Ok(instance)
    }

    pub fn study(&self, id: &str) -> Result<Option<StudyRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, config_toml, created_at, status, end_reason FROM studies WHERE id = ?1",
        )?;
        Ok(stmt.query_row([id], study_row).optional()?)
    }

    /// All studies, oldest first.
    pub fn studies(&self) -> Result<Vec<StudyRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, config_toml, created_at, status, end_reason FROM studies
             ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], study_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The sites enrolled in `study`, sorted.
    pub fn enrolments(&self, study: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT site FROM enrolments WHERE study = ?1 ORDER BY site")?;
        let rows = stmt.query_map([study], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets a study's status and its end reason (`None` clears it).
    pub fn set_study_status(
        &mut self,
        id: &str,
        status: StudyStatus,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE studies SET status = ?2, end_reason = ?3 WHERE id = ?1",
            params![id, status.as_str(), reason],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("study {id:?}")));
        }
        Ok(())
    }

    /// Records (or replaces) the record count an enrolled site reported.
    pub fn set_site_records(&mut self, study: &str, site: &str, n: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO site_records (study, site, records) VALUES (?1, ?2, ?3)
                 ON CONFLICT (study, site) DO UPDATE SET records = excluded.records",
                params![study, site, n],
            )
            .map_err(|e| {
                constraint(e, || {
                    format!("site {site:?} is not enrolled in study {study:?}")
                })
            })?;
        Ok(())
    }

    /// The record counts sites reported, by site.
    pub fn site_records(&self, study: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT site, records FROM site_records WHERE study = ?1")?;
        let rows = stmt.query_map([study], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
