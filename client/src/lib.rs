//! The fedpriv site daemon's library: loads the site's data once at start (only the columns
//! the site allows each study), checks every announcement and task against the terms the
//! site pinned in its own config, trains locally with candle, clips and noises, enforces the
//! site's own caps (per study and per data source) in its own ledger, and talks to the
//! coordinator over mutually authenticated QUIC.
//!
//! What it does not do: it never sends records, pre-noise values or per-record statistics
//! (what it sends is in the README's table), never accepts inbound connections, never lets a
//! coordinator raise a cap or change the terms a study was paid under, and never tells the
//! coordinator more about a refusal than one of a fixed set of reasons.

pub mod config;
pub mod daemon;
pub mod data;
pub mod evaluation;
pub mod identifiers;
pub mod inference;
pub mod inventory;
pub mod leakage;
pub mod ledger_view;
pub mod logging;
pub mod metrics_http;
pub mod privacy_audit;
pub mod site;
pub mod site_metrics;
pub mod sources;
pub mod store;
pub mod train;
pub mod transport;
