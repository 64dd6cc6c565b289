// The VM list: name, state, status, disks, snapshots, size on disk and labels, with a
// filter by name or label, and a form to create a VM.
import { useEffect, useState } from 'preact/hooks';
import { api, must, type Vm } from '../api/client';
import { ActionButton, FormDialog, Loading, Status } from '../components/ui';
import { bytes } from '../format';
import { applied, subscribe, useLoad } from '../state';

/** Every VM, a thousand a page. */
export async function allVms(): Promise<Vm[]> {
  const vms: Vm[] = [];
  let cursor: string | undefined;
  do {
    const page = await must(api.GET('/v1/vms', { params: { query: { limit: 1000, cursor } } }));
    vms.push(...page.items);
    cursor = page.next_cursor ?? undefined;
  } while (cursor);
  return vms;
}

/** Bytes the VM's own layers take (layers shared with a template or another VM's
 * snapshot are counted there). */
export const sizeOnDisk = (vm: Vm) =>
  vm.disks.reduce((sum, disk) => sum + disk.chain.filter((l) => l.role !== 'shared').reduce((s, l) => s + l.allocated_bytes, 0), 0);

/** `name` matches names containing it; `key=value` matches that label. */
export function matches(vm: Vm, filter: string): boolean {
  const text = filter.trim().toLowerCase();
  if (!text) return true;
  const [key, value] = text.split('=', 2);
  if (value !== undefined) {
    return Object.entries(vm.labels).some(([k, v]) => k.toLowerCase() === key && v.toLowerCase() === value);
  }
  return vm.name.toLowerCase().includes(text) || Object.entries(vm.labels).some(([k, v]) => `${k}=${v}`.includes(text));
}

/** The VMs, loaded once and then kept up to date from the events: a `vm.*` event
 * carries the VM's whole view (a change to a disk is also its VM's `vm.updated`), so a
 * fleet's list is not fetched again for every change. Loaded again after a reset. */
function useFleet() {
  const [resets, setResets] = useState(0);
  const loaded = useLoad(allVms, [resets]);
  const [vms, setVms] = useState<Map<string, Vm> | null>(null);
  useEffect(() => {
    if (loaded.data) setVms(new Map(loaded.data.map((vm) => [vm.id, vm])));
  }, [loaded.data]);
  useEffect(
    () =>
      subscribe((event) => {
        if (event === null) return setResets((n) => n + 1);
        if (!event.type.startsWith('vm.')) return;
        setVms((previous) => previous && applied(previous, event));
      }),
    [],
  );
  return { vms, error: loaded.error };
}

export function VmList() {
  const fleet = useFleet();
  const [filter, setFilter] = useState('');
  const [creating, setCreating] = useState(false);
  if (!fleet.vms) return <Loading error={fleet.error} />;
  const all = [...fleet.vms.values()].sort((a, b) => a.name.localeCompare(b.name));
  const shown = all.filter((vm) => matches(vm, filter));
  return (
    <section>
      <div class="page-head">
        <h1>Virtual machines</h1>
        <ActionButton operation="POST /v1/vms" onClick={() => setCreating(true)} testId="new-vm">
          New VM
        </ActionButton>
      </div>
      <label class="filter">
        <span class="visually-hidden">Filter</span>
        <input
          type="search"
          placeholder="Filter by name or label (key=value)"
          value={filter}
          onInput={(e) => setFilter(e.currentTarget.value)}
          data-testid="vm-filter"
        />
      </label>
      <div class="table-wrap">
        <table class="list" data-testid="vm-list">
          <thead>
            <tr>
              <th>Name</th>
              <th>State</th>
              <th>Status</th>
              <th class="num">Disks</th>
              <th class="num">Snapshots</th>
              <th class="num">Size on disk</th>
              <th>Labels</th>
            </tr>
          </thead>
          <tbody>
            {shown.map((vm) => (
              <tr key={vm.id} data-testid={`vm-row-${vm.name}`}>
                <td>
                  <a href={`#/vms/${vm.id}`}>{vm.name}</a>
                </td>
                <td>
                  <span class={`badge state-${vm.state}`}>{vm.state}</span>
                </td>
                <td>
                  <Status value={vm.status} />
                </td>
                <td class="num">{vm.disks.length}</td>
                <td class="num">{vm.snapshot_count}</td>
                <td class="num">{bytes(sizeOnDisk(vm))}</td>
                <td>
                  {Object.entries(vm.labels).map(([k, v]) => (
                    <button type="button" class="chip" key={k} onClick={() => setFilter(`${k}=${v}`)} title="Show VMs with this label">
                      {k}={v}
                    </button>
                  ))}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {shown.length === 0 && <p class="muted">{all.length === 0 ? 'No VMs yet.' : 'No VM matches the filter.'}</p>}
      {creating && <CreateVm onClose={() => setCreating(false)} />}
    </section>
  );
}

function CreateVm({ onClose }: { onClose: () => void }) {
  const [name, setName] = useState('');
  const [gib, setGib] = useState('10');
  const create = () => {
    // A disk's size is a multiple of 512 bytes.
    const size = Math.round((Number(gib) * 1024 ** 3) / 512) * 512;
    return must(api.POST('/v1/vms', { body: { name, description: '', labels: {}, disks: [{ name: 'root', size_bytes: size }] } }));
  };
  return (
    <FormDialog title="New VM" submitLabel="Create" onClose={onClose} onSubmit={create}>
      <label>
        Name <input required value={name} onInput={(e) => setName(e.currentTarget.value)} />
      </label>
      <label>
        Disk size (GiB) <input type="number" min="0.001" step="any" required value={gib} onInput={(e) => setGib(e.currentTarget.value)} />
      </label>
    </FormDialog>
  );
}
