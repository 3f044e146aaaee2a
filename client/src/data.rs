//! A site's local data: CSV loading with minimum-necessary column selection and strict
//! validation, feature scaling from publicly declared ranges, and deterministic splits for
//! the demo and the tests.
//!
//! Errors name the line (1-based, the header is line 1) and the column, never the cell's
//! content: a malformed cell can hold a patient's identifier, and error messages end up in
//! logs that may leave the site.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default cap on data rows, so that a wrong path (a huge log file, say) fails fast instead
/// of filling memory.
pub const DEFAULT_MAX_ROWS: usize = 10_000_000;
/// Longest line accepted, in bytes; bounds the memory one line can take.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Cells read as missing. `NaN` and `inf` are not here: they parse as numbers and are
/// reported as non-finite, which is a different fault in the source system.
const MISSING_TOKENS: &[&str] = &["", "na", "n/a", "null", "none", "?"];

/// Examples in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `n x d` feature values, row-major.
    pub x: Vec<f32>,
    /// `n` labels: class ids (as floats) or regression targets.
    pub y: Vec<f32>,
    pub n: usize,
    pub d: usize,
    pub feature_names: Vec<String>,
    /// Name of the label column, kept so that a shard can be written back out.
    pub label_name: String,
    /// Rows read on demand from image files (then `x` is empty); see [`Dataset::rows_into`].
    pub images: Option<std::sync::Arc<crate::sources::ImageRows>>,
}

/// What the label column holds; decides how labels are validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelKind {
    /// Integer class ids `0..num_classes` (binary: 2, labels 0/1).
    Classes(usize),
    /// Any finite number.
    Regression,
}

/// Which columns a study may read: the features it needs and the label, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSelection {
    pub features: Vec<String>,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    pub label: LabelKind,
    pub max_rows: usize,
    /// Class labels as the data writes them: a label cell equal to `label_names[i]` is
    /// class `i` (empty: labels are numbers).
    pub label_names: Vec<String>,
    /// Per feature slot: read as text (a categorical column, or an image's file name)
    /// instead of a number. Empty: every feature is numeric.
    pub text_features: Vec<bool>,
    /// A file without the label column is read with every label 0 (for predictions).
    pub label_optional: bool,
}

impl LoadOptions {
    pub fn new(label: LabelKind) -> Self {
        Self {
            label,
            max_rows: DEFAULT_MAX_ROWS,
            label_names: Vec::new(),
            text_features: Vec::new(),
            label_optional: false,
        }
    }

    /// Labels written as one of `names` (class `i` is `names[i]`).
    pub fn named(names: Vec<String>) -> Self {
        Self {
            label: LabelKind::Classes(names.len()),
            max_rows: DEFAULT_MAX_ROWS,
            label_names: names,
            text_features: Vec::new(),
            label_optional: false,
        }
    }

    pub fn binary() -> Self {
        Self::new(LabelKind::Classes(2))
    }

    pub fn regression() -> Self {
        Self::new(LabelKind::Regression)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot open or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line}: read failed: {source}")]
    Read { line: usize, source: std::io::Error },
    #[error("the file is empty (no header row)")]
    EmptyFile,
    #[error("the file has a header but no data rows")]
    NoRows,
    #[error("line {line}: {reason}")]
    Malformed { line: usize, reason: &'static str },
    #[error("line {line}: blank row")]
    BlankRow { line: usize },
    #[error("line {line}: {got} columns, but the header has {expected}")]
    WrongColumnCount {
        line: usize,
        expected: usize,
        got: usize,
    },
    #[error("line 1 (header): no column named {column:?}")]
    MissingColumn { column: String },
    #[error("line 1 (header): column {column:?} appears more than once")]
    DuplicateColumn { column: String },
    #[error("line {line}, column {column:?}: missing value")]
    MissingValue { line: usize, column: String },
    #[error("line {line}, column {column:?}: not a number")]
    NotNumeric { line: usize, column: String },
    #[error("line {line}, column {column:?}: NaN or infinite value")]
    NonFinite { line: usize, column: String },
    #[error("line {line}, column {column:?}: label must be an integer class id from 0 to {}", num_classes.saturating_sub(1))]
    InvalidLabel {
        line: usize,
        column: String,
        num_classes: usize,
    },
    #[error("more than {max} data rows")]
    TooManyRows { max: usize },
    #[error("column selection: {0}")]
    Selection(String),
    #[error("declared ranges: {0}")]
    Ranges(String),
    #[error("{0}")]
    Invalid(String),
}

impl Dataset {
    /// Builds a dataset from parts, checking that the sizes agree and every value is finite.
    pub fn new(
        x: Vec<f32>,
        y: Vec<f32>,
        feature_names: Vec<String>,
        label_name: String,
    ) -> Result<Self, DataError> {
        let d = feature_names.len();
        let n = y.len();
        if d == 0 {
            return Err(DataError::Invalid(
                "a dataset needs at least one feature".into(),
            ));
        }
        if n.checked_mul(d) != Some(x.len()) {
            return Err(DataError::Invalid(format!(
                "{} feature values do not make {n} rows of {d} features",
                x.len()
            )));
        }
        if x.iter().chain(&y).any(|v| !v.is_finite()) {
            return Err(DataError::Invalid(
                "dataset holds a non-finite value".into(),
            ));
        }
        Ok(Self {
            x,
            y,
            n,
            d,
            feature_names,
            label_name,
            images: None,
        })
    }

    /// Appends the rows at `indices` to `out` (image rows decoded now). Panics if an index
    /// is out of range.
    pub fn rows_into(&self, indices: &[usize], out: &mut Vec<f32>) {
        match &self.images {
            None => {
                for &i in indices {
                    out.extend_from_slice(self.row(i));
                }
            }
            Some(im) => {
                for &i in indices {
                    let at = out.len();
                    out.resize(at + self.d, 0.0);
                    im.decode_into(i, &mut out[at..]);
                }
            }
        }
    }

    /// Appends rows `start..start + len` to `out`.
    pub fn range_into(&self, start: usize, len: usize, out: &mut Vec<f32>) {
        match &self.images {
            None => out.extend_from_slice(&self.x[start * self.d..(start + len) * self.d]),
            Some(_) => {
                let idx: Vec<usize> = (start..start + len).collect();
                self.rows_into(&idx, out);
            }
        }
    }

    /// Features of row `i`. Panics if `i >= n`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }

    /// The rows at `indices`, in that order (repeats allowed).
    pub fn select_rows(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.n) {
            return Err(DataError::Invalid(format!(
                "row index {bad} out of range for {} rows",
                self.n
            )));
        }
        Ok(self.take(indices))
    }

    /// `select_rows` for indices known to be in range.
    fn take(&self, indices: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(if self.images.is_some() {
            0
        } else {
            indices.len() * self.d
        });
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            if self.images.is_none() {
                x.extend_from_slice(self.row(i));
            }
            y.push(self.y[i]);
        }
        Dataset {
            x,
            y,
            n: indices.len(),
            d: self.d,
            feature_names: self.feature_names.clone(),
            label_name: self.label_name.clone(),
            images: self.images.as_ref().map(|im| {
                std::sync::Arc::new(crate::sources::ImageRows {
                    files: indices.iter().map(|&i| im.files[i].clone()).collect(),
                    spec: im.spec.clone(),
                })
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------
// CSV loading

/// Loads the selected columns of a CSV file with a header row.
///
/// Only the named columns are parsed and kept; every other cell is stepped over (its
/// boundaries must still be found) and dropped. Fields may be quoted (`"..."`, with `""`
/// for a quote), but a quoted field may not span lines.
pub fn load_csv(
    path: impl AsRef<Path>,
    selection: &ColumnSelection,
    options: &LoadOptions,
) -> Result<Dataset, DataError> {
    load_csv_observed(path, selection, options, &mut |_, _| {})
}

/// [`load_csv`] that also shows every selected cell, once it has parsed as a finite number,
/// to `observe` as `(slot, text)`: slot `0..d` is the feature in selection order, `d` the
/// label; `text` is the cell as written (trimmed, without quotes), so that a check can see
/// what the number loses (leading zeros, digits beyond `f32`). The identifier check of
/// [`crate::identifiers`] uses it; `observe` must keep no cell content beyond what it needs.
pub fn load_csv_observed(
    path: impl AsRef<Path>,
    selection: &ColumnSelection,
    options: &LoadOptions,
    observe: &mut dyn FnMut(usize, &str),
) -> Result<Dataset, DataError> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_csv_observed(BufReader::new(file), selection, options, observe)
}

/// [`load_csv`] from any reader (tests, stdin).
pub fn read_csv<R: BufRead>(
    reader: R,
    selection: &ColumnSelection,
    options: &LoadOptions,
) -> Result<Dataset, DataError> {
    read_csv_observed(reader, selection, options, &mut |_, _| {})
}

/// [`load_csv_observed`] from any reader.
pub fn read_csv_observed<R: BufRead>(
    reader: R,
    selection: &ColumnSelection,
    options: &LoadOptions,
    observe: &mut dyn FnMut(usize, &str),
) -> Result<Dataset, DataError> {
    read_rows(reader, selection, options, None, observe).map(|l| l.data)
}

/// What a lenient load did with the rows it could not use as they were. Counts only: never
/// which rows. Stays at the site (its own log): a count of unusable records is a fact about
/// its patients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct LoadReport {
    /// Rows kept.
    pub rows: usize,
    /// Rows skipped because their label was missing or not a valid label.
    pub skipped_label: usize,
    /// Rows skipped because a feature cell was unusable and the feature has no fill.
    pub skipped_cell: usize,
    /// Rows skipped because the line itself was malformed (wrong column count, bad quotes,
    /// not UTF-8, or blank between rows).
    pub skipped_malformed: usize,
    /// Feature cells that took their column's fill value.
    pub filled: usize,
}

/// Loads the selected columns as [`load_csv_observed`] does, but never fails because of one
/// record: a feature cell that is missing, not a number or not finite takes the feature's
/// fill (`fills[slot]`) or, without one, the row is skipped; a row with an unusable label or
/// a malformed line is skipped. Only what concerns the whole file (it cannot be opened, a
/// column is missing from the header, too many rows) is an error. Skipped rows are counted in
/// the report, never named.
pub fn load_csv_lenient(
    path: impl AsRef<Path>,
    selection: &ColumnSelection,
    options: &LoadOptions,
    fills: &[Option<f32>],
    observe: &mut dyn FnMut(usize, &str),
) -> Result<Loaded, DataError> {
    let path = path.as_ref();
    if fills.len() != selection.features.len() {
        return Err(DataError::Selection(format!(
            "{} fill entries for {} features",
            fills.len(),
            selection.features.len()
        )));
    }
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_rows(
        BufReader::new(file),
        selection,
        options,
        Some(fills),
        observe,
    )
}

/// A lenient load: the rows, what was skipped or filled, and for each text feature its
/// dictionary (the row holds the index of its value there, or -1 when it was missing).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub data: Dataset,
    pub report: LoadReport,
    /// Per feature slot: the distinct values of a text feature, in first-seen order
    /// (empty for a numeric feature).
    pub dictionaries: Vec<Vec<String>>,
}

/// Most distinct values a text column may have (its indices are exact in f32); any value
/// past them is read as missing.
pub const MAX_DICTIONARY: usize = 1 << 24;

/// Keeps a text column's distinct values.
#[derive(Debug, Default)]
pub(crate) struct Dictionary {
    ids: HashMap<String, u32>,
    values: Vec<String>,
}

impl Dictionary {
    /// The value's index (as an f32), or -1 when it is missing or the dictionary is full.
    pub(crate) fn id(&mut self, text: &str) -> f32 {
        let t = text.trim().replace("\"\"", "\"");
        if MISSING_TOKENS.contains(&t.to_ascii_lowercase().as_str()) {
            return -1.0;
        }
        if let Some(&i) = self.ids.get(&t) {
            return i as f32;
        }
        if self.values.len() >= MAX_DICTIONARY {
            return -1.0;
        }
        let i = self.values.len() as u32;
        self.ids.insert(t.clone(), i);
        self.values.push(t);
        i as f32
    }

    pub(crate) fn into_values(self) -> Vec<String> {
        self.values
    }
}

/// The reader behind both loaders: strict (`fills` is `None`: the first bad row is an error
/// naming its line) or lenient (see [`load_csv_lenient`]).
fn read_rows<R: BufRead>(
    mut reader: R,
    selection: &ColumnSelection,
    options: &LoadOptions,
    fills: Option<&[Option<f32>]>,
    observe: &mut dyn FnMut(usize, &str),
) -> Result<Loaded, DataError> {
    check_selection(selection, options)?;
    let lenient = fills.is_some();
    let is_text = |slot: usize| options.text_features.get(slot).copied().unwrap_or(false);
    let mut dicts: Vec<Dictionary> = (0..selection.features.len())
        .map(|_| Dictionary::default())
        .collect();
    let mut report = LoadReport::default();
    let mut buf = Vec::new();
    let mut spans = Vec::new();

    // Header.
    if !read_line(&mut reader, &mut buf, 1)? {
        return Err(DataError::EmptyFile);
    }
    let header = line_str(&buf, 1)?;
    let header = header.strip_prefix('\u{feff}').unwrap_or(header);
    if header.trim().is_empty() {
        return Err(DataError::Malformed {
            line: 1,
            reason: "blank header row",
        });
    }
    split_fields(header, &mut spans).map_err(|reason| DataError::Malformed { line: 1, reason })?;
    let names: Vec<String> = spans
        .iter()
        .map(|s| s.text(header).trim().replace("\"\"", "\""))
        .collect();
    let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        if by_name.insert(name.as_str(), i).is_some() {
            return Err(DataError::DuplicateColumn {
                column: name.clone(),
            });
        }
    }
    let column_of = |name: &str| {
        by_name
            .get(name)
            .copied()
            .ok_or_else(|| DataError::MissingColumn {
                column: name.to_string(),
            })
    };
    // (column index in the file, slot: 0..d for features, d for the label), in file order so
    // that the leftmost bad cell of a row is the one reported.
    let d = selection.features.len();
    let mut wanted = Vec::with_capacity(d + 1);
    for (slot, name) in selection.features.iter().enumerate() {
        wanted.push((column_of(name)?, slot));
    }
    let label_column = match column_of(&selection.label) {
        Ok(c) => Some(c),
        Err(_) if options.label_optional => None,
        Err(e) => return Err(e),
    };
    if let Some(c) = label_column {
        wanted.push((c, d));
    }
    wanted.sort_unstable();
    let n_columns = names.len();

    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut row = vec![0f32; d + 1];
    let mut line = 1usize;
    let mut pending_blank = None;
    'rows: loop {
        line += 1;
        if !read_line(&mut reader, &mut buf, line)? {
            break;
        }
        let text = match line_str(&buf, line) {
            Ok(t) => t,
            Err(_) if lenient => {
                report.skipped_malformed += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if text.trim().is_empty() {
            // Blank lines at the end of a file are harmless; one between rows is not.
            pending_blank.get_or_insert(line);
            continue;
        }
        if let Some(blank) = pending_blank.take() {
            if !lenient {
                return Err(DataError::BlankRow { line: blank });
            }
        }
        let split = split_fields(text, &mut spans);
        let malformed = match split {
            Err(reason) => Some(DataError::Malformed { line, reason }),
            Ok(()) if spans.len() != n_columns => Some(DataError::WrongColumnCount {
                line,
                expected: n_columns,
                got: spans.len(),
            }),
            Ok(()) => None,
        };
        if let Some(e) = malformed {
            if lenient {
                report.skipped_malformed += 1;
                continue;
            }
            return Err(e);
        }
        if y.len() >= options.max_rows {
            return Err(DataError::TooManyRows {
                max: options.max_rows,
            });
        }
        let mut filled_here = 0usize;
        for &(col, slot) in &wanted {
            let column = || names[col].clone();
            let cell = spans[col].text(text);
            if slot < d && is_text(slot) {
                observe(slot, cell.trim());
                row[slot] = dicts[slot].id(cell);
                continue;
            }
            let parsed = if slot == d && !options.label_names.is_empty() {
                let c = cell.trim().replace("\"\"", "\"");
                match options.label_names.iter().position(|n| *n == c) {
                    Some(i) => Ok(i as f32),
                    None if c.is_empty() => Err(CellError::Missing),
                    None => Err(CellError::NotNumeric),
                }
            } else {
                parse_cell(cell)
            };
            let bad = match parsed {
                Ok(v) => {
                    observe(slot, cell.trim());
                    let label_ok = slot != d
                        || match options.label {
                            LabelKind::Classes(k) => is_class_id(v, k),
                            LabelKind::Regression => true,
                        };
                    if label_ok {
                        row[slot] = v;
                        continue;
                    }
                    match options.label {
                        LabelKind::Classes(k) => DataError::InvalidLabel {
                            line,
                            column: column(),
                            num_classes: k,
                        },
                        LabelKind::Regression => DataError::NonFinite {
                            line,
                            column: column(),
                        },
                    }
                }
                Err(CellError::Missing) => DataError::MissingValue {
                    line,
                    column: column(),
                },
                Err(CellError::NotNumeric) => DataError::NotNumeric {
                    line,
                    column: column(),
                },
                Err(CellError::NonFinite) => DataError::NonFinite {
                    line,
                    column: column(),
                },
            };
            let Some(fills) = fills else {
                return Err(bad);
            };
            if slot == d {
                report.skipped_label += 1;
                continue 'rows;
            }
            match fills[slot] {
                Some(fill) => {
                    row[slot] = fill;
                    filled_here += 1;
                }
                None => {
                    report.skipped_cell += 1;
                    continue 'rows;
                }
            }
        }
        report.filled += filled_here;
        x.extend_from_slice(&row[..d]);
        y.push(row[d]);
    }
    if y.is_empty() && !lenient {
        return Err(DataError::NoRows);
    }
    let n = y.len();
    report.rows = n;
    Ok(Loaded {
        data: Dataset {
            x,
            y,
            n,
            d,
            feature_names: selection.features.clone(),
            label_name: selection.label.clone(),
            images: None,
        },
        report,
        dictionaries: dicts.into_iter().map(Dictionary::into_values).collect(),
    })
}

fn check_selection(selection: &ColumnSelection, options: &LoadOptions) -> Result<(), DataError> {
    if selection.features.is_empty() {
        return Err(DataError::Selection("no feature columns selected".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for name in selection.features.iter().chain([&selection.label]) {
        if !seen.insert(name.as_str()) {
            return Err(DataError::Selection(format!(
                "column {name:?} is selected twice (a label may not also be a feature)"
            )));
        }
    }
    if matches!(options.label, LabelKind::Classes(k) if k < 2) {
        return Err(DataError::Selection(
            "a classification label needs at least 2 classes".into(),
        ));
    }
    Ok(())
}

pub(crate) fn is_class_id(value: f32, num_classes: usize) -> bool {
    value >= 0.0 && value.fract() == 0.0 && (value as f64) < num_classes as f64
}

/// Reads one line (without its terminator) into `buf`; false at end of input.
fn read_line<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    line: usize,
) -> Result<bool, DataError> {
    buf.clear();
    // `take` bounds the read so an endless line cannot exhaust memory.
    let limit = MAX_LINE_BYTES as u64 + 2;
    let got = std::io::Read::take(&mut *reader, limit)
        .read_until(b'\n', buf)
        .map_err(|source| DataError::Read { line, source })?;
    if got == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if got as u64 == limit {
        return Err(DataError::Malformed {
            line,
            reason: "line longer than the limit",
        });
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if buf.len() > MAX_LINE_BYTES {
        return Err(DataError::Malformed {
            line,
            reason: "line longer than the limit",
        });
    }
    Ok(true)
}

fn line_str(buf: &[u8], line: usize) -> Result<&str, DataError> {
    std::str::from_utf8(buf).map_err(|_| DataError::Malformed {
        line,
        reason: "not valid UTF-8",
    })
}

/// Byte range of one field's content within its line (quotes excluded).
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn text<'a>(&self, line: &'a str) -> &'a str {
        &line[self.start..self.end]
    }
}

/// Finds the field boundaries of one line. Fields are not copied or parsed here.
fn split_fields(line: &str, out: &mut Vec<Span>) -> Result<(), &'static str> {
    out.clear();
    let bytes = line.as_bytes();
    let mut i = 0;
    loop {
        // Leading spaces before an opening quote are allowed (`a, "b"`).
        let mut j = i;
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        if j < bytes.len() && bytes[j] == b'"' {
            let start = j + 1;
            let mut k = start;
            let end = loop {
                match bytes.get(k) {
                    None => return Err("unterminated quoted field (fields may not span lines)"),
                    Some(b'"') if bytes.get(k + 1) == Some(&b'"') => k += 2,
                    Some(b'"') => break k,
                    Some(_) => k += 1,
                }
            };
            out.push(Span { start, end });
            k = end + 1;
            while k < bytes.len() && bytes[k] == b' ' {
                k += 1;
            }
            match bytes.get(k) {
                None => return Ok(()),
                Some(b',') => i = k + 1,
                Some(_) => return Err("text after a closing quote"),
            }
        } else {
            let end = bytes[i..]
                .iter()
                .position(|&b| b == b',')
                .map_or(bytes.len(), |p| i + p);
            out.push(Span { start: i, end });
            if end == bytes.len() {
                return Ok(());
            }
            i = end + 1;
        }
    }
}

enum CellError {
    Missing,
    NotNumeric,
    NonFinite,
}

fn parse_cell(cell: &str) -> Result<f32, CellError> {
    let t = cell.trim();
    if MISSING_TOKENS.iter().any(|m| t.eq_ignore_ascii_case(m)) {
        return Err(CellError::Missing);
    }
    match t.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        // "NaN", "inf", or a number too large for f32.
        Ok(_) => Err(CellError::NonFinite),
        Err(_) => Err(CellError::NotNumeric),
    }
}

/// Writes a dataset as CSV (features, then the label), e.g. one site's shard in the demo.
/// On Unix the file is created readable by its owner only: it holds patients' records.
pub fn write_csv(data: &Dataset, path: impl AsRef<Path>) -> Result<(), DataError> {
    let path = path.as_ref();
    let io_err = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(path).map_err(io_err)?;
    let mut w = BufWriter::new(file);
    write_csv_to(data, &mut w).map_err(io_err)?;
    w.flush().map_err(io_err)
}

/// [`write_csv`] to any writer. Values use Rust's shortest round-trip formatting, so
/// reading the file back gives the same `f32`s.
pub fn write_csv_to<W: Write>(data: &Dataset, w: &mut W) -> std::io::Result<()> {
    let header: Vec<String> = data
        .feature_names
        .iter()
        .chain([&data.label_name])
        .map(|name| csv_quote(name))
        .collect();
    writeln!(w, "{}", header.join(","))?;
    for i in 0..data.n {
        for v in data.row(i) {
            write!(w, "{v},")?;
        }
        writeln!(w, "{}", data.y[i])?;
    }
    Ok(())
}

fn csv_quote(name: &str) -> String {
    if name.contains([',', '"']) || name.trim() != name {
        format!("\"{}\"", name.replace('"', "\"\""))
    } else {
        name.to_string()
    }
}

// ---------------------------------------------------------------------------------------
// Scaling from public ranges

/// A publicly declared range `[lo, hi]` for one feature or label. Values are clamped to it
/// and mapped onto [-1, 1]. In TOML: `name = [lo, hi]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "[f64; 2]", into = "[f64; 2]")]
pub struct FeatureRange {
    lo: f32,
    hi: f32,
}

impl FeatureRange {
    pub fn new(lo: f64, hi: f64) -> Result<Self, DataError> {
        let (l, h) = (lo as f32, hi as f32);
        if !(l.is_finite() && h.is_finite() && l < h && (h - l).is_finite()) {
            return Err(DataError::Ranges(format!(
                "[{lo}, {hi}] is not a finite range with lo < hi"
            )));
        }
        Ok(Self { lo: l, hi: h })
    }

    pub fn lo(&self) -> f32 {
        self.lo
    }

    pub fn hi(&self) -> f32 {
        self.hi
    }

    /// Clamps `v` to the range and maps it onto [-1, 1].
    pub fn scale(&self, v: f32) -> f32 {
        let (lo, hi) = (f64::from(self.lo), f64::from(self.hi));
        let c = f64::from(v).clamp(lo, hi);
        (2.0 * (c - lo) / (hi - lo) - 1.0) as f32
    }

    /// Inverse of [`scale`](Self::scale) for values inside [-1, 1] (e.g. a regression
    /// prediction back in the label's units).
    pub fn unscale(&self, s: f32) -> f32 {
        let (lo, hi) = (f64::from(self.lo), f64::from(self.hi));
        ((f64::from(s) + 1.0) * 0.5 * (hi - lo) + lo) as f32
    }

    /// Half the width: multiply an error measured on the scaled label (RMSE, say) by this to
    /// get it in the label's own units.
    pub fn half_width(&self) -> f64 {
        (f64::from(self.hi) - f64::from(self.lo)) / 2.0
    }
}

impl TryFrom<[f64; 2]> for FeatureRange {
    type Error = DataError;
    fn try_from([lo, hi]: [f64; 2]) -> Result<Self, DataError> {
        Self::new(lo, hi)
    }
}

impl From<FeatureRange> for [f64; 2] {
    fn from(r: FeatureRange) -> Self {
        [f64::from(r.lo), f64::from(r.hi)]
    }
}

/// Scales every feature by its declared range (one range per feature, in column order).
/// Returns how many values were clamped: a local diagnostic, to be logged at the site only
/// (it is computed from patients' records).
pub fn scale_features(data: &mut Dataset, ranges: &[FeatureRange]) -> Result<usize, DataError> {
    if ranges.len() != data.d {
        return Err(DataError::Ranges(format!(
            "{} ranges for {} features",
            ranges.len(),
            data.d
        )));
    }
    let mut clamped = 0;
    for row in data.x.chunks_exact_mut(data.d) {
        for (v, r) in row.iter_mut().zip(ranges) {
            clamped += usize::from(*v < r.lo || *v > r.hi);
            *v = r.scale(*v);
        }
    }
    Ok(clamped)
}

/// [`scale_features`] for the first `ranges.len()` values of each row (the numeric features,
/// ahead of categorical indices, which are left as they are).
pub fn scale_leading_features(
    data: &mut Dataset,
    ranges: &[FeatureRange],
) -> Result<usize, DataError> {
    if ranges.len() > data.d {
        return Err(DataError::Ranges(format!(
            "{} ranges for {} values per row",
            ranges.len(),
            data.d
        )));
    }
    let mut clamped = 0;
    if data.d == 0 {
        return Ok(0);
    }
    for row in data.x.chunks_exact_mut(data.d) {
        for (v, r) in row.iter_mut().zip(ranges) {
            clamped += usize::from(*v < r.lo || *v > r.hi);
            *v = r.scale(*v);
        }
    }
    Ok(clamped)
}

/// Scales a regression label by its declared range; returns how many labels were clamped.
pub fn scale_label(data: &mut Dataset, range: &FeatureRange) -> Result<usize, DataError> {
    let mut clamped = 0;
    for v in &mut data.y {
        clamped += usize::from(*v < range.lo || *v > range.hi);
        *v = range.scale(*v);
    }
    Ok(clamped)
}

/// Declared public ranges, as in `examples/data/*_ranges.toml`:
///
/// ```toml
/// [features]
/// age = [18.0, 90.0]
/// [label]            # optional; regression only
/// progression = [0.0, 400.0]
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredRanges {
    pub features: BTreeMap<String, FeatureRange>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label: BTreeMap<String, FeatureRange>,
}

impl DeclaredRanges {
    /// The ranges for `names`, in that order; every name must have one.
    pub fn for_features(&self, names: &[String]) -> Result<Vec<FeatureRange>, DataError> {
        names
            .iter()
            .map(|name| {
                self.features.get(name).copied().ok_or_else(|| {
                    DataError::Ranges(format!("no range declared for feature {name:?}"))
                })
            })
            .collect()
    }

    pub fn for_label(&self, name: &str) -> Result<FeatureRange, DataError> {
        self.label
            .get(name)
            .copied()
            .ok_or_else(|| DataError::Ranges(format!("no range declared for label {name:?}")))
    }
}

/// Parses declared ranges from TOML text.
pub fn parse_ranges(text: &str) -> Result<DeclaredRanges, DataError> {
    toml::from_str(text).map_err(|e| DataError::Ranges(e.to_string()))
}

/// Reads declared ranges from a TOML file.
pub fn load_ranges(path: impl AsRef<Path>) -> Result<DeclaredRanges, DataError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_ranges(&text)
}

// ---------------------------------------------------------------------------------------
// Deterministic splits

/// SplitMix64: a tiny deterministic generator for reproducible splits, shuffles and model
/// initialisation. Never for privacy noise or sampling (those use `common::dp`'s CSPRNG).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Moves the stream on by `k` values, as `k` calls of [`Self::next_u64`] would.
    pub(crate) fn skip(&mut self, k: u64) {
        self.0 = self.0.wrapping_add(k.wrapping_mul(SPLITMIX_GAMMA));
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(SPLITMIX_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`); the multiply-shift bias is below 2^-40 for any n we use.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut idx);
    idx
}

/// Random train/test split: `round(n * test_fraction)` rows (at least 1, at most n - 1) go
/// to the test set.
pub fn train_test_split(
    data: &Dataset,
    test_fraction: f64,
    seed: u64,
) -> Result<(Dataset, Dataset), DataError> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(DataError::Invalid(format!(
            "test fraction {test_fraction} is not in (0, 1)"
        )));
    }
    if data.n < 2 {
        return Err(DataError::Invalid("need at least 2 rows to split".into()));
    }
    let idx = shuffled_indices(data.n, seed);
    let n_test = ((data.n as f64 * test_fraction).round() as usize).clamp(1, data.n - 1);
    Ok((data.take(&idx[n_test..]), data.take(&idx[..n_test])))
}

/// `k` shards of (nearly) equal size with rows assigned at random.
pub fn split_iid(data: &Dataset, k: usize, seed: u64) -> Result<Vec<Dataset>, DataError> {
    if k == 0 || k > data.n {
        return Err(DataError::Invalid(format!(
            "cannot split {} rows into {k} non-empty shards",
            data.n
        )));
    }
    let idx = shuffled_indices(data.n, seed);
    let sizes: Vec<usize> = (0..k)
        .map(|i| data.n / k + usize::from(i < data.n % k))
        .collect();
    Ok(chunks(&idx, &sizes).map(|c| data.take(c)).collect())
}

/// Shards of uneven size (`proportions`, normalised) with skewed label distributions.
///
/// Each row is, with probability `label_skew`, placed by its label (such rows are ordered
/// by label and dealt to the shards in order, so the first shard gets the lowest labels),
/// and otherwise placed at random. `label_skew = 0` is an IID split with uneven sizes;
/// `1` sorts the rows by label across the shards. Rows within a shard are shuffled.
pub fn split_non_iid(
    data: &Dataset,
    proportions: &[f64],
    label_skew: f64,
    seed: u64,
) -> Result<Vec<Dataset>, DataError> {
    if proportions.is_empty() || proportions.iter().any(|&p| !(p.is_finite() && p > 0.0)) {
        return Err(DataError::Invalid(
            "proportions must be positive finite numbers".into(),
        ));
    }
    if !(0.0..=1.0).contains(&label_skew) {
        return Err(DataError::Invalid(format!(
            "label skew {label_skew} is not in [0, 1]"
        )));
    }
    let sizes = largest_remainder(data.n, proportions);
    if sizes.contains(&0) {
        return Err(DataError::Invalid(format!(
            "{} rows are too few for {} shards in these proportions",
            data.n,
            proportions.len()
        )));
    }
    // Rank of each label among the distinct labels, scaled to [0, 1).
    let mut distinct = data.y.clone();
    distinct.sort_by(f32::total_cmp);
    distinct.dedup();
    let bands = distinct.len() as f64;
    let mut rng = SplitMix64::new(seed);
    let mut keyed: Vec<(f64, usize)> = (0..data.n)
        .map(|i| {
            let u = rng.next_f64();
            let key = if rng.next_f64() < label_skew {
                let rank = distinct.partition_point(|&v| v < data.y[i]) as f64;
                (rank + u) / bands
            } else {
                u
            };
            (key, i)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let order: Vec<usize> = keyed.into_iter().map(|(_, i)| i).collect();
    Ok(chunks(&order, &sizes)
        .map(|c| {
            let mut c = c.to_vec();
            rng.shuffle(&mut c);
            data.take(&c)
        })
        .collect())
}

/// Splits `n` into parts proportional to `weights` that sum to exactly `n`.
fn largest_remainder(n: usize, weights: &[f64]) -> Vec<usize> {
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| n as f64 * w / total).collect();
    let mut sizes: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let short = n.saturating_sub(sizes.iter().sum());
    for &i in order.iter().cycle().take(short) {
        sizes[i] += 1;
    }
    sizes
}

fn chunks<'a>(idx: &'a [usize], sizes: &'a [usize]) -> impl Iterator<Item = &'a [usize]> + 'a {
    let mut start = 0;
    sizes.iter().map(move |&s| {
        let c = &idx[start..start + s];
        start += s;
        c
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sel(features: &[&str], label: &str) -> ColumnSelection {
        ColumnSelection {
            features: features.iter().map(|s| s.to_string()).collect(),
            label: label.to_string(),
        }
    }

    fn read(text: &str, features: &[&str], label: &str) -> Result<Dataset, DataError> {
        read_csv(
            text.as_bytes(),
            &sel(features, label),
            &LoadOptions::binary(),
        )
    }

    fn examples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data")
    }

    const GOOD: &str = "id,name,a,b,y\n1,Alice,1.5,2,0\n2,Bob,-3,4e1,1\n";

    #[test]
    fn selects_only_named_columns_in_selection_order() {
        let ds = read(GOOD, &["b", "a"], "y").unwrap();
        assert_eq!((ds.n, ds.d), (2, 2));
        assert_eq!(ds.x, vec![2.0, 1.5, 40.0, -3.0]);
        assert_eq!(ds.y, vec![0.0, 1.0]);
        assert_eq!(ds.feature_names, vec!["b", "a"]);
        assert_eq!(ds.label_name, "y");
    }

    #[test]
    fn unselected_cells_are_never_parsed() {
        // Column `name` is text, and `note` holds garbage, quotes and a missing value:
        // none of it matters because neither is selected.
        let text = "name,note,a,y\n\"Smith, J\",NA,1,1\nDoe,\"say \"\"hi\"\"\",2,0\nX,,3,1\n";
        let ds = read(text, &["a"], "y").unwrap();
        assert_eq!(ds.x, vec![1.0, 2.0, 3.0]);
        assert_eq!(ds.y, vec![1.0, 0.0, 1.0]);
    }

    #[test]
    fn accepts_crlf_bom_quotes_spaces_and_trailing_blank_lines() {
        let text = "\u{feff}\"a\", b ,y\r\n \"1\" , 2 ,1\r\n3,4,0\r\n\r\n\n";
        let ds = read(text, &["a", "b"], "y").unwrap();
        assert_eq!(ds.x, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(ds.n, 2);
    }

    #[test]
    fn missing_value_names_line_and_column() {
        for cell in ["", "NA", "n/a", "NULL", "?", "  "] {
            let text = format!("a,b,y\n1,2,0\n3,4,1\n5,{cell},1\n");
            match read(&text, &["a", "b"], "y") {
                Err(DataError::MissingValue { line: 4, column }) => assert_eq!(column, "b"),
                other => panic!("cell {cell:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn non_numeric_cell_names_line_and_column_but_not_the_value() {
        let err = read("a,b,y\n1,2,0\n1,John Smith,1\n", &["a", "b"], "y").unwrap_err();
        assert!(matches!(&err, DataError::NotNumeric { line: 3, column } if column == "b"));
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("\"b\""), "{msg}");
        assert!(
            !msg.contains("Smith"),
            "error message leaks the cell: {msg}"
        );
    }

    #[test]
    fn nan_and_infinity_are_rejected() {
        for cell in ["NaN", "nan", "inf", "-Infinity", "1e39"] {
            let text = format!("a,y\n1,0\n{cell},1\n");
            match read(&text, &["a"], "y") {
                Err(DataError::NonFinite { line: 3, column }) => assert_eq!(column, "a"),
                other => panic!("cell {cell:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_column_count_names_the_line() {
        let err = read("a,b,y\n1,2,0\n1,2\n", &["a"], "y").unwrap_err();
        assert!(matches!(
            err,
            DataError::WrongColumnCount {
                line: 3,
                expected: 3,
                got: 2
            }
        ));
        // Too many is as wrong as too few, even when the extra cell is in no selected column.
        let err = read("a,b,y\n1,2,0,9\n", &["a"], "y").unwrap_err();
        assert!(matches!(
            err,
            DataError::WrongColumnCount {
                line: 2,
                expected: 3,
                got: 4
            }
        ));
    }

    #[test]
    fn header_errors() {
        let err = read("a,b,y\n1,2,0\n", &["a", "c"], "y").unwrap_err();
        assert!(matches!(&err, DataError::MissingColumn { column } if column == "c"));
        let err = read("a,b,y\n1,2,0\n", &["a"], "label").unwrap_err();
        assert!(matches!(&err, DataError::MissingColumn { column } if column == "label"));
        let err = read("a,b,a,y\n1,2,3,0\n", &["b"], "y").unwrap_err();
        assert!(matches!(&err, DataError::DuplicateColumn { column } if column == "a"));
        assert!(err.to_string().contains("line 1"));
    }

    #[test]
    fn empty_file_and_header_only() {
        assert!(matches!(read("", &["a"], "y"), Err(DataError::EmptyFile)));
        assert!(matches!(read("a,y\n", &["a"], "y"), Err(DataError::NoRows)));
        assert!(matches!(
            read("a,y\n\n\n", &["a"], "y"),
            Err(DataError::NoRows)
        ));
        assert!(matches!(
            read("\na,y\n1,0\n", &["a"], "y"),
            Err(DataError::Malformed { line: 1, .. })
        ));
    }

    #[test]
    fn blank_row_between_data_rows() {
        let err = read("a,y\n1,0\n\n2,1\n", &["a"], "y").unwrap_err();
        assert!(matches!(err, DataError::BlankRow { line: 3 }));
    }

    #[test]
    fn malformed_quotes() {
        let err = read("a,y\n1,0\n\"2,1\n", &["a"], "y").unwrap_err();
        assert!(matches!(err, DataError::Malformed { line: 3, .. }));
        let err = read("a,y\n\"1\"x,0\n", &["a"], "y").unwrap_err();
        assert!(matches!(err, DataError::Malformed { line: 2, .. }));
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let bytes = b"a,y\n1,0\n\xff,1\n";
        let err = read_csv(&bytes[..], &sel(&["a"], "y"), &LoadOptions::binary()).unwrap_err();
        assert!(matches!(err, DataError::Malformed { line: 3, .. }));
    }

    #[test]
    fn labels_are_validated_by_kind() {
        for cell in ["2", "0.5", "-1"] {
            let text = format!("a,y\n1,0\n1,{cell}\n");
            assert!(
                matches!(
                    read(&text, &["a"], "y"),
                    Err(DataError::InvalidLabel {
                        line: 3,
                        num_classes: 2,
                        ..
                    })
                ),
                "{cell}"
            );
        }
        let three = LoadOptions::new(LabelKind::Classes(3));
        let ds = read_csv("a,y\n1,2\n1,0\n".as_bytes(), &sel(&["a"], "y"), &three).unwrap();
        assert_eq!(ds.y, vec![2.0, 0.0]);
        let reg = LoadOptions::regression();
        let ds = read_csv("a,y\n1,-2.5\n1,1e3\n".as_bytes(), &sel(&["a"], "y"), &reg).unwrap();
        assert_eq!(ds.y, vec![-2.5, 1000.0]);
        let err = read_csv("a,y\n1,inf\n".as_bytes(), &sel(&["a"], "y"), &reg).unwrap_err();
        assert!(matches!(err, DataError::NonFinite { line: 2, .. }));
    }

    #[test]
    fn leftmost_bad_cell_is_reported() {
        // Selection order is b then a, but a comes first in the file.
        let err = read("a,b,y\nx,y,0\n", &["b", "a"], "y").unwrap_err();
        assert!(matches!(&err, DataError::NotNumeric { line: 2, column } if column == "a"));
    }

    #[test]
    fn selection_is_checked() {
        assert!(matches!(read(GOOD, &[], "y"), Err(DataError::Selection(_))));
        assert!(matches!(
            read(GOOD, &["a", "a"], "y"),
            Err(DataError::Selection(_))
        ));
        assert!(matches!(
            read(GOOD, &["a", "y"], "y"),
            Err(DataError::Selection(_))
        ));
    }

    #[test]
    fn row_cap_and_line_cap() {
        let mut opts = LoadOptions::binary();
        opts.max_rows = 2;
        let err = read_csv("a,y\n1,0\n1,0\n1,0\n".as_bytes(), &sel(&["a"], "y"), &opts);
        assert!(matches!(err, Err(DataError::TooManyRows { max: 2 })));
        let long = format!("a,y\n{},0\n", "1".repeat(MAX_LINE_BYTES + 10));
        assert!(matches!(
            read(&long, &["a"], "y"),
            Err(DataError::Malformed { line: 2, .. })
        ));
    }

    #[test]
    fn load_csv_reports_missing_file() {
        let err = load_csv(
            "/nonexistent/x.csv",
            &sel(&["a"], "y"),
            &LoadOptions::binary(),
        );
        assert!(matches!(err, Err(DataError::Io { .. })));
    }

    #[test]
    fn bundled_data_loads_and_ranges_cover_it() {
        let dir = examples_dir();
        let ranges = load_ranges(dir.join("breast_cancer_ranges.toml")).unwrap();
        let features: Vec<String> = ranges.features.keys().cloned().collect();
        assert_eq!(features.len(), 30);
        let selection = ColumnSelection {
            features,
            label: "malignant".into(),
        };
        let mut ds = load_csv(
            dir.join("breast_cancer_wisconsin.csv"),
            &selection,
            &LoadOptions::binary(),
        )
        .unwrap();
        assert_eq!((ds.n, ds.d), (569, 30));
        assert_eq!(ds.y.iter().filter(|&&v| v == 1.0).count(), 212);
        let r = ranges.for_features(&ds.feature_names).unwrap();
        assert_eq!(
            scale_features(&mut ds, &r).unwrap(),
            0,
            "ranges must cover the data"
        );
        assert!(ds.x.iter().all(|v| (-1.0..=1.0).contains(v)));

        let ranges = load_ranges(dir.join("diabetes_ranges.toml")).unwrap();
        let selection = ColumnSelection {
            features: ranges.features.keys().cloned().collect(),
            label: "progression".into(),
        };
        let mut ds = load_csv(
            dir.join("diabetes_progression.csv"),
            &selection,
            &LoadOptions::regression(),
        )
        .unwrap();
        assert_eq!((ds.n, ds.d), (442, 10));
        let r = ranges.for_features(&ds.feature_names).unwrap();
        assert_eq!(scale_features(&mut ds, &r).unwrap(), 0);
        let lr = ranges.for_label("progression").unwrap();
        assert_eq!(scale_label(&mut ds, &lr).unwrap(), 0);
        assert!(ds.y.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn scaling_clamps_and_maps_to_unit_interval() {
        let mut ds = Dataset::new(
            vec![0.0, 10.0, 5.0, 20.0, -3.0, 12.0],
            vec![0.0, 1.0, 0.0],
            vec!["a".into(), "b".into()],
            "y".into(),
        )
        .unwrap();
        let r = [
            FeatureRange::new(0.0, 10.0).unwrap(),
            FeatureRange::new(10.0, 20.0).unwrap(),
        ];
        assert_eq!(scale_features(&mut ds, &r).unwrap(), 1);
        assert_eq!(ds.x, vec![-1.0, -1.0, 0.0, 1.0, -1.0, -0.6]);
        assert!(matches!(
            scale_features(&mut ds, &r[..1]),
            Err(DataError::Ranges(_))
        ));
        let lr = FeatureRange::new(0.0, 400.0).unwrap();
        assert!((lr.unscale(lr.scale(151.0)) - 151.0).abs() < 1e-4);
        assert!((lr.half_width() - 200.0).abs() < 1e-12);
        assert!(FeatureRange::new(1.0, 1.0).is_err());
        assert!(FeatureRange::new(f64::NAN, 1.0).is_err());
    }

    #[test]
    fn ranges_parse_and_reject_bad_input() {
        let r =
            parse_ranges("[features]\na = [0, 1]\nb = [-2.5, 3]\n[label]\ny = [0, 10]\n").unwrap();
        assert_eq!(r.features.len(), 2);
        assert_eq!(r.for_label("y").unwrap().hi(), 10.0);
        let names = vec!["b".to_string(), "a".to_string()];
        let v = r.for_features(&names).unwrap();
        assert_eq!(v[0].lo(), -2.5);
        assert!(r.for_features(&["c".to_string()]).is_err());
        assert!(parse_ranges("[features]\na = [1, 0]\n").is_err());
        assert!(parse_ranges("[features]\na = [1]\n").is_err());
        assert!(parse_ranges("[feature]\na = [0, 1]\n").is_err());
    }

    fn toy(n: usize) -> Dataset {
        let x: Vec<f32> = (0..n * 2).map(|v| v as f32).collect();
        let y: Vec<f32> = (0..n).map(|i| (i % 3 == 0) as u8 as f32).collect();
        Dataset::new(x, y, vec!["a".into(), "b".into()], "y".into()).unwrap()
    }

    /// Every row of `parts` is a distinct row of `whole` (rows are identified by feature a).
    fn assert_partition(whole: &Dataset, parts: &[&Dataset]) {
        let mut seen: Vec<f32> = parts
            .iter()
            .flat_map(|p| p.x.iter().step_by(2).copied())
            .collect();
        seen.sort_by(f32::total_cmp);
        let mut all: Vec<f32> = whole.x.iter().step_by(2).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(seen, all);
        for p in parts {
            for i in 0..p.n {
                let orig = (p.row(i)[0] / 2.0) as usize;
                assert_eq!(p.y[i], whole.y[orig], "label travels with its row");
            }
        }
    }

    #[test]
    fn train_test_split_is_deterministic_partition() {
        let ds = toy(100);
        let (tr, te) = train_test_split(&ds, 0.2, 7).unwrap();
        assert_eq!((tr.n, te.n), (80, 20));
        assert_partition(&ds, &[&tr, &te]);
        assert_eq!(
            train_test_split(&ds, 0.2, 7).unwrap(),
            (tr.clone(), te.clone())
        );
        assert_ne!(train_test_split(&ds, 0.2, 8).unwrap().1, te);
        assert!(train_test_split(&ds, 1.0, 7).is_err());
        assert!(train_test_split(&toy(1), 0.5, 7).is_err());
    }

    #[test]
    fn split_iid_sizes() {
        let ds = toy(10);
        let parts = split_iid(&ds, 3, 1).unwrap();
        let sizes: Vec<usize> = parts.iter().map(|p| p.n).collect();
        assert_eq!(sizes, vec![4, 3, 3]);
        assert_partition(&ds, &parts.iter().collect::<Vec<_>>());
        assert!(split_iid(&ds, 0, 1).is_err());
        assert!(split_iid(&ds, 11, 1).is_err());
    }

    #[test]
    fn split_non_iid_skews_labels_and_sizes() {
        let ds = toy(300); // 100 positives
        let parts = split_non_iid(&ds, &[0.5, 0.3, 0.2], 0.8, 3).unwrap();
        let sizes: Vec<usize> = parts.iter().map(|p| p.n).collect();
        assert_eq!(sizes, vec![150, 90, 60]);
        assert_partition(&ds, &parts.iter().collect::<Vec<_>>());
        let pos = |p: &Dataset| p.y.iter().sum::<f32>() as f64 / p.n as f64;
        assert!(pos(&parts[0]) < 0.2, "{}", pos(&parts[0]));
        assert!(pos(&parts[2]) > 0.7, "{}", pos(&parts[2]));
        // Rows within a shard are not left sorted by label.
        assert!(parts[1].y.windows(2).any(|w| w[0] > w[1]));
        // No skew: roughly the global rate everywhere.
        let parts = split_non_iid(&ds, &[0.5, 0.3, 0.2], 0.0, 3).unwrap();
        assert!(parts.iter().all(|p| (pos(p) - 1.0 / 3.0).abs() < 0.2));
        assert!(split_non_iid(&ds, &[1.0, -1.0], 0.5, 3).is_err());
        assert!(split_non_iid(&ds, &[1.0], 1.5, 3).is_err());
        assert!(split_non_iid(&toy(2), &[1.0, 1.0, 1.0], 0.5, 3).is_err());
    }

    #[test]
    fn write_csv_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.csv");
        let mut ds = toy(5);
        ds.x[1] = 0.1;
        ds.x[2] = -1.0e-7;
        ds.feature_names[1] = "odd, \"name\"".into();
        write_csv(&ds, &path).unwrap();
        let selection = ColumnSelection {
            features: ds.feature_names.clone(),
            label: "y".into(),
        };
        let back = load_csv(&path, &selection, &LoadOptions::binary()).unwrap();
        assert_eq!(back, ds);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "shard readable by others");
        }
    }
}
