//! pdgate's own log: `tracing` events on stderr, as text or one JSON object per line.

use std::io::IsTerminal;

/// How log lines are written (`--log-format`, `[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level), for a log collector.
    Json,
}

impl LogFormat {
    /// The configuration's spelling, `text` or `json`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Installs the process's subscriber: events on stderr in `format`, filtered by `PDGATE_LOG`
/// (an `EnvFilter` directive) or else by `default_filter`. A second call does nothing.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(colour()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Colour only for a person reading a terminal: the stream written to is what is tested (a file, a
/// pipe or a log collector gets no escape codes), and `NO_COLOR` (any non-empty value, as
/// no-color.org says) turns it off there too.
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
