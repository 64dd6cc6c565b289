//! Driving one job through its journal: plan it (or unwind it if it never gets a
//! plan), run its steps recording each, commit its metadata, drop the files it
//! replaced; or stop it (roll back before its point of no return, flag what a partial
//! merge left after it) or park it until there is space.

use std::sync::Arc;

use tokio::sync::watch;

use super::super::{Engine, PARK_FOR, run};
use super::execute::{StepPlace, remove_if_exists};
use super::progress::StepProgress;
use super::{Outcome, Stop};
use crate::domain::plan::{FileOp, MetaOp, Plan};
use crate::domain::{Job, JobPhase, JobStatus, Uuid};
use crate::error::{Error, ErrorCode, Result};
use crate::files::exports;
use crate::store;

/// The end of the run of steps from `index` that may run at once: `Create` steps the
/// journal does not record one by one (see `journal_step`), none of them the point of
/// no return but the first. Each makes a new file nothing reads before the commit, and
/// a restart or a stop handles them as a whole already: a resumed job makes them all
/// again, a rolled-back one removes them all. At least `index + 1`.
fn together_from(plan: &Plan, index: usize) -> usize {
    let unjournaled_create = |i: usize| {
        let step = &plan.steps[i];
        matches!(step.op, FileOp::Create { .. }) && step.then.is_empty() && !plan.is_live()
    };
    if !unjournaled_create(index) {
        return index + 1;
    }
    let mut end = index + 1;
    while end < plan.steps.len()
        && unjournaled_create(end)
        && plan.point_of_no_return() != Some(end)
    {
        end += 1;
    }
    end
}

/// Write `plan` and the status flags it sets into `tx` as `job`'s journal, and show
/// it on `job`: once `tx` commits, a restart resumes the job from its first step
/// instead of planning it again (the caller's `job` is dropped if `tx` fails).
pub(super) async fn journal_plan_in(tx: &mut store::Tx, job: &mut Job, plan: Plan) -> Result<()> {
    store::apply(tx, &plan.mark).await?;
    store::jobs::save_plan(tx, job.id, &plan).await?;
    job.phase = Some(JobPhase::Executing);
    job.next_step = 0;
    job.plan = Some(plan);
    Ok(())
}

/// How the plan's last step ended, for the commit.
#[derive(Debug, Default)]
struct LastStep {
    /// It ran in this process (a resumed job past it has nothing to apply).
    done: bool,
    /// The bytes its copy moved (see `StepProgress::finish`).
    copied: Option<u64>,
}

/// Where a job stands after its commit.
#[derive(Debug, PartialEq, Eq)]
enum Committed {
    /// The job ended (succeeded, or a late cancel rolled it back).
    Ended,
    /// Its metadata is switched; the files it replaced are still to be removed.
    FilesToDrop,
}

impl Engine {
    /// A write transaction acting for whoever asked for `job`: the events of what it
    /// changes say so.
    async fn begin_for(&self, job: &Job) -> Result<crate::store::Tx> {
        let mut tx = self.db.begin().await?;
        tx.act_for(job.requested_by.as_deref());
        Ok(tx)
    }

    pub(super) async fn drive(
        self: &Arc<Self>,
        mut job: Job,
        cancel: watch::Receiver<bool>,
    ) -> Result<()> {
        // The first step a previous process (or attempt) may have been in the middle of
        // when it stopped; it and every later step may be half done.
        let resumed_at = (job.phase == Some(JobPhase::Executing)).then_some(job.next_step);
        if job.phase.is_none() {
            if *cancel.borrow() {
                return self.abandon(&job, Stop::Cancelled).await;
            }
            match run::plan(self, &job.spec, job.seq).await {
                Ok(plan) => self.journal_plan(&mut job, plan).await?,
                Err(e) => return self.abandon(&job, Stop::Failed(e)).await,
            }
        }
        let plan = job
            .plan
            .clone()
            .ok_or_else(|| Error::Internal(format!("job {} has a phase but no plan", job.id)))?;
        match job.phase {
            Some(JobPhase::Stopping) => {
                let outcome = Outcome::recorded(&job);
                return self
                    .finish_stopping(&job, &plan, job.next_step, outcome)
                    .await;
            }
            Some(JobPhase::Executing) => {
                let Some(last_step) = self.run_steps(&mut job, &plan, resumed_at, &cancel).await?
                else {
                    return Ok(());
                };
                if self.commit(&job, &plan, last_step).await? == Committed::Ended {
                    return Ok(());
                }
            }
            _ => {}
        }
        // Committed: only the files the job replaced are left to remove.
        self.drop_files(&plan.drops).await?;
        let mut tx = self.begin_for(&job).await?;
        store::jobs::finish(&mut tx, job.id, JobStatus::Succeeded, None, store::now()).await?;
        tx.commit().await?;
        tracing::info!(job = %job.id, kind = %job.kind, "job succeeded");
        Ok(())
    }

    /// Journal the plan, with the status flags it sets, before any file is touched.
    async fn journal_plan(&self, job: &mut Job, plan: Plan) -> Result<()> {
        let mut tx = self.begin_for(job).await?;
        journal_plan_in(&mut tx, job, plan).await?;
        tx.commit().await?;
        self.fault_point(job, "planned").await;
        Ok(())
    }

    /// Run the steps from the journal's next one. `Some` when every step ran (the last
    /// one's metadata is then committed with the plan's); `None` when the job was
    /// stopped or parked instead, which is already recorded.
    async fn run_steps(
        self: &Arc<Self>,
        job: &mut Job,
        plan: &Plan,
        resumed_at: Option<usize>,
        cancel: &watch::Receiver<bool>,
    ) -> Result<Option<LastStep>> {
        let mut last_step = LastStep::default();
        let mut index = job.next_step;
        while index < plan.steps.len() {
            let cancellable = plan.point_of_no_return().is_none_or(|p| index <= p);
            if *cancel.borrow() && cancellable {
                self.stop(job, plan, index, Stop::Cancelled).await?;
                return Ok(None);
            }
            if plan.point_of_no_return() == Some(index) && !job.past_no_return {
                let mut tx = self.begin_for(job).await?;
                let entered = store::jobs::enter_no_return(&mut tx, job.id).await?;
                tx.commit().await?;
                if !entered {
                    self.stop(job, plan, index, Stop::Cancelled).await?;
                    return Ok(None);
                }
                job.past_no_return = true;
            }
            // Steps that only make new files, which nothing else reads until the
            // commit, run at once: a snapshot makes all its disks' overlays together.
            let group = index..together_from(plan, index);
            let ran = futures_util::future::join_all(group.clone().map(|i| {
                // A resumed job may have run this step (or, for steps the journal does
                // not record one by one, a later one) before the process died.
                let again = resumed_at.is_some_and(|first| i >= first);
                let cancellable = plan.point_of_no_return().is_none_or(|p| i <= p);
                self.run_step(job, plan, i, again, cancellable.then_some(cancel))
            }))
            .await;
            // Every step of the group has ended, so a stop finds no file still being
            // made; it is recorded at the first step that did not complete.
            let mut copies = Vec::with_capacity(ran.len());
            for (i, ran) in group.clone().zip(ran) {
                match ran {
                    Ok(copied) => copies.push(copied),
                    Err(Stop::Parked(error)) => {
                        self.park(job, &error).await?;
                        return Ok(None);
                    }
                    Err(stop) => {
                        self.stop(job, plan, i, stop).await?;
                        return Ok(None);
                    }
                }
            }
            for (i, copied) in group.clone().zip(copies) {
                // A crash after the step did its work but before the journal says so.
                self.fault_point(job, &format!("ran-step-{i}")).await;
                let last = i + 1 == plan.steps.len();
                if last {
                    last_step = LastStep { done: true, copied };
                } else {
                    self.journal_step(job, plan, i, copied).await?;
                }
                self.fault_point(job, &format!("after-step-{i}")).await;
            }
            index = group.end;
        }
        Ok(Some(last_step))
    }

    /// Execute step `index`, with its progress mapped into the job's. The bytes a copy
    /// it made moved, for its journal entry to count (see `StepProgress::finish`).
    async fn run_step(
        self: &Arc<Self>,
        job: &Job,
        plan: &Plan,
        index: usize,
        again: bool,
        cancel: Option<&watch::Receiver<bool>>,
    ) -> std::result::Result<Option<u64>, Stop> {
        let step = &plan.steps[index];
        let total = plan.steps.len().max(1) as f32;
        let progress = StepProgress::new(self, job, index, index as f32 / total, 1.0 / total);
        let interrupt = cancel.filter(|_| step.op.is_interruptible());
        let place = StepPlace {
            past_no_return: job.past_no_return,
            first_of_no_return: plan.point_of_no_return() == Some(index),
            live_plan: plan.is_live(),
        };
        let ran = self
            .execute_with_retries(job, &step.op, again, place, interrupt, &progress)
            .await;
        // The copy's figures stop before the journal records how the step ended.
        let copied = progress.finish(ran.is_ok()).await;
        ran.map(|()| copied)
    }

    /// Record that step `index` is done, with the metadata that describes its result
    /// and the bytes it `copied`.
    /// Creating an empty file is cheap and is redone from scratch on resume (outside
    /// live plans), so only steps that copy data or change metadata cost a journal
    /// write. (The last step's
    /// entry goes into the final transaction instead: a crash between the two redoes
    /// that step, and every file operation is idempotent.)
    async fn journal_step(
        &self,
        job: &Job,
        plan: &Plan,
        index: usize,
        copied: Option<u64>,
    ) -> Result<()> {
        let step = &plan.steps[index];
        // Except in a live plan: once a later step may have opened the file in a running
        // VM's QEMU, making it again would unlink the file QEMU holds.
        if matches!(step.op, FileOp::Create { .. })
            && step.then.is_empty()
            && copied.is_none()
            && !plan.is_live()
        {
            return Ok(());
        }
        let total = plan.steps.len().max(1) as f32;
        let mut tx = self.begin_for(job).await?;
        store::apply(&mut tx, &step.then).await?;
        if let Some(copied) = copied {
            store::jobs::end_copy(&mut tx, job.id, copied).await?;
        }
        let progress = ((index + 1) as f32 / total * 99.0) as u8;
        store::jobs::set_next_step(&mut tx, job.id, index + 1, progress).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Switch the metadata to the plan's result in one transaction. A cancel accepted
    /// while the last step ran is honoured here, in the transaction that would
    /// otherwise commit the result: the same statement that makes the job uncancellable
    /// sees whether a cancel came first, so either the cancel was refused (409) or the
    /// job rolls back, never both.
    async fn commit(&self, job: &Job, plan: &Plan, last_step: LastStep) -> Result<Committed> {
        let mut tx = self.begin_for(job).await?;
        if !job.past_no_return && !store::jobs::enter_no_return(&mut tx, job.id).await? {
            // Ended cleanly: the writer connection is kept, not replaced.
            tx.rollback().await;
            if let Some(copied) = last_step.copied {
                // Rolled back, but the bytes were copied: counted, and the figures go.
                let mut tx = self.begin_for(job).await?;
                store::jobs::end_copy(&mut tx, job.id, copied).await?;
                tx.commit().await?;
            }
            let last = plan.steps.len().saturating_sub(1);
            self.stop(job, plan, last, Stop::Cancelled).await?;
            return Ok(Committed::Ended);
        }
        if last_step.done
            && let Some(step) = plan.steps.last()
        {
            store::apply(&mut tx, &step.then).await?;
        }
        if let Some(copied) = last_step.copied {
            store::jobs::end_copy(&mut tx, job.id, copied).await?;
        }
        store::apply(&mut tx, &plan.finish).await?;
        store::jobs::set_phase(&mut tx, job.id, JobPhase::Committed).await?;
        let done = plan.drops.is_empty();
        if done {
            // Nothing left to clean up: end the job in the same transaction.
            store::jobs::finish(&mut tx, job.id, JobStatus::Succeeded, None, store::now()).await?;
        }
        tx.commit().await?;
        self.fault_point(job, "committed").await;
        if done {
            tracing::info!(job = %job.id, kind = %job.kind, "job succeeded");
            return Ok(Committed::Ended);
        }
        Ok(Committed::FilesToDrop)
    }

    /// Stop a job at step `index` (not completed): roll back if the point of no return
    /// was not reached, otherwise record what the partial merge left unreadable. The
    /// plan's `undo` and `fail` restore every status it flagged to what it was before
    /// the job.
    pub(super) async fn stop(
        &self,
        job: &Job,
        plan: &Plan,
        index: usize,
        stop: Stop,
    ) -> Result<()> {
        // A step of no return that did nothing leaves the job as before that step: it
        // is rolled back like any stop before it.
        let undone = matches!(stop, Stop::Undone(_));
        let outcome = Outcome::of(job, stop);
        // Decided once: the decision is journaled before any file is touched, so a crash
        // while rolling back rolls back again instead of running the job on from a
        // state whose files were already removed.
        let mut tx = self.begin_for(job).await?;
        store::jobs::begin_stopping(&mut tx, job.id, outcome.error_pair()).await?;
        if undone {
            store::jobs::leave_no_return(&mut tx, job.id).await?;
        }
        tx.commit().await?;
        if undone {
            let before = Job {
                past_no_return: false,
                ..job.clone()
            };
            return self.finish_stopping(&before, plan, index, outcome).await;
        }
        self.finish_stopping(job, plan, index, outcome).await
    }

    /// The file work and final entry of a stop (also what a restart redoes for a job
    /// journaled as stopping, from its first unjournaled step).
    pub(super) async fn finish_stopping(
        &self,
        job: &Job,
        plan: &Plan,
        index: usize,
        outcome: Outcome,
    ) -> Result<()> {
        self.repair_cut_short(plan, index).await?;
        // The journal says whether the step of no return was entered (see `enter_no_return`).
        let past_no_return =
            job.past_no_return || plan.point_of_no_return().is_some_and(|p| p < index);
        if past_no_return {
            return self.end(job, &plan.fail, &outcome).await;
        }
        let mut undo = self.roll_back_files(plan, index).await?;
        undo.extend_from_slice(match (outcome.status, &plan.cancel) {
            (JobStatus::Cancelled, Some(cancel)) => cancel,
            _ => &plan.undo,
        });
        self.end(job, &undo, &outcome).await
    }

    /// Make the files of steps that may have been cut short readable as the records
    /// describe them: a stream at step `index` or later (in this process, or in one that
    /// died before the journal caught up) reads through its old backing again, and a
    /// commit or resize cut short loses the clusters it allocated but never mapped.
    async fn repair_cut_short(&self, plan: &Plan, index: usize) -> Result<()> {
        for step in &plan.steps[index..] {
            if let FileOp::Stream { volume, from, .. } = step.op
                && tokio::fs::try_exists(self.volume_path(volume)).await?
            {
                self.restore_stream(volume, from).await?;
            }
        }
        if let Some(step) = plan.steps.get(index) {
            let written = match step.op {
                FileOp::Commit { base, .. } => Some(base),
                FileOp::Resize { volume, .. } => Some(volume),
                _ => None,
            };
            if let Some(volume) = written {
                self.qemu.repair_leaks(&self.volume_path(volume)).await?;
            }
        }
        Ok(())
    }

    /// Undo the file work of a job stopped before its point of no return (steps before
    /// `index` ran), returning the metadata changes that go with it. Every file a Create
    /// or Convert step made is new and ours, including those of later steps an earlier
    /// process ran before it died (Creates are not journaled one by one): removed. A job
    /// that did not happen leaves the tree as it found it, not only the bytes: each
    /// stream it finished is pointed back at the layer it read (still there: nothing is
    /// dropped before the final commit), and the records with it. The copied clusters
    /// stay in the file and read exactly as that layer does.
    async fn roll_back_files(&self, plan: &Plan, index: usize) -> Result<Vec<MetaOp>> {
        // Overlays a live job opened in QEMU are closed, and its copies stopped, before
        // their files go.
        for step in &plan.steps {
            match step.op {
                FileOp::LiveAdd { vm, ref overlays } => self.live_remove(vm, overlays).await?,
                FileOp::LiveCopy { vm, ref copies, .. } => self.live_copy_remove(vm, copies).await,
                _ => {}
            }
        }
        for step in &plan.steps {
            if let Some(volume) = step.op.created_volume() {
                remove_if_exists(&self.volume_path(volume)).await?;
            }
        }
        let mut undo = Vec::new();
        for step in &plan.steps[..index] {
            let FileOp::Stream {
                volume,
                from: Some(from),
                ..
            } = step.op
            else {
                continue;
            };
            // Were `from` gone, the records must not name it: the stop waits (the job
            // stays `stopping` and is tried again at the next start).
            if !tokio::fs::try_exists(self.volume_path(from)).await? {
                return Err(Error::Internal(format!(
                    "cannot roll back the stream into {volume}: the layer {from} it read is gone"
                )));
            }
            self.restore_stream(volume, Some(from)).await?;
            undo.push(MetaOp::SetVolumeParent {
                volume,
                parent: Some(from),
            });
        }
        Ok(undo)
    }

    /// Hand a job that cannot go on past its point of no return (out of space, or a
    /// running VM's QEMU that cannot be asked now) back to the queue, to be tried again
    /// in a while from its journal (the step it was in is redone as interrupted).
    pub(super) async fn park(&self, job: &Job, error: &Error) -> Result<()> {
        let code = error.code();
        let waiting_for = if code == ErrorCode::InsufficientStorage {
            "free space"
        } else {
            "the VM's QEMU"
        };
        tracing::warn!(job = %job.id, kind = %job.kind, error = %error, "the job waits for {waiting_for} to go on");
        let retry_at = store::now() + chrono::Duration::from_std(PARK_FOR).expect("a short pause");
        let message = format!(
            "waiting for {waiting_for} to finish (tried again every {} s): {error}",
            PARK_FOR.as_secs()
        );
        let mut tx = self.begin_for(job).await?;
        store::jobs::park(&mut tx, job.id, retry_at, (code.as_str(), &message)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// End a job that never journaled a plan.
    pub(super) async fn abandon(&self, job: &Job, stop: Stop) -> Result<()> {
        let cancelled = matches!(stop, Stop::Cancelled);
        let ops = run::unwind(&job.spec, &mut *self.db.reader().await?, cancelled).await?;
        self.end(job, &ops, &Outcome::of(job, stop)).await
    }

    pub(super) async fn end(&self, job: &Job, ops: &[MetaOp], outcome: &Outcome) -> Result<()> {
        let mut tx = self.begin_for(job).await?;
        store::apply(&mut tx, ops).await?;
        store::jobs::finish(
            &mut tx,
            job.id,
            outcome.status,
            outcome.error_pair(),
            store::now(),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Remove files whose metadata is gone (with any template export made from them),
    /// refusing any that something still uses as its backing file.
    pub(super) async fn drop_files(&self, volumes: &[Uuid]) -> Result<()> {
        let mut conn = self.db.reader().await?;
        for &volume in volumes {
            let children: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE parent_id = ? OR id = ?")
                    .bind(store::id_text(volume))
                    .bind(store::id_text(volume))
                    .fetch_one(&mut *conn)
                    .await?;
            if children > 0 {
                return Err(Error::Internal(format!(
                    "refusing to remove volume {volume}: it is still referenced"
                )));
            }
            remove_if_exists(&self.volume_path(volume)).await?;
            exports::remove_of(&self.files, volume).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan::Step;

    fn create(then: Vec<MetaOp>) -> Step {
        Step {
            op: FileOp::Create {
                volume: Uuid::now_v7(),
                backing: Some(Uuid::now_v7()),
                size_bytes: 1 << 30,
            },
            then,
        }
    }

    fn plan(steps: Vec<Step>) -> Plan {
        Plan {
            steps,
            ..Plan::default()
        }
    }

    #[test]
    fn a_snapshots_overlays_are_made_together() {
        let snapshot = plan((0..4).map(|_| create(vec![])).collect());
        assert_eq!(together_from(&snapshot, 0), 4);
        // Resumed at a later step: the rest of them.
        assert_eq!(together_from(&snapshot, 2), 4);
    }

    #[test]
    fn steps_the_journal_records_or_that_copy_run_one_at_a_time() {
        let volume = Uuid::now_v7();
        let recorded = vec![MetaOp::SetVolumeStatus {
            volume,
            status: crate::domain::VolumeStatus::Ready,
        }];
        let mixed = plan(vec![
            create(vec![]),
            create(recorded),
            create(vec![]),
            Step {
                op: FileOp::Repoint {
                    volume,
                    backing: Uuid::now_v7(),
                },
                then: vec![],
            },
            create(vec![]),
        ]);
        assert_eq!(together_from(&mixed, 0), 1, "the next one is journaled");
        assert_eq!(together_from(&mixed, 1), 2, "a journaled create is alone");
        assert_eq!(together_from(&mixed, 2), 3, "a repoint follows");
        assert_eq!(together_from(&mixed, 3), 4);
        assert_eq!(together_from(&mixed, 4), 5);
    }

    #[test]
    fn a_live_plans_overlays_are_made_one_at_a_time() {
        let mut live = plan(vec![create(vec![]), create(vec![])]);
        live.steps.push(Step {
            op: FileOp::LiveAdd {
                vm: Uuid::now_v7(),
                overlays: vec![],
            },
            then: vec![],
        });
        assert_eq!(together_from(&live, 0), 1);
    }
}
