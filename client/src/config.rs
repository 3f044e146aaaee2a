//! The site's own configuration: where the coordinator is, the site's certificate, where
//! its data and state live, and its own privacy limits, which no coordinator can override.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedpriv_common::dp::accountant::AccountantKind;
use fedpriv_common::dp::{Delta, Epsilon};
use fedpriv_common::pki::validate_name;
use serde::Deserialize;

/// A site config that cannot be used, with the field at fault. The operator's fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SiteConfigError {
    #[error("invalid TOML: {0}")]
    Parse(String),
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
}

fn field(f: impl Into<String>, reason: impl std::fmt::Display) -> SiteConfigError {
    SiteConfigError::Field {
        field: f.into(),
        reason: reason.to_string(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    site: RawSite,
    coordinator: RawCoordinator,
    tls: RawTls,
    studies: BTreeMap<String, RawStudy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    state_dir: PathBuf,
    /// The largest delta this site accepts for any study.
    max_delta: f64,
    accountant: Option<AccountantKind>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    address: String,
    server_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStudy {
    /// CSV file with a header row.
    data: PathBuf,
    /// This site's own epsilon cap for the study (at the study's delta).
    epsilon_cap: f64,
    /// Columns the site knows hold no direct identifier although their name or values look
    /// like one (see `crate::identifiers`).
    #[serde(default)]
    allow_identifier_columns: Vec<String>,
}

/// One study the site takes part in.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteStudy {
    pub data: PathBuf,
    pub epsilon_cap: Epsilon,
    /// Columns of the data file this study may read although the identifier check would
    /// refuse them (the site's decision, audited); empty by default.
    pub allow_identifier_columns: Vec<String>,
}

/// A validated site config; relative paths are resolved against the config file's folder.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteConfig {
    pub name: String,
    pub state_dir: PathBuf,
    pub max_delta: Delta,
    pub accountant: AccountantKind,
    pub coordinator: std::net::SocketAddr,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub studies: BTreeMap<String, SiteStudy>,
}

impl SiteConfig {
    pub fn load(path: &Path) -> Result<Self, SiteConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SiteConfigError::Parse(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text, path.parent().unwrap_or(Path::new(".")))
    }

    pub fn from_toml(text: &str, base: &Path) -> Result<Self, SiteConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| SiteConfigError::Parse(e.to_string()))?;
        validate_name(&raw.site.name).map_err(|e| field("site.name", e))?;
        let max_delta = Delta::new(raw.site.max_delta).map_err(|e| field("site.max_delta", e))?;
        let coordinator = raw
            .coordinator
            .address
            .parse()
            .map_err(|e| field("coordinator.address", format!("{e} (expected IP:port)")))?;
        if raw.coordinator.server_name.is_empty() {
            return Err(field(
                "coordinator.server_name",
                "must name the coordinator's certificate (e.g. localhost)",
            ));
        }
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let mut studies = BTreeMap::new();
        for (id, s) in raw.studies {
            validate_name(&id).map_err(|e| field(format!("studies.{id}"), e))?;
            let epsilon_cap = Epsilon::new(s.epsilon_cap)
                .map_err(|e| field(format!("studies.{id}.epsilon_cap"), e))?;
            let allow_identifier_columns = validate_allowed_columns(s.allow_identifier_columns)
                .map_err(|e| field(format!("studies.{id}.allow_identifier_columns"), e))?;
            studies.insert(
                id,
                SiteStudy {
                    data: abs(s.data),
                    epsilon_cap,
                    allow_identifier_columns,
                },
            );
        }
        Ok(Self {
            name: raw.site.name,
            state_dir: abs(raw.site.state_dir),
            max_delta,
            accountant: raw.site.accountant.unwrap_or_default(),
            coordinator,
            server_name: raw.coordinator.server_name,
            ca: abs(raw.tls.ca),
            cert: abs(raw.tls.cert),
            key: abs(raw.tls.key),
            studies,
        })
    }
}

/// Column names as the CSV loader matches them: non-empty, no surrounding spaces (the
/// loader trims header names, so such an entry could never match), no control characters,
/// each listed once.
fn validate_allowed_columns(columns: Vec<String>) -> Result<Vec<String>, String> {
    let mut seen = std::collections::BTreeSet::new();
    for c in &columns {
        if c.is_empty() {
            return Err("a column name is empty".into());
        }
        if c.trim() != c {
            return Err(format!(
                "column {c:?} has leading or trailing spaces (header names are trimmed)"
            ));
        }
        if c.chars().any(char::is_control) {
            return Err(format!("column {c:?} contains a control character"));
        }
        if !seen.insert(c.as_str()) {
            return Err(format!("column {c:?} is listed twice"));
        }
    }
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[site]
name = "st-marys"
state_dir = "state"
max_delta = 1e-5

[coordinator]
address = "127.0.0.1:7443"
server_name = "localhost"

[tls]
ca = "pki/ca.pem"
cert = "pki/st-marys.pem"
key = "pki/st-marys.key"

[studies.bc]
data = "/data/bc.csv"
epsilon_cap = 3.0
"#;

    #[test]
    fn parses_and_resolves_paths() {
        let c = SiteConfig::from_toml(TOML, Path::new("/etc/fedpriv")).expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/etc/fedpriv/state"));
        assert_eq!(c.studies["bc"].data, PathBuf::from("/data/bc.csv"));
        assert_eq!(c.studies["bc"].epsilon_cap.get(), 3.0);
        assert!(c.studies["bc"].allow_identifier_columns.is_empty());
    }

    #[test]
    fn allowed_identifier_columns_parse_and_are_validated() {
        let ok = TOML.replace(
            "epsilon_cap = 3.0",
            "epsilon_cap = 3.0\nallow_identifier_columns = [\"zip3\", \"admission year\"]",
        );
        let c = SiteConfig::from_toml(&ok, Path::new("/")).expect("valid");
        assert_eq!(
            c.studies["bc"].allow_identifier_columns,
            ["zip3", "admission year"]
        );
        for bad in [
            r#"[""]"#,
            r#"[" zip3"]"#,
            r#"["zip3", "zip3"]"#,
            r#"["a\u0007"]"#,
        ] {
            let text = TOML.replace(
                "epsilon_cap = 3.0",
                &format!("epsilon_cap = 3.0\nallow_identifier_columns = {bad}"),
            );
            assert!(
                matches!(SiteConfig::from_toml(&text, Path::new("/")), Err(SiteConfigError::Field { field, .. }) if field == "studies.bc.allow_identifier_columns"),
                "{bad}"
            );
        }
        let wrong_type = TOML.replace(
            "epsilon_cap = 3.0",
            "epsilon_cap = 3.0\nallow_identifier_columns = \"zip3\"",
        );
        assert!(matches!(
            SiteConfig::from_toml(&wrong_type, Path::new("/")),
            Err(SiteConfigError::Parse(_))
        ));
    }

    #[test]
    fn errors_name_the_field() {
        let bad = TOML.replace("epsilon_cap = 3.0", "epsilon_cap = 0.0");
        assert!(
            matches!(SiteConfig::from_toml(&bad, Path::new("/")), Err(SiteConfigError::Field { field, .. }) if field == "studies.bc.epsilon_cap")
        );
        let bad = TOML.replace("max_delta = 1e-5", "max_delta = 2.0");
        assert!(
            matches!(SiteConfig::from_toml(&bad, Path::new("/")), Err(SiteConfigError::Field { field, .. }) if field == "site.max_delta")
        );
        let bad = TOML.replace("[tls]", "[tls]\ninsecure = true");
        assert!(matches!(
            SiteConfig::from_toml(&bad, Path::new("/")),
            Err(SiteConfigError::Parse(_))
        ));
    }
}
