// The jobs panel at the bottom of every page: the latest jobs, kept up to date from
// the event stream (no polling), with progress, bytes, time left and cancel.
import { useEffect, useState } from 'preact/hooks';
import { api, must, type Job } from '../api/client';
import { age, bytes, duration, shortId } from '../format';
import { applied, subscribe } from '../state';
import { VmLink } from './VmName';
import { ActionButton, ProblemBox, ProgressBar, Status, useAction } from './ui';

/** Jobs loaded at start; the panel shows the active ones and the latest finished. */
const SHOWN = 30;
const FINISHED_SHOWN = 6;
/** A phone's screen is too small to keep the panel open unasked. */
const startsOpen = () => !window.matchMedia('(max-width: 720px)').matches;
const active = (job: Job) => job.status === 'queued' || job.status === 'running';

export function JobsPanel() {
  const [jobs, setJobs] = useState<Map<string, Job>>(new Map());
  const [open, setOpen] = useState(startsOpen);
  const cancel = useAction();

  useEffect(() => {
    let current = true;
    const load = () =>
      must(api.GET('/v1/jobs', { params: { query: { limit: SHOWN } } })).then(
        (list) => current && setJobs(new Map(list.items.map((job) => [job.id, job]))),
        () => undefined,
      );
    void load();
    const unsubscribe = subscribe((event) => {
      if (event === null) return void load();
      if (!event.type.startsWith('job.')) return;
      setJobs((previous) => applied(previous, event));
    });
    return () => {
      current = false;
      unsubscribe();
    };
  }, []);

  const newest = [...jobs.values()].sort((a, b) => b.created_at.localeCompare(a.created_at));
  const running = newest.filter(active).length;
  const sorted = [...newest.filter(active), ...newest.filter((job) => !active(job)).slice(0, FINISHED_SHOWN)];
  return (
    <section class={`jobs-panel${open ? ' open' : ''}`} aria-label="Jobs" data-testid="jobs-panel">
      <button type="button" class="jobs-toggle" aria-expanded={open} onClick={() => setOpen(!open)}>
        Jobs {running > 0 ? <span class="badge status-running">{running} active</span> : <span class="muted">idle</span>}
      </button>
      {open && (
        <div class="jobs-list">
          <ProblemBox error={cancel.error} onClose={cancel.clear} />
          {sorted.length === 0 && <p class="muted">No jobs yet.</p>}
          <table>
            <tbody>
              {sorted.map((job) => (
                <JobRow
                  key={job.id}
                  job={job}
                  onCancel={() => cancel.run(() => must(api.POST('/v1/jobs/{id}/cancel', { params: { path: { id: job.id } } })))}
                />
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}

function JobRow({ job, onCancel }: { job: Job; onCancel: () => void }) {
  const copying = job.bytes_total !== null && job.bytes_total !== undefined;
  return (
    <tr data-testid={`job-${job.id}`} data-kind={job.kind} data-status={job.status}>
      <td>
        <span class="job-kind">{job.kind.replaceAll('_', ' ')}</span>{' '}
        {job.vm_id ? (
          <VmLink id={job.vm_id} class="muted" />
        ) : (
          <span class="muted">
            {job.target.type} {shortId(job.target.id)}
          </span>
        )}
      </td>
      <td>
        <Status value={job.status} />
      </td>
      <td class="job-progress">
        <ProgressBar value={job.progress} label={`${job.kind} progress`} />
        <span class="muted" data-testid="job-progress-text">
          {job.progress}%{copying && ` · ${bytes(job.bytes_done ?? 0)} of ${bytes(job.bytes_total)}`}
          {active(job) && job.eta_seconds !== null && job.eta_seconds !== undefined && ` · ${duration(job.eta_seconds)} left`}
        </span>
        {job.error && (
          <div class="error-text">
            {job.error.code}: {job.error.message}
          </div>
        )}
      </td>
      <td class="muted">
        {job.requested_by ?? ''} {age(job.created_at)}
      </td>
      <td>
        {active(job) && !job.cancel_requested && (
          <ActionButton operation="POST /v1/jobs/{id}/cancel" onClick={onCancel}>
            Cancel
          </ActionButton>
        )}
        {job.cancel_requested && active(job) && <span class="muted">cancelling…</span>}
      </td>
    </tr>
  );
}
