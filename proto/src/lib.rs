//! promgate wire contracts: remote_write 1.0/2.0 messages, content negotiation, and the
//! pure, in-place decoder. No I/O and no runtime here, so everything can be unit-tested,
//! fuzzed and benchmarked anywhere.
pub mod batch;
pub mod decode;
pub mod duration;
pub mod hint;
pub mod messages;
pub mod remote_write;
pub mod ship;
pub mod wire;
pub mod xor;

pub use batch::{Batch, Decoded, Protocol};
pub use decode::{decode, DecodeError, Limits, Reject, RejectCounts};
