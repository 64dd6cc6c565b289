// Templates: deploy N linked or full VMs, download each disk's export with the
// manifest's digest beside it, convert back to a VM, delete.
import { useState } from 'preact/hooks';
import { api, must, type Template } from '../api/client';
import { VmLink } from '../components/VmName';
import { ActionButton, Confirm, Dialog, FormDialog, Loading, ProblemBox, Status, useAction } from '../components/ui';
import { bytes, when } from '../format';
import { useChanges, useLoad } from '../state';

type Asking = { kind: 'deploy' | 'delete' | 'to-vm' | 'export'; template: Template };

export function Templates() {
  const changes = useChanges((e) => e.type.startsWith('template.'));
  const templates = useLoad(() => must(api.GET('/v1/templates', { params: { query: { limit: 1000 } } })), [changes]);
  const [asking, setAsking] = useState<Asking | null>(null);
  if (!templates.data) return <Loading error={templates.error} />;
  const close = () => setAsking(null);
  return (
    <section>
      <div class="page-head">
        <h1>Templates</h1>
      </div>
      {templates.data.items.length === 0 && (
        <p class="muted">No templates yet. Convert a stopped VM without snapshots into one from its page.</p>
      )}
      <div class="cards">
        {templates.data.items.map((t) => (
          <article class="card" key={t.id} data-testid={`template-${t.name}`}>
            <div class="page-head">
              <h2>{t.name}</h2>
              <Status value={t.status} />
            </div>
            {t.description && <p>{t.description}</p>}
            <dl class="facts">
              <dt>Disks</dt>
              <dd>
                {t.disks.map((d) => (
                  <div key={d.id}>
                    {d.name}: {bytes(d.size_bytes)} ({bytes(d.allocated_bytes)} on disk)
                  </div>
                ))}
              </dd>
              <dt>Linked VMs</dt>
              <dd>{t.linked_vm_count === 0 ? 'none' : t.linked_vm_ids.map((id) => <VmLink key={id} id={id} class="chip" />)}</dd>
              <dt>Created</dt>
              <dd>{when(t.created_at)}</dd>
            </dl>
            <div class="actions">
              <ActionButton
                operation="POST /v1/templates/{id}/deploy"
                onClick={() => setAsking({ kind: 'deploy', template: t })}
                testId="deploy"
              >
                Deploy
              </ActionButton>
              <ActionButton operation="GET /v1/templates/{id}/export" onClick={() => setAsking({ kind: 'export', template: t })}>
                Export
              </ActionButton>
              <ActionButton operation="POST /v1/templates/{id}/convert-to-vm" onClick={() => setAsking({ kind: 'to-vm', template: t })}>
                Convert to VM
              </ActionButton>
              <ActionButton operation="DELETE /v1/templates/{id}" danger onClick={() => setAsking({ kind: 'delete', template: t })}>
                Delete
              </ActionButton>
            </div>
          </article>
        ))}
      </div>
      {asking?.kind === 'deploy' && <DeployDialog template={asking.template} onClose={close} />}
      {asking?.kind === 'export' && <ExportDialog template={asking.template} onClose={close} />}
      {asking?.kind === 'to-vm' && (
        <Confirm
          title={`Convert ${asking.template.name} to a VM?`}
          confirmLabel="Convert"
          onClose={close}
          onConfirm={() => must(api.POST('/v1/templates/{id}/convert-to-vm', { params: { path: { id: asking.template.id } } }))}
        >
          <p>The template becomes a VM again; it needs to have no VMs deployed from it as linked clones.</p>
        </Confirm>
      )}
      {asking?.kind === 'delete' && (
        <Confirm
          title={`Delete template ${asking.template.name}?`}
          confirmLabel="Delete template"
          danger
          onClose={close}
          onConfirm={() => must(api.DELETE('/v1/templates/{id}', { params: { path: { id: asking.template.id } } }))}
        >
          <p>
            <strong>Lost:</strong> its {asking.template.disks.length} disk image{asking.template.disks.length === 1 ? '' : 's'} (
            {bytes(asking.template.disks.reduce((s, d) => s + d.allocated_bytes, 0))}). VMs deployed as full copies keep working.
          </p>
        </Confirm>
      )}
    </section>
  );
}

function DeployDialog({ template, onClose }: { template: Template; onClose: () => void }) {
  const [name, setName] = useState(`${template.name}-vm`);
  const [count, setCount] = useState('1');
  const [mode, setMode] = useState<'linked' | 'full'>('linked');
  return (
    <FormDialog
      title={`Deploy ${template.name}`}
      submitLabel="Deploy"
      onClose={onClose}
      testId="deploy-dialog"
      onSubmit={() =>
        must(
          api.POST('/v1/templates/{id}/deploy', {
            params: { path: { id: template.id } },
            body: { name, mode, count: Number(count) },
          }),
        )
      }
    >
      <label>
        Name (with several, each gets a number) <input required name="name" value={name} onInput={(e) => setName(e.currentTarget.value)} />
      </label>
      <label>
        How many{' '}
        <input type="number" min="1" max="100" required name="count" value={count} onInput={(e) => setCount(e.currentTarget.value)} />
      </label>
      <fieldset>
        <legend>Mode</legend>
        <label class="inline">
          <input type="radio" name="mode" checked={mode === 'linked'} onChange={() => setMode('linked')} /> Linked (instant; reads the
          template)
        </label>
        <label class="inline">
          <input type="radio" name="mode" checked={mode === 'full'} onChange={() => setMode('full')} /> Full (standalone copies)
        </label>
      </fieldset>
    </FormDialog>
  );
}

/** Each disk's download with its SHA-256 from the manifest. The link carries a
 * one-use ticket, not the token: a browser's download cannot send a header. */
function ExportDialog({ template, onClose }: { template: Template; onClose: () => void }) {
  const manifest = useLoad(() => must(api.GET('/v1/templates/{id}/manifest', { params: { path: { id: template.id } } })), [template.id]);
  const action = useAction();
  const download = (disk: string) =>
    action.run(async () => {
      const ticket = await must(api.POST('/v1/tickets'));
      const url = `/v1/templates/${template.id}/export?disk=${encodeURIComponent(disk)}&ticket=${encodeURIComponent(ticket.ticket)}`;
      const link = document.createElement('a');
      link.href = url;
      link.download = '';
      link.click();
    });
  return (
    <Dialog title={`Export ${template.name}`} onClose={onClose} testId="export-dialog">
      {!manifest.data && <Loading error={manifest.error} />}
      {manifest.data && (
        <ul class="layers">
          {manifest.data.disks.map((d) => (
            <li key={d.id}>
              <button type="button" onClick={() => download(d.name)}>
                Download {d.name} ({bytes(d.export_bytes)}, {manifest.data!.format})
              </button>
              <div class="path" data-testid="digest">
                sha256 {d.sha256}
              </div>
            </li>
          ))}
        </ul>
      )}
      <ProblemBox error={action.error} />
      <div class="dialog-actions">
        <button type="button" onClick={onClose}>
          Close
        </button>
      </div>
    </Dialog>
  );
}
