//! `promgate`: the command line. `promgate agent` runs the remote_write receiver and its
//! shippers; `promgate server` runs the store and query listeners; `promgate run` (also
//! plain `promgate`) is the one-command embedded default: both in one process.

mod config;
mod inspect;

use clap::{Parser, Subcommand};
use config::{AgentConfig, AgentFlags, ServerFlags};
use promgate_shards::prepared::SeriesHasher;
use promgate_shards::sink::WalSink;
use promgate_shards::wal::storage::FileStorage;
use promgate_shards::wal::Wal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "promgate",
    version,
    about = "Thread-per-core io_uring Prometheus remote_write agent and server"
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
    /// Run the server: ship listener, the `prometheus` store, remote_read and query API.
    Server {
        #[command(flatten)]
        flags: ServerFlags,
        /// Validate the configuration, print it, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Run everything on one machine with defaults: the agent and, in the same process,
    /// the server (data under ./promgate-data when /var/lib/promgate is not writable).
    Run {
        #[command(flatten)]
        flags: AgentFlags,
    },
    /// Look at the write-ahead log.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
}

#[derive(Subcommand)]
enum WalCommand {
    /// Print, per shard, segments, records, series, samples, sequence range and any
    /// corruption, without modifying anything. Exits 1 if a problem was found.
    Inspect {
        /// The agent's data directory (its WAL is under DIR/wal).
        #[arg(long)]
        data_dir: PathBuf,
        /// Print every sample (labels, timestamp, value and its bits) instead.
        #[arg(long)]
        dump: bool,
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
    warn_orphan_shards(&config.data_dir, config.options.shards);
    if config.ship.agent_id.is_empty() {
        config.ship.agent_id = agent_id(&config.data_dir)?;
    }
    // The server's exactly-once ledger is keyed by this agent's id *and* the WAL's epoch:
    // a WAL that was deleted starts its sequence numbers again, and must not be taken
    // for a replay of what the old one shipped.
    let epoch = wal_epoch(&config.data_dir.join("wal"))?;
    config.ship.agent_id = format!("{}#{epoch}", config.ship.agent_id);
    if let Some(section) = &config.embedded {
        let dir = section
            .data_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.join("server"));
        let server_config = config::server_config(
            section,
            config.embedded_listen.as_deref(),
            config.embedded_query_listen.as_deref(),
            dir,
            None,
        )?;
        let server = promgate_server::start(server_config)?;
        let ip = match server.ship_addr.ip() {
            ip if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            ip => ip,
        };
        config.ship.server = std::net::SocketAddr::new(ip, server.ship_addr.port()).to_string();
        tracing::info!(ship = %server.ship_addr, query = %server.query_addr, "embedded server running in this process");
        // The server's threads live as long as the process.
        std::mem::forget(server);
    }
    tracing::info!(server = %config.ship.server, agent_id = %config.ship.agent_id, "shipping");
    use promgate_shards::enrich::{EnrichConfig, Enricher};
    use promgate_shards::snapshot::{spawn_poller, SnapshotCell, SnapshotMetrics};
    let enrich_config = EnrichConfig {
        rules: config.enrich.rules.clone(),
        custom_tags: config.enrich.custom_tags.clone(),
        agent: config
            .ship
            .agent_id
            .split('#')
            .next()
            .unwrap_or_default()
            .to_string(),
        agent_host: host_name(),
    };
    let snapshot = std::sync::Arc::new(SnapshotCell::default());
    if !config.enrich.addresses.is_empty() {
        let metrics = std::sync::Arc::new(SnapshotMetrics {
            sync_errors: config
                .enrich
                .addresses
                .iter()
                .map(|_| Default::default())
                .collect(),
            ..Default::default()
        });
        promgate_shards::metrics::set_snapshot_metrics(
            metrics.clone(),
            config.enrich.addresses.clone(),
        );
        tracing::info!(addresses = ?config.enrich.addresses, interval = ?config.enrich.interval, "polling Prometheus for the target-label snapshot");
        spawn_poller(
            config.enrich.addresses.clone(),
            config.enrich.interval,
            config.enrich.timeout,
            snapshot.clone(),
            metrics,
            enrich_config.clone(),
        )?;
    }
    let ship_config = config.ship.clone();
    let wal_root = config.data_dir.join("wal");
    let wal_config = config.wal.clone();
    tracing::info!(dir = %wal_root.display(), fsync = ?wal_config.fsync, max_bytes = wal_config.max_bytes, "write-ahead log");
    promgate_shards::runtime::run(config.options, move |shard, metrics| {
        use anyhow::Context;
        let dir = wal_root.join(format!("shard-{shard}"));
        let storage = FileStorage::open(&dir)
            .with_context(|| format!("opening WAL directory {}", dir.display()))?
            .direct_io(wal_config.direct_io);
        let (wal, rec) = Wal::open(storage, shard as u32, wal_config.clone(), metrics.clone())
            .with_context(|| format!("recovering WAL in {}", dir.display()))?;
        tracing::info!(
            shard,
            segments = rec.segments,
            records = rec.records,
            bytes = rec.bytes,
            first_seq = ?rec.first_seq,
            last_seq = ?rec.last_seq,
            torn_tail_bytes = rec.torn_tail_bytes,
            "WAL recovered"
        );
        for (segment, c) in &rec.corruption {
            tracing::error!(
                shard,
                segment,
                offset = c.offset,
                bytes = c.bytes,
                lost_first = c.lost_seqs.0,
                lost_last = c.lost_seqs.1,
                "corrupt WAL records: these sequence numbers are lost"
            );
        }
        for (segment, why) in &rec.unreadable {
            tracing::error!(shard, segment, reason = %why, "unreadable WAL segment left in place");
        }
        let wal = std::rc::Rc::new(wal);
        let hasher = SeriesHasher::random();
        promgate_shards::ship::Shipper {
            shard: shard as u32,
            wal: wal.clone(),
            config: ship_config.clone(),
            metrics: metrics.clone(),
            hasher,
        }
        .spawn();
        Ok(WalSink {
            wal,
            enricher: Some(Enricher::new(snapshot.clone(), &enrich_config)),
            metrics: metrics.clone(),
            shard,
            hasher: ship_config.columns_in_wal.then_some(hasher),
        })
    })
}

/// This machine's host name (the `agent_host` tag).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A random id made when the WAL directory is created and kept in it (`wal/epoch`).
fn wal_epoch(wal_dir: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    std::fs::create_dir_all(wal_dir).with_context(|| format!("creating {}", wal_dir.display()))?;
    persistent_id(&wal_dir.join("epoch"), String::new())
}

/// Reads the id kept in `path`, or creates it as `prefix` + 12 random hex digits.
fn persistent_id(path: &Path, prefix: String) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::{Read, Write};
    if let Ok(id) = std::fs::read_to_string(path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let mut random = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("reading /dev/urandom for an id")?;
    let id = format!(
        "{prefix}{}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(format!("{id}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(id)
}

/// This agent's id: generated at first start and kept in DATA_DIR/agent_id, so the
/// server's exactly-once ledger recognises it across restarts.
fn agent_id(data_dir: &Path) -> anyhow::Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "agent".into());
    persistent_id(&data_dir.join("agent_id"), format!("{host}-"))
}

fn run_server(flags: &ServerFlags) -> anyhow::Result<()> {
    let (config, level) = config::resolve_server(flags)?;
    init_logging(&level);
    // SIGTERM and SIGINT are blocked before any thread starts (threads inherit the
    // mask) and taken here, so a stop ends with a checkpoint: the agents then resend
    // nothing after a restart. A crash instead rolls back to the last checkpoint and
    // the agents resend the rest from their WALs.
    let stop = termination_signals();
    let server = promgate_server::start(config)?;
    let signal = wait_for(&stop);
    tracing::info!(signal, "stopping: final checkpoint");
    server
        .store
        .checkpoint()
        .map_err(|e| anyhow::anyhow!("final checkpoint failed: {e}"))?;
    Ok(())
}

/// Buffers of 1 MiB and more (request bodies, decompression buffers, WAL commit
/// buffers, ship frames) get their own mappings from glibc's malloc, given back when
/// freed. By default glibc raises that threshold as large blocks are freed (up to 32
/// MiB), after which they are carved from its per-thread heaps and stay there: flat
/// out at 128k series the agent's peak RSS was ~125-140 MiB with the default and
/// ~102-109 MiB with 1 MiB, at the same CPU per sample (`loadtest/README.md`). A
/// `MALLOC_MMAP_THRESHOLD_` set in the environment is left to rule.
fn cap_malloc_retention() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a glibc tunable; called before any thread starts.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and every thread it starts later).
fn termination_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a zeroed, then initialised, signal set owned here.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for one of the blocked signals of `set`; returns its number.
fn wait_for(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    // SAFETY: `set` is an initialised signal set whose signals this thread blocks.
    while unsafe { libc::sigwait(set, &mut signal) } != 0 {}
    signal
}

/// A WAL directory of a shard that no longer runs still holds records; say so.
fn warn_orphan_shards(data_dir: &Path, shards: usize) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("wal")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("shard-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            let has_segments = promgate_shards::wal::storage::list_segments(&e.path())
                .is_ok_and(|l| !l.is_empty());
            if n >= shards && has_segments {
                tracing::warn!(shard = n, shards, "a WAL of a shard that is not running holds records; run with more shards to keep them");
            }
        }
    }
}

fn main() -> ExitCode {
    cap_malloc_retention();
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
                println!(
                    "enrich: addresses {:?}, sync every {:?} (timeout {:?}), custom tags {:?}",
                    c.enrich.addresses, c.enrich.interval, c.enrich.timeout, c.enrich.custom_tags
                );
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("promgate: invalid config: {e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Agent { flags, .. } => run_agent(&flags, false),
        Command::Server {
            flags,
            check_config: true,
        } => match config::resolve_server(&flags) {
            Ok((c, _)) => {
                println!("config OK: {c:#?}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("promgate: invalid config: {e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Server { flags, .. } => run_server(&flags),
        Command::Run { flags } => run_agent(&flags, true),
        Command::Wal {
            command: WalCommand::Inspect { data_dir, dump },
        } => match inspect::run(&data_dir, dump) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("promgate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
