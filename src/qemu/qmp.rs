//! A QMP client: one connection to a QEMU process's monitor socket (a VM's, or a
//! `qemu-storage-daemon`'s), used by live jobs.
//!
//! What it relies on, checked on QEMU 10 (see LIVE.md): the monitor serves one client
//! at a time and drops events sent while nobody listens, so callers learn state by
//! querying (`query-jobs`, `query-named-block-nodes`) and the events this client sees
//! are kept only as a log. Every read has a deadline: a QEMU that stops answering is an
//! error, never a hang.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line a monitor may send; QEMU's answers are far smaller.
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot reach the QMP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP did not answer {what} within {}s", timeout.as_secs_f32())]
    Timeout { what: String, timeout: Duration },
    #[error("the QMP connection closed")]
    Closed,
    #[error("the socket does not speak QMP: {0}")]
    NotQmp(String),
    #[error("{command} failed: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("unexpected QMP answer to {command}: {detail}")]
    Protocol { command: String, detail: String },
}

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// An asynchronous event QEMU sent while a command was under way.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

/// One block node, as `query-named-block-nodes` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockNode {
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub drv: String,
    /// The file the node reads: the image file for a format node.
    pub file: String,
    pub ro: bool,
    pub image: ImageInfo,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    pub filename: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// The backing file name as written in the image header.
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
    /// The node QEMU actually reads below this one (its open graph, which may differ
    /// from the header's name).
    #[serde(rename = "backing-image")]
    pub backing_image: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    /// The image file this node reads. QEMU names a node whose backing was attached at
    /// run time (an overlay switched in by `blockdev-snapshot`) with a `json:{...}`
    /// description instead of a path: its `file.filename` is the path.
    pub fn file_name(&self) -> String {
        self.filename
            .strip_prefix("json:")
            .and_then(|json| serde_json::from_str::<Value>(json).ok())
            .and_then(|description| description["file"]["filename"].as_str().map(str::to_owned))
            .unwrap_or_else(|| self.filename.clone())
    }

    /// The files of the chain QEMU reads from this node down, top first.
    pub fn chain(&self) -> Vec<String> {
        let mut files = vec![self.file_name()];
        let mut below = self.backing_image.as_deref();
        while let Some(image) = below {
            files.push(image.file_name());
            below = image.backing_image.as_deref();
        }
        files
    }
}

/// One job, as `query-jobs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// created, running, paused, ready, standby, waiting, pending, aborting,
    /// concluded, null.
    pub status: String,
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// Set once a job concluded with an error.
    pub error: Option<String>,
}

/// A connection to one monitor, after capabilities negotiation.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    next_id: u64,
    version: QemuVersion,
    /// Events seen since the last `take_events`.
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: QemuVersion,
}

impl Qmp {
    /// Connect, check the greeting is QEMU's and leave negotiation mode. `timeout`
    /// bounds the connection, the greeting and every later answer.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = deadline(timeout, "the connection", connect_retrying(socket)).await??;
        let (read, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(read),
            writer,
            timeout,
            next_id: 0,
            version: QemuVersion {
                major: 0,
                minor: 0,
                micro: 0,
            },
            events: Vec::new(),
        };
        let greeting = qmp.read_message("the greeting").await?;
        let greeting: Greeting = serde_json::from_value(greeting.clone())
            .map_err(|_| QmpError::NotQmp(format!("the greeting was {greeting}")))?;
        qmp.version = greeting.qmp.version.qemu;
        qmp.execute::<Value>("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// Run one command and read its answer, keeping the events that arrive first.
    pub async fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T, QmpError> {
        self.next_id += 1;
        let id = format!("strata-{}", self.next_id);
        let mut request = json!({"execute": command, "id": id});
        if !arguments.as_object().is_some_and(|a| a.is_empty()) {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        deadline(
            self.timeout,
            command,
            self.writer.write_all(line.as_bytes()),
        )
        .await??;
        loop {
            let message = self.read_message(command).await?;
            if message.get("event").is_some() {
                self.keep_event(message);
                continue;
            }
            if message.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                return Err(QmpError::Protocol {
                    command: command.to_owned(),
                    detail: format!("an answer to another request: {message}"),
                });
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: error["class"].as_str().unwrap_or_default().to_owned(),
                    desc: error["desc"].as_str().unwrap_or_default().to_owned(),
                });
            }
            let answer = message.get("return").cloned().unwrap_or(Value::Null);
            return serde_json::from_value(answer.clone()).map_err(|e| QmpError::Protocol {
                command: command.to_owned(),
                detail: format!("{e}: {answer}"),
            });
        }
    }

    /// Every block node QEMU has open, each with the chain it reads.
    pub async fn block_nodes(&mut self) -> Result<Vec<BlockNode>, QmpError> {
        self.execute("query-named-block-nodes", json!({})).await
    }

    /// Every job QEMU knows, concluded ones included until dismissed.
    pub async fn jobs(&mut self) -> Result<Vec<JobInfo>, QmpError> {
        self.execute("query-jobs", json!({})).await
    }

    /// The nodes something outside the block layer reads: each device's medium
    /// (`query-block`) and each export's node (`query-block-exports`; a
    /// qemu-storage-daemon has no devices). Node names an old layer keeps after a
    /// merge are not among them.
    pub async fn attached_nodes(&mut self) -> Result<Vec<String>, QmpError> {
        let devices: Vec<Value> = self.execute("query-block", json!({})).await?;
        let mut names: Vec<String> = devices
            .iter()
            .filter_map(|d| d["inserted"]["node-name"].as_str().map(str::to_owned))
            .collect();
        match self
            .execute::<Vec<Value>>("query-block-exports", json!({}))
            .await
        {
            Ok(exports) => names.extend(
                exports
                    .iter()
                    .filter_map(|e| e["node-name"].as_str().map(str::to_owned)),
            ),
            // A QEMU without exports (the command is absent): devices only.
            Err(QmpError::Command { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(names)
    }

    /// Whether this QEMU can pause and resume its guest (`stop`, `cont`, `query-status`):
    /// a VM's QEMU can, a `qemu-storage-daemon` cannot.
    pub async fn can_pause(&mut self) -> Result<bool, QmpError> {
        #[derive(Deserialize)]
        struct Command {
            name: String,
        }
        let commands: Vec<Command> = self.execute("query-commands", json!({})).await?;
        let has = |name: &str| commands.iter().any(|c| c.name == name);
        Ok(has("stop") && has("cont") && has("query-status"))
    }

    /// Whether the guest's CPUs run (`query-status`), as opposed to paused.
    pub async fn guest_running(&mut self) -> Result<bool, QmpError> {
        #[derive(Deserialize)]
        struct Status {
            running: bool,
        }
        let status: Status = self.execute("query-status", json!({})).await?;
        Ok(status.running)
    }

    /// Wait up to `wait` for QEMU to send an event, and keep it; whether one came. A
    /// caller that polls QEMU's state sleeps here instead, so that it asks again as
    /// soon as something changed (a job's status, say) and only then.
    pub async fn wait_event(&mut self, wait: Duration) -> Result<bool, QmpError> {
        // `fill_buf` is cancellation safe: what arrived stays buffered for the read.
        match tokio::time::timeout(wait, self.reader.fill_buf()).await {
            Err(_) => return Ok(false),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok([])) => return Err(QmpError::Closed),
            Ok(Ok(_)) => {}
        }
        let message = self.read_message("an event").await?;
        if message.get("event").is_none() {
            return Err(QmpError::Protocol {
                command: "an event".into(),
                detail: format!("a message no command asked for: {message}"),
            });
        }
        self.keep_event(message);
        Ok(true)
    }

    /// Keep an event for `take_events`, the newest `KEPT_EVENTS` only: a connection
    /// held through a long merge must not grow without bound.
    fn keep_event(&mut self, message: Value) {
        if let Ok(event) = serde_json::from_value(message) {
            if self.events.len() == KEPT_EVENTS {
                self.events.remove(0);
            }
            self.events.push(event);
        }
    }

    /// The events seen so far (for the log: state is learned by querying).
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let read = deadline(self.timeout, what, async {
            let mut limited = (&mut self.reader).take(MAX_LINE as u64);
            limited.read_line(&mut line).await
        })
        .await??;
        if read == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(QmpError::Protocol {
                command: what.to_owned(),
                detail: "a message longer than the limit, or cut short".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| QmpError::NotQmp(format!("{e}: {}", line.trim())))
    }
}

/// Events kept for `take_events`.
const KEPT_EVENTS: usize = 64;

/// How long a refused connection is tried again: a monitor serves one client at a
/// time, and QEMU refuses connections for a moment after the previous client left.
const REFUSED_FOR: Duration = Duration::from_secs(2);

async fn connect_retrying(socket: &Path) -> std::io::Result<UnixStream> {
    let started = tokio::time::Instant::now();
    loop {
        match UnixStream::connect(socket).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && started.elapsed() < REFUSED_FOR =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

async fn deadline<F: std::future::Future>(
    timeout: Duration,
    what: &str,
    future: F,
) -> Result<F::Output, QmpError> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| QmpError::Timeout {
            what: what.to_owned(),
            timeout,
        })
}
