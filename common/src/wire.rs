//! The wire format between coordinator and sites, sans-IO (no sockets, no async runtime).
//!
//! Two kinds of payload travel on a QUIC stream:
//!
//! - **Control frames**: a 4-byte little-endian length, then that many bytes of postcard.
//!   The length is capped at [`MAX_CONTROL_FRAME`] and the cap is checked on the prefix
//!   alone ([`frame_len`]), before the reader allocates anything.
//! - **Tensor bodies**: after a control message that carries a [`TensorHeader`], the raw
//!   little-endian values of every tensor, in header order, with nothing in between. The
//!   receiver checks the header against the study's model ([`TensorHeader::check_against`])
//!   before it reads one byte of body, then pushes the bytes through a
//!   [`TensorBodyDecoder`], which hands out values chunk by chunk and never buffers more
//!   than one partial value.
//!
//! The protocol version is the ALPN string ([`ALPN`]); a peer that speaks another version
//! fails the TLS handshake (or is closed with [`CloseCode::BadVersion`]).
//!
//! Every [`WireError`] that a decoder returns is the peer's fault: the bytes came from the
//! other side. Encoders return [`WireError::Internal`] when *our* message breaks a limit.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::model::{ModelSpec, TensorSpec, MAX_MODEL_VALUES};

/// ALPN protocol id; the `/1` is the wire protocol version.
pub const ALPN: &[u8] = b"fedpriv/1";

/// Largest control frame payload (bytes, without the 4-byte prefix).
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

/// Bytes of the length prefix in front of every control frame.
pub const FRAME_PREFIX_LEN: usize = 4;

/// Values the decoder converts at once when the input is not 4-byte aligned (64 KiB of
/// scratch, allocated once per decoder, whatever the header claims).
const SCRATCH_VALUES: usize = 16 * 1024;

/// Errors of the wire layer. Decoder errors mean the peer sent bad bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("peer error: frame of {len} bytes is over the cap of {cap} bytes")]
    Oversized { len: u64, cap: usize },
    #[error("peer error: frame truncated: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("peer error: {extra} unexpected bytes after the end of the frame")]
    TrailingBytes { extra: usize },
    #[error("peer error: malformed frame: {0}")]
    Malformed(String),
    #[error("peer error: tensor header does not match the study's model: {0}")]
    HeaderMismatch(String),
    #[error("peer error: tensor dtype {0:?} is not supported (only f32 for now)")]
    UnsupportedDtype(Dtype),
    #[error("peer error: tensor body is longer than its header's {expected_bytes} bytes")]
    BodyTooLong { expected_bytes: u64 },
    #[error("peer error: tensor body ended after {got_bytes} of {expected_bytes} bytes")]
    BodyTooShort { expected_bytes: u64, got_bytes: u64 },
    #[error(
        "peer error: peer speaks protocol {got:?}, we speak {:?}",
        String::from_utf8_lossy(ALPN)
    )]
    BadVersion { got: String },
    #[error("peer error: value {index} is NaN or infinite")]
    NonFinite { index: usize },
    #[error("internal error: {0}")]
    Internal(String),
}

impl WireError {
    /// True when the bytes came from the peer and are wrong (as opposed to our own bug).
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, WireError::Internal(_))
    }

    /// The close / stop code a transport should send the peer for this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            WireError::BadVersion { .. } => CloseCode::BadVersion,
            WireError::Internal(_) => CloseCode::Internal,
            _ => CloseCode::ProtocolViolation,
        }
    }
}

/// Application error codes sent in QUIC CONNECTION_CLOSE / STOP_SENDING frames, so a peer
/// (and its operator) learns why it was closed. The reason bytes carry the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly shutdown.
    Normal = 0,
    /// The certificate carries no valid fedpriv identity.
    NotAuthenticated = 1,
    /// The identity is valid but its role may not do this.
    RoleNotAllowed = 2,
    /// A message claims an identity other than the certificate's.
    IdentityMismatch = 3,
    /// Malformed, oversized or inconsistent bytes.
    ProtocolViolation = 4,
    /// Another protocol version.
    BadVersion = 5,
    /// Our own failure; the peer may retry.
    Internal = 6,
    /// A limit was reached (connections of one identity, a round's upload allowance); the
    /// reason names it. Not a protocol error: the peer may try again later.
    Limit = 7,
}

impl CloseCode {
    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => CloseCode::Normal,
            1 => CloseCode::NotAuthenticated,
            2 => CloseCode::RoleNotAllowed,
            3 => CloseCode::IdentityMismatch,
            4 => CloseCode::ProtocolViolation,
            5 => CloseCode::BadVersion,
            6 => CloseCode::Internal,
            7 => CloseCode::Limit,
            _ => return None,
        })
    }
}

/// Checks the negotiated ALPN protocol.
pub fn check_alpn(negotiated: Option<&[u8]>) -> Result<(), WireError> {
    match negotiated {
        Some(p) if p == ALPN => Ok(()),
        Some(p) => Err(WireError::BadVersion {
            got: String::from_utf8_lossy(p).into_owned(),
        }),
        None => Err(WireError::BadVersion {
            got: "(none)".to_owned(),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Control frames

/// Serialises `msg` as one frame: 4-byte little-endian length, then postcard.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; FRAME_PREFIX_LEN];
    out = postcard::to_extend(msg, out)
        .map_err(|e| WireError::Internal(format!("cannot encode message: {e}")))?;
    let len = out.len() - FRAME_PREFIX_LEN;
    if len > MAX_CONTROL_FRAME {
        return Err(WireError::Internal(format!(
            "message of {len} bytes is over the control frame cap of {MAX_CONTROL_FRAME}"
        )));
    }
    // Cannot fail: len <= MAX_CONTROL_FRAME < u32::MAX.
    let len32 = u32::try_from(len).map_err(|_| WireError::Internal("frame length".into()))?;
    out[..FRAME_PREFIX_LEN].copy_from_slice(&len32.to_le_bytes());
    Ok(out)
}

/// Payload length announced by a frame prefix; refuses it if over the cap, so the caller
/// never allocates a peer-chosen size.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix);
    if len as u64 > MAX_CONTROL_FRAME as u64 {
        return Err(WireError::Oversized {
            len: len.into(),
            cap: MAX_CONTROL_FRAME,
        });
    }
    Ok(len as usize)
}

/// Decodes one whole frame (prefix and payload); the slice must hold exactly one frame.
pub fn decode_frame<T: DeserializeOwned>(frame: &[u8]) -> Result<T, WireError> {
    let Some((prefix, payload)) = frame.split_first_chunk::<FRAME_PREFIX_LEN>() else {
        return Err(WireError::Truncated {
            expected: FRAME_PREFIX_LEN,
            got: frame.len(),
        });
    };
    let len = frame_len(*prefix)?;
    if payload.len() < len {
        return Err(WireError::Truncated {
            expected: len,
            got: payload.len(),
        });
    }
    if payload.len() > len {
        return Err(WireError::TrailingBytes {
            extra: payload.len() - len,
        });
    }
    decode_payload(payload)
}

/// Decodes a frame's payload (the bytes after the prefix); every byte must be used.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    if payload.len() > MAX_CONTROL_FRAME {
        return Err(WireError::Oversized {
            len: payload.len() as u64,
            cap: MAX_CONTROL_FRAME,
        });
    }
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => WireError::Truncated {
            expected: payload.len() + 1,
            got: payload.len(),
        },
        other => WireError::Malformed(other.to_string()),
    })?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

// ---------------------------------------------------------------------------------------
// Tensors

/// Element type of a tensor body.
///
/// The 16-bit types halve the bytes on the wire. They are accepted only where a caller
/// opts in ([`TensorHeader::check_against_accepting`]); [`TensorHeader::check_against`]
/// and [`TensorBodyDecoder::new`] accept f32 alone. Encoding to them rounds to nearest
/// (ties to even) and saturates finite values at the type's largest finite value, so a
/// finite model or update never becomes infinite on the wire. For already-noised updates
/// this is post-processing: it costs no privacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    F32,
    /// IEEE 754 binary16: 10-bit mantissa, finite range +-65504 (saturated beyond).
    F16,
    /// bfloat16: f32's exponent range with a 7-bit mantissa.
    Bf16,
}

impl Dtype {
    /// Every supported dtype.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// Bytes per value.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// The configuration spelling: `f32`, `f16`, `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Parses the configuration spelling.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == name)
    }
}

/// f32 to bfloat16 bits: round to nearest, ties to even; NaN stays NaN; finite values
/// beyond bfloat16's largest finite value saturate to it.
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    let h = (bits.wrapping_add(0x7fff + lsb) >> 16) as u16;
    if x.is_finite() && h & 0x7fff == 0x7f80 {
        // Rounded up to infinity: keep it finite.
        return (h & 0x8000) | 0x7f7f;
    }
    h
}

/// bfloat16 bits to f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 to IEEE binary16 bits: round to nearest, ties to even (subnormals included); NaN
/// stays NaN; finite values beyond +-65504 saturate to it.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign
            | 0x7c00
            | if man != 0 {
                0x0200 | (man >> 13) as u16
            } else {
                0
            };
    }
    let e = exp - 127;
    if e > 15 {
        return sign | 0x7bff;
    }
    if e >= -14 {
        let mut h_exp = (e + 15) as u32;
        let mut h_man = man >> 13;
        let rest = man & 0x1fff;
        if rest > 0x1000 || (rest == 0x1000 && h_man & 1 == 1) {
            h_man += 1;
            if h_man == 0x400 {
                h_man = 0;
                h_exp += 1;
            }
        }
        if h_exp >= 31 {
            return sign | 0x7bff;
        }
        return sign | (h_exp << 10) as u16 | h_man as u16;
    }
    if e < -25 {
        // Below half the smallest subnormal (2^-25): zero.
        return sign;
    }
    // A subnormal: the significand (with its implicit bit) in units of 2^-24.
    let full = man | 0x80_0000;
    let shift = (-14 - e) as u32 + 13;
    let h_man = full >> shift;
    let rest = full & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let r = if rest > half || (rest == half && h_man & 1 == 1) {
        h_man + 1
    } else {
        h_man
    };
    // r may reach 0x400: the smallest normal, which is exactly its encoding.
    sign | r as u16
}

/// IEEE binary16 bits to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    match exp {
        0 => {
            // Zero or subnormal: man * 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            f32::from_bits(v.to_bits() | sign)
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// `values` encoded as a tensor body in `dtype` (borrowed for f32 on little-endian
/// targets; a new buffer of 2 bytes per value for the 16-bit types).
pub fn encode_body(values: &[f32], dtype: Dtype) -> std::borrow::Cow<'_, [u8]> {
    match dtype {
        Dtype::F32 => f32_body_bytes(values),
        Dtype::F16 | Dtype::Bf16 => {
            let mut out = vec![0u8; values.len() * 2];
            encode_16_into(values, dtype, &mut out);
            std::borrow::Cow::Owned(out)
        }
    }
}

/// Encodes `values` in a 16-bit `dtype` into `out` (2 bytes per value, little-endian).
pub fn encode_16_into(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    // One loop per conversion (not a function pointer) so that each inlines.
    fn each(values: &[f32], out: &mut [u8], conv: impl Fn(f32) -> u16) {
        for (o, &v) in out.chunks_exact_mut(2).zip(values) {
            o.copy_from_slice(&conv(v).to_le_bytes());
        }
    }
    if dtype == Dtype::F16 {
        each(values, out, f32_to_f16);
    } else {
        each(values, out, f32_to_bf16);
    }
}

/// Decodes little-endian 16-bit values of `dtype` from `bytes` into `out`.
fn decode_16_into(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    fn each(bytes: &[u8], out: &mut [f32], conv: impl Fn(u16) -> f32) {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = conv(u16::from_le_bytes([b[0], b[1]]));
        }
    }
    if dtype == Dtype::F16 {
        each(bytes, out, f16_to_f32);
    } else {
        each(bytes, out, bf16_to_f32);
    }
}

/// Describes the tensor body that follows a control message: names and shapes in order,
/// the element type, and the total number of values (redundant, checked, so that a
/// mismatch between the shapes and the announced size is caught early).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorHeader {
    pub tensors: Vec<TensorSpec>,
    pub dtype: Dtype,
    pub num_values: u64,
}

impl TensorHeader {
    /// The header for a body of `spec`'s values in `dtype`.
    pub fn for_spec(spec: &ModelSpec, dtype: Dtype) -> Self {
        let num_values = spec
            .tensors
            .iter()
            .try_fold(0u64, |acc, t| t.numel().and_then(|n| acc.checked_add(n)))
            // An unvalidated, overflowing spec gets a count that check_against refuses.
            .unwrap_or(u64::MAX);
        Self {
            tensors: spec.tensors.clone(),
            dtype,
            num_values,
        }
    }

    /// Body length in bytes, or an error if it overflows or breaks the model size limit.
    pub fn body_len_bytes(&self) -> Result<u64, WireError> {
        if self.num_values > MAX_MODEL_VALUES {
            return Err(WireError::HeaderMismatch(format!(
                "header claims {} values, over the limit of {MAX_MODEL_VALUES}",
                self.num_values
            )));
        }
        self.num_values
            .checked_mul(self.dtype.size())
            .ok_or_else(|| WireError::HeaderMismatch("body length overflows".into()))
    }

    /// Checks that this header describes exactly `spec` (same tensors, order, shapes,
    /// count) in f32. The error names the first difference.
    pub fn check_against(&self, spec: &ModelSpec) -> Result<(), WireError> {
        self.check_against_accepting(spec, &[Dtype::F32])
    }

    /// As [`TensorHeader::check_against`], accepting any dtype in `accepted`.
    pub fn check_against_accepting(
        &self,
        spec: &ModelSpec,
        accepted: &[Dtype],
    ) -> Result<(), WireError> {
        if !accepted.contains(&self.dtype) {
            return Err(WireError::UnsupportedDtype(self.dtype));
        }
        if self.tensors.len() != spec.tensors.len() {
            return Err(WireError::HeaderMismatch(format!(
                "header has {} tensors, the model has {}",
                self.tensors.len(),
                spec.tensors.len()
            )));
        }
        for (i, (got, want)) in self.tensors.iter().zip(&spec.tensors).enumerate() {
            if got.name != want.name {
                return Err(WireError::HeaderMismatch(format!(
                    "tensor {i} is named {:?}, the model expects {:?}",
                    truncate_for_log(&got.name),
                    want.name
                )));
            }
            if got.shape != want.shape {
                return Err(WireError::HeaderMismatch(format!(
                    "tensor {:?} has shape {:?}, the model expects {:?}",
                    want.name,
                    ShapeForLog(&got.shape),
                    want.shape
                )));
            }
        }
        let expected = spec
            .validate()
            .map_err(|e| WireError::Internal(format!("study model spec is invalid: {e}")))?;
        if self.num_values != expected {
            return Err(WireError::HeaderMismatch(format!(
                "header claims {} values, the model has {expected}",
                self.num_values
            )));
        }
        self.body_len_bytes()?;
        Ok(())
    }
}

/// Peer-chosen strings in error messages are cut short (they end up in logs).
fn truncate_for_log(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Peer-chosen shapes in error messages are cut short too.
struct ShapeForLog<'a>(&'a [u64]);

impl std::fmt::Debug for ShapeForLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MAX: usize = 8;
        let mut list = f.debug_list();
        list.entries(self.0.iter().take(MAX));
        if self.0.len() > MAX {
            list.entry(&format_args!("… ({} dims)", self.0.len()));
        }
        list.finish()
    }
}

/// The bytes of a tensor body for `values` (borrowed on little-endian targets).
pub fn f32_body_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    }
    #[cfg(not(target_endian = "little"))]
    {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Incremental, sans-IO decoder of one tensor body. Feed it the bytes as they arrive, in
/// any chunking; it calls the sink with `(offset in values, values)` (as f32, whatever the
/// wire dtype) and keeps at most one partial value between calls. It never allocates
/// anything sized by the header.
#[derive(Debug)]
pub struct TensorBodyDecoder {
    dtype: Dtype,
    expected_bytes: u64,
    received_bytes: u64,
    /// The bytes of a value split across two chunks.
    carry: [u8; 4],
    carry_len: usize,
    /// Values emitted so far (the offset of the next value).
    next_value: usize,
    /// Aligned staging area for unaligned input; fixed size.
    scratch: Vec<f32>,
}

impl TensorBodyDecoder {
    /// A decoder for the f32 body `header` announces; checks the header against `spec`
    /// first.
    pub fn new(header: &TensorHeader, spec: &ModelSpec) -> Result<Self, WireError> {
        Self::new_accepting(header, spec, &[Dtype::F32])
    }

    /// As [`TensorBodyDecoder::new`], for a body in any dtype in `accepted`.
    pub fn new_accepting(
        header: &TensorHeader,
        spec: &ModelSpec,
        accepted: &[Dtype],
    ) -> Result<Self, WireError> {
        header.check_against_accepting(spec, accepted)?;
        let expected_bytes = header.body_len_bytes()?;
        Ok(Self {
            dtype: header.dtype,
            expected_bytes,
            received_bytes: 0,
            carry: [0; 4],
            carry_len: 0,
            next_value: 0,
            scratch: Vec::new(),
        })
    }

    /// Bytes still expected.
    pub fn remaining_bytes(&self) -> u64 {
        self.expected_bytes - self.received_bytes
    }

    /// True once every byte of the body arrived.
    pub fn is_complete(&self) -> bool {
        self.received_bytes == self.expected_bytes
    }

    /// Consumes the next bytes of the body. Errors (without consuming anything) if they
    /// go past the end the header announced.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        sink: &mut impl FnMut(usize, &[f32]),
    ) -> Result<(), WireError> {
        if bytes.len() as u64 > self.remaining_bytes() {
            return Err(WireError::BodyTooLong {
                expected_bytes: self.expected_bytes,
            });
        }
        self.received_bytes += bytes.len() as u64;

        let size = self.dtype.size() as usize;
        // Complete a value split by the previous chunk boundary.
        if self.carry_len > 0 {
            let take = (size - self.carry_len).min(bytes.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
            self.carry_len += take;
            bytes = &bytes[take..];
            if self.carry_len < size {
                return Ok(());
            }
            self.carry_len = 0;
            let v = match self.dtype {
                Dtype::F32 => f32::from_le_bytes(self.carry),
                Dtype::F16 => f16_to_f32(u16::from_le_bytes([self.carry[0], self.carry[1]])),
                Dtype::Bf16 => bf16_to_f32(u16::from_le_bytes([self.carry[0], self.carry[1]])),
            };
            sink(self.next_value, &[v]);
            self.next_value += 1;
        }

        let whole = bytes.len() / size * size;
        let (body, tail) = bytes.split_at(whole);
        if self.dtype == Dtype::F32 {
            self.emit_aligned(body, sink);
        } else {
            self.emit_16(body, sink);
        }

        self.carry[..tail.len()].copy_from_slice(tail);
        self.carry_len = tail.len();
        Ok(())
    }

    /// Emits `body` (a multiple of 4 bytes) as values, zero-copy when it is aligned.
    fn emit_aligned(&mut self, body: &[u8], sink: &mut impl FnMut(usize, &[f32])) {
        if body.is_empty() {
            return;
        }
        #[cfg(target_endian = "little")]
        if let Ok(values) = bytemuck::try_cast_slice::<u8, f32>(body) {
            sink(self.next_value, values);
            self.next_value += values.len();
            return;
        }
        if self.scratch.is_empty() {
            self.scratch = vec![0.0; SCRATCH_VALUES];
        }
        for chunk in body.chunks(SCRATCH_VALUES * 4) {
            let n = chunk.len() / 4;
            let out = &mut self.scratch[..n];
            #[cfg(target_endian = "little")]
            bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(chunk);
            #[cfg(not(target_endian = "little"))]
            for (o, b) in out.iter_mut().zip(chunk.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            sink(self.next_value, out);
            self.next_value += n;
        }
    }

    /// Emits `body` (a multiple of 2 bytes of f16 or bf16) as f32 values.
    fn emit_16(&mut self, body: &[u8], sink: &mut impl FnMut(usize, &[f32])) {
        if body.is_empty() {
            return;
        }
        if self.scratch.is_empty() {
            self.scratch = vec![0.0; SCRATCH_VALUES];
        }
        for chunk in body.chunks(SCRATCH_VALUES * 2) {
            let n = chunk.len() / 2;
            let out = &mut self.scratch[..n];
            decode_16_into(chunk, self.dtype, out);
            sink(self.next_value, out);
            self.next_value += n;
        }
    }

    /// Call when the stream ended; errors if the body is shorter than announced.
    pub fn finish(self) -> Result<(), WireError> {
        if !self.is_complete() {
            return Err(WireError::BodyTooShort {
                expected_bytes: self.expected_bytes,
                got_bytes: self.received_bytes,
            });
        }
        Ok(())
    }
}

/// Refuses NaN and infinities (the aggregator calls this on every update).
pub fn check_finite(values: &[f32]) -> Result<(), WireError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(WireError::NonFinite { index }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { name: String, version: u32 },
        Blob(Vec<u8>),
        Update { round: u64, header: TensorHeader },
    }

    fn spec() -> ModelSpec {
        ModelSpec::new(vec![
            TensorSpec::new("w", &[3, 5]),
            TensorSpec::new("b", &[5]),
            TensorSpec::new("scale", &[1]),
        ])
        .expect("valid spec")
    }

    /// Small deterministic generator (xorshift) so the property loops need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn frame_round_trip() {
        let msg = Msg::Hello {
            name: "st-marys".into(),
            version: 1,
        };
        let frame = encode_frame(&msg).expect("encodes");
        assert_eq!(
            frame_len(frame[..4].try_into().expect("4 bytes")),
            Ok(frame.len() - 4)
        );
        assert_eq!(decode_frame::<Msg>(&frame), Ok(msg));
        let header = Msg::Update {
            round: 7,
            header: TensorHeader::for_spec(&spec(), Dtype::F32),
        };
        let frame = encode_frame(&header).expect("encodes");
        assert_eq!(decode_frame::<Msg>(&frame), Ok(header));
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let big = Msg::Blob(vec![7; MAX_CONTROL_FRAME]);
        assert!(matches!(encode_frame(&big), Err(WireError::Internal(_))));
        let just = Msg::Blob(vec![7; MAX_CONTROL_FRAME - 8]);
        assert!(encode_frame(&just).is_ok());
        // A prefix claiming 4 GB is refused from the prefix alone.
        assert_eq!(
            frame_len([0xff; 4]),
            Err(WireError::Oversized {
                len: u32::MAX.into(),
                cap: MAX_CONTROL_FRAME
            })
        );
        let mut claim = u32::MAX.to_le_bytes().to_vec();
        claim.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode_frame::<Msg>(&claim),
            Err(WireError::Oversized { .. })
        ));
        assert_eq!(
            frame_len((MAX_CONTROL_FRAME as u32).to_le_bytes()),
            Ok(MAX_CONTROL_FRAME)
        );
        assert!(frame_len((MAX_CONTROL_FRAME as u32 + 1).to_le_bytes()).is_err());
    }

    #[test]
    fn truncated_trailing_and_malformed_frames_are_refused() {
        let frame = encode_frame(&Msg::Hello {
            name: "a".into(),
            version: 1,
        })
        .expect("encodes");
        for cut in 0..frame.len() {
            let err = decode_frame::<Msg>(&frame[..cut]).expect_err("truncated");
            assert!(matches!(err, WireError::Truncated { .. }), "{cut}: {err}");
            assert!(err.is_peer_fault());
        }
        let mut long = frame.clone();
        long.push(0);
        assert_eq!(
            decode_frame::<Msg>(&long),
            Err(WireError::TrailingBytes { extra: 1 })
        );
        // Payload with bytes postcard does not consume: prefix covers them.
        let mut inner = frame.clone();
        inner.push(9);
        let len = (inner.len() - 4) as u32;
        inner[..4].copy_from_slice(&len.to_le_bytes());
        assert_eq!(
            decode_frame::<Msg>(&inner),
            Err(WireError::TrailingBytes { extra: 1 })
        );
        // Unknown enum variant.
        let bad = [1, 0, 0, 0, 9];
        assert!(matches!(
            decode_frame::<Msg>(&bad),
            Err(WireError::Malformed(_))
        ));
        // A string length far beyond the frame: refused, not allocated.
        let mut lie = vec![0u8];
        lie.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut f = (lie.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&lie);
        assert!(decode_frame::<Msg>(&f).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = rng.below(64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len >= 4 && rng.below(2) == 0 {
                let l = (len - 4) as u32;
                bytes[..4].copy_from_slice(&l.to_le_bytes());
            }
            let _ = decode_frame::<Msg>(&bytes);
            let _ = decode_frame::<TensorHeader>(&bytes);
        }
    }

    #[test]
    fn header_checks_name_every_difference() {
        let spec = spec();
        let ok = TensorHeader::for_spec(&spec, Dtype::F32);
        assert_eq!(ok.num_values, 21);
        assert_eq!(ok.body_len_bytes(), Ok(84));
        assert_eq!(ok.check_against(&spec), Ok(()));

        let mut h = ok.clone();
        h.tensors.pop();
        let e = h.check_against(&spec).expect_err("count");
        assert!(e.to_string().contains("2 tensors, the model has 3"), "{e}");

        let mut h = ok.clone();
        h.tensors.swap(0, 1);
        let e = h.check_against(&spec).expect_err("order");
        assert!(e.to_string().contains("tensor 0 is named \"b\""), "{e}");

        let mut h = ok.clone();
        h.tensors[0].shape = vec![5, 3];
        let e = h.check_against(&spec).expect_err("shape");
        assert!(e.to_string().contains("shape [5, 3]"), "{e}");

        let mut h = ok.clone();
        h.num_values = 20;
        let e = h.check_against(&spec).expect_err("count");
        assert!(e.to_string().contains("claims 20 values"), "{e}");

        let mut h = ok.clone();
        h.num_values = u64::MAX;
        assert!(h.body_len_bytes().is_err());
        assert!(h.check_against(&spec).is_err());

        let h = TensorHeader::for_spec(&spec, Dtype::F16);
        assert_eq!(
            h.check_against(&spec),
            Err(WireError::UnsupportedDtype(Dtype::F16))
        );
        // Accepted only where the caller opts in.
        assert_eq!(h.check_against_accepting(&spec, &Dtype::ALL), Ok(()));
        assert_eq!(h.body_len_bytes(), Ok(42));
        assert_eq!(
            TensorHeader::for_spec(&spec, Dtype::Bf16)
                .check_against_accepting(&spec, &[Dtype::F16]),
            Err(WireError::UnsupportedDtype(Dtype::Bf16))
        );
        let mut long = ok.clone();
        long.tensors[0].name = "x".repeat(10_000);
        let e = long.check_against(&spec).expect_err("name").to_string();
        assert!(
            e.len() < 300,
            "peer string not truncated: {} bytes",
            e.len()
        );
    }

    fn decode_all(spec: &ModelSpec, bytes: &[u8], splits: &[usize]) -> Result<Vec<f32>, WireError> {
        let header = TensorHeader::for_spec(spec, Dtype::F32);
        let mut dec = TensorBodyDecoder::new(&header, spec)?;
        let mut out = vec![f32::NAN; spec.num_values()];
        let mut seen = 0usize;
        let mut sink = |off: usize, vals: &[f32]| {
            assert_eq!(off, seen, "offsets are contiguous");
            out[off..off + vals.len()].copy_from_slice(vals);
            seen += vals.len();
        };
        let mut start = 0;
        for &end in splits {
            dec.feed(&bytes[start..end], &mut sink)?;
            start = end;
        }
        dec.feed(&bytes[start..], &mut sink)?;
        dec.finish()?;
        Ok(out)
    }

    #[test]
    fn body_decodes_under_random_chunk_splits() {
        let spec = spec();
        let values: Vec<f32> = (0..spec.num_values())
            .map(|i| i as f32 * 0.5 - 3.0)
            .collect();
        // Offset by one byte so that the decoder sees unaligned input too.
        let mut buf = vec![0u8];
        buf.extend_from_slice(&f32_body_bytes(&values));
        let bytes = &buf[1..];
        let mut rng = Rng(42);
        for _ in 0..2_000 {
            let cuts = rng.below(12);
            let mut splits: Vec<usize> = (0..cuts).map(|_| rng.below(bytes.len() + 1)).collect();
            splits.sort_unstable();
            assert_eq!(decode_all(&spec, bytes, &splits), Ok(values.clone()));
        }
        // Byte by byte.
        let all: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(decode_all(&spec, bytes, &all), Ok(values.clone()));
        // Aligned, one piece (zero-copy path).
        let aligned = f32_body_bytes(&values);
        assert_eq!(decode_all(&spec, &aligned, &[]), Ok(values));
    }

    #[test]
    fn body_length_errors() {
        let spec = spec();
        let values = vec![1.0f32; spec.num_values()];
        let bytes = f32_body_bytes(&values).into_owned();
        let mut rng = Rng(7);
        for _ in 0..500 {
            // Short: finish() refuses, whatever the chunking.
            let short = rng.below(bytes.len());
            let split = rng.below(short + 1);
            let e = decode_all(&spec, &bytes[..short], &[split]).expect_err("short");
            assert_eq!(
                e,
                WireError::BodyTooShort {
                    expected_bytes: 84,
                    got_bytes: short as u64
                }
            );
            // Long: feed() refuses the chunk that crosses the end.
            let mut long = bytes.clone();
            long.extend((0..1 + rng.below(9)).map(|_| 0u8));
            let split = rng.below(long.len() + 1);
            let e = decode_all(&spec, &long, &[split]).expect_err("long");
            assert_eq!(e, WireError::BodyTooLong { expected_bytes: 84 });
        }
    }

    #[test]
    fn decoder_refuses_mismatched_headers_and_never_sizes_by_claim() {
        let spec = spec();
        let mut h = TensorHeader::for_spec(&spec, Dtype::F32);
        h.tensors[1].shape = vec![1 << 40];
        assert!(TensorBodyDecoder::new(&h, &spec).is_err());
        // A valid header for a huge model: the decoder holds no buffer sized by it.
        let huge = ModelSpec::new(vec![TensorSpec::new("w", &[1 << 30])]).expect("valid");
        let h = TensorHeader::for_spec(&huge, Dtype::F32);
        let mut dec = TensorBodyDecoder::new(&h, &huge).expect("matches");
        assert_eq!(dec.remaining_bytes(), 4 << 30);
        assert!(dec.scratch.capacity() <= SCRATCH_VALUES);
        let mut n = 0;
        dec.feed(&[0u8; 13][1..], &mut |_, v: &[f32]| n += v.len())
            .expect("feeds");
        assert_eq!(n, 3);
        assert!(dec.scratch.capacity() <= SCRATCH_VALUES);
        assert!(matches!(dec.finish(), Err(WireError::BodyTooShort { .. })));
    }

    #[test]
    fn finite_check_and_alpn() {
        assert_eq!(check_finite(&[1.0, 2.0]), Ok(()));
        assert_eq!(
            check_finite(&[1.0, f32::INFINITY, f32::NAN]),
            Err(WireError::NonFinite { index: 1 })
        );
        assert_eq!(check_alpn(Some(ALPN)), Ok(()));
        assert!(matches!(
            check_alpn(Some(b"fedpriv/2")),
            Err(WireError::BadVersion { .. })
        ));
        assert!(check_alpn(None).is_err());
        assert_eq!(CloseCode::from_code(3), Some(CloseCode::IdentityMismatch));
        assert_eq!(CloseCode::from_code(99), None);
    }

    #[test]
    fn f16_round_trips_every_value_and_rounds_to_nearest_even() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f32_to_f16(x) & 0x7c00 == 0x7c00 && f32_to_f16(x) & 0x3ff != 0);
                continue;
            }
            assert_eq!(f32_to_f16(x), h, "{h:#06x} -> {x}");
        }
        // Against a reference: the nearest of the two f16 neighbours, ties to even.
        let mut rng = Rng(11);
        for _ in 0..200_000 {
            let x = f32::from_bits(rng.next() as u32);
            if !x.is_finite() || x.abs() > 65504.0 {
                continue;
            }
            let h = f32_to_f16(x);
            let y = f64::from(f16_to_f32(h));
            let err = (f64::from(x) - y).abs();
            for n in [h.wrapping_add(1), h.wrapping_sub(1), h ^ 0x8000] {
                let z = f16_to_f32(n);
                if z.is_finite() {
                    let other = (f64::from(x) - f64::from(z)).abs();
                    assert!(
                        err < other || (err == other && h & 1 == 0),
                        "{x}: {h:#06x} vs {n:#06x}"
                    );
                }
            }
        }
        // Ties: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10 and goes to the even one.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        // Subnormals, the smallest one's half (a tie to zero) and just above it.
        assert_eq!(f32_to_f16(2f32.powi(-24)), 0x0001);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.000_001), 0x0001);
        assert_eq!(f32_to_f16(-2f32.powi(-30)), 0x8000);
        // Saturation: finite stays finite, infinity stays infinite.
        assert_eq!(f32_to_f16(1e6), 0x7bff);
        assert_eq!(f32_to_f16(-65520.0), 0xfbff);
        assert_eq!(f32_to_f16(f32::INFINITY), 0x7c00);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }

    #[test]
    fn bf16_round_trips_every_value_and_rounds_to_nearest_even() {
        for h in 0..=u16::MAX {
            let x = bf16_to_f32(h);
            if x.is_nan() {
                assert!(bf16_to_f32(f32_to_bf16(x)).is_nan());
                continue;
            }
            assert_eq!(f32_to_bf16(x), h, "{h:#06x}");
        }
        let mut rng = Rng(12);
        for _ in 0..200_000 {
            let x = f32::from_bits(rng.next() as u32);
            if !x.is_finite() || x.abs() > bf16_to_f32(0x7f7f) {
                continue;
            }
            let h = f32_to_bf16(x);
            let err = (f64::from(x) - f64::from(bf16_to_f32(h))).abs();
            for n in [h.wrapping_add(1), h.wrapping_sub(1)] {
                let z = bf16_to_f32(n);
                if z.is_finite() && (z < 0.0) == (x < 0.0) {
                    let other = (f64::from(x) - f64::from(z)).abs();
                    assert!(err < other || (err == other && h & 1 == 0), "{x}");
                }
            }
        }
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f7f);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        assert_eq!(bf16_to_f32(f32_to_bf16(1.5)), 1.5);
    }

    #[test]
    fn sixteen_bit_bodies_decode_under_random_chunk_splits() {
        let spec = spec();
        let values: Vec<f32> = (0..spec.num_values())
            .map(|i| i as f32 * 0.37 - 3.0)
            .collect();
        for dtype in [Dtype::F16, Dtype::Bf16] {
            let conv = if dtype == Dtype::F16 {
                f16_to_f32
            } else {
                bf16_to_f32
            };
            let enc = if dtype == Dtype::F16 {
                f32_to_f16
            } else {
                f32_to_bf16
            };
            let want: Vec<f32> = values.iter().map(|&v| conv(enc(v))).collect();
            let bytes = encode_body(&values, dtype).into_owned();
            assert_eq!(bytes.len(), values.len() * 2);
            let header = TensorHeader::for_spec(&spec, dtype);
            assert!(
                TensorBodyDecoder::new(&header, &spec).is_err(),
                "f32 only by default"
            );
            let mut rng = Rng(99);
            for _ in 0..500 {
                let mut dec = TensorBodyDecoder::new_accepting(&header, &spec, &Dtype::ALL)
                    .expect("accepted");
                let mut out = vec![f32::NAN; values.len()];
                let mut sink = |off: usize, v: &[f32]| out[off..off + v.len()].copy_from_slice(v);
                let mut start = 0;
                let mut cuts: Vec<usize> = (0..rng.below(8))
                    .map(|_| rng.below(bytes.len() + 1))
                    .collect();
                cuts.sort_unstable();
                for c in cuts {
                    dec.feed(&bytes[start..c], &mut sink).expect("feeds");
                    start = c;
                }
                dec.feed(&bytes[start..], &mut sink).expect("feeds");
                dec.finish().expect("complete");
                assert_eq!(out, want, "{dtype:?}");
            }
            // One byte short is refused.
            let mut dec =
                TensorBodyDecoder::new_accepting(&header, &spec, &Dtype::ALL).expect("ok");
            dec.feed(&bytes[..bytes.len() - 1], &mut |_, _| {})
                .expect("feeds");
            assert!(matches!(dec.finish(), Err(WireError::BodyTooShort { .. })));
        }
        assert_eq!(Dtype::from_name("bf16"), Some(Dtype::Bf16));
        assert_eq!(Dtype::from_name("fp8"), None);
    }
}
