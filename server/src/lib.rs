//! promgate server: takes ship batches from agents (port 30033), stores them in the
//! `prometheus` database ([`store`]), and answers remote_read and the label/series APIs
//! (port 20416, [`query`]). Runs standalone (`promgate server`) or inside the agent's
//! process (`promgate run`, or `promgate agent` without `--server`).

pub mod ingest;
pub mod metrics;
pub mod query;
pub mod select;
pub mod store;

use anyhow::Context;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub const LISTEN_DEFAULT: &str = "0.0.0.0:30033";
pub const QUERY_LISTEN_DEFAULT: &str = "0.0.0.0:20416";
pub const RETENTION_DEFAULT: &str = "15d";
/// `server.checkpoint_interval` unless configured.
pub const CHECKPOINT_INTERVAL_DEFAULT: &str = "5s";
/// How often retention looks for expired partitions.
const RETENTION_INTERVAL: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub query_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub retention_ms: i64,
    /// redb page cache.
    pub cache_bytes: usize,
    /// How often applied batches are made durable ([`store::Store::checkpoint`]).
    pub checkpoint_interval: Duration,
    pub query: query::QueryConfig,
}

/// A running server.
pub struct Server {
    pub ship_addr: SocketAddr,
    pub query_addr: SocketAddr,
    pub store: Arc<store::Store>,
    pub metrics: Arc<metrics::ServerMetrics>,
}

/// Parses `15d`, `12h`, `30m`, `90s` or `500ms` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 15d, 12h, 30m or 90s"))?;
    let mult = promgate_proto::duration::unit_ms(unit)
        .ok_or_else(|| format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d, w, y)"))?
        as i64;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} must be positive and not absurdly large"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    // A server that just died can hold its port for a moment (TIME_WAIT leftovers do not
    // block std's SO_REUSEADDR listener, but a lingering process might).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr} ({what})")),
        }
    }
}

/// Opens the store, binds both listeners and serves on background threads.
pub fn start(config: ServerConfig) -> anyhow::Result<Server> {
    let store = Arc::new(
        store::Store::open_with_cache(&config.data_dir, config.retention_ms, config.cache_bytes)
            .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
    );
    let metrics = Arc::new(metrics::ServerMetrics::default());
    let ship = bind(config.listen, "ship listener")?;
    let queries = bind(config.query_listen, "query listener")?;
    let (ship_addr, query_addr) = (ship.local_addr()?, queries.local_addr()?);
    {
        let (store, metrics) = (store.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("ship-accept".into())
            .spawn(move || ingest::serve(ship, store, metrics))?;
    }
    {
        let ctx = Arc::new(query::QueryContext::new(
            store.clone(),
            metrics.clone(),
            config.query.clone(),
        ));
        std::thread::Builder::new()
            .name("query-accept".into())
            .spawn(move || query::serve(queries, ctx))?;
    }
    {
        let store = store.clone();
        std::thread::Builder::new()
            .name("retention".into())
            .spawn(move || loop {
                match store.apply_retention(now_ms()) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(partitions = n, "retention deleted expired partitions"),
                    Err(e) => tracing::error!(error = %e, "retention failed; will retry"),
                }
                std::thread::sleep(RETENTION_INTERVAL);
            })?;
    }
    {
        let store = store.clone();
        let every = config.checkpoint_interval;
        std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || loop {
                std::thread::sleep(every.saturating_sub(store.since_checkpoint()));
                if store.since_checkpoint() < every {
                    continue;
                }
                if let Err(e) = store.checkpoint() {
                    tracing::error!(error = %e, "checkpoint failed; agents keep their WAL records and the next one tries again");
                    std::thread::sleep(every);
                }
            })?;
    }
    tracing::info!(%ship_addr, %query_addr, dir = %config.data_dir.display(), "server listening");
    Ok(Server {
        ship_addr,
        query_addr,
        store,
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("15d"), Ok(15 * 86_400_000));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert!(parse_duration_ms("15").is_err());
        assert!(parse_duration_ms("0d").is_err());
        assert!(parse_duration_ms("d").is_err());
    }
}
