//! A throw-away study PKI on disk, as an operator makes it with `fedpriv-coordinator pki`:
//! `root/ca` (the CA and the coordinator's certificate for `localhost` and 127.0.0.1) and
//! `root/issued` (one certificate per identity).

use std::path::Path;

use fedpriv_common::pki::{self, Role};
use fedpriv_coordinator::pki_cli::{self, PkiCommand};

/// Creates `root/ca` under a CA named `ca_name` and issues `identities` into `root/issued`.
pub fn make(root: &Path, ca_name: &str, identities: &[(Role, &str)]) {
    pki_cli::run(&PkiCommand::Init {
        out: root.join("ca"),
        names: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().expect("an address")],
        days: 30,
        ca_days: 60,
        ca_name: ca_name.into(),
    })
    .expect("pki init");
    for (role, name) in identities {
        pki_cli::run(&PkiCommand::Issue {
            ca_dir: root.join("ca"),
            role: *role,
            name: (*name).into(),
            out: root.join("issued"),
            days: 5,
        })
        .expect("pki issue");
    }
}

/// The coordinator's mTLS server config from the files [`make`] wrote under `root/ca`.
pub fn server_tls(root: &Path) -> rustls::ServerConfig {
    let ca = root.join("ca");
    let read = |name: &str| std::fs::read(ca.join(name)).expect("a PKI file");
    pki::server_config(
        &read(pki_cli::CA_CERT),
        &read(pki_cli::SERVER_CERT),
        &read(pki_cli::SERVER_KEY),
        &[],
    )
    .expect("server tls")
}
