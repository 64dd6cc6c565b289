// Small pieces every page uses: buttons that know the scope an operation needs,
// problem messages, confirmation dialogs and progress bars.
import type { ComponentChildren } from 'preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import { ProblemError, refusalReason } from '../api/client';
import type { Operation } from '../api/scopes.gen';
import { useSession } from '../state';

/** A button for an API operation: disabled, with the reason, when the token's scope
 * does not allow it. */
export function ActionButton(props: {
  operation: Operation;
  onClick: () => void;
  children: ComponentChildren;
  danger?: boolean;
  busy?: boolean;
  testId?: string;
}) {
  const { who } = useSession();
  const refused = refusalReason(who, props.operation);
  return (
    <button
      type="button"
      class={props.danger ? 'danger' : undefined}
      disabled={refused !== null || props.busy}
      title={refused ?? undefined}
      aria-disabled={refused !== null}
      data-testid={props.testId}
      onClick={props.onClick}
    >
      {props.children}
      {refused && <span class="visually-hidden"> ({refused})</span>}
    </button>
  );
}

/** A refusal of the API, with its title, detail and what it names. */
export function ProblemBox({ error, onClose }: { error: unknown; onClose?: () => void }) {
  if (!error) return null;
  const problem =
    error instanceof ProblemError ? error.problem : { title: 'Something went wrong', detail: String(error), code: 'client_error' };
  const dependents = 'dependent_vms' in problem ? problem.dependent_vms : undefined;
  return (
    <div class="problem" role="alert" data-testid="problem">
      <div class="problem-head">
        <strong>{problem.title}</strong> <code>{problem.code}</code>
        {onClose && (
          <button type="button" class="link" onClick={onClose} aria-label="Dismiss">
            ✕
          </button>
        )}
      </div>
      <p>{problem.detail}</p>
      {dependents && dependents.length > 0 && (
        <p>
          Linked clones reading these files:{' '}
          {dependents.map((vm, i) => (
            <span key={vm.id}>
              {i > 0 && ', '}
              <a href={`#/vms/${vm.id}`}>{vm.name}</a>
            </span>
          ))}
        </p>
      )}
    </div>
  );
}

/** A modal dialog (the native <dialog>: focus moves into it, Escape closes it). */
export function Dialog(props: { title: string; onClose: () => void; children: ComponentChildren; testId?: string }) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    const dialog = ref.current;
    if (dialog && !dialog.open) dialog.showModal();
    return () => dialog?.close();
  }, []);
  return (
    <dialog ref={ref} class="dialog" onClose={props.onClose} aria-label={props.title} data-testid={props.testId}>
      <h2>{props.title}</h2>
      {props.children}
    </dialog>
  );
}

/** Runs an API call from a dialog: busy while it runs, its problem shown if refused,
 * closed when it succeeds. */
export function useAction() {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const run = async (call: () => Promise<unknown>, then?: () => void) => {
    setBusy(true);
    setError(null);
    try {
      await call();
      then?.();
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  };
  return { busy, error, run, clear: () => setError(null) };
}

/** A dialog with a form for an API call: Cancel, the submit button, and the problem
 * if the call is refused; closed when it succeeds. */
export function FormDialog(props: {
  title: string;
  submitLabel: string;
  onSubmit: () => Promise<unknown>;
  onClose: () => void;
  children: ComponentChildren;
  testId?: string;
}) {
  const action = useAction();
  return (
    <Dialog title={props.title} onClose={props.onClose} testId={props.testId}>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          void action.run(props.onSubmit, props.onClose);
        }}
      >
        {props.children}
        <ProblemBox error={action.error} />
        <div class="dialog-actions">
          <button type="button" onClick={props.onClose}>
            Cancel
          </button>
          <button type="submit" class="primary" disabled={action.busy}>
            {props.submitLabel}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

/** A yes/no question before something destructive, naming what will be lost. */
export function Confirm(props: {
  title: string;
  children: ComponentChildren;
  confirmLabel: string;
  onConfirm: () => Promise<unknown>;
  onClose: () => void;
  danger?: boolean;
}) {
  const action = useAction();
  return (
    <Dialog title={props.title} onClose={props.onClose} testId="confirm">
      <div class="dialog-body">{props.children}</div>
      <ProblemBox error={action.error} />
      <div class="dialog-actions">
        <button type="button" onClick={props.onClose}>
          Cancel
        </button>
        <button
          type="button"
          class={props.danger ? 'danger' : 'primary'}
          disabled={action.busy}
          onClick={() => action.run(props.onConfirm, props.onClose)}
        >
          {props.confirmLabel}
        </button>
      </div>
    </Dialog>
  );
}

export function ProgressBar({ value, label }: { value: number; label: string }) {
  return (
    <div class="progress" role="progressbar" aria-valuemin={0} aria-valuemax={100} aria-valuenow={value} aria-label={label}>
      <div class="progress-fill" style={{ width: `${Math.max(0, Math.min(100, value))}%` }} />
    </div>
  );
}

export function Status({ value }: { value: string }) {
  return <span class={`badge status-${value}`}>{value}</span>;
}

export function Loading({ error }: { error?: unknown }) {
  if (error) return <ProblemBox error={error} />;
  return <p class="muted">Loading…</p>;
}
