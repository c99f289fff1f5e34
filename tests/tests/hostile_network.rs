//! A migration through a man in the middle: a TCP relay between the source
//! and `ferry receive` that forwards the handshake untouched and then
//! rewrites, injects or replays bytes. Every attempt must be refused, with
//! the VM still running (and intact) on the source and nothing kept on the
//! destination.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_e2e::{cluster_key, command, heartbeat_number, kvm_available, s, Vm};

const T: Duration = Duration::from_secs(60);

/// Bytes the Noise handshake's first message takes (length prefix,
/// ephemeral key, tag): what the relay forwards before it starts meddling.
const HANDSHAKE_BYTES: usize = 2 + 32 + 16;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn source_vm() -> Vm {
    let guest = ferry_e2e::guest_elf();
    let vm = Vm::spawn(&[
        s("--kernel"),
        guest.display().to_string(),
        s("--cmdline"),
        s("heartbeat_ms=100 wss_mib=16 dirty_mib_s=8"),
        s("--mem-mib"),
        s("64"),
    ]);
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm
}

fn receiver(port: u16) -> Vm {
    let vm = Vm::launch(
        None,
        "receive",
        &[s("--listen"), format!("tcp:127.0.0.1:{port}"), s("--key-file"), cluster_key().display().to_string()],
    );
    vm.wait_stderr(T, "waiting for a migration");
    vm
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

/// A relay from a fresh local port to `upstream`, for one connection.
/// Returns its port and the source→destination bytes it saw.
fn relay(upstream: u16, meddle: Meddle) -> (u16, Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let t = std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
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
    (port, seen, t)
}

fn migrate_quick(vm: &Vm, port: u16, extra: &[&str]) -> (bool, String) {
    let key = cluster_key();
    let mut args = vec!["migrate", "--mode", "quick", "--key-file", key.to_str().unwrap()];
    let to = format!("tcp:127.0.0.1:{port}");
    args.extend(["--to", &to]);
    args.extend_from_slice(extra);
    let (ok, _, err) = vm.ferry(&args);
    (ok, err)
}

fn assert_refused_and_intact(vm: &Vm, dest: &Vm, what: &str) {
    assert_eq!(vm.info()["state"], "Running", "{what}: the VM keeps running on the source");
    let v = command(vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{what}: {v}");
    dest.wait_stderr(T, "nothing kept");
    assert!(!dest.api_sock.exists(), "{what}: no VM ever ran on the destination");
}

#[test]
fn a_relay_that_rewrites_one_memory_byte_is_refused_and_the_vm_stays_on_the_source() {
    if !kvm_available("a_relay_that_rewrites_one_memory_byte_is_refused_and_the_vm_stays_on_the_source") {
        return;
    }
    let vm = source_vm();
    let port = free_port();
    let dest = receiver(port);
    // Well past the handshake and the hello: inside guest memory.
    let (relay_port, _, t) = relay(port, Meddle::Flip(300_000));
    let (ok, err) = migrate_quick(&vm, relay_port, &[]);
    t.join().unwrap();
    assert!(!ok, "a rewritten byte must fail the migration");
    eprintln!("source saw: {err}");
    assert_refused_and_intact(&vm, &dest, "rewritten byte");
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
    let vm = source_vm();
    let port = free_port();
    let dest = receiver(port);
    let (relay_port, _, t) = relay(port, Meddle::Inject);
    let (ok, _) = migrate_quick(&vm, relay_port, &[]);
    t.join().unwrap();
    assert!(!ok, "an injected record must fail the migration");
    assert_refused_and_intact(&vm, &dest, "injected record");
}

#[test]
fn a_replayed_recorded_stream_is_refused() {
    if !kvm_available("a_replayed_recorded_stream_is_refused") {
        return;
    }
    let vm = source_vm();
    let port = free_port();
    let dest = receiver(port);
    // Record a real (check-only) session through an honest relay...
    let (relay_port, seen, t) = relay(port, Meddle::None);
    let (ok, err) = migrate_quick(&vm, relay_port, &["--check-only"]);
    t.join().unwrap();
    assert!(ok, "the honest relay changes nothing: {err}");
    dest.wait_stderr(T, "preflight passed");
    // ...then play it back to the receiver as a new connection.
    let recorded = seen.lock().unwrap().clone();
    assert!(recorded.len() > HANDSHAKE_BYTES, "something was recorded");
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(&recorded).unwrap();
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink);
    dest.wait_stderr(T, "nothing kept");
    assert!(!dest.api_sock.exists(), "the replay never ran a VM");
    assert_eq!(vm.info()["state"], "Running");
}
