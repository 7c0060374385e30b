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
}

/// The validated settings the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub options: AgentOptions,
    pub wal: WalConfig,
    pub data_dir: PathBuf,
    pub data_dir_explicit: bool,
    pub log_level: String,
}

pub fn load_file(path: &Path) -> anyhow::Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
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
        let receive = ReceiveConfig {
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
            },
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
        };
        let config = AgentConfig {
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
