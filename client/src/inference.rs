//! Using a released model: scoring it on a labelled file and writing its predictions, with
//! the same preprocessing the sites trained with (the data contract in the model's card:
//! columns, public ranges, fills, categories, image format). Used by
//! `fedpriv-coordinator model evaluate | predict` and a site's own checks.
//!
//! Reads a CSV file (or an image manifest CSV, image paths relative to its folder); rows
//! that cannot be used are skipped and counted, as at a site.

use std::path::Path;

use fedpriv_common::config::{DataSpec, Task};
use fedpriv_common::model::FlatModel;
use fedpriv_common::model_card::ModelCard;
use serde::Serialize;

use crate::data::{self, ColumnSelection, Dataset, LabelKind, LoadOptions, LoadReport};
use crate::site::{select_and_scale, LoadedStudy};
use crate::train::{self, Head, Learner};

/// A model file: its card, its values and the learner that runs it.
#[derive(Debug)]
pub struct Released {
    pub card: ModelCard,
    pub model: FlatModel,
    pub learner: Learner,
}

/// Reads a model file (plaintext safetensors with a fedpriv card).
pub fn load_model(path: &Path) -> Result<Released, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let card =
        ModelCard::from_safetensors(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let learner = Learner::for_data(&card.model, &card.data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let model = FlatModel::from_safetensors_bytes(&bytes, Some(learner.spec()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Released {
        card,
        model,
        learner,
    })
}

/// Loads `path` as the sites would for this data contract: the model's columns only,
/// scaled by the public ranges. Without `labelled`, a file with no label column is read
/// with placeholder labels.
pub fn load_data(
    spec: &DataSpec,
    path: &Path,
    labelled: bool,
) -> Result<(Dataset, LoadReport), String> {
    let (features, text): (Vec<String>, Vec<bool>) = match &spec.image {
        Some(im) => (vec![im.file_column.clone()], vec![true]),
        None => spec
            .features
            .iter()
            .map(|f| (f.clone(), false))
            .chain(spec.categorical.iter().map(|c| (c.name.clone(), true)))
            .unzip(),
    };
    let selection = ColumnSelection {
        features: features.clone(),
        label: spec.label.clone(),
    };
    let mut options = match spec.task {
        Task::Binary => LoadOptions::new(LabelKind::Classes(2)),
        Task::Multiclass if spec.class_labels.is_empty() => {
            LoadOptions::new(LabelKind::Classes(spec.classes))
        }
        Task::Multiclass => LoadOptions::named(spec.class_labels.clone()),
        Task::Regression => LoadOptions::regression(),
    };
    options.text_features = text;
    options.label_optional = !labelled;
    let fills: Vec<Option<f32>> = features
        .iter()
        .map(|f| {
            spec.features
                .iter()
                .position(|g| g == f)
                .and_then(|i| spec.fills.get(i).copied().flatten())
        })
        .collect();
    let loaded = data::load_csv_lenient(path, &selection, &options, &fills, &mut |_, _| {})
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let report = loaded.report;
    let study = match &spec.image {
        Some(_) => {
            let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let source = crate::config::DataSource {
                path: path.to_path_buf(),
                format: crate::config::SourceFormat::Images,
                labels: None,
                columns: Vec::new(),
                root,
                records: 1,
                delta: fedpriv_common::dp::Delta::new(0.5).map_err(|e| e.to_string())?,
                epsilon_cap: fedpriv_common::dp::Epsilon::new(1.0).map_err(|e| e.to_string())?,
            };
            crate::site::image_study(&source, loaded)
        }
        None => LoadedStudy {
            data: loaded.data,
            report,
            dictionaries: loaded.dictionaries,
            files: None,
        },
    };
    let report = study.report;
    let data = select_and_scale(&study, spec)?;
    Ok((data, report))
}

/// A model's quality on a labelled file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Records scored, and those skipped (unusable label or cell).
    pub records: usize,
    pub skipped: usize,
    /// Classification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Binary: the area under the ROC curve; multiclass: the mean of each class against the
    /// rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auroc: Option<f64>,
    /// Per class (in output order): the share of its records predicted as it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recall: Option<Vec<Option<f64>>>,
    /// Regression, in the label's own units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r2: Option<f64>,
}

/// Probability of each class (`[n, K]`; binary: `[n, 1]`, the positive class), or the
/// prediction for regression (in the label's units).
fn scores(r: &Released, data: &Dataset) -> Result<Vec<f64>, String> {
    let z = train::outputs(&r.learner, &r.model, data).map_err(|e| e.to_string())?;
    Ok(match r.learner.head() {
        Head::Sigmoid => z
            .iter()
            .map(|&v| 1.0 / (1.0 + (-f64::from(v)).exp()))
            .collect(),
        Head::Softmax(k) => z
            .chunks(k)
            .flat_map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = row.iter().map(|&v| f64::from(v - max).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |v| v / s)
            })
            .collect(),
        Head::Identity => {
            let (lo, hi) = label_range(&r.card.data);
            z.iter().map(|&v| unscale(f64::from(v), lo, hi)).collect()
        }
    })
}

fn label_range(spec: &DataSpec) -> (f64, f64) {
    spec.label_range
        .map(|r| (f64::from(r[0]), f64::from(r[1])))
        .unwrap_or((-1.0, 1.0))
}

/// A scaled label (in [-1, 1]) back in its own units.
fn unscale(v: f64, lo: f64, hi: f64) -> f64 {
    lo + (v + 1.0) / 2.0 * (hi - lo)
}

/// The area under the ROC curve of `scores` for `positive` labels (ties count half);
/// `None` without both classes.
pub fn auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (pos, neg) =
        positive.iter().fold(
            (0usize, 0usize),
            |(p, n), &x| if x { (p + 1, n) } else { (p, n + 1) },
        );
    if pos == 0 || neg == 0 {
        return None;
    }
    // Mann-Whitney: the rank sum of the positives, with tied scores given their mean rank.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if positive[k] {
                rank_sum += mean_rank;
            }
        }
        i = j + 1;
    }
    Some((rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos as f64 * neg as f64))
}

/// Scores a released model on a labelled file.
pub fn evaluate(r: &Released, path: &Path) -> Result<Evaluation, String> {
    let (data, report) = load_data(&r.card.data, path, true)?;
    if data.n == 0 {
        return Err(format!("{}: no usable labelled record", path.display()));
    }
    let skipped = report.skipped_cell + report.skipped_label + report.skipped_malformed;
    let s = scores(r, &data)?;
    let mut out = Evaluation {
        records: data.n,
        skipped,
        accuracy: None,
        auroc: None,
        recall: None,
        rmse: None,
        r2: None,
    };
    match r.learner.head() {
        Head::Sigmoid => {
            let truth: Vec<bool> = data.y.iter().map(|&y| y > 0.5).collect();
            let right = s
                .iter()
                .zip(&truth)
                .filter(|(p, t)| (**p > 0.5) == **t)
                .count();
            out.accuracy = Some(right as f64 / data.n as f64);
            out.auroc = auroc(&s, &truth);
            out.recall = Some(
                [false, true]
                    .iter()
                    .map(|&c| {
                        let of: Vec<usize> = (0..data.n).filter(|&i| truth[i] == c).collect();
                        (!of.is_empty()).then(|| {
                            of.iter().filter(|&&i| (s[i] > 0.5) == c).count() as f64
                                / of.len() as f64
                        })
                    })
                    .collect(),
            );
        }
        Head::Softmax(k) => {
            let pred: Vec<usize> = s
                .chunks(k)
                .map(|row| (0..k).fold(0, |b, c| if row[c] > row[b] { c } else { b }))
                .collect();
            let truth: Vec<usize> = data.y.iter().map(|&y| y as usize).collect();
            let right = pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
            out.accuracy = Some(right as f64 / data.n as f64);
            let per: Vec<Option<f64>> = (0..k)
                .map(|c| {
                    let col: Vec<f64> = s.chunks(k).map(|row| row[c]).collect();
                    auroc(&col, &truth.iter().map(|&t| t == c).collect::<Vec<_>>())
                })
                .collect();
            let known: Vec<f64> = per.iter().flatten().copied().collect();
            out.auroc = (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64);
            out.recall = Some(
                (0..k)
                    .map(|c| {
                        let of: Vec<usize> = (0..data.n).filter(|&i| truth[i] == c).collect();
                        (!of.is_empty()).then(|| {
                            of.iter().filter(|&&i| pred[i] == c).count() as f64 / of.len() as f64
                        })
                    })
                    .collect(),
            );
        }
        Head::Identity => {
            let (lo, hi) = label_range(&r.card.data);
            let y: Vec<f64> = data
                .y
                .iter()
                .map(|&v| unscale(f64::from(v), lo, hi))
                .collect();
            let sse: f64 = s.iter().zip(&y).map(|(p, t)| (p - t) * (p - t)).sum();
            let mean = y.iter().sum::<f64>() / y.len() as f64;
            let sst: f64 = y.iter().map(|t| (t - mean) * (t - mean)).sum();
            out.rmse = Some((sse / data.n as f64).sqrt());
            out.r2 = (sst > 0.0).then(|| 1.0 - sse / sst);
        }
    }
    Ok(out)
}

/// Writes one prediction per usable record of `input` to `out` (CSV): binary `p` (of the
/// positive class) and `predicted`; multiclass one `p_<class>` per class and `predicted`;
/// regression `prediction` in the label's units. Returns (written, skipped).
pub fn predict(r: &Released, input: &Path, out: &Path) -> Result<(usize, usize), String> {
    use std::io::Write;
    let (data, report) = load_data(&r.card.data, input, false)?;
    let s = scores(r, &data)?;
    let spec = &r.card.data;
    let class_name = |c: usize| {
        spec.class_labels
            .get(c)
            .cloned()
            .unwrap_or_else(|| c.to_string())
    };
    let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e: std::io::Error| format!("{}: {e}", out.display());
    match r.learner.head() {
        Head::Sigmoid => {
            writeln!(w, "p,predicted").map_err(io)?;
            for p in &s {
                writeln!(w, "{p},{}", u8::from(*p > 0.5)).map_err(io)?;
            }
        }
        Head::Softmax(k) => {
            let head: Vec<String> = (0..k).map(|c| format!("p_{}", class_name(c))).collect();
            writeln!(w, "{},predicted", head.join(",")).map_err(io)?;
            for row in s.chunks(k) {
                let best = (0..k).fold(0, |b, c| if row[c] > row[b] { c } else { b });
                let ps: Vec<String> = row.iter().map(|p| p.to_string()).collect();
                writeln!(w, "{},{}", ps.join(","), class_name(best)).map_err(io)?;
            }
        }
        Head::Identity => {
            writeln!(w, "prediction").map_err(io)?;
            for p in &s {
                writeln!(w, "{p}").map_err(io)?;
            }
        }
    }
    w.flush().map_err(io)?;
    Ok((
        data.n,
        report.skipped_cell + report.skipped_label + report.skipped_malformed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_by_hand() {
        // Perfect, inverted, random-ish, ties.
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        assert_eq!(auroc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // 3 positives, 2 negatives: the positive ranks above the negative in 4 of 6 pairs.
        let a = auroc(
            &[0.3, 0.7, 0.4, 0.6, 0.4],
            &[false, true, true, false, true],
        )
        .unwrap_or(0.0);
        assert!((a - 4.0 / 6.0).abs() < 1e-12, "{a}");
        // A tie between a positive and a negative counts half: 4.5 of 6.
        let a = auroc(
            &[0.3, 0.7, 0.6, 0.6, 0.4],
            &[false, true, true, false, true],
        )
        .unwrap_or(0.0);
        assert!((a - 4.5 / 6.0).abs() < 1e-12, "{a}");
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
    }
}
