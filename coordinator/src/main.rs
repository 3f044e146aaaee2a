//! `fedpriv-coordinator`: the ML team's side of fedpriv.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedpriv_common::config::StudyConfig;
use fedpriv_common::pki;
use fedpriv_coordinator::budget_cli::{self, BudgetCommand};
use fedpriv_coordinator::pki_cli::{self, PkiCommand};
use fedpriv_coordinator::server::{self, Options};
use fedpriv_coordinator::store::Store;

/// Federated learning coordinator with differential privacy.
///
/// A typical start: `budget` to plan a study's privacy budget, `pki init` and `pki issue`
/// to create the study's certificates, then `run` the study from its TOML file. While and
/// after it runs, `ledger show` prints what each site has spent and `model export` writes
/// a model version out as safetensors.
#[derive(Debug, Parser)]
#[command(name = "fedpriv-coordinator", version, about, long_about = None)]
struct Cli {
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
    /// Run studies: listen for sites over QUIC (mutual TLS) and run rounds until each study ends.
    Run {
        /// Study configuration (TOML); repeat for several studies.
        #[arg(long = "study", value_name = "FILE", required = true)]
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
        /// Exit once every study has ended (default: keep serving).
        #[arg(long)]
        exit_when_done: bool,
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
    /// The coordinator's audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCommand,
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
    /// Copy a model version (default: the latest) to a safetensors file.
    Export {
        #[arg(long)]
        study: String,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long)]
        round: Option<u64>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn run_studies(
    studies: &[PathBuf],
    state: PathBuf,
    listen: SocketAddr,
    pki_dir: PathBuf,
    crl: &[PathBuf],
    exit_when_done: bool,
) -> Result<(), String> {
    let mut configs = Vec::new();
    for path in studies {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cfg = StudyConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        configs.push((cfg, text));
    }
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
        };
        server::run(opts, stop_rx, None, exit_when_done)
            .await
            .map_err(|e| e.to_string())
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
    let row = store
        .study(study)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no study {study:?} in {}", state.display()))?;
    let cfg = StudyConfig::from_toml(&row.config_toml).map_err(|e| e.to_string())?;
    let ledger = store.ledger(study).map_err(|e| e.to_string())?;
    let spent = store.spent_by_site(study).map_err(|e| e.to_string())?;
    let acc = cfg.privacy.accountant;
    let mut per_site = serde_json::Map::new();
    for (site, events) in &spent {
        let eps = fedpriv_common::dp::accountant::epsilon(acc, events, cfg.privacy.delta)
            .map_err(|e| e.to_string())?;
        per_site.insert(site.clone(), serde_json::json!(eps));
    }
    let study_eps = per_site
        .values()
        .filter_map(|v| v.as_f64())
        .fold(0.0, f64::max);
    if json {
        return Ok(serde_json::json!({
            "study": study, "status": row.status, "end_reason": row.end_reason,
            "budget": {"epsilon": cfg.privacy.epsilon.get(), "delta": cfg.privacy.delta.get(), "accountant": acc.as_str()},
            "epsilon_spent": study_eps, "per_site_epsilon": per_site, "entries": ledger,
        })
        .to_string());
    }
    let mut out =
        format!(
        "study {study} ({:?}{}): epsilon {study_eps:.4} of {} spent at delta {} ({} accountant)\n",
        row.status,
        row.end_reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default(),
        cfg.privacy.epsilon,
        cfg.privacy.delta,
        acc.as_str()
    );
    out.push_str(&format!(
        "{:<6} {:<20} {:>8} {:>8} {:>6} {:>10}\n",
        "round", "site", "q", "sigma", "steps", "epsilon"
    ));
    for r in &ledger {
        out.push_str(&format!(
            "{:<6} {:<20} {:>8.4} {:>8.4} {:>6} {:>10.4}\n",
            r.round,
            r.site,
            r.event.q.get(),
            r.event.sigma.get(),
            r.event.steps,
            r.epsilon_after
        ));
    }
    Ok(out)
}

fn model_export(
    study: &str,
    state: &std::path::Path,
    round: Option<u64>,
    out: &std::path::Path,
) -> Result<String, String> {
    let store = open_existing(state)?;
    let rounds = store.rounds(study).map_err(|e| e.to_string())?;
    let round = match round {
        Some(r) => r,
        None => store
            .last_completed_round(study)
            .map_err(|e| e.to_string())?
            .map(|(r, ..)| r)
            .ok_or("the study has no completed round yet")?,
    };
    if !rounds
        .iter()
        .any(|r| r.round == round && r.status == fedpriv_coordinator::store::RoundStatus::Completed)
    {
        return Err(format!("round {round} of study {study} did not complete"));
    }
    let src = server::model_path(state, study, round);
    std::fs::copy(&src, out).map_err(|e| format!("{} -> {}: {e}", src.display(), out.display()))?;
    Ok(format!(
        "wrote round {round} of study {study} to {}",
        out.display()
    ))
}

fn audit_verify(log: Option<PathBuf>, state: Option<PathBuf>) -> Result<bool, String> {
    let path = log
        .or_else(|| state.map(|s| s.join("audit.log")))
        .ok_or("give --log or --state")?;
    let report = fedpriv_common::audit_file::verify_file(&path).map_err(|e| e.to_string())?;
    println!("{}: {report}", path.display());
    Ok(report.is_ok())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Budget(cmd) => budget_cli::run(&cmd).map(|out| println!("{out}")),
        Command::Pki(cmd) => pki_cli::run(&cmd).map(|out| println!("{out}")),
        Command::Run {
            studies,
            state,
            listen,
            pki,
            crl,
            exit_when_done,
        } => run_studies(&studies, state, listen, pki, &crl, exit_when_done),
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
                },
        } => model_export(&study, &state, round, &out).map(|o| println!("{o}")),
        Command::Audit {
            cmd: AuditCommand::Verify { log, state },
        } => match audit_verify(log, state) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("error: {reason}");
            ExitCode::from(2)
        }
    }
}
