//! Round benchmark: the real coordinator (`fedpriv-coordinator run`, a separate process)
//! and N site processes on loopback with mutual TLS. Each site answers every task with an
//! update of D float32 values without training (clipped and noised with the secure
//! generator when `--dp on`). Then, in the same run, a baseline: the same bytes (the model
//! down to every site, an update back from every site) over bare quinn connections with the
//! same TLS setup and transport limits. Prints one JSON line.
//!
//! ```text
//! cargo build --release -p fedpriv-coordinator
//! cargo run --release --example bench_round -- --sites 4 --params 10000000 --rounds 5 --dp on
//! ```
//!
//! The coordinator binary is looked up next to this example's executable
//! (`target/release/fedpriv-coordinator`); `--coordinator PATH` overrides.
//!
//! Round time: from the coordinator's "budget spent and recorded" log line of a round (the
//! round's start, before any task leaves) to its "round completed" line (after the new
//! model is durably checkpointed), as seen by this process reading the coordinator's
//! stderr. Round interval: from one round's start to the next's; the checkpoint is written
//! while the next round runs, so this is the pace at which rounds follow each other, and
//! what compares with the bare-quinn rounds (run back to back). Peak RSS: the coordinator's `VmHWM` from `/proc/<pid>/status`, read after the
//! last round. Bytes: payload bytes of model and update bodies (QUIC and TLS framing
//! not counted).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use fedpriv_client::transport::{client_endpoint, connect};
use fedpriv_common::arch;
use fedpriv_common::dp::accountant::{self, AccountantKind};
use fedpriv_common::dp::clip::clip_factor;
use fedpriv_common::dp::noise::{available_threads, NoiseSource};
use fedpriv_common::dp::{ClipNorm, Delta, SgmEvent};
use fedpriv_common::model::Architecture;
use fedpriv_common::pki::{self, Identity, Role};
use fedpriv_common::protocol::{CoordinatorMessage, SiteMessage, PROTOCOL_VERSION};
use fedpriv_common::quic_io::{self, TransportLimits};
use fedpriv_common::test_util::StudyBuilder;
use fedpriv_common::wire::{self, Dtype};
use fedpriv_coordinator::transport::make_server_endpoint;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CLIP_NORM: f64 = 1.0;
const NOISE_MULTIPLIER: f64 = 1.0;
const DELTA: f64 = 1e-5;
const STUDY: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Encoding {
    F32,
    F16,
    Bf16,
}

impl Encoding {
    fn dtype(self) -> Dtype {
        match self {
            Encoding::F32 => Dtype::F32,
            Encoding::F16 => Dtype::F16,
            Encoding::Bf16 => Dtype::Bf16,
        }
    }
}

#[derive(Debug, Parser)]
#[command(about = "Round time, coordinator memory and bytes moved, against bare quinn")]
struct Args {
    /// Number of site processes.
    #[arg(long, default_value_t = 4)]
    sites: usize,
    /// Approximate number of f32 parameters of the model (an MLP is sized to match).
    #[arg(long, default_value_t = 1_000_000)]
    params: usize,
    /// Rounds to run.
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Clip and noise at the sites (secure generator) or send a fixed small update.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    dp: OnOff,
    /// Wire encoding of the model and the updates (the study's `encoding`).
    #[arg(long, value_enum, default_value_t = Encoding::F32)]
    encoding: Encoding,
    /// The coordinator binary (default: next to this executable, in target/release).
    #[arg(long)]
    coordinator: Option<PathBuf>,
    /// Skip the bare-quinn baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Keep the coordinator's log and state here instead of a temporary directory.
    #[arg(long)]
    keep_dir: Option<PathBuf>,
    /// The coordinator's limits file (`run --limits`), e.g. to set
    /// `upload_spool_memory_mib`.
    #[arg(long)]
    limits: Option<PathBuf>,
    /// Internal: run as one bench site.
    #[arg(long, hide = true)]
    site_mode: bool,
    /// Internal: run as one bare-quinn baseline client.
    #[arg(long, hide = true)]
    baseline_client: bool,
    #[arg(long, hide = true)]
    addr: Option<SocketAddr>,
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
    #[arg(long, hide = true)]
    name: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = if args.site_mode {
        site_main(&args)
    } else if args.baseline_client {
        baseline_client_main(&args)
    } else {
        bench_main(&args)
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_round: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------
// Setup: PKI, study, model size.

/// An MLP over F features with H hidden units has H*(F+2)+1 values: ten features, and
/// the width that brings it closest to `params` (the study's config bounds the count, not
/// the width).
fn mlp_for(params: usize) -> (usize, usize) {
    const FEATURES: usize = 10;
    let hidden = ((params.max(4) - 1) as f64 / (FEATURES + 2) as f64)
        .round()
        .max(1.0);
    (FEATURES, hidden as usize)
}

fn study_toml(
    features: usize,
    hidden: usize,
    sites: usize,
    rounds: u64,
    encoding: Dtype,
) -> Result<String, BoxError> {
    // Site unit, local noise: each round costs a site a Gaussian mechanism with sigma / 2
    // (replace-one adjacency, sensitivity 2C). The budget fits exactly the planned rounds.
    let event = SgmEvent::new(1.0, NOISE_MULTIPLIER / 2.0, rounds)?;
    let eps = accountant::epsilon(AccountantKind::Rdp, &[event], Delta::new(DELTA)?)?;
    let budget = (eps * 1.001 * 1000.0).ceil() / 1000.0;
    let mut study = StudyBuilder::new(STUDY)
        .mlp(hidden)
        .features(features)
        .rounds(rounds)
        .min_sites(sites)
        .round_timeout_secs(600)
        .local_epochs(1, 16)
        .clip_norm(CLIP_NORM)
        .noise(NOISE_MULTIPLIER, budget)
        .delta(DELTA)
        .enrolled((0..sites).map(|i| format!("site-{i}")));
    // Only when it is not the default, so that coordinators from before the option (e.g. a
    // baseline build of an older commit, via --coordinator) accept the study.
    if encoding != Dtype::F32 {
        study = study.encoding(encoding.as_str());
    }
    Ok(study.toml())
}

/// Writes the study PKI: ca.pem, server.pem, server.key and site-i.pem / site-i.key.
fn write_pki(dir: &Path, sites: usize) -> Result<(), BoxError> {
    let ca = pki::generate_ca("bench CA", 2)?;
    let server = pki::issue_server_cert(&ca, &["localhost".into()], &[], 2)?;
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem)?;
    std::fs::write(dir.join("server.pem"), &server.cert_pem)?;
    std::fs::write(dir.join("server.key"), &server.key_pem)?;
    for i in 0..sites {
        let name = format!("site-{i}");
        let cert = pki::issue_identity_cert(&ca, &Identity::new(Role::Site, &name)?, 2)?;
        std::fs::write(dir.join(format!("{name}.pem")), &cert.cert_pem)?;
        std::fs::write(dir.join(format!("{name}.key")), &cert.key_pem)?;
    }
    Ok(())
}

fn site_tls(dir: &Path, name: &str) -> Result<rustls::ClientConfig, BoxError> {
    Ok(pki::client_config(
        &std::fs::read(dir.join("ca.pem"))?,
        &std::fs::read(dir.join(format!("{name}.pem")))?,
        &std::fs::read(dir.join(format!("{name}.key")))?,
    )?)
}

fn server_tls(dir: &Path) -> Result<rustls::ServerConfig, BoxError> {
    Ok(pki::server_config(
        &std::fs::read(dir.join("ca.pem"))?,
        &std::fs::read(dir.join("server.pem"))?,
        &std::fs::read(dir.join("server.key"))?,
        &[],
    )?)
}

fn free_udp_port() -> Result<SocketAddr, BoxError> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?)
}

fn coordinator_binary(args: &Args) -> Result<PathBuf, BoxError> {
    if let Some(p) = &args.coordinator {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench_round -> target/<profile>/fedpriv-coordinator
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?;
    let bin = profile_dir.join("fedpriv-coordinator");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it first with `cargo build --release -p fedpriv-coordinator` (or pass --coordinator)",
            bin.display()
        )
        .into())
    }
}

// ---------------------------------------------------------------------------------------
// The parent: coordinator run, then the baseline.

struct Killer(Vec<Child>);

impl Drop for Killer {
    fn drop(&mut self) {
        // SIGTERM first (the coordinator shuts down cleanly, a profiler wrapping it gets
        // to write its data), then SIGKILL whatever is still there after a few seconds.
        for c in &self.0 {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.0 {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// User + system CPU seconds of a process, from /proc/<pid>/stat.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The 1-minute load average: other work on the machine skews every figure.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field_u64(line: &str, key: &str) -> Option<u64> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|v| v.parse().ok())
}

#[derive(Debug, Clone, serde::Serialize)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(v: &[f64]) -> Stats {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let r = |x: f64| (x * 10_000.0).round() / 10_000.0;
    if s.is_empty() {
        return Stats {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    Stats {
        median: r(median),
        min: r(s[0]),
        max: r(s[s.len() - 1]),
    }
}

struct CoordinatorRun {
    round_secs: Vec<f64>,
    /// From one round's start to the next's: how fast rounds follow each other (a round's
    /// checkpoint is written while the next one runs).
    interval_secs: Vec<f64>,
    peak_rss_kib: u64,
    cpu_secs: f64,
    site_cpu_secs: f64,
    /// The largest `VmHWM` of any site process, as last read while the study ran.
    site_peak_rss_kib: u64,
    rejected: u64,
}

fn bench_main(args: &Args) -> Result<(), BoxError> {
    if args.sites == 0 || args.rounds == 0 {
        return Err("--sites and --rounds must be at least 1".into());
    }
    let coordinator = coordinator_binary(args)?;
    let tmp = tempfile::tempdir()?;
    let dir = match &args.keep_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let (features, hidden) = mlp_for(args.params);
    let d = arch::model_spec(&Architecture::mlp(hidden), features, 1)?.num_values();
    write_pki(&dir, args.sites)?;
    let study = dir.join("study.toml");
    std::fs::write(
        &study,
        study_toml(
            features,
            hidden,
            args.sites,
            args.rounds,
            args.encoding.dtype(),
        )?,
    )?;

    let run = run_coordinator(args, &coordinator, &dir, &study)?;
    let baseline = if args.no_baseline {
        None
    } else {
        Some(run_baseline(args, &dir, d)?)
    };

    // Bytes of one model or update on the wire; memory is counted in f32 copies.
    let model_bytes = d as u64 * args.encoding.dtype().size();
    let f32_bytes = d as u64 * 4;
    let bytes_per_round = 2 * args.sites as u64 * model_bytes;
    let fedpriv = stats(&run.round_secs);
    let base = baseline.as_ref().map(|b| stats(&b.round_secs));
    let per_round = |x: f64| (x / args.rounds as f64 * 1000.0).round() / 1000.0;
    let line = serde_json::json!({
        "bench": "round",
        "sites": args.sites,
        "params": d,
        "model": format!("mlp hidden={hidden} features={features}"),
        "rounds": args.rounds,
        "dp": args.dp == OnOff::On,
        "encoding": args.encoding.dtype().as_str(),
        "limits": args.limits.as_ref().map(|p| p.display().to_string()),
        "round_s": fedpriv,
        "rounds_s": run.round_secs.iter().map(|x| (x * 10_000.0).round() / 10_000.0).collect::<Vec<_>>(),
        "coordinator_peak_rss_mib": (run.peak_rss_kib as f64 / 1024.0).round(),
        "model_mib": (f32_bytes as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "peak_rss_in_model_copies": ((run.peak_rss_kib as f64 * 1024.0) / f32_bytes as f64 * 100.0).round() / 100.0,
        "sites_peak_rss_mib": (run.site_peak_rss_kib as f64 / 1024.0).round(),
        "coordinator_cpu_s_per_round": per_round(run.cpu_secs),
        "sites_cpu_s_per_round": per_round(run.site_cpu_secs),
        "updates_rejected": run.rejected,
        "bytes_per_round": bytes_per_round,
        "bytes_total": bytes_per_round * args.rounds,
        "baseline_quinn_round_s": base,
        "baseline_server_cpu_s_per_round": baseline.as_ref().map(|b| per_round(b.server_cpu_secs)),
        "baseline_clients_cpu_s_per_round": baseline.as_ref().map(|b| per_round(b.client_cpu_secs)),
        "ratio_to_baseline": base.as_ref().map(|b| ((fedpriv.median / b.median) * 100.0).round() / 100.0),
        "round_interval_s": (!run.interval_secs.is_empty()).then(|| stats(&run.interval_secs)),
        "interval_ratio_to_baseline": base.as_ref().filter(|_| !run.interval_secs.is_empty()).map(|b| ((stats(&run.interval_secs).median / b.median) * 100.0).round() / 100.0),
        "load_average_1m": load_average(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    println!("{line}");
    Ok(())
}

fn run_coordinator(
    args: &Args,
    coordinator: &Path,
    dir: &Path,
    study: &Path,
) -> Result<CoordinatorRun, BoxError> {
    let addr = free_udp_port()?;
    let state = dir.join("state");
    let mut cmd = Command::new(coordinator);
    cmd.arg("run");
    if let Some(limits) = &args.limits {
        cmd.arg("--limits").arg(limits);
    }
    let mut child = cmd
        .arg("--study")
        .arg(study)
        .arg("--state")
        .arg(&state)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--pki")
        .arg(dir)
        // A throw-away at-rest key: this state directory lives for one run.
        .env(
            "FEDPRIV_AT_REST_KEY",
            fedpriv_common::seal::generate_key_hex()?,
        )
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", coordinator.display()))?;
    let pid = child.id();
    let stderr = child.stderr.take().ok_or("no coordinator stderr")?;
    let mut procs = Killer(vec![child]);
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let log_path = dir.join("coordinator.log");
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(log_path).ok();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            if let Some(f) = log.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let next_line = |what: &str| -> Result<(Instant, String), BoxError> {
        let left = deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left)
            .map_err(|_| format!("coordinator: no {what} (see its log under --keep-dir)").into())
    };
    loop {
        let (_, line) = next_line("listening line")?;
        if line.contains("coordinator listening") {
            break;
        }
    }
    let exe = std::env::current_exe()?;
    let first_site = procs.0.len();
    let mut site_pids = Vec::new();
    for i in 0..args.sites {
        let child = Command::new(&exe)
            .arg("--site-mode")
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--dir")
            .arg(dir)
            .arg("--name")
            .arg(format!("site-{i}"))
            .arg("--dp")
            .arg(if args.dp == OnOff::On { "on" } else { "off" })
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        site_pids.push(child.id());
        procs.0.push(child);
    }
    let mut starts = std::collections::BTreeMap::new();
    let mut round_secs = Vec::new();
    let mut rejected = 0;
    let mut site_cpu = vec![0.0f64; site_pids.len()];
    let mut site_hwm = 0u64;
    loop {
        // Waiting for the coordinator's next line, a site that gave up is an error naming
        // it, not a wait until the deadline.
        let (at, line) = loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(v) => break v,
                Err(_) if Instant::now() >= deadline => {
                    return Err("coordinator: no study end (see its log under --keep-dir)".into())
                }
                Err(_) => {
                    for (i, c) in procs.0[first_site..].iter_mut().enumerate() {
                        if let Ok(Some(status)) = c.try_wait() {
                            if !status.success() {
                                return Err(format!(
                                    "site-{i} exited ({status}) before the study ended"
                                )
                                .into());
                            }
                        }
                    }
                }
            }
        };
        for (cpu, pid) in site_cpu.iter_mut().zip(&site_pids) {
            if let Some(c) = cpu_secs(*pid) {
                *cpu = c;
            }
            site_hwm = site_hwm.max(vm_hwm_kib(*pid).unwrap_or(0));
        }
        if line.contains("budget spent and recorded") {
            if let Some(r) = field_u64(&line, "round") {
                // A late site's charge logs the line again: the round began at the first.
                starts.entry(r).or_insert(at);
            }
        } else if line.contains("round completed") {
            if let Some(t0) = field_u64(&line, "round").and_then(|r| starts.get(&r)) {
                round_secs.push(at.duration_since(*t0).as_secs_f64());
            }
        } else if line.contains("update rejected") {
            rejected += 1;
            eprintln!("bench_round: {line}");
        } else if line.contains("round aborted") || line.contains(" ERROR ") {
            return Err(format!("coordinator: {line}").into());
        } else if line.contains("study ended") {
            break;
        }
    }
    let peak = vm_hwm_kib(pid).ok_or("cannot read the coordinator's VmHWM")?;
    let cpu = cpu_secs(pid).unwrap_or(f64::NAN);
    drop(procs);
    let starts: Vec<Instant> = starts.into_values().collect();
    let interval_secs = starts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect();
    Ok(CoordinatorRun {
        round_secs,
        interval_secs,
        peak_rss_kib: peak,
        cpu_secs: cpu,
        site_cpu_secs: site_cpu.iter().sum(),
        site_peak_rss_kib: site_hwm,
        rejected,
    })
}

/// The same bytes over bare quinn: per round, the server writes `d` f32 of model bytes to
/// every client at once, and every client answers with `d` f32 of its own; the round ends
/// when the last answer is read. Same certificates, same transport limits, same 1 MiB writes.
struct BaselineRun {
    round_secs: Vec<f64>,
    /// CPU seconds of the bare-quinn server (this process) over the timed rounds.
    server_cpu_secs: f64,
    client_cpu_secs: f64,
}

fn run_baseline(args: &Args, dir: &Path, d: usize) -> Result<BaselineRun, BoxError> {
    let wire_bytes = d * args.encoding.dtype().size() as usize;
    let rt = runtime(2)?;
    rt.block_on(async {
        let endpoint = make_server_endpoint(
            "127.0.0.1:0".parse()?,
            server_tls(dir)?,
            &TransportLimits::default(),
        )?;
        let addr = endpoint.local_addr()?;
        let exe = std::env::current_exe()?;
        let mut procs = Killer(Vec::new());
        for i in 0..args.sites {
            procs.0.push(
                Command::new(&exe)
                    .arg("--baseline-client")
                    .arg("--addr")
                    .arg(addr.to_string())
                    .arg("--dir")
                    .arg(dir)
                    .arg("--name")
                    .arg(format!("site-{i}"))
                    .arg("--params")
                    .arg(wire_bytes.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()?,
            );
        }
        let mut conns = Vec::new();
        for _ in 0..args.sites {
            let incoming = tokio::time::timeout(Duration::from_secs(60), endpoint.accept())
                .await?
                .ok_or("endpoint closed")?;
            conns.push(incoming.await?);
        }
        let body: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(vec![0x3cu8; wire_bytes]);
        let mut times = Vec::new();
        let me = std::process::id();
        let cpu0 = cpu_secs(me).unwrap_or(f64::NAN);
        for _ in 0..args.rounds {
            let t0 = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for conn in &conns {
                let (conn, body) = (conn.clone(), std::sync::Arc::clone(&body));
                set.spawn(async move {
                    let mut send = conn.open_uni().await?;
                    for chunk in body.chunks(1 << 20) {
                        send.write_all(chunk).await?;
                    }
                    send.finish()?;
                    let mut recv = conn.accept_uni().await?;
                    let mut got = 0usize;
                    while let Some(c) = recv.read_chunk(1 << 20, true).await? {
                        got += c.bytes.len();
                    }
                    if got != body.len() {
                        return Err::<(), BoxError>(format!("got {got} bytes").into());
                    }
                    Ok(())
                });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        let server_cpu_secs = cpu_secs(me).unwrap_or(f64::NAN) - cpu0;
        let client_cpu_secs = procs.0.iter().filter_map(|c| cpu_secs(c.id())).sum();
        for c in &conns {
            c.close(0u32.into(), b"done");
        }
        endpoint.wait_idle().await;
        drop(procs);
        Ok(BaselineRun {
            round_secs: times,
            server_cpu_secs,
            client_cpu_secs,
        })
    })
}

// ---------------------------------------------------------------------------------------
// Child processes.

fn baseline_client_main(args: &Args) -> Result<(), BoxError> {
    let addr = args.addr.ok_or("--addr")?;
    let dir = args.dir.clone().ok_or("--dir")?;
    let name = args.name.clone().ok_or("--name")?;
    let rt = runtime(2)?;
    rt.block_on(async move {
        let ep = client_endpoint(
            site_tls(&dir, &name)?,
            "127.0.0.1:0".parse()?,
            &TransportLimits::site(),
        )?;
        let conn = connect(&ep, addr, "localhost").await?;
        // In this mode --params is the reply's size in bytes.
        let reply = vec![0x5au8; args.params];
        loop {
            let mut recv = match conn.accept_uni().await {
                Ok(r) => r,
                Err(_) => break,
            };
            while recv.read_chunk(1 << 20, true).await?.is_some() {}
            let mut send = conn.open_uni().await?;
            for chunk in reply.chunks(1 << 20) {
                send.write_all(chunk).await?;
            }
            send.finish()?;
        }
        Ok(())
    })
}

/// Values per piece of a bench site's update: what a site holds of its update at once
/// (a few pieces: the one being noised, the ones queued for sending).
const PIECE: usize = 1 << 20;

/// A site's stand-in for a trained delta: one fixed piece of small pseudo-random values
/// (xorshift, +-1e-4), repeated to the model's size. Its norm is known without building
/// the whole update, so a site can clip, noise and send it piece by piece and hold a few
/// pieces, never the whole update (the bench's models reach 600M values).
struct BenchUpdate {
    piece: Vec<f32>,
    len: usize,
    norm: f64,
}

impl BenchUpdate {
    fn new(len: usize, name: &str) -> Self {
        let mut s = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let piece: Vec<f32> = (0..PIECE.min(len))
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2e-4
            })
            .collect();
        let squares = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        let (whole, rest) = (len / piece.len(), len % piece.len());
        let norm = (whole as f64 * squares(&piece) + squares(&piece[..rest])).sqrt();
        Self { piece, len, norm }
    }

    /// Produces the update piece by piece into `tx`: with `dp`, each piece scaled by the
    /// whole update's clip factor (exactly what `clip_l2` does on the whole) and noised
    /// with N(0, sigma^2 C^2) from the secure generator on every core, as the site daemon
    /// does. Runs on its own thread; the channel's bound is what the site holds.
    fn produce(
        &self,
        dp: Option<(&mut NoiseSource, ClipNorm, f64)>,
        tx: &tokio::sync::mpsc::Sender<Vec<f32>>,
    ) {
        let factor = dp
            .as_ref()
            .and_then(|(_, clip, _)| clip_factor(self.norm, *clip));
        let threads = available_threads();
        let mut dp = dp;
        let mut at = 0;
        while at < self.len {
            let n = PIECE.min(self.len - at);
            // A site scales its update in place; here the scaled copy is the one pass.
            let mut piece: Vec<f32> = match factor {
                Some(f) => self.piece[..n]
                    .iter()
                    .map(|&v| (f64::from(v) * f) as f32)
                    .collect(),
                None => self.piece[..n].to_vec(),
            };
            if let Some((noise, _, sigma_c)) = dp.as_mut() {
                noise.add_gaussian(&mut piece, *sigma_c, threads);
            }
            if tx.blocking_send(piece).is_err() {
                return;
            }
            at += n;
        }
    }
}

/// Sends an update whose body arrives piece by piece on `rx`, encoded in `dtype`.
async fn send_streamed(
    conn: &quic_io::quinn::Connection,
    msg: &SiteMessage,
    dtype: Dtype,
    mut rx: tokio::sync::mpsc::Receiver<Vec<f32>>,
    expected: usize,
) -> Result<(), BoxError> {
    let frame = wire::encode_frame(msg)?;
    let mut send = conn.open_uni().await?;
    send.write_all(&frame).await?;
    let mut sent = 0;
    while let Some(piece) = rx.recv().await {
        send.write_all(&wire::encode_body(&piece, dtype)).await?;
        sent += piece.len();
    }
    if sent != expected {
        return Err(format!("update producer stopped after {sent} of {expected} values").into());
    }
    send.finish()?;
    match send.stopped().await? {
        None => Ok(()),
        Some(code) => Err(format!("coordinator refused the update (code {code})").into()),
    }
}

/// A site that does no training: Hello, Ready for every announced study, and for each task
/// an update of the model's size (see [`BenchUpdate`]), in the encoding the task came in.
fn site_main(args: &Args) -> Result<(), BoxError> {
    let addr = args.addr.ok_or("--addr")?;
    let dir = args.dir.clone().ok_or("--dir")?;
    let name = args.name.clone().ok_or("--name")?;
    let dp = args.dp == OnOff::On;
    let rt = runtime(2)?;
    rt.block_on(async move {
        let ep = client_endpoint(
            site_tls(&dir, &name)?,
            "127.0.0.1:0".parse()?,
            &TransportLimits::site(),
        )?;
        // Retried with backoff as the site daemon does (a burst of sites from one address
        // may wait for the coordinator's per-source handshake slots).
        let mut backoff = Duration::from_millis(50);
        let mut tries = 0;
        let conn = loop {
            match connect(&ep, addr, "localhost").await {
                Ok(c) => break c,
                Err(e) if tries < 12 => {
                    tries += 1;
                    tracing::debug!(error = %e, "connect failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(format!("site {name} cannot join: {e}").into());
                }
            }
        };
        let hello = SiteMessage::Hello {
            version: PROTOCOL_VERSION,
            claimed_site: name.clone(),
        };
        quic_io::send_message(&conn, &hello, None).await?;
        let mut specs = std::collections::BTreeMap::new();
        let mut noise = Some(NoiseSource::from_os()?);
        let mut update: Option<std::sync::Arc<BenchUpdate>> = None;
        loop {
            let mut recv = match conn.accept_uni().await {
                Ok(r) => r,
                Err(_) => break,
            };
            let msg: CoordinatorMessage = quic_io::recv_frame(&mut recv).await?;
            match msg {
                CoordinatorMessage::Welcome { studies, .. } => {
                    for ann in studies {
                        let spec = arch::model_spec(&ann.model, ann.data.features.len(), 1)?;
                        update = Some(std::sync::Arc::new(BenchUpdate::new(
                            spec.num_values(),
                            &name,
                        )));
                        specs.insert(ann.study.clone(), spec);
                        let ready = SiteMessage::Ready {
                            study: ann.study,
                            records: 1000,
                        };
                        quic_io::send_message(&conn, &ready, None).await?;
                    }
                }
                CoordinatorMessage::Task(task) => {
                    let spec = specs.get(&task.study).ok_or("task for an unknown study")?;
                    // The model is read and dropped piece by piece: a bench site does not
                    // train, so it need not hold it.
                    quic_io::recv_tensor_body_accepting(
                        &mut recv,
                        &task.header,
                        spec,
                        &Dtype::ALL,
                        |_, _| {},
                    )
                    .await?;
                    let source = update.clone().ok_or("task before the study's welcome")?;
                    let clip = ClipNorm::new(task.clip_norm)?;
                    let sigma_c = task.noise_multiplier * task.clip_norm;
                    let mut src = noise.take().ok_or("noise source")?;
                    let (tx, rx) = tokio::sync::mpsc::channel(2);
                    let producer = tokio::task::spawn_blocking(move || {
                        source.produce(dp.then_some((&mut src, clip, sigma_c)), &tx);
                        src
                    });
                    let msg = SiteMessage::Update {
                        study: task.study.clone(),
                        round: task.round,
                        header: task.header.clone(),
                    };
                    // Answer in the encoding the model came in (the study's).
                    let sent =
                        send_streamed(&conn, &msg, task.header.dtype, rx, spec.num_values()).await;
                    noise = Some(producer.await?);
                    sent?;
                }
                CoordinatorMessage::StudyEnded { .. } | CoordinatorMessage::Refused { .. } => break,
                // Studies created at runtime: not this scenario's.
                CoordinatorMessage::StudyAnnounced(_) => {}
            }
        }
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        Ok(())
    })
}
