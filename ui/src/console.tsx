// The serial console in the page: xterm.js over the console websocket (history first,
// then live output; keys typed are sent back). VMs on other hosts through the relay.
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';
import { useEffect, useRef, useState } from 'preact/hooks';
import { hostPath, isLocal, wsUrl } from './api';

export function SerialConsole(props: { name: string; host: string }) {
  const ref = useRef<HTMLDivElement>(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    const term = new Terminal({ convertEol: false, fontSize: 14, scrollback: 5000, cursorBlink: true });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(ref.current!);
    fit.fit();
    const ws = new WebSocket(wsUrl(hostPath(isLocal(props.host) ? undefined : props.host, `/api/v1/vms/${encodeURIComponent(props.name)}/console`)));
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => { setStatus('connected'); term.focus(); };
    ws.onmessage = (m) => term.write(typeof m.data === 'string' ? m.data : new Uint8Array(m.data));
    ws.onclose = () => setStatus('disconnected');
    const sub = term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(new TextEncoder().encode(d)); });
    const onResize = () => fit.fit();
    window.addEventListener('resize', onResize);
    return () => { window.removeEventListener('resize', onResize); sub.dispose(); ws.close(); term.dispose(); };
  }, [props.name, props.host]);
  return (
    <div class="console-wrap">
      <div class="muted small" data-testid="console-status">Serial console: {status}</div>
      <div class="console" ref={ref} data-testid="serial-console" />
    </div>
  );
}
