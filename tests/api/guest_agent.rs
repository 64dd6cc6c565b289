//! The guest-agent client against a double of the agent: a unix socket speaking the
//! agent's JSON protocol (sync-delimited, ping, fsfreeze-freeze/thaw/status) that
//! records every call and can be told to hang or fail a command. A real qemu-ga must
//! never run on the host: it would freeze the host's own file systems.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strata::qemu::guest_agent::{AgentError, FreezeStatus, GuestAgent};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

const TIMEOUT: Duration = Duration::from_secs(10);

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

#[tokio::test]
async fn a_session_resyncs_past_stale_answers_then_freezes_and_thaws() {
    let dir = tempfile::tempdir().unwrap();
    let double = AgentDouble::start(dir.path());
    // What an earlier, interrupted session could have left in the channel.
    double.state.lock().unwrap().stale = b"{\"return\": 2}\n{\"return\": 7".to_vec();

    let mut agent = GuestAgent::connect(&double.socket, TIMEOUT).await.unwrap();
    agent.ping(TIMEOUT).await.unwrap();
    assert_eq!(
        agent.freeze_status(TIMEOUT).await.unwrap(),
        FreezeStatus::Thawed
    );
    assert_eq!(agent.freeze(TIMEOUT).await.unwrap(), 2);
    assert!(double.frozen());
    assert_eq!(
        agent.freeze_status(TIMEOUT).await.unwrap(),
        FreezeStatus::Frozen
    );
    assert_eq!(agent.thaw(TIMEOUT).await.unwrap(), 2);
    assert!(!double.frozen());
    // Thawing a thawed guest is harmless, so every path may thaw.
    assert_eq!(agent.thaw(TIMEOUT).await.unwrap(), 0);
    assert_eq!(
        double.calls(),
        [
            "guest-sync-delimited",
            "guest-ping",
            "guest-fsfreeze-status",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-status",
            "guest-fsfreeze-thaw",
            "guest-fsfreeze-thaw"
        ]
    );
}

#[tokio::test]
async fn a_hanging_freeze_times_out_on_the_read_and_a_new_session_can_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let double = AgentDouble::start(dir.path());
    double.set("guest-fsfreeze-freeze", Behaviour::Hang);
    let mut agent = GuestAgent::connect(&double.socket, TIMEOUT).await.unwrap();
    let started = Instant::now();
    let result = agent.freeze(Duration::from_millis(300)).await;
    assert!(
        matches!(result, Err(AgentError::Timeout { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < TIMEOUT, "the deadline did not fire");
    drop(agent);

    // The guest may have frozen after all: a new session resyncs, asks and thaws.
    double.state.lock().unwrap().frozen = true;
    let mut agent = GuestAgent::connect(&double.socket, TIMEOUT).await.unwrap();
    assert_eq!(
        agent.freeze_status(TIMEOUT).await.unwrap(),
        FreezeStatus::Frozen
    );
    assert_eq!(agent.thaw(TIMEOUT).await.unwrap(), 2);
    assert!(!double.frozen());
}

#[tokio::test]
async fn a_refused_freeze_is_a_command_error_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let double = AgentDouble::start(dir.path());
    double.set("guest-fsfreeze-freeze", Behaviour::Fail);
    let mut agent = GuestAgent::connect(&double.socket, TIMEOUT).await.unwrap();
    match agent.freeze(TIMEOUT).await {
        Err(AgentError::Command { class, command, .. }) => {
            assert_eq!(class, "GenericError");
            assert_eq!(command, "guest-fsfreeze-freeze");
        }
        other => panic!("{other:?}"),
    }
    assert!(!double.frozen());
    assert_eq!(agent.thaw(TIMEOUT).await.unwrap(), 0);
}

#[tokio::test]
async fn no_agent_behind_the_socket_is_an_error_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    assert!(matches!(
        GuestAgent::connect(&missing, TIMEOUT).await,
        Err(AgentError::Io(_))
    ));
    // A socket nobody answers on (an agent not started in the guest).
    let silent = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&silent).unwrap();
    tokio::spawn(async move {
        let (_stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    assert!(matches!(
        GuestAgent::connect(&silent, Duration::from_millis(300)).await,
        Err(AgentError::Timeout { .. })
    ));
}
