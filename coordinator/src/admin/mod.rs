//! Least privilege for people: operators and auditors talk to the running coordinator over
//! the same mTLS QUIC endpoint as the sites, one request per bidirectional stream (see
//! [`fedpriv_common::admin`]); what each may do follows from the role in its certificate.
//!
//! - [`policy`]: who may do what (pure).
//! - [`serve`]: the coordinator's side: authorizes, serves reads (each on record first),
//!   hands writes to the studies' owner ([`crate::node::AdminCommand`]), audits refusals.
//! - [`client`]: `fedpriv-coordinator admin` and the calls tests make.
//!
//! Dependencies run one way: `client` knows nothing of the coordinator's insides; `serve`
//! sends writes to the owner and never changes a study itself.

pub mod client;
pub mod policy;
pub mod serve;

pub use client::{
    connect, export_model, fetch_audit, fetch_audit_in_pages, request, run_cli, AdminArgs,
    AdminCli, ClientError, Reply,
};
pub use policy::{authorize, Refusal};
pub use serve::{audit_page, ledger_json, ledger_text, list_studies, serve_admin, AdminCtx};
