//! Everything that speaks AMQP: [`connect`]ing to a node of the cluster, the [`topology`] declared at start-up, the confirming
//! [`publisher`], the [`consumer`] that turns deliveries into jobs and outcomes into acks, the
//! [`headers`] contract, and the W3C [`trace_context`] carried from a job to its events.

pub mod connect;
pub mod consumer;
pub mod headers;
pub mod publisher;
pub mod topology;
pub mod trace_context;

pub use connect::connect;
