//! The event stream (`GET /v1/events`): exactly the expected events, in commit order,
//! with the resources' views as their GETs answer and who asked; resuming with
//! `Last-Event-ID` (also across a restart and a crash); `reset` when the missed events
//! are gone; filters; tickets for `EventSource`; bad input refused.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::auth::create_token;
use crate::support::*;

/// `(type, resource id)` of each event.
fn kinds(events: &[SseEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| (e.event.clone(), e.resource().to_owned()))
        .collect()
}

fn pairs(expected: &[(&str, String)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(t, id)| (t.to_string(), id.clone()))
        .collect()
}

async fn until_finished(stream: &mut EventStream, job: impl std::fmt::Display) -> Vec<SseEvent> {
    let job = job.to_string();
    stream
        .until(|e| e.event == "job.finished" && e.resource() == job)
        .await
}

#[tokio::test]
async fn a_subscriber_sees_a_snapshot_a_merging_delete_and_a_clone_as_exactly_these_events() {
    let mut app = TestApp::spawn().await;
    let ops = create_token(&app, "ops", "operate");
    app.token = Some(ops);
    let vm = app.create_vm("src", &[("root", MIB)]).await;
    let other = app.create_vm("other", &[("root", MIB)]).await;
    let types = "types=vm.*,snapshot.*,job.created,job.finished";
    let mut stream = EventStream::open(&app, types, None).await;
    let mut everything = EventStream::open(&app, "", None).await;
    let mut mine = EventStream::open(&app, &format!("vm_id={}", other.id), None).await;

    let j1 = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{}/snapshots", vm.id),
            Some(json!({"name": "s1"})),
        )
        .await;
    let s1 = app.get_snapshot(j1.target.id).await;
    let seen = until_finished(&mut stream, j1.id).await;
    let (vm_id, s1_id, j1_id) = (vm.id.to_string(), s1.id.to_string(), j1.id.to_string());
    assert_eq!(
        kinds(&seen),
        pairs(&[
            // The VM counts the new snapshot as soon as it is accepted.
            ("vm.updated", vm_id.clone()),
            ("snapshot.created", s1_id.clone()),
            ("job.created", j1_id.clone()),
            ("vm.updated", vm_id.clone()),
            ("snapshot.updated", s1_id.clone()),
            ("job.finished", j1_id.clone()),
        ])
    );
    assert_eq!(seen[0].data["snapshot_count"], 1);
    assert_eq!(seen[1].data["status"], "creating");
    assert_eq!(seen[2].data["status"], "queued");
    assert_eq!(seen[3].data["current_snapshot_id"], s1_id.as_str());
    assert_eq!(seen[4].data["status"], "ready");
    assert_eq!(seen[5].data["status"], "succeeded");
    for event in &seen {
        assert_eq!(
            event.data["requested_by"], "ops",
            "{}: who asked",
            event.event
        );
    }

    let j2 = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{}/snapshots", vm.id),
            Some(json!({"name": "s2"})),
        )
        .await;
    let s2 = app.get_snapshot(j2.target.id).await;
    let seen = until_finished(&mut stream, j2.id).await;
    let (s2_id, j2_id) = (s2.id.to_string(), j2.id.to_string());
    assert_eq!(
        kinds(&seen),
        pairs(&[
            ("vm.updated", vm_id.clone()),
            ("snapshot.created", s2_id.clone()),
            ("job.created", j2_id.clone()),
            ("vm.updated", vm_id.clone()),
            ("snapshot.updated", s2_id.clone()),
            // s1 is no longer the current snapshot.
            ("snapshot.updated", s1_id.clone()),
            ("job.finished", j2_id.clone()),
        ])
    );
    let s1_moved = seen.iter().find(|e| e.resource() == s1_id).unwrap();
    assert_eq!(s1_moved.data["is_current"], false);

    // s1 has a child: deleting it merges its layer.
    let j3 = app.delete_snapshot(s1.id).await;
    let seen = until_finished(&mut stream, j3.id).await;
    let j3_id = j3.id.to_string();
    assert_eq!(
        kinds(&seen),
        pairs(&[
            ("snapshot.updated", s1_id.clone()),
            ("job.created", j3_id.clone()),
            // The merge's step, then the switch: the disk's chain changes twice.
            ("vm.updated", vm_id.clone()),
            ("vm.updated", vm_id.clone()),
            // s2 now reads through what s1 held: its parent is gone.
            ("snapshot.updated", s2_id.clone()),
            ("snapshot.deleted", s1_id.clone()),
            ("job.finished", j3_id.clone()),
        ])
    );
    assert_eq!(seen[0].data["status"], "deleting");
    assert_eq!(seen[4].data["parent_id"], Value::Null);
    assert_eq!(seen[5].data, json!({"id": s1_id, "requested_by": "ops"}));
    let merges = seen[6].data["detail"]["merges"].as_array().unwrap();
    assert!(!merges.is_empty());

    let clone = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{}/clone", vm.id),
            Some(json!({"name": "copy", "mode": "linked", "snapshot_id": s2.id})),
        )
        .await;
    let seen = until_finished(&mut stream, clone.id).await;
    let (copy_id, j4_id) = (clone.target.id.to_string(), clone.id.to_string());
    assert_eq!(
        kinds(&seen),
        pairs(&[
            ("vm.created", copy_id.clone()),
            ("job.created", j4_id.clone()),
            // The source lists its new dependent.
            ("vm.updated", vm_id.clone()),
            ("vm.updated", copy_id.clone()),
            ("job.finished", j4_id.clone()),
        ])
    );
    let source = seen.iter().rfind(|e| e.resource() == vm_id).unwrap();
    assert_eq!(source.data["dependent_vm_ids"], json!([copy_id]));

    // The last event of each resource is the view its GET answers (nothing changed
    // since).
    let last: std::collections::BTreeMap<&str, &SseEvent> =
        seen.iter().map(|e| (e.resource(), e)).collect();
    for event in last.into_values() {
        let path = match event.event.as_str() {
            "job.finished" => format!("/v1/jobs/{}", event.resource()),
            _ => format!("/v1/vms/{}", event.resource()),
        };
        let (_, mut now) = app.get(&path).await;
        let mut data = event.data.clone();
        if now.get("requested_by").is_none() {
            data.as_object_mut().unwrap().remove("requested_by");
        }
        for view in [&mut data, &mut now] {
            forget_allocation(view);
        }
        assert_eq!(data, now, "{}", event.event);
    }

    // A change made without a job says who made it too.
    let (status, _) = app
        .patch(
            &format!("/v1/vms/{}", vm.id),
            json!({"description": "web tier"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let renamed = stream.next().await;
    assert_eq!(
        (renamed.event.as_str(), renamed.resource()),
        ("vm.updated", vm_id.as_str())
    );
    assert_eq!(renamed.data["description"], "web tier");
    assert_eq!(renamed.data["requested_by"], "ops");

    // The unfiltered stream saw the same events, among the disks' and jobs' updates, in
    // the same order; the stream of the other VM saw none of this.
    let all = everything.until(|e| e.id == renamed.id).await;
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    let filtered: Vec<i64> = all
        .iter()
        .filter(|e| {
            e.event.starts_with("vm.")
                || e.event.starts_with("snapshot.")
                || e.event == "job.created"
                || e.event == "job.finished"
        })
        .map(|e| e.id)
        .collect();
    assert_eq!(filtered.len(), 6 + 7 + 7 + 5 + 1);
    assert!(all.iter().any(|e| e.event == "disk.updated"));
    assert!(all.iter().any(|e| e.event == "job.updated"));
    let (status, _) = app
        .patch(
            &format!("/v1/vms/{}", other.id),
            json!({"description": "mine"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let first = mine.next().await;
    assert_eq!(
        (first.event.as_str(), first.resource()),
        ("vm.updated", other.id.to_string().as_str())
    );
}

#[tokio::test]
async fn a_client_resuming_with_last_event_id_misses_nothing_also_across_a_restart() {
    let mut app = TestApp::spawn().await;
    let vm = app.create_vm("a", &[("root", MIB)]).await;
    let mut steady = EventStream::open(&app, "", None).await;
    let mut dropped = EventStream::open(&app, "", None).await;
    app.snapshot(vm.id, "s1").await;
    let first = dropped.next().await;
    drop(dropped);
    let s2 = app.snapshot(vm.id, "s2").await;
    let j = app.delete_snapshot(s2.id).await;
    let expected = until_finished(&mut steady, j.id).await;

    let mut resumed = EventStream::open(&app, "", Some(first.id)).await;
    let got = resumed.until(|e| e.id == expected.last().unwrap().id).await;
    assert_eq!(
        got.iter()
            .map(|e| (e.id, e.event.clone(), e.data.clone()))
            .collect::<Vec<_>>(),
        expected[1..]
            .iter()
            .map(|e| (e.id, e.event.clone(), e.data.clone()))
            .collect::<Vec<_>>(),
    );
    // The query parameter does the same for a client that cannot send the header.
    let mut by_query = EventStream::open(&app, &format!("last_event_id={}", first.id), None).await;
    assert_eq!(by_query.next().await.id, expected[1].id);

    // The history is in the database: after a restart, a client resumes where it was,
    // and new events get higher ids.
    let last = expected.last().unwrap().id;
    app.restart(&[]).await;
    let mut after_restart = EventStream::open(&app, "", Some(first.id)).await;
    let replayed = after_restart.until(|e| e.id == last).await;
    assert_eq!(replayed.len(), expected.len() - 1);
    app.snapshot(vm.id, "s3").await;
    let next = after_restart.next().await;
    assert!(next.id > last, "{} after {last}", next.id);
    // The VM counts the new snapshot in the same transaction.
    assert_eq!(next.event, "vm.updated");
    assert_eq!(after_restart.next().await.event, "snapshot.created");
}

#[tokio::test]
async fn a_client_whose_missed_events_are_gone_is_told_to_reload() {
    // Room for one snapshot's events (8) with some to spare: a subscriber that a
    // loaded machine schedules late still finds the first event of the next one. A
    // history shorter than that resets it again (seen with 4 in a full-suite run).
    let app = TestApp::spawn_with(&[("STRATA_EVENT_HISTORY", "16")]).await;
    let vm = app.create_vm("a", &[("root", MIB)]).await;
    app.snapshot(vm.id, "s1").await;
    app.snapshot(vm.id, "s2").await;

    // Only the newest sixteen events are kept (the VM and two snapshots made more):
    // resuming after the first is too late.
    let mut late = EventStream::open(&app, "", Some(1)).await;
    let reset = late.next().await;
    assert_eq!(reset.event, "reset");
    let last = reset.data["last_event_id"].as_i64().unwrap();
    assert_eq!(reset.id, last);
    assert!(last > 10, "{reset:?}");
    // Then it goes on like any other subscriber.
    app.snapshot(vm.id, "s3").await;
    let next = late.next().await;
    assert_eq!(next.event, "vm.updated");
    assert_eq!(next.data["snapshot_count"], 3);
    assert!(next.id > last);

    // Resuming from an event still kept is no reset.
    let mut fresh = EventStream::open(&app, "", None).await;
    let describe = |text: &'static str| {
        let app = &app;
        async move {
            let path = format!("/v1/vms/{}", vm.id);
            let (status, _) = app.patch(&path, json!({ "description": text })).await;
            assert_eq!(status, StatusCode::OK);
        }
    };
    describe("x").await;
    let x = fresh.next().await;
    assert_eq!(
        (x.event.as_str(), &x.data["description"]),
        ("vm.updated", &json!("x"))
    );
    let mut kept = EventStream::open(&app, "", Some(x.id)).await;
    describe("y").await;
    let y = kept.next().await;
    assert_eq!(
        (y.event.as_str(), &y.data["description"]),
        ("vm.updated", &json!("y"))
    );
    // An id this history never gave (another data directory's) is one.
    let mut stranger = EventStream::open(&app, "", Some(y.id + 1_000)).await;
    assert_eq!(stranger.next().await.event, "reset");
}

#[tokio::test]
async fn a_crashed_job_leaves_a_history_that_replays_to_the_present() {
    for point in ["planned", "after-step-0", "committed"] {
        let mut app =
            TestApp::spawn_with(&[("STRATA_FAULT", &format!("snapshot_delete:{point}"))]).await;
        let vm = app.create_vm("a", &[("root", MIB), ("data", MIB)]).await;
        let s1 = app.snapshot(vm.id, "s1").await;
        app.snapshot(vm.id, "s2").await;
        let job = app
            .accept(Method::DELETE, &format!("/v1/snapshots/{}", s1.id), None)
            .await;
        let status = app.wait_exit();
        assert!(!status.success(), "{point}: the fault aborts the process");
        app.restart(&[]).await;
        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{point}");
        assert_history_replays_to_the_present(&app).await;
    }
}

#[tokio::test]
async fn streams_need_a_read_token_or_a_ticket_and_bad_requests_are_refused() {
    let mut app = TestApp::spawn().await;
    let vm = app.create_vm("a", &[("root", MIB)]).await;
    let reader = create_token(&app, "dashboard", "read");
    let url = format!("{}/v1/events", app.base);

    let anonymous = app.client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // A browser's EventSource cannot send the header: a ticket in the URL, once.
    app.token = Some(reader.clone());
    let (status, ticket) = app.post("/v1/tickets", json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{ticket}");
    let ticket = ticket["ticket"].as_str().unwrap().to_owned();
    let by_ticket = app
        .client
        .get(format!("{url}?ticket={ticket}"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_ticket.status(), StatusCode::OK);
    let again = app
        .client
        .get(format!("{url}?ticket={ticket}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);

    for (query, status, code) in [
        (
            "types=volume.*",
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "types=job.finished,vm.finished",
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        ("vm_id=not-a-uuid", StatusCode::BAD_REQUEST, "invalid_query"),
        (
            &format!("vm_id={UNKNOWN_ID}")[..],
            StatusCode::NOT_FOUND,
            "vm_not_found",
        ),
        (
            "last_event_id=-1",
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        ("since=3", StatusCode::BAD_REQUEST, "invalid_query"),
    ] {
        let reply = app
            .client
            .get(format!("{url}?{query}"))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), status, "{query}");
        let body: Value = reply.json().await.unwrap();
        assert_eq!(body["code"], code, "{query}: {body}");
    }
    let reply = app
        .client
        .get(&url)
        .bearer_auth(&reader)
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
    let _ = vm;
}

/// A cancel is a change someone asked for too: the job records who (`cancelled_by`, its
/// `requested_by` staying the requester's), and so does the event of it.
#[tokio::test]
async fn a_cancel_records_who_asked_for_it_on_the_job_and_in_the_stream() {
    // The first snapshot job holds at `planned`, so the second waits queued behind it.
    let mut app =
        TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_create:planned:pause=3000")]).await;
    let ops = create_token(&app, "ops", "operate");
    let oncall = create_token(&app, "oncall", "operate");
    app.token = Some(ops.clone());
    let vm = app.create_vm("a", &[("root", MIB)]).await;
    let path = format!("/v1/vms/{}/snapshots", vm.id);
    let first = app
        .accept(Method::POST, &path, Some(json!({"name": "s1"})))
        .await;
    let second = app
        .accept(Method::POST, &path, Some(json!({"name": "s2"})))
        .await;
    let mut stream = EventStream::open(&app, "types=job.finished", None).await;

    app.token = Some(oncall);
    let cancelled = app
        .accept(
            Method::POST,
            &format!("/v1/jobs/{}/cancel", second.id),
            None,
        )
        .await;
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    let (_, job) = app.get(&format!("/v1/jobs/{}", second.id)).await;
    assert_eq!(
        (&job["requested_by"], &job["cancelled_by"]),
        (&json!("ops"), &json!("oncall"))
    );
    let finished = stream.next().await;
    assert_eq!(finished.resource(), second.id.to_string());
    assert_eq!(finished.data["cancelled_by"], "oncall");
    assert_eq!(finished.data["status"], "cancelled");

    let done = app.wait_job(first.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    let (_, job) = app.get(&format!("/v1/jobs/{}", first.id)).await;
    assert_eq!(job["cancelled_by"], Value::Null);
}
