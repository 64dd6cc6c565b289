// One VM: its disks and their chains, its snapshot tree as a picture, and the actions
// on the VM and on the snapshot chosen in the tree.
import { useState } from 'preact/hooks';
import { api, must, type Schemas, type Snapshot, type Vm } from '../api/client';
import { SnapshotTree } from '../components/SnapshotTree';
import { VmLink } from '../components/VmName';
import { ActionButton, Confirm, FormDialog, Loading, Status } from '../components/ui';
import { age, bytes, when } from '../format';
import { useChanges, useLoad } from '../state';
import { sizeOnDisk } from './VmList';

type Tree = Schemas['SnapshotTree'];

async function loadVm(id: string) {
  const [vm, listing, schedules] = await Promise.all([
    must(api.GET('/v1/vms/{id}', { params: { path: { id } } })),
    must(api.GET('/v1/vms/{id}/snapshots', { params: { path: { id }, query: { view: 'tree' } } })),
    must(api.GET('/v1/schedules', { params: { query: { limit: 1000 } } })),
  ]);
  const tree = listing as Tree;
  const scheduleNames = new Map(schedules.items.map((s) => [s.id, s.name]));
  return { vm, tree, scheduleNames };
}

/** Every snapshot of the tree, by id. */
function flatten(tree: Tree): Map<string, Snapshot> {
  const all = new Map<string, Snapshot>();
  const walk = (nodes: Schemas['SnapshotNode'][]) =>
    nodes.forEach((n) => {
      all.set(n.id, n);
      walk((n as { children: Schemas['SnapshotNode'][] }).children);
    });
  walk(tree.roots);
  return all;
}

type Asking =
  | { kind: 'snapshot' }
  | { kind: 'clone'; from: Snapshot | null }
  | { kind: 'revert' | 'delete-snapshot'; snapshot: Snapshot }
  | { kind: 'delete-vm' | 'to-template' };

export function VmPage({ id }: { id: string }) {
  // A job's own events are left out: what a job changes comes as the VM's, its disks'
  // and its snapshots' events, and a running copy's progress would reload the page
  // every second.
  const changes = useChanges(
    (e) => !e.type.startsWith('job.') && (e.data.vm_id === id || e.data.id === id || e.type.startsWith('schedule.')),
  );
  const loaded = useLoad(() => loadVm(id), [id, changes]);
  const [selectedId, setSelectedId] = useState<string | null>(null);
  const [asking, setAsking] = useState<Asking | null>(null);
  if (!loaded.data) return <Loading error={loaded.error} />;
  const { vm, tree, scheduleNames } = loaded.data;
  const snapshots = flatten(tree);
  const selected = selectedId ? (snapshots.get(selectedId) ?? null) : null;
  const close = () => setAsking(null);
  return (
    <section>
      <p class="crumbs">
        <a href="#/">Virtual machines</a> /
      </p>
      <div class="title">
        <h1 data-testid="vm-name">{vm.name}</h1>
        <span class={`badge state-${vm.state}`}>{vm.state}</span> <Status value={vm.status} />
      </div>
      {vm.description && <p>{vm.description}</p>}
      <dl class="facts">
        <dt>Size on disk</dt>
        <dd>{bytes(sizeOnDisk(vm))}</dd>
        <dt>Snapshots</dt>
        <dd>{vm.snapshot_count}</dd>
        <dt>Created</dt>
        <dd>{when(vm.created_at)}</dd>
        {vm.source_vm_id && (
          <>
            <dt>Cloned from</dt>
            <dd>
              <VmLink id={vm.source_vm_id} />
            </dd>
          </>
        )}
        {vm.template_id && (
          <>
            <dt>Deployed from</dt>
            <dd>
              <a href={`#/templates`}>template {vm.template_id.slice(-8)}</a>
            </dd>
          </>
        )}
        {vm.dependent_vm_ids.length > 0 && (
          <>
            <dt>Linked clones</dt>
            <dd>
              {vm.dependent_vm_ids.map((d) => (
                <VmLink key={d} id={d} class="chip" />
              ))}
            </dd>
          </>
        )}
        {Object.keys(vm.labels).length > 0 && (
          <>
            <dt>Labels</dt>
            <dd>
              {Object.entries(vm.labels).map(([k, v]) => (
                <span class="chip" key={k}>
                  {k}={v}
                </span>
              ))}
            </dd>
          </>
        )}
      </dl>
      <div class="actions">
        <ActionButton operation="POST /v1/vms/{id}/snapshots" onClick={() => setAsking({ kind: 'snapshot' })} testId="take-snapshot">
          Take snapshot
        </ActionButton>
        <ActionButton operation="POST /v1/vms/{id}/clone" onClick={() => setAsking({ kind: 'clone', from: null })}>
          Clone
        </ActionButton>
        <ActionButton operation="POST /v1/vms/{id}/convert-to-template" onClick={() => setAsking({ kind: 'to-template' })}>
          Convert to template
        </ActionButton>
        <ActionButton operation="DELETE /v1/vms/{id}" danger onClick={() => setAsking({ kind: 'delete-vm' })}>
          Delete VM
        </ActionButton>
      </div>

      <div class="vm-columns">
        <div>
          <h2>Snapshots</h2>
          {snapshots.size === 0 && <p class="muted">No snapshots yet.</p>}
          <SnapshotTree
            roots={tree.roots as never}
            currentId={tree.current_snapshot_id ?? null}
            selectedId={selectedId}
            onSelect={(s) => setSelectedId(s.id === selectedId ? null : s.id)}
            scheduleNames={scheduleNames}
          />
        </div>
        {selected && (
          <SnapshotPanel
            vm={vm}
            snapshot={selected}
            scheduleName={selected.schedule_id ? scheduleNames.get(selected.schedule_id) : undefined}
            onAsk={setAsking}
            onClose={() => setSelectedId(null)}
          />
        )}
      </div>

      <h2>Disks</h2>
      {vm.disks.map((disk) => (
        <div class="disk" key={disk.id} data-testid={`disk-${disk.name}`}>
          <h3>
            {disk.name}{' '}
            <span class="muted">
              {bytes(disk.size_bytes)} · {disk.format}
            </span>{' '}
            <Status value={disk.status} />
          </h3>
          <div class="table-wrap">
            <table class="list chain">
              <thead>
                <tr>
                  <th>Layer</th>
                  <th>Role</th>
                  <th class="num">On disk</th>
                  <th>File</th>
                </tr>
              </thead>
              <tbody>
                {disk.chain.map((layer) => (
                  <tr key={layer.volume_id}>
                    <td>
                      {layer.snapshot_id
                        ? (snapshots.get(layer.snapshot_id)?.name ?? 'another VM’s snapshot')
                        : layer.role === 'active'
                          ? 'present state'
                          : 'base'}
                    </td>
                    <td>{layer.role}</td>
                    <td class="num">{bytes(layer.allocated_bytes)}</td>
                    <td class="path">{layer.path}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </div>
      ))}
      {asking && <AskDialog vm={vm} asking={asking} onClose={close} />}
    </section>
  );
}

function SnapshotPanel(props: {
  vm: Vm;
  snapshot: Snapshot;
  scheduleName: string | undefined;
  onAsk: (asking: Asking) => void;
  onClose: () => void;
}) {
  const { snapshot: s, vm } = props;
  const diskName = (id: string) => vm.disks.find((d) => d.id === id)?.name ?? 'a deleted disk';
  return (
    <aside class="snapshot-panel" aria-label={`Snapshot ${s.name}`} data-testid="snapshot-panel">
      <div class="page-head">
        <h3>{s.name}</h3>
        <button type="button" class="link" onClick={props.onClose} aria-label="Close">
          ✕
        </button>
      </div>
      {s.description && <p>{s.description}</p>}
      <dl class="facts">
        <dt>Taken</dt>
        <dd title={s.created_at}>
          {when(s.created_at)} ({age(s.created_at)})
        </dd>
        <dt>Consistency</dt>
        <dd>{s.consistency}</dd>
        <dt>Status</dt>
        <dd>
          <Status value={s.status} />
          {s.is_current && ' · current'}
        </dd>
        {props.scheduleName && (
          <>
            <dt>Schedule</dt>
            <dd>
              <a href="#/schedules">{props.scheduleName}</a>
            </dd>
          </>
        )}
        {s.hold && (
          <>
            <dt>Hold</dt>
            <dd>retention never prunes it</dd>
          </>
        )}
        {s.expires_at && (
          <>
            <dt>Expires</dt>
            <dd>{when(s.expires_at)}</dd>
          </>
        )}
      </dl>
      <h4>Layers</h4>
      <ul class="layers">
        {s.volumes.map((v) => (
          <li key={v.volume_id}>
            <strong>{diskName(v.disk_id)}</strong> {bytes(v.allocated_bytes)} <span class="path">{v.path}</span>
          </li>
        ))}
      </ul>
      <div class="actions">
        <ActionButton
          operation="POST /v1/snapshots/{id}/revert"
          onClick={() => props.onAsk({ kind: 'revert', snapshot: s })}
          testId="revert"
        >
          Revert
        </ActionButton>
        <ActionButton operation="POST /v1/vms/{id}/clone" onClick={() => props.onAsk({ kind: 'clone', from: s })} testId="clone-from">
          Clone from here
        </ActionButton>
        <ActionButton
          operation="DELETE /v1/snapshots/{id}"
          danger
          onClick={() => props.onAsk({ kind: 'delete-snapshot', snapshot: s })}
          testId="delete-snapshot"
        >
          Delete
        </ActionButton>
      </div>
    </aside>
  );
}

function AskDialog({ vm, asking, onClose }: { vm: Vm; asking: Asking; onClose: () => void }) {
  const vmPath = { params: { path: { id: vm.id } } };
  switch (asking.kind) {
    case 'snapshot':
      return <SnapshotDialog vm={vm} onClose={onClose} />;
    case 'clone':
      return <CloneDialog vm={vm} from={asking.from} onClose={onClose} />;
    case 'revert':
      return (
        <Confirm
          title={`Revert ${vm.name} to ${asking.snapshot.name}?`}
          confirmLabel="Revert"
          danger
          onClose={onClose}
          onConfirm={() => must(api.POST('/v1/snapshots/{id}/revert', { params: { path: { id: asking.snapshot.id } } }))}
        >
          <p>
            The disks go back to what they held when <strong>{asking.snapshot.name}</strong> was taken ({when(asking.snapshot.created_at)}).
          </p>
          <p>
            <strong>Lost:</strong> everything written to the disks since{' '}
            {vm.current_snapshot_id ? 'the current snapshot' : 'they were created'} that no snapshot holds. Take a snapshot first to keep it
            as a branch.
          </p>
        </Confirm>
      );
    case 'delete-snapshot':
      return (
        <Confirm
          title={`Delete snapshot ${asking.snapshot.name}?`}
          confirmLabel="Delete snapshot"
          danger
          onClose={onClose}
          onConfirm={() => must(api.DELETE('/v1/snapshots/{id}', { params: { path: { id: asking.snapshot.id } } }))}
        >
          <p>
            <strong>Lost:</strong> the restore point <strong>{asking.snapshot.name}</strong> ({when(asking.snapshot.created_at)}): you can
            no longer revert or clone from it.
          </p>
          <p>No data that another snapshot or the present state shows is lost: its layers are merged with their neighbours.</p>
        </Confirm>
      );
    case 'delete-vm':
      return (
        <Confirm
          title={`Delete VM ${vm.name}?`}
          confirmLabel="Delete VM"
          danger
          onClose={onClose}
          onConfirm={() => must(api.DELETE('/v1/vms/{id}', vmPath))}
        >
          <p>
            <strong>Lost:</strong> its {vm.disks.length} disk{vm.disks.length === 1 ? '' : 's'} (
            {vm.disks.map((d) => d.name).join(', ') || 'none'}) with all their data, and its {vm.snapshot_count} snapshot
            {vm.snapshot_count === 1 ? '' : 's'}.
          </p>
        </Confirm>
      );
    case 'to-template':
      return (
        <Confirm
          title={`Convert ${vm.name} to a template?`}
          confirmLabel="Convert"
          onClose={onClose}
          onConfirm={() => must(api.POST('/v1/vms/{id}/convert-to-template', vmPath))}
        >
          <p>The VM becomes a read-only template that VMs can be deployed from. It needs to have no snapshots and to be stopped.</p>
        </Confirm>
      );
  }
}

function SnapshotDialog({ vm, onClose }: { vm: Vm; onClose: () => void }) {
  const [name, setName] = useState('');
  const [description, setDescription] = useState('');
  return (
    <FormDialog
      title={`Snapshot ${vm.name}`}
      submitLabel="Take snapshot"
      onClose={onClose}
      testId="snapshot-dialog"
      onSubmit={() => must(api.POST('/v1/vms/{id}/snapshots', { params: { path: { id: vm.id } }, body: { name, description } }))}
    >
      <label>
        Name <input required name="name" value={name} onInput={(e) => setName(e.currentTarget.value)} />
      </label>
      <label>
        Description <input name="description" value={description} onInput={(e) => setDescription(e.currentTarget.value)} />
      </label>
    </FormDialog>
  );
}

function CloneDialog({ vm, from, onClose }: { vm: Vm; from: Snapshot | null; onClose: () => void }) {
  const [name, setName] = useState(`${vm.name}-clone`);
  const [mode, setMode] = useState<'linked' | 'full'>('linked');
  return (
    <FormDialog
      title={from ? `Clone ${vm.name} from ${from.name}` : `Clone ${vm.name}`}
      submitLabel="Clone"
      onClose={onClose}
      testId="clone-dialog"
      onSubmit={() =>
        must(
          api.POST('/v1/vms/{id}/clone', {
            params: { path: { id: vm.id } },
            body: { name, mode, snapshot_id: from?.id ?? null },
          }),
        )
      }
    >
      <label>
        Name of the new VM <input required name="name" value={name} onInput={(e) => setName(e.currentTarget.value)} />
      </label>
      <fieldset>
        <legend>Mode</legend>
        <label class="inline">
          <input type="radio" name="mode" checked={mode === 'linked'} onChange={() => setMode('linked')} /> Linked (shares the snapshot's
          layers, instant)
        </label>
        <label class="inline">
          <input type="radio" name="mode" checked={mode === 'full'} onChange={() => setMode('full')} /> Full (a standalone copy)
        </label>
      </fieldset>
    </FormDialog>
  );
}
