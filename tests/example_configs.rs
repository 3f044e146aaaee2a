//! The example configurations in the README must parse and validate.

use std::path::Path;

use fedpriv_client::config::SiteConfig;
use fedpriv_common::config::{PrivacyUnit, StudyConfig};
use fedpriv_coordinator::limits::Limits;

#[test]
fn example_study_and_site_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    let text = std::fs::read_to_string(root.join("study-record.toml")).expect("read");
    let study = StudyConfig::from_toml(&text).expect("valid study");
    assert_eq!(study.privacy.unit, PrivacyUnit::Record);
    let site = SiteConfig::load(&root.join("site.toml")).expect("valid site config");
    assert!(study.enrolled.contains(&site.name));
    // The example site accepts the example study as it is written: the terms it pins are
    // the study's (what `fedpriv-client terms` would print for it).
    let pinned = &site.studies[&study.id];
    let source = &site.sources[&pinned.source];
    let from_study = SiteConfig::from_toml(
        &format!(
            "{}\n{}",
            text_head(&root.join("site.toml")),
            fedpriv_client::config::pinned_terms_toml(
                &study,
                &pinned.source,
                source.records,
                pinned.epsilon_cap.get()
            )
        ),
        &root,
    )
    .expect("the pinned table parses");
    assert_eq!(from_study.studies[&study.id], *pinned);
}

/// The site config up to its first study table.
fn text_head(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read");
    text.split("[studies.").next().expect("head").to_string()
}

/// The example limits file lists every key at its default: it parses (so every key in it
/// is known), and gives exactly the built-in defaults (so the documented values are the
/// real ones, and a changed default is noticed here).
#[test]
fn example_limits_file_lists_the_defaults() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    let text = std::fs::read_to_string(root.join("limits.toml")).expect("read");
    let limits = Limits::from_toml(&text).expect("valid limits");
    assert_eq!(format!("{limits:?}"), format!("{:?}", Limits::default()));
    // Every key is there: leaving out any one still gives the defaults, so count them
    // instead (11 top-level keys or tables, 2 + 2 rate keys, 6 transport keys).
    let keys = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.contains('=') || l.starts_with('['))
        .count();
    assert_eq!(keys, 11 + 2 + 2 + 6, "every limit is listed");
    // A misspelt key in an operator's copy is refused by name, not ignored.
    let typo = text.replace("handshakes_in_flight", "handshakes_inflight");
    let e = Limits::from_toml(&typo).expect_err("unknown key");
    assert!(e.contains("handshakes_inflight"), "{e}");
}
