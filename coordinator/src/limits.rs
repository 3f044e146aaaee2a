//! Operational limits of the coordinator's network side: how many handshakes may be in
//! flight, how fast one source may start them, how many connections one identity may
//! hold, how fast a connection's messages are read, and how many bytes of update body a
//! site may send per round.
//!
//! These are availability parameters, not privacy ones: changing them never changes what a
//! study spends or releases. The defaults suit a study of a few hundred sites on one
//! coordinator; every one of them is a bound on work or memory that a peer could otherwise
//! choose. The pieces here are pure (time is an argument, in milliseconds of a monotonic
//! clock) so that they are tested without a network; `server.rs` applies them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use fedpriv_common::quic_io::TransportLimits;

/// A sustained rate with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens held at once (what a quiet source may spend at once).
    pub burst: u32,
}

impl Rate {
    /// Milliseconds for one token to come back (at least 1).
    fn ms_per_token(&self) -> f64 {
        if self.per_second > 0.0 {
            (1000.0 / self.per_second).max(1.0)
        } else {
            f64::INFINITY
        }
    }
}

/// Every limit the coordinator's network side applies. See each field for its default and
/// why.
#[derive(Debug, Clone)]
pub struct Limits {
    /// QUIC settings: idle timeout, flow-control windows, and the concurrent streams a
    /// peer may open (`max_uni_streams`: 8, `max_bidi_streams`: 4). A site sends one message
    /// per stream and waits for each, so 8 is slack; a peer that opens more waits for
    /// credit, without costing us anything.
    pub transport: TransportLimits,
    /// Handshakes (connections not yet authenticated) in progress at once; beyond it new
    /// connection attempts are refused at once, before any cryptography. Default 256:
    /// more than the sites of a study reconnecting together, small enough that the
    /// handshakes' state stays in the low tens of MB.
    pub handshakes_in_flight: usize,
    /// Above this many handshakes in flight, a source whose address is not yet validated
    /// gets a QUIC Retry first (one round trip, no state on our side) so that a spoofed
    /// flood costs us nothing. Default 64.
    pub retry_above: usize,
    /// A handshake (and the first message, the hello) must finish within this. Default
    /// 10 s: a site on a slow hospital link needs well under a second.
    pub handshake_timeout: Duration,
    /// Handshakes one source (an IPv4 address, or an IPv6 /64) may start: default 2 per
    /// second, with bursts of 16. A site keeps one connection; this only bites a source
    /// that reconnects in a loop or presents bad certificates over and over.
    pub handshake_rate: Rate,
    /// Sources whose handshake rate is tracked at once; when full, sources idle long
    /// enough to be back at a full burst are forgotten. Default 65,536 (a few MB).
    pub tracked_sources: usize,
    /// Connection attempts quinn may queue before the acceptor looks at them. Default
    /// 1,024.
    pub incoming_queue: usize,
    /// Connections one operator or auditor identity may hold at once; more are refused.
    /// Default 4. A site always holds one: a new connection of the same site replaces the
    /// old one (closed with a reason), because a site whose network dropped reconnects
    /// long before the coordinator can notice the old connection is dead (the idle
    /// timeout); refusing would lock it out until then.
    pub connections_per_identity: usize,
    /// Messages read from one connection: default 50 per second, bursts of 200. Over it,
    /// the connection's next message is simply read later; the peer can open at most
    /// `max_uni_streams` streams meanwhile, so it queues nothing on our side.
    pub message_rate: Rate,
    /// Update bodies a site may send per round task: default 2 (one update, plus one retry
    /// after an update that was refused). The allowance is reset by each task of the
    /// study, in f32 bytes of that study's model whatever encoding the site uses; an
    /// upload beyond it is cut off (its stream stopped) before a byte of its body is read,
    /// and the refusal audited.
    pub upload_bodies_per_task: u32,
    /// Bytes of memory the uploads in flight may hold, all together, for taking a refused
    /// upload's folded part back out of the round's aggregate (`upload_spool_memory_mib`
    /// in the file; default 256 MiB). What does not fit goes to a sealed, unlinked file in
    /// the state directory, which costs the coordinator a kernel copy and an AES-GCM pass
    /// per value. Once used, the memory is kept for later rounds. 0: every upload goes to
    /// its file.
    pub upload_spool_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            transport: TransportLimits::default(),
            handshakes_in_flight: 256,
            retry_above: 64,
            handshake_timeout: Duration::from_secs(10),
            handshake_rate: Rate {
                per_second: 2.0,
                burst: 16,
            },
            tracked_sources: 65_536,
            incoming_queue: 1024,
            connections_per_identity: 4,
            message_rate: Rate {
                per_second: 50.0,
                burst: 200,
            },
            upload_bodies_per_task: 2,
            upload_spool_memory: 256 << 20,
        }
    }
}

impl Limits {
    /// Checks the limits make sense together (the operator's configuration). Each error
    /// names the field as the `--limits` file spells it. Values that would lock every peer
    /// out (no handshake slot, no stream, a zero rate) are refused rather than obeyed.
    pub fn validate(&self) -> Result<(), String> {
        let err = |field: &str, why: String| Err(format!("config error: {field}: {why}"));
        let at_least_one = |field: &str, v: u64, lockout: &str| {
            if v == 0 {
                err(field, format!("must be at least 1 (0 would {lockout})"))
            } else {
                Ok(())
            }
        };
        at_least_one(
            "handshakes_in_flight",
            self.handshakes_in_flight as u64,
            "refuse every connection",
        )?;
        if self.retry_above > self.handshakes_in_flight {
            return err(
                "retry_above",
                format!(
                    "{} is over handshakes_in_flight ({})",
                    self.retry_above, self.handshakes_in_flight
                ),
            );
        }
        if self.handshake_timeout.is_zero() {
            return err(
                "handshake_timeout_secs",
                "must be positive (0 would drop every handshake)".into(),
            );
        }
        for (name, rate) in [
            ("handshake_rate", &self.handshake_rate),
            ("message_rate", &self.message_rate),
        ] {
            if !(rate.per_second.is_finite() && rate.per_second > 0.0) {
                return err(
                    &format!("{name}.per_second"),
                    format!("{} must be positive and finite", rate.per_second),
                );
            }
            at_least_one(
                &format!("{name}.burst"),
                u64::from(rate.burst),
                "refuse everything",
            )?;
        }
        at_least_one(
            "tracked_sources",
            self.tracked_sources as u64,
            "leave no room to track a source",
        )?;
        at_least_one(
            "incoming_queue",
            self.incoming_queue as u64,
            "drop every connection attempt",
        )?;
        at_least_one(
            "connections_per_identity",
            self.connections_per_identity as u64,
            "refuse every operator and auditor",
        )?;
        at_least_one(
            "upload_bodies_per_task",
            u64::from(self.upload_bodies_per_task),
            "refuse every update",
        )?;
        self.validate_transport()
    }

    fn validate_transport(&self) -> Result<(), String> {
        let t = &self.transport;
        let err = |field: &str, why: String| Err(format!("config error: transport.{field}: {why}"));
        // Sites ping every `keep_alive`; a shorter idle timeout drops every site that is
        // busy training between two pings, and a task pushed meanwhile is lost.
        let site_ping = TransportLimits::site()
            .keep_alive
            .unwrap_or(Duration::from_secs(10));
        if t.idle_timeout <= site_ping {
            return err(
                "idle_timeout_secs",
                format!(
                    "{} s must be over the sites' keep-alive interval ({} s)",
                    t.idle_timeout.as_secs_f64(),
                    site_ping.as_secs()
                ),
            );
        }
        // A site sends each message on a uni stream; operators and auditors ask on bidi ones.
        if t.max_uni_streams == 0 {
            return err(
                "max_uni_streams",
                "must be at least 1 (0 would shut every site out)".into(),
            );
        }
        if t.max_bidi_streams == 0 {
            return err(
                "max_bidi_streams",
                "must be at least 1 (0 would shut every operator and auditor out)".into(),
            );
        }
        // Smaller windows than one control frame would stall a message half-way.
        let frame = fedpriv_common::wire::MAX_CONTROL_FRAME as u64;
        for (field, v) in [
            ("stream_receive_window", u64::from(t.stream_receive_window)),
            ("receive_window", u64::from(t.receive_window)),
            ("send_window", t.send_window),
        ] {
            if v < frame {
                return err(
                    field,
                    format!("{v} bytes is under one control frame ({frame} bytes)"),
                );
            }
        }
        if t.receive_window < t.stream_receive_window {
            return err(
                "receive_window",
                format!(
                    "{} is under stream_receive_window ({})",
                    t.receive_window, t.stream_receive_window
                ),
            );
        }
        t.transport_config().map(|_| ()).map_err(|e| {
            let why = e.trim_start_matches("config error: ");
            format!("config error: transport.idle_timeout_secs: {why}")
        })
    }

    /// Reads an operator's limits file (`run --limits FILE`): TOML, every key optional
    /// (absent keys keep their default), unknown keys refused so a misspelt limit is not
    /// silently ignored; then [`Limits::validate`].
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: LimitsFile =
            toml::from_str(text).map_err(|e| format!("config error: {}", e.to_string().trim()))?;
        let limits = file.apply(Limits::default())?;
        limits.validate()?;
        Ok(limits)
    }
}

/// The `--limits` file as written; see `examples/configs/limits.toml`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    handshakes_in_flight: Option<usize>,
    retry_above: Option<usize>,
    handshake_timeout_secs: Option<u64>,
    handshake_rate: Option<RateFile>,
    tracked_sources: Option<usize>,
    incoming_queue: Option<usize>,
    connections_per_identity: Option<usize>,
    message_rate: Option<RateFile>,
    upload_bodies_per_task: Option<u32>,
    upload_spool_memory_mib: Option<u64>,
    transport: Option<TransportFile>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RateFile {
    per_second: Option<f64>,
    burst: Option<u32>,
}

impl RateFile {
    fn apply(self, rate: Rate) -> Rate {
        Rate {
            per_second: self.per_second.unwrap_or(rate.per_second),
            burst: self.burst.unwrap_or(rate.burst),
        }
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransportFile {
    idle_timeout_secs: Option<u64>,
    max_uni_streams: Option<u32>,
    max_bidi_streams: Option<u32>,
    stream_receive_window: Option<u32>,
    receive_window: Option<u32>,
    send_window: Option<u64>,
}

impl LimitsFile {
    fn apply(self, d: Limits) -> Result<Limits, String> {
        let t = self.transport.unwrap_or_default();
        let dt = d.transport;
        let upload_spool_memory = match self.upload_spool_memory_mib {
            None => d.upload_spool_memory,
            Some(mib) => usize::try_from(mib)
                .ok()
                .and_then(|m| m.checked_mul(1 << 20))
                .ok_or_else(|| {
                    format!("config error: upload_spool_memory_mib: {mib} MiB is more than this machine can address")
                })?,
        };
        Ok(Limits {
            transport: TransportLimits {
                idle_timeout: t
                    .idle_timeout_secs
                    .map_or(dt.idle_timeout, Duration::from_secs),
                keep_alive: dt.keep_alive,
                max_uni_streams: t.max_uni_streams.unwrap_or(dt.max_uni_streams),
                max_bidi_streams: t.max_bidi_streams.unwrap_or(dt.max_bidi_streams),
                stream_receive_window: t.stream_receive_window.unwrap_or(dt.stream_receive_window),
                receive_window: t.receive_window.unwrap_or(dt.receive_window),
                send_window: t.send_window.unwrap_or(dt.send_window),
            },
            handshakes_in_flight: self.handshakes_in_flight.unwrap_or(d.handshakes_in_flight),
            retry_above: self.retry_above.unwrap_or(d.retry_above),
            handshake_timeout: self
                .handshake_timeout_secs
                .map_or(d.handshake_timeout, Duration::from_secs),
            handshake_rate: self
                .handshake_rate
                .unwrap_or_default()
                .apply(d.handshake_rate),
            tracked_sources: self.tracked_sources.unwrap_or(d.tracked_sources),
            incoming_queue: self.incoming_queue.unwrap_or(d.incoming_queue),
            connections_per_identity: self
                .connections_per_identity
                .unwrap_or(d.connections_per_identity),
            message_rate: self.message_rate.unwrap_or_default().apply(d.message_rate),
            upload_bodies_per_task: self
                .upload_bodies_per_task
                .unwrap_or(d.upload_bodies_per_task),
            upload_spool_memory,
        })
    }
}

/// A token bucket. Starts full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn full(rate: &Rate, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: &Rate, now_ms: u64) {
        // A clock that steps back adds nothing (and takes nothing).
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens =
            (self.tokens + elapsed as f64 / rate.ms_per_token()).min(f64::from(rate.burst));
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, rate: &Rate, now_ms: u64) -> bool {
        self.refill(rate, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Milliseconds until a token is available (0 if one is now).
    pub fn wait_ms(&mut self, rate: &Rate, now_ms: u64) -> u64 {
        self.refill(rate, now_ms);
        if self.tokens >= 1.0 {
            0
        } else {
            ((1.0 - self.tokens) * rate.ms_per_token()).ceil() as u64
        }
    }

    /// True once the bucket has refilled to a full burst (nothing to remember).
    pub fn is_full(&mut self, rate: &Rate, now_ms: u64) -> bool {
        self.refill(rate, now_ms);
        self.tokens >= f64::from(rate.burst)
    }
}

/// Whom a handshake rate is charged to: an IPv4 address, or the /64 of an IPv6 address
/// (one host commonly holds a whole /64, so per-address limits there are no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    let mut p = [0u8; 8];
                    p.copy_from_slice(&o[..8]);
                    Source::V6Prefix(p)
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            Source::V6Prefix(p) => {
                let mut o = [0u8; 16];
                o[..8].copy_from_slice(p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(o))
            }
        }
    }
}

/// Why a connection attempt was turned away before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyRefusal {
    /// `handshakes_in_flight` handshakes are already in progress.
    Busy,
    /// This source already has its share of the handshakes in progress (see
    /// [`SourceSlots`]).
    SourceBusy,
    /// The source started more handshakes than `handshake_rate` allows.
    RateLimited,
}

impl EarlyRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            EarlyRefusal::Busy => "too many handshakes in progress",
            EarlyRefusal::SourceBusy => "too many handshakes in progress from this source",
            EarlyRefusal::RateLimited => "handshake rate limit of this source exceeded",
        }
    }
}

/// What to do with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeDecision {
    /// Start the handshake.
    Accept,
    /// Ask the source to prove its address first (stateless, one round trip).
    Retry,
    /// Refuse at once (cheap: no cryptography, no state).
    Refuse(EarlyRefusal),
}

/// Handshakes in progress per source, so that a few addresses that complete the Retry and
/// then stall cannot hold every one of the `handshakes_in_flight` slots for the handshake
/// timeout. Each source may hold 1/64 of the slots (at least 1: 4 by default); a site
/// needs one at a time. Shared by the acceptor, which takes a slot, and the handshake
/// task, whose [`SourceSlot`] gives it back when dropped.
#[derive(Debug)]
pub struct SourceSlots {
    per_source: usize,
    held: Mutex<HashMap<Source, usize>>,
}

/// One source's handshake in progress; released on drop.
#[derive(Debug)]
pub struct SourceSlot {
    slots: std::sync::Arc<SourceSlots>,
    source: Source,
}

impl SourceSlots {
    pub fn new(limits: &Limits) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            per_source: (limits.handshakes_in_flight / 64).max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `source`, unless it already holds its share.
    pub fn try_take(self: &std::sync::Arc<Self>, source: Source) -> Option<SourceSlot> {
        let mut held = self.held.lock().ok()?;
        let n = held.entry(source).or_insert(0);
        if *n >= self.per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            slots: std::sync::Arc::clone(self),
            source,
        })
    }

    /// Sources holding a slot now (the map never outgrows the handshakes in flight).
    pub fn sources(&self) -> usize {
        self.held.lock().map_or(0, |h| h.len())
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.slots.held.lock() {
            if let Some(n) = held.get_mut(&self.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.remove(&self.source);
                }
            }
        }
    }
}

/// Decides, per connection attempt, whether to start a handshake. Owned by the acceptor.
#[derive(Debug)]
pub struct HandshakeGate {
    max_in_flight: usize,
    retry_above: usize,
    rate: Rate,
    tracked: usize,
    buckets: HashMap<Source, TokenBucket>,
    last_prune_ms: Option<u64>,
    untracked: u64,
}

impl HandshakeGate {
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_in_flight: limits.handshakes_in_flight,
            retry_above: limits.retry_above,
            rate: limits.handshake_rate,
            tracked: limits.tracked_sources,
            buckets: HashMap::new(),
            last_prune_ms: None,
            untracked: 0,
        }
    }

    /// One connection attempt from `ip`; `in_flight` handshakes are in progress now,
    /// `validated` says whether quinn already knows the source owns its address (after a
    /// Retry), `may_retry` whether a Retry is still possible.
    pub fn decide(
        &mut self,
        ip: IpAddr,
        validated: bool,
        may_retry: bool,
        in_flight: usize,
        now_ms: u64,
    ) -> HandshakeDecision {
        if in_flight >= self.max_in_flight {
            return HandshakeDecision::Refuse(EarlyRefusal::Busy);
        }
        // Before charging the source: an address that may be spoofed should not spend
        // the real owner's allowance.
        if in_flight >= self.retry_above && !validated && may_retry {
            return HandshakeDecision::Retry;
        }
        let source = Source::of(ip);
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.tracked {
            self.prune(now_ms);
            if self.buckets.len() >= self.tracked {
                // Every tracked source is busy: the new one goes unlimited rather than
                // being refused (its handshakes still count against `max_in_flight`, the
                // bound that protects us; refusing would lock out sites that share
                // nothing with the flood).
                self.untracked += 1;
                return HandshakeDecision::Accept;
            }
        }
        let rate = self.rate;
        let bucket = self
            .buckets
            .entry(source)
            .or_insert_with(|| TokenBucket::full(&rate, now_ms));
        if bucket.take(&rate, now_ms) {
            HandshakeDecision::Accept
        } else {
            HandshakeDecision::Refuse(EarlyRefusal::RateLimited)
        }
    }

    /// Forgets sources back at a full burst; at most once a second, so a table full of
    /// busy sources does not make every attempt a full scan.
    fn prune(&mut self, now_ms: u64) {
        if self
            .last_prune_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < 1000)
        {
            return;
        }
        self.last_prune_ms = Some(now_ms);
        let rate = self.rate;
        self.buckets.retain(|_, b| !b.is_full(&rate, now_ms));
    }

    /// Sources tracked now.
    pub fn tracked_sources(&self) -> usize {
        self.buckets.len()
    }

    /// Attempts let through unlimited because the table was full.
    pub fn untracked_accepts(&self) -> u64 {
        self.untracked
    }
}

/// What to do with a newly authenticated connection of an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Keep it.
    Admit,
    /// Keep it and close these older connections of the same identity.
    Replace(Vec<u64>),
    /// Refuse it: the identity holds its maximum.
    Refuse { held: usize },
}

/// Live connections per identity, by connection id.
#[derive(Debug, Default)]
pub struct IdentitySlots {
    held: HashMap<String, Vec<u64>>,
}

impl IdentitySlots {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connection `conn_id` of `identity` was authenticated. With `replace`, the newest
    /// connections win (the oldest beyond `max` are to be closed); without, connections
    /// beyond `max` are refused.
    pub fn admit(&mut self, identity: &str, conn_id: u64, max: usize, replace: bool) -> Admission {
        let max = max.max(1);
        let held = self.held.entry(identity.to_string()).or_default();
        if held.len() < max {
            held.push(conn_id);
            return Admission::Admit;
        }
        if !replace {
            return Admission::Refuse { held: held.len() };
        }
        let excess = held.len() + 1 - max;
        let old: Vec<u64> = held.drain(..excess).collect();
        held.push(conn_id);
        Admission::Replace(old)
    }

    /// Connection `conn_id` of `identity` ended (a no-op if it was replaced or refused).
    pub fn release(&mut self, identity: &str, conn_id: u64) {
        if let Some(held) = self.held.get_mut(identity) {
            held.retain(|&c| c != conn_id);
            if held.is_empty() {
                self.held.remove(identity);
            }
        }
    }

    /// Connections held by `identity`.
    pub fn held(&self, identity: &str) -> usize {
        self.held.get(identity).map_or(0, Vec::len)
    }

    /// Identities holding connections.
    pub fn identities(&self) -> usize {
        self.held.len()
    }
}

/// Why an upload was cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverAllowance {
    pub wanted: u64,
    pub left: u64,
}

impl std::fmt::Display for OverAllowance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.left == 0 && self.wanted > 0 {
            write!(
                f,
                "upload of {} bytes over the site's allowance for this round (none left, or no task was sent for this study)",
                self.wanted
            )
        } else {
            write!(
                f,
                "upload of {} bytes over the site's allowance for this round ({} bytes left)",
                self.wanted, self.left
            )
        }
    }
}

/// Bytes of update body one connection (one site) may still send, per study. Each task
/// the coordinator sends resets that study's allowance; the writer grants, the reader
/// takes.
#[derive(Debug, Default)]
pub struct UploadAllowance {
    left: Mutex<HashMap<String, u64>>,
}

impl UploadAllowance {
    pub fn new() -> Self {
        Self::default()
    }

    /// A task of `study` is being sent: the site may now send `bytes` of body for it
    /// (whatever it had left for an earlier round is gone).
    pub fn grant(&self, study: &str, bytes: u64) {
        if let Ok(mut left) = self.left.lock() {
            left.insert(study.to_string(), bytes);
        }
    }

    /// Charges an upload of `bytes` to `study`'s allowance, or says why it may not go on.
    pub fn take(&self, study: &str, bytes: u64) -> Result<(), OverAllowance> {
        let Ok(mut left) = self.left.lock() else {
            // Poisoned only if a holder panicked; fail closed.
            return Err(OverAllowance {
                wanted: bytes,
                left: 0,
            });
        };
        let have = left.get(study).copied().unwrap_or(0);
        if bytes > have {
            return Err(OverAllowance {
                wanted: bytes,
                left: have,
            });
        }
        left.insert(study.to_string(), have - bytes);
        Ok(())
    }

    /// Bytes left for `study`.
    pub fn left(&self, study: &str) -> u64 {
        self.left
            .lock()
            .ok()
            .and_then(|l| l.get(study).copied())
            .unwrap_or(0)
    }
}

/// The f32 body size of `values` values: the largest encoding a site may send.
pub fn f32_body_bytes(values: u64) -> u64 {
    values.saturating_mul(4)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn one_source_holds_at_most_its_share_of_handshakes_and_gets_it_back() {
        let slots = SourceSlots::new(&Limits::default());
        let a = Source::of("192.0.2.1".parse().unwrap());
        let b = Source::of("192.0.2.2".parse().unwrap());
        let held: Vec<SourceSlot> = (0..10).filter_map(|_| slots.try_take(a)).collect();
        assert_eq!(held.len(), 4, "256 slots / 64");
        // Another source is not affected.
        let other = slots.try_take(b);
        assert!(other.is_some());
        drop(held);
        drop(other);
        assert_eq!(slots.sources(), 0, "released on drop");
        assert!(slots.try_take(a).is_some());
    }

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let mut l = Limits {
            retry_above: 1000,
            ..Limits::default()
        };
        assert!(l.validate().unwrap_err().contains("retry_above"));
        l = Limits::default();
        l.handshake_rate.per_second = f64::NAN;
        assert!(l
            .validate()
            .unwrap_err()
            .contains("handshake_rate.per_second"));
        l = Limits::default();
        l.upload_bodies_per_task = 0;
        assert!(l.validate().unwrap_err().contains("upload_bodies_per_task"));
    }

    #[test]
    fn an_empty_limits_file_is_the_defaults_and_keys_override_one_by_one() {
        let d = format!("{:?}", Limits::default());
        assert_eq!(format!("{:?}", Limits::from_toml("").unwrap()), d);
        let l = Limits::from_toml(
            "handshakes_in_flight = 32\nretry_above = 8\nhandshake_timeout_secs = 3\n\
             [message_rate]\nburst = 5\n[transport]\nidle_timeout_secs = 30\n",
        )
        .unwrap();
        assert_eq!((l.handshakes_in_flight, l.retry_above), (32, 8));
        assert_eq!(l.handshake_timeout, Duration::from_secs(3));
        // A table given in part keeps the defaults of the keys it leaves out.
        assert_eq!(
            l.message_rate,
            Rate {
                per_second: 50.0,
                burst: 5
            }
        );
        assert_eq!(l.transport.idle_timeout, Duration::from_secs(30));
        assert_eq!(l.transport.max_uni_streams, 8);
        assert_eq!(l.upload_spool_memory, 256 << 20);
        assert_eq!(
            Limits::from_toml("upload_spool_memory_mib = 0")
                .unwrap()
                .upload_spool_memory,
            0
        );
        assert_eq!(
            Limits::from_toml("upload_spool_memory_mib = 3")
                .unwrap()
                .upload_spool_memory,
            3 << 20
        );
        // An integer rate is a rate.
        assert_eq!(
            Limits::from_toml("[handshake_rate]\nper_second = 4")
                .unwrap()
                .handshake_rate
                .per_second,
            4.0
        );
    }

    #[test]
    fn limits_files_with_unknown_keys_or_lockout_values_are_refused_by_name() {
        let refused = |text: &str, names: &str| {
            let e = Limits::from_toml(text).unwrap_err();
            assert!(e.contains(names), "{text:?}: {e}");
            assert!(e.starts_with("config error"), "{e}");
        };
        // Misspelt keys, at the top and in a table, are named rather than ignored.
        refused("handshakes_in_flite = 10", "handshakes_in_flite");
        refused("[transport]\nidle_timeout = 30", "idle_timeout");
        refused("[message_rate]\nrate = 3", "rate");
        refused("connections_per_identity = -1", "connections_per_identity");
        refused(
            "handshakes_in_flight = 0\nretry_above = 0",
            "handshakes_in_flight",
        );
        refused("retry_above = 300", "retry_above");
        refused("handshake_timeout_secs = 0", "handshake_timeout_secs");
        refused(
            "[handshake_rate]\nper_second = 0.0",
            "handshake_rate.per_second",
        );
        refused(
            "[message_rate]\nper_second = nan",
            "message_rate.per_second",
        );
        refused("[message_rate]\nburst = 0", "message_rate.burst");
        refused("tracked_sources = 0", "tracked_sources");
        refused("incoming_queue = 0", "incoming_queue");
        refused("connections_per_identity = 0", "connections_per_identity");
        refused("upload_bodies_per_task = 0", "upload_bodies_per_task");
        refused(
            "upload_spool_memory_mib = 9223372036854775807",
            "upload_spool_memory_mib",
        );
        refused(
            "[transport]\nidle_timeout_secs = 5",
            "transport.idle_timeout_secs",
        );
        refused(
            "[transport]\nmax_uni_streams = 0",
            "transport.max_uni_streams",
        );
        refused(
            "[transport]\nmax_bidi_streams = 0",
            "transport.max_bidi_streams",
        );
        refused(
            "[transport]\nstream_receive_window = 1024",
            "transport.stream_receive_window",
        );
        refused(
            "[transport]\nreceive_window = 1048576",
            "transport.receive_window",
        );
        refused("[transport]\nsend_window = 0", "transport.send_window");
        refused(
            "[transport]\nidle_timeout_secs = 9223372036854775807",
            "transport.idle_timeout_secs",
        );
    }

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let rate = Rate {
            per_second: 2.0,
            burst: 3,
        };
        let mut b = TokenBucket::full(&rate, 1000);
        assert!((0..3).all(|_| b.take(&rate, 1000)));
        assert!(!b.take(&rate, 1000));
        assert_eq!(b.wait_ms(&rate, 1000), 500);
        assert!(!b.take(&rate, 1499));
        assert!(b.take(&rate, 1500));
        // A long pause refills no further than the burst.
        assert!(b.is_full(&rate, 100_000));
        assert_eq!((0..10).filter(|_| b.take(&rate, 100_000)).count(), 3);
        // A clock stepping back neither adds nor panics.
        assert!(!b.take(&rate, 50));
        assert_eq!(b.wait_ms(&rate, 100_250), 250);
    }

    fn limits(in_flight: usize, retry_above: usize, burst: u32, tracked: usize) -> Limits {
        Limits {
            handshakes_in_flight: in_flight,
            retry_above,
            handshake_rate: Rate {
                per_second: 1.0,
                burst,
            },
            tracked_sources: tracked,
            ..Limits::default()
        }
    }

    #[test]
    fn one_flooding_source_is_limited_while_others_get_through() {
        let mut g = HandshakeGate::new(&limits(100, 100, 5, 100));
        let bad = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 66));
        let good = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let outcomes: Vec<_> = (0..1000)
            .map(|_| g.decide(bad, true, false, 0, 0))
            .collect();
        assert_eq!(
            outcomes
                .iter()
                .filter(|d| **d == HandshakeDecision::Accept)
                .count(),
            5
        );
        assert_eq!(
            outcomes[5],
            HandshakeDecision::Refuse(EarlyRefusal::RateLimited)
        );
        assert_eq!(g.decide(good, true, false, 0, 0), HandshakeDecision::Accept);
        // A second later the flooder gets one more.
        assert_eq!(
            g.decide(bad, true, false, 0, 1000),
            HandshakeDecision::Accept
        );
        assert_ne!(
            g.decide(bad, true, false, 0, 1000),
            HandshakeDecision::Accept
        );
    }

    #[test]
    fn busy_refuses_everyone_and_load_asks_unvalidated_sources_to_retry() {
        let mut g = HandshakeGate::new(&limits(10, 4, 5, 100));
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            g.decide(ip, true, true, 10, 0),
            HandshakeDecision::Refuse(EarlyRefusal::Busy)
        );
        assert_eq!(g.decide(ip, false, true, 4, 0), HandshakeDecision::Retry);
        // A Retry charges nothing: the whole burst is still there once validated.
        assert_eq!(
            (0..5)
                .filter(|_| g.decide(ip, true, true, 4, 0) == HandshakeDecision::Accept)
                .count(),
            5
        );
        // Under the threshold, or once a Retry was used, no Retry.
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(
            g.decide(other, false, true, 3, 0),
            HandshakeDecision::Accept
        );
        assert_eq!(
            g.decide(other, false, false, 4, 0),
            HandshakeDecision::Accept
        );
    }

    #[test]
    fn ipv6_sources_are_charged_per_64_and_mapped_v4_as_v4() {
        let mut g = HandshakeGate::new(&limits(100, 100, 2, 100));
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(Source::of(a.into()), Source::of(b.into()));
        assert_eq!(
            g.decide(a.into(), true, false, 0, 0),
            HandshakeDecision::Accept
        );
        assert_eq!(
            g.decide(b.into(), true, false, 0, 0),
            HandshakeDecision::Accept
        );
        assert_ne!(
            g.decide(a.into(), true, false, 0, 0),
            HandshakeDecision::Accept
        );
        let mapped: Ipv6Addr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            Source::of(mapped.into()),
            Source::of(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)))
        );
        assert_eq!(Source::of(a.into()).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn the_source_table_stays_bounded_under_address_spraying() {
        let mut g = HandshakeGate::new(&limits(100, 100, 2, 50));
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            // All at one instant: no bucket is back to full, so nothing can be forgotten.
            assert_eq!(g.decide(ip, true, false, 0, 0), HandshakeDecision::Accept);
            assert!(g.tracked_sources() <= 50);
        }
        assert_eq!(g.untracked_accepts(), 10_000 - 50);
        // Later, idle sources are forgotten and new ones are tracked (and limited) again.
        let late = IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(
            g.decide(late, true, false, 0, 60_000),
            HandshakeDecision::Accept
        );
        assert_eq!(g.tracked_sources(), 1);
        assert_eq!(
            g.decide(late, true, false, 0, 60_000),
            HandshakeDecision::Accept
        );
        assert_ne!(
            g.decide(late, true, false, 0, 60_000),
            HandshakeDecision::Accept
        );
    }

    #[test]
    fn sites_keep_their_newest_connection_operators_are_capped() {
        let mut s = IdentitySlots::new();
        assert_eq!(s.admit("site/a", 1, 1, true), Admission::Admit);
        assert_eq!(s.admit("site/a", 2, 1, true), Admission::Replace(vec![1]));
        assert_eq!(s.held("site/a"), 1);
        // The replaced connection's end does not free the new one's slot.
        s.release("site/a", 1);
        assert_eq!(s.held("site/a"), 1);
        s.release("site/a", 2);
        assert_eq!(s.held("site/a"), 0);
        assert_eq!(s.identities(), 0);

        assert_eq!(s.admit("operator/o", 3, 2, false), Admission::Admit);
        assert_eq!(s.admit("operator/o", 4, 2, false), Admission::Admit);
        assert_eq!(
            s.admit("operator/o", 5, 2, false),
            Admission::Refuse { held: 2 }
        );
        s.release("operator/o", 3);
        assert_eq!(s.admit("operator/o", 6, 2, false), Admission::Admit);
    }

    #[test]
    fn the_upload_allowance_is_reset_per_task_and_never_overdrawn() {
        let a = UploadAllowance::new();
        let body = f32_body_bytes(1000);
        assert_eq!(
            a.take("s", 1),
            Err(OverAllowance { wanted: 1, left: 0 }),
            "no task, no upload"
        );
        a.grant("s", 2 * body);
        assert_eq!(a.take("s", body), Ok(()));
        assert_eq!(a.take("s", body), Ok(()));
        let e = a.take("s", body).unwrap_err();
        assert_eq!(e.left, 0);
        assert!(e.to_string().contains("over the site's allowance"));
        // Another study has its own allowance.
        assert!(a.take("t", body).is_err());
        // The next round's task resets it, without banking what was left.
        a.grant("s", 2 * body);
        assert_eq!(a.take("s", body / 2), Ok(()));
        a.grant("s", 2 * body);
        assert_eq!(a.left("s"), 2 * body);
    }
}
