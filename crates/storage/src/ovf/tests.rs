use super::*;

/// As VMware exports a VM (trimmed): two CPUs, 2 GiB, an LSI Logic SCSI disk, a
/// SATA disk, a VMXNET3 NIC, a CD-ROM, a sound card, a USB controller, EFI.
pub(crate) const VMWARE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
    <File ovf:href="web-disk1.vmdk" ovf:id="file1" ovf:size="68157440"/>
    <File ovf:href="web-disk2.vmdk" ovf:id="file2" ovf:size="1024"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Network ovf:name="VM Network"/></NetworkSection>
  <VirtualSystem ovf:id="web">
    <Info>A virtual machine</Info>
    <Name>web</Name>
    <VirtualHardwareSection>
      <System><vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType></System>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ElementName>2 virtual CPU(s)</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>2048MB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>SCSI controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:ElementName>SATA controller 0</rasd:ElementName><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard disk 1</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>5</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:ElementName>Hard disk 2</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource><rasd:InstanceID>6</rasd:InstanceID><rasd:Parent>4</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>VM Network</rasd:Connection><rasd:ElementName>Network adapter 1</rasd:ElementName><rasd:InstanceID>7</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item ovf:required="false"><rasd:AutomaticAllocation>false</rasd:AutomaticAllocation><rasd:ElementName>CD/DVD drive 1</rasd:ElementName><rasd:InstanceID>8</rasd:InstanceID><rasd:Parent>4</rasd:Parent><rasd:ResourceType>15</rasd:ResourceType></Item>
      <Item ovf:required="false"><rasd:ElementName>Sound card</rasd:ElementName><rasd:InstanceID>9</rasd:InstanceID><rasd:ResourceSubType>vmware.soundcard.hdaudio</rasd:ResourceSubType><rasd:ResourceType>1</rasd:ResourceType></Item>
      <Item ovf:required="false"><rasd:ElementName>USB controller</rasd:ElementName><rasd:InstanceID>10</rasd:InstanceID><rasd:ResourceSubType>vmware.usb.ehci</rasd:ResourceSubType><rasd:ResourceType>23</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

#[test]
fn a_vmware_export_maps_to_a_vm_and_says_what_it_left_out() {
    let p = parse(VMWARE).unwrap();
    assert_eq!(p.name.as_deref(), Some("web"));
    assert_eq!((p.cpus, p.memory_mib), (2, 2048));
    assert_eq!(p.firmware, Firmware::Uefi);
    assert_eq!(
        p.disks,
        vec![
            OvfDisk {
                file: "web-disk1.vmdk".into(),
                bus: DiskBus::Scsi,
                capacity: Some(64 << 20)
            },
            OvfDisk {
                file: "web-disk2.vmdk".into(),
                bus: DiskBus::Sata,
                capacity: Some(1 << 30)
            },
        ]
    );
    assert_eq!(p.nics, vec![NicModel::Vmxnet3]);
    assert_eq!(p.cdroms, 1);
    let un = p.unmapped.join("\n");
    for w in ["Sound card", "USB controller", "lsilogic", "VM Network"] {
        assert!(un.contains(w), "{w} not listed:\n{un}");
    }
}

#[test]
fn hostile_or_broken_descriptors_are_refused_with_the_reason() {
    let cases = [
        (
            VMWARE.replace("web-disk1.vmdk", "../../etc/shadow"),
            "plain file names",
        ),
        (
            VMWARE.replace("web-disk1.vmdk", "/etc/shadow"),
            "plain file names",
        ),
        (
            VMWARE.replace("ovf:fileRef=\"file1\"", "ovf:fileRef=\"nofile\""),
            "References lacks",
        ),
        (
            VMWARE.replace("ovf:/disk/vmdisk1", "ovf:/disk/other"),
            "DiskSection lacks",
        ),
        (
            VMWARE.replace("web-disk2.vmdk", "web-disk1.vmdk"),
            "used by two disks",
        ),
        ("<html/>".to_string(), "no Envelope"),
        ("not xml".to_string(), "not an OVF descriptor"),
        (
            format!(
                "<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]>{}",
                &VMWARE[VMWARE.find("<Envelope").unwrap()..]
            )
            .replace("<Name>web</Name>", "<Name>&e;</Name>"),
            "not an OVF descriptor",
        ),
        ("x".repeat(MAX_OVF + 1), "larger than"),
    ];
    for (xml, want) in cases {
        let e = parse(&xml).unwrap_err();
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
}

#[test]
fn units_of_memory_and_capacity() {
    assert_eq!(units(Some("byte * 2^20")), Some(1 << 20));
    assert_eq!(units(Some("MegaBytes")), Some(1 << 20));
    assert_eq!(units(Some("byte * 10^9")), Some(1_000_000_000));
    assert_eq!(units(None), Some(1));
    assert_eq!(units(Some("byte * 2^99")), None);
    assert_eq!(units(Some("furlongs")), None);
}
