// What the pages share: the caller's identity and the events of the stream, to which
// each page subscribes so that it reloads what it shows when that changes.
import { createContext } from 'preact';
import { useContext, useEffect, useRef, useState } from 'preact/hooks';
import type { WhoAmI } from './api/client';
import type { StrataEvent, StreamState } from './api/events';

type Listener = (event: StrataEvent | null) => void;
const listeners = new Set<Listener>();

/** Hands an event (or null for a reset: reload everything) to every subscriber. */
export function publish(event: StrataEvent | null) {
  listeners.forEach((listener) => listener(event));
}

export function subscribe(listener: Listener): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/** `views` with an event of their kind applied: its data is the resource's view, or
 * `{id}` for `<kind>.deleted`. */
export function applied<T>(views: Map<string, T>, event: StrataEvent): Map<string, T> {
  const next = new Map(views);
  const id = String(event.data.id);
  if (event.type.endsWith('.deleted')) next.delete(id);
  else next.set(id, event.data as unknown as T);
  return next;
}

export interface Session {
  who: WhoAmI | null;
  stream: StreamState;
}

export const SessionContext = createContext<Session>({ who: null, stream: 'connecting' });
export const useSession = () => useContext(SessionContext);

/** A number that moves when events matching `match` arrive (or on a reset), a few
 * coalesced into one, so that a page reloads once per burst of changes. */
export function useChanges(match: (event: StrataEvent) => boolean): number {
  const [tick, setTick] = useState(0);
  const matchRef = useRef(match);
  matchRef.current = match;
  useEffect(() => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const unsubscribe = subscribe((event) => {
      if (event && !matchRef.current(event)) return;
      if (timer === undefined) {
        timer = setTimeout(() => {
          timer = undefined;
          setTick((t) => t + 1);
        }, 120);
      }
    });
    return () => {
      unsubscribe();
      if (timer !== undefined) clearTimeout(timer);
    };
  }, []);
  return tick;
}

export interface Loaded<T> {
  data: T | undefined;
  error: unknown;
  reload: () => void;
}

/** Loads `load()` when `deps` change; keeps the last data shown while it reloads. */
export function useLoad<T>(load: () => Promise<T>, deps: unknown[]): Loaded<T> {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<unknown>(null);
  const [again, setAgain] = useState(0);
  useEffect(() => {
    let current = true;
    load().then(
      (value) => {
        if (!current) return;
        setData(value);
        setError(null);
      },
      (e) => current && setError(e),
    );
    return () => {
      current = false;
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [...deps, again]);
  return { data, error, reload: () => setAgain((n) => n + 1) };
}
