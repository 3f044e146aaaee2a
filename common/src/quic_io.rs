//! quinn stream glue shared by the coordinator and the site daemon (cargo feature `quic`).
//!
//! Thin async wrappers around the sans-IO [`crate::wire`] codecs: one message per
//! unidirectional stream (a control frame, then optionally a tensor body, then the end of
//! the stream), and the QUIC transport settings both sides use. The pure core of this crate
//! does not depend on this module; only it pulls in quinn.
//!
//! Timeouts are the caller's: wrap reads in `tokio::time::timeout` where a slow peer must
//! not hold a task.

use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};

pub use quinn;
use quinn::VarInt;

use crate::model::ModelSpec;
use crate::wire::{
    self, decode_payload, encode_frame, frame_len, CloseCode, Dtype, TensorBodyDecoder,
    TensorHeader, WireError, FRAME_PREFIX_LEN,
};

/// Bytes written per `write_all` call when sending a tensor body.
const WRITE_CHUNK: usize = 1 << 20;
/// Largest chunk taken from quinn per read of a tensor body.
const READ_CHUNK: usize = 1 << 20;
/// Longest close / stop reason we send (it must fit in one packet).
const MAX_REASON: usize = 512;

/// QUIC settings of an endpoint. The defaults suit both sides: a minute of silence closes
/// a connection, so sites send keep-alives well inside it; windows allow a few hundred MB/s
/// on a LAN without letting one connection buffer much (a window is what the peer may send
/// before we read, so the coordinator's memory is bounded by windows × connections).
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// Close a connection after this long without any packet.
    pub idle_timeout: Duration,
    /// Send a PING after this long without traffic (sites: `Some`, coordinator: `None`).
    pub keep_alive: Option<Duration>,
    /// Unidirectional streams the peer may have open at once (one per message).
    pub max_uni_streams: u32,
    /// Bidirectional streams the peer may have open at once.
    pub max_bidi_streams: u32,
    /// Bytes the peer may send on one stream before we read them.
    pub stream_receive_window: u32,
    /// Bytes the peer may send on all streams of a connection before we read them.
    pub receive_window: u32,
    /// Bytes we buffer for sending on a connection.
    pub send_window: u64,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            keep_alive: None,
            max_uni_streams: 8,
            max_bidi_streams: 4,
            stream_receive_window: 8 << 20,
            receive_window: 16 << 20,
            send_window: 16 << 20,
        }
    }
}

impl TransportLimits {
    /// Site defaults: as [`Default`] plus a keep-alive every 10 s, so a long local training
    /// does not let the idle timeout drop the connection.
    pub fn site() -> Self {
        Self {
            keep_alive: Some(Duration::from_secs(10)),
            ..Self::default()
        }
    }

    /// The quinn transport configuration for these limits.
    pub fn transport_config(&self) -> Result<quinn::TransportConfig, String> {
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            format!(
                "config error: idle timeout {:?} is too long",
                self.idle_timeout
            )
        })?;
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive)
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(self.send_window);
        Ok(t)
    }
}

/// Why a stream exchange failed; [`StreamError::is_peer_fault`] says whose fault.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer's bytes broke the wire format (or our message broke a limit: `Internal`).
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("peer refused the message ({})", describe_code(*.0))]
    Stopped(u64),
    #[error("stream already closed")]
    Closed,
}

impl StreamError {
    /// True when the peer sent bad bytes (not a network or local failure).
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, StreamError::Wire(e) if e.is_peer_fault())
    }

    /// True when the peer had closed the connection in an orderly way (it shut down): a
    /// normal outcome, not a failure.
    pub fn is_orderly_close(&self) -> bool {
        let closed = match self {
            StreamError::Connection(c) => c,
            StreamError::Write(quinn::WriteError::ConnectionLost(c)) => c,
            StreamError::Read(quinn::ReadError::ConnectionLost(c)) => c,
            _ => return false,
        };
        matches!(closed, quinn::ConnectionError::ApplicationClosed(a)
            if a.error_code.into_inner() == u64::from(CloseCode::Normal.code()))
    }
}

fn describe_code(code: u64) -> String {
    match CloseCode::from_code(code) {
        Some(c) => format!("{c:?}"),
        None => format!("code {code}"),
    }
}

/// A close / stop code as quinn wants it.
pub fn var_int(code: CloseCode) -> VarInt {
    VarInt::from_u32(code.code())
}

/// Closes `conn`, telling the peer why. The reason is cut to fit in one packet.
pub fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(var_int(code), &reason.as_bytes()[..end]);
}

/// A readable account of why a connection ended, for logs (e.g. "closed by peer:
/// RoleNotAllowed: peer site/a has role site, this needs role operator").
pub fn describe_close(err: &quinn::ConnectionError) -> String {
    let text = match err {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "closed by peer: {}: {}",
            describe_code(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason)
        ),
        quinn::ConnectionError::ConnectionClosed(c) => {
            format!("closed by peer (transport): {c}")
        }
        other => other.to_string(),
    };
    if is_alpn_mismatch(err) {
        return format!(
            "protocol version mismatch: the peer does not speak {} ({text})",
            String::from_utf8_lossy(wire::ALPN)
        );
    }
    text
}

/// TLS alert 120 (no_application_protocol): the two sides share no ALPN, i.e. no fedpriv
/// protocol version.
fn is_alpn_mismatch(err: &quinn::ConnectionError) -> bool {
    let alert = quinn::TransportErrorCode::crypto(120);
    match err {
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code == alert,
        quinn::ConnectionError::TransportError(t) => t.code == alert,
        _ => false,
    }
}

/// Tells the peer we stopped reading this stream because of `err`. Ignoring the result is
/// right: a stream that is already closed needs no stop.
fn stop(recv: &mut quinn::RecvStream, err: &WireError) {
    let _ = recv.stop(var_int(err.close_code()));
}

/// Sends one message on a new unidirectional stream: the frame, then `body` (if any) as
/// raw little-endian f32, then the end of the stream. Returns once the peer acknowledged
/// every byte, or errors if it refused the stream.
pub async fn send_message<T: Serialize>(
    conn: &quinn::Connection,
    msg: &T,
    body: Option<&[f32]>,
) -> Result<(), StreamError> {
    // Encode before opening the stream: an over-cap message costs the peer nothing.
    let frame = encode_frame(msg)?;
    let mut send = conn.open_uni().await?;
    write_frame_and_body(&mut send, &frame, body).await?;
    send.finish().map_err(|_| StreamError::Closed)?;
    match send.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(StreamError::Stopped(code.into_inner())),
        Err(quinn::StoppedError::ConnectionLost(e)) => Err(StreamError::Connection(e)),
        Err(quinn::StoppedError::ZeroRttRejected) => Err(StreamError::Closed),
    }
}

/// A tensor body shared by every stream it is sent on (the global model going to every
/// site): quinn keeps references to it in each connection's send buffer until the peer
/// acknowledges the bytes, instead of a copy per connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedBody(bytes::Bytes);

/// Lets [`bytes::Bytes`] borrow the model's memory as little-endian bytes.
struct F32Owner(Arc<Vec<f32>>);

impl AsRef<[u8]> for F32Owner {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.as_slice())
    }
}

impl SharedBody {
    /// `values` as raw little-endian f32, without copying them on little-endian machines.
    pub fn from_f32(values: Arc<Vec<f32>>) -> Self {
        #[cfg(target_endian = "little")]
        {
            Self(bytes::Bytes::from_owner(F32Owner(values)))
        }
        #[cfg(not(target_endian = "little"))]
        {
            Self(bytes::Bytes::from(
                wire::f32_body_bytes(&F32Owner(values).0).into_owned(),
            ))
        }
    }

    /// `values` encoded in `dtype`: shared without a copy for f32 (little-endian), else
    /// encoded once (2 bytes per value) and shared.
    pub fn encode(values: Arc<Vec<f32>>, dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => Self::from_f32(values),
            Dtype::F16 | Dtype::Bf16 => Self(bytes::Bytes::from(
                wire::encode_body(&values, dtype).into_owned(),
            )),
        }
    }

    /// Body length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// As [`send_message`], with a [`SharedBody`]: the body is handed to quinn as slices of
/// the shared buffer, so sending one model to N sites holds one copy of it, not N.
pub async fn send_message_shared<T: Serialize>(
    conn: &quinn::Connection,
    msg: &T,
    body: &SharedBody,
) -> Result<(), StreamError> {
    let frame = encode_frame(msg)?;
    let mut send = conn.open_uni().await?;
    send.write_all(&frame).await.map_err(map_write)?;
    let mut start = 0;
    while start < body.0.len() {
        let end = (start + WRITE_CHUNK).min(body.0.len());
        send.write_chunk(body.0.slice(start..end))
            .await
            .map_err(map_write)?;
        start = end;
    }
    send.finish().map_err(|_| StreamError::Closed)?;
    match send.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(StreamError::Stopped(code.into_inner())),
        Err(quinn::StoppedError::ConnectionLost(e)) => Err(StreamError::Connection(e)),
        Err(quinn::StoppedError::ZeroRttRejected) => Err(StreamError::Closed),
    }
}

/// As [`send_message`], with the body encoded in `dtype` (the header in `msg` must say
/// so). 16-bit bodies are encoded piece by piece: no encoded copy of the whole body.
pub async fn send_message_as<T: Serialize>(
    conn: &quinn::Connection,
    msg: &T,
    body: Option<&[f32]>,
    dtype: Dtype,
) -> Result<(), StreamError> {
    if dtype == Dtype::F32 {
        return send_message(conn, msg, body).await;
    }
    let frame = encode_frame(msg)?;
    let mut send = conn.open_uni().await?;
    send.write_all(&frame).await.map_err(map_write)?;
    if let Some(values) = body {
        let mut buf = vec![0u8; WRITE_CHUNK];
        for piece in values.chunks(WRITE_CHUNK / 2) {
            let out = &mut buf[..piece.len() * 2];
            wire::encode_16_into(piece, dtype, out);
            send.write_all(out).await.map_err(map_write)?;
        }
    }
    send.finish().map_err(|_| StreamError::Closed)?;
    match send.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(StreamError::Stopped(code.into_inner())),
        Err(quinn::StoppedError::ConnectionLost(e)) => Err(StreamError::Connection(e)),
        Err(quinn::StoppedError::ZeroRttRejected) => Err(StreamError::Closed),
    }
}

/// Writes an encoded frame and an optional body on `send` without finishing it (for
/// callers that manage their own streams, e.g. bidirectional request/response).
pub async fn write_frame_and_body(
    send: &mut quinn::SendStream,
    frame: &[u8],
    body: Option<&[f32]>,
) -> Result<(), StreamError> {
    send.write_all(frame).await.map_err(map_write)?;
    if let Some(values) = body {
        let bytes = wire::f32_body_bytes(values);
        for chunk in bytes.chunks(WRITE_CHUNK) {
            send.write_all(chunk).await.map_err(map_write)?;
        }
    }
    Ok(())
}

fn map_write(e: quinn::WriteError) -> StreamError {
    match e {
        quinn::WriteError::Stopped(code) => StreamError::Stopped(code.into_inner()),
        quinn::WriteError::ConnectionLost(c) => StreamError::Connection(c),
        other => StreamError::Write(other),
    }
}

fn map_read_exact(e: quinn::ReadExactError, expected: usize) -> StreamError {
    match e {
        quinn::ReadExactError::FinishedEarly(got) => WireError::Truncated { expected, got }.into(),
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
            StreamError::Connection(c)
        }
        quinn::ReadExactError::ReadError(r) => StreamError::Read(r),
    }
}

/// Reads one control frame: the 4-byte prefix, the cap check, then exactly that many
/// bytes. Nothing is allocated before the cap check. On a bad frame the stream is stopped
/// with [`CloseCode::ProtocolViolation`].
pub async fn recv_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, StreamError> {
    let result = async {
        let mut prefix = [0u8; FRAME_PREFIX_LEN];
        recv.read_exact(&mut prefix)
            .await
            .map_err(|e| map_read_exact(e, FRAME_PREFIX_LEN))?;
        let len = frame_len(prefix)?;
        let mut payload = vec![0u8; len];
        recv.read_exact(&mut payload)
            .await
            .map_err(|e| map_read_exact(e, len))?;
        Ok(decode_payload(&payload)?)
    }
    .await;
    if let Err(StreamError::Wire(e)) = &result {
        stop(recv, e);
    }
    result
}

/// Streams a tensor body through `sink` as `(offset in values, values)` chunks. The header
/// is checked against `spec` before a byte of body is read; the stream must end exactly
/// where the header says. Memory used: one read chunk, whatever the model size. On a bad
/// body the stream is stopped; values already handed to `sink` must then be discarded.
pub async fn recv_tensor_body(
    recv: &mut quinn::RecvStream,
    header: &TensorHeader,
    spec: &ModelSpec,
    sink: impl FnMut(usize, &[f32]),
) -> Result<(), StreamError> {
    recv_tensor_body_accepting(recv, header, spec, &[Dtype::F32], sink).await
}

/// As [`recv_tensor_body`], for a body in any dtype in `accepted` (values reach the sink
/// as f32 whatever the wire dtype).
pub async fn recv_tensor_body_accepting(
    recv: &mut quinn::RecvStream,
    header: &TensorHeader,
    spec: &ModelSpec,
    accepted: &[Dtype],
    mut sink: impl FnMut(usize, &[f32]),
) -> Result<(), StreamError> {
    let mut decoder = match TensorBodyDecoder::new_accepting(header, spec, accepted) {
        Ok(d) => d,
        Err(e) => {
            stop(recv, &e);
            return Err(e.into());
        }
    };
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(quinn::ReadError::ConnectionLost(c)) => return Err(StreamError::Connection(c)),
            Err(e) => return Err(StreamError::Read(e)),
        };
        if let Err(e) = decoder.feed(&chunk.bytes, &mut sink) {
            stop(recv, &e);
            return Err(e.into());
        }
    }
    decoder.finish()?;
    Ok(())
}

/// Checks that a message without a body is followed by the end of its stream.
pub async fn recv_end(recv: &mut quinn::RecvStream) -> Result<(), StreamError> {
    match recv.read_chunk(1, true).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => {
            let e = WireError::TrailingBytes { extra: 1 };
            stop(recv, &e);
            Err(e.into())
        }
        Err(quinn::ReadError::ConnectionLost(c)) => Err(StreamError::Connection(c)),
        Err(e) => Err(StreamError::Read(e)),
    }
}

/// The ALPN protocol the handshake settled on, checked against [`wire::ALPN`].
pub fn check_negotiated_alpn(conn: &quinn::Connection) -> Result<(), WireError> {
    let data = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok());
    wire::check_alpn(data.as_ref().and_then(|d| d.protocol.as_deref()))
}

/// The peer's end-entity certificate (DER), if it presented one.
pub fn peer_leaf_cert(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(|c| c.as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(code: CloseCode) -> quinn::ConnectionError {
        quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(code.code()),
            reason: bytes::Bytes::from_static(b"site shutting down"),
        })
    }

    #[test]
    fn only_a_peer_s_normal_close_is_orderly() {
        assert!(StreamError::Connection(closed(CloseCode::Normal)).is_orderly_close());
        let lost = quinn::WriteError::ConnectionLost(closed(CloseCode::Normal));
        assert!(StreamError::Write(lost).is_orderly_close());
        assert!(!StreamError::Connection(closed(CloseCode::ProtocolViolation)).is_orderly_close());
        assert!(!StreamError::Connection(quinn::ConnectionError::TimedOut).is_orderly_close());
        assert!(!StreamError::Closed.is_orderly_close());
    }
}
