// The create wizard: general (name, host, CPUs, memory), disks with their bus,
// CD-ROMs with an ISO, NICs, boot order, the guest (agent, cloud-init), then a summary;
// creates the VM and, if asked, starts it.
import { useEffect, useState } from 'preact/hooks';
import { errText, get, isLocal, post, type CdromSpec, type CloudInit, type DiskSpec, type NicSpec, type Vm, type VmSpec, type Volume } from './api';
import { store, useStore } from './store';
import { ErrorBox } from './widgets';
import { started } from './tasks';

const STEPS = ['General', 'Disks', 'CD-ROM', 'Network', 'Boot order', 'Guest', 'Confirm'];

export function CreateWizard() {
  const s = useStore();
  const [step, setStep] = useState(0);
  const [host, setHost] = useState(s.local);
  const [name, setName] = useState('');
  const [arch, setArch] = useState<'x86_64' | 'aarch64' | 'riscv64'>('x86_64');
  const [cpus, setCpus] = useState(1);
  const [memory, setMemory] = useState(512);
  const [disks, setDisks] = useState<DiskSpec[]>([{ bus: 'virtio', size: '8G', pool: 'local', cache: 'none' }]);
  const [cdroms, setCdroms] = useState<CdromSpec[]>([]);
  const [nics, setNics] = useState<NicSpec[]>([]);
  const [boot, setBoot] = useState<string[]>([]);
  const [start, setStart] = useState(false);
  const [kernel, setKernel] = useState('');
  const [initrd, setInitrd] = useState('');
  const [cmdline, setCmdline] = useState('console=ttyS0');
  const [agent, setAgent] = useState(false);
  const [uefi, setUefi] = useState(false);
  const [tpm, setTpm] = useState(false);
  const [secureBoot, setSecureBoot] = useState(false);
  const [ci, setCi] = useState(false);
  const [ciUser, setCiUser] = useState('');
  const [ciHash, setCiHash] = useState('');
  const [ciKeys, setCiKeys] = useState('');
  const [ciHost, setCiHost] = useState('');
  const [ciIp, setCiIp] = useState('dhcp');
  const [ciGw, setCiGw] = useState('');
  const [ciDns, setCiDns] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const [isos, setIsos] = useState<Volume[]>([]);
  const [bridges, setBridges] = useState<string[]>([]);
  const target = isLocal(host) ? undefined : host;
  useEffect(() => {
    Promise.all(s.pools.map((p) => get<Volume[]>(`/api/v1/pools/${encodeURIComponent(p.spec.name)}/volumes`, target).catch(() => [] as Volume[])))
      .then((l) => setIsos(l.flat().filter((v) => v.format === 'raw' || v.name.endsWith('.iso'))));
    get<{ name: string }[]>('/api/v1/bridges', target).then((b) => setBridges(b.map((x) => x.name))).catch(() => setBridges([]));
  }, [host, s.pools.length]);
  const devices = [...disks.map((_, i) => `disk${i}`), ...cdroms.map((_, i) => `cdrom${i}`), ...nics.map((_, i) => `net${i}`)];
  const order = [...boot.filter((d) => devices.includes(d)), ...devices.filter((d) => !boot.includes(d))];
  const spec: VmSpec = { name, cpus, memory_mib: memory, disks, cdroms, nics, boot_order: order };
  if (arch !== 'x86_64') spec.arch = arch;
  if (kernel) spec.direct_boot = { kernel, initrd: initrd || undefined, cmdline };
  if (agent) spec.agent = true;
  if (arch === 'x86_64') {
    // Secure Boot runs OVMF's Secure Boot build in SMM: q35 and UEFI
    if (uefi || secureBoot) spec.firmware = 'uefi';
    if (secureBoot) { spec.machine = 'q35'; spec.secure_boot = true; }
    if (tpm) spec.tpm = true;
  }
  if (ci) {
    const c: CloudInit = {};
    if (ciUser) c.user = ciUser;
    if (ciHash) c.password_hash = ciHash;
    const keys = ciKeys.split('\n').map((k) => k.trim()).filter((k) => k && !k.startsWith('#'));
    if (keys.length) c.ssh_keys = keys;
    if (ciHost) c.hostname = ciHost;
    if (nics.length && ciIp && ciIp !== 'dhcp') c.network = [{ nic: 0, ip: ciIp, gw: ciGw || undefined }];
    const dns = ciDns.split(/[\s,]+/).filter(Boolean);
    if (dns.length) c.dns = dns;
    spec.cloud_init = c;
  }
  function upd<T>(list: T[], set: (l: T[]) => void, i: number, patch: Partial<T>) {
    set(list.map((x, j) => (j === i ? { ...x, ...patch } : x)));
  }
  const val = (e: Event) => (e.target as HTMLInputElement).value;
  async function create() {
    setBusy(true);
    setError('');
    try {
      const vm = await post<Vm>('/api/v1/vms', spec, target);
      store.soon();
      if (start) await started(host, post(`/api/v1/vms/${encodeURIComponent(vm.spec.name)}/start`, {}, target));
      location.hash = `#/vm/${encodeURIComponent(host)}/${encodeURIComponent(vm.spec.name)}`;
    } catch (e) {
      setError(errText(e));
    } finally {
      setBusy(false);
    }
  }
  let body;
  switch (step) {
    case 0: body = (
      <div class="form">
        <label>Name <input name="name" value={name} onInput={(e) => setName(val(e))} autoFocus /></label>
        <label>Host <select value={host} onChange={(e) => setHost(val(e))}>{s.hosts.map((h) => <option value={h.name}>{h.name}</option>)}</select></label>
        <label>Architecture <select name="arch" value={arch} onChange={(e) => setArch(val(e) as typeof arch)}>
          <option value="x86_64">x86_64</option><option value="aarch64">aarch64 (emulated on x86 hosts)</option><option value="riscv64">riscv64 (emulated)</option>
        </select></label>
        <label>CPUs <input name="cpus" type="number" min={1} value={cpus} onInput={(e) => setCpus(Number(val(e)))} /></label>
        <label>Memory (MiB) <input name="memory" type="number" min={16} value={memory} onInput={(e) => setMemory(Number(val(e)))} /></label>
      </div>); break;
    case 1: body = (
      <div class="form">
        {disks.map((d, i) => (
          <div class="form-row" data-testid={`disk-row-${i}`}>
            <b>disk{i}</b>
            <label>Bus <select name={`disk${i}-bus`} value={d.bus} onChange={(e) => upd(disks, setDisks, i, { bus: val(e) as DiskSpec['bus'] })}>{['virtio', 'scsi', 'sata', 'ide'].map((b) => <option>{b}</option>)}</select></label>
            <label>Size <input name={`disk${i}-size`} value={String(d.size ?? '')} onInput={(e) => upd(disks, setDisks, i, { size: val(e) })} /></label>
            <label>Pool <select value={d.pool} onChange={(e) => upd(disks, setDisks, i, { pool: val(e) })}>{s.pools.map((p) => <option>{p.spec.name}</option>)}</select></label>
            <label>Cache <select value={d.cache} onChange={(e) => upd(disks, setDisks, i, { cache: val(e) as DiskSpec['cache'] })}>{['none', 'writeback', 'writethrough', 'directsync', 'unsafe'].map((b) => <option>{b}</option>)}</select></label>
            <button onClick={() => setDisks(disks.filter((_, j) => j !== i))}>Remove</button>
          </div>
        ))}
        <button onClick={() => setDisks([...disks, { bus: 'virtio', size: '8G', pool: s.pools[0]?.spec.name ?? 'local', cache: 'none' }])} data-testid="add-disk">Add disk</button>
      </div>); break;
    case 2: body = (
      <div class="form">
        {cdroms.map((c, i) => (
          <div class="form-row">
            <b>cdrom{i}</b>
            <label>Bus <select value={c.bus} onChange={(e) => upd(cdroms, setCdroms, i, { bus: val(e) as CdromSpec['bus'] })}>{['ide', 'sata', 'scsi'].map((b) => <option>{b}</option>)}</select></label>
            <label>ISO <select value={c.volume ? `${c.pool}/${c.volume}` : ''} onChange={(e) => {
              const [pool, volume] = val(e) ? val(e).split('/') : [null, null];
              upd(cdroms, setCdroms, i, { pool, volume });
            }}><option value="">empty</option>{isos.map((v) => <option value={`${v.pool}/${v.name}`}>{v.pool}/{v.name}</option>)}</select></label>
            <button onClick={() => setCdroms(cdroms.filter((_, j) => j !== i))}>Remove</button>
          </div>
        ))}
        <button onClick={() => setCdroms([...cdroms, { bus: arch === 'x86_64' ? 'ide' : 'scsi' }])}>Add CD-ROM</button>
      </div>); break;
    case 3: body = (
      <div class="form">
        {bridges.length === 0 && <div class="muted">This host has no bridges (ferry net bridge create NAME makes one).</div>}
        {nics.map((n, i) => (
          <div class="form-row">
            <b>net{i}</b>
            <label>Bridge <select value={n.bridge} onChange={(e) => upd(nics, setNics, i, { bridge: val(e) })}>{bridges.map((b) => <option>{b}</option>)}</select></label>
            <label>Model <select value={n.model} onChange={(e) => upd(nics, setNics, i, { model: val(e) as NicSpec['model'] })}>{['virtio', 'e1000', 'e1000e', 'rtl8139', 'vmxnet3'].map((b) => <option>{b}</option>)}</select></label>
            <button onClick={() => setNics(nics.filter((_, j) => j !== i))}>Remove</button>
          </div>
        ))}
        <button disabled={bridges.length === 0} onClick={() => setNics([...nics, { bridge: bridges[0], model: 'virtio' }])}>Add NIC</button>
      </div>); break;
    case 4: body = (
      <div class="form">
        <p class="muted">The firmware tries the devices in this order.</p>
        <ol class="boot">
          {order.map((d, i) => (
            <li>{d} <button disabled={i === 0} onClick={() => { const o = [...order]; [o[i - 1], o[i]] = [o[i], o[i - 1]]; setBoot(o); }}>▲</button>
              <button disabled={i === order.length - 1} onClick={() => { const o = [...order]; [o[i + 1], o[i]] = [o[i], o[i + 1]]; setBoot(o); }}>▼</button></li>
          ))}
        </ol>
        <h4>Direct kernel boot (optional)</h4>
        <p class="muted small">Boot a kernel and initrd from paths on the host instead of the firmware's boot devices.</p>
        <div class="form-row">
          <label>Kernel <input name="kernel" value={kernel} onInput={(e) => setKernel(val(e))} placeholder="/path/to/vmlinuz" /></label>
          <label>Initrd <input name="initrd" value={initrd} onInput={(e) => setInitrd(val(e))} /></label>
          <label>Command line <input name="cmdline" value={cmdline} onInput={(e) => setCmdline(val(e))} /></label>
        </div>
      </div>); break;
    case 5: body = (
      <div class="form">
        {arch === 'x86_64' && (
          <>
            <label class="check"><input type="checkbox" name="uefi" checked={uefi || secureBoot} disabled={secureBoot} onChange={(e) => setUefi((e.target as HTMLInputElement).checked)} /> UEFI firmware (OVMF)</label>
            <label class="check"><input type="checkbox" name="secure-boot" checked={secureBoot} onChange={(e) => setSecureBoot((e.target as HTMLInputElement).checked)} /> UEFI Secure Boot with Microsoft's keys (q35 machine): only signed boot loaders run</label>
            <label class="check"><input type="checkbox" name="tpm" checked={tpm} onChange={(e) => setTpm((e.target as HTMLInputElement).checked)} /> TPM 2.0 (swtpm): its state stays with the VM. With Secure Boot: what Windows 11 needs</label>
          </>
        )}
        <label class="check"><input type="checkbox" name="agent" checked={agent} onChange={(e) => setAgent((e.target as HTMLInputElement).checked)} /> QEMU guest agent (the guest needs qemu-guest-agent): its addresses and OS shown, shutdown and consistent snapshots through it</label>
        <label class="check"><input type="checkbox" name="cloud-init" checked={ci} onChange={(e) => setCi((e.target as HTMLInputElement).checked)} /> cloud-init (for cloud images: user, keys, host name and address at first boot)</label>
        {ci && (
          <>
            <div class="form-row">
              <label>User <input name="ci-user" value={ciUser} onInput={(e) => setCiUser(val(e))} placeholder="the image's default" /></label>
              <label>Password hash <input name="ci-hash" value={ciHash} onInput={(e) => setCiHash(val(e))} placeholder="$6$… (mkpasswd -m sha-512)" /></label>
              <label>Host name <input name="ci-hostname" value={ciHost} onInput={(e) => setCiHost(val(e))} placeholder={name || 'the VM name'} /></label>
            </div>
            <label>SSH public keys (one per line) <textarea name="ci-keys" rows={3} value={ciKeys} onInput={(e) => setCiKeys((e.target as HTMLTextAreaElement).value)} /></label>
            <div class="form-row">
              <label>net0 address <input name="ci-ip" value={ciIp} onInput={(e) => setCiIp(val(e))} placeholder="dhcp or 10.0.0.5/24" /></label>
              <label>Gateway <input name="ci-gw" value={ciGw} onInput={(e) => setCiGw(val(e))} /></label>
              <label>DNS servers <input name="ci-dns" value={ciDns} onInput={(e) => setCiDns(val(e))} /></label>
            </div>
          </>
        )}
      </div>); break;
    default: body = (
      <div class="form">
        <pre class="log" data-testid="create-summary">{JSON.stringify(spec, null, 2)}</pre>
        <label class="check"><input type="checkbox" name="start" checked={start} onChange={(e) => setStart((e.target as HTMLInputElement).checked)} /> Start after creation</label>
      </div>);
  }
  return (
    <div class="page wizard">
      <h2>Create VM</h2>
      <div class="steps">{STEPS.map((t, i) => <a class={i === step ? 'active' : ''} onClick={() => setStep(i)}>{i + 1}. {t}</a>)}</div>
      {body}
      <ErrorBox error={error} />
      <div class="buttons">
        <button disabled={step === 0} onClick={() => setStep(step - 1)}>Back</button>
        {step < STEPS.length - 1
          ? <button class="primary" onClick={() => setStep(step + 1)} disabled={!name} data-testid="wizard-next">Next</button>
          : <button class="primary" onClick={create} disabled={busy || !name} data-testid="wizard-create">Create</button>}
      </div>
    </div>
  );
}
