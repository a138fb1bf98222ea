//! A host's maintenance flag: while set, the host takes no new VMs (no start, no
//! incoming migration). Entering maintenance (evacuating the running VMs) is the
//! cluster side's (`ferry-cluster`).

use crate::error::Result;
use crate::Host;
use ferry_store::keys::host::MAINTENANCE;
use ferry_store::StoreJson;

impl Host {
    pub async fn in_maintenance(&self) -> Result<bool> {
        Ok(self
            .inner
            .store
            .get_json::<bool>(MAINTENANCE)
            .await?
            .is_some_and(|(m, _)| m))
    }

    /// Ends maintenance: VMs may start and arrive again.
    pub async fn activate_host(&self) -> Result<()> {
        self.inner.store.put_json(MAINTENANCE, &false).await?;
        self.inner.events.emit(
            None,
            "host",
            format!("{} active (maintenance ended)", self.host_name()),
        );
        Ok(())
    }

    /// Sets the flag (the start of entering maintenance).
    pub async fn set_maintenance(&self) -> Result<()> {
        self.inner.store.put_json(MAINTENANCE, &true).await?;
        Ok(())
    }
}
