//! The audit log on disk (feature `fs`): an append-only writer that verifies what it resumes,
//! a file verifier for `audit verify`, and an explicit recovery for crash damage.
//!
//! The record format, the chain and the head file are specified in [`crate::audit`].
//!
//! # Durability
//!
//! [`AuditLog::append`] writes the whole line with one `write` on a file opened `O_APPEND`,
//! then `fdatasync`s it before returning, so a caller that appends *before* acting never
//! acts on an unrecorded event. Then it replaces `<log>.head` by rename (a process killed
//! at any point leaves the old or the new head, never half of one). The head is not synced:
//! that would double the cost per record, and a head left behind by a crash is still
//! checked as far as it goes (see [`crate::audit::HeadStatus::Behind`]); [`AuditLog::open`]
//! brings it up to date. After a power loss a filesystem may leave the head empty; `open`
//! then refuses and [`AuditLog::recover`] rebuilds it, recording that it did.
//!
//! # Retention
//!
//! Audit records are kept at least six years and this module has no prune, truncate or
//! rotate operation at all: the log only grows. Archiving a log (after six years) means
//! moving the log *and* its head file away together, while no writer has it open.
//!
//! # One writer
//!
//! Only one [`AuditLog`] may have a given file open at a time (one per process and state
//! directory); two writers would interleave two chains.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::audit::{
    chain_from, encode_line, AuditEvent, AuditHead, HeadStatus, ProblemKind, Verifier,
    VerifyReport, MAX_LINE_BYTES,
};

/// Appended to the log's file name to name its head file.
pub const HEAD_SUFFIX: &str = ".head";

/// A head file is one short line; anything larger is not one.
const MAX_HEAD_BYTES: u64 = 256;

/// Errors of the audit log on disk. Paths are named; record contents never are.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: cannot {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "audit log {} does not verify: {first}{}; run `audit verify --log {}` for the full report (a broken log is never restarted)",
        .path.display(),
        if *.count > 1 { format!(" (and {} more problem(s))", .count - 1) } else { String::new() },
        .path.display()
    )]
    Broken {
        path: PathBuf,
        first: String,
        count: usize,
    },
    #[error(
        "audit log {} is accessible to group or others (mode {mode:o}); run `chmod 600` on it",
        .path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "audit log {} is open for writing by another process (one writer per log keeps the chain intact); stop that process first",
        .path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "audit log {} is missing but its head file {} exists: the log was deleted or moved; restore both from backup",
        .path.display(),
        .head.display()
    )]
    LogMissing { path: PathBuf, head: PathBuf },
    #[error(
        "audit log {}: an earlier write failed and the log may end in a partial line; no more records are written until it is reopened (and recovered if needed)",
        .path.display()
    )]
    Poisoned { path: PathBuf },
    #[error("audit record of {bytes} bytes is over the {MAX_LINE_BYTES}-byte limit")]
    TooLarge { bytes: usize },
    #[error("audit log {} cannot be recovered automatically: {reason}", .path.display())]
    Unrecoverable { path: PathBuf, reason: String },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// How long opening a log waits for a lock that is held. A writer that just closed its log
/// can hold the lock a moment longer: a process forked meanwhile (by any thread starting a
/// command) shares the open file until it execs.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the log's exclusive advisory lock, held for as long as the file is open, so two
/// processes can never interleave records. A lock another writer keeps is refused
/// ([`AuditError::InUse`]) after [`LOCK_WAIT`].
fn lock(path: &Path, file: &File) -> Result<(), AuditError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(AuditError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path, "lock")(e)),
        }
    }
}

/// The head file of a log: the log's file name with [`HEAD_SUFFIX`] appended.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(HEAD_SUFFIX);
    PathBuf::from(name)
}

/// An open audit log, positioned after its last record.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
    file: File,
    head: AuditHead,
    /// Set when a write or sync failed: the file may end in a partial line, so appending
    /// more would bury it mid-log.
    poisoned: bool,
}

impl AuditLog {
    /// Opens the log at `path`, or creates it (mode 0600) with its head file.
    ///
    /// An existing log is verified whole against its head file first; any problem is an
    /// error naming the line ([`AuditError::Broken`]), never a fresh start. A head that is
    /// behind the log (crash between append and head update) is brought up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let path = path.as_ref().to_path_buf();
        let head_path = head_path(&path);
        let head_file = read_head(&head_path)?;
        let file = match OpenOptions::new().read(true).append(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Self::create(path, head_path, head_file);
            }
            Err(e) => return Err(io_err(&path, "open")(e)),
        };
        check_mode(&path, &file)?;
        lock(&path, &file)?;
        let (report, _) = scan(&path, &file, head_file)?;
        if !report.is_ok() {
            return Err(broken(&path, &report));
        }
        if matches!(report.head, HeadStatus::Behind { .. }) {
            write_head(&head_path, &report.last)?;
        }
        Ok(AuditLog {
            path,
            head_path,
            file,
            head: report.last,
            poisoned: false,
        })
    }

    fn create(
        path: PathBuf,
        head_path: PathBuf,
        head_file: Option<Result<AuditHead, ()>>,
    ) -> Result<Self, AuditError> {
        // A head without its log means the log went missing; starting a new chain would
        // hide that. Only a genesis head (crash right after creation) is harmless.
        if !matches!(&head_file, None | Some(Ok(AuditHead { seq: 0, .. }))) {
            return Err(AuditError::LogMissing {
                path,
                head: head_path,
            });
        }
        let mut opts = OpenOptions::new();
        opts.read(true).append(true).create_new(true);
        set_private_mode(&mut opts);
        let file = opts.open(&path).map_err(io_err(&path, "create"))?;
        lock(&path, &file)?;
        sync_parent(&path)?;
        let head = AuditHead::genesis();
        write_head(&head_path, &head)?;
        Ok(AuditLog {
            path,
            head_path,
            file,
            head,
            poisoned: false,
        })
    }

    /// Appends one record and returns its seq once it is on disk (written and
    /// `fdatasync`ed); then updates the head file. Call it *before* the action it records
    /// takes effect, and do not act if it fails.
    pub fn append(
        &mut self,
        actor: &str,
        event: AuditEvent,
        details: Value,
        ts: i64,
    ) -> Result<u64, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.clone(),
            });
        }
        let rec = chain_from(&self.head, ts, actor, event, details);
        let mut line = encode_line(&rec);
        if line.len() > MAX_LINE_BYTES {
            return Err(AuditError::TooLarge { bytes: line.len() });
        }
        line.push('\n');
        // One write call, so a killed process leaves the line whole or absent.
        let written = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.poisoned = true;
            return Err(io_err(&self.path, "append to")(e));
        }
        self.head = rec.head();
        write_head(&self.head_path, &self.head)?;
        Ok(rec.seq)
    }

    /// [`AuditLog::append`] stamped with the system clock.
    pub fn append_now(
        &mut self,
        actor: &str,
        event: AuditEvent,
        details: Value,
    ) -> Result<u64, AuditError> {
        self.append(actor, event, details, unix_now())
    }

    /// Seq and hash of the last record (seq 0 for an empty log).
    pub fn head(&self) -> &AuditHead {
        &self.head
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recovery path after a crash or power loss, for an operator to run when
    /// [`AuditLog::open`] refuses: drops a torn last line and rebuilds a missing or
    /// unreadable head file, then opens the log and records what it did as an
    /// [`AuditEvent::AuditRecovered`] record by `actor`.
    ///
    /// It refuses ([`AuditError::Unrecoverable`]) anything a crash cannot explain: an
    /// edited, missing or reordered record, or a head beyond or disagreeing with the log.
    pub fn recover(path: impl AsRef<Path>, actor: &str) -> Result<(Self, Recovery), AuditError> {
        let path = path.as_ref().to_path_buf();
        let head_path = head_path(&path);
        let head_file = read_head(&head_path)?;
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            // Nothing to recover: open creates it, or refuses if only the head is left.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((Self::open(&path)?, Recovery::default()))
            }
            Err(e) => return Err(io_err(&path, "open")(e)),
        };
        check_mode(&path, &file)?;
        let head_rebuilt = !matches!(head_file, Some(Ok(_)));
        let head_given = head_file.and_then(Result::ok);
        let (report, torn_at) = scan(&path, &file, head_given.clone().map(Ok))?;
        let fatal = report.problems.iter().find(|p| {
            !matches!(
                p.kind,
                ProblemKind::TornLastLine { .. }
                    | ProblemKind::HeadMissing
                    | ProblemKind::HeadUnreadable
            )
        });
        if let Some(p) = fatal {
            return Err(AuditError::Unrecoverable {
                path,
                reason: format!("{p} (not crash damage; restore from backup or investigate)"),
            });
        }
        let mut rec = Recovery {
            torn_bytes_dropped: 0,
            head_rebuilt,
        };
        if let Some(offset) = torn_at {
            let len = file.metadata().map_err(io_err(&path, "stat"))?.len();
            file.set_len(offset).map_err(io_err(&path, "truncate"))?;
            file.sync_all().map_err(io_err(&path, "sync"))?;
            rec.torn_bytes_dropped = len - offset;
        }
        drop(file);
        if !rec.did_something() {
            return Ok((Self::open(&path)?, rec));
        }
        if head_rebuilt {
            write_head(&head_path, &report.last)?;
        }
        let mut log = Self::open(&path)?;
        log.append_now(
            actor,
            AuditEvent::AuditRecovered,
            json!({
                "torn_bytes_dropped": rec.torn_bytes_dropped,
                "head_rebuilt": rec.head_rebuilt,
                "resumed_after_seq": report.last.seq,
            }),
        )?;
        Ok((log, rec))
    }
}

/// What [`AuditLog::recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes of a torn last line that were cut off.
    pub torn_bytes_dropped: u64,
    /// Whether the head file was missing or unreadable and was rebuilt from the log.
    pub head_rebuilt: bool,
}

impl Recovery {
    /// Whether anything was repaired (and an `audit_recovered` record appended).
    pub fn did_something(&self) -> bool {
        self.torn_bytes_dropped > 0 || self.head_rebuilt
    }
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.did_something() {
            return write!(f, "audit log needed no recovery");
        }
        write!(
            f,
            "audit log recovered: dropped a torn last line of {} bytes, head file {}; recorded as an audit_recovered record",
            self.torn_bytes_dropped,
            if self.head_rebuilt { "rebuilt" } else { "kept" }
        )
    }
}

/// Verifies the log at `path` against its head file (`<path>.head`); what
/// `audit verify --log FILE` prints. Errors only when the log cannot be read; every kind of
/// damage, a missing or unreadable head included, is in the report.
pub fn verify_file(path: impl AsRef<Path>) -> Result<VerifyReport, AuditError> {
    let path = path.as_ref();
    let head_file = read_head(&head_path(path))?;
    let file = File::open(path).map_err(io_err(path, "open"))?;
    Ok(scan(path, &file, head_file)?.0)
}

/// `None`: no head file; `Some(Err(()))`: one that is not a head.
fn read_head(head_path: &Path) -> Result<Option<Result<AuditHead, ()>>, AuditError> {
    let file = match File::open(head_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(head_path, "open")(e)),
    };
    let mut text = String::new();
    match file.take(MAX_HEAD_BYTES).read_to_string(&mut text) {
        Ok(_) => Ok(Some(AuditHead::parse(&text).map_err(|_| ()))),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(Some(Err(()))),
        Err(e) => Err(io_err(head_path, "read")(e)),
    }
}

/// Replaces the head file by rename, so it is always a whole head (not synced: see the
/// module docs).
fn write_head(head_path: &Path, head: &AuditHead) -> Result<(), AuditError> {
    let mut tmp = head_path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    set_private_mode(&mut opts);
    let mut f = opts.open(&tmp).map_err(io_err(&tmp, "create"))?;
    f.write_all(head.encode().as_bytes())
        .map_err(io_err(&tmp, "write"))?;
    drop(f);
    fs::rename(&tmp, head_path).map_err(io_err(head_path, "replace"))
}

/// Reads the whole log through the verifier. Returns the report and, for a torn last
/// line, the offset where it starts (what recovery truncates to).
fn scan(
    path: &Path,
    file: &File,
    head_file: Option<Result<AuditHead, ()>>,
) -> Result<(VerifyReport, Option<u64>), AuditError> {
    let (head, head_kind) = match head_file {
        None => (None, Some(ProblemKind::HeadMissing)),
        Some(Err(())) => (None, Some(ProblemKind::HeadUnreadable)),
        Some(Ok(h)) => (Some(h), None),
    };
    let mut v = Verifier::new(head);
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut buf = Vec::new();
    let mut offset = 0u64;
    let mut torn_at = None;
    loop {
        let start = offset;
        match next_line(&mut reader, &mut buf, &mut offset).map_err(io_err(path, "read"))? {
            Chunk::Eof => break,
            Chunk::Line => match std::str::from_utf8(&buf) {
                Ok(line) => v.feed_line(line),
                Err(_) => v.feed_not_utf8(),
            },
            Chunk::TooLong(n) => v.feed_too_long(n),
            Chunk::Torn(n) => {
                v.feed_torn_tail(n);
                torn_at = Some(start);
            }
        }
    }
    // An empty log without a head is a crash between creating the two: nothing to hide.
    if let Some(kind) = head_kind {
        if v.records() > 0 || v.lines() > 0 || kind == ProblemKind::HeadUnreadable {
            v.head_problem(kind);
        }
    }
    Ok((v.finish(), torn_at))
}

enum Chunk {
    /// A complete line is in the buffer (newline removed).
    Line,
    /// A line over the cap, skipped; its length.
    TooLong(usize),
    /// The file ends in this many bytes without a newline.
    Torn(usize),
    Eof,
}

/// Reads one line into `buf`, never holding more than [`MAX_LINE_BYTES`] of it.
fn next_line(r: &mut impl BufRead, buf: &mut Vec<u8>, offset: &mut u64) -> io::Result<Chunk> {
    buf.clear();
    let mut len = 0usize;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(if len == 0 {
                Chunk::Eof
            } else {
                Chunk::Torn(len)
            });
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        len += take;
        if len <= MAX_LINE_BYTES {
            buf.extend_from_slice(&avail[..take]);
        }
        let used = take + usize::from(done);
        r.consume(used);
        *offset += used as u64;
        if done {
            return Ok(if len > MAX_LINE_BYTES {
                Chunk::TooLong(len)
            } else {
                Chunk::Line
            });
        }
    }
}

fn broken(path: &Path, report: &VerifyReport) -> AuditError {
    AuditError::Broken {
        path: path.to_path_buf(),
        first: report
            .first_problem()
            .map_or_else(String::new, ToString::to_string),
        count: report.problem_count,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn sync_parent(path: &Path) -> Result<(), AuditError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The new file's directory entry must survive a power loss too.
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(parent, "sync the directory of"))
}

#[cfg(unix)]
fn set_private_mode(opts: &mut OpenOptions) {
    use std::os::unix::fs::OpenOptionsExt;
    opts.mode(0o600);
}

#[cfg(not(unix))]
fn set_private_mode(_opts: &mut OpenOptions) {}

#[cfg(unix)]
fn check_mode(path: &Path, file: &File) -> Result<(), AuditError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .map_err(io_err(path, "stat"))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuditError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path, _file: &File) -> Result<(), AuditError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{decode_line, Problem};
    use tempfile::TempDir;

    const N: u64 = 12;

    /// A log of `N` records in a fresh directory.
    fn make_log() -> (TempDir, PathBuf) {
        let dir = TempDir::new().expect("tempdir");
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).expect("create");
        for i in 1..=N {
            let seq = log
                .append(
                    "fedpriv://site/st-marys",
                    AuditEvent::UpdateReceived,
                    json!({"study": "s1", "round": i, "bytes": 4096, "clipped_norm": 0.75}),
                    1_700_000_000 + i as i64,
                )
                .expect("append");
            assert_eq!(seq, i);
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        fs::write(path, s).expect("write");
    }

    fn only_problem(path: &Path) -> Problem {
        let r = verify_file(path).expect("readable");
        assert_eq!(r.problem_count, 1, "{r}");
        r.problems[0].clone()
    }

    /// Open must refuse, naming the place.
    fn open_fails_with(path: &Path, needle: &str) {
        let err = AuditLog::open(path).expect_err("tampered log must not open");
        let msg = err.to_string();
        assert!(matches!(err, AuditError::Broken { .. }), "{msg}");
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let _first = AuditLog::open(&path).expect("first writer");
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::InUse { .. })
        ));
    }

    #[test]
    fn append_verify_and_resume() {
        let (_dir, path) = make_log();
        let r = verify_file(&path).expect("readable");
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.records, N);
        assert_eq!(r.head, HeadStatus::Matches);
        assert!(r.to_string().starts_with("audit log OK: 12 records"));

        let mut log = AuditLog::open(&path).expect("reopen");
        assert_eq!(log.head().seq, N);
        let seq = log
            .append_now(
                "fedpriv://operator/alice",
                AuditEvent::StudyStopped,
                json!({"study": "s1"}),
            )
            .expect("append");
        assert_eq!(seq, N + 1);
        drop(log);
        let r = verify_file(&path).expect("readable");
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.records, N + 1);
        let last = lines(&path).pop().expect("line");
        assert_eq!(
            decode_line(&last).map(|r| r.event),
            Some(AuditEvent::StudyStopped)
        );
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private_and_wide_modes_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, path) = make_log();
        for p in [path.clone(), head_path(&path)] {
            let mode = fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = AuditLog::open(&path).expect_err("0644 refused");
        assert!(
            matches!(err, AuditError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn edited_record_is_located() {
        let (_dir, path) = make_log();
        let mut l = lines(&path);
        l[4] = l[4].replace("\"bytes\":4096", "\"bytes\":4097");
        write_lines(&path, &l);
        let p = only_problem(&path);
        assert_eq!((p.line, p.seq), (Some(5), Some(5)));
        assert_eq!(p.kind, ProblemKind::ContentAltered);
        open_fails_with(&path, "line 5 (seq 5): record content altered");
    }

    #[test]
    fn deleted_record_is_located() {
        let (_dir, path) = make_log();
        let mut l = lines(&path);
        l.remove(6);
        write_lines(&path, &l);
        let p = only_problem(&path);
        assert_eq!(p.line, Some(7));
        assert_eq!(
            p.kind,
            ProblemKind::Missing {
                expected: 7,
                found: 8
            }
        );
        open_fails_with(&path, "line 7 (seq 8): record seq 7 missing");
    }

    #[test]
    fn reordered_records_are_located() {
        let (_dir, path) = make_log();
        let mut l = lines(&path);
        l.swap(2, 3);
        write_lines(&path, &l);
        let r = verify_file(&path).expect("readable");
        assert!(!r.is_ok());
        assert!(
            r.problems.iter().any(|p| p.line == Some(4)
                && p.kind
                    == ProblemKind::OutOfOrder {
                        expected: 5,
                        found: 3
                    }),
            "{r}"
        );
        assert!(
            r.problems.iter().all(|p| matches!(p.line, Some(3..=5))),
            "{r}"
        );
        open_fails_with(&path, "line 3");
    }

    #[test]
    fn torn_last_line_is_detected_and_recoverable() {
        let (_dir, path) = make_log();
        let len = fs::metadata(&path).expect("stat").len();
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len - 20).expect("truncate");
        drop(f);
        // The torn line, and the head naming the record it was.
        let r = verify_file(&path).expect("readable");
        assert_eq!(r.problem_count, 2, "{r}");
        let p = &r.problems[0];
        assert_eq!(p.line, Some(N as usize));
        assert!(matches!(p.kind, ProblemKind::TornLastLine { .. }), "{p}");
        assert!(
            matches!(r.problems[1].kind, ProblemKind::Truncated { .. }),
            "{r}"
        );
        open_fails_with(&path, &format!("line {N}: last line is incomplete"));

        // The head still names seq N, which the torn line was: whole records are gone, so
        // this is not crash damage and recovery refuses.
        let err = AuditLog::recover(&path, "fedpriv://operator/alice").expect_err("refused");
        assert!(matches!(err, AuditError::Unrecoverable { .. }), "{err}");

        // A real crash mid-append: the head still names the record before the torn one.
        let prev = decode_line(&lines(&path)[N as usize - 2])
            .expect("valid")
            .head();
        fs::write(head_path(&path), prev.encode()).expect("write head");
        let p = only_problem(&path);
        assert!(matches!(p.kind, ProblemKind::TornLastLine { .. }), "{p}");
        open_fails_with(&path, "last line is incomplete");
        let (log, rec) = AuditLog::recover(&path, "fedpriv://operator/alice").expect("recover");
        assert!(rec.torn_bytes_dropped > 0 && !rec.head_rebuilt, "{rec}");
        assert_eq!(log.head().seq, N);
        drop(log);
        let r = verify_file(&path).expect("readable");
        assert!(r.is_ok(), "{r}");
        let last = lines(&path).pop().expect("line");
        assert_eq!(
            decode_line(&last).map(|r| r.event),
            Some(AuditEvent::AuditRecovered)
        );
    }

    #[test]
    fn dropped_last_record_is_seen_through_the_head() {
        let (_dir, path) = make_log();
        let mut l = lines(&path);
        l.pop();
        write_lines(&path, &l);
        let p = only_problem(&path);
        assert_eq!(p.line, None);
        assert_eq!(
            p.kind,
            ProblemKind::Truncated {
                head_seq: N,
                log_seq: N - 1
            }
        );
        open_fails_with(
            &path,
            "head file: log ends at seq 11 but the head file records seq 12",
        );
        let err = AuditLog::recover(&path, "x").expect_err("refused");
        assert!(matches!(err, AuditError::Unrecoverable { .. }), "{err}");
    }

    #[test]
    fn edited_head_is_detected() {
        let (_dir, path) = make_log();
        let hp = head_path(&path);
        let head = AuditHead::parse(&fs::read_to_string(&hp).expect("read")).expect("head");

        let forged = AuditHead {
            seq: head.seq,
            hash: "ab".repeat(32),
        };
        fs::write(&hp, forged.encode()).expect("write");
        assert_eq!(
            only_problem(&path).kind,
            ProblemKind::HeadMismatch { head_seq: N }
        );
        open_fails_with(&path, "head file's hash for seq 12");

        let ahead = AuditHead {
            seq: N + 3,
            hash: head.hash.clone(),
        };
        fs::write(&hp, ahead.encode()).expect("write");
        assert!(matches!(
            only_problem(&path).kind,
            ProblemKind::Truncated { .. }
        ));

        fs::write(&hp, "garbage").expect("write");
        assert_eq!(only_problem(&path).kind, ProblemKind::HeadUnreadable);
        open_fails_with(&path, "head file unreadable");
    }

    #[test]
    fn missing_head_refused_then_rebuilt_by_recovery() {
        let (_dir, path) = make_log();
        fs::remove_file(head_path(&path)).expect("rm");
        assert_eq!(only_problem(&path).kind, ProblemKind::HeadMissing);
        open_fails_with(&path, "head file missing");
        let (log, rec) = AuditLog::recover(&path, "fedpriv://operator/alice").expect("recover");
        assert!(rec.head_rebuilt && rec.torn_bytes_dropped == 0);
        assert_eq!(log.head().seq, N + 1);
        drop(log);
        assert!(verify_file(&path).expect("readable").is_ok());
    }

    #[test]
    fn head_behind_by_a_crash_is_repaired_on_open() {
        let (_dir, path) = make_log();
        let prev = decode_line(&lines(&path)[N as usize - 2])
            .expect("valid")
            .head();
        fs::write(head_path(&path), prev.encode()).expect("write head");
        let r = verify_file(&path).expect("readable");
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.head, HeadStatus::Behind { head_seq: N - 1 });
        let log = AuditLog::open(&path).expect("open");
        assert_eq!(log.head().seq, N);
        drop(log);
        assert_eq!(
            verify_file(&path).expect("readable").head,
            HeadStatus::Matches
        );
    }

    #[test]
    fn deleted_log_with_head_is_refused() {
        let (_dir, path) = make_log();
        fs::remove_file(&path).expect("rm");
        let err = AuditLog::open(&path).expect_err("must not restart");
        assert!(matches!(err, AuditError::LogMissing { .. }), "{err}");
        assert!(verify_file(&path).is_err());
    }

    #[test]
    fn oversized_record_is_refused_without_writing() {
        let (_dir, path) = make_log();
        let mut log = AuditLog::open(&path).expect("open");
        let big = "x".repeat(MAX_LINE_BYTES);
        let err = log
            .append("a", AuditEvent::Alert, json!({ "k": big }), 0)
            .expect_err("too large");
        assert!(matches!(err, AuditError::TooLarge { .. }));
        drop(log);
        assert!(verify_file(&path).expect("readable").is_ok());
    }
}
