// A virtualised list: only the rows in view (plus a margin) are in the DOM, so a tree
// or table of thousands of VMs scrolls without freezing the page.
import type { ComponentChildren } from 'preact';
import { useLayoutEffect, useRef, useState } from 'preact/hooks';

export function VList<T>(props: {
  items: T[];
  rowHeight: number;
  row: (item: T, index: number) => ComponentChildren;
  class?: string;
  testid?: string;
}) {
  const ref = useRef<HTMLDivElement>(null);
  const [top, setTop] = useState(0);
  const [height, setHeight] = useState(600);
  useLayoutEffect(() => {
    const el = ref.current;
    if (!el) return;
    const ro = new ResizeObserver(() => setHeight(el.clientHeight || 600));
    ro.observe(el);
    return () => ro.disconnect();
  }, []);
  const { items, rowHeight } = props;
  const first = Math.max(0, Math.floor(top / rowHeight) - 10);
  const last = Math.min(items.length, Math.ceil((top + height) / rowHeight) + 10);
  const rows = [];
  for (let i = first; i < last; i++) {
    rows.push(
      <div class="vrow" style={{ top: `${i * rowHeight}px`, height: `${rowHeight}px` }} key={i}>
        {props.row(items[i], i)}
      </div>,
    );
  }
  return (
    <div
      ref={ref}
      class={`vlist ${props.class ?? ''}`}
      data-testid={props.testid}
      data-rows={items.length}
      onScroll={(e) => setTop((e.currentTarget as HTMLDivElement).scrollTop)}
    >
      <div style={{ height: `${items.length * rowHeight}px`, position: 'relative' }}>{rows}</div>
    </div>
  );
}
