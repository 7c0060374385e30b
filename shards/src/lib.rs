//! promgate's per-core data plane: each shard is one glommio executor pinned to a CPU
//! that accepts its own connections and runs the chain receive → decode → sink with
//! no state shared with other shards (metrics aside, which only their owner writes).
pub mod enrich;
pub mod http;
pub mod metrics;
pub mod prepared;
pub mod receive;
pub mod runtime;
pub mod series_refs;
pub mod ship;
pub mod sink;
pub mod snapshot;
pub mod wal;
