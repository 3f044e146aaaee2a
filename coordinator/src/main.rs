//! `fedpriv-coordinator`: the ML team's side of fedpriv.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedpriv_common::audit::details::{self, Details};
use fedpriv_common::config::StudyConfig;
use fedpriv_common::pki;
use fedpriv_coordinator::admin;
use fedpriv_coordinator::assess::{self, StudyCommand};
use fedpriv_coordinator::at_rest;
use fedpriv_coordinator::budget_cli::{self, BudgetCommand};
use fedpriv_coordinator::limits::Limits;
use fedpriv_coordinator::pki_cli::{self, PkiCommand};
use fedpriv_coordinator::server::{self, Options};
use fedpriv_coordinator::store::Store;
use fedpriv_coordinator::{audit, checkpoint};
use fedpriv_coordinator::{inventory, retention};

/// Federated learning coordinator with differential privacy.
///
/// A typical start: `budget` to plan a study's privacy budget, `pki init` and `pki issue`
/// to create the study's certificates, then `run` the study from its TOML file. While and
/// after it runs, `ledger show` prints what each site has spent and `model export` writes
/// a model version out as safetensors.
#[derive(Debug, Parser)]
#[command(name = "fedpriv-coordinator", version, about, long_about = None)]
struct Cli {
    /// Log lines as text (default) or one JSON object per line, on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: fedpriv_client::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Privacy budget planning: epsilon after T steps, steps within a budget, noise for a target.
    #[command(subcommand)]
    Budget(BudgetCommand),
    /// Study PKI: create the CA and server certificate, issue site/operator/auditor certificates, revoke.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Before a study runs: a privacy impact assessment of its file (`study assess`).
    #[command(subcommand)]
    Study(StudyCommand),
    /// Audit a study's exact mechanism empirically before it runs: one training run on
    /// synthetic records with secret canaries gives a lower bound on its real epsilon
    /// (Steinke, Nasr, Jagielski 2023), printed next to the accountant's. Exits 1 when the
    /// bound is above the claim: the implementation leaks more than it says.
    PrivacyAudit {
        /// The study's TOML, as `run --study` takes it.
        #[arg(long, value_name = "FILE")]
        study: PathBuf,
        /// Canaries of each kind (gradient canaries, and input canaries in record-unit studies).
        #[arg(long, default_value_t = 1000)]
        canaries: usize,
        /// Seeds the auditor's choices (canaries, coins, synthetic records) to repeat a run;
        /// the mechanism's own randomness always comes from the secure generator.
        #[arg(long)]
        seed: Option<u64>,
        /// Record unit: the record count of the site the audit stands for (sets q).
        #[arg(long)]
        records: Option<u64>,
        /// Confidence of the lower bound.
        #[arg(long, default_value_t = 0.95)]
        confidence: f64,
        /// Record the result in this coordinator state directory (its database and audit
        /// log; the coordinator must be stopped), where a study with
        /// `[release] require_privacy_audit = true` needs a passing audit of its exact
        /// terms before a model is exported.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// One JSON object (fields epsilon_claimed, epsilon_lower_bound, delta, confidence,
        /// canaries, guesses, correct_guesses, released_view, black_box, ...).
        #[arg(long)]
        json: bool,
    },
    /// Run studies: listen for sites over QUIC (mutual TLS) and run rounds until each study ends.
    Run {
        /// Study configuration (TOML); repeat for several studies. Optional: operators can
        /// also create studies at runtime (`admin create`), and those resume on restart.
        #[arg(long = "study", value_name = "FILE")]
        studies: Vec<PathBuf>,
        /// State directory: the SQLite ledger and the model versions.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// Address to listen on (UDP).
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Directory made by `pki init` (ca.pem, server.pem, server.key).
        #[arg(long, value_name = "DIR")]
        pki: PathBuf,
        /// Certificate revocation list (PEM); repeatable.
        #[arg(long, value_name = "FILE")]
        crl: Vec<PathBuf>,
        /// Exit once every study has ended (default: keep serving). Exit status 6 if a
        /// study ended without doing its work (too few sites could take part, or none
        /// joined in time); a budget used up or all rounds done is a normal end (0).
        #[arg(long)]
        exit_when_done: bool,
        /// Key that encrypts model checkpoints at rest (made by `at-rest-key`; mode 0600,
        /// owned by this user). Without it, the key comes from FEDPRIV_AT_REST_KEY (64 hex).
        #[arg(long, value_name = "FILE")]
        at_rest_key_file: Option<PathBuf>,
        /// Network limits (TOML: handshakes, rates, connections per identity, upload
        /// allowance, QUIC windows); every key optional, unknown keys refused. See
        /// examples/configs/limits.toml for each key and its default.
        #[arg(long, value_name = "FILE")]
        limits: Option<PathBuf>,
        /// Serve the counters in the Prometheus text format at http://ADDR/metrics
        /// (loopback addresses only; the `metrics.prom` file in the state directory stays).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Make a new at-rest key file (mode 0600; never overwrites) for `run --at-rest-key-file`.
    /// Back it up apart from the state directory: checkpoints cannot be read without it.
    AtRestKey {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// The privacy ledger of a study.
    Ledger {
        #[command(subcommand)]
        cmd: LedgerCommand,
    },
    /// Model versions.
    Model {
        #[command(subcommand)]
        cmd: ModelCommand,
    },
    /// Talk to a running coordinator as an operator (create, change, stop studies) or an
    /// auditor (ledgers, audit log), over its mTLS endpoint with your certificate.
    /// Exit status: 2 config, 3 refused, 4 connection failed, 5 the coordinator failed.
    Admin(admin::AdminArgs),
    /// The coordinator's audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCommand,
    },
    /// Remove old model checkpoints under a retention policy you state; records what it
    /// removed in the audit log (before deleting) and in the state database.
    ///
    /// Never removed: the latest version of each study, versions newer than the cut-off,
    /// and the audit log (audit records are kept at least six years; nothing prunes them).
    /// Refuses to run while the coordinator runs (it holds the audit log); `--dry-run`
    /// lists what would go, records nothing, and works while it runs.
    Prune {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// Keep model versions created within this many days.
        #[arg(long, value_name = "N")]
        keep_models_days: u32,
        /// Also keep the N latest versions of each study, whatever their age (at least 1:
        /// the latest is always kept, a restart resumes from it).
        #[arg(long, value_name = "N", default_value_t = 1)]
        keep_last: u32,
        /// List what would be removed; delete and record nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// One self-contained HTML page about a study (inline SVG plots, no script, nothing
    /// fetched): epsilon per round against the budget, budget left, sites per round, model
    /// versions with digests and exports, refusals and alerts, the privacy terms in words.
    /// Under central placement it shows no per-site figures and no participants per round.
    /// Read-only: works while the coordinator runs.
    Report {
        #[arg(long)]
        study: String,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long, value_name = "FILE.html")]
        out: PathBuf,
    },
    /// Data inventory and lineage: per site, the studies that used its data, the rounds
    /// charged to it and those its updates went into (with times), and the model versions
    /// (round, sha256, file or "pruned") made from them; per study, its sites. Read-only:
    /// works while the coordinator runs.
    Inventory {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// Only this study.
        #[arg(long)]
        study: Option<String>,
        /// Only this site (and the studies it is enrolled in).
        #[arg(long)]
        site: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain: reports any edited, deleted, reordered or truncated record and
    /// where. Exit status 1 if the log does not verify.
    Verify {
        /// The log (default: audit.log in --state).
        #[arg(long, value_name = "FILE", required_unless_present = "state")]
        log: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// After a crash or power loss left the log unopenable: drop a torn last line and
    /// rebuild a missing head file, and record that it did. Refuses anything a crash cannot
    /// explain (an edited, deleted or reordered record): restore such a log from backup.
    Recover {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Per site and round: the mechanism (q, sigma, steps) and the cumulative epsilon.
    Show {
        #[arg(long)]
        study: String,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Decrypt a model version (default: the latest) to a plaintext safetensors file (0600).
    Export {
        #[arg(long)]
        study: String,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long)]
        round: Option<u64>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The coordinator's at-rest key file (else FEDPRIV_AT_REST_KEY).
        #[arg(long, value_name = "FILE")]
        at_rest_key_file: Option<PathBuf>,
    },
    /// Score an exported model on a labelled CSV file (or image manifest), with the sites'
    /// preprocessing from the model's card: accuracy, AUROC and per-class recall
    /// (classification) or RMSE and R^2 (regression).
    Evaluate {
        #[arg(long, value_name = "FILE")]
        model: PathBuf,
        #[arg(long, value_name = "CSV")]
        data: PathBuf,
        /// One JSON object (fields accuracy, auroc, recall, rmse, r2, records, skipped).
        #[arg(long)]
        json: bool,
    },
    /// Write an exported model's predictions for each usable record of a CSV file.
    Predict {
        #[arg(long, value_name = "FILE")]
        model: PathBuf,
        #[arg(long, value_name = "CSV")]
        data: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// The audit log and the database of a stopped coordinator's state directory.
fn open_for_audit(
    dir: &std::path::Path,
) -> Result<(fedpriv_common::audit_file::AuditLog, Store), String> {
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    let log_path = dir.join("audit.log");
    let log = fedpriv_common::audit_file::AuditLog::open(&log_path).map_err(|e| match e {
        fedpriv_common::audit_file::AuditError::InUse { .. } => format!(
            "the coordinator is running and holds the audit log {}: stop it to record an audit",
            log_path.display()
        ),
        e => format!("{}: {e}", log_path.display()),
    })?;
    let store = Store::open(dir.join("coordinator.db")).map_err(|e| e.to_string())?;
    Ok((log, store))
}

/// Runs and prints a privacy audit; `Ok(false)` when the bound beats the claim.
fn privacy_audit(
    study: &std::path::Path,
    opts: &fedpriv_client::privacy_audit::AuditOptions,
    state: Option<&std::path::Path>,
    json: bool,
) -> Result<bool, String> {
    let text = std::fs::read_to_string(study)
        .map_err(|e| format!("cannot read {}: {e}", study.display()))?;
    let cfg = fedpriv_common::config::StudyConfig::from_toml(&text)
        .map_err(|e| format!("{}: {e}", study.display()))?;
    // Where the result goes is checked before the (long) run.
    let mut record = match state {
        Some(dir) => Some(open_for_audit(dir)?),
        None => None,
    };
    let r = fedpriv_client::privacy_audit::run(&cfg, opts).map_err(|e| e.to_string())?;
    if let Some((log, store)) = record.as_mut() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        let row = fedpriv_coordinator::store::PrivacyAuditRow {
            study: cfg.id.clone(),
            terms_sha256: cfg.mechanism_digest(),
            audited_at: i64::try_from(now).map_err(|e| e.to_string())?,
            epsilon_claimed: r.epsilon_claimed,
            epsilon_lower_bound: r.epsilon_lower_bound,
            delta: r.delta,
            confidence: r.confidence,
            canaries: r.canaries as u64,
            guesses: r.guesses,
            correct_guesses: r.correct_guesses,
            passed: !r.failed(),
            report_json: serde_json::to_string(&r).map_err(|e| e.to_string())?,
        };
        let by = audit::local_user();
        log.append_now(
            &by,
            details::PrivacyAudited::EVENT,
            row.audit_record().to_value(),
        )
        .map_err(|e| e.to_string())?;
        store
            .record_privacy_audit(&row)
            .map_err(|e| e.to_string())?;
    }
    if json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    } else {
        print!("{r}");
    }
    Ok(!r.failed())
}

fn model_evaluate(
    model: &std::path::Path,
    data: &std::path::Path,
    json: bool,
) -> Result<String, String> {
    let released = fedpriv_client::inference::load_model(model)?;
    let e = fedpriv_client::inference::evaluate(&released, data)?;
    if json {
        return serde_json::to_string(&e).map_err(|e| e.to_string());
    }
    let c = &released.card;
    let mut out = format!(
        "model: study {} round {} ({}), epsilon {:.4} at delta {}\nrecords scored: {} ({} skipped)\n",
        c.study,
        c.round,
        c.model.describe(),
        c.epsilon,
        c.delta,
        e.records,
        e.skipped
    );
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    if let Some(a) = e.accuracy {
        out.push_str(&format!("accuracy: {}\n", pct(a)));
    }
    if let Some(a) = e.auroc {
        out.push_str(&format!("AUROC: {a:.4}\n"));
    }
    if let Some(r) = &e.recall {
        let names: Vec<String> = (0..r.len())
            .map(|i| {
                c.data
                    .class_labels
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| i.to_string())
            })
            .collect();
        let parts: Vec<String> = r
            .iter()
            .zip(&names)
            .map(|(v, n)| format!("{n} {}", v.map_or("-".into(), pct)))
            .collect();
        out.push_str(&format!("recall per class: {}\n", parts.join(", ")));
    }
    if let Some(v) = e.rmse {
        out.push_str(&format!("RMSE: {v:.4}\n"));
    }
    if let Some(v) = e.r2 {
        out.push_str(&format!("R^2: {v:.4}\n"));
    }
    Ok(out.trim_end().to_string())
}

fn model_predict(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
) -> Result<String, String> {
    let released = fedpriv_client::inference::load_model(model)?;
    let (n, skipped) = fedpriv_client::inference::predict(&released, data, out)?;
    Ok(format!(
        "wrote {n} prediction(s) to {} ({skipped} record(s) skipped)",
        out.display()
    ))
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The operator's limits file, or the defaults without one.
fn load_limits(path: Option<&std::path::Path>) -> Result<Limits, String> {
    let Some(path) = path else {
        return Ok(Limits::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let limits = Limits::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(file = %path.display(), ?limits, "network limits loaded");
    Ok(limits)
}

#[allow(clippy::too_many_arguments)]
fn run_studies(
    studies: &[PathBuf],
    state: PathBuf,
    listen: SocketAddr,
    pki_dir: PathBuf,
    crl: &[PathBuf],
    exit_when_done: bool,
    at_rest_key_file: Option<&std::path::Path>,
    limits_file: Option<&std::path::Path>,
    progress: bool,
    metrics_listen: Option<SocketAddr>,
) -> Result<Vec<(String, String)>, String> {
    // Before anything else: a bad limits file is the operator's to fix, and says so at once.
    let limits = load_limits(limits_file)?;
    let at_rest_key = at_rest::load_key(at_rest_key_file).map_err(|e| e.to_string())?;
    tracing::info!(key_id = %at_rest_key.id_hex(), "at-rest key loaded");
    let mut configs = Vec::new();
    for path in studies {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cfg = StudyConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        configs.push((cfg, text));
    }
    let planned: std::collections::BTreeMap<String, u64> = configs
        .iter()
        .map(|(c, _)| (c.id.clone(), c.rounds))
        .collect();
    let crls = crl.iter().map(|p| read(p)).collect::<Result<Vec<_>, _>>()?;
    let tls = pki::server_config(
        &read(&pki_dir.join("ca.pem"))?,
        &read(&pki_dir.join("server.pem"))?,
        &read(&pki_dir.join("server.key"))?,
        &crls,
    )
    .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            let _ = stop_tx.send(true);
        });
        let opts = Options {
            listen,
            state_dir: state,
            tls,
            studies: configs,
            max_concurrent_uploads: 2,
            at_rest_key: std::sync::Arc::new(at_rest_key),
        };
        // Studies that ended without doing their work, as the engine typed it. Consumed as
        // they come (a round's notification holds its model), the rest drained at the end.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
        let consumer = tokio::spawn(async move {
            let mut failed = Vec::new();
            // On a terminal: one block per study, redrawn in place as events arrive.
            let mut board = fedpriv_coordinator::progress::Board::new();
            let mut keep = |n: server::Notification| {
                match n {
                    server::Notification::StudyEnded {
                        study,
                        reason,
                        cause,
                    } => {
                        board.ended(&study, &reason);
                        if cause.is_some_and(|c| c.is_failure()) {
                            failed.push((study, reason));
                        }
                    }
                    server::Notification::RoundCompleted {
                        study,
                        round,
                        contributors,
                        epsilon,
                        budget,
                        ..
                    } => board.round(
                        &study,
                        round,
                        planned.get(&study).copied(),
                        contributors.len(),
                        epsilon,
                        budget,
                    ),
                    server::Notification::Evaluated {
                        study,
                        model_round,
                        summary,
                        ..
                    } => board.evaluation(&study, model_round, &summary),
                    server::Notification::RoundAborted { .. } => return,
                }
                if progress {
                    use std::io::Write;
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(board.redraw().as_bytes());
                    let _ = err.flush();
                }
            };
            loop {
                tokio::select! {
                    n = rx.recv() => match n {
                        Some(n) => keep(n),
                        None => break,
                    },
                    _ = &mut done_rx => {
                        while let Ok(n) = rx.try_recv() {
                            keep(n);
                        }
                        break;
                    }
                }
            }
            failed
        });
        let metrics_listener = match metrics_listen {
            Some(addr) => Some(fedpriv_client::metrics_http::bind(addr).await?),
            None => None,
        };
        let metrics_stop = stop_rx.clone();
        let served = match server::start(opts, limits, stop_rx, Some(tx), exit_when_done).await {
            Ok(running) => {
                let scrapes = metrics_listener.map(|l| {
                    let m = running.metrics.clone();
                    tokio::spawn(fedpriv_client::metrics_http::serve(
                        l,
                        move || m.render(),
                        metrics_stop,
                    ))
                });
                let done = running.finished().await.map_err(|e| e.to_string());
                if let Some(task) = scrapes {
                    task.abort();
                }
                done
            }
            Err(e) => Err(e.to_string()),
        };
        let _ = done_tx.send(());
        let failed = consumer.await.map_err(|e| e.to_string())?;
        served.map(|()| failed)
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Opens an existing state database; read-only commands never create one.
fn open_existing(state: &std::path::Path) -> Result<Store, String> {
    let db = state.join("coordinator.db");
    if !db.exists() {
        return Err(format!(
            "no state database at {} (is --state the coordinator's state directory?)",
            db.display()
        ));
    }
    Store::open(&db).map_err(|e| e.to_string())
}

fn ledger_show(study: &str, state: &std::path::Path, json: bool) -> Result<String, String> {
    let store = open_existing(state)?;
    if store.study(study).map_err(|e| e.to_string())?.is_none() {
        return Err(format!("no study {study:?} in {}", state.display()));
    }
    // The same report the admin channel serves (`admin ledger`).
    let report = admin::ledger_json(&store, study)?;
    Ok(if json {
        report.to_string()
    } else {
        admin::ledger_text(&report)
    })
}

fn model_export(
    study: &str,
    state: &std::path::Path,
    round: Option<u64>,
    out: &std::path::Path,
    at_rest_key_file: Option<&std::path::Path>,
) -> Result<String, String> {
    let store = open_existing(state)?;
    // Whether the model exists and may leave; a withheld one is refused on record below.
    let cleared = match fedpriv_coordinator::release::clear(&store, study, round) {
        Err(e @ fedpriv_coordinator::release::ReleaseError::Withheld(_)) => Err(e),
        Err(e) => return Err(e.to_string()),
        Ok(c) => Ok(c),
    };
    let key = at_rest::load_key(at_rest_key_file).map_err(|e| e.to_string())?;
    // On record before the model leaves the state directory. The running coordinator holds
    // the log: an export waits until it is stopped rather than go unrecorded.
    let log_path = state.join("audit.log");
    let mut log = fedpriv_common::audit_file::AuditLog::open(&log_path).map_err(|e| match e {
        fedpriv_common::audit_file::AuditError::InUse { .. } => format!(
            "the coordinator is running and holds the audit log {}: every export is recorded there, so stop it and export again",
            log_path.display()
        ),
        e => format!("{}: {e}", log_path.display()),
    })?;
    let by = audit::local_user();
    let cleared = match cleared {
        Ok(c) => c,
        Err(fedpriv_coordinator::release::ReleaseError::Withheld(reason)) => {
            let refused = details::Refused::Export {
                action: "model export".into(),
                study: study.to_string(),
                model_version: round.unwrap_or(0),
                reason: reason.clone(),
            };
            log.append_now(&by, details::Refused::EVENT, refused.to_value())
                .map_err(|e| format!("{}: {e}", log_path.display()))?;
            return Err(reason);
        }
        Err(e) => return Err(e.to_string()),
    };
    let (round, sha, extra) = (cleared.round, cleared.sha256, cleared.metadata);
    let src = checkpoint::model_path(state, study, round);
    let exported = details::ModelExported {
        study: study.to_string(),
        model_version: round,
        sha256: sha.clone(),
        by: by.clone(),
        to: out.display().to_string(),
    };
    log.append_now(&by, details::ModelExported::EVENT, exported.to_value())
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    if let Err(e) = export_decrypted(&key, &src, study, round, &sha, &extra, out) {
        // The attempt is on record; so is that no model left.
        let refused = details::Refused::Export {
            action: "model export".into(),
            study: study.to_string(),
            model_version: round,
            reason: e.clone(),
        };
        let _ = log.append_now(&by, details::Refused::EVENT, refused.to_value());
        return Err(e);
    }
    Ok(format!(
        "wrote round {round} of study {study} to {}",
        out.display()
    ))
}

/// Decrypts a checkpoint to `out` (mode 0600: the model is the study's result, not for
/// every local user). Written beside `out` and renamed into place only once every segment
/// authenticated and the digest matched, so a failed export leaves no partial model.
fn export_decrypted(
    key: &fedpriv_common::seal::SealKey,
    src: &std::path::Path,
    study: &str,
    round: u64,
    sha: &str,
    extra: &std::collections::BTreeMap<String, String>,
    out: &std::path::Path,
) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = out
        .file_name()
        .ok_or_else(|| format!("{}: not a file path", out.display()))?;
    let mut partial_name = name.to_os_string();
    partial_name.push(".partial");
    let partial = out.with_file_name(partial_name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut w = checkpoint::MetadataAdder::new(
        std::io::BufWriter::with_capacity(1 << 20, file),
        extra.clone(),
    );
    let written = checkpoint::read_checkpoint(key, src, study, round, Some(sha), &mut w)
        .map_err(|e| e.to_string())
        .and_then(|()| w.finish().map_err(|e| e.to_string()))
        .and_then(|mut w| {
            w.flush()
                .and_then(|()| w.get_ref().sync_all())
                .map_err(|e| format!("{}: {e}", partial.display()))
        })
        .and_then(|()| {
            std::fs::rename(&partial, out)
                .map_err(|e| format!("{} -> {}: {e}", partial.display(), out.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

fn prune(
    state: &std::path::Path,
    keep_models_days: u32,
    keep_last: u32,
    dry_run: bool,
) -> Result<String, String> {
    let policy =
        retention::RetentionPolicy::new(keep_models_days, keep_last).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| format!("system clock before 1970: {e}"))?
        .as_secs();
    let now = i64::try_from(now).map_err(|e| e.to_string())?;
    retention::prune(state, policy, now, dry_run)
        .map(|report| report.to_string())
        .map_err(|e| e.to_string())
}

fn inventory(
    state: &std::path::Path,
    study: Option<&str>,
    site: Option<&str>,
    json: bool,
) -> Result<String, String> {
    let inv = inventory::inventory_of(state, study, site).map_err(|e| e.to_string())?;
    if json {
        serde_json::to_string(&inv)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string())
    } else {
        Ok(inv.to_string())
    }
}

fn audit_verify(log: Option<PathBuf>, state: Option<PathBuf>) -> Result<bool, String> {
    let path = log
        .or_else(|| state.map(|s| s.join("audit.log")))
        .ok_or("give --log or --state")?;
    let report = fedpriv_common::audit_file::verify_file(&path).map_err(|e| e.to_string())?;
    println!("{}: {report}", path.display());
    Ok(report.is_ok())
}

fn audit_recover(state: &std::path::Path) -> Result<String, String> {
    let path = state.join("audit.log");
    let by = audit::local_user();
    let (_log, recovery) = fedpriv_common::audit_file::AuditLog::recover(&path, &by)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if recovery.did_something() {
        format!("{}: {recovery}; the repair is on record", path.display())
    } else {
        format!("{}: nothing to recover", path.display())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // On a terminal, `run` shows progress lines instead of the info log (warnings still
    // show); anything else gets the log.
    let progress = matches!(cli.command, Command::Run { .. })
        && cli.log_format == fedpriv_client::logging::LogFormat::Text
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    fedpriv_client::logging::init(cli.log_format, if progress { "warn" } else { "info" });
    let result = match cli.command {
        Command::Budget(cmd) => budget_cli::run(&cmd).map(|out| println!("{out}")),
        Command::Pki(cmd) => pki_cli::run(&cmd).map(|out| println!("{out}")),
        Command::Study(cmd) => assess::run(&cmd)
            .map(|out| print!("{out}{}", if out.ends_with('\n') { "" } else { "\n" }))
            .map_err(|e| e.to_string()),
        Command::Run {
            studies,
            state,
            listen,
            pki,
            crl,
            exit_when_done,
            at_rest_key_file,
            limits,
            metrics_listen,
        } => match run_studies(
            &studies,
            state,
            listen,
            pki,
            &crl,
            exit_when_done,
            at_rest_key_file.as_deref(),
            limits.as_deref(),
            progress,
            metrics_listen,
        ) {
            Ok(failed) if failed.is_empty() => Ok(()),
            Ok(failed) => {
                for (study, reason) in failed {
                    eprintln!("error: study {study} ended without completing: {reason}");
                }
                return ExitCode::from(6);
            }
            Err(e) => Err(e),
        },
        Command::AtRestKey { out } => at_rest::write_new_key_file(&out)
            .map(|id| {
                println!(
                    "wrote a new at-rest key to {} (key id {id}); back it up apart from the \
                     state directory: checkpoints cannot be read without it",
                    out.display()
                )
            })
            .map_err(|e| e.to_string()),
        Command::Ledger {
            cmd: LedgerCommand::Show { study, state, json },
        } => {
            ledger_show(&study, &state, json).map(|o| print!("{o}{}", if json { "\n" } else { "" }))
        }
        Command::Model {
            cmd:
                ModelCommand::Export {
                    study,
                    state,
                    round,
                    out,
                    at_rest_key_file,
                },
        } => model_export(&study, &state, round, &out, at_rest_key_file.as_deref())
            .map(|o| println!("{o}")),
        Command::PrivacyAudit {
            study,
            canaries,
            seed,
            records,
            confidence,
            state,
            json,
        } => {
            let opts = fedpriv_client::privacy_audit::AuditOptions {
                canaries,
                seed,
                records,
                confidence,
                guesses: None,
            };
            match privacy_audit(&study, &opts, state.as_deref(), json) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::from(1),
                Err(e) => Err(e),
            }
        }
        Command::Model {
            cmd: ModelCommand::Evaluate { model, data, json },
        } => model_evaluate(&model, &data, json).map(|o| println!("{o}")),
        Command::Model {
            cmd: ModelCommand::Predict { model, data, out },
        } => model_predict(&model, &data, &out).map(|o| println!("{o}")),
        Command::Audit {
            cmd: AuditCommand::Verify { log, state },
        } => match audit_verify(log, state) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Audit {
            cmd: AuditCommand::Recover { state },
        } => audit_recover(&state).map(|o| println!("{o}")),
        Command::Admin(args) => match admin::run_cli(&args) {
            Ok(out) => {
                print!("{out}{}", if out.ends_with('\n') { "" } else { "\n" });
                Ok(())
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(e.exit_code());
            }
        },
        Command::Prune {
            state,
            keep_models_days,
            keep_last,
            dry_run,
        } => prune(&state, keep_models_days, keep_last, dry_run).map(|o| println!("{o}")),
        Command::Report { study, state, out } => {
            fedpriv_coordinator::report::run(&study, &state, &out)
                .map(|o| println!("{o}"))
                .map_err(|e| e.to_string())
        }
        Command::Inventory {
            state,
            study,
            site,
            json,
        } => inventory(&state, study.as_deref(), site.as_deref(), json).map(|o| print!("{o}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("error: {reason}");
            ExitCode::from(2)
        }
    }
}
