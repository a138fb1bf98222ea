// Small shared pieces: bars, a modal, a button that runs an API call and shows the
// server's reason when it fails.
import type { ComponentChildren } from 'preact';
import { useState } from 'preact/hooks';
import { errText, type HostInfo } from './api';

export function Bar(props: { value: number; max: number; label: string; testid?: string }) {
  const pct = props.max > 0 ? Math.min(100, (100 * props.value) / props.max) : 0;
  return (
    <div class="bar" data-testid={props.testid} title={props.label}>
      <div class={`fill ${pct > 90 ? 'hot' : pct > 70 ? 'warm' : ''}`} style={{ width: `${pct}%` }} />
      <span>{props.label}</span>
    </div>
  );
}

/** A host's CPU: cores busy over the last sample, of its cores. */
export function CpuBar(props: { info: HostInfo }) {
  const b = props.info.cpu_busy;
  return b == null
    ? <span class="muted small">measuring…</span>
    : <Bar value={b} max={props.info.cpus} label={`${b.toFixed(2)} of ${props.info.cpus} cores`} testid="cpu-bar" />;
}

export function Modal(props: { title: string; onClose: () => void; children: ComponentChildren }) {
  return (
    <div class="modal-back" onClick={(e) => { if (e.target === e.currentTarget) props.onClose(); }}>
      <div class="modal" role="dialog" aria-label={props.title}>
        <div class="modal-head"><b>{props.title}</b><button class="x" onClick={props.onClose} aria-label="Close">×</button></div>
        {props.children}
      </div>
    </div>
  );
}

/** A button running `run`; its error (the server's reason) shows beside it. */
export function Action(props: {
  label: string; run: () => Promise<unknown>; disabled?: boolean; class?: string; testid?: string;
  confirm?: string;
}) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState('');
  async function go() {
    if (props.confirm && !window.confirm(props.confirm)) return;
    setBusy(true);
    setError('');
    try { await props.run(); } catch (e) { setError(errText(e)); } finally { setBusy(false); }
  }
  return (
    <span class="action">
      <button class={props.class} disabled={busy || props.disabled} onClick={go} data-testid={props.testid}>{props.label}</button>
      {error && <span class="error" role="alert">{error}</span>}
    </span>
  );
}

export function ErrorBox(props: { error: string }) {
  return props.error ? <div class="error" role="alert">{props.error}</div> : null;
}
