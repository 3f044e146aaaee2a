//! Model checkpoints on disk: where each model version lives, how it is written (sealed with
//! the at-rest key, streamed, atomically) and read back (authenticated segment by segment,
//! checked against the digest the ledger recorded). Used by the studies' owner, `main.rs`
//! (`model export`), `retention.rs` and the admin channel's export.
//!
//! What it does not do: decide which version to write or read (the owner and the store do),
//! or hold a model in memory (values are streamed from and to the caller's buffers).

use std::path::{Path, PathBuf};

use fedpriv_common::digest::hex;
use fedpriv_common::model::ModelSpec;
use fedpriv_common::seal::{SealError, SealKey, SealReader, SealWriter};

/// Why a checkpoint could not be read. Every variant but [`CheckpointError::Internal`] is the
/// operator's to resolve (the message says how); nothing unauthenticated was used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Sealed under another at-rest key.
    #[error(
        "{what} was sealed with another at-rest key (key id {file_key_id}; the key given has \
         id {our_key_id}): start with the key this state directory was written with \
         (--at-rest-key-file or {})",
        crate::at_rest::KEY_ENV
    )]
    WrongKey {
        what: String,
        file_key_id: String,
        our_key_id: String,
    },
    /// Not a sealed checkpoint at all.
    #[error(
        "{what} is not an encrypted checkpoint (plaintext, another format, or damaged at the \
         start); nothing of it was used: restore it from backup"
    )]
    NotSealed { what: String },
    /// Altered, truncated, or moved from another study's or round's slot.
    #[error(
        "{what} does not authenticate under the at-rest key: it was altered, truncated or \
         moved from another study or round; nothing unauthenticated was used: restore it \
         from backup"
    )]
    NotAuthentic { what: String },
    /// Authenticates, but is not the file the ledger recorded (an older or newer copy).
    #[error(
        "{what} authenticates but is not the file the ledger recorded (SHA-256 differs): an \
         older or newer copy of that round; restore it from backup"
    )]
    DigestMismatch {
        what: String,
        expected: String,
        found: String,
    },
    /// Writing the decrypted bytes to the caller's sink failed, or the sealing layer failed
    /// in a way no file explains. Ours.
    #[error("{what}: {message}")]
    Internal { what: String, message: String },
}

impl CheckpointError {
    /// Whether the operator can resolve it (a file, a key, a backup), rather than a bug of
    /// ours.
    pub fn is_operators(&self) -> bool {
        !matches!(self, Self::Internal { .. })
    }
}

/// Path of a model version's file.
pub fn model_path(state_dir: &Path, study: &str, round: u64) -> PathBuf {
    state_dir
        .join("models")
        .join(study)
        .join(format!("round-{round:05}.safetensors"))
}

/// Where round `round`'s server-optimiser state (FedAdam's moments) is kept, beside its
/// checkpoint. Only the latest completed round's is needed to resume.
pub fn optimizer_path(state_dir: &Path, study: &str, round: u64) -> PathBuf {
    state_dir
        .join("models")
        .join(study)
        .join(format!("round-{round:05}.optimizer"))
}

fn optimizer_purpose(study: &str, round: u64) -> Vec<u8> {
    format!("fedpriv optimizer state\0study={study}\0round={round}").into_bytes()
}

/// Writes an optimiser state sealed like a checkpoint (bound to its study and round, so a
/// file of another round or study does not authenticate), atomically.
pub fn write_optimizer_state(
    key: &SealKey,
    state: &[f32],
    study: &str,
    round: u64,
    path: &Path,
) -> std::io::Result<()> {
    use std::io::Write;
    write_atomic(path, |f| {
        let mut sealed = SealWriter::new(key, &mut *f, &optimizer_purpose(study, round))
            .map_err(std::io::Error::other)?;
        for chunk in state.chunks(1 << 18) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            sealed.write_all(&bytes)?;
        }
        sealed.finish().map_err(std::io::Error::other)?;
        Ok(())
    })
}

/// Removes the optimiser states of rounds before `round` (only the latest completed round's
/// is needed), best effort: one left behind costs only disk.
pub fn remove_older_optimizer_states(state_dir: &Path, study: &str, round: u64) {
    let Ok(dir) = std::fs::read_dir(state_dir.join("models").join(study)) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(r) = name
            .to_str()
            .and_then(|n| n.strip_prefix("round-"))
            .and_then(|n| n.strip_suffix(".optimizer"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if r < round {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(study, round = r, error = %e, "could not remove an old optimiser state");
            }
        }
    }
}

/// Reads an optimiser state written by [`write_optimizer_state`], authenticated in full.
pub fn read_optimizer_state(
    key: &SealKey,
    path: &Path,
    study: &str,
    round: u64,
) -> Result<Vec<f32>, CheckpointError> {
    use std::io::Read;
    let what = format!(
        "optimiser state {} (round {round} of study {study})",
        path.display()
    );
    let file = std::fs::File::open(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut plain = Vec::new();
    SealReader::new(key, file, &optimizer_purpose(study, round))
        .and_then(|mut r| {
            r.read_to_end(&mut plain)
                .map_err(|e| SealError::Io {
                    kind: e.kind(),
                    message: e.to_string(),
                })
                .map(|_| ())
        })
        .map_err(|_| CheckpointError::NotAuthentic { what: what.clone() })?;
    if plain.len() % 4 != 0 {
        return Err(CheckpointError::NotAuthentic { what });
    }
    Ok(plain
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Writes a file so that it is either all there or not there: temporary file (filled by
/// `fill`), fsync, rename, fsync of the directory.
pub(crate) fn write_atomic<T>(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let out = {
        let mut f = std::fs::File::create(&tmp)?;
        let out = fill(&mut f)?;
        f.sync_all()?;
        out
    };
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(out)
}

/// Streams `values` as a safetensors file (f32, little-endian) into `out` without building
/// the file in memory: the header, then the values straight from the model's memory in
/// 1 MiB pieces. Tensors are stored in the spec's (flat-vector) order, so the data is one
/// contiguous run; the order is also kept in the metadata, as
/// [`fedpriv_common::model::FlatModel::to_safetensors_bytes`] does, and the file reads back
/// with [`fedpriv_common::model::FlatModel::from_safetensors_bytes`] (or any safetensors
/// reader).
pub fn write_safetensors(
    spec: &ModelSpec,
    values: &[f32],
    meta: &std::collections::BTreeMap<String, String>,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let n = spec.validate().map_err(|e| invalid(e.to_string()))? as usize;
    if values.len() != n {
        return Err(invalid(format!(
            "model spec says {n} values, got {}",
            values.len()
        )));
    }
    let order: Vec<&str> = spec.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut header = serde_json::Map::new();
    // `meta` (the model card) first; the tensor order key always wins.
    let mut metadata: serde_json::Map<String, serde_json::Value> = meta
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    metadata.insert(
        fedpriv_common::model::SAFETENSORS_ORDER_KEY.into(),
        serde_json::Value::String(serde_json::to_string(&order)?),
    );
    header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
    for (name, shape, off, len) in spec.layout() {
        header.insert(
            name.to_owned(),
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [off * 4, (off + len) * 4],
            }),
        );
    }
    let mut header = serde_json::to_vec(&header)?;
    // Pad with spaces so the data starts 8-byte aligned, as safetensors' own writer does.
    while (header.len() + 8) % 8 != 0 {
        header.push(b' ');
    }
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let body = fedpriv_common::wire::f32_body_bytes(values);
    for piece in body.chunks(1 << 20) {
        out.write_all(piece)?;
    }
    Ok(())
}

/// What a checkpoint is sealed for: a file moved into another study's or round's slot
/// does not open there.
fn checkpoint_purpose(study: &str, round: u64) -> Vec<u8> {
    format!("fedpriv checkpoint\0study={study}\0round={round}").into_bytes()
}

/// SHA-256 of the bytes written through it.
pub(crate) struct HashingWriter<W> {
    pub(crate) inner: W,
    pub(crate) hash: ring::digest::Context,
}

impl<W> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    /// The inner writer and the lowercase hex SHA-256 of what went through.
    pub(crate) fn finish(self) -> (W, String) {
        (self.inner, hex(self.hash.finish().as_ref()))
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// SHA-256 of the bytes read through it.
struct HashingReader<R> {
    inner: R,
    hash: ring::digest::Context,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that passes a safetensors file through, adding `extra` to its header's
/// metadata on the way (an export adds what is known only at export time, such as the
/// privacy audit the release gate checked). The tensors' offsets are relative to the end
/// of the header, so only the header changes; it is padded with spaces to keep the data
/// 8-byte aligned. With nothing to add, the bytes pass through unchanged.
#[derive(Debug)]
pub struct MetadataAdder<W: std::io::Write> {
    inner: W,
    extra: std::collections::BTreeMap<String, String>,
    /// The file's first bytes, held until the whole header has arrived.
    head: Vec<u8>,
    done: bool,
}

/// The largest header an export rewrites (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

impl<W: std::io::Write> MetadataAdder<W> {
    pub fn new(inner: W, extra: std::collections::BTreeMap<String, String>) -> Self {
        let done = extra.is_empty();
        MetadataAdder {
            inner,
            extra,
            head: Vec::new(),
            done,
        }
    }

    /// The inner writer, once the whole header has gone through.
    pub fn finish(self) -> std::io::Result<W> {
        if !self.done {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the model file ended inside its header",
            ));
        }
        Ok(self.inner)
    }

    fn try_rewrite(&mut self) -> std::io::Result<()> {
        let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        if self.head.len() < 8 {
            return Ok(());
        }
        let n = u64::from_le_bytes(self.head[..8].try_into().map_err(|_| invalid("header"))?);
        if n > MAX_HEADER {
            return Err(invalid("safetensors header too large"));
        }
        let end = 8 + n as usize;
        if self.head.len() < end {
            return Ok(());
        }
        let mut header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&self.head[8..end])
                .map_err(|_| invalid("header is not JSON"))?;
        let meta = header
            .entry("__metadata__")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        let serde_json::Value::Object(meta) = meta else {
            return Err(invalid("__metadata__ is not an object"));
        };
        for (k, v) in &self.extra {
            meta.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        let mut text = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        while (8 + text.len()) % 8 != 0 {
            text.push(b' ');
        }
        self.inner.write_all(&(text.len() as u64).to_le_bytes())?;
        self.inner.write_all(&text)?;
        self.inner.write_all(&self.head[end..])?;
        self.head = Vec::new();
        self.done = true;
        Ok(())
    }
}

impl<W: std::io::Write> std::io::Write for MetadataAdder<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.done {
            return self.inner.write(buf);
        }
        self.head.extend_from_slice(buf);
        self.try_rewrite()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes round `round`'s model as a sealed (streamed AES-256-GCM) safetensors file at
/// `path`, atomically, and returns the SHA-256 of the sealed file (what the store records).
/// Memory: one 1 MiB segment; the model is read from its own memory, never copied whole.
pub fn write_checkpoint(
    key: &SealKey,
    spec: &ModelSpec,
    values: &[f32],
    meta: &std::collections::BTreeMap<String, String>,
    study: &str,
    round: u64,
    path: &Path,
) -> std::io::Result<String> {
    write_atomic(path, |f| {
        let mut sealed = SealWriter::new(
            key,
            HashingWriter::new(f),
            &checkpoint_purpose(study, round),
        )
        .map_err(std::io::Error::other)?;
        write_safetensors(spec, values, meta, &mut sealed)?;
        let hashing = sealed.finish().map_err(std::io::Error::other)?;
        Ok(hashing.finish().1)
    })
}

/// Decrypts round `round`'s checkpoint at `path` into `out`, segment by segment, each
/// authenticated before it is written; with `expected_sha`, the sealed file must also have
/// that SHA-256 (checked once the whole file was read: on a mismatch, whatever reached
/// `out` must be discarded, as on any error). Errors name the file and the way out.
pub fn read_checkpoint(
    key: &SealKey,
    path: &Path,
    study: &str,
    round: u64,
    expected_sha: Option<&str>,
    out: &mut impl std::io::Write,
) -> Result<(), CheckpointError> {
    let what = format!(
        "model file {} (round {round} of study {study})",
        path.display()
    );
    let sealed_err = |e: SealError| match e {
        SealError::Io { kind, message } => CheckpointError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(kind, message),
        },
        SealError::WrongKey {
            file_key_id,
            our_key_id,
        } => CheckpointError::WrongKey {
            what: what.clone(),
            file_key_id,
            our_key_id,
        },
        SealError::NotSealed => CheckpointError::NotSealed { what: what.clone() },
        SealError::Truncated { .. } | SealError::Authentication => {
            CheckpointError::NotAuthentic { what: what.clone() }
        }
        other => CheckpointError::Internal {
            what: what.clone(),
            message: other.to_string(),
        },
    };
    let file = std::fs::File::open(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let hashing = HashingReader {
        inner: std::io::BufReader::with_capacity(1 << 16, file),
        hash: ring::digest::Context::new(&ring::digest::SHA256),
    };
    let mut reader =
        SealReader::new(key, hashing, &checkpoint_purpose(study, round)).map_err(sealed_err)?;
    while let Some(plain) = reader.next_segment().map_err(sealed_err)? {
        out.write_all(plain)
            .map_err(|e| CheckpointError::Internal {
                what: what.clone(),
                message: format!("writing the decrypted model: {e}"),
            })?;
    }
    let digest = hex(reader.into_inner().hash.finish().as_ref());
    match expected_sha {
        Some(sha) if sha != digest => Err(CheckpointError::DigestMismatch {
            what,
            expected: sha.to_string(),
            found: digest,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod metadata_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedpriv_common::model::{FlatModel, TensorSpec};
    use std::io::Write;

    #[test]
    fn added_metadata_keeps_the_tensors_and_their_alignment() {
        let spec = ModelSpec::new(vec![
            TensorSpec::new("w", &[5, 1]),
            TensorSpec::new("b", &[1]),
        ])
        .unwrap();
        let values: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
        let mut plain = Vec::new();
        write_safetensors(&spec, &values, &Default::default(), &mut plain).unwrap();
        let extra = std::collections::BTreeMap::from([("k".to_string(), "v \"q\"".to_string())]);
        // Fed in small pieces, as a stream arrives.
        let mut w = MetadataAdder::new(Vec::new(), extra);
        for piece in plain.chunks(7) {
            w.write_all(piece).unwrap();
        }
        let out = w.finish().unwrap();
        let n = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0);
        let header: serde_json::Value = serde_json::from_slice(&out[8..8 + n]).unwrap();
        assert_eq!(header["__metadata__"]["k"], "v \"q\"");
        let back = FlatModel::from_safetensors_bytes(&out, Some(&spec)).unwrap();
        assert_eq!(back.values, values);
        // Nothing to add: the bytes pass through as they are; a cut header is an error.
        let mut w = MetadataAdder::new(Vec::new(), Default::default());
        w.write_all(&plain).unwrap();
        assert_eq!(w.finish().unwrap(), plain);
        let mut w = MetadataAdder::new(
            Vec::new(),
            std::collections::BTreeMap::from([("k".into(), "v".into())]),
        );
        w.write_all(&plain[..12]).unwrap();
        assert!(w.finish().is_err());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedpriv_common::digest::sha256_hex;
    use fedpriv_common::model::{FlatModel, TensorSpec};

    fn test_key(byte: u8) -> SealKey {
        SealKey::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn streamed_checkpoints_read_back_with_their_digest() {
        let spec = ModelSpec::new(vec![
            TensorSpec::new("z.weight", &[3, 5]),
            TensorSpec::new("a.bias", &[5]),
            TensorSpec::new("m", &[1]),
        ])
        .unwrap();
        let values: Vec<f32> = (0..21).map(|i| i as f32 * 0.25 - 2.0).collect();
        let mut file = Vec::new();
        write_safetensors(&spec, &values, &Default::default(), &mut file).unwrap();
        let back = FlatModel::from_safetensors_bytes(&file, Some(&spec)).unwrap();
        assert_eq!(back.values, values);
        // Without the spec, the stored order gives back the flat vector as it was.
        let back = FlatModel::from_safetensors_bytes(&file, None).unwrap();
        assert_eq!((back.spec, back.values), (spec.clone(), values.clone()));
        // The data starts 8-byte aligned, as safetensors' own writer leaves it.
        let header = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header) % 8, 0);
        assert_eq!(file.len(), 8 + header + 21 * 4);
        assert!(
            write_safetensors(&spec, &values[1..], &Default::default(), &mut Vec::new()).is_err()
        );
    }

    #[test]
    fn sealed_checkpoints_hide_the_model_and_open_only_in_their_slot() {
        // Over two 1 MiB segments.
        let spec = ModelSpec::new(vec![
            TensorSpec::new("w", &[300, 1000]),
            TensorSpec::new("b", &[7]),
        ])
        .unwrap();
        let values: Vec<f32> = (0..300_007)
            .map(|i| (i % 977) as f32 * 0.125 + 1.5)
            .collect();
        let mut plain = Vec::new();
        write_safetensors(&spec, &values, &Default::default(), &mut plain).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = model_path(dir.path(), "s1", 3);
        let key = test_key(1);
        let digest =
            write_checkpoint(&key, &spec, &values, &Default::default(), "s1", 3, &path).unwrap();
        let sealed = std::fs::read(&path).unwrap();
        assert_eq!(
            digest,
            sha256_hex(&sealed),
            "digest is over the sealed file"
        );
        assert!(sealed.starts_with(fedpriv_common::seal::STREAM_MAGIC));
        let needle = &plain[plain.len() - 4096..plain.len() - 4000];
        assert!(
            !sealed.windows(needle.len()).any(|w| w == needle),
            "plaintext model on disk"
        );
        assert!(
            !sealed.windows(8).any(|w| w == b"__metada"),
            "plaintext header on disk"
        );

        let mut out = Vec::new();
        read_checkpoint(&key, &path, "s1", 3, Some(&digest), &mut out).unwrap();
        assert_eq!(out, plain);

        let refused = |key: &SealKey, round: u64, sha: Option<&str>, path: &Path| {
            let e = read_checkpoint(key, path, "s1", round, sha, &mut Vec::new()).unwrap_err();
            assert!(e.is_operators(), "{e:?}");
            e
        };
        let e = refused(&test_key(2), 3, None, &path);
        let m = e.to_string();
        assert!(
            matches!(e, CheckpointError::WrongKey { .. })
                && m.contains("another at-rest key")
                && m.contains(&path.display().to_string()),
            "{m}"
        );
        let e = refused(&key, 4, None, &path);
        let m = e.to_string();
        assert!(
            matches!(e, CheckpointError::NotAuthentic { .. })
                && m.contains("restore it from backup"),
            "{m}"
        );
        match refused(&key, 3, Some(&"0".repeat(64)), &path) {
            CheckpointError::DigestMismatch {
                expected, found, ..
            } => assert_eq!((expected, found), ("0".repeat(64), digest.clone())),
            other => panic!("{other:?}"),
        }
        for at in [30, sealed.len() / 2, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            let e = refused(&key, 3, None, &path);
            assert!(
                matches!(e, CheckpointError::NotAuthentic { .. }),
                "byte {at}: {e}"
            );
        }
        std::fs::write(&path, &plain).unwrap();
        let e = refused(&key, 3, None, &path);
        assert!(matches!(e, CheckpointError::NotSealed { .. }), "{e}");
    }
}
