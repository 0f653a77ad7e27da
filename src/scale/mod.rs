//! Scale-out: many worker processes on many machines behind one queue, on Redis Streams.
//!
//! - Front ends ([`front`], `text2img serve --redis`) read a request, pin its seed, and add
//!   it to a job stream; they wait for its result and answer with it. They hold no state
//!   of their own, so any number sit behind a load balancer.
//! - Workers ([`worker`], `text2img worker`) read jobs as consumer group [`GROUP`], run one
//!   at a time on their own model (the same code the in-process server runs), store the
//!   answer once (`SET NX`) and acknowledge the entry. A crashed worker's entries are
//!   claimed by another after `--claim-idle`; a job that keeps failing goes to the
//!   dead-letter stream after `--max-deliveries` tries, and its client gets that failure.
//! - [`client`] is the queue as a library: what the front end and `text2img batch` use.
//!
//! The layout of the keys is in [`keys`]; the guarantees and their limits are in
//! `docs/scale-out.md`.

pub mod client;
pub mod connection;
pub mod front;
pub mod inventory;
pub mod job;
pub mod keys;
pub mod worker;

/// The consumer group every worker joins, on every job stream.
pub const GROUP: &str = "text2img";
