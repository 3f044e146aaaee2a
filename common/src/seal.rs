//! Encryption at rest for model checkpoints and stored updates: AES-256-GCM. Pure: the
//! binaries read the key (a 0600 key file or an environment variable) and the files; this
//! module only turns bytes into sealed bytes and back.
//!
//! # Sealed format
//!
//! ```text
//! "FPSEAL1" (7 bytes) | key id (8 bytes) | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)
//! ```
//!
//! - key id: the first 8 bytes of SHA-256(`"fedpriv seal key id\0"` ‖ key), so a file opened
//!   with another key is reported as such instead of as damage (it reveals nothing usable
//!   about a 256-bit key);
//! - nonce: 96 random bits from the OS (`ring::rand::SystemRandom`) per file; random nonces
//!   are safe for well over a million files per key (the limit is about 2^32);
//! - the GCM associated data is the 27-byte header followed by the caller's `aad`, which
//!   binds a file to its purpose (e.g. `b"checkpoint/study-7/round-12"`): a file copied
//!   into another slot, a changed header byte, a changed or missing ciphertext byte all fail
//!   authentication. Nothing is ever returned that did not authenticate.
//!
//! # Streamed sealed format (large files: model checkpoints)
//!
//! ```text
//! "FPSTRM1" (7) | key id (8) | segment length, u32 LE (4) | nonce prefix (8) |
//! segment 0: ciphertext (segment length) | tag (16) | segment 1 ... | last segment: ciphertext (0..=segment length) | tag (16)
//! ```
//!
//! The STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar 2015): every segment but the
//! last holds exactly `segment length` plaintext bytes; segment `i` is sealed with the nonce
//! `prefix ‖ i (u32 BE)` and the associated data `header ‖ i (u64 LE) ‖ final flag ‖ purpose`.
//! The 64-bit prefix is random per file, so nonces never repeat within a file and repeat
//! across files only with probability about files^2 / 2^65. A dropped, reordered or
//! duplicated segment, a segment from another file, a file cut at a segment boundary (the
//! new last segment was not sealed as final), trailing bytes, a changed header or another
//! purpose all fail authentication. [`SealWriter`] and [`SealReader`] hold one segment in
//! memory whatever the file size, and the reader hands out a segment's plaintext only once
//! its tag has verified.
//!
//! # Key material
//!
//! 64 hex characters (surrounding whitespace, such as a trailing newline, ignored): what
//! [`generate_key_hex`] makes and what a key file or environment variable holds.

use crate::digest::hex;
use std::fmt;
use std::io::{Read, Write};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// First bytes of every sealed file.
pub const MAGIC: &[u8; 7] = b"FPSEAL1";

/// Bytes of the key id.
pub const KEY_ID_LEN: usize = 8;

/// Bytes before the ciphertext.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_ID_LEN + NONCE_LEN;

/// Bytes of the GCM tag after the ciphertext.
pub const TAG_LEN: usize = 16;

/// Bytes of an AES-256 key.
pub const KEY_LEN: usize = 32;

const KEY_ID_DOMAIN: &[u8] = b"fedpriv seal key id\0";

/// Errors of sealing and opening. None of them carries key or plaintext bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("seal key must be {} hex characters (got {got} characters after trimming whitespace)", KEY_LEN * 2)]
    KeyLength { got: usize },
    #[error("seal key contains a character that is not a hex digit")]
    KeyNotHex,
    #[error("seal key is all zeros (a placeholder, not a key)")]
    KeyAllZero,
    #[error(
        "not a sealed file (no FPSEAL1 header): plaintext, another format, or damaged at the start"
    )]
    NotSealed,
    #[error("sealed file is truncated: {len} bytes, shorter than the {} of an empty sealed file", HEADER_LEN + TAG_LEN)]
    Truncated { len: usize },
    #[error("sealed with another key (key id {file_key_id}, ours is {our_key_id})")]
    WrongKey {
        file_key_id: String,
        our_key_id: String,
    },
    #[error("sealed file does not authenticate: it was altered or truncated, or it belongs to another purpose (associated data differs); nothing was decrypted")]
    Authentication,
    #[error("the operating system's random generator failed")]
    Random,
    #[error("sealed stream is too long: more than 2^32 segments")]
    TooLong,
    #[error("I/O error ({kind:?}): {message}")]
    Io {
        kind: std::io::ErrorKind,
        message: String,
    },
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// An AES-256-GCM key. `Debug` shows only its key id.
pub struct SealKey {
    key: LessSafeKey,
    id: [u8; KEY_ID_LEN],
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealKey")
            .field("id", &hex(&self.id))
            .finish()
    }
}

impl SealKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, SealError> {
        if bytes.iter().all(|&b| b == 0) {
            return Err(SealError::KeyAllZero);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| SealError::Internal("AES-256-GCM refused a 32-byte key"))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(KEY_ID_DOMAIN);
        ctx.update(bytes);
        let digest = ctx.finish();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        Ok(SealKey {
            key: LessSafeKey::new(unbound),
            id,
        })
    }

    /// A key from key material as read from a key file or an environment variable: 64 hex
    /// characters, surrounding whitespace ignored.
    pub fn from_material(material: &[u8]) -> Result<Self, SealError> {
        let text = material.trim_ascii();
        if text.len() != KEY_LEN * 2 {
            return Err(SealError::KeyLength { got: text.len() });
        }
        let mut bytes = [0u8; KEY_LEN];
        for (out, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *out = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        let key = Self::from_bytes(&bytes);
        // Do not leave the key on the stack longer than needed.
        bytes.fill(0);
        key
    }

    /// The key id written in every file this key seals (hex), for messages and key
    /// rotation bookkeeping.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

/// Fresh key material (64 hex characters) from the OS random generator.
pub fn generate_key_hex() -> Result<String, SealError> {
    let mut bytes = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SealError::Random)?;
    let out = hex(&bytes);
    bytes.fill(0);
    Ok(out)
}

/// Whether `bytes` start like a sealed file (not whether they open).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Encrypts `plaintext` for the purpose named by `aad`.
pub fn seal(key: &SealKey, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut out = Vec::with_capacity(sealed_len(plaintext.len()));
    seal_append(key, plaintext, aad, &mut out)?;
    Ok(out)
}

/// The length of [`seal`]'s output for a plaintext of `len` bytes.
pub const fn sealed_len(len: usize) -> usize {
    HEADER_LEN + len + TAG_LEN
}

/// [`seal`], appending the sealed form to `out` (after whatever the caller put there, a
/// record's length prefix, say) instead of returning a new buffer: the plaintext is copied
/// once, into `out`, and encrypted there. On an error `out` is left as it was.
pub fn seal_append(
    key: &SealKey,
    plaintext: &[u8],
    aad: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Random)?;
    let start = out.len();
    out.reserve(sealed_len(plaintext.len()));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.id);
    out.extend_from_slice(&nonce);
    let full_aad = [&out[start..start + HEADER_LEN], aad].concat();
    out.extend_from_slice(plaintext);
    let sealed = key.key.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&full_aad),
        &mut out[start + HEADER_LEN..],
    );
    match sealed {
        Ok(tag) => {
            out.extend_from_slice(tag.as_ref());
            Ok(())
        }
        Err(_) => {
            // Never leave plaintext behind in the caller's buffer.
            out.truncate(start);
            Err(SealError::Internal("AES-256-GCM refused to seal"))
        }
    }
}

/// Decrypts a sealed file for the purpose named by `aad`. Returns the plaintext only if
/// the key, the purpose and every byte are right.
pub fn open(key: &SealKey, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    if !is_sealed(sealed) {
        return Err(SealError::NotSealed);
    }
    if sealed.len() < HEADER_LEN + TAG_LEN {
        return Err(SealError::Truncated { len: sealed.len() });
    }
    let file_id = &sealed[MAGIC.len()..MAGIC.len() + KEY_ID_LEN];
    if file_id != key.id {
        return Err(SealError::WrongKey {
            file_key_id: hex(file_id),
            our_key_id: hex(&key.id),
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[MAGIC.len() + KEY_ID_LEN..HEADER_LEN]);
    let full_aad = [&sealed[..HEADER_LEN], aad].concat();
    let mut buf = sealed[HEADER_LEN..].to_vec();
    let plain_len = key
        .key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&full_aad),
            &mut buf,
        )
        .map_err(|_| SealError::Authentication)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

/// First bytes of every streamed sealed file.
pub const STREAM_MAGIC: &[u8; 7] = b"FPSTRM1";

/// Bytes of a streamed file's random nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 8;

/// Bytes before a streamed file's first segment.
pub const STREAM_HEADER_LEN: usize = STREAM_MAGIC.len() + KEY_ID_LEN + 4 + NONCE_PREFIX_LEN;

/// Plaintext bytes per segment that [`SealWriter::new`] uses: 1 MiB, so the tags add 16
/// bytes per MiB and either side holds about 1 MiB.
pub const DEFAULT_SEGMENT_LEN: usize = 1 << 20;

/// Largest segment a reader accepts (the header is read before anything authenticates, so
/// its claim must not size an allocation beyond this).
pub const MAX_SEGMENT_LEN: usize = 1 << 24;

fn io_error(e: SealError) -> std::io::Error {
    let kind = match e {
        SealError::Io { kind, .. } => kind,
        SealError::NotSealed
        | SealError::Truncated { .. }
        | SealError::WrongKey { .. }
        | SealError::Authentication => std::io::ErrorKind::InvalidData,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e)
}

impl From<std::io::Error> for SealError {
    fn from(e: std::io::Error) -> Self {
        // An error that came from this module through `std::io` comes back as itself.
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<SealError>())
        {
            Some(inner) => inner.clone(),
            None => SealError::Io {
                kind: e.kind(),
                message: e.to_string(),
            },
        }
    }
}

fn segment_nonce(prefix: &[u8; NONCE_PREFIX_LEN], index: u64) -> Result<Nonce, SealError> {
    let counter = u32::try_from(index).map_err(|_| SealError::TooLong)?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    nonce[NONCE_PREFIX_LEN..].copy_from_slice(&counter.to_be_bytes());
    Ok(Nonce::assume_unique_for_key(nonce))
}

/// `header ‖ index ‖ final ‖ purpose`, rebuilt per segment into a buffer kept for the
/// purpose (the header and purpose never change within a file).
struct SegmentAad {
    buf: Vec<u8>,
}

impl SegmentAad {
    const INDEX_AT: usize = STREAM_HEADER_LEN;
    const FINAL_AT: usize = STREAM_HEADER_LEN + 8;

    fn new(header: &[u8; STREAM_HEADER_LEN], purpose: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(STREAM_HEADER_LEN + 9 + purpose.len());
        buf.extend_from_slice(header);
        buf.extend_from_slice(&[0u8; 9]);
        buf.extend_from_slice(purpose);
        SegmentAad { buf }
    }

    fn for_segment(&mut self, index: u64, last: bool) -> Aad<&[u8]> {
        self.buf[Self::INDEX_AT..Self::FINAL_AT].copy_from_slice(&index.to_le_bytes());
        self.buf[Self::FINAL_AT] = u8::from(last);
        Aad::from(&self.buf[..])
    }
}

/// Encrypts a stream of any length into the streamed sealed format, one segment at a time.
/// Call [`finish`](Self::finish): a writer dropped without it leaves a file that does not
/// open (its last segment was never sealed as final), never one that opens short.
pub struct SealWriter<'k, W: Write> {
    key: &'k SealKey,
    inner: W,
    header: [u8; STREAM_HEADER_LEN],
    header_written: bool,
    prefix: [u8; NONCE_PREFIX_LEN],
    aad: SegmentAad,
    segment_len: usize,
    /// Plaintext of the segment being filled (room for its tag after it).
    buf: Vec<u8>,
    index: u64,
}

impl<W: Write> fmt::Debug for SealWriter<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealWriter")
            .field("key", self.key)
            .field("segment_len", &self.segment_len)
            .field("index", &self.index)
            .finish()
    }
}

impl<'k, W: Write> SealWriter<'k, W> {
    /// A writer with [`DEFAULT_SEGMENT_LEN`] segments for the purpose named by `purpose`.
    pub fn new(key: &'k SealKey, inner: W, purpose: &[u8]) -> Result<Self, SealError> {
        Self::with_segment_len(key, inner, purpose, DEFAULT_SEGMENT_LEN)
    }

    /// A writer with segments of `segment_len` plaintext bytes (1 ..= [`MAX_SEGMENT_LEN`]).
    pub fn with_segment_len(
        key: &'k SealKey,
        inner: W,
        purpose: &[u8],
        segment_len: usize,
    ) -> Result<Self, SealError> {
        if segment_len == 0 || segment_len > MAX_SEGMENT_LEN {
            return Err(SealError::Internal("segment length out of range"));
        }
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        SystemRandom::new()
            .fill(&mut prefix)
            .map_err(|_| SealError::Random)?;
        let mut header = [0u8; STREAM_HEADER_LEN];
        let mut at = 0;
        for part in [
            &STREAM_MAGIC[..],
            &key.id[..],
            &(segment_len as u32).to_le_bytes()[..],
            &prefix[..],
        ] {
            header[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Ok(SealWriter {
            key,
            inner,
            aad: SegmentAad::new(&header, purpose),
            header,
            header_written: false,
            prefix,
            segment_len,
            buf: Vec::with_capacity(segment_len + TAG_LEN),
            index: 0,
        })
    }

    fn emit(&mut self, last: bool) -> Result<(), SealError> {
        if !self.header_written {
            self.inner.write_all(&self.header)?;
            self.header_written = true;
        }
        let nonce = segment_nonce(&self.prefix, self.index)?;
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(
                nonce,
                self.aad.for_segment(self.index, last),
                &mut self.buf,
            )
            .map_err(|_| SealError::Internal("AES-256-GCM refused to seal"))?;
        self.buf.extend_from_slice(tag.as_ref());
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        self.index += 1;
        Ok(())
    }

    /// Seals what is buffered as the last segment, flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<W, SealError> {
        self.emit(true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SealWriter<'_, W> {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            // A full segment is sealed only once more data arrives: the last segment may be
            // full, and only `finish` knows which one is last.
            if self.buf.len() == self.segment_len {
                self.emit(false).map_err(io_error)?;
            }
            let take = (self.segment_len - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(n)
    }

    /// Flushes the inner writer; a partly filled segment stays buffered (a segment is
    /// sealed only when full, or by [`SealWriter::finish`]).
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts the streamed sealed format segment by segment, handing out plaintext only
/// once its segment authenticated. Also a [`Read`]er of the authenticated plaintext, whose
/// errors carry the [`SealError`] (`SealError::from(io_error)` gets it back).
pub struct SealReader<'k, R: Read> {
    key: &'k SealKey,
    inner: R,
    prefix: [u8; NONCE_PREFIX_LEN],
    aad: SegmentAad,
    segment_len: usize,
    /// Ciphertext of the segment being read, then its plaintext (`plain` bytes of it).
    buf: Vec<u8>,
    /// The first byte of the next segment, read to learn that the current one is not last.
    carry: Option<u8>,
    index: u64,
    done: bool,
    failed: Option<SealError>,
    /// For `Read`: the plaintext of the current segment is `buf[pos..plain]`.
    pos: usize,
    plain: usize,
}

impl<R: Read> fmt::Debug for SealReader<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealReader")
            .field("key", self.key)
            .field("segment_len", &self.segment_len)
            .field("index", &self.index)
            .field("done", &self.done)
            .finish()
    }
}

impl<'k, R: Read> SealReader<'k, R> {
    /// Reads and checks the header: the format, and that `key` sealed the file (else
    /// [`SealError::WrongKey`]). Nothing is authenticated yet.
    pub fn new(key: &'k SealKey, mut inner: R, purpose: &[u8]) -> Result<Self, SealError> {
        let mut header = Vec::with_capacity(STREAM_HEADER_LEN);
        (&mut inner)
            .take(STREAM_HEADER_LEN as u64)
            .read_to_end(&mut header)?;
        if !header.starts_with(STREAM_MAGIC) {
            return Err(SealError::NotSealed);
        }
        let header: [u8; STREAM_HEADER_LEN] = header
            .try_into()
            .map_err(|h: Vec<u8>| SealError::Truncated { len: h.len() })?;
        let id_at = STREAM_MAGIC.len();
        let len_at = id_at + KEY_ID_LEN;
        let prefix_at = len_at + 4;
        let file_id = &header[id_at..len_at];
        if file_id != key.id {
            return Err(SealError::WrongKey {
                file_key_id: hex(file_id),
                our_key_id: hex(&key.id),
            });
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[len_at..prefix_at]);
        let segment_len = u32::from_le_bytes(len) as usize;
        if segment_len == 0 || segment_len > MAX_SEGMENT_LEN {
            // Not something our writer makes: the header was altered.
            return Err(SealError::Authentication);
        }
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        prefix.copy_from_slice(&header[prefix_at..]);
        Ok(SealReader {
            key,
            inner,
            prefix,
            aad: SegmentAad::new(&header, purpose),
            segment_len,
            buf: Vec::with_capacity(segment_len + TAG_LEN + 1),
            carry: None,
            index: 0,
            done: false,
            failed: None,
            pos: 0,
            plain: 0,
        })
    }

    /// The plaintext of the next segment once it authenticated, or `None` after the last
    /// one. Only the last segment may be shorter than the segment length; any damage,
    /// truncation, extension, reordering or other purpose is [`SealError::Authentication`].
    /// After an error every later call fails the same way (never a clean end).
    pub fn next_segment(&mut self) -> Result<Option<&[u8]>, SealError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.read_segment() {
            Ok(Some(n)) => Ok(Some(&self.buf[..n])),
            Ok(None) => Ok(None),
            Err(e) => {
                self.buf.clear();
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn read_segment(&mut self) -> Result<Option<usize>, SealError> {
        self.pos = 0;
        self.plain = 0;
        if self.done {
            return Ok(None);
        }
        let whole = self.segment_len + TAG_LEN;
        self.buf.clear();
        self.buf.extend(self.carry.take());
        // One byte more than a whole segment: whether it comes tells if this one is last.
        let want = (whole + 1 - self.buf.len()) as u64;
        (&mut self.inner).take(want).read_to_end(&mut self.buf)?;
        let last = self.buf.len() <= whole;
        if !last {
            self.carry = self.buf.pop();
        }
        if self.buf.len() < TAG_LEN {
            // Cut inside a tag, or at a segment boundary (the segment before it was not
            // sealed as the last).
            return Err(SealError::Authentication);
        }
        let nonce = segment_nonce(&self.prefix, self.index)?;
        let aad = self.aad.for_segment(self.index, last);
        let n = self
            .key
            .key
            .open_in_place(nonce, aad, &mut self.buf)
            .map_err(|_| SealError::Authentication)?
            .len();
        self.index += 1;
        self.done = last;
        self.plain = n;
        Ok(Some(n))
    }

    /// The inner reader (after the last segment: positioned at its end).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for SealReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.plain {
            if self.next_segment().map_err(io_error)?.is_none() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.plain - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Whether `bytes` start like a streamed sealed file (not whether they open).
pub fn is_stream_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(STREAM_MAGIC)
}

fn hex_digit(c: u8) -> Result<u8, SealError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(SealError::KeyNotHex),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAD: &[u8] = b"checkpoint/study-7/round-12";

    fn key(byte: u8) -> SealKey {
        SealKey::from_bytes(&[byte; KEY_LEN]).expect("key")
    }

    #[test]
    fn round_trip_and_fresh_nonces() {
        let k = key(7);
        let msg = b"weights: 0.25 0.5 0.75".repeat(100);
        let a = seal(&k, &msg, AAD).expect("seal");
        let b = seal(&k, &msg, AAD).expect("seal");
        assert_ne!(a, b, "each seal draws a fresh nonce");
        assert!(a.starts_with(MAGIC));
        assert_eq!(a.len(), HEADER_LEN + msg.len() + TAG_LEN);
        assert!(
            !a.windows(8).any(|w| w == b"weights:"),
            "ciphertext leaks plaintext"
        );
        assert_eq!(open(&k, &a, AAD).expect("open"), msg);
        assert_eq!(
            open(&k, &seal(&k, b"", AAD).expect("seal"), AAD).expect("open"),
            b""
        );
    }

    #[test]
    fn seal_append_keeps_what_was_there_and_opens_alike() {
        let k = key(7);
        let mut record = b"len:".to_vec();
        seal_append(&k, b"some values", AAD, &mut record).expect("seal");
        assert_eq!(&record[..4], b"len:");
        assert_eq!(record.len(), 4 + sealed_len(11));
        assert_eq!(open(&k, &record[4..], AAD).expect("open"), b"some values");
    }

    #[test]
    fn wrong_key_is_named() {
        let sealed = seal(&key(1), b"secret", AAD).expect("seal");
        let err = open(&key(2), &sealed, AAD).expect_err("wrong key");
        assert!(matches!(err, SealError::WrongKey { .. }), "{err}");
    }

    #[test]
    fn wrong_aad_fails() {
        let k = key(3);
        let sealed = seal(&k, b"secret", AAD).expect("seal");
        assert_eq!(
            open(&k, &sealed, b"checkpoint/study-7/round-13"),
            Err(SealError::Authentication)
        );
        assert_eq!(open(&k, &sealed, b""), Err(SealError::Authentication));
    }

    #[test]
    fn every_tampered_byte_fails() {
        let k = key(4);
        let sealed = seal(&k, b"0123456789abcdef", AAD).expect("seal");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            let err = open(&k, &bad, AAD).expect_err("tampered byte must fail");
            let expected = if i < MAGIC.len() {
                SealError::NotSealed
            } else if i < MAGIC.len() + KEY_ID_LEN {
                // A changed key id reads as another key; either way nothing decrypts.
                match err {
                    SealError::WrongKey { .. } => continue,
                    other => panic!("byte {i}: {other}"),
                }
            } else {
                SealError::Authentication
            };
            assert_eq!(err, expected, "byte {i}");
        }
    }

    #[test]
    fn truncation_fails() {
        let k = key(5);
        let sealed = seal(&k, b"0123456789abcdef", AAD).expect("seal");
        for len in 0..sealed.len() {
            let err = open(&k, &sealed[..len], AAD).expect_err("truncated must fail");
            assert!(
                matches!(
                    err,
                    SealError::NotSealed | SealError::Truncated { .. } | SealError::Authentication
                ),
                "len {len}: {err}"
            );
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(open(&k, &longer, AAD), Err(SealError::Authentication));
    }

    #[test]
    fn plaintext_is_not_sealed() {
        let err = open(&key(6), b"\x93NUMPY or safetensors bytes", AAD).expect_err("plain");
        assert_eq!(err, SealError::NotSealed);
    }

    #[test]
    fn key_material_parsing() {
        let hex_key = generate_key_hex().expect("rng");
        assert_eq!(hex_key.len(), 64);
        let a = SealKey::from_material(format!("  {hex_key}\n").as_bytes()).expect("parse");
        let b = SealKey::from_material(hex_key.to_uppercase().as_bytes()).expect("parse");
        assert_eq!(a.id_hex(), b.id_hex());
        let sealed = seal(&a, b"x", AAD).expect("seal");
        assert_eq!(open(&b, &sealed, AAD).expect("open"), b"x");

        assert_eq!(
            SealKey::from_material(&hex_key.as_bytes()[..32]).map(|_| ()),
            Err(SealError::KeyLength { got: 32 })
        );
        let mut not_hex = hex_key.clone().into_bytes();
        not_hex[10] = b'g';
        assert_eq!(
            SealKey::from_material(&not_hex).map(|_| ()),
            Err(SealError::KeyNotHex)
        );
        assert_eq!(
            SealKey::from_material("0".repeat(64).as_bytes()).map(|_| ()),
            Err(SealError::KeyAllZero)
        );
        // Raw bytes are not key material: only hex text is accepted.
        assert!(SealKey::from_material(&[0x41u8; 32]).is_err());
        // Debug never shows the key.
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains(&hex_key) && dbg.contains(&a.id_hex()),
            "{dbg}"
        );
    }

    // --- streamed format -------------------------------------------------------------

    const SEG: usize = 16;

    fn seal_stream(k: &SealKey, data: &[u8], purpose: &[u8], seg: usize) -> Vec<u8> {
        let mut w = SealWriter::with_segment_len(k, Vec::new(), purpose, seg).expect("writer");
        // Odd-sized writes, so segments never line up with the caller's pieces.
        for piece in data.chunks(7) {
            w.write_all(piece).expect("write");
        }
        w.finish().expect("finish")
    }

    /// Every segment's plaintext, checking each is whole (all but the last exactly `seg`).
    fn open_stream(k: &SealKey, sealed: &[u8], purpose: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut r = SealReader::new(k, sealed, purpose)?;
        let seg_len = r.segment_len;
        let mut out = Vec::new();
        let mut short = false;
        while let Some(seg) = r.next_segment()? {
            assert!(!short, "only the last segment may be short");
            short = seg.len() < seg_len;
            out.extend_from_slice(seg);
        }
        Ok(out)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn segments(sealed: &[u8], seg: usize) -> Vec<&[u8]> {
        sealed[STREAM_HEADER_LEN..].chunks(seg + TAG_LEN).collect()
    }

    #[test]
    fn stream_round_trips_at_every_size_around_segments() {
        let k = key(8);
        for n in [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG + 5, 10 * SEG] {
            let msg = data(n);
            let sealed = seal_stream(&k, &msg, AAD, SEG);
            assert!(is_stream_sealed(&sealed));
            let n_segments = n.div_ceil(SEG).max(1);
            assert_eq!(
                sealed.len(),
                STREAM_HEADER_LEN + n + n_segments * TAG_LEN,
                "size {n}"
            );
            assert_eq!(
                open_stream(&k, &sealed, AAD).expect("open"),
                msg,
                "size {n}"
            );
            // The `Read` view gives the same bytes.
            let mut via_read = Vec::new();
            SealReader::new(&k, &sealed[..], AAD)
                .expect("header")
                .read_to_end(&mut via_read)
                .expect("read");
            assert_eq!(via_read, msg, "size {n}");
        }
        // The default segment length, across a boundary.
        let msg = data(DEFAULT_SEGMENT_LEN + 1);
        let mut w = SealWriter::new(&k, Vec::new(), AAD).expect("writer");
        w.write_all(&msg).expect("write");
        let sealed = w.finish().expect("finish");
        assert_eq!(sealed.len(), STREAM_HEADER_LEN + msg.len() + 2 * TAG_LEN);
        assert!(
            !sealed.windows(64).any(|w| w == &msg[1000..1064]),
            "ciphertext leaks plaintext"
        );
        assert_eq!(open_stream(&k, &sealed, AAD).expect("open"), msg);
    }

    #[test]
    fn stream_with_another_key_or_purpose_fails() {
        let sealed = seal_stream(&key(9), &data(40), AAD, SEG);
        assert!(matches!(
            open_stream(&key(10), &sealed, AAD),
            Err(SealError::WrongKey { .. })
        ));
        assert_eq!(
            open_stream(&key(9), &sealed, b"checkpoint/study-7/round-13"),
            Err(SealError::Authentication)
        );
        // Neither format opens as the other.
        assert_eq!(open(&key(9), &sealed, AAD), Err(SealError::NotSealed));
        let whole = seal(&key(9), b"x", AAD).expect("seal");
        assert_eq!(open_stream(&key(9), &whole, AAD), Err(SealError::NotSealed));
    }

    #[test]
    fn stream_every_flipped_byte_fails() {
        let k = key(11);
        let sealed = seal_stream(&k, &data(3 * SEG + 5), AAD, SEG);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            let err = open_stream(&k, &bad, AAD).expect_err("a flipped byte must fail");
            let ok = if i < STREAM_MAGIC.len() {
                err == SealError::NotSealed
            } else if i < STREAM_MAGIC.len() + KEY_ID_LEN {
                matches!(err, SealError::WrongKey { .. })
            } else {
                err == SealError::Authentication
            };
            assert!(ok, "byte {i}: {err}");
        }
    }

    #[test]
    fn stream_truncated_anywhere_or_extended_fails() {
        let k = key(12);
        let sealed = seal_stream(&k, &data(3 * SEG), AAD, SEG);
        let boundaries: Vec<usize> = (1..=3)
            .map(|i| STREAM_HEADER_LEN + i * (SEG + TAG_LEN))
            .collect();
        for len in 0..sealed.len() {
            let err = open_stream(&k, &sealed[..len], AAD).expect_err("truncated must fail");
            assert!(
                matches!(
                    err,
                    SealError::NotSealed | SealError::Truncated { .. } | SealError::Authentication
                ),
                "len {len}: {err}"
            );
            // Cut exactly after a whole segment: that segment was not sealed as the last.
            if boundaries.contains(&len) {
                assert_eq!(err, SealError::Authentication, "boundary {len}");
            }
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(
            open_stream(&k, &longer, AAD),
            Err(SealError::Authentication)
        );
    }

    #[test]
    fn stream_dropped_swapped_or_foreign_segments_fail() {
        let k = key(13);
        let msg = data(3 * SEG + 5);
        let a = seal_stream(&k, &msg, AAD, SEG);
        let b = seal_stream(&k, &msg, AAD, SEG);
        let (head, sa, sb) = (
            &a[..STREAM_HEADER_LEN],
            segments(&a, SEG),
            segments(&b, SEG),
        );
        assert_eq!(sa.len(), 4);
        let build = |parts: &[&[u8]]| [&[head][..], parts].concat().concat();
        // Sanity: the pieces put back in order open.
        assert_eq!(open_stream(&k, &build(&sa), AAD).expect("open"), msg);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("first dropped", build(&[sa[1], sa[2], sa[3]])),
            ("middle dropped", build(&[sa[0], sa[2], sa[3]])),
            ("last dropped", build(&[sa[0], sa[1], sa[2]])),
            ("swapped", build(&[sa[1], sa[0], sa[2], sa[3]])),
            ("duplicated", build(&[sa[0], sa[0], sa[1], sa[2], sa[3]])),
            ("from another file", build(&[sa[0], sb[1], sa[2], sa[3]])),
            (
                "last from another file",
                build(&[sa[0], sa[1], sa[2], sb[3]]),
            ),
        ];
        for (what, bytes) in cases {
            assert_eq!(
                open_stream(&k, &bytes, AAD),
                Err(SealError::Authentication),
                "{what}"
            );
        }
    }

    #[test]
    fn stream_reader_stays_failed_after_an_error() {
        let k = key(14);
        let mut sealed = seal_stream(&k, &data(3 * SEG), AAD, SEG);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        let mut r = SealReader::new(&k, &sealed[..], AAD).expect("header");
        let mut got = 0;
        let err = loop {
            match r.next_segment() {
                Ok(Some(seg)) => got += seg.len(),
                Ok(None) => panic!("a damaged stream ended cleanly"),
                Err(e) => break e,
            }
        };
        assert_eq!((got, err), (2 * SEG, SealError::Authentication));
        assert_eq!(r.next_segment(), Err(SealError::Authentication));
        // Through `Read`, the error keeps its kind and comes back as the SealError.
        let mut r = SealReader::new(&k, &sealed[..], AAD).expect("header");
        let e = r.read_to_end(&mut Vec::new()).expect_err("damaged");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(SealError::from(e), SealError::Authentication);
        // A writer dropped before `finish` leaves nothing that opens.
        let mut w = SealWriter::with_segment_len(&k, Vec::new(), AAD, SEG).expect("writer");
        w.write_all(&data(2 * SEG + 1)).expect("write");
        assert!(!w.buf.is_empty());
        let partial = std::mem::take(&mut w.inner);
        assert_eq!(
            open_stream(&k, &partial, AAD),
            Err(SealError::Authentication)
        );
    }
}
