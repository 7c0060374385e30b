//! The agent's configuration: a TOML file (`config/agent.toml` documents every key),
//! overridden by command-line flags, validated once at start-up.

use anyhow::{bail, Context};
use promgate_proto::Limits;
use promgate_shards::receive::ReceiveConfig;
use promgate_shards::runtime::AgentOptions;
use promgate_shards::wal::{Fsync, WalConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const LISTEN_DEFAULT: &str = "0.0.0.0:38086";
pub const DATA_DIR_DEFAULT: &str = "/var/lib/promgate/agent";
/// Where a plain `promgate run` keeps its data when the system directory is not writable.
pub const DATA_DIR_FALLBACK: &str = "promgate-data/agent";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub receive: ReceiveSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub wal: WalSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub ship: ShipSection,
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub query: QuerySection,
    #[serde(default)]
    pub enrich: EnrichSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichSection {
    /// Prometheus base URLs whose targets and configuration are polled.
    pub prometheus_http_api_addresses: Option<Vec<String>>,
    pub sync_interval: Option<String>,
    pub sync_timeout: Option<String>,
    pub custom_tags: Option<std::collections::BTreeMap<String, String>>,
    /// Tag name → source: a discovered label (`__meta_...`), `label:NAME` (a target
    /// label) or `instance:host`; `""` removes a default rule.
    pub meta_tags: Option<std::collections::BTreeMap<String, String>>,
    /// Request header → tag name.
    pub header_tags: Option<std::collections::BTreeMap<String, String>>,
    pub header_tag_bytes_max: Option<usize>,
}

/// The validated `[enrich]` settings.
#[derive(Debug, Clone, Default)]
pub struct EnrichSettings {
    pub addresses: Vec<String>,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub custom_tags: Vec<(String, String)>,
    pub rules: Vec<promgate_shards::enrich::MetaRule>,
    /// (header name in lowercase, tag name), sorted by tag name.
    pub header_tags: Vec<(String, String)>,
    pub header_tag_bytes_max: usize,
}

fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

impl EnrichSection {
    fn resolve(&self) -> anyhow::Result<EnrichSettings> {
        let ms =
            |v: &Option<String>, default: &str, key: &str| -> anyhow::Result<std::time::Duration> {
                let text = v.clone().unwrap_or_else(|| default.to_string());
                let ms = promgate_server::parse_duration_ms(&text)
                    .map_err(|e| anyhow::anyhow!("enrich.{key}: {e}"))?;
                Ok(std::time::Duration::from_millis(ms as u64))
            };
        let addresses = self
            .prometheus_http_api_addresses
            .clone()
            .unwrap_or_default();
        for a in &addresses {
            if !a.starts_with("http://") {
                bail!("enrich.prometheus_http_api_addresses: {a:?} must start with http://");
            }
        }
        let mut custom_tags = Vec::new();
        for (n, v) in self.custom_tags.iter().flatten() {
            if !is_label_name(n) {
                bail!("enrich.custom_tags: {n:?} is not a valid label name");
            }
            if v.is_empty() || v.len() > 1024 {
                bail!("enrich.custom_tags.{n}: the value must be 1 to 1024 bytes");
            }
            custom_tags.push((n.clone(), v.clone()));
        }
        use promgate_shards::enrich::{EnrichConfig, MetaRule, Source};
        let mut rules = EnrichConfig::default_rules();
        for (tag, source) in self.meta_tags.iter().flatten() {
            if !is_label_name(tag) {
                bail!("enrich.meta_tags: {tag:?} is not a valid label name");
            }
            rules.retain(|r| r.tag != *tag);
            let source = if source.is_empty() {
                continue;
            } else if source == "instance:host" {
                Source::InstanceHost
            } else if let Some(l) = source.strip_prefix("label:") {
                Source::TargetLabel(l.to_string())
            } else if is_label_name(source) {
                Source::Discovered(source.clone())
            } else {
                bail!("enrich.meta_tags.{tag}: {source:?} is not a discovered label name, label:NAME or instance:host");
            };
            rules.push(MetaRule {
                tag: tag.clone(),
                source,
            });
        }
        let mut header_tags = Vec::new();
        for (header, tag) in self.header_tags.iter().flatten() {
            if header.is_empty()
                || !header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                bail!("enrich.header_tags: {header:?} is not a header name");
            }
            if !is_label_name(tag) {
                bail!("enrich.header_tags.{header}: {tag:?} is not a valid label name");
            }
            header_tags.push((header.to_ascii_lowercase(), tag.clone()));
        }
        header_tags.sort_by(|a, b| a.1.cmp(&b.1));
        let header_tag_bytes_max = self.header_tag_bytes_max.unwrap_or(256);
        if header_tag_bytes_max == 0 || header_tag_bytes_max > 4096 {
            bail!("enrich.header_tag_bytes_max must be 1 to 4096");
        }
        Ok(EnrichSettings {
            addresses,
            interval: ms(&self.sync_interval, "30s", "sync_interval")?,
            timeout: ms(&self.sync_timeout, "5s", "sync_timeout")?,
            custom_tags,
            rules,
            header_tags,
            header_tag_bytes_max,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipSection {
    /// HOST:PORT of the promgate server; absent: run the server in this process.
    pub server: Option<String>,
    pub agent_id: Option<String>,
    pub batch_samples_max: Option<usize>,
    pub batch_new_series_max: Option<usize>,
    pub compress: Option<bool>,
    pub backoff_max_ms: Option<u64>,
    pub reply_timeout_ms: Option<u64>,
    pub split_target_labels: Option<bool>,
    pub columns_in_wal: Option<bool>,
}

/// The server's settings: `promgate server`'s file, and the embedded server's.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<String>,
    pub query_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub retention: Option<String>,
    pub read_samples_max: Option<u64>,
    pub query_connections_max: Option<usize>,
    pub cache_bytes: Option<usize>,
    pub checkpoint_interval: Option<String>,
    /// The file's `[query]` section (a table of its own, copied here after parsing).
    #[serde(skip)]
    pub query: QuerySection,
}

/// `[query]`: how the server's query APIs show meta tags.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct QuerySection {
    /// remote_read label sets carry the meta tags too (under the prefix).
    pub meta_tags_in_labels: Option<bool>,
    /// The prefix of meta tag names in matchers and the labels/series APIs (`df_`).
    pub meta_tag_prefix: Option<String>,
}

/// `promgate server`'s file: the same `[server]`, `[query]` and `[log]` sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub query: QuerySection,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalSection {
    pub fsync: Option<String>,
    pub group_commit_delay_us: Option<u64>,
    pub group_commit_records_max: Option<usize>,
    pub segment_bytes: Option<u64>,
    pub max_bytes: Option<u64>,
    pub retry_after_s: Option<u32>,
    pub retention_bytes: Option<u64>,
    pub retention_age_s: Option<u64>,
    pub memory_bytes: Option<usize>,
    pub direct_io: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// 0 or absent: one shard per allowed CPU.
    pub shards: Option<usize>,
    pub io_memory_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveSection {
    pub connections_per_shard_max: Option<usize>,
    pub header_bytes_max: Option<usize>,
    pub body_bytes_max: Option<usize>,
    pub bodies_bytes_max: Option<usize>,
    pub decoded_bytes_max: Option<usize>,
    pub drain_bytes_max: Option<usize>,
    pub idle_timeout_ms: Option<u64>,
    pub read_timeout_ms: Option<u64>,
    pub write_timeout_ms: Option<u64>,
    pub retry_after_s: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub labels_per_series_max: Option<u32>,
    pub label_name_bytes_max: Option<u32>,
    pub label_value_bytes_max: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<String>,
}

/// Command-line overrides; `None` leaves the file's value (or the default).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AgentFlags {
    /// TOML configuration file (see config/agent.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// remote_write listen address [default: 0.0.0.0:38086].
    #[arg(long)]
    pub listen: Option<String>,
    /// Data directory [default: /var/lib/promgate/agent].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Number of shards (executors pinned one per CPU) [default: all allowed CPUs].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Largest compressed request body, bytes [default: 16777216].
    #[arg(long)]
    pub body_bytes_max: Option<usize>,
    /// Largest decompressed request body, bytes [default: 67108864].
    #[arg(long)]
    pub decoded_bytes_max: Option<usize>,
    /// Open connections per shard before new ones get 503 [default: 1024].
    #[arg(long)]
    pub connections_per_shard_max: Option<usize>,
    /// Idle keep-alive timeout, milliseconds [default: 300000].
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Timeout for reading one request once it started, milliseconds [default: 30000].
    #[arg(long)]
    pub read_timeout_ms: Option<u64>,
    /// Most labels per series [default: 128].
    #[arg(long)]
    pub labels_per_series_max: Option<u32>,
    /// WAL durability: always, batch (group commit) or never [default: batch].
    #[arg(long)]
    pub wal_fsync: Option<String>,
    /// WAL disk budget per shard, bytes; at it, writes get 503 [default: 1073741824].
    #[arg(long)]
    pub wal_max_bytes: Option<u64>,
    /// WAL segment file size, bytes [default: 67108864].
    #[arg(long)]
    pub wal_segment_bytes: Option<u64>,
    /// Log level or tracing filter (RUST_LOG also works) [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Ship to this promgate server (HOST:PORT). Without it, the server runs in this
    /// process on --server-listen and --query-listen.
    #[arg(long)]
    pub server: Option<String>,
    /// This agent's id in the server's exactly-once ledger [default: generated once and
    /// kept in DATA_DIR/agent_id].
    #[arg(long)]
    pub agent_id: Option<String>,
    /// Embedded server only: ship listener [default: 0.0.0.0:30033].
    #[arg(long)]
    pub server_listen: Option<String>,
    /// Embedded server only: query listener (remote_read) [default: 0.0.0.0:20416].
    #[arg(long)]
    pub query_listen: Option<String>,
}

/// `promgate server`'s flags.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServerFlags {
    /// TOML configuration file (see config/server.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Ship listener for agents [default: 0.0.0.0:30033].
    #[arg(long)]
    pub listen: Option<String>,
    /// Query listener: remote_read, labels, series, metrics [default: 0.0.0.0:20416].
    #[arg(long)]
    pub query_listen: Option<String>,
    /// Data directory holding prometheus.redb [default: /var/lib/promgate/server].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// How long samples are kept, e.g. 15d, 12h [default: 15d].
    #[arg(long)]
    pub retention: Option<String>,
    /// Log level or tracing filter [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
}

pub const SERVER_DATA_DIR_DEFAULT: &str = "/var/lib/promgate/server";

/// Resolves the server's settings from its section and flags (flags win).
pub fn server_config(
    section: &ServerSection,
    listen: Option<&str>,
    query_listen: Option<&str>,
    data_dir: PathBuf,
    retention: Option<&str>,
) -> anyhow::Result<promgate_server::ServerConfig> {
    let addr = |flag: Option<&str>, file: &Option<String>, default: &str, what: &str| {
        let text = flag
            .map(str::to_string)
            .or_else(|| file.clone())
            .unwrap_or_else(|| default.to_string());
        text.parse::<SocketAddr>()
            .with_context(|| format!("{what} {text:?} is not IP:PORT"))
    };
    let retention_text = retention
        .map(str::to_string)
        .or_else(|| section.retention.clone())
        .unwrap_or_else(|| promgate_server::RETENTION_DEFAULT.into());
    let retention_ms = promgate_server::parse_duration_ms(&retention_text)
        .map_err(|e| anyhow::anyhow!("server.retention: {e}"))?;
    let checkpoint_text = section
        .checkpoint_interval
        .clone()
        .unwrap_or_else(|| promgate_server::CHECKPOINT_INTERVAL_DEFAULT.into());
    let checkpoint_ms = promgate_server::parse_duration_ms(&checkpoint_text)
        .map_err(|e| anyhow::anyhow!("server.checkpoint_interval: {e}"))?;
    anyhow::ensure!(
        checkpoint_ms > 0,
        "server.checkpoint_interval must be positive"
    );
    let q = promgate_server::query::QueryConfig::default();
    Ok(promgate_server::ServerConfig {
        checkpoint_interval: std::time::Duration::from_millis(checkpoint_ms as u64),
        listen: addr(
            listen,
            &section.listen,
            promgate_server::LISTEN_DEFAULT,
            "server.listen",
        )?,
        query_listen: addr(
            query_listen,
            &section.query_listen,
            promgate_server::QUERY_LISTEN_DEFAULT,
            "server.query_listen",
        )?,
        data_dir,
        retention_ms,
        cache_bytes: section
            .cache_bytes
            .unwrap_or(promgate_server::store::CACHE_BYTES_DEFAULT),
        query: promgate_server::query::QueryConfig {
            read_samples_max: section.read_samples_max.unwrap_or(q.read_samples_max),
            connections_max: section.query_connections_max.unwrap_or(q.connections_max),
            meta_tags_in_labels: section
                .query
                .meta_tags_in_labels
                .unwrap_or(q.meta_tags_in_labels),
            meta_tag_prefix: match &section.query.meta_tag_prefix {
                Some(p) if p.is_empty() || !is_label_name(p) => {
                    bail!("query.meta_tag_prefix: {p:?} must be a non-empty label name prefix")
                }
                Some(p) => p.clone(),
                None => q.meta_tag_prefix.clone(),
            },
            ..q
        },
    })
}

pub fn resolve_server(
    flags: &ServerFlags,
) -> anyhow::Result<(promgate_server::ServerConfig, String)> {
    let file: ServerFile = match &flags.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            let mut f: ServerFile =
                toml::from_str(&text).with_context(|| format!("parsing config {}", p.display()))?;
            f.server.query = f.query.clone();
            f
        }
        None => ServerFile::default(),
    };
    let data_dir = flags
        .data_dir
        .clone()
        .or_else(|| file.server.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(SERVER_DATA_DIR_DEFAULT));
    let c = server_config(
        &file.server,
        flags.listen.as_deref(),
        flags.query_listen.as_deref(),
        data_dir,
        flags.retention.as_deref(),
    )?;
    let level = flags
        .log_level
        .clone()
        .or(file.log.level)
        .unwrap_or_else(|| "info".into());
    Ok((c, level))
}

/// The validated settings the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub options: AgentOptions,
    pub wal: WalConfig,
    pub data_dir: PathBuf,
    pub data_dir_explicit: bool,
    pub log_level: String,
    pub ship: promgate_shards::ship::ShipConfig,
    /// `None`: ship to `ship.server`. `Some`: run this server in-process (its data
    /// directory is set once the agent's is known).
    pub embedded: Option<ServerSection>,
    pub embedded_listen: Option<String>,
    pub embedded_query_listen: Option<String>,
    pub enrich: EnrichSettings,
}

pub fn load_file(path: &Path) -> anyhow::Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let mut f: File =
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
    f.server.query = f.query.clone();
    Ok(f)
}

impl AgentConfig {
    pub fn resolve(flags: &AgentFlags) -> anyhow::Result<AgentConfig> {
        let file = match &flags.config {
            Some(p) => load_file(p)?,
            None => File::default(),
        };
        let r = ReceiveConfig::default();
        let l = Limits::default();
        let listen_text = flags
            .listen
            .clone()
            .or(file.agent.listen)
            .unwrap_or_else(|| LISTEN_DEFAULT.into());
        let listen: SocketAddr = listen_text
            .parse()
            .with_context(|| format!("listen address {listen_text:?} is not IP:PORT"))?;
        let cpus = promgate_shards::runtime::allowed_cpus().len().max(1);
        let shards = match flags.shards.or(file.agent.shards).unwrap_or(0) {
            0 => cpus,
            n => n,
        };
        let explicit_dir = flags.data_dir.clone().or(file.agent.data_dir);
        let mut receive = ReceiveConfig {
            connections_per_shard_max: flags
                .connections_per_shard_max
                .or(file.receive.connections_per_shard_max)
                .unwrap_or(r.connections_per_shard_max),
            header_bytes_max: file.receive.header_bytes_max.unwrap_or(r.header_bytes_max),
            body_bytes_max: flags
                .body_bytes_max
                .or(file.receive.body_bytes_max)
                .unwrap_or(r.body_bytes_max),
            decoded_bytes_max: flags
                .decoded_bytes_max
                .or(file.receive.decoded_bytes_max)
                .unwrap_or(r.decoded_bytes_max),
            bodies_bytes_max: file.receive.bodies_bytes_max.unwrap_or(r.bodies_bytes_max),
            drain_bytes_max: file.receive.drain_bytes_max.unwrap_or(r.drain_bytes_max),
            idle_timeout_ms: flags
                .idle_timeout_ms
                .or(file.receive.idle_timeout_ms)
                .unwrap_or(r.idle_timeout_ms),
            read_timeout_ms: flags
                .read_timeout_ms
                .or(file.receive.read_timeout_ms)
                .unwrap_or(r.read_timeout_ms),
            write_timeout_ms: file.receive.write_timeout_ms.unwrap_or(r.write_timeout_ms),
            retry_after_s: file.receive.retry_after_s.unwrap_or(r.retry_after_s),
            limits: Limits {
                labels_per_series_max: flags
                    .labels_per_series_max
                    .or(file.limits.labels_per_series_max)
                    .unwrap_or(l.labels_per_series_max),
                label_name_bytes_max: file
                    .limits
                    .label_name_bytes_max
                    .unwrap_or(l.label_name_bytes_max),
                label_value_bytes_max: file
                    .limits
                    .label_value_bytes_max
                    .unwrap_or(l.label_value_bytes_max),
                trusted: false,
            },
            // From [enrich], below.
            header_tags: Vec::new(),
            header_tag_bytes_max: r.header_tag_bytes_max,
        };
        let w = WalConfig::default();
        let fsync: Fsync = match flags.wal_fsync.clone().or(file.wal.fsync) {
            Some(text) => text.parse().map_err(anyhow::Error::msg)?,
            None => w.fsync,
        };
        let wal = WalConfig {
            fsync,
            group_commit_delay_us: file
                .wal
                .group_commit_delay_us
                .unwrap_or(w.group_commit_delay_us),
            group_commit_records_max: file
                .wal
                .group_commit_records_max
                .unwrap_or(w.group_commit_records_max),
            segment_bytes: flags
                .wal_segment_bytes
                .or(file.wal.segment_bytes)
                .unwrap_or(w.segment_bytes),
            max_bytes: flags
                .wal_max_bytes
                .or(file.wal.max_bytes)
                .unwrap_or(w.max_bytes),
            retry_after_s: file.wal.retry_after_s.unwrap_or(w.retry_after_s),
            retention_bytes: file.wal.retention_bytes.unwrap_or(w.retention_bytes),
            retention_age_s: file.wal.retention_age_s.unwrap_or(w.retention_age_s),
            memory_bytes: file.wal.memory_bytes.unwrap_or(w.memory_bytes),
            replay_window_bytes: w.replay_window_bytes,
            direct_io: file.wal.direct_io.unwrap_or(w.direct_io),
        };
        let sd = promgate_shards::ship::ShipConfig::default();
        let server = flags.server.clone().or(file.ship.server.clone());
        let agent_id = flags.agent_id.clone().or(file.ship.agent_id.clone());
        let ship = promgate_shards::ship::ShipConfig {
            server: server.clone().unwrap_or_default(),
            agent_id: agent_id.clone().unwrap_or_default(),
            batch_samples_max: file.ship.batch_samples_max.unwrap_or(sd.batch_samples_max),
            batch_new_series_max: file
                .ship
                .batch_new_series_max
                .unwrap_or(sd.batch_new_series_max),
            compress: file.ship.compress.unwrap_or(sd.compress),
            backoff_min: sd.backoff_min,
            backoff_max: file
                .ship
                .backoff_max_ms
                .map_or(sd.backoff_max, std::time::Duration::from_millis),
            reply_timeout: file
                .ship
                .reply_timeout_ms
                .map_or(sd.reply_timeout, std::time::Duration::from_millis),
            split_target_labels: file
                .ship
                .split_target_labels
                .unwrap_or(sd.split_target_labels),
            columns_in_wal: file.ship.columns_in_wal.unwrap_or(sd.columns_in_wal),
        };
        if ship.batch_samples_max == 0 {
            bail!("ship.batch_samples_max must be positive");
        }
        if ship.batch_new_series_max == 0 {
            bail!("ship.batch_new_series_max must be positive");
        }
        let enrich = file.enrich.resolve()?;
        receive.header_tags = enrich.header_tags.clone();
        receive.header_tag_bytes_max = enrich.header_tag_bytes_max;
        let config = AgentConfig {
            enrich,
            ship,
            embedded: server.is_none().then(|| file.server.clone()),
            embedded_listen: flags.server_listen.clone(),
            embedded_query_listen: flags.query_listen.clone(),
            wal,
            options: AgentOptions {
                listen,
                shards,
                io_memory_bytes: file
                    .agent
                    .io_memory_bytes
                    .unwrap_or(IO_MEMORY_BYTES_DEFAULT),
                receive,
            },
            data_dir: explicit_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT)),
            data_dir_explicit: explicit_dir.is_some(),
            log_level: flags
                .log_level
                .clone()
                .or(file.log.level)
                .unwrap_or_else(|| "info".into()),
        };
        config.validate()?;
        if let Some(section) = &config.embedded {
            server_config(
                section,
                config.embedded_listen.as_deref(),
                config.embedded_query_listen.as_deref(),
                PathBuf::new(),
                None,
            )?;
        }
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let r = &self.options.receive;
        let checks: [(&str, u64, u64); 14] = [
            ("wal.segment_bytes", self.wal.segment_bytes, 4096),
            ("wal.max_bytes", self.wal.max_bytes, 64 * 1024),
            (
                "wal.group_commit_records_max",
                self.wal.group_commit_records_max as u64,
                1,
            ),
            ("wal.retry_after_s", u64::from(self.wal.retry_after_s), 1),
            (
                "receive.connections_per_shard_max",
                r.connections_per_shard_max as u64,
                1,
            ),
            ("receive.header_bytes_max", r.header_bytes_max as u64, 1024),
            ("receive.body_bytes_max", r.body_bytes_max as u64, 1024),
            (
                "receive.decoded_bytes_max",
                r.decoded_bytes_max as u64,
                1024,
            ),
            ("receive.idle_timeout_ms", r.idle_timeout_ms, 1),
            ("receive.read_timeout_ms", r.read_timeout_ms, 1),
            ("receive.write_timeout_ms", r.write_timeout_ms, 1),
            (
                "limits.labels_per_series_max",
                u64::from(r.limits.labels_per_series_max),
                1,
            ),
            (
                "limits.label_name_bytes_max",
                u64::from(r.limits.label_name_bytes_max),
                1,
            ),
            (
                "limits.label_value_bytes_max",
                u64::from(r.limits.label_value_bytes_max),
                1,
            ),
        ];
        for (name, value, min) in checks {
            if value < min {
                bail!("{name} = {value} is below its minimum of {min}");
            }
        }
        if r.bodies_bytes_max < r.body_bytes_max {
            bail!(
                "receive.bodies_bytes_max = {} is below receive.body_bytes_max = {}: a body at the size limit could never be accepted",
                r.bodies_bytes_max,
                r.body_bytes_max
            );
        }
        // Spans in a batch are u32 offsets into the decompressed body.
        if r.decoded_bytes_max as u64 > u64::from(u32::MAX) {
            bail!(
                "receive.decoded_bytes_max = {} is above 4 GiB",
                r.decoded_bytes_max
            );
        }
        if self.options.shards > SHARDS_MAX {
            bail!(
                "agent.shards = {} is above {SHARDS_MAX}",
                self.options.shards
            );
        }
        Ok(())
    }
}

/// Storage I/O memory registered per executor; three rings register it, and the sum
/// must stay under the locked-memory limit (8 MiB on many hosts) for all shards.
pub const IO_MEMORY_BYTES_DEFAULT: usize = 1 << 20;
pub const SHARDS_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_file_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml");
        let flags = AgentFlags {
            config: Some(path),
            ..Default::default()
        };
        let c = AgentConfig::resolve(&flags).expect("config/agent.toml is valid");
        let d = ReceiveConfig::default();
        assert_eq!(c.options.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(c.options.receive.body_bytes_max, d.body_bytes_max);
        assert_eq!(c.options.receive.decoded_bytes_max, d.decoded_bytes_max);
        assert_eq!(c.options.receive.limits, Limits::default());
        assert_eq!(c.data_dir, PathBuf::from(DATA_DIR_DEFAULT));
        let w = WalConfig::default();
        assert_eq!(
            (c.wal.fsync, c.wal.max_bytes, c.wal.segment_bytes),
            (w.fsync, w.max_bytes, w.segment_bytes)
        );
        assert_eq!(
            (c.wal.group_commit_delay_us, c.wal.group_commit_records_max),
            (w.group_commit_delay_us, w.group_commit_records_max)
        );
        assert_eq!(
            (c.wal.memory_bytes, c.wal.direct_io),
            (w.memory_bytes, w.direct_io)
        );
    }

    #[test]
    fn flags_override_file_and_bad_values_are_named() {
        let flags = AgentFlags {
            listen: Some("127.0.0.1:9".into()),
            shards: Some(3),
            ..Default::default()
        };
        let c = AgentConfig::resolve(&flags).unwrap();
        assert_eq!(c.options.listen.to_string(), "127.0.0.1:9");
        assert_eq!(c.options.shards, 3);
        let bad = AgentFlags {
            body_bytes_max: Some(10),
            ..Default::default()
        };
        let e = AgentConfig::resolve(&bad).unwrap_err().to_string();
        assert!(e.contains("receive.body_bytes_max"), "{e}");
        // A body at the size limit must fit the shard's budget for bodies.
        let bad = AgentFlags {
            body_bytes_max: Some(128 << 20),
            ..Default::default()
        };
        let e = AgentConfig::resolve(&bad).unwrap_err().to_string();
        assert!(e.contains("receive.bodies_bytes_max"), "{e}");
        let bad = AgentFlags {
            listen: Some("nowhere".into()),
            ..Default::default()
        };
        assert!(AgentConfig::resolve(&bad)
            .unwrap_err()
            .to_string()
            .contains("nowhere"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<File>("[receive]\nbody_bytes_mxa = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("body_bytes_mxa"), "{e}");
    }
}
