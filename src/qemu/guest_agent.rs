//! A client for the QEMU guest agent on a VM's virtio-serial socket: the freeze and
//! thaw of the guest's file systems around a live snapshot.
//!
//! The channel carries no framing of its own and keeps whatever a previous client
//! left half-read, so every session starts with a resync (`guest-sync-delimited`: the
//! agent answers after a 0xFF byte, and everything before it is stale) and every read
//! has a deadline on the read itself: a guest that stops answering is a timeout, never
//! a hang. Whoever freezes must thaw on every path (LIVE.md): `thaw` is safe to call
//! when nothing is frozen.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest answer line accepted from a guest (its answers here are tiny; the guest is
/// not trusted).
const MAX_LINE: u64 = 64 << 10;

/// The byte the agent sends before its answer to `guest-sync-delimited`, and that a
/// client sends to make the agent drop a half-received command.
const DELIMITER: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the guest agent socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest agent did not answer {what} within {}s", timeout.as_secs_f32())]
    Timeout { what: String, timeout: Duration },
    #[error("the guest agent connection closed")]
    Closed,
    #[error("{command} failed in the guest: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("unexpected answer from the guest agent to {command}: {detail}")]
    Protocol { command: String, detail: String },
}

/// Whether the guest's file systems are frozen (`guest-fsfreeze-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

pub struct GuestAgent {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_sync_id: u64,
}

impl GuestAgent {
    /// Connect and resync; `timeout` bounds both.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = deadline(timeout, "the connection", UnixStream::connect(socket)).await??;
        let (read, writer) = stream.into_split();
        let mut agent = Self {
            reader: BufReader::new(read),
            writer,
            // Distinct per connection, so an answer meant for an earlier session is
            // never taken for this one's.
            next_sync_id: u64::from(std::process::id()) << 20 | rand_low_bits(),
        };
        agent.sync(timeout).await?;
        Ok(agent)
    }

    /// Drop whatever the channel holds and agree on where answers start: send the
    /// delimiter and `guest-sync-delimited`, then skip to the delimiter and an answer
    /// with this id. Redo it after any timeout.
    pub async fn sync(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.next_sync_id += 1;
        let id = self.next_sync_id;
        let mut request = vec![DELIMITER];
        request.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        request.push(b'\n');
        deadline(
            timeout,
            "guest-sync-delimited",
            self.writer.write_all(&request),
        )
        .await??;
        deadline(timeout, "guest-sync-delimited", async {
            loop {
                self.skip_to_delimiter().await?;
                let answer = self.read_line("guest-sync-delimited").await?;
                if answer.get("return").and_then(Value::as_u64) == Some(id) {
                    return Ok(());
                }
            }
        })
        .await?
    }

    /// Run one command and read its answer within `timeout`.
    pub async fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let mut request = json!({"execute": command});
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        deadline(timeout, command, self.writer.write_all(line.as_bytes())).await??;
        let message = deadline(timeout, command, self.read_line(command)).await??;
        if let Some(error) = message.get("error") {
            return Err(AgentError::Command {
                command: command.to_owned(),
                class: error["class"].as_str().unwrap_or_default().to_owned(),
                desc: error["desc"].as_str().unwrap_or_default().to_owned(),
            });
        }
        let answer = message
            .get("return")
            .cloned()
            .ok_or_else(|| AgentError::Protocol {
                command: command.to_owned(),
                detail: message.to_string(),
            })?;
        serde_json::from_value(answer.clone()).map_err(|e| AgentError::Protocol {
            command: command.to_owned(),
            detail: format!("{e}: {answer}"),
        })
    }

    pub async fn ping(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.execute::<Value>("guest-ping", Value::Null, timeout)
            .await
            .map(drop)
    }

    pub async fn freeze_status(&mut self, timeout: Duration) -> Result<FreezeStatus, AgentError> {
        let status: String = self
            .execute("guest-fsfreeze-status", Value::Null, timeout)
            .await?;
        match status.as_str() {
            "thawed" => Ok(FreezeStatus::Thawed),
            "frozen" => Ok(FreezeStatus::Frozen),
            other => Err(AgentError::Protocol {
                command: "guest-fsfreeze-status".into(),
                detail: format!("unknown status {other:?}"),
            }),
        }
    }

    /// Freeze every file system of the guest; the number frozen.
    pub async fn freeze(&mut self, timeout: Duration) -> Result<u64, AgentError> {
        self.execute("guest-fsfreeze-freeze", Value::Null, timeout)
            .await
    }

    /// Thaw every frozen file system; the number thawed (0 when none was frozen).
    pub async fn thaw(&mut self, timeout: Duration) -> Result<u64, AgentError> {
        self.execute("guest-fsfreeze-thaw", Value::Null, timeout)
            .await
    }

    async fn skip_to_delimiter(&mut self) -> Result<(), AgentError> {
        let mut skipped = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(DELIMITER, &mut skipped)
            .await?;
        match skipped.last() {
            Some(&DELIMITER) => Ok(()),
            _ if read == 0 => Err(AgentError::Closed),
            _ => Err(AgentError::Protocol {
                command: "guest-sync-delimited".into(),
                detail: "too much data before the delimiter".into(),
            }),
        }
    }

    async fn read_line(&mut self, command: &str) -> Result<Value, AgentError> {
        let mut line = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Err(AgentError::Closed);
        }
        // A delimiter may precede an answer after a resync: it is not part of the JSON.
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
        serde_json::from_str(text).map_err(|e| AgentError::Protocol {
            command: command.to_owned(),
            detail: format!("{e}: {text}"),
        })
    }
}

/// A few bits that differ between connections made in one process.
fn rand_low_bits() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    u64::from(nanos) & 0xf_ffff
}

async fn deadline<F: std::future::Future>(
    timeout: Duration,
    what: &str,
    future: F,
) -> Result<F::Output, AgentError> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| AgentError::Timeout {
            what: what.to_owned(),
            timeout,
        })
}
