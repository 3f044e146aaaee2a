//! Study PKI: certificates, identities and the rustls configurations built from them.
//!
//! Pure: nothing here reads or writes files; callers pass PEM bytes and store what comes
//! back. Keys are ECDSA P-256; TLS is 1.3 only, with the `ring` provider passed explicitly
//! (never the process-wide default).
//!
//! # Identity
//!
//! A peer's identity and role live in its certificate and nowhere else: exactly one
//! subject-alternative-name URI of the form `fedpriv://<role>/<name>`, where role is `site`,
//! `operator` or `auditor` and name matches `[a-z0-9][a-z0-9._-]{0,62}`
//! (e.g. `fedpriv://site/st-marys`). The subject's common name is ignored. Anything the
//! peer later *says* about itself is checked against it with [`check_claim`].
//!
//! # Using an existing hospital PKI
//!
//! The study CA made by `fedpriv-coordinator pki init` is a convenience, not a requirement.
//! Any CA works on both sides if:
//!
//! - the coordinator is given that CA's certificate (PEM) as its trust anchor for clients,
//!   and each site is given the CA that signed the coordinator's server certificate (the two
//!   may differ: each side passes its own `ca_pem`);
//! - every site, operator and auditor certificate is an end-entity certificate with the
//!   `clientAuth` extended key usage (or none) and carries exactly one SAN URI
//!   `fedpriv://<role>/<name>`; other SAN entries (DNS names, e-mail, other URIs) are
//!   ignored;
//! - the coordinator's certificate has `serverAuth` and the DNS name or IP the sites dial;
//! - intermediates, if any, follow the leaf in the certificate PEM file;
//! - CRLs (PEM, one or more per file) are passed to [`server_config`]; when CRLs are given,
//!   every certificate below the trust anchor must be covered by one of them, otherwise the
//!   peer is refused (unknown revocation status is not accepted).
//!
//! Keys may be PKCS#8, SEC1 or PKCS#1 PEM. With OpenSSL, for example:
//! `openssl req -new -key site.key -subj "/CN=st-marys" -addext
//! "subjectAltName=URI:fedpriv://site/st-marys" -addext "extendedKeyUsage=clientAuth"`.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::wire::ALPN;

/// URI scheme of identities.
pub const URI_SCHEME: &str = "fedpriv";

/// Longest identity name (bytes).
pub const MAX_NAME_LEN: usize = 63;

/// Clock skew allowance: certificates become valid this long before they are issued.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Errors of the PKI layer; the message says whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("config error: {0}")]
    Config(String),
    #[error("peer error: {0}")]
    Peer(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl PkiError {
    fn config(msg: impl fmt::Display) -> Self {
        PkiError::Config(msg.to_string())
    }
    fn internal(msg: impl fmt::Display) -> Self {
        PkiError::Internal(msg.to_string())
    }
}

// ---------------------------------------------------------------------------------------
// Identities

/// What a certificate holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A hospital site: trains and sends updates.
    Site,
    /// May create and stop studies.
    Operator,
    /// May read ledgers and audit logs.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "site" => Ok(Role::Site),
            "operator" => Ok(Role::Operator),
            "auditor" => Ok(Role::Auditor),
            other => Err(format!(
                "unknown role {other:?} (expected site, operator or auditor)"
            )),
        }
    }
}

/// Who a peer is, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

/// Checks an identity name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let ok_first = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok_rest = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if !ok_first || !ok_rest || bytes.len() > MAX_NAME_LEN {
        return Err(format!(
            "name {:?} is not of the form [a-z0-9][a-z0-9._-]{{0,62}}",
            name.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

impl Identity {
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, PkiError> {
        let name = name.into();
        validate_name(&name).map_err(PkiError::Config)?;
        Ok(Self { role, name })
    }

    /// `fedpriv://<role>/<name>`.
    pub fn to_uri(&self) -> String {
        format!("{URI_SCHEME}://{}/{}", self.role, self.name)
    }

    /// Parses `fedpriv://<role>/<name>`; the scheme is case-insensitive, nothing else is.
    pub fn from_uri(uri: &str) -> Result<Self, String> {
        let rest = strip_scheme(uri).ok_or_else(|| format!("{uri:?} is not a fedpriv:// URI"))?;
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| format!("{uri:?} has no /<name> part"))?;
        let role: Role = role.parse()?;
        validate_name(name)?;
        Ok(Self {
            role,
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// The part after `fedpriv://`, if `uri` has that scheme (case-insensitively).
fn strip_scheme(uri: &str) -> Option<&str> {
    let prefix_len = URI_SCHEME.len() + 3;
    let prefix = uri.get(..prefix_len)?;
    let expected = format!("{URI_SCHEME}://");
    prefix
        .eq_ignore_ascii_case(&expected)
        .then(|| &uri[prefix_len..])
}

/// Is this SAN URI meant as a fedpriv identity (well-formed or not)?
fn is_fedpriv_uri(uri: &str) -> bool {
    uri.get(..URI_SCHEME.len() + 1)
        .is_some_and(|p| p.eq_ignore_ascii_case(&format!("{URI_SCHEME}:")))
}

/// The identity in a certificate (DER): exactly one `fedpriv://` SAN URI, well-formed.
/// Call it on a certificate the TLS layer already verified; it checks no signature.
pub fn identity_from_cert(der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Peer(format!("certificate does not parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Peer(format!("certificate SAN extension is invalid: {e}")))?
        .ok_or_else(|| {
            PkiError::Peer(
                "certificate has no subject alternative names, so no fedpriv identity".into(),
            )
        })?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if is_fedpriv_uri(u) => Some(*u),
        _ => None,
    });
    let first = uris
        .next()
        .ok_or_else(|| PkiError::Peer("certificate has no fedpriv:// SAN URI".into()))?;
    if uris.next().is_some() {
        return Err(PkiError::Peer(
            "certificate has more than one fedpriv:// SAN URI".into(),
        ));
    }
    Identity::from_uri(first).map_err(|e| PkiError::Peer(format!("certificate identity: {e}")))
}

/// Checks that a name a peer states in a message is the one in its certificate.
pub fn check_claim(identity: &Identity, claimed: &str) -> Result<(), PkiError> {
    if identity.name == claimed {
        return Ok(());
    }
    Err(PkiError::Peer(format!(
        "peer {identity} claims to be {:?}",
        claimed.chars().take(80).collect::<String>()
    )))
}

/// Checks that `identity` has `role`.
pub fn check_role(identity: &Identity, role: Role) -> Result<(), PkiError> {
    if identity.role == role {
        return Ok(());
    }
    Err(PkiError::Peer(format!(
        "peer {identity} has role {}, this needs role {role}",
        identity.role
    )))
}

// ---------------------------------------------------------------------------------------
// Issuing

/// A CA certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CaBundle {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate issued by a CA, with its key and serial number.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: Serial,
}

// Keys are never logged: Debug shows the certificate side only.
impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate serial number (big-endian bytes, as in the certificate).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Serial(pub Vec<u8>);

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a few minutes ago (clock skew) until `days` from now.
    pub fn days_from_now(days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

fn p256_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| PkiError::internal(format!("key generation failed: {e}")))
}

/// A random positive 16-byte serial (RFC 5280: unique per CA, at most 20 bytes).
fn random_serial() -> Result<Serial, PkiError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::internal("the OS random generator failed"))?;
    // Top bit clear keeps it positive; a non-zero first byte keeps the DER length fixed,
    // so the bytes we report are the bytes in the certificate.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(Serial(bytes.to_vec()))
}

fn set_validity(params: &mut CertificateParams, validity: Validity) -> Result<(), PkiError> {
    if validity.not_after <= validity.not_before {
        return Err(PkiError::config(
            "certificate validity ends before it starts",
        ));
    }
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    Ok(())
}

fn ia5(s: &str) -> Result<rcgen::Ia5String, PkiError> {
    rcgen::Ia5String::try_from(s).map_err(|e| PkiError::config(format!("{s:?}: {e}")))
}

/// A new study CA (self-signed, P-256) that may sign certificates and CRLs.
pub fn generate_ca(common_name: &str, validity_days: u32) -> Result<CaBundle, PkiError> {
    let key = p256_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    // Path length 0: this CA signs end-entity certificates only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = ca_key_usages();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?.0));
    set_validity(&mut params, Validity::days_from_now(validity_days))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| PkiError::internal(format!("signing the CA: {e}")))?;
    Ok(CaBundle {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn ca_key_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ]
}

/// The CA as rcgen needs it to sign: a certificate with the same subject and key.
struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// Rebuilds the signing side of a CA made by [`generate_ca`] from its PEM files. rcgen signs
/// with a certificate object, so we re-create one with the same subject and key and check
/// that the subject comes out byte for byte the same (otherwise issued certificates would
/// not chain); a CA from elsewhere is refused here, not mis-issued.
fn load_issuer(ca: &CaBundle) -> Result<Issuer, PkiError> {
    let key = KeyPair::from_pem(&ca.key_pem)
        .map_err(|e| PkiError::config(format!("CA key does not parse: {e}")))?;
    let der = first_cert_der(ca.cert_pem.as_bytes())?;
    let (_, x509) = X509Certificate::from_der(&der)
        .map_err(|e| PkiError::config(format!("CA certificate does not parse: {e}")))?;
    if x509.public_key().raw != key.public_key_der().as_slice() {
        return Err(PkiError::config(
            "the CA key does not belong to the CA certificate",
        ));
    }
    if !x509.is_ca() {
        return Err(PkiError::config(
            "the CA certificate is not a CA (basicConstraints)",
        ));
    }
    let mut dn = DistinguishedName::new();
    for rdn in x509.subject().iter() {
        for attr in rdn.iter() {
            let oid: Vec<u64> = attr
                .attr_type()
                .iter()
                .ok_or_else(|| PkiError::config("CA subject has an attribute OID out of range"))?
                .collect();
            let value = attr.attr_value();
            let text = || {
                std::str::from_utf8(value.data)
                    .map(str::to_owned)
                    .map_err(|_| PkiError::config("CA subject attribute is not UTF-8"))
            };
            let v = match value.tag() {
                x509_parser::der_parser::asn1_rs::Tag::Utf8String => DnValue::Utf8String(text()?),
                x509_parser::der_parser::asn1_rs::Tag::PrintableString => DnValue::PrintableString(
                    text()?
                        .try_into()
                        .map_err(|e| PkiError::config(format!("CA subject attribute: {e}")))?,
                ),
                other => {
                    return Err(PkiError::config(format!(
                        "CA subject uses string type {other}; issue with your own PKI instead"
                    )))
                }
            };
            dn.push(DnType::from_oid(&oid), v);
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = ca_key_usages();
    let cert = params
        .self_signed(&key)
        .map_err(|e| PkiError::internal(format!("rebuilding the CA: {e}")))?;
    let (_, rebuilt) = X509Certificate::from_der(cert.der())
        .map_err(|e| PkiError::internal(format!("rebuilt CA does not parse: {e}")))?;
    if rebuilt.subject().as_raw() != x509.subject().as_raw() {
        return Err(PkiError::config(
            "the CA's subject cannot be reproduced for signing (was it made by `pki init`?)",
        ));
    }
    Ok(Issuer { cert, key })
}

fn leaf_params(validity: Validity, cn: &str) -> Result<(CertificateParams, Serial), PkiError> {
    let serial = random_serial()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(&serial.0));
    set_validity(&mut params, validity)?;
    Ok((params, serial))
}

fn sign_leaf(
    ca: &CaBundle,
    params: CertificateParams,
    serial: Serial,
) -> Result<IssuedCert, PkiError> {
    let issuer = load_issuer(ca)?;
    let key = p256_key()?;
    let cert = params
        .signed_by(&key, &issuer.cert, &issuer.key)
        .map_err(|e| PkiError::internal(format!("signing the certificate: {e}")))?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial,
    })
}

/// The coordinator's server certificate, for the given DNS names and IP addresses.
pub fn issue_server_cert(
    ca: &CaBundle,
    dns_names: &[String],
    ip_addrs: &[IpAddr],
    validity_days: u32,
) -> Result<IssuedCert, PkiError> {
    if dns_names.is_empty() && ip_addrs.is_empty() {
        return Err(PkiError::config(
            "a server certificate needs a DNS name or an IP",
        ));
    }
    let cn = dns_names
        .first()
        .cloned()
        .or_else(|| ip_addrs.first().map(ToString::to_string))
        .unwrap_or_default();
    let (mut params, serial) = leaf_params(Validity::days_from_now(validity_days), &cn)?;
    for name in dns_names {
        params.subject_alt_names.push(SanType::DnsName(ia5(name)?));
    }
    for ip in ip_addrs {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign_leaf(ca, params, serial)
}

/// A site, operator or auditor certificate valid for `validity_days` from now.
pub fn issue_identity_cert(
    ca: &CaBundle,
    identity: &Identity,
    validity_days: u32,
) -> Result<IssuedCert, PkiError> {
    issue_identity_cert_with_validity(ca, identity, Validity::days_from_now(validity_days))
}

/// As [`issue_identity_cert`] with an explicit validity window (tests use past windows).
pub fn issue_identity_cert_with_validity(
    ca: &CaBundle,
    identity: &Identity,
    validity: Validity,
) -> Result<IssuedCert, PkiError> {
    validate_name(&identity.name).map_err(PkiError::Config)?;
    let (mut params, serial) = leaf_params(validity, &identity.name)?;
    params
        .subject_alt_names
        .push(SanType::URI(ia5(&identity.to_uri())?));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    sign_leaf(ca, params, serial)
}

/// A CRL (PEM) signed by `ca` that revokes `revoked`; `crl_number` must grow with every
/// CRL the CA issues. Valid for `validity_days`, though expired CRLs are still applied.
pub fn issue_crl(
    ca: &CaBundle,
    revoked: &[Serial],
    crl_number: u64,
    validity_days: u32,
) -> Result<String, PkiError> {
    let issuer = load_issuer(ca)?;
    let now = SystemTime::now();
    let params = CertificateRevocationListParams {
        this_update: now.into(),
        next_update: (now + Duration::from_secs(u64::from(validity_days.max(1)) * 86_400)).into(),
        crl_number: SerialNumber::from(crl_number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&s.0),
                revocation_time: now.into(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: issuer.cert.params().key_identifier_method.clone(),
    };
    let crl = params
        .signed_by(&issuer.cert, &issuer.key)
        .map_err(|e| PkiError::internal(format!("signing the CRL: {e}")))?;
    crl.pem()
        .map_err(|e| PkiError::internal(format!("encoding the CRL: {e}")))
}

/// What an existing CRL (PEM or DER) says: its number and revoked serials.
pub fn read_crl(crl: &[u8]) -> Result<(u64, Vec<Serial>), PkiError> {
    let der = match CertificateRevocationListDer::from_pem_slice(crl) {
        Ok(d) => d.as_ref().to_vec(),
        Err(_) => crl.to_vec(),
    };
    let (_, parsed) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| PkiError::config(format!("CRL does not parse: {e}")))?;
    let number = parsed
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let serials = parsed
        .iter_revoked_certificates()
        .map(|r| Serial(r.raw_serial().to_vec()))
        .collect();
    Ok((number, serials))
}

/// Serial number and issuer check of a certificate (PEM), for revocation.
pub fn cert_serial(cert_pem: &[u8]) -> Result<Serial, PkiError> {
    let der = first_cert_der(cert_pem)?;
    let (_, x509) = X509Certificate::from_der(&der)
        .map_err(|e| PkiError::config(format!("certificate does not parse: {e}")))?;
    Ok(Serial(x509.raw_serial().to_vec()))
}

/// Whether `cert_pem` names `ca_pem` as its issuer (issuer name and key identifier).
pub fn is_issued_by(cert_pem: &[u8], ca_pem: &[u8]) -> Result<bool, PkiError> {
    let der = first_cert_der(cert_pem)?;
    let ca_der = first_cert_der(ca_pem)?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| PkiError::config(format!("certificate does not parse: {e}")))?;
    let (_, ca) = X509Certificate::from_der(&ca_der)
        .map_err(|e| PkiError::config(format!("CA certificate does not parse: {e}")))?;
    // Names and key identifiers, not the signature (x509-parser's `verify` feature is off):
    // enough to stop revoking a certificate in the wrong CA's CRL, not a trust decision.
    let aki = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0),
            _ => None,
        });
    let ski = ca
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
            _ => None,
        });
    let keys_match = match (aki, ski) {
        (Some(a), Some(s)) => a == s,
        _ => true,
    };
    Ok(cert.issuer().as_raw() == ca.subject().as_raw() && keys_match)
}

// ---------------------------------------------------------------------------------------
// rustls configurations

fn certs_der(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::config(format!("{what} PEM does not parse: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::config(format!("{what} PEM holds no certificate")));
    }
    Ok(certs)
}

fn first_cert_der(pem: &[u8]) -> Result<CertificateDer<'static>, PkiError> {
    certs_der(pem, "certificate")?
        .into_iter()
        .next()
        .ok_or_else(|| PkiError::config("certificate PEM holds no certificate"))
}

fn key_der(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PkiError> {
    // The error never quotes the key bytes.
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| PkiError::config(format!("private key PEM does not parse: {e}")))
}

fn roots(ca_pem: &[u8]) -> Result<Arc<rustls::RootCertStore>, PkiError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certs_der(ca_pem, "CA")? {
        store
            .add(cert)
            .map_err(|e| PkiError::config(format!("CA certificate refused: {e}")))?;
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The coordinator's TLS configuration: TLS 1.3 only, fedpriv ALPN, client certificates
/// required and verified against `ca_pem` and the given CRLs (PEM).
pub fn server_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    crls: &[Vec<u8>],
) -> Result<rustls::ServerConfig, PkiError> {
    let mut crl_ders = Vec::new();
    for crl in crls {
        let parsed = CertificateRevocationListDer::pem_slice_iter(crl)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::config(format!("CRL PEM does not parse: {e}")))?;
        if parsed.is_empty() {
            return Err(PkiError::config("CRL PEM holds no CRL"));
        }
        crl_ders.extend(parsed);
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .with_crls(crl_ders)
            .build()
            .map_err(|e| PkiError::config(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::internal(format!("TLS 1.3 with ring: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs_der(cert_pem, "server certificate")?,
            key_der(key_pem)?,
        )
        .map_err(|e| PkiError::config(format!("server certificate and key: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A site's (or operator's, auditor's) TLS configuration: TLS 1.3 only, fedpriv ALPN,
/// the server verified against `ca_pem`, our certificate presented.
pub fn client_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ClientConfig, PkiError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::internal(format!("TLS 1.3 with ring: {e}")))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(
            certs_der(cert_pem, "client certificate")?,
            key_der(key_pem)?,
        )
        .map_err(|e| PkiError::config(format!("client certificate and key: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_and_names() {
        let id = Identity::new(Role::Site, "st-marys").expect("valid");
        assert_eq!(id.to_uri(), "fedpriv://site/st-marys");
        assert_eq!(
            Identity::from_uri("fedpriv://site/st-marys"),
            Ok(id.clone())
        );
        assert_eq!(Identity::from_uri("FEDPRIV://site/st-marys"), Ok(id));
        for bad in [
            "fedpriv://site/",
            "fedpriv://site/St-Marys",
            "fedpriv://site/-x",
            "fedpriv://site/a/b",
            "fedpriv://admin/x",
            "fedpriv:/site/x",
            "https://site/x",
            "fedpriv://site/ x",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad}");
        }
        assert!(validate_name(&"a".repeat(63)).is_ok());
        assert!(validate_name(&"a".repeat(64)).is_err());
        assert!(validate_name("0.a_b-c").is_ok());
        assert_eq!("operator".parse(), Ok(Role::Operator));
    }

    #[test]
    fn issued_identity_round_trips_and_chains() {
        let ca = generate_ca("test study CA", 30).expect("ca");
        let id = Identity::new(Role::Auditor, "carol").expect("valid");
        let leaf = issue_identity_cert(&ca, &id, 10).expect("issue");
        let der = first_cert_der(leaf.cert_pem.as_bytes()).expect("der");
        assert_eq!(identity_from_cert(&der).expect("identity"), id);
        assert_eq!(
            cert_serial(leaf.cert_pem.as_bytes()).expect("serial"),
            leaf.serial
        );
        assert!(is_issued_by(leaf.cert_pem.as_bytes(), ca.cert_pem.as_bytes()).expect("parse"));
        let other = generate_ca("other", 30).expect("ca");
        assert!(!is_issued_by(leaf.cert_pem.as_bytes(), other.cert_pem.as_bytes()).expect("parse"));
        assert!(!format!("{leaf:?}{ca:?}").contains("PRIVATE"));
        // Server certificates carry no identity.
        let srv = issue_server_cert(
            &ca,
            &["localhost".into()],
            &["127.0.0.1".parse().expect("ip")],
            10,
        )
        .expect("server");
        let der = first_cert_der(srv.cert_pem.as_bytes()).expect("der");
        assert!(matches!(identity_from_cert(&der), Err(PkiError::Peer(_))));
        // Configs build.
        server_config(
            ca.cert_pem.as_bytes(),
            srv.cert_pem.as_bytes(),
            srv.key_pem.as_bytes(),
            &[],
        )
        .expect("server config");
        client_config(
            ca.cert_pem.as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .expect("client config");
    }

    #[test]
    fn identity_needs_exactly_one_fedpriv_uri() {
        let ca = generate_ca("ca", 30).expect("ca");
        let issuer = load_issuer(&ca).expect("issuer");
        let make = |uris: &[&str]| {
            let mut p = CertificateParams::default();
            for u in uris {
                p.subject_alt_names.push(SanType::URI(ia5(u).expect("ia5")));
            }
            let key = p256_key().expect("key");
            p.signed_by(&key, &issuer.cert, &issuer.key).expect("sign")
        };
        let two = make(&["fedpriv://site/a", "fedpriv://site/b"]);
        assert!(identity_from_cert(two.der()).is_err());
        let none = make(&["https://hospital.example/x"]);
        assert!(identity_from_cert(none.der()).is_err());
        let bad = make(&["fedpriv://site/UPPER"]);
        assert!(identity_from_cert(bad.der()).is_err());
        let mixed = make(&["https://hospital.example/x", "fedpriv://operator/ops"]);
        assert_eq!(
            identity_from_cert(mixed.der()).expect("one"),
            Identity::new(Role::Operator, "ops").expect("valid")
        );
        assert!(identity_from_cert(b"not a certificate").is_err());
    }

    #[test]
    fn crl_round_trip() {
        let ca = generate_ca("ca", 30).expect("ca");
        let a =
            issue_identity_cert(&ca, &Identity::new(Role::Site, "a").expect("id"), 5).expect("a");
        let crl = issue_crl(&ca, std::slice::from_ref(&a.serial), 3, 30).expect("crl");
        let (n, serials) = read_crl(crl.as_bytes()).expect("parses");
        assert_eq!(n, 3);
        assert_eq!(serials, vec![a.serial]);
        server_config(
            ca.cert_pem.as_bytes(),
            a.cert_pem.as_bytes(),
            a.key_pem.as_bytes(),
            &[crl.into_bytes()],
        )
        .expect("config with CRL");
    }

    #[test]
    fn foreign_ca_key_is_refused() {
        let ca = generate_ca("ca", 30).expect("ca");
        let other = generate_ca("other", 30).expect("ca");
        let mixed = CaBundle {
            cert_pem: ca.cert_pem.clone(),
            key_pem: other.key_pem.clone(),
        };
        let id = Identity::new(Role::Site, "a").expect("id");
        assert!(matches!(
            issue_identity_cert(&mixed, &id, 1),
            Err(PkiError::Config(_))
        ));
        let bad_validity = Validity {
            not_before: SystemTime::now(),
            not_after: SystemTime::now() - Duration::from_secs(10),
        };
        assert!(issue_identity_cert_with_validity(&ca, &id, bad_validity).is_err());
    }
}
