//! `fedpriv-coordinator report` on a real federation's state directory (the demo: a
//! coordinator and three site daemons over loopback QUIC with real certificates), opened in
//! headless Chromium: the page renders (a screenshot that is not blank, with the plots'
//! colours in it), each plot has a marker per ledger point, and markup put into the audit
//! log (a refusal's reason, a requester's identity, an exporter's name) stays text.
//!
//! Needs Chromium at /usr/bin/chromium (Debian's `chromium` package; `.ci/run` installs it).
//! Without it the test fails rather than skips: CI must have it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedpriv::demo::{self, DemoOptions};
use fedpriv_common::audit::details::{Details, ModelExported, Refused};
use fedpriv_common::audit_file::AuditLog;
use fedpriv_coordinator::store::Store;

const SCRIPT: &str = "<script>alert(1)</script>";
const IMG: &str = "\"><img src=x onerror=alert(1)>";

fn chromium() -> PathBuf {
    let fixed = PathBuf::from("/usr/bin/chromium");
    if fixed.is_file() {
        return fixed;
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromium is not installed: this test renders the study report in headless \
             Chromium. Install it (Debian: `apt-get update && apt-get install -y chromium`; \
             .ci/run does this) and run the test again"
        )
    })
}

/// Screenshots `html` in headless Chromium at 1200x2000; returns the PNG's path.
fn screenshot(html: &Path, dir: &Path) -> PathBuf {
    let png = dir.join("report.png");
    let profile = dir.join("chromium-profile");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1200,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait().expect("wait for chromium") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("chromium did not finish within 120 s");
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let out = child.wait_with_output().expect("chromium output");
    assert!(
        png.is_file(),
        "chromium wrote no screenshot (status {:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    png
}

/// `(data-plot, <circle> count)` of each figure; also checks its `data-points`.
fn plots(html: &str) -> Vec<(String, usize)> {
    html.split("<figure ")
        .skip(1)
        .map(|rest| {
            let body = &rest[..rest.find("</figure>").expect("closed figure")];
            let attr = |name: &str| {
                let key = format!("{name}=\"");
                let start = body.find(&key).expect("attribute") + key.len();
                body[start..start + body[start..].find('"').expect("quote")].to_string()
            };
            let circles = body.matches("<circle").count();
            assert_eq!(
                attr("data-points").parse::<usize>().expect("a count"),
                circles
            );
            (attr("data-plot"), circles)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_federation_s_report_renders_in_chromium_with_its_points_and_no_markup() {
    let chromium = chromium(); // before the federation: fail at once if it is missing
    assert!(chromium.is_file());
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 4,
        epsilon: 5.0,
        non_iid: false,
        // Round 3 evaluates the model after round 2 at the sites (noised).
        evaluation: Some((2, 2.0, 1.0)),
        ..DemoOptions::default()
    };
    let run = demo::run(dir.path(), &opts, |_| {})
        .await
        .expect("demo runs");
    let state = &run.state_dir;
    let study = run.study_id.as_str();

    // What a hostile peer or a careless operator could put in the log, on record the way
    // the coordinator writes it (the coordinator has stopped; the log is ours to append).
    {
        let mut log = AuditLog::open(state.join("audit.log")).expect("audit log");
        let refused = Refused::Request {
            identity: format!("operator/{SCRIPT}"),
            remote: "127.0.0.1:1".into(),
            action: format!("change {IMG}"),
            reason: format!("refused: {SCRIPT} {IMG}"),
            study: Some(study.to_string()),
        };
        log.append_now("coordinator", Refused::EVENT, refused.to_value())
            .expect("append");
        let last = Store::open_read_only(state.join("coordinator.db"))
            .expect("store")
            .model_versions(study)
            .expect("versions")
            .last()
            .cloned()
            .expect("a model version");
        let exported = ModelExported {
            study: study.to_string(),
            model_version: last.round,
            sha256: last.sha256.clone(),
            by: format!("local/{IMG}"),
            to: format!("/tmp/{SCRIPT}.safetensors"),
        };
        log.append_now("local/test", ModelExported::EVENT, exported.to_value())
            .expect("append");
    }

    let out = dir.path().join("report.html");
    let said = fedpriv_coordinator::report::run(study, state, &out).expect("report");
    assert!(said.contains("report.html"), "{said}");
    let html = std::fs::read_to_string(&out).expect("read report");

    // Inert: no markup from the log, no script, the policy, nothing to fetch.
    let lower = html.to_ascii_lowercase();
    assert!(!lower.contains("<script"), "a script element");
    assert!(!lower.contains("<img"), "an img element");
    assert!(!html.contains(SCRIPT) && !html.contains(IMG));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"));
    assert!(html.contains(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
    ));
    let urls = lower.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    assert!(!urls.contains("http://") && !urls.contains("https://"));

    // Every point on the ledger is on the plots.
    let store = Store::open_read_only(state.join("coordinator.db")).expect("store");
    let ledger = store.ledger(study).expect("ledger");
    assert!(!ledger.is_empty());
    let mut rounds: Vec<u64> = ledger.iter().map(|r| r.round).collect();
    rounds.dedup();
    let evaluations = store.evaluations(study).expect("evaluations").len();
    assert_eq!(evaluations, 1);
    let found = plots(&html);
    assert_eq!(
        found,
        vec![
            ("epsilon".to_string(), ledger.len()),
            ("sites".to_string(), 2 * rounds.len()),
            ("evaluation".to_string(), evaluations),
            ("evaluation".to_string(), evaluations),
        ],
        "{} ledger rows over {} rounds",
        ledger.len(),
        rounds.len()
    );
    for site in demo::SITES {
        assert!(html.contains(site), "{site} in the per-site figures");
    }
    assert!(
        html.contains(&format!("local/{}", "&quot;&gt;&lt;img")),
        "the exporter"
    );

    // Headless Chromium draws it.
    let png = screenshot(&out, dir.path());
    // To look at them: FEDPRIV_REPORT_KEEP=DIR keeps the page and the screenshot there.
    if let Some(keep) = std::env::var_os("FEDPRIV_REPORT_KEEP") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).expect("keep dir");
        std::fs::copy(&out, keep.join("report.html")).expect("keep the page");
        std::fs::copy(&png, keep.join("report.png")).expect("keep the screenshot");
    }
    let img = image::open(&png).expect("decode the screenshot").to_rgb8();
    assert_eq!((img.width(), img.height()), (1200, 2000));
    let mut colours = std::collections::HashSet::new();
    let mut ink = 0usize;
    // The budget line's red and the third series' green: only the plots (and their legend
    // swatches, some 200 pixels each) have them. (The second series' orange is mostly
    // under the third where the sites' figures coincide.)
    let mut plotted = [0usize; 2];
    let near = |p: [u8; 3], q: [u8; 3]| p.iter().zip(q).all(|(a, b)| a.abs_diff(b) < 25);
    for p in img.pixels() {
        colours.insert(p.0);
        if p.0.iter().any(|&v| v < 245) {
            ink += 1;
        }
        for (n, c) in plotted.iter_mut().zip([[214, 39, 40], [44, 160, 44]]) {
            if near(p.0, c) {
                *n += 1;
            }
        }
    }
    let total = (img.width() * img.height()) as usize;
    if std::env::var_os("FEDPRIV_REPORT_KEEP").is_some() {
        eprintln!(
            "{} colours, {ink} of {total} inked, plotted {plotted:?}",
            colours.len()
        );
    }
    assert!(
        colours.len() > 50,
        "{} colours: a blank page?",
        colours.len()
    );
    assert!(
        ink * 100 > total * 3,
        "{ink} of {total} pixels not white: a blank page?"
    );
    for (n, what) in plotted.iter().zip(["budget red", "green"]) {
        assert!(
            *n > 600,
            "{n} pixels of the plots' {what}: were the SVGs drawn?"
        );
    }
}
