//! A throw-away study PKI for integration tests: one CA, the coordinator's TLS config for
//! `localhost`, and site client configs (real certificates, as the binaries use).

use fedpriv_common::pki::{self, CaBundle, Identity, Role};

/// A fresh CA named `name`.
pub fn ca(name: &str) -> CaBundle {
    pki::generate_ca(name, 1).expect("ca")
}

/// The coordinator's mTLS server config, with a `localhost` certificate from `ca`.
pub fn server_tls(ca: &CaBundle) -> rustls::ServerConfig {
    let cert = pki::issue_server_cert(ca, &["localhost".into()], &[], 1).expect("cert");
    pki::server_config(
        ca.cert_pem.as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
        &[],
    )
    .expect("server tls")
}

/// A client config for site `name`, certified by `ca`.
pub fn site_tls(ca: &CaBundle, name: &str) -> rustls::ClientConfig {
    let cert = pki::issue_identity_cert(ca, &Identity::new(Role::Site, name).expect("id"), 1)
        .expect("cert");
    pki::client_config(
        ca.cert_pem.as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
    )
    .expect("client tls")
}
