//! `promgate`: the command line. `promgate agent` runs the remote_write receiver;
//! `promgate run` (also plain `promgate`) is the one-command embedded default.

mod config;

use clap::{Parser, Subcommand};
use config::{AgentConfig, AgentFlags};
use promgate_shards::sink::CountingSink;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "promgate",
    version,
    about = "Thread-per-core io_uring Prometheus remote_write agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the remote_write agent.
    Agent {
        #[command(flatten)]
        flags: AgentFlags,
        /// Validate the configuration, print it, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Run everything on one machine with defaults (today: the agent; the in-process
    /// server joins when shipping lands).
    Run {
        #[command(flatten)]
        flags: AgentFlags,
    },
}

fn init_logging(level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .unwrap_or_else(|| level.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Creates the data directory; a plain `promgate run` falls back to a local directory
/// when the system one cannot be created (not root).
fn prepare_data_dir(config: &mut AgentConfig, allow_fallback: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    match std::fs::create_dir_all(&config.data_dir) {
        Ok(()) => Ok(()),
        Err(e) if allow_fallback && !config.data_dir_explicit => {
            let local = PathBuf::from(config::DATA_DIR_FALLBACK);
            tracing::warn!(wanted = %config.data_dir.display(), error = %e, using = %local.display(), "data directory not writable; using a local one");
            config.data_dir = local;
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating data directory {}", config.data_dir.display()))
        }
        Err(e) => {
            Err(e).with_context(|| format!("creating data directory {}", config.data_dir.display()))
        }
    }
}

fn run_agent(flags: &AgentFlags, allow_fallback: bool) -> anyhow::Result<()> {
    let mut config = AgentConfig::resolve(flags)?;
    init_logging(&config.log_level);
    prepare_data_dir(&mut config, allow_fallback)?;
    tracing::warn!("acknowledgement is not yet durable: decoded batches go to a counting sink until the WAL lands");
    promgate_shards::runtime::run(config.options, |_shard| CountingSink::default())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run {
        flags: AgentFlags::default(),
    }) {
        Command::Agent {
            flags,
            check_config: true,
        } => match AgentConfig::resolve(&flags) {
            Ok(c) => {
                println!(
                    "config OK: listen {} shards {} data_dir {}",
                    c.options.listen,
                    c.options.shards,
                    c.data_dir.display()
                );
                println!("{:#?}", c.options.receive);
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("promgate: invalid config: {e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Agent { flags, .. } => run_agent(&flags, false),
        Command::Run { flags } => run_agent(&flags, true),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("promgate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
