//! Upload spools: each streamed update's chunks are sealed to an unlinked file as they
//! arrive, before the aggregator folds them, so that a refused or cut-short upload's folded
//! prefix can be fed back out of the round's aggregate ([`crate::round::Action::Unfold`]).
//!
//! The connection task that receives an upload writes its spool; the studies' owner reads
//! it back (on its own thread) when the engine asks for an unfold. The `refused` flag is
//! the owner's word to the connection task: stop spooling and forwarding, drain the rest.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fedpriv_common::seal::SealKey;

use crate::round::{Input, UnfoldSource};

/// Largest plaintext of one spool record: a chunk is at most a few times
/// [`crate::node::site_conn::UPLOAD_CHUNK_VALUES`]; the cap bounds what a damaged length prefix can
/// make us allocate.
const MAX_SPOOL_RECORD: usize = 64 << 20;

/// An upload's spool file, and the flag that tells its connection task to stop spooling
/// and forwarding (set once the upload is refused: the rest of its body is drained).
#[derive(Clone)]
pub struct Spool {
    pub(crate) file: Arc<SpoolFile>,
    refused: Arc<AtomicBool>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("refused", &self.is_refused())
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// A new spool for upload `id` in `dir` (see [`open_spool`]).
    pub fn open(dir: &Path, id: u64) -> std::io::Result<Self> {
        Ok(Self {
            file: open_spool(dir, id)?,
            refused: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Tells the receiving task to stop: the upload was refused.
    pub fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }

    pub fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Appends the next chunk (see [`write_spool`]).
    pub fn write(&self, bytes: &[u8], offset: usize) -> std::io::Result<()> {
        write_spool(&self.file, bytes, offset)
    }
}

/// The spools of the uploads in flight, by upload id: the owner's side.
#[derive(Debug, Default)]
pub struct Spools {
    by_upload: HashMap<u64, Spool>,
}

impl Spools {
    pub fn insert(&mut self, upload: u64, spool: Spool) {
        self.by_upload.insert(upload, spool);
    }

    /// Drops an upload's spool (its file is freed once the receiving task drops it too).
    pub fn remove(&mut self, upload: u64) {
        self.by_upload.remove(&upload);
    }

    /// Stops an upload's receiving task and drops its spool.
    pub fn refuse(&mut self, upload: u64) {
        if let Some(spool) = self.by_upload.remove(&upload) {
            spool.refuse();
        }
    }
}

impl UnfoldSource for Spools {
    fn unfold(&mut self, upload: u64, len: usize, feed: &mut dyn FnMut(Input)) -> bool {
        // Take a refused or cut-short upload's folded values back out, from its spool.
        let spool = self.by_upload.remove(&upload);
        if let Some(spool) = &spool {
            spool.refuse();
        }
        unfold_from_spool(spool.as_ref().map(|s| &s.file), upload, len, feed)
    }
}

/// An upload's spool: an unlinked file of sealed records (`u32 LE length ‖ sealed chunk`),
/// one per chunk in arrival order, under a key drawn for this file and held only in
/// memory. Received updates never lie on disk (or in swapped-out page cache) in plaintext,
/// and the file is unreadable once the process is gone, which is also when it is freed.
pub(crate) struct SpoolFile {
    pub(crate) file: std::fs::File,
    key: SealKey,
    /// Where the next record goes: file position, record index, value offset.
    next: std::sync::Mutex<(u64, u64, u64)>,
}

fn spool_aad(index: u64, offset: u64) -> [u8; 30] {
    let mut aad = [0u8; 30];
    aad[..14].copy_from_slice(b"fedpriv spool\0");
    aad[14..22].copy_from_slice(&index.to_le_bytes());
    aad[22..].copy_from_slice(&offset.to_le_bytes());
    aad
}

/// A new spool file for upload `id`, unlinked at once: only the open handle reaches it, and
/// the kernel frees it when the last handle is dropped (also after a crash).
pub(crate) fn open_spool(dir: &Path, id: u64) -> std::io::Result<Arc<SpoolFile>> {
    let material = fedpriv_common::seal::generate_key_hex().map_err(std::io::Error::other)?;
    let key = SealKey::from_material(material.as_bytes()).map_err(std::io::Error::other)?;
    drop(material);
    let path = dir.join(format!("upload-{id}.sealed"));
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts.open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(Arc::new(SpoolFile {
        file,
        key,
        next: std::sync::Mutex::new((0, 0, 0)),
    }))
}

/// Appends `bytes` (whole little-endian f32 values, starting at value `offset`) as the
/// next sealed record. Records must come in order, without gaps: the read-back walks them
/// from the start.
pub(crate) fn write_spool(spool: &SpoolFile, bytes: &[u8], offset: usize) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
    if !bytes.chunks_exact(4).remainder().is_empty() || bytes.len() > MAX_SPOOL_RECORD {
        return Err(invalid(
            "a spool record holds whole values, at most the record cap",
        ));
    }
    // Only the receiving task writes; a poisoned lock means that task panicked mid-write,
    // and the file's bookkeeping can no longer be trusted.
    let mut next = spool
        .next
        .lock()
        .map_err(|_| std::io::Error::other("spool lock poisoned"))?;
    let (pos, index, at) = *next;
    if offset as u64 != at {
        return Err(invalid(
            "spool records must be written in order, without gaps",
        ));
    }
    // The length prefix, then the sealed values sealed in place behind it (one copy).
    let sealed_len = fedpriv_common::seal::sealed_len(bytes.len());
    let mut record = Vec::with_capacity(4 + sealed_len);
    record.extend_from_slice(&(sealed_len as u32).to_le_bytes());
    fedpriv_common::seal::seal_append(&spool.key, bytes, &spool_aad(index, at), &mut record)
        .map_err(std::io::Error::other)?;
    spool.file.write_all_at(&record, pos)?;
    *next = (
        pos + record.len() as u64,
        index + 1,
        at + bytes.len() as u64 / 4,
    );
    Ok(())
}

/// Feeds the first `len` values of an upload back from its spool file as
/// [`Input::Unfold`]s, one per record, each authenticated before use. False if they cannot
/// be read or do not authenticate (the caller then reports the unfold as failed, and the
/// engine drops the round's aggregate).
pub(crate) fn unfold_from_spool(
    spool: Option<&Arc<SpoolFile>>,
    upload: u64,
    len: usize,
    feed: &mut dyn FnMut(Input),
) -> bool {
    use std::os::unix::fs::FileExt;
    let Some(spool) = spool else {
        return false;
    };
    let max_sealed =
        fedpriv_common::seal::HEADER_LEN + MAX_SPOOL_RECORD + fedpriv_common::seal::TAG_LEN;
    let (mut pos, mut index, mut offset) = (0u64, 0u64, 0usize);
    let mut sealed = Vec::new();
    while offset < len {
        let mut prefix = [0u8; 4];
        if spool.file.read_exact_at(&mut prefix, pos).is_err() {
            return false;
        }
        let n = u32::from_le_bytes(prefix) as usize;
        if n > max_sealed {
            return false;
        }
        sealed.resize(n, 0);
        if spool.file.read_exact_at(&mut sealed, pos + 4).is_err() {
            return false;
        }
        let Ok(bytes) =
            fedpriv_common::seal::open(&spool.key, &sealed, &spool_aad(index, offset as u64))
        else {
            return false;
        };
        let take = (bytes.len() / 4).min(len - offset);
        if take == 0 {
            return false;
        }
        let values = bytes[..take * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        feed(Input::Unfold {
            upload,
            offset,
            values,
        });
        offset += take;
        pos += 4 + n as u64;
        index += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::node::site_conn::UPLOAD_CHUNK_VALUES;

    #[test]
    fn spooled_prefixes_are_fed_back_in_order() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = open_spool(dir.path(), 7).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "unlinked"
        );
        let values: Vec<f32> = (0..(2 * UPLOAD_CHUNK_VALUES + 10))
            .map(|i| i as f32 + 0.5)
            .collect();
        let bytes = fedpriv_common::wire::f32_body_bytes(&values);
        // Chunks of uneven sizes, as a stream in f16 makes them.
        let cuts = [0, 1000, UPLOAD_CHUNK_VALUES + 3, values.len()];
        for w in cuts.windows(2) {
            write_spool(&spool, &bytes[w[0] * 4..w[1] * 4], w[0]).unwrap();
        }
        // Out of order, with a gap, or with a split value: refused.
        assert!(write_spool(&spool, &bytes[..4], 0).is_err());
        assert!(write_spool(&spool, &bytes[..4], values.len() + 1).is_err());
        assert!(write_spool(&spool, &bytes[..6], values.len()).is_err());
        let unfold = |spool: &Arc<SpoolFile>, len: usize| {
            let mut got = Vec::new();
            let ok = unfold_from_spool(Some(spool), 7, len, &mut |input| match input {
                Input::Unfold {
                    upload: 7,
                    offset,
                    values,
                } => {
                    assert_eq!(offset, got.len());
                    got.extend(values);
                }
                other => panic!("{other:?}"),
            });
            ok.then_some(got)
        };
        for len in [1, 1000, 1005, UPLOAD_CHUNK_VALUES + 3, values.len()] {
            assert_eq!(unfold(&spool, len).unwrap(), values[..len], "len {len}");
        }
        // Asking for more than was spooled fails rather than inventing values.
        assert!(unfold(&spool, values.len() + 1).is_none());
        assert!(!unfold_from_spool(None, 7, 1, &mut |_| {}));

        // On disk: sealed, never the values themselves.
        let size = spool.file.metadata().unwrap().len() as usize;
        let mut raw = vec![0u8; size];
        spool.file.read_exact_at(&mut raw, 0).unwrap();
        let needle = &bytes[4000..4064];
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle),
            "plaintext update on disk"
        );
        // A changed byte in the second record fails the read-back of anything past it.
        let at =
            4 + (fedpriv_common::seal::HEADER_LEN + 4000 + fedpriv_common::seal::TAG_LEN) + 4 + 100;
        spool.file.write_all_at(&[raw[at] ^ 1], at as u64).unwrap();
        assert_eq!(unfold(&spool, 1000).unwrap(), values[..1000]);
        assert!(unfold(&spool, 1001).is_none());
    }
}
