//! `fedpriv-coordinator pki ...`: create a study CA, issue certificates, revoke them.
//!
//! Files (PEM): `ca.pem`, `ca.key`, `server.pem`, `server.key` from `init`;
//! `<name>.pem`, `<name>.key` (plus a copy of `ca.pem` if the directory has none) from
//! `issue`; a CRL from `revoke`. Keys are written with mode 0600 in directories made 0700,
//! are never printed, and are never overwritten: an existing key file is an error.
//! Hospitals with their own PKI skip these commands (see [`fedpriv_common::pki`]).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use fedpriv_common::pki::{self, CaBundle, Identity, Role};

/// File names inside a CA directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";

/// Names an issued certificate may not take (they would collide with the CA's files).
const RESERVED_NAMES: [&str; 3] = ["ca", "server", "crl"];

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a study CA and the coordinator's server certificate in DIR.
    Init {
        /// Directory to create the files in (made if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// DNS names sites use to reach the coordinator (repeatable).
        #[arg(long = "name", value_name = "DNS", default_values_t = ["localhost".to_owned()])]
        names: Vec<String>,
        /// IP addresses sites use to reach the coordinator (repeatable).
        #[arg(long = "ip", value_name = "IP", default_values_t = [IpAddr::from([127, 0, 0, 1]), IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])])]
        ips: Vec<IpAddr>,
        /// Validity of the server certificate, in days.
        #[arg(long, default_value_t = 398, value_name = "DAYS")]
        days: u32,
        /// Validity of the CA certificate, in days.
        #[arg(long = "ca-days", default_value_t = 3650, value_name = "DAYS")]
        ca_days: u32,
        /// Common name of the CA certificate.
        #[arg(
            long = "ca-name",
            default_value = "fedpriv study CA",
            value_name = "TEXT"
        )]
        ca_name: String,
    },
    /// Issue a certificate for a site, an operator or an auditor.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long = "ca-dir", value_name = "DIR")]
        ca_dir: PathBuf,
        /// What the holder may do.
        #[arg(long, value_name = "site|operator|auditor")]
        role: Role,
        /// Holder's name (`[a-z0-9][a-z0-9._-]{0,62}`); also the file names.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Directory to write NAME.pem and NAME.key in (made if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_name = "DAYS")]
        days: u32,
    },
    /// Add a certificate to the CA's revocation list (the file is created if missing).
    Revoke {
        /// Directory holding ca.pem and ca.key.
        #[arg(long = "ca-dir", value_name = "DIR")]
        ca_dir: PathBuf,
        /// The certificate (PEM) to revoke.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The CRL (PEM) to update; pass the same file to the coordinator.
        #[arg(long, value_name = "FILE")]
        crl: PathBuf,
        /// Days until the CRL's next-update date.
        #[arg(long, default_value_t = 30, value_name = "DAYS")]
        days: u32,
    },
}

/// Runs a `pki` command; returns what to print. Errors say whose fault.
pub fn run(cmd: &PkiCommand) -> Result<String, String> {
    match cmd {
        PkiCommand::Init {
            out,
            names,
            ips,
            days,
            ca_days,
            ca_name,
        } => init(out, names, ips, *days, *ca_days, ca_name),
        PkiCommand::Issue {
            ca_dir,
            role,
            name,
            out,
            days,
        } => issue(ca_dir, *role, name, out, *days),
        PkiCommand::Revoke {
            ca_dir,
            cert,
            crl,
            days,
        } => revoke(ca_dir, cert, crl, *days),
    }
}

fn check_days(days: u32) -> Result<(), String> {
    if days == 0 {
        return Err("config error: --days must be at least 1".into());
    }
    Ok(())
}

fn init(
    out: &Path,
    names: &[String],
    ips: &[IpAddr],
    days: u32,
    ca_days: u32,
    ca_name: &str,
) -> Result<String, String> {
    check_days(days)?;
    check_days(ca_days)?;
    let files = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY].map(|f| out.join(f));
    refuse_existing(&files)?;
    let ca = pki::generate_ca(ca_name, ca_days).map_err(|e| e.to_string())?;
    let server = pki::issue_server_cert(&ca, names, ips, days).map_err(|e| e.to_string())?;
    make_private_dir(out)?;
    write_new(&files[0], ca.cert_pem.as_bytes(), false)?;
    write_new(&files[1], ca.key_pem.as_bytes(), true)?;
    write_new(&files[2], server.cert_pem.as_bytes(), false)?;
    write_new(&files[3], server.key_pem.as_bytes(), true)?;
    Ok(format!(
        "study CA and server certificate written to {dir}\n  \
         CA certificate (give to every site): {ca}\n  \
         CA key (keep offline, 0600): {cak}\n  \
         server certificate for {names:?} {ips:?}, serial {serial}: {srv}\n\
         next: fedpriv-coordinator pki issue --ca-dir {dir} --role site --name <site> --out <dir>",
        dir = out.display(),
        ca = files[0].display(),
        cak = files[1].display(),
        serial = server.serial,
        srv = files[2].display(),
    ))
}

fn issue(ca_dir: &Path, role: Role, name: &str, out: &Path, days: u32) -> Result<String, String> {
    check_days(days)?;
    let identity = Identity::new(role, name).map_err(|e| e.to_string())?;
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "config error: name {name:?} is reserved for the CA's own files; choose another"
        ));
    }
    let ca = load_ca(ca_dir)?;
    let cert_path = out.join(format!("{name}.pem"));
    let key_path = out.join(format!("{name}.key"));
    refuse_existing(&[cert_path.clone(), key_path.clone()])?;
    let issued = pki::issue_identity_cert(&ca, &identity, days).map_err(|e| e.to_string())?;
    make_private_dir(out)?;
    write_new(&cert_path, issued.cert_pem.as_bytes(), false)?;
    write_new(&key_path, issued.key_pem.as_bytes(), true)?;
    // The holder also needs the CA certificate to verify the coordinator.
    let ca_copy = out.join(CA_CERT);
    let copied = if ca_copy.exists() {
        String::new()
    } else {
        write_new(&ca_copy, ca.cert_pem.as_bytes(), false)?;
        format!("\n  CA certificate: {}", ca_copy.display())
    };
    Ok(format!(
        "issued {uri} (serial {serial}, {days} days)\n  certificate: {cert}\n  key (0600): {key}{copied}",
        uri = identity.to_uri(),
        serial = issued.serial,
        cert = cert_path.display(),
        key = key_path.display(),
    ))
}

fn revoke(ca_dir: &Path, cert: &Path, crl_path: &Path, days: u32) -> Result<String, String> {
    check_days(days)?;
    let ca = load_ca(ca_dir)?;
    let cert_pem = read(cert)?;
    let issued_here = pki::is_issued_by(&cert_pem, ca.cert_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if !issued_here {
        return Err(format!(
            "config error: {} was not issued by the CA in {}; revoke it with its own CA",
            cert.display(),
            ca_dir.display()
        ));
    }
    let serial = pki::cert_serial(&cert_pem).map_err(|e| e.to_string())?;
    let (number, mut serials) = if crl_path.exists() {
        let old = read(crl_path)?;
        pki::read_crl(&old).map_err(|e| format!("{}: {e}", crl_path.display()))?
    } else {
        (0, Vec::new())
    };
    let already = serials.contains(&serial);
    if !already {
        serials.push(serial.clone());
    }
    let crl =
        pki::issue_crl(&ca, &serials, number.saturating_add(1), days).map_err(|e| e.to_string())?;
    replace_file(crl_path, crl.as_bytes())?;
    Ok(format!(
        "{what} serial {serial}; {path} lists {n} certificate(s), CRL number {num}\n\
         the coordinator refuses them once started with this CRL",
        what = if already {
            "already revoked:"
        } else {
            "revoked"
        },
        path = crl_path.display(),
        n = serials.len(),
        num = number.saturating_add(1),
    ))
}

/// Reads the CA's certificate and key from `dir`.
pub fn load_ca(dir: &Path) -> Result<CaBundle, String> {
    let text = |p: PathBuf| {
        String::from_utf8(read(&p)?)
            .map_err(|_| format!("config error: {} is not PEM text", p.display()))
    };
    Ok(CaBundle {
        cert_pem: text(dir.join(CA_CERT))?,
        key_pem: text(dir.join(CA_KEY))?,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("config error: cannot read {}: {e}", path.display()))
}

fn refuse_existing(paths: &[PathBuf]) -> Result<(), String> {
    for p in paths {
        if p.exists() {
            return Err(format!(
                "config error: {} already exists; refusing to overwrite keys or certificates",
                p.display()
            ));
        }
    }
    Ok(())
}

fn make_private_dir(dir: &Path) -> Result<(), String> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Creates `path` (never overwrites), 0600 if `secret`, and syncs it.
fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), String> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, if secret { 0o600 } else { 0o644 });
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Replaces `path` atomically (temporary file in the same directory, then rename), so a
/// coordinator never reads half a CRL.
fn replace_file(path: &Path, contents: &[u8]) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp); // a leftover from a crashed run; absent is fine
    write_new(&tmp, contents, false)?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot replace {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    fn mode(p: &Path) -> u32 {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).expect("metadata").permissions().mode() & 0o777
        }
        #[cfg(not(unix))]
        {
            let _ = p;
            0o600
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: PkiCommand,
    }

    #[test]
    fn command_line_parses_with_defaults() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["pki", "init", "--out", "d"]).expect("parses");
        let PkiCommand::Init { names, ips, .. } = cli.cmd else {
            panic!("not init");
        };
        assert_eq!(names, vec!["localhost".to_owned()]);
        let expected: Vec<IpAddr> =
            vec!["127.0.0.1".parse().expect("ip"), "::1".parse().expect("ip")];
        assert_eq!(ips, expected);
        let cli = Cli::try_parse_from([
            "pki", "issue", "--ca-dir", "ca", "--role", "operator", "--name", "alice", "--out", "o",
        ])
        .expect("parses");
        assert!(matches!(
            cli.cmd,
            PkiCommand::Issue {
                role: Role::Operator,
                days: 365,
                ..
            }
        ));
        assert!(Cli::try_parse_from([
            "pki", "issue", "--ca-dir", "ca", "--role", "admin", "--name", "a", "--out", "o",
        ])
        .is_err());
    }

    #[test]
    fn init_issue_revoke() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        let init_cmd = PkiCommand::Init {
            out: ca_dir.clone(),
            names: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().expect("ip")],
            days: 10,
            ca_days: 20,
            ca_name: "test CA".into(),
        };
        let msg = run(&init_cmd).expect("init");
        assert!(!msg.contains("PRIVATE"));
        assert_eq!(mode(&ca_dir.join(CA_KEY)), 0o600);
        assert_eq!(mode(&ca_dir.join(SERVER_KEY)), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
        // A second init must not overwrite the CA key.
        let before = fs::read(ca_dir.join(CA_KEY)).expect("read");
        assert!(run(&init_cmd)
            .expect_err("exists")
            .contains("already exists"));
        assert_eq!(fs::read(ca_dir.join(CA_KEY)).expect("read"), before);

        let site_dir = dir.path().join("st-marys");
        let issue_cmd = PkiCommand::Issue {
            ca_dir: ca_dir.clone(),
            role: Role::Site,
            name: "st-marys".into(),
            out: site_dir.clone(),
            days: 5,
        };
        run(&issue_cmd).expect("issue");
        assert_eq!(mode(&site_dir.join("st-marys.key")), 0o600);
        assert!(site_dir.join(CA_CERT).exists());
        assert!(run(&issue_cmd).is_err(), "no overwrite");
        let cert = fs::read(site_dir.join("st-marys.pem")).expect("read");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&cert).expect("pem");
        assert_eq!(
            pki::identity_from_cert(&der).expect("identity"),
            Identity::new(Role::Site, "st-marys").expect("id")
        );
        let bad = PkiCommand::Issue {
            ca_dir: ca_dir.clone(),
            role: Role::Site,
            name: "Bad Name".into(),
            out: site_dir.clone(),
            days: 5,
        };
        assert!(run(&bad).is_err());
        let reserved = PkiCommand::Issue {
            ca_dir: ca_dir.clone(),
            role: Role::Operator,
            name: "ca".into(),
            out: dir.path().join("x"),
            days: 5,
        };
        assert!(run(&reserved).expect_err("reserved").contains("reserved"));

        let crl = dir.path().join("crl.pem");
        let revoke_cmd = PkiCommand::Revoke {
            ca_dir: ca_dir.clone(),
            cert: site_dir.join("st-marys.pem"),
            crl: crl.clone(),
            days: 7,
        };
        run(&revoke_cmd).expect("revoke");
        let (n, serials) = pki::read_crl(&fs::read(&crl).expect("read")).expect("crl");
        assert_eq!((n, serials.len()), (1, 1));
        assert_eq!(serials[0], pki::cert_serial(&cert).expect("serial"));
        // Revoking again keeps one entry and bumps the number.
        assert!(run(&revoke_cmd).expect("again").contains("already revoked"));
        let (n, serials) = pki::read_crl(&fs::read(&crl).expect("read")).expect("crl");
        assert_eq!((n, serials.len()), (2, 1));
        // A certificate from another CA is refused.
        let other_dir = dir.path().join("other");
        run(&PkiCommand::Init {
            out: other_dir.clone(),
            names: vec!["localhost".into()],
            ips: vec![],
            days: 1,
            ca_days: 1,
            ca_name: "other".into(),
        })
        .expect("other init");
        let foreign = PkiCommand::Revoke {
            ca_dir: ca_dir.clone(),
            cert: other_dir.join(SERVER_CERT),
            crl,
            days: 7,
        };
        assert!(run(&foreign)
            .expect_err("foreign")
            .contains("not issued by"));
    }
}
