//! The example configurations in the README must parse and validate.

use std::path::Path;

use fedpriv_client::config::SiteConfig;
use fedpriv_common::config::{PrivacyUnit, StudyConfig};

#[test]
fn example_study_and_site_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    let text = std::fs::read_to_string(root.join("study-record.toml")).expect("read");
    let study = StudyConfig::from_toml(&text).expect("valid study");
    assert_eq!(study.privacy.unit, PrivacyUnit::Record);
    let site = SiteConfig::load(&root.join("site.toml")).expect("valid site config");
    assert!(site.studies.contains_key(&study.id));
    assert!(study.enrolled.contains(&site.name));
}
