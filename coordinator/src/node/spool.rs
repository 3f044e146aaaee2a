//! Upload spools: each streamed update's chunks are kept as they arrive, before the
//! aggregator folds them, so that a refused or cut-short upload's folded prefix can be fed
//! back out of the round's aggregate ([`crate::round::Action::Unfold`]).
//!
//! A spool keeps its upload in memory, in slabs drawn from one pool that every upload in
//! flight shares ([`SpoolMemory`], the `upload_spool_memory_mib` limit); once the pool is
//! spent, the rest of that upload is sealed to an unlinked file. Memory first because the
//! file costs the coordinator a kernel copy into the page cache and an AES-GCM pass per
//! value (about 14% of its CPU at 4 sites x 10M values); the file because a model of
//! hundreds of millions of values would otherwise hold a model-sized buffer per upload.
//! The slabs are plain process memory, like the aggregate they are folded into: the
//! packaged systemd unit keeps that memory out of swap and core dumps.
//!
//! The connection task that receives an upload writes its spool; the studies' owner reads
//! it back (on its own thread) when the engine asks for an unfold. The `refused` flag is
//! the owner's word to the connection task: stop spooling and forwarding, drain the rest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fedpriv_common::seal::SealKey;

use crate::round::{Input, UnfoldSource};

/// Largest plaintext of one spool record: a chunk is at most a few times
/// [`crate::node::site_conn::UPLOAD_CHUNK_VALUES`]; the cap bounds what a damaged length prefix can
/// make us allocate.
const MAX_SPOOL_RECORD: usize = 64 << 20;

/// Values per memory slab (256 KiB): the pool's unit.
pub const SLAB_VALUES: usize = 1 << 16;

/// Values per [`Input::Unfold`] fed back from memory.
const UNFOLD_PIECE: usize = 1 << 15;

/// The memory every upload spool draws from: at most `max_slabs` slabs, handed out one at a
/// time and taken back when a spool is dropped. Slabs given back are kept for the next
/// upload (no page faults round after round), so once the pool has been used to the full
/// the coordinator holds its budget until it exits.
pub struct SpoolMemory {
    max_slabs: usize,
    pool: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    /// Slabs in existence: handed out plus free.
    made: usize,
    free: Vec<Box<[f32]>>,
}

impl std::fmt::Debug for SpoolMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the slabs: they hold received updates.
        f.debug_struct("SpoolMemory")
            .field("max_slabs", &self.max_slabs)
            .finish_non_exhaustive()
    }
}

impl SpoolMemory {
    /// A pool of at most `bytes` (rounded down to whole slabs; 0: every upload goes to its
    /// file).
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            max_slabs: bytes / (SLAB_VALUES * 4),
            pool: Mutex::new(Pool::default()),
        })
    }

    /// A slab, if the budget has one left.
    fn take(&self) -> Option<Box<[f32]>> {
        // A poisoned pool (a panic while it was held) only ever held slab counts: carry on.
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slab) = pool.free.pop() {
            return Some(slab);
        }
        if pool.made < self.max_slabs {
            pool.made += 1;
            return Some(vec![0f32; SLAB_VALUES].into_boxed_slice());
        }
        None
    }

    fn give_back(&self, slabs: &mut Vec<Box<[f32]>>) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.free.append(slabs);
    }

    /// Slabs in existence and free ones (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        (pool.made, pool.free.len())
    }
}

/// An upload's spool, and the flag that tells its connection task to stop spooling and
/// forwarding (set once the upload is refused: the rest of its body is drained).
#[derive(Clone)]
pub struct Spool {
    store: Arc<Store>,
    refused: Arc<AtomicBool>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("refused", &self.is_refused())
            .finish_non_exhaustive()
    }
}

/// What an upload's spool holds: a prefix in memory slabs, the rest (if memory ran out) in
/// its file.
struct Store {
    memory: Arc<SpoolMemory>,
    dir: PathBuf,
    id: u64,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    slabs: Vec<Box<[f32]>>,
    /// Values in the slabs: the upload's first values.
    in_memory: usize,
    /// Opened when the first value does not fit in memory; holds every later one.
    file: Option<Arc<SpoolFile>>,
    /// Values spooled in all.
    written: usize,
    /// A write failed part-way: nothing more is taken (what was written stays readable).
    broken: bool,
}

impl Drop for Store {
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        self.memory.give_back(&mut held.slabs);
    }
}

impl Spool {
    /// A new, empty spool for upload `id`; its file, if it needs one, goes in `dir`.
    pub fn new(memory: &Arc<SpoolMemory>, dir: &Path, id: u64) -> Self {
        Self {
            store: Arc::new(Store {
                memory: Arc::clone(memory),
                dir: dir.to_path_buf(),
                id,
                held: Mutex::new(Held::default()),
            }),
            refused: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Tells the receiving task to stop: the upload was refused.
    pub fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }

    pub fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Appends the upload's next values, which start at value `offset`: into memory while
    /// the pool has slabs, then sealed into the spool file. Chunks must come in order,
    /// without gaps.
    pub fn write(&self, values: &[f32], offset: usize) -> std::io::Result<()> {
        // Only the receiving task writes; a poisoned lock means it panicked mid-write, and
        // the spool's bookkeeping can no longer be trusted.
        let mut held = self
            .store
            .held
            .lock()
            .map_err(|_| std::io::Error::other("spool lock poisoned"))?;
        if held.broken || offset != held.written {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "spool chunks must be written in order, without gaps",
            ));
        }
        let mut rest = values;
        if held.file.is_none() {
            while !rest.is_empty() {
                let at = held.in_memory % SLAB_VALUES;
                if at == 0 && held.in_memory == held.slabs.len() * SLAB_VALUES {
                    match self.store.memory.take() {
                        Some(slab) => held.slabs.push(slab),
                        None => break,
                    }
                }
                let n = (SLAB_VALUES - at).min(rest.len());
                let Some(slab) = held.slabs.last_mut() else {
                    break;
                };
                slab[at..at + n].copy_from_slice(&rest[..n]);
                held.in_memory += n;
                held.written += n;
                rest = &rest[n..];
            }
        }
        if rest.is_empty() {
            return Ok(());
        }
        let result = (|| {
            let file = match &held.file {
                Some(file) => Arc::clone(file),
                None => {
                    let file = open_spool(&self.store.dir, self.store.id, held.written)?;
                    held.file = Some(Arc::clone(&file));
                    file
                }
            };
            write_spool(
                &file,
                &fedpriv_common::wire::f32_body_bytes(rest),
                held.written,
            )
        })();
        match result {
            Ok(()) => held.written += rest.len(),
            Err(_) => held.broken = true,
        }
        result
    }

    /// Feeds the upload's first `len` values back as [`Input::Unfold`]s, in order: false
    /// if they cannot all be (more than was spooled, or the file part fails to read back or
    /// to authenticate).
    fn unfold(&self, upload: u64, len: usize, feed: &mut dyn FnMut(Input)) -> bool {
        let (in_memory, written, file) = {
            let held = self.store.held.lock().unwrap_or_else(|e| e.into_inner());
            (held.in_memory, held.written, held.file.clone())
        };
        if len > written {
            return false;
        }
        let mut offset = 0;
        while offset < len.min(in_memory) {
            let end = (offset + UNFOLD_PIECE)
                .min(len.min(in_memory))
                .min((offset / SLAB_VALUES + 1) * SLAB_VALUES);
            // Copied out under the lock, fed without it: the receiving task may still be
            // appending (it stops at its next chunk) and must not wait on the aggregator.
            let values = {
                let held = self.store.held.lock().unwrap_or_else(|e| e.into_inner());
                let slab = &held.slabs[offset / SLAB_VALUES];
                slab[offset % SLAB_VALUES..offset % SLAB_VALUES + (end - offset)].to_vec()
            };
            feed(Input::Unfold {
                upload,
                offset,
                values,
            });
            offset = end;
        }
        if len <= in_memory {
            return true;
        }
        unfold_from_spool(file.as_ref(), upload, in_memory, len, feed)
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
        let Some(spool) = self.by_upload.remove(&upload) else {
            return false;
        };
        spool.refuse();
        spool.unfold(upload, len, feed)
    }
}

/// The part of an upload's spool that did not fit in memory: an unlinked file of sealed
/// records (`u32 LE length ‖ sealed chunk`), one per chunk in arrival order, under a key
/// drawn for this file and held only in memory. Received updates never lie on disk (or in
/// swapped-out page cache) in plaintext, and the file is unreadable once the process is
/// gone, which is also when it is freed.
pub(crate) struct SpoolFile {
    pub(crate) file: std::fs::File,
    key: SealKey,
    /// Where the next record goes: file position, record index, value offset.
    next: std::sync::Mutex<(u64, u64, u64)>,
    /// The value offset of the first record.
    start: usize,
}

fn spool_aad(index: u64, offset: u64) -> [u8; 30] {
    let mut aad = [0u8; 30];
    aad[..14].copy_from_slice(b"fedpriv spool\0");
    aad[14..22].copy_from_slice(&index.to_le_bytes());
    aad[22..].copy_from_slice(&offset.to_le_bytes());
    aad
}

/// A new spool file for upload `id`, whose first record will start at value `start`,
/// unlinked at once: only the open handle reaches it, and the kernel frees it when the last
/// handle is dropped (also after a crash).
pub(crate) fn open_spool(dir: &Path, id: u64, start: usize) -> std::io::Result<Arc<SpoolFile>> {
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
        next: std::sync::Mutex::new((0, 0, start as u64)),
        start,
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

/// Feeds an upload's values from `from` (where its file starts) up to `len` back from its
/// spool file as [`Input::Unfold`]s, one per record, each authenticated before use. False
/// if they cannot be read or do not authenticate (the caller then reports the unfold as
/// failed, and the engine drops the round's aggregate).
pub(crate) fn unfold_from_spool(
    spool: Option<&Arc<SpoolFile>>,
    upload: u64,
    from: usize,
    len: usize,
    feed: &mut dyn FnMut(Input),
) -> bool {
    use std::os::unix::fs::FileExt;
    let Some(spool) = spool.filter(|s| s.start == from) else {
        return false;
    };
    let max_sealed =
        fedpriv_common::seal::HEADER_LEN + MAX_SPOOL_RECORD + fedpriv_common::seal::TAG_LEN;
    let (mut pos, mut index, mut offset) = (0u64, 0u64, from);
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
        let spool = open_spool(dir.path(), 7, 0).unwrap();
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
            collect_unfold(|feed| unfold_from_spool(Some(spool), 7, 0, len, feed))
        };
        for len in [1, 1000, 1005, UPLOAD_CHUNK_VALUES + 3, values.len()] {
            assert_eq!(unfold(&spool, len).unwrap(), values[..len], "len {len}");
        }
        // Asking for more than was spooled fails rather than inventing values.
        assert!(unfold(&spool, values.len() + 1).is_none());
        assert!(!unfold_from_spool(None, 7, 0, 1, &mut |_| {}));
        // A file read from where it does not start is refused.
        assert!(!unfold_from_spool(Some(&spool), 7, 1000, 1005, &mut |_| {}));

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

    /// The values an unfold of upload 7 feeds, checking the pieces come in order; `None`
    /// when the unfold reports failure.
    fn collect_unfold(unfold: impl FnOnce(&mut dyn FnMut(Input)) -> bool) -> Option<Vec<f32>> {
        let mut got = Vec::new();
        let ok = unfold(&mut |input| match input {
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
    }

    /// Unfolds `len` values of upload 7 from `spool`.
    fn unfold_all(spool: &Spool, len: usize) -> Option<Vec<f32>> {
        collect_unfold(|feed| spool.unfold(7, len, feed))
    }

    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn uploads_stay_in_memory_within_the_budget_and_spill_to_the_sealed_file_beyond() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..(3 * SLAB_VALUES + 123))
            .map(|i| i as f32 - 7.25)
            .collect();
        // Chunk cuts that straddle slab ends, and the budget's end.
        let cuts = [
            0,
            1000,
            SLAB_VALUES - 1,
            SLAB_VALUES + UPLOAD_CHUNK_VALUES,
            2 * SLAB_VALUES + 5,
            values.len(),
        ];
        // Budgets: none (all in the file), two slabs (a prefix in memory), more than the
        // upload (all in memory).
        for (slabs, in_memory) in [(0, 0), (2, 2 * SLAB_VALUES), (8, values.len())] {
            let memory = SpoolMemory::new(slabs * SLAB_VALUES * 4 + 100);
            let spool = Spool::new(&memory, dir.path(), 7);
            for w in cuts.windows(2) {
                spool.write(&values[w[0]..w[1]], w[0]).unwrap();
            }
            {
                let held = spool.store.held.lock().unwrap();
                assert_eq!(held.in_memory, in_memory, "budget of {slabs} slabs");
                assert_eq!(held.written, values.len());
                assert_eq!(held.file.is_some(), in_memory < values.len());
            }
            assert_eq!(entries(dir.path()), 0, "the file is unlinked");
            // Out of order or with a gap: refused, and nothing changes.
            assert!(spool.write(&values[..4], 0).is_err());
            assert!(spool.write(&values[..4], values.len() + 1).is_err());
            for len in [
                0,
                1,
                SLAB_VALUES,
                2 * SLAB_VALUES,
                2 * SLAB_VALUES + 1,
                2 * SLAB_VALUES + 6,
                values.len(),
            ] {
                assert_eq!(
                    unfold_all(&spool, len).unwrap(),
                    values[..len],
                    "{slabs} slabs, len {len}"
                );
            }
            // More than was spooled: refused rather than invented.
            assert!(unfold_all(&spool, values.len() + 1).is_none());
            assert_eq!(memory.counts(), (slabs.min(4), 0), "{slabs} slabs");
            drop(spool);
            // Back in the pool for the next upload.
            assert_eq!(memory.counts(), (slabs.min(4), slabs.min(4)));
        }
    }

    #[test]
    fn spools_in_flight_share_the_budget_and_reuse_its_slabs() {
        let dir = tempfile::tempdir().unwrap();
        let memory = SpoolMemory::new(3 * SLAB_VALUES * 4);
        let values: Vec<f32> = (0..2 * SLAB_VALUES).map(|i| i as f32).collect();
        let a = Spool::new(&memory, dir.path(), 1);
        let b = Spool::new(&memory, dir.path(), 2);
        a.write(&values, 0).unwrap();
        // The second upload gets the one slab left, then its file.
        b.write(&values, 0).unwrap();
        assert_eq!(b.store.held.lock().unwrap().in_memory, SLAB_VALUES);
        assert_eq!(unfold_all(&b, values.len()).unwrap(), values);
        drop(a);
        // A later upload reuses the freed slabs (no new ones beyond the budget).
        let c = Spool::new(&memory, dir.path(), 3);
        c.write(&values, 0).unwrap();
        assert_eq!(c.store.held.lock().unwrap().in_memory, values.len());
        assert_eq!(memory.counts(), (3, 0));
        assert_eq!(unfold_all(&c, values.len()).unwrap(), values);
        drop((b, c));
        assert_eq!(memory.counts(), (3, 3));
    }

    #[test]
    fn a_failed_spill_refuses_further_writes_and_keeps_what_is_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let memory = SpoolMemory::new(SLAB_VALUES * 4);
        let gone = dir.path().join("missing");
        let spool = Spool::new(&memory, &gone, 9);
        let values: Vec<f32> = (0..SLAB_VALUES + 10).map(|i| i as f32).collect();
        // The slab takes the first values; the file cannot be opened.
        assert!(spool.write(&values, 0).is_err());
        assert!(spool.write(&values[SLAB_VALUES..], SLAB_VALUES).is_err());
        let mut got = Vec::new();
        assert!(spool.unfold(9, SLAB_VALUES, &mut |input| {
            if let Input::Unfold { values, .. } = input {
                got.extend(values);
            }
        }));
        assert_eq!(got, values[..SLAB_VALUES]);
        assert!(!spool.unfold(9, SLAB_VALUES + 1, &mut |_| {}));
    }
}
