//! promgate-loadtest as a library: the deterministic workload generator ([`workload`]) and the
//! patchable snappy encoder ([`patchable`]), so other tests can rebuild the exact bodies
//! the harness sends and regenerate acknowledged samples from an `--ack-log` file.

pub mod patchable;
pub mod workload;

pub use workload::{
    acked_samples, replay_ack_log, series_labels, AckRecord, AckedSample, BodyTemplate, GenParams,
    Protocol,
};
