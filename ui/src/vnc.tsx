// The VNC console: noVNC, loaded unbundled from /ui/novnc (ES modules with top-level
// await), connected to the VM's VNC websocket.
import { useEffect, useRef, useState } from 'preact/hooks';
import { hostPath, isLocal, wsUrl } from './api';

interface RfbLike {
  scaleViewport: boolean;
  disconnect(): void;
  sendCtrlAltDel(): void;
  addEventListener(ev: string, f: (e: CustomEvent) => void): void;
}

export function VncConsole(props: { name: string; host: string }) {
  const ref = useRef<HTMLDivElement>(null);
  const rfb = useRef<RfbLike | null>(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    let gone = false;
    const url = '/ui/novnc/core/rfb.js';
    import(/* @vite-ignore */ url).then((m) => {
      if (gone) return;
      const RFB = m.default;
      const r: RfbLike = new RFB(ref.current!, wsUrl(hostPath(isLocal(props.host) ? undefined : props.host, `/api/v1/vms/${encodeURIComponent(props.name)}/vnc`)), { wsProtocols: ['binary'] });
      r.scaleViewport = true;
      r.addEventListener('connect', () => setStatus('connected'));
      r.addEventListener('disconnect', (e) => setStatus(e.detail?.clean ? 'disconnected' : 'connection lost'));
      rfb.current = r;
    }).catch((e) => setStatus(`noVNC failed to load: ${e}`));
    return () => { gone = true; rfb.current?.disconnect(); rfb.current = null; };
  }, [props.name, props.host]);
  return (
    <div class="console-wrap">
      <div class="toolbar">
        <span class="muted small" data-testid="vnc-status">VNC: {status}</span>
        <button onClick={() => rfb.current?.sendCtrlAltDel()}>Ctrl-Alt-Del</button>
      </div>
      <div class="vnc" ref={ref} data-testid="vnc-screen" />
    </div>
  );
}
