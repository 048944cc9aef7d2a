//! `im-meter`: usage metering (MAU, PCC, DAU, groups) and billing for an IM cloud service.
//!
//! This binary is thin glue at the edges: it parses the command line and the config, reads
//! input, calls the pure core (`im-meter-core`) and writes what it returns.
//!
//! Layout: [`config`] (TOML + env, validated) → [`replay`] (files in, core pipeline) →
//! [`report`] (JSON or tables out).

mod config;
mod replay;
mod report;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;
use crate::replay::{ReplayInput, Source};

/// Usage metering and billing for IM apps: MAU, PCC, peak DAU and group count → charges.
#[derive(Debug, Parser)]
#[command(name = "im-meter", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pipeline over NDJSON files (no Kafka): usage and charges of every month in
    /// the input.
    Replay(ReplayArgs),
    /// Validate the configuration and print it as in effect (defaults, then the file, then
    /// `IM_METER__*` variables).
    Config {
        /// Configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// SDK events, one JSON object per line (`-` = stdin).
    #[arg(long, value_name = "FILE")]
    events: String,
    /// Subscription events (plans, migrations, trials), one JSON object per line.
    #[arg(long, value_name = "FILE")]
    subscriptions: Option<String>,
    /// Configuration file (TOML); `IM_METER__*` variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Write every refused line, with its reason, to this NDJSON file.
    #[arg(long, value_name = "FILE")]
    dlq: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Also count MAU and DAU exactly and report the sketches' error (uses memory
    /// proportional to users).
    #[arg(long)]
    exact: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One JSON object: `{"usage":[...],"charges":[...],"rejected":N}`.
    Json,
    /// Readable tables.
    Table,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("im-meter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Replay(args) => {
            let config = Config::load(args.config.as_deref(), std::env::vars())?;
            let input = ReplayInput {
                events: Source::parse(&args.events),
                subscriptions: args.subscriptions.as_deref().map(Source::parse),
                dead_letters: args.dlq,
                exact: args.exact,
                progress: true,
            };
            let result = replay::replay(&config, &input)?;
            let stdout = io::stdout();
            let mut out = io::BufWriter::new(stdout.lock());
            match args.format {
                Format::Json => report::write_json(&mut out, &result, &config.meter.tz)?,
                Format::Table => report::write_tables(&mut out, &result, &config.meter.tz)?,
            }
            out.flush()?;
            Ok(())
        }
        Command::Config { config } => {
            let config = Config::load(config.as_deref(), std::env::vars())?;
            print!("{}", toml::to_string(&config.file)?);
            Ok(())
        }
    }
}
