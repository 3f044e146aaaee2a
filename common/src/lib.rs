//! Pure building blocks of fedpriv, shared by the coordinator and the site daemon.
//!
//! What it does: the wire format (versioned, size-capped messages and streamed tensor
//! bodies), flat models and their safetensors form, differential privacy (clipping, secure
//! Gaussian noise, Poisson sampling, RDP and PLD accountants, calibration), the budget
//! rules, configuration parsing and validation, certificate identities, and the audit-log
//! record format.
//!
//! What it does not do: no sockets, no async runtime, no file or database I/O in its core.
//! Callers read bytes and pass them in; the binaries own every effect.
//!
//! Optional features add the I/O the two binaries share, so it is written once: `fs` the
//! audit-log file (`audit_file`), `quic` the quinn stream helpers (`quic_io`), and `sqlite`
//! opening, checking, creating and migrating a state database (`state_db`).

pub mod admin;
pub mod arch;
pub mod audit;
#[cfg(any(feature = "fs", test))]
pub mod audit_file;
pub mod config;
pub mod digest;
pub mod dp;
pub mod evaluation;
pub mod exposition;
pub mod model;
pub mod model_card;
pub mod pki;
pub mod protocol;
#[cfg(feature = "quic")]
pub mod quic_io;
pub mod seal;
#[cfg(any(feature = "sqlite", test))]
pub mod state_db;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod time;
pub mod wire;
