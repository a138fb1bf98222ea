// Live graphs of the last hour (uPlot), fed by the daemon's metrics history: CPU,
// memory, disk and network, for a VM or a host. Refreshed every 10 s.
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import { useEffect, useRef, useState } from 'preact/hooks';
import { bytes, errText, get, type MetricsHistory } from './api';

function Chart(props: { title: string; times: number[]; series: { label: string; values: number[]; color: string }[]; fmt: (v: number) => string; max?: number; testid: string }) {
  const ref = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  useEffect(() => {
    const el = ref.current!;
    const opts: uPlot.Options = {
      width: Math.max(260, el.clientWidth || 360),
      height: 150,
      legend: { show: true },
      scales: { x: { time: true, range: (_u, _min, max) => { const end = Math.max(max ?? 0, Date.now() / 1000); return [end - 3600, end]; } }, y: props.max ? { range: [0, props.max] } : { range: (_u, _min, max) => [0, Math.max(max, 1e-6) * 1.1] } },
      axes: [{}, { values: (_u, vals) => vals.map((v) => props.fmt(v)), size: 70 }],
      series: [{}, ...props.series.map((s) => ({ label: s.label, stroke: s.color, width: 1.5, value: (_u: uPlot, v: number | null) => (v == null ? '—' : props.fmt(v)) }))],
    };
    plot.current = new uPlot(opts, [props.times, ...props.series.map((s) => s.values)] as uPlot.AlignedData, el);
    return () => { plot.current?.destroy(); plot.current = null; };
  }, [props.series.length]);
  useEffect(() => {
    plot.current?.setData([props.times, ...props.series.map((s) => s.values)] as uPlot.AlignedData);
  }, [props.times, props.series]);
  return (
    <div class="chart" data-testid={props.testid} data-points={props.times.length}>
      <div class="chart-title">{props.title}</div>
      <div ref={ref} />
    </div>
  );
}

const rate = (v: number) => `${bytes(v)}/s`;

export function Graphs(props: { path: string; host?: string }) {
  const [h, setH] = useState<MetricsHistory | null>(null);
  const [error, setError] = useState('');
  useEffect(() => {
    let live = true;
    const load = () => get<MetricsHistory>(props.path, props.host)
      .then((x) => { if (live) { setH(x); setError(''); } })
      .catch((e) => live && setError(errText(e)));
    load();
    const t = setInterval(load, 10000);
    return () => { live = false; clearInterval(t); };
  }, [props.path, props.host]);
  if (error) return <div class="error">{error}</div>;
  if (!h) return <div class="muted">Loading graphs…</div>;
  const times = h.points.map((p) => p.time_ms / 1000);
  const col = (f: (p: MetricsHistory['points'][0]) => number) => h.points.map(f);
  return (
    <div class="graphs" data-testid="graphs">
      {h.points.length === 0 && <div class="muted">No samples yet: one every {h.interval_s} s while running.</div>}
      <Chart testid="graph-cpu" title={`CPU (cores, of ${h.cpu_limit})`} times={times} max={h.cpu_limit}
        series={[{ label: 'cores', values: col((p) => p.cpu), color: '#1f77b4' }]} fmt={(v) => v.toFixed(2)} />
      <Chart testid="graph-memory" title={`Memory (of ${bytes(h.memory_limit_bytes)})`} times={times} max={h.memory_limit_bytes}
        series={[{ label: 'used', values: col((p) => p.memory_bytes), color: '#2ca02c' }]} fmt={bytes} />
      <Chart testid="graph-disk" title="Disk" times={times}
        series={[{ label: 'read', values: col((p) => p.disk_read_bps), color: '#9467bd' }, { label: 'write', values: col((p) => p.disk_write_bps), color: '#d62728' }]} fmt={rate} />
      <Chart testid="graph-net" title="Network" times={times}
        series={[{ label: 'in', values: col((p) => p.net_rx_bps), color: '#17becf' }, { label: 'out', values: col((p) => p.net_tx_bps), color: '#ff7f0e' }]} fmt={rate} />
    </div>
  );
}
