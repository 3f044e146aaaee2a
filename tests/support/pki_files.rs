//! A throw-away study PKI on disk, as an operator makes it with `fedpriv-coordinator pki`:
//! `root/ca` (the CA and the coordinator's certificate for `localhost` and 127.0.0.1) and
//! `root/issued` (one certificate per identity).

use std::path::Path;

use fedpriv_common::pki::Role;
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
