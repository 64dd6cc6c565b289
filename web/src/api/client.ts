// The typed API client: every call goes through the public API with the types
// openapi-typescript generates from openapi/openapi.json (schema.d.ts), so a change
// of the API breaks the dashboard's build, not its users.
import createClient from 'openapi-fetch';
import type { components, paths } from './schema';
import { requiredScope, type Operation } from './scopes.gen';

export type Schemas = components['schemas'];
export type Vm = Schemas['VmView'];
export type Disk = Schemas['DiskView'];
export type Snapshot = Schemas['SnapshotView'];
export type Job = Schemas['JobView'];
export type Template = Schemas['TemplateView'];
export type Schedule = Schemas['ScheduleView'];
export type Run = Schemas['RunView'];
export type Preview = Schemas['Preview'];
/** A problem document; `code` is widened so that the dashboard's own (`unreachable`)
 * fits beside the API's. */
export type Problem = Omit<Schemas['Problem'], 'code'> & { code: string };
export type Scope = Schemas['Scope'];
export type WhoAmI = Schemas['WhoAmI'];

const TOKEN_KEY = 'strata.token';

/** The token is kept for this tab only (sessionStorage), never in a cookie. */
export const token = {
  get(): string | null {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set(value: string | null) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
};

/** Listeners told when the API refuses for want of a (valid) token. */
const unauthorizedListeners = new Set<() => void>();
export function onUnauthorized(listener: () => void): () => void {
  unauthorizedListeners.add(listener);
  return () => unauthorizedListeners.delete(listener);
}

export function authorization(): Record<string, string> {
  const value = token.get();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

export const api = createClient<paths>({ baseUrl: window.location.origin });
api.use({
  onRequest({ request }) {
    for (const [name, value] of Object.entries(authorization())) request.headers.set(name, value);
    return request;
  },
  onResponse({ response }) {
    if (response.status === 401) unauthorizedListeners.forEach((l) => l());
    return response;
  },
});

/** A refusal of the API: its RFC 9457 problem document. */
export class ProblemError extends Error {
  constructor(readonly problem: Problem) {
    super(`${problem.title}: ${problem.detail}`);
  }
}

/** The answer's body, or a ProblemError with the API's problem (or a made-up one when
 * the answer was not a problem document, e.g. the service is unreachable). */
export async function must<T>(call: Promise<{ data?: T; error?: unknown; response: Response }>): Promise<T> {
  let result;
  try {
    result = await call;
  } catch (e) {
    throw new ProblemError({
      type: 'about:blank',
      title: 'strata is unreachable',
      status: 0,
      code: 'unreachable',
      detail: String(e),
    });
  }
  if (result.error !== undefined || !result.response.ok) {
    const error = result.error as Partial<Problem> | undefined;
    throw new ProblemError({
      type: error?.type ?? 'about:blank',
      title: error?.title ?? result.response.statusText,
      status: result.response.status,
      code: error?.code ?? 'unexpected',
      detail: error?.detail ?? `HTTP ${result.response.status}`,
      ...error,
    });
  }
  return result.data as T;
}

const RANK: Record<Scope, number> = { read: 0, operate: 1, admin: 2 };

/** Why the caller may not do `operation`, or null when it may. */
export function refusalReason(who: WhoAmI | null, operation: Operation): string | null {
  const needed = requiredScope[operation];
  if (!who) return null;
  if (RANK[who.scope] >= RANK[needed]) return null;
  return `needs the ${needed} scope; this token (${who.name ?? 'anonymous'}) has ${who.scope}`;
}
