// Schedules: each one's cron with its next runs in its own time zone, the retention
// preview (which snapshots would be kept or pruned now, and why), and its runs.
import { useState } from 'preact/hooks';
import { api, must, type Schedule, type Schemas } from '../api/client';
import { ActionButton, Confirm, FormDialog, Loading, ProblemBox, Status, useAction } from '../components/ui';
import { age, when } from '../format';
import { useChanges, useLoad } from '../state';
import { allVms } from './VmList';

type Retention = Schemas['RetentionPolicy'];
const RULES: (keyof Retention)[] = ['keep_last', 'keep_hourly', 'keep_daily', 'keep_weekly', 'keep_monthly', 'keep_yearly', 'max_age'];

export const retentionText = (r: Retention) =>
  RULES.filter((k) => r[k] !== null && r[k] !== undefined)
    .map((k) => `${k.replace('keep_', '')} ${r[k]}`)
    .join(', ') || 'keep everything';

export function Schedules() {
  const changes = useChanges((e) => e.type.startsWith('schedule.') || e.type.startsWith('run.'));
  const loaded = useLoad(async () => {
    const [schedules, vms] = await Promise.all([must(api.GET('/v1/schedules', { params: { query: { limit: 1000 } } })), allVms()]);
    return { schedules: schedules.items, vmNames: new Map(vms.map((vm) => [vm.id, vm.name])) };
  }, [changes]);
  const [selectedId, setSelectedId] = useState<string | null>(null);
  const [creating, setCreating] = useState(false);
  if (!loaded.data) return <Loading error={loaded.error} />;
  const { schedules, vmNames } = loaded.data;
  const selected = schedules.find((s) => s.id === selectedId) ?? null;
  return (
    <section>
      <div class="page-head">
        <h1>Schedules</h1>
        <ActionButton operation="POST /v1/schedules" onClick={() => setCreating(true)}>
          New schedule
        </ActionButton>
      </div>
      {schedules.length === 0 && <p class="muted">No schedules yet.</p>}
      <div class="table-wrap">
        <table class="list" data-testid="schedule-list">
          <thead>
            <tr>
              <th>Name</th>
              <th>Snapshots of</th>
              <th>When</th>
              <th>Keeps</th>
              <th>Next run</th>
              <th>Last run</th>
            </tr>
          </thead>
          <tbody>
            {schedules.map((s) => (
              <tr key={s.id} class={s.id === selectedId ? 'selected' : undefined} data-testid={`schedule-row-${s.name}`}>
                <td>
                  <button
                    type="button"
                    class="link"
                    onClick={() => setSelectedId(s.id === selectedId ? null : s.id)}
                    aria-expanded={s.id === selectedId}
                  >
                    {s.name}
                  </button>
                  {!s.enabled && <span class="badge">disabled</span>}
                </td>
                <td>
                  {s.vm_id ? <a href={`#/vms/${s.vm_id}`}>{vmNames.get(s.vm_id) ?? s.vm_id.slice(-8)}</a> : <code>{s.selector}</code>}
                </td>
                <td>
                  <code>{s.cron}</code> <span class="muted">{s.timezone}</span>
                </td>
                <td>{retentionText(s.retention)}</td>
                <td>{s.next_run_at ? when(s.next_run_at, s.timezone) : '—'}</td>
                <td>
                  {s.last_run ? <Status value={s.last_run.status} /> : <span class="muted">never</span>}{' '}
                  {s.last_run && <span class="muted">{age(s.last_run.at)}</span>}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {selected && (
        <ScheduleDetail key={selected.id} schedule={selected} vmNames={vmNames} changes={changes} onGone={() => setSelectedId(null)} />
      )}
      {creating && <CreateSchedule vmNames={vmNames} onClose={() => setCreating(false)} />}
    </section>
  );
}

function ScheduleDetail(props: { schedule: Schedule; vmNames: Map<string, string>; changes: number; onGone: () => void }) {
  const s = props.schedule;
  const path = { params: { path: { id: s.id } } };
  const snapshotChanges = useChanges((e) => e.type.startsWith('snapshot.'));
  const preview = useLoad(() => must(api.GET('/v1/schedules/{id}/preview', path)), [s.id, props.changes, snapshotChanges]);
  const runs = useLoad(
    () => must(api.GET('/v1/schedules/{id}/runs', { params: { path: { id: s.id }, query: { limit: 20 } } })),
    [s.id, props.changes],
  );
  const action = useAction();
  const [deleting, setDeleting] = useState(false);
  return (
    <article class="card" data-testid="schedule-detail">
      <div class="page-head">
        <h2>{s.name}</h2>
        <div class="actions">
          <ActionButton
            operation="POST /v1/schedules/{id}/run"
            onClick={() => action.run(() => must(api.POST('/v1/schedules/{id}/run', path)))}
          >
            Run now
          </ActionButton>
          <ActionButton
            operation="PATCH /v1/schedules/{id}"
            onClick={() => action.run(() => must(api.PATCH('/v1/schedules/{id}', { ...path, body: { enabled: !s.enabled } })))}
          >
            {s.enabled ? 'Disable' : 'Enable'}
          </ActionButton>
          <ActionButton operation="DELETE /v1/schedules/{id}" danger onClick={() => setDeleting(true)}>
            Delete
          </ActionButton>
        </div>
      </div>
      <ProblemBox error={action.error} onClose={action.clear} />
      <h3>Next runs ({s.timezone})</h3>
      {preview.data ? (
        preview.data.next_runs.length === 0 ? (
          <p class="muted">None: the schedule is disabled.</p>
        ) : (
          <ol class="next-runs" data-testid="next-runs">
            {preview.data.next_runs.map((t) => (
              <li key={t}>
                {when(t, s.timezone)} <span class="muted">{t}</span>
              </li>
            ))}
          </ol>
        )
      ) : (
        <Loading error={preview.error} />
      )}
      <h3>Retention now: {retentionText(s.retention)}</h3>
      {preview.data && (
        <>
          <p>
            Keeps {preview.data.keep_count}, prunes {preview.data.prune_count}{' '}
            <span class="muted">(evaluated {when(preview.data.evaluated_at)})</span>
          </p>
          <div class="table-wrap">
            <table class="list" data-testid="retention-preview">
              <thead>
                <tr>
                  <th>Snapshot</th>
                  <th>VM</th>
                  <th>Taken</th>
                  <th>Decision</th>
                  <th>Why</th>
                </tr>
              </thead>
              <tbody>
                {preview.data.items.map((item) => (
                  <tr key={item.snapshot_id} class={`decision-${item.action}`} data-testid={`preview-${item.snapshot_name}`}>
                    <td>{item.snapshot_name}</td>
                    <td>
                      <a href={`#/vms/${item.vm_id}`}>{props.vmNames.get(item.vm_id) ?? item.vm_id.slice(-8)}</a>
                    </td>
                    <td>{when(item.created_at, s.timezone)}</td>
                    <td>
                      <span class={`badge decision-${item.action}`}>{item.action}</span>
                    </td>
                    <td>
                      {item.action === 'keep' ? item.keep_reasons.join(', ') : item.prune_reason?.replace('_', ' ')}
                      {item.held && (
                        <div class="muted">
                          held now: {item.held.code} ({item.held.reason})
                        </div>
                      )}
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </>
      )}
      <h3>Runs</h3>
      {runs.data ? (
        runs.data.items.length === 0 ? (
          <p class="muted">No runs yet.</p>
        ) : (
          <ul class="runs">
            {runs.data.items.map((run) => (
              <li key={run.id}>
                <Status value={run.status} /> {run.trigger} · {when(run.started_at, s.timezone)} · {run.targets.length} VM
                {run.targets.length === 1 ? '' : 's'}
                {run.reason && <span class="muted"> · {run.reason}</span>}
              </li>
            ))}
          </ul>
        )
      ) : (
        <Loading error={runs.error} />
      )}
      {deleting && (
        <Confirm
          title={`Delete schedule ${s.name}?`}
          confirmLabel="Delete schedule"
          danger
          onClose={() => setDeleting(false)}
          onConfirm={() => must(api.DELETE('/v1/schedules/{id}', path)).then(props.onGone)}
        >
          <p>
            <strong>Lost:</strong> the schedule and its run history. The snapshots it took stay; no retention prunes them any more.
          </p>
        </Confirm>
      )}
    </article>
  );
}

function CreateSchedule({ vmNames, onClose }: { vmNames: Map<string, string>; onClose: () => void }) {
  const [name, setName] = useState('');
  const [vmId, setVmId] = useState('');
  const [cron, setCron] = useState('0 3 * * *');
  const [timezone, setTimezone] = useState(Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC');
  const [keepLast, setKeepLast] = useState('3');
  const [keepDaily, setKeepDaily] = useState('7');
  const count = (text: string) => (text.trim() === '' ? null : Number(text));
  const create = () =>
    must(
      api.POST('/v1/schedules', {
        body: { name, vm_id: vmId || null, cron, timezone, retention: { keep_last: count(keepLast), keep_daily: count(keepDaily) } },
      }),
    );
  return (
    <FormDialog title="New schedule" submitLabel="Create" onClose={onClose} onSubmit={create}>
      <label>
        Name <input required value={name} onInput={(e) => setName(e.currentTarget.value)} />
      </label>
      <label>
        VM
        <select required value={vmId} onChange={(e) => setVmId(e.currentTarget.value)}>
          <option value="">Choose a VM</option>
          {[...vmNames].map(([id, n]) => (
            <option key={id} value={id}>
              {n}
            </option>
          ))}
        </select>
      </label>
      <label>
        Cron <input required value={cron} onInput={(e) => setCron(e.currentTarget.value)} />
      </label>
      <label>
        Time zone <input required value={timezone} onInput={(e) => setTimezone(e.currentTarget.value)} />
      </label>
      <label>
        Keep the last <input type="number" min="0" value={keepLast} onInput={(e) => setKeepLast(e.currentTarget.value)} />
      </label>
      <label>
        Keep one a day for <input type="number" min="0" value={keepDaily} onInput={(e) => setKeepDaily(e.currentTarget.value)} /> days
      </label>
    </FormDialog>
  );
}
