//! A throw-away study PKI on disk, as an operator makes it with `fedpriv-coordinator pki`:
//! `root/ca` (the CA and the coordinator's certificate for `localhost` and 127.0.0.1) and
//! `root/issued` (one certificate per identity).

#![allow(dead_code)] // Each test binary uses its own part.

use std::path::{Path, PathBuf};

use fedpriv_common::pki::{self, Role};
use fedpriv_coordinator::pki_cli::{self, PkiCommand};

/// Creates a CA named `ca_name` in `out`, with the coordinator's certificate.
pub fn init(out: &Path, ca_name: &str) {
    pki_cli::run(&PkiCommand::Init {
        out: out.to_path_buf(),
        names: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().expect("an address")],
        days: 30,
        ca_days: 60,
        ca_name: ca_name.into(),
    })
    .expect("pki init");
}

/// Issues `name` as `role` from `root/ca` into `root/issued`: its certificate and key files.
pub fn issue(root: &Path, role: Role, name: &str) -> (PathBuf, PathBuf) {
    let out = root.join("issued");
    pki_cli::run(&PkiCommand::Issue {
        ca_dir: root.join("ca"),
        role,
        name: name.into(),
        out: out.clone(),
        days: 5,
    })
    .expect("pki issue");
    (
        out.join(format!("{name}.pem")),
        out.join(format!("{name}.key")),
    )
}

/// Creates `root/ca` under a CA named `ca_name` and issues `identities` into `root/issued`.
pub fn make(root: &Path, ca_name: &str, identities: &[(Role, &str)]) {
    init(&root.join("ca"), ca_name);
    for (role, name) in identities {
        issue(root, *role, name);
    }
}

/// The coordinator's mTLS server config from the files under `root/ca`, refusing the
/// certificates the `crls` revoke.
pub fn server_tls(root: &Path, crls: &[Vec<u8>]) -> rustls::ServerConfig {
    let ca = root.join("ca");
    let read = |name: &str| std::fs::read(ca.join(name)).expect("a PKI file");
    pki::server_config(
        &read(pki_cli::CA_CERT),
        &read(pki_cli::SERVER_CERT),
        &read(pki_cli::SERVER_KEY),
        crls,
    )
    .expect("server tls")
}
