//! The host's boot and shutdown of its VMs (Proxmox's `startall`/`stopall` and
//! `pve-guests.service`, libvirt-guests).
//!
//! - **Shutdown** (`POST /api/v1/host/stop-all`; `ferry-guests.service` calls it when
//!   the machine shuts down): every VM with a QEMU, in reverse startup order — VMs
//!   without an order first, then the highest order; one order's VMs together — is
//!   powered off through ACPI (stopped after its `down` seconds) or suspended, as its
//!   policy says. Each is marked with what was done and the boot it was done in; the
//!   host then refuses new starts until it boots again or `start-all`.
//! - **Boot**: the first daemon start in a new boot of the machine (the kernel's boot
//!   id differs from the one recorded in `{state_dir}/boot-id`) runs `start-all`: in
//!   startup order, each VM waiting `up` seconds before the next, it resumes the VMs
//!   the shutdown suspended, starts HA VMs the shutdown powered off (HA keeps them
//!   running), and starts `autostart` VMs (not HA ones: the cluster places those). A VM
//!   that ran when the machine went down without that shutdown is reported as crashed
//!   "with the host" (see `adopt_all`), and still starts if it is autostart.
//!
//! Which VMs and in what order is decided by the pure [`boot_plan`] and
//! [`shutdown_plan`] (property-tested); the rest is I/O.

use crate::error::Result;
use crate::records::HostDown;
use crate::tasks::TaskCtx;
use crate::Host;
use ferry_types::{HostPowerReport, HostPowerStep, HostShutdownAction, Startup, VmState};
use std::time::Duration;

/// The file holding the boot id of the machine's boot the daemon last started in.
pub const BOOT_ID_FILE: &str = "boot-id";

/// What boot and shutdown look at of one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerVm {
    pub name: String,
    pub startup: Startup,
    pub ha: bool,
    pub state: VmState,
    /// What the host's last shutdown did to it.
    pub host_down: Option<HostShutdownAction>,
    pub template: bool,
    /// A migration is moving it (its source or destination decides).
    pub in_transit: bool,
}

/// Why a VM starts at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootReason {
    /// The host's shutdown suspended it.
    Resume,
    /// HA, and it ran when the host shut down.
    Ha,
    /// Its `autostart`.
    Autostart,
}

impl BootReason {
    fn text(self) -> &'static str {
        match self {
            BootReason::Resume => "suspended by the host's shutdown",
            BootReason::Ha => "HA, ran when the host shut down",
            BootReason::Autostart => "autostart",
        }
    }
}

/// The startup order as a sort key: ordered VMs first (lowest first), then the rest;
/// names break ties.
fn boot_key(v: &PowerVm) -> (bool, u32, &str) {
    (
        v.startup.order.is_none(),
        v.startup.order.unwrap_or(0),
        &v.name,
    )
}

/// The VMs to start at boot, in order: (name, why, seconds to wait after it).
pub fn boot_plan(vms: &[PowerVm]) -> Vec<(String, BootReason, u32)> {
    let mut out: Vec<&PowerVm> = vms
        .iter()
        .filter(|v| !v.template && !v.in_transit && !v.state.has_process())
        .filter(|v| reason(v).is_some())
        .collect();
    out.sort_by(|a, b| boot_key(a).cmp(&boot_key(b)));
    out.into_iter()
        .filter_map(|v| Some((v.name.clone(), reason(v)?, v.startup.up_s)))
        .collect()
}

fn reason(v: &PowerVm) -> Option<BootReason> {
    match (v.host_down, v.state) {
        (Some(HostShutdownAction::Suspend), VmState::Suspended) => Some(BootReason::Resume),
        (Some(_), VmState::Stopped | VmState::Suspended) if v.ha => Some(BootReason::Ha),
        _ if v.startup.autostart && !v.ha => match v.state {
            VmState::Stopped | VmState::Crashed | VmState::Suspended => Some(BootReason::Autostart),
            _ => None,
        },
        _ => None,
    }
}

/// The VMs to bring down at shutdown, in groups acted on one after the other (the
/// VMs of a group together): (name, action, seconds its guest may take).
pub fn shutdown_plan(vms: &[PowerVm]) -> Vec<Vec<(String, HostShutdownAction, u32)>> {
    let mut live: Vec<&PowerVm> = vms
        .iter()
        .filter(|v| v.state.has_process() && !v.in_transit)
        .collect();
    // The reverse of the boot order: unordered first, then the highest order.
    live.sort_by(|a, b| boot_key(b).cmp(&boot_key(a)));
    let mut groups: Vec<Vec<(String, HostShutdownAction, u32)>> = vec![];
    let mut last: Option<Option<u32>> = None;
    for v in live {
        let step = (v.name.clone(), v.startup.on_host_shutdown, v.startup.down());
        match (last, groups.last_mut()) {
            (Some(o), Some(g)) if o == v.startup.order => g.push(step),
            _ => groups.push(vec![step]),
        }
        last = Some(v.startup.order);
    }
    for g in &mut groups {
        g.sort_by(|a, b| a.0.cmp(&b.0));
    }
    groups
}

fn step(vm: &str, action: &str, detail: impl Into<String>) -> HostPowerStep {
    HostPowerStep {
        vm: vm.to_string(),
        action: action.to_string(),
        detail: detail.into(),
    }
}

impl Host {
    /// Whether the host is shutting its VMs down (starts are refused).
    pub fn shutting_down(&self) -> bool {
        self.inner
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The kernel's id of this boot of the machine, if the daemon knows where to read it.
    pub fn boot_id(&self) -> Option<String> {
        let f = self.inner.cfg.boot_id_file.as_ref()?;
        std::fs::read_to_string(f)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s.len() <= 64)
    }

    /// Whether the machine booted since the daemon last started (the boot id changed),
    /// and the boot id recorded then.
    pub(crate) fn read_boot(cfg: &crate::AgentConfig) -> (bool, Option<String>) {
        let Some(f) = &cfg.boot_id_file else {
            return (false, None);
        };
        let now = std::fs::read_to_string(f).unwrap_or_default();
        match std::fs::read_to_string(cfg.state_dir.join(BOOT_ID_FILE)) {
            Ok(before) => (before.trim() != now.trim(), Some(before.trim().to_string())),
            // The first start ever: nothing ran here before.
            Err(_) => (false, None),
        }
    }

    /// Whether this daemon is the first to start since the machine booted.
    pub fn rebooted(&self) -> bool {
        self.inner.rebooted
    }

    /// A shutdown mark counts if it was made in this boot (a `stop-all` by hand) or in
    /// the one before it (the machine's shutdown); older ones are stale.
    fn mark_counts(&self, d: &HostDown) -> bool {
        Some(&d.boot) == self.boot_id().as_ref() || Some(&d.boot) == self.inner.prev_boot.as_ref()
    }

    async fn power_vms(&self) -> Result<Vec<PowerVm>> {
        let mut out = vec![];
        for r in self.records().await? {
            let state = self.slot(&r.spec.name).state();
            out.push(PowerVm {
                state,
                startup: r.spec.startup,
                ha: r.spec.ha.enabled(),
                host_down: r
                    .host_down
                    .as_ref()
                    .filter(|d| self.mark_counts(d))
                    .map(|d| d.action),
                template: r.template,
                in_transit: r.transit.is_some(),
                name: r.spec.name,
            });
        }
        Ok(out)
    }

    /// Brings every VM down as its policy says, in reverse startup order; from now on
    /// no VM starts here until the next boot or [`Host::start_all`].
    pub async fn stop_all(&self, ctx: &TaskCtx) -> Result<HostPowerReport> {
        // First: no start and no arriving migration from now on (a boot start under
        // way has its next starts refused and yields the lock).
        self.inner
            .shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _power = self.inner.power.lock().await;
        self.inner
            .shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let boot = self.boot_id().unwrap_or_default();
        // Migrations under way end first (5 minutes at most): a VM leaving is not ours
        // to shut down, and one that stays is planned with the others.
        for i in 0..300 {
            let moving = self
                .power_vms()
                .await?
                .into_iter()
                .filter(|v| v.in_transit && v.state.has_process())
                .count();
            if moving == 0 {
                break;
            }
            if i % 15 == 0 {
                ctx.log(format!("waiting for {moving} migrations to end"));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let groups = shutdown_plan(&self.power_vms().await?);
        let total = groups.iter().map(Vec::len).sum::<usize>();
        ctx.log(format!(
            "{total} VMs to bring down in {} groups",
            groups.len()
        ));
        let mut report = HostPowerReport::default();
        let mut done = 0;
        for g in groups {
            let steps = futures::future::join_all(
                g.iter()
                    .map(|(vm, action, down)| self.bring_down(vm, *action, *down, &boot)),
            )
            .await;
            for s in steps {
                ctx.log(format!("{}: {} ({})", s.vm, s.action, s.detail));
                report.steps.push(s);
                done += 1;
            }
            ctx.progress(crate::tasks::fraction(done, total as u64));
        }
        self.inner.events.emit(
            None,
            "host",
            format!("VMs brought down for the host's shutdown ({done})"),
        );
        Ok(report)
    }

    async fn bring_down(
        &self,
        vm: &str,
        action: HostShutdownAction,
        down: u32,
        boot: &str,
    ) -> HostPowerStep {
        let mark = |a: HostShutdownAction| {
            let boot = boot.to_string();
            move |r: &mut crate::records::VmRecord| {
                r.host_down = Some(HostDown {
                    boot: boot.clone(),
                    action: a,
                })
            }
        };
        if let Err(e) = self.update_record(vm, mark(action)).await {
            return step(vm, "failed", format!("cannot record the shutdown: {e}"));
        }
        let mut detail = String::new();
        if action == HostShutdownAction::Suspend {
            match self.suspend_vm(vm, None).await {
                Ok(()) => return step(vm, "suspend", "state saved; resumes at boot"),
                Err(e) => {
                    // Its state could not be saved: it goes down like the others.
                    detail = format!("suspend failed ({e}); ");
                    let _ = self
                        .update_record(vm, mark(HostShutdownAction::Shutdown))
                        .await;
                }
            }
        }
        match self
            .shutdown_vm(vm, Some(Duration::from_secs(down.into())))
            .await
        {
            Ok(true) => step(vm, "shutdown", format!("{detail}powered off")),
            Ok(false) => step(
                vm,
                "stopped",
                format!("{detail}did not power off within {down} s"),
            ),
            Err(e) if !self.slot(vm).state().has_process() => {
                step(vm, "shutdown", format!("{detail}already down ({e})"))
            }
            Err(e) => step(vm, "failed", format!("{detail}{e}")),
        }
    }

    /// Starts what the boot brings back, in startup order (see the module's text), and
    /// clears every VM's shutdown mark; starts are allowed again.
    pub async fn start_all(&self, ctx: &TaskCtx) -> Result<HostPowerReport> {
        let _power = self.inner.power.lock().await;
        self.inner
            .shutting_down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let plan = boot_plan(&self.power_vms().await?);
        let mut failed = std::collections::BTreeSet::new();
        ctx.log(format!("{} VMs to start", plan.len()));
        let mut report = HostPowerReport::default();
        let total = plan.len() as u64;
        for (i, (vm, why, up)) in plan.iter().enumerate() {
            if *why == BootReason::Ha && !self.holds_lease() {
                // In a cluster, HA VMs wait for this host's lease (a minute at most).
                for _ in 0..120 {
                    if self.holds_lease() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            let s = match self.start_vm(vm).await {
                Ok(()) => {
                    let action = if *why == BootReason::Resume {
                        "resume"
                    } else {
                        "start"
                    };
                    step(vm, action, why.text())
                }
                Err(e) => step(vm, "failed", format!("{}: {e}", why.text())),
            };
            ctx.log(format!("{}: {} ({})", s.vm, s.action, s.detail));
            let ok = s.action != "failed";
            if !ok {
                failed.insert(vm.clone());
            }
            report.steps.push(s);
            ctx.progress(crate::tasks::fraction(i as u64 + 1, total));
            if ok && *up > 0 && i + 1 < plan.len() {
                tokio::time::sleep(Duration::from_secs((*up).into())).await;
            }
        }
        // A mark stays with a VM that failed to come back (the next start-all or boot
        // tries again); the others are done with.
        for r in self.records().await? {
            if r.host_down.is_some() && !failed.contains(&r.spec.name) {
                let _ = self
                    .update_record(&r.spec.name, |r| r.host_down = None)
                    .await;
            }
        }
        self.inner.events.emit(
            None,
            "host",
            format!(
                "VMs started for the host's boot ({} of {})",
                report.steps.iter().filter(|s| s.action != "failed").count(),
                report.steps.len()
            ),
        );
        Ok(report)
    }

    /// At daemon start: in a new boot of the machine, `start_all` as a task; then the
    /// boot is recorded (a daemon that dies meanwhile starts what is left next time).
    pub fn boot(&self) {
        let Some(now) = self.boot_id() else {
            return;
        };
        let file = self.inner.cfg.state_dir.join(BOOT_ID_FILE);
        if !self.rebooted() {
            if let Err(e) = write_atomic(&file, &now) {
                tracing::warn!(error = %e, "cannot record the boot id");
            }
            return;
        }
        let h = self.clone();
        self.inner
            .tasks
            .spawn("host.boot", self.host_name(), move |ctx| async move {
                let r = h.start_all(&ctx).await?;
                ctx.result(serde_json::to_value(&r).unwrap_or_default());
                if let Err(e) = write_atomic(&file, &now) {
                    tracing::warn!(error = %e, "cannot record the boot id");
                }
                Ok(())
            });
    }
}

/// Writes `file` whole or not at all (a temporary file renamed over it).
fn write_atomic(file: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vm(name: &str, order: Option<u32>, state: VmState) -> PowerVm {
        PowerVm {
            name: name.into(),
            startup: Startup {
                autostart: true,
                order,
                up_s: 1,
                ..Default::default()
            },
            ha: false,
            state,
            host_down: None,
            template: false,
            in_transit: false,
        }
    }

    #[test]
    fn boot_goes_by_order_then_the_unordered_and_shutdown_the_other_way() {
        let vms = [
            vm("db", Some(1), VmState::Stopped),
            vm("web", Some(2), VmState::Stopped),
            vm("app", Some(2), VmState::Stopped),
            vm("misc", None, VmState::Crashed),
        ];
        let names: Vec<_> = boot_plan(&vms).into_iter().map(|x| x.0).collect();
        assert_eq!(names, ["db", "app", "web", "misc"]);
        let running: Vec<_> = vms
            .iter()
            .map(|v| PowerVm {
                state: VmState::Running,
                ..v.clone()
            })
            .collect();
        let groups: Vec<Vec<String>> = shutdown_plan(&running)
            .into_iter()
            .map(|g| g.into_iter().map(|x| x.0).collect())
            .collect();
        assert_eq!(groups, [vec!["misc"], vec!["app", "web"], vec!["db"]]);
    }

    #[test]
    fn boot_brings_back_what_the_shutdown_suspended_and_ha_vms_that_ran() {
        let mut suspended = vm("s", None, VmState::Suspended);
        suspended.startup.autostart = false;
        suspended.host_down = Some(HostShutdownAction::Suspend);
        let mut ha = vm("h", None, VmState::Stopped);
        ha.ha = true;
        ha.host_down = Some(HostShutdownAction::Shutdown);
        let mut ha_auto = vm("a", None, VmState::Stopped);
        ha_auto.ha = true; // autostart is not for HA VMs
        let mut off = vm("o", None, VmState::Stopped);
        off.startup.autostart = false;
        off.host_down = Some(HostShutdownAction::Shutdown);
        let mut tpl = vm("t", None, VmState::Stopped);
        tpl.template = true;
        let plan = boot_plan(&[suspended, ha, ha_auto, off, tpl]);
        assert_eq!(
            plan.iter().map(|x| (x.0.as_str(), x.1)).collect::<Vec<_>>(),
            [("h", BootReason::Ha), ("s", BootReason::Resume)]
        );
    }

    fn any_vm() -> impl Strategy<Value = PowerVm> {
        let state = prop_oneof![
            Just(VmState::Stopped),
            Just(VmState::Running),
            Just(VmState::Paused),
            Just(VmState::Crashed),
            Just(VmState::Suspended),
            Just(VmState::Starting),
        ];
        let down = prop_oneof![
            Just(None),
            Just(Some(HostShutdownAction::Shutdown)),
            Just(Some(HostShutdownAction::Suspend)),
        ];
        (
            0u32..1000,
            proptest::option::of(0u32..4),
            any::<bool>(),
            any::<bool>(),
            state,
            down,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(n, order, auto, ha, state, host_down, template, in_transit)| PowerVm {
                    name: format!("vm{n}"),
                    startup: Startup {
                        autostart: auto,
                        order,
                        ..Default::default()
                    },
                    ha,
                    state,
                    host_down,
                    template,
                    in_transit,
                },
            )
    }

    proptest! {
        /// Boot starts only VMs without a QEMU that are no templates and not moving,
        /// each once, ordered VMs before unordered ones, lower orders first; never an HA
        /// VM for its autostart alone.
        #[test]
        fn the_boot_plan_is_ordered_and_starts_only_what_it_may(
            vms in proptest::collection::vec(any_vm(), 0..20)
        ) {
            let mut seen = std::collections::BTreeSet::new();
            let vms: Vec<PowerVm> = vms.into_iter().filter(|v| seen.insert(v.name.clone())).collect();
            let plan = boot_plan(&vms);
            let find = |n: &str| vms.iter().find(|v| v.name == n).expect("planned VM exists");
            let mut names = std::collections::BTreeSet::new();
            for (n, why, _) in &plan {
                prop_assert!(names.insert(n.clone()), "{n} twice");
                let v = find(n);
                prop_assert!(!v.template && !v.in_transit && !v.state.has_process());
                if *why == BootReason::Autostart {
                    prop_assert!(v.startup.autostart && !v.ha);
                } else {
                    prop_assert!(v.host_down.is_some());
                }
            }
            for w in plan.windows(2) {
                let (a, b) = (find(&w[0].0), find(&w[1].0));
                prop_assert!(boot_key(a) <= boot_key(b));
            }
        }

        /// Shutdown acts on every VM with a QEMU not moving, once, in groups of one
        /// order, the unordered first, then from the highest order down.
        #[test]
        fn the_shutdown_plan_covers_every_live_vm_once_in_reverse_order(
            vms in proptest::collection::vec(any_vm(), 0..20)
        ) {
            let mut seen = std::collections::BTreeSet::new();
            let vms: Vec<PowerVm> = vms.into_iter().filter(|v| seen.insert(v.name.clone())).collect();
            let groups = shutdown_plan(&vms);
            let planned: Vec<&str> = groups.iter().flatten().map(|x| x.0.as_str()).collect();
            let live: std::collections::BTreeSet<&str> = vms
                .iter()
                .filter(|v| v.state.has_process() && !v.in_transit)
                .map(|v| v.name.as_str())
                .collect();
            prop_assert_eq!(planned.len(), live.len());
            prop_assert_eq!(planned.iter().copied().collect::<std::collections::BTreeSet<_>>(), live);
            let order = |n: &str| vms.iter().find(|v| v.name == n).map(|v| v.startup.order);
            let mut prev: Option<Option<u32>> = None;
            for g in &groups {
                let o = order(&g[0].0).flatten();
                prop_assert!(g.iter().all(|x| order(&x.0).flatten() == o), "one order per group");
                if let Some(p) = prev {
                    // unordered (None) first; then strictly decreasing orders
                    prop_assert!(o.is_some() && (p.is_none() || p > o));
                }
                prev = Some(o);
            }
        }
    }
}
