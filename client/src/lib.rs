//! The fedpriv site daemon's library: loads the site's data (only the columns a study
//! names), trains locally with candle, clips and noises, enforces the site's own privacy cap
//! in its own ledger, and talks to the coordinator over mutually authenticated QUIC.
//!
//! What it does not do: it never sends records, pre-noise values or per-record statistics,
//! never accepts inbound connections, and never lets a coordinator raise its cap.

pub mod config;
pub mod daemon;
pub mod data;
pub mod identifiers;
pub mod inventory;
pub mod site;
pub mod store;
pub mod train;
pub mod transport;
