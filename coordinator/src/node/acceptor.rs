//! Accepts connections: cheap decisions before any cryptography (a flood of attempts costs
//! a refusal packet each, not a handshake), handshakes in their own tasks (a slow or
//! hostile peer blocks no one), at most so many handshakes per source at a time (more wait
//! for a slot rather than being refused: a burst of sites behind one address gets in), at
//! most so many connections per identity, and each authenticated peer handed to `serve` in
//! a task of its own.
//!
//! On shutdown it stops accepting and gives the connections in progress a grace period to
//! finish what they are doing (an admin answer, the last messages to a site) before it
//! cuts them off.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedpriv_common::audit::details::ConnectionRefused;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use super::refusals::Refusals;
use super::site_conn;
use crate::limits::{EarlyRefusal, HandshakeDecision, HandshakeGate, Limits, Source};
use crate::transport::{self, AuthenticatedPeer};

/// How long connections may take to finish once the coordinator stops.
const DRAIN_GRACE: Duration = Duration::from_secs(6);

/// Accepts connections on `endpoint` until `shutdown` turns true or the endpoint closes;
/// `serve(peer, conn_id)` serves each authenticated peer. Returns once every connection
/// task has finished (or was cut off after the grace period).
pub async fn run<F, Fut>(
    endpoint: quinn::Endpoint,
    limits: Arc<Limits>,
    refusals: Refusals,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(AuthenticatedPeer, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let serve = Arc::new(serve);
    let started = Instant::now();
    let mut conn_id = 0u64;
    let mut conns = JoinSet::new();
    let mut gate = HandshakeGate::new(&limits);
    let handshakes = Arc::new(Semaphore::new(limits.handshakes_in_flight));
    let source_slots = crate::limits::SourceSlots::new(&limits);
    let table = transport::ConnectionTable::new(&limits);
    // Attempts from a source that already holds its share of handshakes wait here for one
    // of its slots (sites behind one NAT, a bench starting many sites at once) instead of
    // being refused; at most `handshakes_in_flight` wait, each up to the handshake timeout.
    let mut waiting: VecDeque<(quinn::Incoming, Instant)> = VecDeque::new();
    let freed = Arc::new(Notify::new());
    let refuse = |incoming: quinn::Incoming, why: EarlyRefusal| {
        let addr = incoming.remote_address();
        incoming.refuse();
        // Keyed by source (address, or IPv6 /64): what the rate limit charges.
        refusals.note(
            &Source::of(addr.ip()).to_string(),
            &ConnectionRefused {
                remote: addr.to_string(),
                reason: why.reason().to_string(),
            },
        );
    };
    let mut start = |incoming: quinn::Incoming,
                     permit: (tokio::sync::OwnedSemaphorePermit, crate::limits::SourceSlot),
                     conns: &mut JoinSet<()>| {
        conn_id += 1;
        let id = conn_id;
        let table = Arc::clone(&table);
        let refusals = refusals.clone();
        let serve = Arc::clone(&serve);
        let freed = Arc::clone(&freed);
        let handshake_timeout = limits.handshake_timeout;
        conns.spawn(async move {
            let accepted = transport::accept_within(incoming, handshake_timeout).await;
            drop(permit);
            freed.notify_one();
            match accepted {
                Ok(peer) => {
                    // Held until the connection's task ends.
                    let Ok(_slot) = table.admit(&peer, id) else {
                        site_conn::refused(
                            &refusals,
                            &peer,
                            "connect",
                            "too many connections of this identity",
                        );
                        return;
                    };
                    serve(peer, id).await
                }
                Err(refused) => {
                    // Keyed by address: a bad certificate names no one we trust.
                    refusals.note(
                        &refused.addr.ip().to_string(),
                        &ConnectionRefused {
                            remote: refused.addr.to_string(),
                            reason: refused.reason.clone(),
                        },
                    );
                }
            }
        });
    };
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let addr = incoming.remote_address();
                let in_flight = limits
                    .handshakes_in_flight
                    .saturating_sub(handshakes.available_permits());
                let decision = gate.decide(
                    addr.ip(),
                    incoming.remote_address_validated(),
                    incoming.may_retry(),
                    in_flight,
                    started.elapsed().as_millis() as u64,
                );
                match decision {
                    HandshakeDecision::Accept => match source_slots.try_take(Source::of(addr.ip())) {
                        Some(slot) => match Arc::clone(&handshakes).try_acquire_owned() {
                            Ok(p) => start(incoming, (p, slot), &mut conns),
                            Err(_) => refuse(incoming, EarlyRefusal::Busy),
                        },
                        None if waiting.len() < limits.handshakes_in_flight => {
                            waiting.push_back((incoming, Instant::now()));
                        }
                        None => refuse(incoming, EarlyRefusal::SourceBusy),
                    },
                    HandshakeDecision::Retry => transport::retry_or_refuse(incoming),
                    HandshakeDecision::Refuse(why) => refuse(incoming, why),
                }
            }
            _ = freed.notified(), if !waiting.is_empty() => {
                // A handshake ended somewhere: start what waits and can start now, in
                // arrival order; give up on what waited past the handshake timeout.
                let mut still = VecDeque::new();
                while let Some((incoming, since)) = waiting.pop_front() {
                    if since.elapsed() > limits.handshake_timeout {
                        refuse(incoming, EarlyRefusal::SourceBusy);
                        continue;
                    }
                    match source_slots.try_take(Source::of(incoming.remote_address().ip())) {
                        Some(slot) => match Arc::clone(&handshakes).try_acquire_owned() {
                            Ok(p) => start(incoming, (p, slot), &mut conns),
                            Err(_) => still.push_back((incoming, since)),
                        },
                        None => still.push_back((incoming, since)),
                    }
                }
                waiting = still;
            }
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    for (incoming, _) in waiting {
        incoming.refuse();
    }
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.shutdown().await;
    }
}
