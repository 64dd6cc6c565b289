//! The guest-agent client against the agent double (tests/support/guest_agent.rs).

use std::time::{Duration, Instant};

use strata::qemu::guest_agent::{AgentError, FreezeStatus, GuestAgent};
use tokio::net::UnixListener;

pub(crate) use crate::support::guest_agent::{AgentDouble, Behaviour};

const TIMEOUT: Duration = Duration::from_secs(10);

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
