//! Commands a node's agent runs for the cluster (`ferry cluster update`'s
//! update command), and the health a node's agent reports when it starts.
//!
//! The asker writes a [`CommandRequest`] (`commands/<node>/request`); the
//! node's agent runs it once per `run` id, streams its output as
//! [`CommandOutput`] chunks and records how it went in a
//! [`CommandResult`] (`commands/<node>/result`), which outlives the agent
//! (a restarted agent finds it, and never runs the same run twice). None
//! of these keys is under a lease: a request outlives its asker, a result
//! its agent.
//!
//! Whoever can write under the cluster's prefix can therefore run
//! commands as root on every node. That was already so (the same writer
//! can start any VM config on any node), and is why etcd's client port
//! must be reachable only by the cluster's operators.

use etcd_client::DeleteOptions;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::keys::validate_name;
use crate::ops::{Cluster, Versioned};
use crate::records::{self, Record};
use crate::store::Effect;
use crate::watch::Watch;

/// A command for a node's agent to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRequest {
    pub v: u32,
    /// Unique per (node, run): the agent runs a run id at most once.
    pub run: String,
    /// Run by `sh -c` on the node, as the agent's user.
    pub command: String,
    /// The agent kills it (and what it started) past this.
    pub timeout_secs: u64,
    pub requested_unix_ms: u64,
    /// Who asked (for the agent's log).
    pub requested_by: String,
}

impl Record for CommandRequest {
    const KIND: &'static str = "command request";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Running,
    /// It ended by itself (see `exit_code` or `signal`).
    Exited,
    /// Killed, with its process group, past its timeout.
    TimedOut,
    /// It cannot be known how it ended (its runner vanished without a
    /// word: the node restarted, say). It is not run again.
    Lost,
    /// Not run (another run still running here, or it could not start).
    Refused,
    /// A state written by a newer Ferry.
    #[serde(other)]
    Other,
}

impl CommandState {
    /// Over: nothing about it will change any more.
    pub fn is_final(self) -> bool {
        self != CommandState::Running
    }
}

/// How a node's agent runs or ran a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub v: u32,
    pub run: String,
    pub state: CommandState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_unix_ms: u64,
    pub ended_unix_ms: Option<u64>,
    /// The end of its output (stdout and stderr as written), once over.
    pub output_tail: String,
    /// How much it wrote in all.
    pub output_bytes: u64,
    /// Anything worth saying (why it was refused or lost).
    pub detail: String,
}

impl Record for CommandResult {
    const KIND: &'static str = "command result";
}

impl CommandResult {
    /// It ended by itself with status 0.
    pub fn succeeded(&self) -> bool {
        self.state == CommandState::Exited && self.exit_code == Some(0)
    }
}

/// A piece of a command's output, as it comes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    pub v: u32,
    pub run: String,
    /// Where in the output it starts.
    pub offset: u64,
    /// Decoded lossily (pieces end at line ends where they can).
    pub text: String,
}

impl Record for CommandOutput {
    const KIND: &'static str = "command output";
}

/// One of the checks a node's agent runs when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

/// What a node's agent found when it started (one record per agent start,
/// matched to its node record by `registered_unix_ms`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub v: u32,
    pub node: String,
    /// The agent's node record's `registered_unix_ms`.
    pub registered_unix_ms: u64,
    pub at_unix_ms: u64,
    pub ferry_version: String,
    pub ok: bool,
    pub checks: Vec<HealthCheck>,
}

impl Record for NodeHealth {
    const KIND: &'static str = "node health";
}

impl Cluster {
    /// Asks node `node`'s agent to run `r` (idempotent put); returns the
    /// revision it made, to watch from.
    pub async fn put_command_request(&self, node: &str, r: &CommandRequest) -> Result<i64> {
        validate_name("node id", node)?;
        self.store().put(&self.keys().command_request(node), records::encode(r), None).await
    }

    pub async fn command_request(&self, node: &str) -> Result<Option<Versioned<CommandRequest>>> {
        self.get_record(&self.keys().command_request(node)).await
    }

    /// Written by the node's agent only (idempotent put).
    pub async fn put_command_result(&self, node: &str, r: &CommandResult) -> Result<i64> {
        self.store().put(&self.keys().command_result(node), records::encode(r), None).await
    }

    pub async fn command_result(&self, node: &str) -> Result<Option<Versioned<CommandResult>>> {
        self.get_record(&self.keys().command_result(node)).await
    }

    /// Chunk `seq` of the running command's output (idempotent put).
    pub async fn put_command_output(&self, node: &str, seq: u64, o: &CommandOutput) -> Result<i64> {
        self.store().put(&self.keys().command_output(node, seq), records::encode(o), None).await
    }

    /// The last output chunk stored, with its sequence number.
    pub async fn last_command_output(&self, node: &str) -> Result<Option<(u64, CommandOutput)>> {
        let listing = self.store().list(&self.keys().command_output_prefix(node)).await?;
        let Some(kv) = listing.kvs.last() else { return Ok(None) };
        let seq = match self.keys().parse(&kv.key) {
            Some(crate::keys::ClusterKey::CommandOutput(_, seq)) => seq,
            _ => return Ok(None),
        };
        Ok(Some((seq, records::decode(&kv.key, &kv.value)?)))
    }

    /// Deletes every output chunk of node `node` (idempotent).
    pub async fn delete_command_output(&self, node: &str) -> Result<i64> {
        let prefix = self.keys().command_output_prefix(node);
        self.store()
            .call("delete command output", Effect::Write, |mut c| {
                let prefix = prefix.clone();
                async move { Ok(c.delete(prefix, Some(DeleteOptions::new().with_prefix())).await?.deleted()) }
            })
            .await
    }

    /// Changes to node `node`'s request, result and output, from revision
    /// `from` (0: now).
    pub async fn watch_commands(&self, node: &str, from: i64) -> Result<Watch> {
        self.store().watch_prefix(&self.keys().commands_prefix(node), from).await
    }

    /// Written by the node's agent at its start (idempotent put).
    pub async fn put_node_health(&self, h: &NodeHealth) -> Result<i64> {
        validate_name("node id", &h.node)?;
        self.store().put(&self.keys().node_health(&h.node), records::encode(h), None).await
    }

    pub async fn node_health(&self, node: &str) -> Result<Option<Versioned<NodeHealth>>> {
        self.get_record(&self.keys().node_health(node)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_from_a_newer_ferry_is_not_running() {
        let r: CommandResult = serde_json::from_str(
            r#"{"v":1,"run":"u1","state":"paused","exit_code":null,"signal":null,"started_unix_ms":1,
               "ended_unix_ms":null,"output_tail":"","output_bytes":0,"detail":""}"#,
        )
        .unwrap();
        assert_eq!(r.state, CommandState::Other);
        assert!(r.state.is_final() && !r.succeeded());
        assert!(!CommandState::Running.is_final());
        let ok = CommandResult { state: CommandState::Exited, exit_code: Some(0), ..r.clone() };
        assert!(ok.succeeded());
        let timed_out = CommandResult { state: CommandState::TimedOut, exit_code: Some(0), ..r };
        assert!(!timed_out.succeeded());
    }
}
