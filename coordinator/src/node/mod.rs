//! The running coordinator's tasks and the state each one owns (docs/architecture.md draws
//! the whole picture):
//!
//! - [`owner`]: the studies' owner, on its own thread. Owns every study's round engine
//!   ([`studies`]), the state database (through [`state::StateStore`]), the connected sites'
//!   outboxes and the upload spools. A synchronous `step(event) -> effects`: it makes its
//!   durable writes (ledger, audit log, checkpoints) inside the step and returns what the
//!   glue must send.
//! - [`acceptor`]: accepts QUIC connections, refuses floods before any cryptography, and
//!   hands each authenticated peer to the server's dispatch.
//! - [`site_conn`]: one task per connected site: reads its messages, streams its uploads
//!   into [`spool`]s and to the owner, and runs a writer that sends what the owner tells it.
//! - [`refusals`]: the one refusal tracker every task writes to.
//!
//! Tasks talk by message passing only: connection tasks send the owner [`Event`]s; the owner
//! answers with [`Outgoing`] messages on each site's channel, admin replies on a oneshot,
//! and a fresh [`studies::Directory`] on a watch channel.

use std::sync::Arc;

use fedpriv_common::admin::{AdminRequest, AdminResponse};
use fedpriv_common::pki::Identity;
use fedpriv_common::protocol::CoordinatorMessage;
use fedpriv_common::quic_io::SharedBody;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::round::Input;

pub mod acceptor;
pub mod checkpointer;
pub mod owner;
pub mod refusals;
pub mod site_conn;
pub mod spool;
pub mod state;
pub mod studies;

#[cfg(test)]
mod owner_sim;

/// Something observers (the demo, tests, metrics) may want to know.
#[derive(Debug, Clone)]
pub enum Notification {
    RoundCompleted {
        study: String,
        round: u64,
        model: Arc<Vec<f32>>,
        contributors: Vec<String>,
        epsilon: f64,
        budget: f64,
    },
    RoundAborted {
        study: String,
        round: u64,
        reason: String,
    },
    /// A round's DP evaluation of the model after `model_round`.
    Evaluated {
        study: String,
        round: u64,
        model_round: u64,
        summary: fedpriv_common::evaluation::EvalSummary,
    },
    StudyEnded {
        study: String,
        reason: String,
        /// `None` only if the engine did not say (it always does when it ends a study).
        cause: Option<crate::round::EndCause>,
    },
}

/// A message for one site, as its connection's writer sends it.
#[derive(Debug)]
pub enum Outgoing {
    Message(CoordinatorMessage),
    /// A message followed by a model body shared with every other site's send buffer.
    WithModel(CoordinatorMessage, SharedBody),
}

impl Outgoing {
    pub fn message(&self) -> &CoordinatorMessage {
        match self {
            Self::Message(m) | Self::WithModel(m, _) => m,
        }
    }
}

/// A connected site's outbox (its writer task holds the other end).
pub type SiteTx = mpsc::UnboundedSender<Outgoing>;

/// An operator's write, for the owner; the answer goes back on `reply`.
#[derive(Debug)]
pub struct AdminCommand {
    pub request: AdminRequest,
    pub by: Identity,
    pub reply: oneshot::Sender<AdminResponse>,
}

/// What the owner hears from the other tasks.
#[derive(Debug)]
pub enum Event {
    /// A site completed its hello; `tx` is its outbox.
    Connected {
        site: String,
        conn_id: u64,
        tx: SiteTx,
    },
    Disconnected {
        site: String,
        conn_id: u64,
    },
    /// A site's message for a study (ready, declined).
    Study {
        study: String,
        input: Input,
    },
    /// A streamed upload's begin, chunk or end (`input`), with its spool (on begin) and
    /// the permit its chunk holds (released once the chunk is folded, when the event is
    /// dropped after its step).
    Upload {
        study: String,
        input: Input,
        spool: Option<(u64, spool::Spool)>,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// An operator's write.
    Admin(AdminCommand),
    /// A model version the checkpoint writer has written (or failed to).
    CheckpointWritten(Box<checkpointer::CheckpointDone>),
    /// A study's deadline passed (see [`crate::round::StudyEngine::next_deadline`]).
    Tick,
    /// Stop at the next safe point (between steps).
    Shutdown,
}

/// The owner's inbox; connection tasks and the admin channel hold a clone.
pub type OwnerTx = std::sync::mpsc::Sender<Event>;

/// The time a step happens at: milliseconds on the owner's monotonic clock (for the round
/// engines' deadlines) and Unix seconds (for what the store and records keep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub ms: u64,
    pub unix: i64,
}
