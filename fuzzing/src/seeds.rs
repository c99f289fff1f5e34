//! Valid inputs for each target, made with Ferry's own writers.

use csv_fs::{Format, Image};
use migrate::wire::{self, Ack, Hello, Kind, Mode, Reason, Requirements, ZeroRange};
use vmm::state::{devices::DevicesState, vm::VmArchState, VmState};

type Seed = (&'static str, String, Vec<u8>);

pub fn vm_state(mem_mib: u64) -> VmState {
    VmState {
        machine: vmm::MachineConfig::new("/k"),
        run_state: vmm::RunState::Paused,
        mem_bytes: mem_mib << 20,
        vcpus: Vec::new(),
        vm: VmArchState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: DevicesState { serial: Default::default(), virtio: Vec::new(), pending_irqs: Vec::new() },
    }
}

fn frames() -> Vec<u8> {
    let mut s = Vec::new();
    let requirements = Requirements {
        mem_bytes: 64 << 20,
        vcpus: 2,
        nics: Vec::new(),
        disks: vec![vmm::migration::DiskRequirement {
            disk: "/v/d.img".parse().expect("disk config"),
            size_bytes: 16 << 20,
            identity: "inode 12".into(),
        }],
        guest_cpuid: Vec::new(),
        tsc_khz: 2_000_000,
    };
    let hello = Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        mode: Mode::Live,
        requirements,
        check_only: false,
        switchover_timeout_ms: 10_000,
    };
    wire::send(&mut s, Kind::Hello, &hello).unwrap();
    wire::send(&mut s, Kind::HelloAck, &Ack { host_id: "host-b".into() }).unwrap();
    wire::send(&mut s, Kind::MemZero, &ZeroRange { offset: 4096, len: 8192 }).unwrap();
    wire::write_frame(&mut s, Kind::MemData, &wire::mem_data_payload(0, &[7; 64])).unwrap();
    wire::send(&mut s, Kind::Abort, &Reason { reason: "test".into() }).unwrap();
    s
}

fn image(format: Format, size: u64) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("seed.{}", format.extension()));
    let _ = std::fs::remove_file(&path);
    Image::create(&path, format, size).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// A blk input (see `blk::fuzz_virtio_blk_chain`): descriptors
/// `(area offset, len, flags, next)`, the heads, and the request area.
fn chain(descs: &[(u64, u32, u16, u16)], heads: &[u8], area: &[(usize, &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; 256];
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        out[i * 16..i * 16 + 8].copy_from_slice(&addr.to_le_bytes());
        let word = len as u64 | (flags as u64) << 32 | (next as u64) << 48;
        out[i * 16 + 8..i * 16 + 16].copy_from_slice(&word.to_le_bytes());
    }
    out.push(heads.len() as u8 - 1);
    let mut h = [0u8; 8];
    h[..heads.len()].copy_from_slice(heads);
    out.extend_from_slice(&h);
    let mut bytes = vec![0u8; area.iter().map(|(at, b)| at + b.len()).max().unwrap_or(0)];
    for (at, b) in area {
        bytes[*at..*at + b.len()].copy_from_slice(b);
    }
    out.extend_from_slice(&bytes);
    out
}

fn blk_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A whole quick migration of a 16 MiB, one-vCPU guest as the source
/// sends it after the handshake, ending with `last` (Commit or Abort).
fn destination_stream(check_only: bool, last: Option<Kind>) -> Vec<u8> {
    let mut s = Vec::new();
    let requirements = Requirements {
        mem_bytes: 16 << 20,
        vcpus: 1,
        nics: Vec::new(),
        disks: Vec::new(),
        guest_cpuid: Vec::new(),
        tsc_khz: 0,
    };
    let hello = Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        mode: Mode::Quick,
        requirements,
        check_only,
        switchover_timeout_ms: 1000,
    };
    wire::send(&mut s, Kind::Hello, &hello).unwrap();
    if check_only {
        return s;
    }
    wire::write_frame(&mut s, Kind::MemData, &wire::mem_data_payload(0x10000, &[7; 4096])).unwrap();
    wire::send(&mut s, Kind::MemZero, &ZeroRange { offset: 0x20000, len: 0x3000 }).unwrap();
    // What a live source sends before it pauses the guest.
    wire::write_frame(&mut s, Kind::CatchUp, &[]).unwrap();
    let mut state = vm_state(16);
    state.machine.mem_mib = 16;
    state.machine.vcpus = 1;
    state.vcpus.push(vcpu_state());
    wire::write_frame(&mut s, Kind::State, &state.encode().unwrap()).unwrap();
    match last {
        Some(Kind::Abort) => wire::send(&mut s, Kind::Abort, &Reason { reason: "seed".into() }).unwrap(),
        Some(kind) => wire::write_frame(&mut s, kind, &[]).unwrap(),
        None => {}
    }
    s
}

fn vcpu_state() -> vmm::state::vcpu::VcpuState {
    vmm::state::vcpu::VcpuState {
        id: 0,
        cpuid: Vec::new(),
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: Vec::new(),
        vcpu_events: Default::default(),
        tsc_khz: 0,
    }
}

/// A queue-restore input (see `queue::fuzz_virtio_queue_restore`): a
/// driver-ready virtio-blk with one ready queue whose rings hold a read of
/// sector 0, then register reads.
fn queue_restore(ready: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&15u32.to_le_bytes()); // ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
    out.extend_from_slice(&(1u64 << 32).to_le_bytes()); // VIRTIO_F_VERSION_1
    out.extend_from_slice(&[0u8; 16]); // feature selectors, queue_sel, interrupt status
    out.push(u8::from(ready));
    for v in [256u16, 16, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes()); // max size, size, next avail, next used
    }
    for ring in [0u64, 0x100, 0x200] {
        out.extend_from_slice(&ring.to_le_bytes()); // descriptors, avail, used (window offsets)
    }
    const WINDOW: u64 = 0x1000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let mut chunk = vec![0u8; 0x3001];
    let descs =
        [(WINDOW + 0x1000, 16u32, NEXT, 1u16), (WINDOW + 0x2000, 512, NEXT | WRITE, 2), (WINDOW + 0x3000, 1, WRITE, 0)];
    for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
        let at = i * 16;
        chunk[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        chunk[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        chunk[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        chunk[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    }
    chunk[0x102..0x104].copy_from_slice(&1u16.to_le_bytes()); // avail idx 1, ring[0] = head 0
    chunk[0x1000..0x1010].copy_from_slice(&blk_header(0, 0));
    out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
    out.extend_from_slice(&chunk);
    for (offset, value) in [(0x070u16, 1u32), (0x060, 1), (0x044, 1)] {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

pub fn all() -> Vec<Seed> {
    let mut v: Vec<Seed> = Vec::new();
    v.push(("wire_frames", "stream".into(), frames()));
    let state = vm_state(16).encode().unwrap();
    v.push(("vm_state", "paused".into(), state.clone()));
    v.push(("snapshot_load", "paused".into(), state));
    v.push(("vhd_open", "fixed".into(), image(Format::VhdFixed, 64 << 10)));
    v.push(("vhd_open", "dynamic".into(), image(Format::VhdDynamic, 4 << 20)));
    v.push(("qcow2_open", "empty".into(), image(Format::Qcow2, 1 << 20)));
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let (hdr, data, status) = (0u64, 0x100u64, 0x2000u64);
    let read = chain(
        &[(hdr, 16, NEXT, 1), (data, 1024, NEXT | WRITE, 2), (status, 1, WRITE, 0)],
        &[0],
        &[(0, &blk_header(0, 4))],
    );
    v.push(("virtio_blk_chain", "read".into(), read));
    let write = chain(
        &[(hdr, 16, NEXT, 1), (data, 512, NEXT, 2), (status, 1, WRITE, 0), (0x40, 16, NEXT, 4), (status, 1, WRITE, 0)],
        &[0, 3],
        &[(0, &blk_header(1, 2)), (0x40, &blk_header(4, 0)), (data as usize, &[0xab; 512])],
    );
    v.push(("virtio_blk_chain", "write-flush".into(), write));
    v.push(("api_request", "get-info".into(), b"GET /vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()));
    let body = br#"{"to":"tcp:10.200.77.2:7700","mode":"live","key_file":"/etc/ferry/cluster.key","timeout_s":30}"#;
    let mut migrate = format!("PUT /vm.migrate HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    migrate.extend_from_slice(body);
    v.push(("api_request", "put-migrate".into(), migrate));
    v.push(("destination_stream", "check-only".into(), destination_stream(true, None)));
    v.push(("destination_stream", "commit".into(), destination_stream(false, Some(Kind::Commit))));
    v.push(("destination_stream", "abort".into(), destination_stream(false, Some(Kind::Abort))));
    v.push(("virtio_queue_restore", "blk-read".into(), queue_restore(true)));
    v.push(("virtio_queue_restore", "not-ready".into(), queue_restore(false)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::state::devices::{BackendSnapshot, QueueSnapshot, TransportSnapshot};

    /// A saved queue bigger than this host's devices offer is refused by the
    /// pure check, before anything is built (not first inside the restore).
    #[test]
    fn a_saved_queue_of_another_size_is_refused_before_building() {
        let mut state = vm_state(16);
        state.machine.mem_mib = 16;
        state.machine.vcpus = 1;
        state.vcpus.push(vcpu_state());
        let disk = BackendSnapshot::Block { path: "/v/d.img".into(), sectors: 128, readonly: false };
        let queue = |max_size| QueueSnapshot {
            max_size,
            size: 0,
            ready: false,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        };
        let mut transport = TransportSnapshot {
            device_type: 2,
            status: 0,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            queues: vec![queue(vmm::devices::virtio::QUEUE_SIZE)],
            backend: disk.clone(),
        };
        state.devices.virtio.push(transport.clone());
        let here = [disk];
        vmm::builder::check_restorable(&state.machine, &state, 16 << 20, &here).expect("this host's own shape");
        transport.queues[0] = queue(1024);
        state.devices.virtio[0] = transport;
        let e = vmm::builder::check_restorable(&state.machine, &state, 16 << 20, &here).unwrap_err();
        assert!(e.to_string().contains("1024 entries at most"), "{e}");
    }
}
