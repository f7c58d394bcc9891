//! Connecting to one node of a RabbitMQ cluster: `AMQP_URL` lists the nodes, and a connection
//! that fails or is lost moves on to the next one, so the worker keeps going when its node goes
//! away (quorum queues keep their messages on the surviving nodes).

use std::time::Duration;

use anyhow::Context;
use lapin::{Connection, ConnectionProperties};

use crate::config::mask_url;

/// The longest one node may take to accept a connection (TCP, TLS and the AMQP handshake)
/// before the next node is tried: a node that is down but still routed can otherwise hang the
/// attempt for minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the first of `nodes` that answers, starting with `nodes[start % len]` and going
/// round once. Returns the connection and the index of the node it reached, so the caller can
/// start after it next time (a node that dropped us is tried last).
///
/// # Errors
/// No node answered; the error lists each node (password masked) with why.
pub async fn connect(nodes: &[String], name: &str, start: usize) -> anyhow::Result<(Connection, usize)> {
    anyhow::ensure!(!nodes.is_empty(), "AMQP_URL names no node");
    let mut failures = Vec::new();
    for offset in 0..nodes.len() {
        let index = (start + offset) % nodes.len();
        let node = &nodes[index];
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(node, properties)).await {
            Ok(Ok(connection)) => {
                if offset > 0 || nodes.len() > 1 {
                    tracing::info!(node = %mask_url(node), "connected to RabbitMQ");
                }
                return Ok((connection, index));
            }
            Ok(Err(e)) => failures.push(format!("{}: {e}", mask_url(node))),
            Err(_) => {
                failures.push(format!("{}: no answer within {} s", mask_url(node), CONNECT_TIMEOUT.as_secs()))
            }
        }
    }
    Err(anyhow::anyhow!(failures.join("; "))).context("connecting to AMQP_URL")
}
