// A VM's name where a view gives only its id (a job's VM, a template's linked VMs, a
// VM's linked clones), fetched once per id and shared by every place that shows it.
import { useEffect, useState } from 'preact/hooks';
import { api, must } from '../api/client';
import { shortId } from '../format';

const names = new Map<string, Promise<string | null>>();

function nameOf(id: string): Promise<string | null> {
  let found = names.get(id);
  if (!found) {
    // A VM deleted since (or a template) keeps its short id.
    found = must(api.GET('/v1/vms/{id}', { params: { path: { id } } })).then(
      (vm) => vm.name,
      () => null,
    );
    names.set(id, found);
  }
  return found;
}

/** A link to the VM, named once its name is known. */
export function VmLink({ id, class: className }: { id: string; class?: string }) {
  const [name, setName] = useState<string | null>(null);
  useEffect(() => {
    let current = true;
    void nameOf(id).then((n) => current && setName(n));
    return () => {
      current = false;
    };
  }, [id]);
  return (
    <a href={`#/vms/${id}`} class={className} title={id}>
      {name ?? shortId(id)}
    </a>
  );
}
