//! `im-meter`: usage metering (MAU, PCC, DAU, groups) and billing for an IM cloud service.
//!
//! This binary is thin glue at the edges: it parses the command line and the config, reads
//! input, calls the pure core (`im-meter-core`) and writes what it returns.
//!
//! The modules live in the library half of this crate (`src/lib.rs`), so tests and
//! benchmarks can drive them in-process; this file only parses arguments and dispatches.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use im_meter_core::time::Month;

use im_meter::config::Config;
use im_meter::http;
use im_meter::input::{for_each_line, Source};
use im_meter::kafka::ledger::Ledger;
use im_meter::kafka::worker::{self, Role};
use im_meter::kafka::{
    self,
    produce::{LineKind, LineProducer},
};
use im_meter::replay::{self, ReplayInput};
use im_meter::report;
use im_meter::status::Board;
use im_meter::workload::Workload;

/// Usage metering and billing for IM apps: MAU, PCC, peak DAU and group count → charges.
#[derive(Debug, Parser)]
#[command(name = "im-meter", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Kafka worker (metering and billing stages) until SIGINT or SIGTERM.
    Run {
        /// Configuration file (TOML); `IM_METER__*` variables override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Which stages to run.
        #[arg(long, value_enum, default_value_t = Role::All)]
        role: Role,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Run the pipeline over NDJSON files (no Kafka): usage and charges of every month in
    /// the input.
    Replay(ReplayArgs),
    /// Write SDK events (an NDJSON file, the sample, or a synthetic load) to the events
    /// topic, keyed by app_id; optionally subscription events to the subscriptions topic.
    Produce(ProduceArgs),
    /// Print a billed month's usage, charges and alerts as the worker published them
    /// (waiting until every billing partition has billed it).
    Report {
        /// The month, YYYY-MM.
        #[arg(long)]
        month: Month,
        /// How long to wait for the month to be billed.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Configuration file (TOML); `IM_METER__*` variables override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write a synthetic month of SDK events as NDJSON (the bundled sample, or a load of
    /// any size).
    Generate(GenerateArgs),
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
    /// Also count MAU and DAU exactly whatever `metering.exact_limit` says, and report
    /// the estimates' error (uses memory proportional to users).
    #[arg(long)]
    exact: bool,
    /// Threads decoding and metering (default: one per CPU). The output is the same for
    /// any number.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

/// What synthetic month to make (`generate`, `produce --sample | --synthetic`).
#[derive(Debug, clap::Args)]
struct WorkloadArgs {
    /// The bundled sample's six apps (deploy/sample/) instead of a synthetic load.
    #[arg(long, conflicts_with_all = ["apps", "users", "seed"])]
    sample: bool,
    /// Number of apps.
    #[arg(long, default_value_t = 50)]
    apps: u64,
    /// Distinct users in all (split evenly across apps).
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Month to generate, YYYY-MM.
    #[arg(long, default_value = "2026-11")]
    month: Month,
    /// Random seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of extra malformed lines (synthetic).
    #[arg(long, default_value_t = 0.0)]
    malformed_share: f64,
    /// Share of lines written twice, like producer retries (synthetic).
    #[arg(long, default_value_t = 0.0)]
    duplicate_share: f64,
}

impl WorkloadArgs {
    fn workload(&self) -> Workload {
        if self.sample {
            return Workload { month: self.month, ..Workload::sample() };
        }
        Workload {
            malformed_share: self.malformed_share,
            duplicate_share: self.duplicate_share,
            ..Workload::synthetic(self.month, self.apps, self.users, self.seed)
        }
    }
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Output file (`-` = stdout).
    #[arg(long, default_value = "-")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ProduceArgs {
    /// SDK events to send, NDJSON (`-` = stdin).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["sample", "synthetic"])]
    events: Option<String>,
    /// Send a synthetic month (see --apps, --users, --month, --seed); --sample sends the
    /// sample's month instead.
    #[arg(long, conflicts_with = "sample")]
    synthetic: bool,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Subscription events to send to the subscriptions topic, NDJSON.
    #[arg(long, value_name = "FILE")]
    subscriptions: Option<String>,
    /// At most this many events a second (default: as fast as the broker takes them).
    #[arg(long)]
    rate: Option<u64>,
    /// Send the events inside Kafka transactions with this transactional id, as a
    /// transactional backend would (readers see them once committed; each partition then
    /// ends with a transaction marker rather than a record).
    #[arg(long, value_name = "ID")]
    transactional_id: Option<String>,
    /// Partitions of topics this command creates because they are missing (default: the
    /// config's `kafka.partitions`).
    #[arg(long)]
    partitions: Option<i32>,
    /// Configuration file (TOML); `IM_METER__*` variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
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
                threads: args.threads.map(usize::from),
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
        Command::Run { config, role, log_format } => {
            // Listening first, before anything that can wait on the brokers: a stop asked for
            // during start-up is honoured at once (a signal before this point would kill the
            // process, or be lost where a shell started it with the signal ignored).
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let mut signals = runtime.block_on(async { StopSignals::listen() })?;
            init_logs(log_format);
            let mut config = Config::load(config.as_deref(), std::env::vars())?;
            // The effective settings, for whoever reads the log later (secrets redacted).
            tracing::info!(config = ?config.file, "worker: starting");
            let prepared = runtime.block_on(async {
                tokio::select! {
                    prepared = worker::prepare_topics_when_reachable(&config) => Some(prepared),
                    () = signals.next() => None,
                }
            });
            let Some(prepared) = prepared else {
                tracing::info!("shutdown requested during start-up: nothing begun, stopping");
                return Ok(());
            };
            config.kafka.max_value_bytes = prepared?;
            let shutdown = Arc::new(AtomicBool::new(false));
            let stop = Arc::clone(&shutdown);
            std::thread::spawn(move || runtime.block_on(signals.ask_to_stop(stop)));
            let board = Board::new();
            let ledger = Arc::new(Ledger::new(&config));
            // The metering consumers announce where this worker's usage API is.
            let advertised = http::start(config.clone(), Arc::clone(&board), Arc::clone(&ledger))?;
            config.http.advertised_address = Some(advertised);
            // Helpers of the endpoints: a failure is logged, and metering goes on.
            helper("lag", &shutdown, {
                let (config, board) = (config.clone(), Arc::clone(&board));
                move |stop| kafka::lag::sample(&config, &board, stop)
            })?;
            helper("ledger", &shutdown, {
                let config = config.clone();
                move |stop| kafka::ledger::follow(&config, &ledger, stop)
            })?;
            worker::run(&config, role, shutdown, &board)
        }
        Command::Produce(args) => produce(args),
        Command::Report { month, wait, format, config } => {
            let config = Config::load(config.as_deref(), std::env::vars())?;
            let result = kafka::report::read_billed_month(&config, month, wait)?;
            let mut out = io::BufWriter::new(io::stdout().lock());
            match format {
                Format::Json => report::write_json(&mut out, &result, &config.meter.tz)?,
                Format::Table => report::write_tables(&mut out, &result, &config.meter.tz)?,
            }
            out.flush()?;
            Ok(())
        }
        Command::Generate(args) => {
            let workload = args.workload.workload();
            let config = Config::load(None, std::env::vars())?;
            let lines = if args.out.as_os_str() == "-" {
                workload.write_events(&config.meter.tz, &mut io::BufWriter::new(io::stdout().lock()))?
            } else {
                let file = std::fs::File::create(&args.out)
                    .with_context(|| format!("cannot create {}", args.out.display()))?;
                let mut out = io::BufWriter::new(file);
                let lines = workload.write_events(&config.meter.tz, &mut out)?;
                out.flush()?;
                lines
            };
            eprintln!("im-meter: wrote {lines} event lines");
            Ok(())
        }
        Command::Config { config } => {
            let config = Config::load(config.as_deref(), std::env::vars())?;
            print!("{}", toml::to_string(&config.file.redacted())?);
            Ok(())
        }
    }
}

fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(partitions) = args.partitions {
        config.kafka.partitions = partitions;
    }
    let client = kafka::client_config(&config);
    let topics = &config.file.topics;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(worker::prepare_topics(&config))?;

    if let Some(path) = &args.subscriptions {
        let mut producer =
            LineProducer::new(&client, &topics.subscriptions, LineKind::Subscription, None, None)?;
        for_each_line(&Source::parse(path), false, |_, line| producer.send(line))?;
        let stats = producer.finish()?;
        eprintln!("im-meter: sent {} subscription events to {}", stats.delivered, topics.subscriptions);
    }

    let mut producer = LineProducer::new(
        &client,
        &topics.events,
        LineKind::Usage,
        args.rate,
        args.transactional_id.as_deref(),
    )?;
    let workload = (args.workload.sample || args.synthetic).then(|| args.workload.workload());
    match (workload, &args.events) {
        (Some(workload), _) => {
            for line in workload.lines(&config.meter.tz) {
                producer.send(line.as_bytes())?;
            }
        }
        (None, Some(path)) => {
            for_each_line(&Source::parse(path), true, |_, line| producer.send(line))?;
        }
        (None, None) => anyhow::bail!("say what to send: --events FILE, --sample or --synthetic"),
    }
    let stats = producer.finish()?;
    eprintln!(
        "im-meter: sent {} events to {} ({} keyed by app_id)",
        stats.delivered, topics.events, stats.keyed
    );
    Ok(())
}

/// Runs `work` on a thread named `im-meter-{name}` until it returns; an error is logged.
fn helper(
    name: &str,
    shutdown: &Arc<AtomicBool>,
    work: impl FnOnce(&AtomicBool) -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    let stop = Arc::clone(shutdown);
    let label = name.to_string();
    std::thread::Builder::new().name(format!("im-meter-{name}")).spawn(move || {
        if let Err(e) = work(&stop) {
            tracing::error!(helper = %label, error = %format!("{e:#}"), "helper stopped");
        }
    })?;
    Ok(())
}

/// Logs to stderr; `IM_METER_LOG` filters (default `info`).
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IM_METER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// SIGINT and SIGTERM, listened for from the start of `run`.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers (inside a Tokio runtime).
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    /// The first signal asks the stages to commit and stop; a second one quits at once.
    async fn ask_to_stop(mut self, shutdown: Arc<AtomicBool>) {
        for _ in 0..2 {
            self.next().await;
            if shutdown.swap(true, Ordering::Relaxed) {
                eprintln!("im-meter: second signal, quitting now");
                std::process::exit(130);
            }
            tracing::info!("shutdown requested: committing and leaving the group");
        }
    }
}
