//! Rounds' DP evaluations: the summed noised vectors and what they say, append-only.

use rusqlite::params;

use super::{EvaluationRow, Store, StoreError};

fn json_column<T: serde::de::DeserializeOwned>(
    r: &rusqlite::Row<'_>,
    at: usize,
) -> rusqlite::Result<T> {
    let text: String = r.get(at)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("evaluation: {e}")))
}

impl Store {
    /// Stores a round's evaluation (the round must have been reserved); never overwritten.
    pub fn record_evaluation(&mut self, study: &str, e: &EvaluationRow) -> Result<(), StoreError> {
        let round = e.round;
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO evaluations (study, round, model_round, sites, sum, summary, recorded_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                study,
                round,
                e.model_round,
                to_json(&e.sites)?,
                to_json(&e.sum)?,
                to_json(&e.summary)?,
                e.recorded_at
            ],
        )
        .map_err(|e| {
            super::constraint(e, || {
                format!("round {round} of study {study:?} already has an evaluation, or was never started")
            })
        })?;
        tx.commit()?;
        Ok(())
    }

    /// The study's evaluations, by round.
    pub fn evaluations(&self, study: &str) -> Result<Vec<EvaluationRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, model_round, sites, sum, summary, recorded_at FROM evaluations
             WHERE study = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([study], |r| {
            Ok(EvaluationRow {
                round: r.get(0)?,
                model_round: r.get(1)?,
                sites: json_column(r, 2)?,
                sum: json_column(r, 3)?,
                summary: json_column(r, 4)?,
                recorded_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
