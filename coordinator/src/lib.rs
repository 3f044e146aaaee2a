//! The fedpriv coordinator: runs studies (rounds of federated training with differential
//! privacy) for an ML team, over mutually authenticated QUIC, with a durable ledger of the
//! privacy budget each study has spent.
//!
//! What it does not do: it never sees a site's records, and it cannot spend more of a site's
//! budget than the site's own cap allows (each site enforces its cap in its own ledger).

pub mod admin;
pub mod assess;
pub mod at_rest;
pub mod audit;
pub mod budget_cli;
pub mod checkpoint;
pub mod error;
pub mod inventory;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod pki_cli;
pub mod progress;
pub mod release;
pub mod report;
pub mod retention;
pub mod round;
pub mod server;
pub mod store;
pub mod strategy;
pub mod transport;
