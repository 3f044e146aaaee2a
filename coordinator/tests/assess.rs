//! `study assess`: the privacy impact assessment's figures are the accountant's, a budget
//! too small for one round says so, and text from the study file cannot break the
//! Markdown.

use std::process::Command;

use fedpriv_common::config::{round_cost, StudyConfig};
use fedpriv_common::dp::accountant;
use fedpriv_coordinator::assess::{
    assess, md, parse_site_records, Accuracy, AssessError, SiteOutcome, SiteRecords,
};

const STUDY: &str = include_str!("../../examples/configs/study-record.toml");

fn study(edit: impl Fn(String) -> String) -> StudyConfig {
    StudyConfig::from_toml(&edit(STUDY.to_string())).expect("valid study")
}

fn counts(n: &[u64]) -> Vec<SiteRecords> {
    n.iter()
        .map(|&records| SiteRecords {
            site: None,
            records,
        })
        .collect()
}

#[test]
fn epsilon_figures_are_a_fresh_accountant_call() {
    let cfg = study(|s| s);
    let a = assess(&cfg, &counts(&[200, 150, 91])).expect("assessed");
    let p = &cfg.privacy;
    let eps = |events: &[_]| accountant::epsilon(p.accountant, events, p.delta).expect("eps");
    let mut worst = 0.0f64;
    for (site, n) in a.sites.iter().zip([200u64, 150, 91]) {
        let SiteOutcome::Priced(pr) = &site.outcome else {
            panic!("{site:?}")
        };
        let cost = round_cost(
            p.unit,
            p.placement,
            p.noise_multiplier.get(),
            &cfg.local,
            Some(n),
        )
        .expect("cost");
        assert_eq!(pr.round, cost);
        assert!((cost.q.get() - 16.0 / n as f64).abs() < 1e-15);
        assert_eq!(pr.epsilon_one_round, eps(&[cost]));
        assert_eq!(
            pr.epsilon_planned,
            eps(&vec![cost; cfg.rounds as usize]),
            "{n}"
        );
        // The coordinator's rule: a round starts only if the site stays within budget.
        let r = pr.rounds_affordable as usize;
        assert!(eps(&vec![cost; r]) <= p.epsilon.get(), "{n}: {r} rounds");
        assert!(
            eps(&vec![cost; r + 1]) > p.epsilon.get(),
            "{n}: {r} + 1 rounds"
        );
        assert_eq!(pr.rounds_taken, (r as u64).min(a.study_rounds));
        assert_eq!(pr.epsilon_spent, eps(&vec![cost; pr.rounds_taken as usize]));
        worst = worst.max(pr.epsilon_spent);
    }
    assert_eq!(a.study_epsilon, worst);
    // The smaller a site, the larger its q: it buys fewer rounds.
    let bought: Vec<u64> = a
        .sites
        .iter()
        .map(|s| match &s.outcome {
            SiteOutcome::Priced(p) => p.rounds_affordable,
            SiteOutcome::Excluded(_) => 0,
        })
        .collect();
    assert!(
        bought[0] >= bought[1] && bought[1] >= bought[2],
        "{bought:?}"
    );
    // min_sites = 2: the study runs as long as its second best-funded site.
    assert_eq!(a.study_rounds, bought[1].min(cfg.rounds));
    let text = a.to_markdown();
    for s in &a.sites {
        let SiteOutcome::Priced(pr) = &s.outcome else {
            continue;
        };
        assert!(
            text.contains(&format!("{:.4}", pr.epsilon_one_round)),
            "{text}"
        );
        // The reproducing command's figures are the same event's.
        assert!(
            text.contains(&format!(
                "budget epsilon --sample-rate {} --noise-multiplier {} --steps {}",
                pr.round.q.get(),
                pr.round.sigma.get(),
                pr.round.steps * pr.rounds_taken.max(1)
            )),
            "{text}"
        );
    }
    assert!(text.contains(&cfg.mechanism_digest()));
    assert!(text.contains("## Sign-off"));
    assert!(text.contains("audit log is never pruned"));
}

#[test]
fn a_budget_too_small_for_one_round_says_so() {
    let cfg = study(|s| s.replace("epsilon = 2.0", "epsilon = 0.01"));
    let a = assess(&cfg, &counts(&[200, 150])).expect("assessed");
    assert_eq!(a.study_rounds, 0);
    for s in &a.sites {
        let SiteOutcome::Priced(pr) = &s.outcome else {
            panic!("{s:?}")
        };
        assert_eq!(pr.rounds_affordable, 0);
        assert_eq!(pr.rounds_taken, 0);
        assert_eq!(pr.epsilon_spent, 0.0);
        assert!(pr.epsilon_one_round > 0.01);
    }
    let text = a.to_markdown();
    assert!(
        text.contains("not even one round fits the budget"),
        "{text}"
    );
    assert!(text.contains("The study cannot run"), "{text}");
    assert!(matches!(a.accuracy, Accuracy::None(_)));
}

#[test]
fn sites_the_coordinator_would_exclude_are_named_with_the_reason() {
    // 1e-5: a site of 100,000 records has delta * n = 1; 10 records < expected batch 16.
    let cfg = study(|s| s);
    let a = assess(&cfg, &counts(&[100_000, 10, 200])).expect("assessed");
    let reasons: Vec<String> = a
        .sites
        .iter()
        .map(|s| match &s.outcome {
            SiteOutcome::Excluded(r) => r.clone(),
            SiteOutcome::Priced(_) => "priced".into(),
        })
        .collect();
    assert!(reasons[0].contains("not below 1 / 100000"), "{reasons:?}");
    assert!(
        reasons[1].contains("fewer than the expected batch"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2], "priced");
    // One site left for min_sites = 2: the study cannot run.
    assert_eq!(a.study_rounds, 0);
}

#[test]
fn site_unit_rounds_cost_the_same_at_every_site() {
    let cfg = StudyConfig::from_toml(
        &STUDY
            .replace(
                "local_steps = 5\nexpected_batch = 16.0",
                "local_epochs = 1\nbatch_size = 16",
            )
            .replace(
                "unit = \"record\"",
                "unit = \"site\"\nplacement = \"local\"",
            )
            .replace("noise_multiplier = 2.5", "noise_multiplier = 8.0")
            .replace("epsilon = 2.0", "epsilon = 8.0"),
    )
    .expect("valid");
    let a = assess(&cfg, &counts(&[50, 5000])).expect("assessed");
    let priced: Vec<_> = a
        .sites
        .iter()
        .map(|s| match &s.outcome {
            SiteOutcome::Priced(p) => p.clone(),
            SiteOutcome::Excluded(r) => panic!("{r}"),
        })
        .collect();
    assert_eq!(priced[0], priced[1]);
    assert_eq!(priced[0].round.q.get(), 1.0);
    assert_eq!(priced[0].round.sigma.get(), 4.0);
    let text = a.to_markdown();
    assert!(text.contains("never sees an un-noised update"), "{text}");
}

#[test]
fn config_strings_are_escaped_in_the_markdown() {
    let cfg = study(|s| {
        s.replace(
            "features = [\"mean_radius\",",
            "categorical = { \"ward|x\" = [\"a|b\", \"<script>alert(1)</script>\", \"line\\nbreak\"] }\nfeatures = [\"mean_radius\",",
        )
        .replace("label = \"malignant\"", "label = \"*bad*|label\"")
    });
    let text = assess(&cfg, &counts(&[200, 200]))
        .expect("assessed")
        .to_markdown();
    assert!(!text.contains("<script>"), "{text}");
    assert!(text.contains("\\<script\\>"), "{text}");
    // Every table row has as many cell delimiters as its header.
    let mut header_cells = None;
    for line in text.lines() {
        if !line.starts_with('|') {
            header_cells = None;
            continue;
        }
        let unescaped = line
            .char_indices()
            .filter(|&(i, c)| c == '|' && !line[..i].ends_with('\\'))
            .count();
        match header_cells {
            None => header_cells = Some(unescaped),
            Some(n) => assert_eq!(unescaped, n, "a row with a broken cell: {line}"),
        }
    }
    assert!(text.contains("\\*bad\\*\\|label"), "{text}");
    assert!(text.contains("a\\|b"), "{text}");
    // A newline in a category does not end the table row.
    assert!(text.contains("line\\\\u{a}break"), "{text}");
    assert_eq!(md("a_b`c"), "a\\_b\\`c");
}

#[test]
fn record_counts_by_position_or_by_name() {
    let cfg = study(|s| s);
    let named = parse_site_records("general=150, st-marys=200", &cfg).expect("named");
    assert_eq!(named[0].site.as_deref(), Some("general"));
    assert_eq!(named[1].records, 200);
    assert_eq!(parse_site_records("200,150", &cfg).expect("plain").len(), 2);
    for bad in [
        "",
        "200,,150",
        "0",
        "-3",
        "lots",
        "nowhere=10",
        "general=1,general=2",
        "general=1,2",
        "1,2,3,4",
    ] {
        assert!(
            matches!(
                parse_site_records(bad, &cfg),
                Err(AssessError::SiteRecords(_))
            ),
            "{bad:?}"
        );
    }
}

/// The figures quoted for a matching task are docs/accuracy.md's, cell for cell, at the
/// largest measured budget the study can use; other tasks get none.
#[test]
fn measured_accuracy_is_quoted_from_the_accuracy_doc() {
    let doc = include_str!("../../docs/accuracy.md");
    let site_unit = |s: String| {
        s.replace(
            "local_steps = 5\nexpected_batch = 16.0",
            "local_epochs = 1\nbatch_size = 16",
        )
        .replace(
            "unit = \"record\"",
            "unit = \"site\"\nplacement = \"local\"",
        )
        .replace("noise_multiplier = 2.5", "noise_multiplier = 40.0")
    };
    let diabetes = |s: String| {
        s.replace(
            "model = { kind = \"logistic_regression\" }",
            "model = { kind = \"linear_regression\" }",
        )
        .replace(
            "task = \"binary\"\nlabel = \"malignant\"",
            "task = \"regression\"\nlabel = \"progression\"\nlabel_range = [0.0, 400.0]",
        )
    };
    type Edit<'a> = &'a dyn Fn(String) -> String;
    let cases: [(Edit, &[f64]); 3] = [
        (&|s| s, &[0.5, 1.0, 2.0, 4.0, 8.0]),
        (&site_unit, &[0.5, 1.0, 2.0, 4.0, 8.0]),
        (&diabetes, &[1.0, 4.0, 8.0]),
    ];
    for (edit, budgets) in cases {
        for &budget in budgets {
            // Exactly a measured budget, and one between it and the next measured one.
            for (b, want) in [(budget, budget), (budget * 1.5, budget)] {
                let cfg = study(|s| {
                    // Little noise and many rounds: the budget is the only limit.
                    edit(s)
                        .replace("noise_multiplier = 2.5", "noise_multiplier = 1.2")
                        .replace("rounds = 40", "rounds = 5000")
                        .replace("epsilon = 2.0", &format!("epsilon = {b}"))
                });
                let a = assess(&cfg, &counts(&[1000, 1000, 1000])).expect("assessed");
                let Accuracy::Measured(m) = &a.accuracy else {
                    panic!("{budget}: {:?}", a.accuracy)
                };
                assert_eq!(m.epsilon, want, "budget {b}");
                assert!(doc.contains(m.iid), "{}", m.iid);
                assert!(doc.contains(m.non_iid), "{}", m.non_iid);
                let row = doc
                    .lines()
                    .find(|l| l.contains(m.iid) && l.contains(m.non_iid))
                    .unwrap_or_else(|| panic!("no row with {} and {}", m.iid, m.non_iid));
                let label = row.split('|').nth(1).unwrap_or("").trim();
                let eps = label.split_whitespace().next().unwrap_or("");
                assert_eq!(eps.parse::<f64>().ok(), Some(m.epsilon), "{row}");
                let text = a.to_markdown();
                assert!(text.contains(m.iid) && text.contains(m.non_iid));
            }
        }
    }
    // Below the smallest measured budget, or another task: nothing is made up.
    let small = study(|s| s.replace("epsilon = 2.0", "epsilon = 0.3"));
    let a = assess(&small, &counts(&[1000, 1000])).expect("assessed");
    assert!(matches!(&a.accuracy, Accuracy::None(w) if w.contains("no measured accuracy")));
    let other = study(|s| s.replace("label = \"malignant\"", "label = \"relapse\""));
    let a = assess(&other, &counts(&[1000, 1000])).expect("assessed");
    assert!(matches!(&a.accuracy, Accuracy::None(w) if w.contains("no measured accuracy")));
    assert!(a
        .to_markdown()
        .contains("no measured accuracy is available"));
}

#[test]
fn the_command_writes_the_assessment_or_refuses_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let study_file = dir.path().join("study.toml");
    std::fs::write(&study_file, STUDY).expect("write");
    let out_file = dir.path().join("pia.md");
    let bin = env!("CARGO_BIN_EXE_fedpriv-coordinator");
    let out = Command::new(bin)
        .args(["study", "assess", "--study"])
        .arg(&study_file)
        .args([
            "--site-records",
            "st-marys=200,general=150,childrens=91",
            "--out",
        ])
        .arg(&out_file)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_file).expect("written");
    assert!(text.starts_with("# Privacy impact assessment: study breast-cancer"));
    assert!(text.contains("| childrens | 91 |"), "{text}");
    let out = Command::new(bin)
        .args(["study", "assess", "--study"])
        .arg(&study_file)
        .args(["--site-records", "nowhere=5"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--site-records") && err.contains("nowhere"),
        "{err}"
    );
}

/// A study with DP evaluation is assessed with its evaluations' spend: the planned epsilon
/// is the accountant's over the training and the evaluations those rounds carry, and the
/// budget buys fewer rounds than without them.
#[test]
fn evaluations_are_part_of_the_assessed_spend() {
    use fedpriv_common::dp::SgmEvent;
    let plain = study(|s| s);
    let with = study(|s| {
        format!("{s}\n[evaluation]\nevery = 2\nnoise_multiplier = 3.0\nloss_clip = 1.0\n")
    });
    let a = assess(&plain, &counts(&[200])).expect("assessed");
    let b = assess(&with, &counts(&[200])).expect("assessed");
    let (SiteOutcome::Priced(pa), SiteOutcome::Priced(pb)) =
        (&a.sites[0].outcome, &b.sites[0].outcome)
    else {
        panic!("{a:?} {b:?}")
    };
    assert!(
        pb.rounds_affordable < pa.rounds_affordable,
        "{} vs {}",
        pb.rounds_affordable,
        pa.rounds_affordable
    );
    let p = &with.privacy;
    let plan = with.evaluation.expect("plan");
    let mut events = Vec::new();
    for r in 1..=with.rounds {
        events.push(pb.round);
        if plan.is_due(r) {
            events.push(plan.event());
        }
    }
    let want = accountant::epsilon(p.accountant, &events, p.delta).expect("eps");
    assert!(
        (pb.epsilon_planned - want).abs() <= 1e-9 * want.max(1.0),
        "{} vs {want}",
        pb.epsilon_planned
    );
    // The rounds it says the budget buys fit, and one more would not.
    let fits = |r: u64| {
        let mut ev: Vec<SgmEvent> = Vec::new();
        for i in 1..=r {
            ev.push(pb.round);
            if plan.is_due(i) {
                ev.push(plan.event());
            }
        }
        accountant::epsilon(p.accountant, &ev, p.delta).expect("eps") <= p.epsilon.get()
    };
    assert!(fits(pb.rounds_affordable));
    assert!(!fits(pb.rounds_affordable + 1));
}
