//! A migration through a man in the middle on the lab: a TCP relay on a
//! third machine of the fabric (the client namespace) between the source on
//! host a and `ferry receive` on host b, that forwards the handshake
//! untouched and then rewrites, injects or replays bytes. Every attempt
//! must be refused, with the VM still running (memory verified, its
//! shared-volume disk's pattern intact and still under host a's lease) on
//! the source and nothing kept on the destination.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_e2e::{
    boot_with_disk, command, disk_intact, kvm_available, lease_owner, receiver_with_disks, volume_with_disk, Lab,
    TempDir, Vm,
};

const T: Duration = Duration::from_secs(60);

/// Bytes the Noise handshake's first message takes (length prefix,
/// ephemeral key, tag): what the relay forwards before it starts meddling.
const HANDSHAKE_BYTES: usize = 2 + 32 + 16;

/// Where the destination listens, and where the relay does (the client
/// namespace's address on the fabric).
const DEST_PORT: u16 = 7880;
const RELAY_PORT: u16 = 7881;

/// A lab with the guest (disk d0, pattern `seed`) on host a and a receiver
/// on host b.
fn setup(tag: &str, seed: u32) -> (Lab, TempDir, String, Vm, Vm) {
    let lab = Lab::up_with_taps(tag);
    let dir = TempDir::new(tag);
    let vol = volume_with_disk(&dir);
    let vm = boot_with_disk(&lab, &vol, 64, "wss_mib=16 dirty_mib_s=8", seed);
    let dest = receiver_with_disks(&lab, &dir, DEST_PORT, &[]);
    (lab, dir, vol, vm, dest)
}

/// What the relay does to the source's bytes.
#[derive(Clone, Copy)]
enum Meddle {
    /// Flip one bit this far into the stream.
    Flip(usize),
    /// Insert a forged record right after the handshake.
    Inject,
    /// Forward untouched (and record).
    None,
}

/// A relay on the lab's client machine, from its RELAY_PORT to the
/// receiver on host b, for one connection. Returns the source→destination
/// bytes it saw, once it listens.
fn relay(lab: &Lab, meddle: Meddle) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let (listening, ready) = std::sync::mpsc::channel();
    let t = ferry_e2e::in_netns(&lab.netns("client"), move || {
        let listener = TcpListener::bind((Lab::SUBNET_CLIENT, RELAY_PORT)).unwrap();
        listening.send(()).unwrap();
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect((Lab::SUBNET_HOST_B, DEST_PORT)).unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(T)).unwrap();
        }
        let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let back = {
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = s_read.read(&mut buf) {
                    if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            })
        };
        let mut buf = [0u8; 65536];
        let mut at = 0usize;
        let mut injected = false;
        while let Ok(n) = c_read.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = &mut buf[..n];
            if let Meddle::Flip(target) = meddle {
                if (at..at + n).contains(&target) {
                    chunk[target - at] ^= 0x01;
                }
            }
            recorded.lock().unwrap().extend_from_slice(chunk);
            if matches!(meddle, Meddle::Inject) && !injected && at + n >= HANDSHAKE_BYTES {
                let split = HANDSHAKE_BYTES - at;
                if s_write.write_all(&chunk[..split]).is_err() {
                    break;
                }
                // A record of the right shape that nobody with the key sealed.
                let mut forged = vec![0x00, 0x40];
                forged.extend_from_slice(&[0x5a; 64]);
                let _ = s_write.write_all(&forged);
                injected = true;
                if s_write.write_all(&chunk[split..]).is_err() {
                    break;
                }
            } else if s_write.write_all(chunk).is_err() {
                break;
            }
            at += n;
        }
        let _ = s_write.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
    });
    ready.recv_timeout(T).expect("the relay listens");
    (seen, t)
}

/// A quick migration from host a through the relay.
fn migrate_through_relay(lab: &Lab, vm: &Vm, extra: &[&str]) -> (bool, String) {
    let to = format!("tcp:{}:{RELAY_PORT}", Lab::SUBNET_CLIENT);
    let mut args = vec!["--mode", "quick"];
    args.extend_from_slice(extra);
    let (ok, _, err) = ferry_e2e::migrate_in_lab(lab, "a", vm, &to, &args);
    (ok, err)
}

fn assert_refused_and_intact(vm: &Vm, dest: &Vm, vol: &str, seed: u32, what: &str) {
    assert_eq!(vm.info()["state"], "Running", "{what}: the VM keeps running on the source");
    let v = command(vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{what}: {v}");
    disk_intact(vm, seed, what);
    assert_eq!(lease_owner(vol), "a", "{what}: the disk stays host a's");
    dest.wait_stderr(T, "nothing kept");
    assert!(!dest.api_sock.exists(), "{what}: no VM ever ran on the destination");
}

#[test]
fn a_relay_that_rewrites_one_memory_byte_is_refused_and_the_vm_stays_on_the_source() {
    if !kvm_available("a_relay_that_rewrites_one_memory_byte_is_refused_and_the_vm_stays_on_the_source") {
        return;
    }
    let (lab, _dir, vol, vm, dest) = setup("hn1", 11);
    // Well past the handshake and the hello: inside guest memory.
    let (_, t) = relay(&lab, Meddle::Flip(300_000));
    let (ok, err) = migrate_through_relay(&lab, &vm, &[]);
    t.join().unwrap();
    assert!(!ok, "a rewritten byte must fail the migration");
    eprintln!("source saw: {err}");
    assert_refused_and_intact(&vm, &dest, &vol, 11, "rewritten byte");
    assert!(
        dest.stderr().contains("tamper") || dest.stderr().contains("invalid") || dest.stderr().contains("secure"),
        "the destination names the tampering: {}",
        dest.stderr()
    );
}

#[test]
fn a_frame_injected_after_the_handshake_is_refused() {
    if !kvm_available("a_frame_injected_after_the_handshake_is_refused") {
        return;
    }
    let (lab, _dir, vol, vm, dest) = setup("hn2", 12);
    let (_, t) = relay(&lab, Meddle::Inject);
    let (ok, _) = migrate_through_relay(&lab, &vm, &[]);
    t.join().unwrap();
    assert!(!ok, "an injected record must fail the migration");
    assert_refused_and_intact(&vm, &dest, &vol, 12, "injected record");
}

#[test]
fn a_replayed_recorded_stream_is_refused() {
    if !kvm_available("a_replayed_recorded_stream_is_refused") {
        return;
    }
    let (lab, _dir, vol, vm, dest) = setup("hn3", 13);
    // Record a real (check-only) session through an honest relay...
    let (seen, t) = relay(&lab, Meddle::None);
    let (ok, err) = migrate_through_relay(&lab, &vm, &["--check-only"]);
    t.join().unwrap();
    assert!(ok, "the honest relay changes nothing: {err}");
    dest.wait_stderr(T, "preflight passed");
    // ...then play it back to the receiver as a new connection, from the
    // relay's machine.
    let recorded = seen.lock().unwrap().clone();
    assert!(recorded.len() > HANDSHAKE_BYTES, "something was recorded");
    ferry_e2e::in_netns(&lab.netns("client"), move || {
        let mut c = TcpStream::connect((Lab::SUBNET_HOST_B, DEST_PORT)).unwrap();
        c.write_all(&recorded).unwrap();
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    })
    .join()
    .unwrap();
    dest.wait_stderr(T, "nothing kept");
    assert!(!dest.api_sock.exists(), "the replay never ran a VM");
    assert_refused_and_intact(&vm, &dest, &vol, 13, "replayed stream");
}
