//! How both daemons log: human-readable lines (the default) or one JSON object per line
//! (`--log-format json`, for a log shipper), to stderr, filtered by `RUST_LOG` or the
//! given default. Log lines never carry record values, pre-noise values or keys (each
//! call site's concern); this module only chooses the format.

/// The `--log-format` of both binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
