// A VM's snapshot tree drawn as a picture: one row per snapshot in tree order, a
// branch per column, and the present state ("you are here") hanging from the current
// snapshot. Each node is a keyboard-reachable button.
import type { Schemas, Snapshot } from '../api/client';
import { age, bytes } from '../format';

type Node = Schemas['SnapshotNode'] & { children: Node[] };

/** The present state, drawn as a node of its own under the current snapshot. */
const HERE = 'here';

interface Placed {
  id: string;
  snapshot: Snapshot | null;
  row: number;
  column: number;
  parent: Placed | null;
}

/** Rows in depth-first order (older children first); a node's first child continues
 * its column, every other child opens a new one to the right. */
export function layout(roots: Node[], currentId: string | null): Placed[] {
  const placed: Placed[] = [];
  let columns = 0;
  const visit = (node: Node, column: number, parent: Placed | null) => {
    const me: Placed = { id: node.id, snapshot: node, row: placed.length, column, parent };
    placed.push(me);
    const children: (Node | typeof HERE)[] = [...node.children].sort((a, b) => a.created_at.localeCompare(b.created_at));
    if (node.id === currentId) children.push(HERE);
    children.forEach((child, i) => {
      const childColumn = i === 0 ? column : columns++;
      if (child === HERE) {
        placed.push({ id: HERE, snapshot: null, row: placed.length, column: childColumn, parent: me });
      } else {
        visit(child, childColumn, me);
      }
    });
  };
  const sorted = [...roots].sort((a, b) => a.created_at.localeCompare(b.created_at));
  for (const root of sorted) visit(root, columns++, null);
  if (currentId === null) placed.push({ id: HERE, snapshot: null, row: placed.length, column: columns, parent: null });
  return placed;
}

const ROW = 34;
const COLUMN = 22;
const RADIUS = 7;
/** Room for a snapshot's name, age, size and schedule. */
const LABEL_WIDTH = 420;

export function SnapshotTree(props: {
  roots: Node[];
  currentId: string | null;
  selectedId: string | null;
  onSelect: (snapshot: Snapshot) => void;
  scheduleNames: Map<string, string>;
}) {
  const placed = layout(props.roots, props.currentId);
  const columns = Math.max(1, ...placed.map((p) => p.column + 1));
  const labelX = columns * COLUMN + 16;
  const height = placed.length * ROW + 8;
  const x = (p: Placed) => p.column * COLUMN + 14;
  const y = (p: Placed) => p.row * ROW + 20;
  const now = Date.now();
  const width = labelX + LABEL_WIDTH;
  // Drawn at its natural size (text stays readable on a phone); a narrow screen
  // scrolls the picture sideways, not the page.
  return (
    <div class="tree-wrap">
      <svg
        class="tree"
        width={width}
        height={height}
        viewBox={`0 0 ${width} ${height}`}
        role="group"
        aria-label="Snapshot tree"
        data-testid="snapshot-tree"
      >
        {placed
          .filter((p) => p.parent)
          .map((p) => {
            const parent = p.parent!;
            const [x1, y1, x2, y2] = [x(parent), y(parent), x(p), y(p)];
            const path =
              x1 === x2
                ? `M${x1},${y1} L${x2},${y2}`
                : `M${x1},${y1} C${x1},${y2 - ROW / 2} ${x2},${y1 + ROW / 3} ${x2},${y2 - RADIUS} L${x2},${y2}`;
            return <path key={`edge-${p.id}`} d={path} class={p.id === HERE ? 'edge edge-here' : 'edge'} />;
          })}
        {placed.map((p) => {
          if (!p.snapshot) {
            return (
              <g key={HERE} class="node node-here" data-testid="you-are-here" data-branch={p.column}>
                <circle cx={x(p)} cy={y(p)} r={RADIUS} />
                <text x={labelX} y={y(p) + 4}>
                  you are here <tspan class="muted">(the present state of the disks)</tspan>
                </text>
              </g>
            );
          }
          const s = p.snapshot;
          const size = s.volumes.reduce((sum, v) => sum + v.allocated_bytes, 0);
          const schedule = s.schedule_id ? (props.scheduleNames.get(s.schedule_id) ?? 'a schedule') : null;
          const selected = s.id === props.selectedId;
          const choose = () => props.onSelect(s);
          return (
            <g
              key={s.id}
              class={`node${selected ? ' selected' : ''}${s.is_current ? ' current' : ''} status-${s.status}`}
              role="button"
              tabindex={0}
              aria-pressed={selected}
              aria-label={`Snapshot ${s.name}`}
              data-testid={`snapshot-node-${s.name}`}
              data-branch={p.column}
              onClick={choose}
              onKeyDown={(e) => (e.key === 'Enter' || e.key === ' ') && (e.preventDefault(), choose())}
            >
              <rect class="hit" x={0} y={y(p) - ROW / 2} width={width} height={ROW} />
              <circle cx={x(p)} cy={y(p)} r={RADIUS} />
              <text x={labelX} y={y(p) + 4}>
                <tspan class="name">{s.name}</tspan>
                <tspan class="muted" dx={10}>
                  {age(s.created_at, now)} · {bytes(size)}
                  {schedule ? ` · ${schedule}` : ''}
                  {s.hold ? ' · held' : ''}
                  {s.status !== 'ready' ? ` · ${s.status}` : ''}
                </tspan>
              </text>
            </g>
          );
        })}
      </svg>
    </div>
  );
}
