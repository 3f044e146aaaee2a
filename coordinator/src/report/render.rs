//! A [`ReportData`] as one HTML page: inline CSS and SVG, no script, no external resource.
//!
//! Every string of the data is text from a config, a certificate, a peer or the audit log,
//! and goes through [`esc`] (attribute values too); numbers are formatted here. Plots are
//! `plotters` SVG (see [`super::plot`]), each in a `<figure data-plot=".." data-points="N">`
//! whose SVG holds exactly N `<circle>` markers.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fedpriv_common::time::utc_datetime;

use super::plot::{self, Plot, Series};
use super::{EvalPoint, ReportData, ReportError, Visibility};

/// The page's Content-Security-Policy: nothing may load or run; inline styles and data:
/// images only.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:";

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 2em auto; max-width: 1000px; color: #1b1b1b; background: #fff; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 3px solid #1f77b4; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #d0d0d0; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f0f4f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .digest { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .88em; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 1em; }
.card { border: 1px solid #d0d0d0; border-radius: 6px; padding: .6em 1em; min-width: 10em; background: #fafcff; }
.card .v { font-size: 1.5em; font-weight: 600; }
.bar { height: 12px; background: #e6e6e6; border-radius: 6px; overflow: hidden; margin-top: .3em; }
.bar > div { height: 100%; background: #1f77b4; }
.bar > div.over { background: #d62728; }
figure { margin: 1em 0; }
figcaption { font-size: .9em; }
.swatch { display: inline-block; width: .9em; height: .9em; border-radius: 2px; margin: 0 .3em 0 .8em; vertical-align: middle; }
.note { color: #555; font-size: .92em; }
dl.terms { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dl.terms dt { font-weight: 600; }
dl.terms dd { margin: 0; }
";

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// Escapes `s`, then turns its Markdown `**bold**` and `` `code` `` pairs into tags (the
/// terms' paragraph from [`crate::assess::protection_text`]).
fn inline_md(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in esc(s).split("**").enumerate() {
        let part = code_spans(part);
        if i % 2 == 1 {
            let _ = write!(out, "<strong>{part}</strong>");
        } else {
            out.push_str(&part);
        }
    }
    out
}

fn code_spans(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn eps(e: f64) -> String {
    if e.is_finite() {
        format!("{e:.4}")
    } else {
        "unbounded".into()
    }
}

fn when(t: i64) -> String {
    esc(&utc_datetime(t))
}

fn swatch(c: (u8, u8, u8)) -> String {
    format!(
        "<span class=\"swatch\" style=\"background:{}\"></span>",
        plot::hex(c)
    )
}

/// A plot in its figure, with an HTML legend of `(colour, name)` pairs.
fn figure(
    out: &mut String,
    kind: &str,
    p: &Plot,
    legend: &[((u8, u8, u8), String)],
    extra_attr: &str,
) -> Result<(), ReportError> {
    let svg = plot::svg(p).map_err(ReportError::Plot)?;
    let _ = write!(
        out,
        "<figure class=\"plot\" data-plot=\"{}\" data-points=\"{}\"{extra_attr}>\n{svg}\n<figcaption>",
        esc(kind),
        p.markers()
    );
    for (c, name) in legend {
        let _ = write!(out, "{}{}", swatch(*c), esc(name));
    }
    out.push_str("</figcaption></figure>\n");
    Ok(())
}

/// The page.
pub fn render(d: &ReportData) -> Result<String, ReportError> {
    let t = &d.terms;
    let mut o = String::with_capacity(64 * 1024);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Study report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&d.study)
    );
    let _ = write!(
        o,
        "<h1>Study report: {}</h1>\n<p class=\"note\">Made by <code>fedpriv-coordinator report</code> \
         on {} from the coordinator's state directory. Study created {}; status <strong>{}</strong>{}.</p>\n",
        esc(&d.study),
        when(d.generated_at),
        when(d.created_at),
        esc(&d.status),
        d.end_reason
            .as_deref()
            .map(|r| format!(" ({})", esc(r)))
            .unwrap_or_default()
    );

    // Summary cards.
    let left = (t.epsilon_budget - d.epsilon_spent).max(0.0);
    let used = if t.epsilon_budget > 0.0 {
        (d.epsilon_spent / t.epsilon_budget).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let completed = d.rounds.iter().filter(|r| r.status == "completed").count();
    let _ = write!(
        o,
        "<h2>Summary</h2>\n<div class=\"cards\">\n\
         <div class=\"card\"><div>Epsilon spent</div><div class=\"v\">{}</div><div>of {} at delta {}</div>\
         <div class=\"bar\"><div class=\"{}\" style=\"width:{:.1}%\"></div></div></div>\n\
         <div class=\"card\"><div>Budget left</div><div class=\"v\">{}</div><div>epsilon</div></div>\n\
         <div class=\"card\"><div>Rounds completed</div><div class=\"v\">{completed}</div><div>of {} planned ({} started)</div></div>\n\
         <div class=\"card\"><div>Sites enrolled</div><div class=\"v\">{}</div><div>at least {} per round</div></div>\n\
         <div class=\"card\"><div>Model versions</div><div class=\"v\">{}</div><div>{} export(s)</div></div>\n\
         </div>\n",
        eps(d.epsilon_spent),
        t.epsilon_budget,
        t.delta,
        if d.epsilon_spent > t.epsilon_budget { "over" } else { "" },
        used * 100.0,
        eps(left),
        t.rounds_planned,
        d.rounds.len(),
        d.enrolled,
        t.min_sites,
        d.models.len(),
        d.models.iter().map(|m| m.exports.len()).sum::<usize>(),
    );

    // Terms.
    let _ = write!(
        o,
        "<h2>Privacy terms</h2>\n<dl class=\"terms\">\n\
         <dt>Unit of privacy</dt><dd>{}</dd>\n\
         <dt>Noise placement</dt><dd>{}</dd>\n\
         <dt>Clip norm</dt><dd>{} ({} is clipped to this L2 norm)</dd>\n\
         <dt>Noise multiplier</dt><dd>{} (Gaussian noise of standard deviation {} &times; the clip norm)</dd>\n\
         <dt>Budget</dt><dd>epsilon {} per site at delta {}</dd>\n\
         <dt>Accountant</dt><dd>{} (every epsilon here is its figure for the recorded spends, composed, never added up)</dd>\n\
         <dt>Site sampling rate</dt><dd>{}</dd>\n\
         <dt>Training at each site</dt><dd>{}</dd>\n\
         <dt>Terms' SHA-256</dt><dd class=\"digest\">{}</dd>\n</dl>\n<p>{}</p>\n",
        esc(&t.unit),
        esc(&t.placement),
        t.clip_norm,
        esc(&t.clipped),
        t.noise_multiplier,
        t.noise_multiplier,
        t.epsilon_budget,
        t.delta,
        esc(&t.accountant),
        t.site_sample_rate,
        esc(&t.local_training),
        esc(&t.mechanism_sha256),
        inline_md(&t.protection),
    );

    // Epsilon per round.
    o.push_str("<h2>Epsilon per round</h2>\n");
    match &d.per_site {
        Some(ps) => {
            o.push_str(
                "<p class=\"note\">Each site's epsilon after each round it was charged for, \
                 against the budget (red). The study's epsilon is the worst site's.</p>\n",
            );
            let n = ps.sites.len();
            let series: Vec<Series> = ps
                .sites
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let points = s.points.iter().map(|p| (p.round as f64, p.epsilon));
                    Series::nth(i, n, points.collect())
                })
                .collect();
            let mut legend: Vec<_> = ps
                .sites
                .iter()
                .enumerate()
                .map(|(i, s)| (plot::colour(i), s.site.clone()))
                .collect();
            legend.push((plot::LIMIT, format!("budget {}", t.epsilon_budget)));
            let p = Plot {
                y_desc: "epsilon",
                series,
                limit: Some(t.epsilon_budget),
                from_zero: true,
                counts: false,
            };
            figure(&mut o, "epsilon", &p, &legend, "")?;
        }
        None => {
            let _ = writeln!(
                o,
                "<p class=\"note\">The study's epsilon (the worst site's) after each round, against \
                 the budget (red). Under {} placement who took part in a round is not shown: no \
                 per-site figures and no participants per round.</p>",
                esc(&t.placement)
            );
            let p = Plot {
                y_desc: "epsilon",
                series: vec![Series::nth(
                    0,
                    1,
                    d.study_epsilon
                        .iter()
                        .map(|p| (p.round as f64, p.epsilon))
                        .collect(),
                )],
                limit: Some(t.epsilon_budget),
                from_zero: true,
                counts: false,
            };
            let legend = [
                (plot::colour(0), "study (worst site)".to_string()),
                (plot::LIMIT, format!("budget {}", t.epsilon_budget)),
            ];
            figure(&mut o, "epsilon", &p, &legend, "")?;
        }
    }

    // Per-site table and sites per round.
    if let Some(ps) = &d.per_site {
        o.push_str(
            "<table><tr><th>site</th><th>rounds charged</th><th>epsilon</th><th>budget left</th></tr>\n",
        );
        for s in &ps.sites {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&s.site),
                s.points.len(),
                eps(s.epsilon),
                eps((t.epsilon_budget - s.epsilon).max(0.0))
            );
        }
        o.push_str("</table>\n");

        o.push_str(
            "<h2>Sites per round</h2>\n<p class=\"note\">Sites charged for each round (their \
             tasks were sent) and sites whose updates went into the round's model version.</p>\n",
        );
        let charged: Vec<(f64, f64)> = ps
            .participants
            .iter()
            .map(|r| (r.round as f64, r.charged.len() as f64))
            .collect();
        let contributed: Vec<(f64, f64)> = ps
            .participants
            .iter()
            .map(|r| (r.round as f64, r.contributed.len() as f64))
            .collect();
        let p = Plot {
            y_desc: "sites",
            series: vec![
                Series::nth(0, 2, charged),
                Series {
                    colour: plot::colour(2),
                    ..Series::nth(1, 2, contributed)
                },
            ],
            limit: None,
            from_zero: true,
            counts: true,
        };
        let legend = [
            (plot::colour(0), "charged".to_string()),
            (plot::colour(2), "contributed to the model".to_string()),
        ];
        figure(&mut o, "sites", &p, &legend, "")?;
        o.push_str("<table><tr><th>round</th><th>charged</th><th>contributed</th></tr>\n");
        for r in &ps.participants {
            let names = |v: &[String]| v.iter().map(|s| esc(s)).collect::<Vec<_>>().join(", ");
            let _ = writeln!(
                o,
                "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                r.round,
                names(&r.charged),
                names(&r.contributed)
            );
        }
        o.push_str("</table>\n");
    } else {
        let _ = write!(
            o,
            "<h2>Sites per round</h2>\n<p class=\"note\">Not shown: under {} placement the \
             report keeps who took part in each round, and how many, hidden.</p>\n",
            esc(&t.placement)
        );
    }

    // Evaluation.
    o.push_str("<h2>Evaluation</h2>\n");
    if d.evaluations.is_empty() {
        o.push_str("<p class=\"note\">No federated evaluation on record for this study.</p>\n");
    } else {
        o.push_str(
            "<p class=\"note\">Noised per-round metrics from the sites, with a band of \
             &plusmn;2 standard deviations of the noise added to each.</p>\n",
        );
        let mut by_metric: BTreeMap<&str, Vec<&EvalPoint>> = BTreeMap::new();
        for e in &d.evaluations {
            by_metric.entry(e.metric.as_str()).or_default().push(e);
        }
        for (i, (metric, mut pts)) in by_metric.into_iter().enumerate() {
            pts.sort_by_key(|e| e.round);
            let c = plot::colour(i);
            let p = Plot {
                y_desc: "value",
                series: vec![Series {
                    colour: c,
                    points: pts.iter().map(|e| (e.round as f64, e.value)).collect(),
                    width: 2,
                    band: Some(
                        pts.iter()
                            .map(|e| {
                                (
                                    e.round as f64,
                                    e.value - 2.0 * e.noise_sd,
                                    e.value + 2.0 * e.noise_sd,
                                )
                            })
                            .collect(),
                    ),
                }],
                limit: None,
                from_zero: false,
                counts: false,
            };
            let _ = writeln!(o, "<h3>{}</h3>", esc(metric));
            let legend = [(c, format!("{metric} (band: ±2 sd of the noise)"))];
            figure(
                &mut o,
                "evaluation",
                &p,
                &legend,
                &format!(" data-metric=\"{}\"", esc(metric)),
            )?;
        }
    }

    // Model versions.
    o.push_str("<h2>Model versions</h2>\n");
    if d.models.is_empty() {
        o.push_str("<p class=\"note\">No model version yet.</p>\n");
    } else {
        let contributors = d.visibility == Visibility::PerSite;
        let _ = writeln!(
            o,
            "<table><tr><th>round</th><th>created</th><th>SHA-256 (sealed checkpoint)</th>{}<th>file</th><th>exported</th></tr>",
            if contributors { "<th>sites</th>" } else { "" }
        );
        for m in &d.models {
            let exports = if m.exports.is_empty() {
                "&mdash;".to_string()
            } else {
                m.exports
                    .iter()
                    .map(|e| {
                        format!(
                            "{} by {} to <code>{}</code>",
                            when(e.at),
                            esc(&e.by),
                            esc(&e.to)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("<br>")
            };
            let _ = writeln!(
                o,
                "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"digest\">{}</td>{}<td>{}</td><td>{exports}</td></tr>",
                m.round,
                when(m.created_at),
                esc(&m.sha256),
                match (contributors, m.contributors) {
                    (true, Some(n)) => format!("<td class=\"num\">{n}</td>"),
                    (true, None) => "<td></td>".to_string(),
                    (false, _) => String::new(),
                },
                m.pruned_at
                    .map(|at| format!("pruned {}", when(at)))
                    .unwrap_or_else(|| "kept".into()),
            );
        }
        o.push_str("</table>\n");
    }

    // Rounds.
    o.push_str("<h2>Rounds</h2>\n");
    if d.rounds.is_empty() {
        o.push_str("<p class=\"note\">No round has started.</p>\n");
    } else {
        o.push_str("<table><tr><th>round</th><th>status</th><th>started</th><th>finished</th><th>reason</th></tr>\n");
        for r in &d.rounds {
            let _ = writeln!(
                o,
                "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                r.round,
                esc(&r.status),
                when(r.started_at),
                r.finished_at.map(when).unwrap_or_default(),
                r.reason.as_deref().map(esc).unwrap_or_default()
            );
        }
        o.push_str("</table>\n");
    }

    // Refusals and alerts.
    o.push_str("<h2>Refusals and alerts</h2>\n");
    for (title, items) in [("Refusals", &d.refusals), ("Alerts", &d.alerts)] {
        let _ = writeln!(o, "<h3>{title} ({})</h3>", items.len());
        if items.is_empty() {
            o.push_str("<p class=\"note\">None on record for this study.</p>\n");
            continue;
        }
        o.push_str("<table><tr><th>audit seq</th><th>time</th><th>event</th><th>who / about</th><th>what</th><th>why</th></tr>\n");
        for a in items {
            let _ = writeln!(
                o,
                "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                a.seq,
                when(a.at),
                esc(&a.event),
                esc(&a.subject),
                esc(&a.what),
                esc(&a.detail)
            );
        }
        o.push_str("</table>\n");
    }
    if d.withheld_records > 0 {
        let _ = writeln!(
            o,
            "<p class=\"note\">{} refusal(s) or alert(s) about single sites in single rounds are \
             not listed: under {} placement they would tell who took part.</p>",
            d.withheld_records,
            esc(&t.placement)
        );
    }
    if d.service_wide_records > 0 {
        let _ = writeln!(
            o,
            "<p class=\"note\">{} other refusal(s) and alert(s) in the audit log name no study \
             (connections, other sources); <code>fedpriv-coordinator admin audit</code> lists them.</p>",
            d.service_wide_records
        );
    }

    let _ = write!(
        o,
        "<h2>Audit log</h2>\n<p style=\"white-space: pre-line\">{}</p>\n</body>\n</html>\n",
        esc(&d.audit_log)
    );
    Ok(o)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::report::{
        AuditItem, EpsilonPoint, ExportInfo, ModelInfo, PerSite, RoundInfo, RoundParticipants,
        SiteSeries, Terms,
    };

    const SCRIPT: &str = "<script>alert(1)</script>";
    const IMG: &str = "\"><img src=x onerror=alert(1)>";

    fn data(hostile: &str) -> ReportData {
        let pt = |round, epsilon| EpsilonPoint { round, epsilon };
        let site = |name: &str, e: f64| SiteSeries {
            site: name.to_string(),
            points: vec![pt(0, e / 2.0), pt(1, e)],
            epsilon: e,
        };
        let item = |event: &str| AuditItem {
            seq: 7,
            at: 1_700_000_000,
            event: event.into(),
            subject: format!("site/{hostile}"),
            what: format!("action {hostile}"),
            detail: format!("reason {hostile}"),
        };
        ReportData {
            study: format!("study {hostile}"),
            status: "completed".into(),
            end_reason: Some(format!("ended {hostile}")),
            created_at: 1_700_000_000,
            generated_at: 1_700_000_100,
            terms: Terms {
                unit: "record (each patient record; DP-SGD at each site)".into(),
                placement: "local".into(),
                clip_norm: 1.0,
                clipped: "each record's gradient".into(),
                noise_multiplier: 1.1,
                epsilon_budget: 3.0,
                delta: 1e-5,
                accountant: "pld".into(),
                site_sample_rate: 1.0,
                rounds_planned: 2,
                min_sites: 2,
                local_training: "5 DP-SGD steps".into(),
                protection: "Each **patient** record, `record` unit.".into(),
                mechanism_sha256: "ab".repeat(32),
            },
            visibility: Visibility::PerSite,
            enrolled: 2,
            epsilon_spent: 1.2,
            study_epsilon: vec![pt(0, 0.6), pt(1, 1.2)],
            per_site: Some(PerSite {
                sites: vec![site(&format!("a{hostile}"), 1.2), site("b", 1.0)],
                participants: vec![
                    RoundParticipants {
                        round: 0,
                        charged: vec![format!("a{hostile}"), "b".into()],
                        contributed: vec!["b".into()],
                    },
                    RoundParticipants {
                        round: 1,
                        charged: vec![format!("a{hostile}"), "b".into()],
                        contributed: vec![format!("a{hostile}"), "b".into()],
                    },
                ],
            }),
            rounds: vec![RoundInfo {
                round: 0,
                status: "aborted".into(),
                started_at: 1_700_000_000,
                finished_at: Some(1_700_000_010),
                reason: Some(format!("aborted {hostile}")),
            }],
            models: vec![ModelInfo {
                round: 1,
                sha256: format!("digest{hostile}"),
                created_at: 1_700_000_020,
                pruned_at: None,
                contributors: Some(2),
                exports: vec![ExportInfo {
                    at: 1_700_000_030,
                    by: format!("local/{hostile}"),
                    to: format!("/tmp/{hostile}"),
                }],
            }],
            refusals: vec![item("refused")],
            alerts: vec![item("alert")],
            withheld_records: 0,
            service_wide_records: 1,
            evaluations: Vec::new(),
            audit_log: format!("ok {hostile}"),
        }
    }

    /// No markup from the data survives: only the page's own tags are there.
    fn assert_inert(html: &str) {
        let lower = html.to_ascii_lowercase();
        assert!(!lower.contains("<script"), "a script tag");
        assert!(!lower.contains("<img"), "an img tag");
        assert!(!html.contains(IMG) && !html.contains(SCRIPT), "verbatim");
        assert!(lower.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(lower.contains("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains(&format!(
            "<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        )));
        // Nothing to fetch: the only URL is the SVG namespace.
        let urls = lower.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        assert!(!urls.contains("http://") && !urls.contains("https://"));
    }

    #[test]
    fn markup_in_names_and_reasons_is_escaped() {
        for hostile in [SCRIPT, IMG] {
            let mut d = data(hostile);
            d.evaluations = vec![EvalPoint {
                round: 0,
                metric: format!("m{hostile}"),
                value: 0.5,
                noise_sd: 0.01,
            }];
            let html = render(&d).unwrap();
            let lower = html.to_ascii_lowercase();
            assert!(!lower.contains("<script"), "{hostile}: a script tag");
            assert!(!lower.contains("<img"), "{hostile}: an img tag");
            assert!(!html.contains(hostile), "{hostile} verbatim");
            assert!(html.contains(&esc(hostile)));
        }
        // Both at once, and the page's own policy.
        let html = render(&data(&format!("{SCRIPT}{IMG}"))).unwrap();
        assert_inert(&html);
    }

    #[test]
    fn the_terms_paragraph_keeps_its_marks_as_tags_only() {
        assert_eq!(
            inline_md("a **b** `c` <i>"),
            "a <strong>b</strong> <code>c</code> &lt;i&gt;"
        );
    }

    #[test]
    fn each_plot_has_one_marker_per_point() {
        let html = render(&data("x")).unwrap();
        let figs = figures(&html);
        let kinds: Vec<&str> = figs.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(kinds, ["epsilon", "sites"]);
        // Two sites x two rounds; two series x two rounds.
        assert_eq!(figs[0].1, 4);
        assert_eq!(figs[1].1, 4);
    }

    #[test]
    fn evaluation_metrics_are_drawn_with_their_noise_band() {
        let mut d = data("x");
        for round in 0..5u64 {
            for (metric, v) in [("accuracy", 0.6 + 0.05 * round as f64), ("loss", 0.7)] {
                d.evaluations.push(EvalPoint {
                    round,
                    metric: metric.into(),
                    value: v,
                    noise_sd: 0.02,
                });
            }
        }
        let html = render(&d).unwrap();
        let figs = figures(&html);
        let evals: Vec<_> = figs.iter().filter(|f| f.0 == "evaluation").collect();
        assert_eq!(evals.len(), 2, "one plot per metric");
        for f in evals {
            assert_eq!(f.1, 5, "a marker per round");
            assert_eq!(f.2.matches("<polygon").count(), 1, "the +-2 sd band");
        }
        assert!(html.contains("data-metric=\"accuracy\""));
        assert!(!html.contains("No federated evaluation on record"));
        d.evaluations.clear();
        assert!(render(&d)
            .unwrap()
            .contains("No federated evaluation on record"));
    }

    #[test]
    fn study_only_shows_no_sites() {
        let mut d = data("zq9");
        d.visibility = Visibility::StudyOnly;
        d.per_site = None;
        d.terms.placement = "central".into();
        d.refusals.clear();
        d.alerts.clear();
        d.models[0].contributors = None;
        d.withheld_records = 3;
        let html = render(&d).unwrap();
        let figs = figures(&html);
        assert_eq!(figs.len(), 1);
        assert_eq!(figs[0].0, "epsilon");
        assert_eq!(figs[0].1, 2, "the study's curve only");
        assert!(!html.contains("azq9"), "a site's name");
        assert!(!html.contains("<th>sites</th>"));
        assert!(html.contains("3 refusal(s) or alert(s)"));
    }

    /// `(data-plot, data-points, the figure's markup)`, checking data-points against the
    /// `<circle>` markers in it.
    fn figures(html: &str) -> Vec<(String, usize, String)> {
        html.split("<figure ")
            .skip(1)
            .map(|rest| {
                let body = &rest[..rest.find("</figure>").unwrap()];
                let attr = |name: &str| {
                    let start = body.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                    body[start..start + body[start..].find('"').unwrap()].to_string()
                };
                let n: usize = attr("data-points").parse().unwrap();
                assert_eq!(body.matches("<circle").count(), n, "{}", attr("data-plot"));
                (attr("data-plot"), n, body.to_string())
            })
            .collect()
    }
}
