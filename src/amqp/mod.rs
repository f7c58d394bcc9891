//! Everything that speaks AMQP: [`connect`]ing to a node of the cluster, the [`topology`] declared at start-up, the confirming
//! [`publisher`], the [`consumer`] that turns deliveries into jobs and outcomes into acks, the
//! [`headers`] contract, the W3C [`trace_context`] carried from a job to its events, and the
//! [`batches`] side of a session (intake, item reports, completions), and the [`session`]
//! pieces the handlers share.

pub mod batches;
pub mod connect;
pub mod consumer;
pub mod headers;
pub mod publisher;
pub mod session;
pub mod topology;
pub mod trace_context;

pub use connect::connect;
