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
    v
}
