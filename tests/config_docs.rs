//! Every TOML example in the configuration references (docs/study-config.md,
//! docs/site-config.md) is parsed with the real parser, so the docs cannot drift from it.
//!
//! The convention the docs state: a ```` ```toml ```` block is a complete config and must
//! validate; ```` ```toml fragment ```` is merged into the page's first complete block
//! (key by key: tables, inline ones included, are merged into the base's; any other value
//! replaces the base's) and must validate; ```` ```toml refused ```` is merged the same way
//! and must be refused. Any other word after `toml` is an error here, so a mistyped marker
//! cannot silently skip a block.

use std::path::Path;

use fedpriv_client::config::SiteConfig;
use fedpriv_common::config::StudyConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Complete,
    Fragment,
    Refused,
}

#[derive(Debug)]
struct Block {
    kind: Kind,
    /// 1-based line of the opening fence, for messages.
    line: usize,
    text: String,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    // The block being read: `None` inside a fence of another language, which is skipped.
    let mut open: Option<Option<Block>> = None;
    for (i, line) in doc.lines().enumerate() {
        match open.as_mut() {
            None => {
                let Some(info) = line.strip_prefix("```") else {
                    continue;
                };
                let mut words = info.split_whitespace();
                if words.next() != Some("toml") {
                    open = Some(None);
                    continue;
                }
                let kind = match words.next() {
                    None => Kind::Complete,
                    Some("fragment") => Kind::Fragment,
                    Some("refused") => Kind::Refused,
                    Some(other) => panic!("line {}: unknown toml block marker {other:?}", i + 1),
                };
                open = Some(Some(Block {
                    kind,
                    line: i + 1,
                    text: String::new(),
                }));
            }
            Some(block) => {
                if line.trim_end() == "```" {
                    if let Some(b) = open.take().flatten() {
                        out.push(b);
                    }
                } else if let Some(b) = block {
                    b.text.push_str(line);
                    b.text.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "an unclosed code block");
    out
}

/// `base` with `over` merged in: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Checks every block of `doc` with `parse`; returns how many blocks of each kind.
fn check_doc(name: &str, parse: impl Fn(&str) -> Result<(), String>) -> [usize; 3] {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name);
    let doc = std::fs::read_to_string(&path).expect("read the doc");
    let all = blocks(&doc);
    let base = all
        .iter()
        .find(|b| b.kind == Kind::Complete)
        .unwrap_or_else(|| panic!("{name}: no complete example"));
    let base_table: toml::Table = toml::from_str(&base.text).expect("the base is TOML");
    let mut counts = [0; 3];
    for b in &all {
        let text = match b.kind {
            Kind::Complete => b.text.clone(),
            Kind::Fragment | Kind::Refused => {
                let over: toml::Table = toml::from_str(&b.text)
                    .unwrap_or_else(|e| panic!("{name}:{}: not TOML: {e}", b.line));
                let mut t = base_table.clone();
                merge(&mut t, over);
                toml::to_string(&t).expect("serialise the merged example")
            }
        };
        let result = parse(&text);
        match b.kind {
            Kind::Complete | Kind::Fragment => {
                if let Err(e) = result {
                    panic!(
                        "{name}:{}: the documented example does not parse: {e}\n{text}",
                        b.line
                    );
                }
            }
            Kind::Refused => {
                assert!(
                    result.is_err(),
                    "{name}:{}: documented as refused, but it parses:\n{text}",
                    b.line
                );
            }
        }
        counts[b.kind as usize] += 1;
    }
    counts
}

#[test]
fn every_study_config_example_parses() {
    let counts = check_doc("study-config.md", |t| {
        StudyConfig::from_toml(t)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    // The page has complete, fragment and refused examples: an edit that loses all of one
    // kind (say, by breaking the fence syntax) is noticed.
    assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
    assert!(counts[Kind::Complete as usize] >= 2, "{counts:?}");
}

#[test]
fn every_site_config_example_parses() {
    // Parsing reads no file (the daemon opens them at start), so the paths need not exist.
    let counts = check_doc("site-config.md", |t| {
        SiteConfig::from_toml(t, Path::new("/etc/fedpriv"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
}

/// The complete examples in the docs are the shipped example files, so the README's
/// walk-through and the reference show the same config.
#[test]
fn the_first_complete_examples_are_the_shipped_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (doc, file, parse) in [
        (
            "study-config.md",
            "examples/configs/study-record.toml",
            (|t: &str| format!("{:?}", StudyConfig::from_toml(t))) as fn(&str) -> String,
        ),
        ("site-config.md", "examples/configs/site.toml", |t: &str| {
            format!("{:?}", SiteConfig::from_toml(t, Path::new("/etc/fedpriv")))
        }),
    ] {
        let text = std::fs::read_to_string(root.join("docs").join(doc)).expect("read");
        let first = blocks(&text)
            .into_iter()
            .find(|b| b.kind == Kind::Complete)
            .expect("a complete example");
        let shipped = std::fs::read_to_string(root.join(file)).expect("read");
        assert_eq!(
            parse(&first.text),
            parse(&shipped),
            "{doc}'s first example differs from {file}"
        );
    }
}

#[test]
fn the_block_reader_sees_markers_and_skips_other_languages() {
    let doc = "x\n```sh\nnot toml = \n```\n```toml\na = 1\n```\n```toml fragment\nb = 2\n```\n```toml refused\nc = 3\n```\n";
    let b = blocks(doc);
    let kinds: Vec<Kind> = b.iter().map(|b| b.kind).collect();
    assert_eq!(kinds, [Kind::Complete, Kind::Fragment, Kind::Refused]);
    assert_eq!(b[0].text, "a = 1\n");
    let mut base: toml::Table = toml::from_str("[s]\nx = 1\ny = 2").expect("toml");
    merge(
        &mut base,
        toml::from_str("[s]\ny = 3\n[t]\nz = 4").expect("toml"),
    );
    assert_eq!(
        base,
        toml::from_str::<toml::Table>("[s]\nx = 1\ny = 3\n[t]\nz = 4").expect("toml")
    );
}
