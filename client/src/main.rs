//! `fedpriv-client`: the hospital site's daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedpriv_client::config::SiteConfig;
use fedpriv_client::daemon;

/// fedpriv site daemon: trains on this site's data and sends only clipped, noised updates.
///
/// Run it next to the data with a site config (TOML): `fedpriv-client run --config
/// site.toml`. It only dials out to the coordinator; it never listens. `ledger` shows what
/// this site has spent of its own privacy cap.
#[derive(Debug, Parser)]
#[command(name = "fedpriv-client", version, about, long_about = None)]
struct Cli {
    /// Log lines as text (default) or one JSON object per line, on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: fedpriv_client::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to the coordinator and serve tasks until SIGTERM or Ctrl-C.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Serve this site's figures (tasks paid and declined by reason, epsilon per study
        /// and per data source, from its own ledger) in the Prometheus text format at
        /// http://ADDR/metrics; loopback addresses only.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// What this site has spent: per data source (cap, the Rényi filter's level over every
    /// study reading it, and the PLD figure beside it) and per study (cap, epsilon at its
    /// delta, rounds paid and declined). Read-only: works while the daemon runs.
    Ledger {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the `[studies.ID]` table that pins exactly what a study file asks for, for a
    /// privacy officer to review and paste into the site config. Reads only the study file.
    Terms {
        /// The study's TOML, as the coordinator's operators wrote it.
        #[arg(long, value_name = "FILE")]
        study: PathBuf,
        /// The `[sources.NAME]` the study will read.
        #[arg(long)]
        source: String,
        /// The record count the site declares for that source (sets the sampling rate).
        #[arg(long)]
        records: u64,
        /// This site's own cap for the study.
        #[arg(long)]
        epsilon_cap: f64,
    },
    /// The site's audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// This site's data inventory: which studies touched its data, when (rounds paid and
    /// declined, with times), the columns each read (from the audit log's column checks)
    /// and the epsilon each has spent. Read-only: works while the daemon runs.
    ///
    /// Retention: the site keeps no model or update files (the global model is held in
    /// memory for a task, the update is sent and never stored), so there is nothing to
    /// prune here; the ledger and the audit log are kept (audit records at least six years).
    Inventory {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Test a released model for membership leakage against this site's own records,
    /// locally: a loss-threshold and an offline likelihood-ratio attack (reference models
    /// trained on half of a held-out file), AUC and true-positive rates at 1% and 0.1%
    /// false positives with Clopper-Pearson intervals, next to what this site's epsilon
    /// allows. The report stays here; its summary goes to the site's audit log (stop the
    /// daemon first: the log has one writer).
    LeakageTest {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "ID")]
        study: String,
        /// The released model (an exported safetensors file with its card).
        #[arg(long, value_name = "FILE")]
        model: PathBuf,
        /// This site's records that did not take part in training (CSV with the study's
        /// columns): half trains the reference models, half are the non-members.
        #[arg(long, value_name = "CSV")]
        holdout: PathBuf,
        /// Reference models for the likelihood-ratio attack.
        #[arg(long, default_value_t = 8)]
        references: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
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
        /// The log (default: audit.log in the state directory of --config).
        #[arg(long, value_name = "FILE", required_unless_present = "config")]
        log: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// After a crash or power loss left the log unopenable: drop a torn last line and
    /// rebuild a missing head file, and record that it did. Refuses anything a crash cannot
    /// explain (an edited, deleted or reordered record): restore such a log from backup.
    Recover {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
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

fn run(config: PathBuf, metrics_listen: Option<std::net::SocketAddr>) -> Result<(), String> {
    let cfg = SiteConfig::load(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            let _ = tx.send(true);
        });
        if let Some(addr) = metrics_listen {
            let listener = fedpriv_client::metrics_http::bind(addr).await?;
            let scrape_cfg = cfg.clone();
            tokio::spawn(fedpriv_client::metrics_http::serve(
                listener,
                move || {
                    // A ledger that cannot be read yet (before the first start) is a
                    // comment, not a failed scrape.
                    fedpriv_client::site_metrics::render(&scrape_cfg).unwrap_or_else(|e| {
                        format!("# site ledger not readable: {}\n", e.replace('\n', " "))
                    })
                },
                rx.clone(),
            ));
        }
        daemon::run(cfg, rx).await.map_err(|e| e.to_string())
    })
}

fn leakage_test(
    config: &std::path::Path,
    study: &str,
    model: &std::path::Path,
    holdout: &std::path::Path,
    references: usize,
    seed: u64,
    json: bool,
) -> Result<(), String> {
    use fedpriv_client::leakage;
    let cfg = SiteConfig::load(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let released = fedpriv_client::inference::load_model(model)?;
    let opts = leakage::LeakageOptions {
        references,
        seed,
        ..Default::default()
    };
    // The log first: a test whose summary cannot be recorded does not run.
    let mut log = leakage::open_log(&cfg)?;
    let report = leakage::run(&cfg, study, &released, holdout, &opts)?;
    leakage::record(&mut log, &cfg, &report, model)?;
    if json {
        out(&format!(
            "{}\n",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        ))
    } else {
        out(&report.to_string())
    }
}

fn ledger(config: PathBuf, json: bool) -> Result<(), String> {
    let cfg = SiteConfig::load(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    let view = fedpriv_client::ledger_view::build(&cfg)?;
    if json {
        out(&format!(
            "{}\n",
            serde_json::to_string(&view).map_err(|e| e.to_string())?
        ))
    } else {
        out(&view.to_string())
    }
}

/// Writes to stdout; a reader that went away (`| head`) ends the output quietly.
fn out(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("stdout: {e}")),
    }
}

fn terms(study: PathBuf, source: String, records: u64, epsilon_cap: f64) -> Result<(), String> {
    let text = std::fs::read_to_string(&study).map_err(|e| format!("{}: {e}", study.display()))?;
    let cfg = fedpriv_common::config::StudyConfig::from_toml(&text)
        .map_err(|e| format!("{}: {e}", study.display()))?;
    out(&fedpriv_client::config::pinned_terms_toml(
        &cfg,
        &source,
        records,
        epsilon_cap,
    ))
}

fn inventory(config: PathBuf, json: bool) -> Result<(), String> {
    let cfg = SiteConfig::load(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    let inv = fedpriv_client::inventory::build(&cfg)?;
    if json {
        out(&format!(
            "{}\n",
            serde_json::to_string(&inv).map_err(|e| e.to_string())?
        ))
    } else {
        out(&inv.to_string())
    }
}

fn audit_verify(log: Option<PathBuf>, config: Option<PathBuf>) -> Result<bool, String> {
    let path = match (log, config) {
        (Some(log), _) => log,
        (None, Some(config)) => {
            let cfg =
                SiteConfig::load(&config).map_err(|e| format!("{}: {e}", config.display()))?;
            daemon::audit_path(&cfg)
        }
        (None, None) => return Err("give --log or --config".into()),
    };
    let report = fedpriv_common::audit_file::verify_file(&path).map_err(|e| e.to_string())?;
    println!("{}: {report}", path.display());
    Ok(report.is_ok())
}

fn audit_recover(config: &std::path::Path) -> Result<(), String> {
    let cfg = SiteConfig::load(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let path = daemon::audit_path(&cfg);
    let by = format!(
        "local/{}",
        std::env::var("USER").unwrap_or_else(|_| "operator".into())
    );
    let (_log, recovery) = fedpriv_common::audit_file::AuditLog::recover(&path, &by)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if recovery.did_something() {
        println!("{}: {recovery}; the repair is on record", path.display());
    } else {
        println!("{}: nothing to recover", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fedpriv_client::logging::init(cli.log_format, "info");
    let result = match cli.command {
        Command::Run {
            config,
            metrics_listen,
        } => run(config, metrics_listen),
        Command::Ledger { config, json } => ledger(config, json),
        Command::Terms {
            study,
            source,
            records,
            epsilon_cap,
        } => terms(study, source, records, epsilon_cap),
        Command::Inventory { config, json } => inventory(config, json),
        Command::LeakageTest {
            config,
            study,
            model,
            holdout,
            references,
            seed,
            json,
        } => leakage_test(&config, &study, &model, &holdout, references, seed, json),
        Command::Audit(AuditCommand::Verify { log, config }) => match audit_verify(log, config) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Audit(AuditCommand::Recover { config }) => audit_recover(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("error: {reason}");
            ExitCode::from(2)
        }
    }
}
