//! Data where hospitals keep it, besides CSV (`crate::data`): Parquet files (only the
//! study's columns are read), NumPy `.npy` arrays (features and labels in two files), and
//! folders of PNG/JPEG images named by a manifest CSV (read lazily: a site's memory does not
//! grow with its number of images).
//!
//! Every loader is lenient in the same way as the CSV one: a record whose label is unusable
//! is skipped, a feature value that is missing, not a number or not finite takes the
//! study's public fill or skips the record, and only what concerns the whole file is an
//! error. What was skipped is counted, never named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedpriv_common::config::ImageSpec;

use crate::data::{
    ColumnSelection, DataError, Dataset, Dictionary, LabelKind, LoadOptions, LoadReport, Loaded,
};

fn invalid(path: &Path, what: impl std::fmt::Display) -> DataError {
    DataError::Invalid(format!("{}: {what}", path.display()))
}

/// One cell as a loader read it.
enum Cell<'a> {
    Num(f64),
    Text(&'a str),
    Missing,
}

/// The lenient row logic shared by the non-CSV loaders.
struct Rows<'a> {
    options: &'a LoadOptions,
    fills: &'a [Option<f32>],
    d: usize,
    x: Vec<f32>,
    y: Vec<f32>,
    report: LoadReport,
    dicts: Vec<Dictionary>,
}

impl<'a> Rows<'a> {
    fn new(options: &'a LoadOptions, fills: &'a [Option<f32>], d: usize) -> Self {
        Self {
            options,
            fills,
            d,
            x: Vec::new(),
            y: Vec::new(),
            report: LoadReport::default(),
            dicts: (0..d).map(|_| Dictionary::default()).collect(),
        }
    }

    /// Adds one record: `cells[slot]` for the features, then the label.
    fn push(&mut self, cells: &[Cell<'_>]) -> Result<(), DataError> {
        if self.y.len() >= self.options.max_rows {
            return Err(DataError::TooManyRows {
                max: self.options.max_rows,
            });
        }
        let label = match (&cells[self.d], self.options.label) {
            (Cell::Text(t), _) if !self.options.label_names.is_empty() => self
                .options
                .label_names
                .iter()
                .position(|n| n == t.trim())
                .map(|i| i as f32),
            (Cell::Num(v), LabelKind::Classes(k)) if self.options.label_names.is_empty() => {
                let v = *v as f32;
                crate::data::is_class_id(v, k).then_some(v)
            }
            (Cell::Num(v), LabelKind::Regression) => {
                let v = *v as f32;
                v.is_finite().then_some(v)
            }
            _ => None,
        };
        let Some(label) = label else {
            self.report.skipped_label += 1;
            return Ok(());
        };
        let mut row = Vec::with_capacity(self.d);
        let mut filled = 0;
        for (slot, cell) in cells[..self.d].iter().enumerate() {
            if self
                .options
                .text_features
                .get(slot)
                .copied()
                .unwrap_or(false)
            {
                row.push(match cell {
                    Cell::Text(t) => self.dicts[slot].id(t),
                    Cell::Num(v) => self.dicts[slot].id(&v.to_string()),
                    Cell::Missing => -1.0,
                });
                continue;
            }
            let value = match cell {
                Cell::Num(v) if (*v as f32).is_finite() => Some(*v as f32),
                Cell::Text(t) => t.trim().parse::<f32>().ok().filter(|v| v.is_finite()),
                _ => None,
            };
            match (value, self.fills.get(slot).copied().flatten()) {
                (Some(v), _) => row.push(v),
                (None, Some(fill)) => {
                    row.push(fill);
                    filled += 1;
                }
                (None, None) => {
                    self.report.skipped_cell += 1;
                    return Ok(());
                }
            }
        }
        self.report.filled += filled;
        self.x.extend(row);
        self.y.push(label);
        Ok(())
    }

    fn finish(self, selection: &ColumnSelection) -> Loaded {
        let n = self.y.len();
        let mut report = self.report;
        report.rows = n;
        Loaded {
            data: Dataset {
                x: self.x,
                y: self.y,
                n,
                d: self.d,
                feature_names: selection.features.clone(),
                label_name: selection.label.clone(),
                images: None,
            },
            report,
            dictionaries: self
                .dicts
                .into_iter()
                .map(Dictionary::into_values)
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parquet

/// Loads the selected columns of a Parquet file (only those columns are decoded).
pub fn load_parquet(
    path: &Path,
    selection: &ColumnSelection,
    options: &LoadOptions,
    fills: &[Option<f32>],
) -> Result<Loaded, DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use parquet::schema::types::Type;
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| invalid(path, e))?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .clone();
    let fields = root.get_fields();
    let wanted: Vec<&String> = selection
        .features
        .iter()
        .chain([&selection.label])
        .collect();
    let mut projected = Vec::with_capacity(wanted.len());
    for name in &wanted {
        let f = fields
            .iter()
            .find(|f| f.name() == name.as_str())
            .ok_or_else(|| DataError::MissingColumn {
                column: (*name).clone(),
            })?;
        projected.push(Arc::clone(f));
    }
    let projection = Type::group_type_builder(root.name())
        .with_fields(projected)
        .build()
        .map_err(|e| invalid(path, e))?;
    let d = selection.features.len();
    let mut rows = Rows::new(options, fills, d);
    let iter = reader
        .get_row_iter(Some(projection))
        .map_err(|e| invalid(path, e))?;
    let slot_of: BTreeMap<&str, usize> = wanted
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    for row in iter {
        let Ok(row) = row else {
            // A record the decoder could not read is one record's problem.
            rows.report.skipped_malformed += 1;
            continue;
        };
        let mut cells: Vec<Cell<'_>> = (0..=d).map(|_| Cell::Missing).collect();
        let mut texts: Vec<(usize, String)> = Vec::new();
        for (name, field) in row.get_column_iter() {
            let Some(&slot) = slot_of.get(name.as_str()) else {
                continue;
            };
            cells[slot] = match field {
                Field::Null => Cell::Missing,
                Field::Bool(b) => Cell::Num(f64::from(u8::from(*b))),
                Field::Byte(v) => Cell::Num(f64::from(*v)),
                Field::Short(v) => Cell::Num(f64::from(*v)),
                Field::Int(v) => Cell::Num(f64::from(*v)),
                Field::Long(v) => Cell::Num(*v as f64),
                Field::UByte(v) => Cell::Num(f64::from(*v)),
                Field::UShort(v) => Cell::Num(f64::from(*v)),
                Field::UInt(v) => Cell::Num(f64::from(*v)),
                Field::ULong(v) => Cell::Num(*v as f64),
                Field::Float16(v) => Cell::Num(f64::from(*v)),
                Field::Float(v) => Cell::Num(f64::from(*v)),
                Field::Double(v) => Cell::Num(*v),
                Field::Str(s) => {
                    texts.push((slot, s.clone()));
                    Cell::Missing
                }
                // Dates, times, decimals, binaries and nested values are not features.
                _ => Cell::Missing,
            };
        }
        let cells: Vec<Cell<'_>> = cells
            .into_iter()
            .enumerate()
            .map(|(slot, c)| match texts.iter().find(|(s, _)| *s == slot) {
                Some((_, t)) => Cell::Text(t.as_str()),
                None => c,
            })
            .collect();
        rows.push(&cells)?;
    }
    Ok(rows.finish(selection))
}

// ---------------------------------------------------------------------------------------
// NumPy

/// A parsed `.npy` file: its shape and values as f64, row-major.
struct Npy {
    shape: Vec<usize>,
    values: Vec<f64>,
}

/// Largest `.npy` file read (bytes): a wrong path must not fill memory.
const MAX_NPY_BYTES: u64 = 8 << 30;

fn read_npy(path: &Path) -> Result<Npy, DataError> {
    let len = std::fs::metadata(path)
        .map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if len > MAX_NPY_BYTES {
        return Err(invalid(path, format!("larger than {MAX_NPY_BYTES} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(invalid(path, "not a .npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(invalid(path, format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| invalid(path, "truncated header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))?;
        let rest = header[at + key.len() + 2..]
            .trim_start()
            .strip_prefix(':')?;
        Some(rest.trim_start())
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| invalid(path, "no dtype in the header"))?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(invalid(path, "Fortran-ordered arrays are not supported"));
    }
    let shape: Vec<usize> = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .map(|r| {
            r.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
        })
        .and_then(Result::ok)
        .ok_or_else(|| invalid(path, "no shape in the header"))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| invalid(path, "shape overflows"))?;
    let data = &bytes[start + header_len..];
    let (size, read): (usize, fn(&[u8]) -> f64) = match descr {
        "<f4" => (4, |b| {
            f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        "<f8" => (8, |b| {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        }),
        "<i4" => (4, |b| {
            f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        "<i8" => (8, |b| {
            i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64
        }),
        "|u1" | "<u1" => (1, |b| f64::from(b[0])),
        "|i1" | "<i1" => (1, |b| f64::from(b[0] as i8)),
        "<u2" => (2, |b| f64::from(u16::from_le_bytes([b[0], b[1]]))),
        "<i2" => (2, |b| f64::from(i16::from_le_bytes([b[0], b[1]]))),
        "|b1" => (1, |b| f64::from(u8::from(b[0] != 0))),
        other => return Err(invalid(path, format!("unsupported dtype {other}"))),
    };
    if data.len() < count * size {
        return Err(invalid(path, "fewer values than its shape says"));
    }
    let values = data[..count * size].chunks_exact(size).map(read).collect();
    Ok(Npy { shape, values })
}

/// Loads features from `features_path` (`[n, k]`, or `[n, ...]` flattened per record) whose
/// columns are `columns` (their names, in order), and labels from `labels_path` (`[n]`).
/// Only the selected columns are kept.
pub fn load_npy(
    features_path: &Path,
    labels_path: &Path,
    columns: &[String],
    selection: &ColumnSelection,
    options: &LoadOptions,
    fills: &[Option<f32>],
) -> Result<Loaded, DataError> {
    let x = read_npy(features_path)?;
    let y = read_npy(labels_path)?;
    let n = *x.shape.first().unwrap_or(&0);
    let k: usize = x.shape.iter().skip(1).product();
    if y.shape.first() != Some(&n) || y.values.len() != n {
        return Err(invalid(
            labels_path,
            format!("{} labels for {n} records", y.values.len()),
        ));
    }
    if columns.len() != k {
        return Err(invalid(
            features_path,
            format!(
                "{k} values per record, the config names {} columns",
                columns.len()
            ),
        ));
    }
    let slots: Vec<usize> = selection
        .features
        .iter()
        .map(|f| {
            columns
                .iter()
                .position(|c| c == f)
                .ok_or_else(|| DataError::MissingColumn { column: f.clone() })
        })
        .collect::<Result<_, _>>()?;
    let d = selection.features.len();
    let mut rows = Rows::new(options, fills, d);
    for i in 0..n {
        let mut cells: Vec<Cell<'_>> = slots
            .iter()
            .map(|&c| Cell::Num(x.values[i * k + c]))
            .collect();
        cells.push(Cell::Num(y.values[i]));
        rows.push(&cells)?;
    }
    Ok(rows.finish(selection))
}

// ---------------------------------------------------------------------------------------
// Images

/// Images read when they are used: one file per record, decoded, converted, resized and
/// normalised as the study declares.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRows {
    pub files: Vec<PathBuf>,
    pub spec: ImageSpec,
}

impl ImageRows {
    /// Values per image.
    pub fn len(&self) -> usize {
        self.spec.channels * self.spec.height * self.spec.width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes image `i` into `out` (`[C, H, W]`, normalised). An image that cannot be read
    /// now (changed since the site started) is all zeros: what one record's file holds can
    /// change only that record's contribution, never make the step fail.
    pub fn decode_into(&self, i: usize, out: &mut [f32]) -> bool {
        match self.decode(i) {
            Some(v) if v.len() == out.len() => {
                out.copy_from_slice(&v);
                true
            }
            _ => {
                out.iter_mut().for_each(|v| *v = 0.0);
                false
            }
        }
    }

    fn decode(&self, i: usize) -> Option<Vec<f32>> {
        let s = &self.spec;
        let img = image::ImageReader::open(self.files.get(i)?)
            .ok()?
            .with_guessed_format()
            .ok()?
            .decode()
            .ok()?;
        let (w, h) = (s.width as u32, s.height as u32);
        let plane = s.height * s.width;
        let mut out = vec![0f32; self.len()];
        let scaled = |v: u8, c: usize| (f32::from(v) / 255.0 - s.mean[c]) / s.std[c];
        if s.channels == 1 {
            let g = img.to_luma8();
            let g = if g.dimensions() == (w, h) {
                g
            } else {
                image::imageops::resize(&g, w, h, image::imageops::FilterType::Triangle)
            };
            for (o, p) in out.iter_mut().zip(g.pixels()) {
                *o = scaled(p.0[0], 0);
            }
        } else {
            let rgb = img.to_rgb8();
            let rgb = if rgb.dimensions() == (w, h) {
                rgb
            } else {
                image::imageops::resize(&rgb, w, h, image::imageops::FilterType::Triangle)
            };
            for (j, p) in rgb.pixels().enumerate() {
                for c in 0..3 {
                    out[c * plane + j] = scaled(p.0[c], c);
                }
            }
        }
        Some(out)
    }
}

/// Whether `path` looks like an image the decoder can read (its header only).
pub fn readable_image(path: &Path) -> bool {
    image::ImageReader::open(path)
        .ok()
        .and_then(|r| r.with_guessed_format().ok())
        .and_then(|r| r.into_dimensions().ok())
        .is_some_and(|(w, h)| w > 0 && h > 0 && u64::from(w) * u64::from(h) <= 1 << 26)
}
