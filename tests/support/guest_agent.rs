//! A double of a guest's agent, for the tests and the bench: a unix socket speaking the
//! agent's JSON protocol (sync-delimited, ping, fsfreeze-freeze/thaw/status) that
//! records every call, measures how long the guest stays frozen, and can be told to
//! hang or fail a command. A real qemu-ga must never run on the host: it would freeze
//! the host's own file systems.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// What the double does with one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Answer,
    /// Never answer (a guest stuck in its freeze hook).
    Hang,
    /// Answer with an error, changing nothing.
    Fail,
}

#[derive(Default)]
pub struct AgentState {
    /// Every command received, in order.
    pub calls: Vec<String>,
    pub frozen: bool,
    /// When the last freeze's answer was sent.
    frozen_at: Option<Instant>,
    /// Each freeze's window as the guest sees it: from the freeze's answer to the
    /// thaw's arrival.
    pub windows: Vec<Duration>,
    /// Per command name; commands not listed are answered.
    pub behaviour: Vec<(String, Behaviour)>,
    /// Sent before the answer to the next sync, as a previous session might have left.
    pub stale: Vec<u8>,
    /// Run when a command is answered, after its effect and before the answer is sent
    /// (what the guest does as it freezes or thaws).
    pub hooks: Vec<(String, Hook)>,
}

pub type Hook = Arc<dyn Fn() + Send + Sync>;

/// A guest agent double listening on `socket`.
pub struct AgentDouble {
    pub socket: PathBuf,
    pub state: Arc<Mutex<AgentState>>,
}

impl AgentDouble {
    pub fn start(dir: &Path) -> Self {
        let socket = dir.join("qga.sock");
        let listener =
            std::os::unix::net::UnixListener::bind(&socket).expect("bind the agent double");
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(AgentState::default()));
        let shared = Arc::clone(&state);
        // On a thread of its own, so it answers while the test blocks (waiting for a
        // strata process to die, say): a guest's agent runs whatever its host does.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = UnixListener::from_std(listener).unwrap();
                // The channel serves one client at a time, as a virtio-serial port does.
                while let Ok((stream, _)) = listener.accept().await {
                    serve(stream, Arc::clone(&shared)).await;
                }
            });
        });
        Self { socket, state }
    }

    pub fn set(&self, command: &str, behaviour: Behaviour) {
        let mut state = self.state.lock().unwrap();
        state.behaviour.retain(|(c, _)| c != command);
        state.behaviour.push((command.to_owned(), behaviour));
    }

    pub fn on(&self, command: &str, hook: impl Fn() + Send + Sync + 'static) {
        let mut state = self.state.lock().unwrap();
        state.hooks.push((command.to_owned(), Arc::new(hook)));
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn frozen(&self) -> bool {
        self.state.lock().unwrap().frozen
    }

    /// Each freeze's window so far (freeze answered to thaw received).
    pub fn windows(&self) -> Vec<Duration> {
        self.state.lock().unwrap().windows.clone()
    }
}

async fn serve(stream: tokio::net::UnixStream, state: Arc<Mutex<AgentState>>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // A client's 0xFF resets the parser: it is not part of the command.
        let text: Vec<u8> = line.iter().copied().filter(|b| *b != 0xff).collect();
        let Ok(request) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        let command = request["execute"].as_str().unwrap_or_default().to_owned();
        let reply = {
            let mut state = state.lock().unwrap();
            state.calls.push(command.clone());
            if command == "guest-fsfreeze-thaw"
                && let Some(frozen_at) = state.frozen_at.take()
            {
                state.windows.push(frozen_at.elapsed());
            }
            let behaviour = state
                .behaviour
                .iter()
                .find(|(c, _)| *c == command)
                .map_or(Behaviour::Answer, |(_, b)| *b);
            match behaviour {
                Behaviour::Hang => None,
                Behaviour::Fail => Some(
                    json!({"error": {"class": "GenericError", "desc": format!("{command} refused by the test")}}),
                ),
                Behaviour::Answer => Some(answer(&mut state, &command, &request)),
            }
        };
        let Some(reply) = reply else { continue };
        let hooks: Vec<Hook> = {
            let state = state.lock().unwrap();
            let answered = reply.get("return").is_some();
            state
                .hooks
                .iter()
                .filter(|(c, _)| answered && *c == command)
                .map(|(_, hook)| Arc::clone(hook))
                .collect()
        };
        for hook in hooks {
            tokio::task::spawn_blocking(move || hook()).await.unwrap();
        }
        let mut bytes = Vec::new();
        if command == "guest-sync-delimited" {
            bytes.append(&mut state.lock().unwrap().stale);
            bytes.push(0xff);
        }
        bytes.extend_from_slice(reply.to_string().as_bytes());
        bytes.push(b'\n');
        if write.write_all(&bytes).await.is_err() {
            return;
        }
        if command == "guest-fsfreeze-freeze" && reply.get("return").is_some() {
            state.lock().unwrap().frozen_at = Some(Instant::now());
        }
    }
}

fn answer(state: &mut AgentState, command: &str, request: &Value) -> Value {
    match command {
        "guest-sync-delimited" => json!({"return": request["arguments"]["id"]}),
        "guest-ping" => json!({"return": {}}),
        "guest-fsfreeze-status" => {
            json!({"return": if state.frozen { "frozen" } else { "thawed" }})
        }
        "guest-fsfreeze-freeze" => {
            state.frozen = true;
            json!({"return": 2})
        }
        "guest-fsfreeze-thaw" => {
            let thawed = if state.frozen { 2 } else { 0 };
            state.frozen = false;
            json!({"return": thawed})
        }
        _ => {
            json!({"error": {"class": "CommandNotFound", "desc": format!("no command {command}")}})
        }
    }
}
