//! OVF descriptors (the `.ovf` inside an OVA, as VMware, VirtualBox and others export
//! them) read into what ferry can build a VM from: CPUs, memory, firmware, disks with
//! their bus and file, NICs with their model — and, in words, everything it cannot map.
//! Pure; the OVA's tar and the disks' conversion are the host's (`ferry_host::ova`).
//!
//! The descriptor comes from elsewhere: it is bounded, parsed without external entities
//! (roxmltree resolves none), and every file it names must be a plain name listed in
//! its `References`.

use ferry_types::{DiskBus, Firmware, NicModel};
use roxmltree::{Document, Node};
use std::collections::HashMap;

/// The largest descriptor read.
pub const MAX_OVF: usize = 4 << 20;
/// At most this many disks and NICs are taken (ferry's own limits).
const MAX_DISKS: usize = ferry_types::MAX_DISKS;
const MAX_NICS: usize = ferry_types::MAX_NICS;

/// What an OVF descriptor says, in ferry's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfPlan {
    /// The virtual system's name.
    pub name: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub firmware: Firmware,
    pub disks: Vec<OvfDisk>,
    pub nics: Vec<NicModel>,
    /// CD/DVD drives (imported empty).
    pub cdroms: usize,
    /// What was not mapped, one line each.
    pub unmapped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// The file in the OVA (a plain name).
    pub file: String,
    pub bus: DiskBus,
    /// The capacity the descriptor states, if it does (bytes).
    pub capacity: Option<u64>,
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.tag_name().name() == name)
}

fn text<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<&'a str> {
    child(n, name).and_then(|c| c.text()).map(str::trim)
}

/// An attribute by local name, whatever its namespace (`ovf:href`, `href`).
fn attr<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<&'a str> {
    n.attributes()
        .find(|a| a.name() == name)
        .map(|a| a.value().trim())
}

/// `byte * 2^20`, `MegaBytes`, `GB`... as a multiplier of bytes.
fn units(u: Option<&str>) -> Option<u64> {
    let u = u.unwrap_or("byte").replace(' ', "").to_ascii_lowercase();
    let pow2 = |e: &str| e.parse::<u32>().ok().filter(|e| *e < 63).map(|e| 1u64 << e);
    let pow10 = |e: &str| {
        e.parse::<u32>()
            .ok()
            .filter(|e| *e < 19)
            .map(|e| 10u64.pow(e))
    };
    match u.as_str() {
        "byte" | "bytes" => Some(1),
        "kilobytes" | "kb" => Some(1 << 10),
        "megabytes" | "mb" => Some(1 << 20),
        "gigabytes" | "gb" => Some(1 << 30),
        _ => {
            if let Some(e) = u.strip_prefix("byte*2^") {
                pow2(e)
            } else {
                u.strip_prefix("byte*10^").and_then(pow10)
            }
        }
    }
}

fn resource_name(t: u32) -> &'static str {
    match t {
        1 => "other device",
        14 => "floppy drive",
        21 => "serial port? (other storage)",
        23 => "USB controller",
        24 => "graphics controller",
        35 => "sound card",
        _ => "device",
    }
}

/// A plain file name: no folders, no `..`, nothing hidden.
fn plain(href: &str) -> bool {
    !href.is_empty()
        && href.len() <= 255
        && !href.starts_with('.')
        && !href.contains(['/', '\\', '\0', ':'])
}

/// Reads a descriptor.
pub fn parse(xml: &str) -> Result<OvfPlan, String> {
    if xml.len() > MAX_OVF {
        return Err(format!("the descriptor is larger than {MAX_OVF} bytes"));
    }
    let doc = Document::parse(xml).map_err(|e| format!("not an OVF descriptor: {e}"))?;
    let env = doc.root_element();
    if env.tag_name().name() != "Envelope" {
        return Err("not an OVF descriptor: no Envelope".into());
    }
    // References: file id -> plain name
    let mut files: HashMap<&str, &str> = HashMap::new();
    if let Some(refs) = child(env, "References") {
        for f in refs.children().filter(|c| c.tag_name().name() == "File") {
            let (Some(id), Some(href)) = (attr(f, "id"), attr(f, "href")) else {
                continue;
            };
            if !plain(href) {
                return Err(format!(
                    "file {href:?}: only plain file names inside the OVA are allowed"
                ));
            }
            files.insert(id, href);
        }
    }
    // Disks: disk id -> (file, capacity)
    let mut disks: HashMap<&str, (&str, Option<u64>)> = HashMap::new();
    if let Some(ds) = child(env, "DiskSection") {
        for d in ds.children().filter(|c| c.tag_name().name() == "Disk") {
            let Some(id) = attr(d, "diskId") else {
                continue;
            };
            let file = match attr(d, "fileRef") {
                Some(r) => *files
                    .get(r)
                    .ok_or_else(|| format!("disk {id} names file {r}, which References lacks"))?,
                None => {
                    return Err(format!(
                        "disk {id} has no file (empty disks are not imported)"
                    ))
                }
            };
            let cap = attr(d, "capacity")
                .and_then(|c| c.parse::<u64>().ok())
                .zip(units(attr(d, "capacityAllocationUnits")))
                .and_then(|(c, u)| c.checked_mul(u));
            disks.insert(id, (file, cap));
        }
    }
    let vs = env
        .descendants()
        .find(|n| n.tag_name().name() == "VirtualSystem")
        .ok_or("the descriptor has no VirtualSystem")?;
    let hw = child(vs, "VirtualHardwareSection").ok_or("no VirtualHardwareSection")?;
    let mut plan = OvfPlan {
        name: text(vs, "Name")
            .map(str::to_string)
            .or_else(|| attr(vs, "id").map(str::to_string)),
        cpus: 1,
        memory_mib: 512,
        firmware: Firmware::Bios,
        disks: vec![],
        nics: vec![],
        cdroms: 0,
        unmapped: vec![],
    };
    let items: Vec<Node> = hw
        .children()
        .filter(|c| {
            matches!(
                c.tag_name().name(),
                "Item" | "StorageItem" | "EthernetPortItem"
            )
        })
        .collect();
    // controllers: instance id -> bus
    let mut controllers: HashMap<&str, DiskBus> = HashMap::new();
    for it in &items {
        let t: u32 = text(*it, "ResourceType")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let id = text(*it, "InstanceID").unwrap_or("");
        let bus = match t {
            5 => Some(DiskBus::Ide),
            6 => Some(DiskBus::Scsi),
            20 => Some(DiskBus::Sata),
            _ => None,
        };
        if let Some(b) = bus {
            controllers.insert(id, b);
        }
    }
    for it in &items {
        let t: u32 = text(*it, "ResourceType")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        // shown to admins: no control or format characters
        let label = text(*it, "ElementName")
            .or_else(|| text(*it, "Description"))
            .unwrap_or("")
            .chars()
            .filter(|c| {
                !c.is_control() && !('\u{200b}'..='\u{206f}').contains(c) && *c != '\u{feff}'
            })
            .take(80)
            .collect::<String>();
        match t {
            3 => {
                let n: u64 = text(*it, "VirtualQuantity")
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(1);
                plan.cpus =
                    u32::try_from(n.clamp(1, u64::from(ferry_types::MAX_CPUS))).unwrap_or(1);
            }
            4 => {
                let q: u64 = text(*it, "VirtualQuantity")
                    .and_then(|q| q.parse().ok())
                    .ok_or("memory without a quantity")?;
                let u = units(text(*it, "AllocationUnits").or(Some("byte * 2^20")))
                    .ok_or("memory in units ferry does not know")?;
                plan.memory_mib = q.saturating_mul(u) >> 20;
            }
            5 | 6 | 20 => {
                let sub = text(*it, "ResourceSubType").unwrap_or("");
                if !sub.is_empty() {
                    plan.unmapped.push(format!(
                        "controller {sub:?} ({label}): its disks go to ferry's own controller of that bus"
                    ));
                }
            }
            10 => {
                let sub = text(*it, "ResourceSubType")
                    .unwrap_or("")
                    .to_ascii_lowercase();
                let model = match sub.as_str() {
                    "e1000" => NicModel::E1000,
                    "e1000e" => NicModel::E1000e,
                    "vmxnet3" => NicModel::Vmxnet3,
                    "virtio" | "virtio-net" => NicModel::Virtio,
                    "rtl8139" => NicModel::Rtl8139,
                    other => {
                        plan.unmapped
                            .push(format!("NIC model {other:?} ({label}): imported as e1000"));
                        NicModel::E1000
                    }
                };
                if plan.nics.len() < MAX_NICS {
                    plan.nics.push(model);
                } else {
                    plan.unmapped
                        .push(format!("NIC {label}: more than {MAX_NICS}"));
                }
                if let Some(c) = text(*it, "Connection") {
                    plan.unmapped.push(format!(
                        "network {:?}: the NIC goes to the bridge given at import",
                        c.chars().take(80).collect::<String>()
                    ));
                }
            }
            15 | 16 => plan.cdroms += 1,
            17 => {
                let host = text(*it, "HostResource").unwrap_or("");
                let id = host
                    .strip_prefix("ovf:/disk/")
                    .or_else(|| host.strip_prefix("/disk/"))
                    .ok_or_else(|| format!("disk item {label:?} names no disk ({host:?})"))?;
                let (file, capacity) = *disks.get(id).ok_or_else(|| {
                    format!("disk item {label:?} names disk {id}, which DiskSection lacks")
                })?;
                let bus = text(*it, "Parent")
                    .and_then(|p| controllers.get(p).copied())
                    .unwrap_or(DiskBus::Sata);
                if plan.disks.len() >= MAX_DISKS {
                    return Err(format!("more than {MAX_DISKS} disks"));
                }
                plan.disks.push(OvfDisk {
                    file: file.to_string(),
                    bus,
                    capacity,
                });
            }
            0 => {}
            other => plan.unmapped.push(format!(
                "{} ({label}, resource type {other}): not imported",
                resource_name(other)
            )),
        }
    }
    for c in hw.children().filter(|c| c.tag_name().name() == "Config") {
        if attr(c, "key") == Some("firmware") && attr(c, "value") == Some("efi") {
            plan.firmware = Firmware::Uefi;
        }
    }
    if plan.disks.is_empty() {
        return Err("the descriptor names no disk".into());
    }
    let mut seen = std::collections::HashSet::new();
    for d in &plan.disks {
        if !seen.insert(&d.file) {
            return Err(format!("file {} is used by two disks", d.file));
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests;
