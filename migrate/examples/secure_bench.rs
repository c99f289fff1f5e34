//! Throughput of the secure migration channel against a plain stream.
//!
//! `cargo run --release -p migrate --example secure_bench [MIB] [REPEATS]`
//!
//! Pushes MIB (default 1024) MiB in 1 MiB writes (as round 0 sends memory
//! frames) through a Unix socketpair and through loopback TCP: plain
//! `Stream`, then `SecureWriter`/`SecureReader` for each cipher and backend.
//! Prints MiB/s (best of REPEATS, default 3) and the ratio to plain.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use migrate::auth::{self, Key};
use migrate::secure::{self, Backend, Cipher, Records, Suite};
use migrate::transport::{connect, Endpoint, Listener, Stream};

const CHUNK: usize = 1 << 20;

/// Makes a connected pair of streams.
type Pair = fn() -> std::io::Result<(Stream, Stream)>;

fn unix_pair() -> std::io::Result<(Stream, Stream)> {
    Stream::pair()
}

fn tcp_pair() -> std::io::Result<(Stream, Stream)> {
    let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into()))?;
    let Listener::Tcp(tcp) = &l else { unreachable!("a tcp endpoint") };
    let addr = tcp.local_addr()?;
    let a = connect(&Endpoint::Tcp(addr.to_string()), std::time::Duration::from_secs(5))?;
    let b = l.accept()?;
    Ok((a, b))
}

/// Sends `total` bytes from `w` to `r` (on two threads); returns the time
/// from the first write to the last byte read.
fn push(mut w: impl Write + Send + 'static, mut r: impl Read, total: usize, finish: fn(&mut dyn Write)) -> Duration {
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 131 + 7) as u8).collect();
    let t0 = Instant::now();
    let writer = thread::spawn(move || {
        let mut sent = 0;
        while sent < total {
            w.write_all(&data).expect("write");
            sent += CHUNK;
        }
        finish(&mut w);
        w
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < total {
        r.read_exact(&mut buf).expect("read");
        got += CHUNK;
    }
    let took = t0.elapsed();
    drop(writer.join().expect("writer thread"));
    took
}

fn plain(pair: Pair, total: usize) -> Duration {
    let (a, b) = pair().expect("connect");
    push(a, b, total, |w| w.flush().expect("flush"))
}

fn encrypted(pair: Pair, total: usize, key: &Key, suite: Suite) -> Duration {
    let (a, b) = pair().expect("connect");
    let deadline = Instant::now() + Duration::from_secs(5);
    let k = key.clone();
    let dst = thread::spawn(move || secure::accept_with(b, &k, deadline, suite).expect("accept"));
    let (_sr, sw) = secure::connect_with(a, key, deadline, suite).expect("connect");
    let (dr, _dw) = dst.join().expect("accept thread");
    push(sw, dr, total, |w| w.flush().expect("flush"))
}

/// One thread sealing `total` bytes in full records, no socket: the
/// cipher's own ceiling on this machine.
fn seal_only(total: usize, suite: Suite) -> Duration {
    use snow::resolvers::{BoxedCryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
    let resolver = || -> BoxedCryptoResolver {
        match suite.backend {
            Backend::Ring => Box::new(FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver))),
            Backend::RustCrypto => Box::new(DefaultResolver),
        }
    };
    let psk = [7u8; 32];
    let build = || snow::Builder::with_resolver(suite.pattern().parse().expect("pattern"), resolver());
    let mut i = build().psk(0, &psk).expect("psk").build_initiator().expect("initiator");
    let mut r = build().psk(0, &psk).expect("psk").build_responder().expect("responder");
    let (mut m, mut p) = ([0u8; 256], [0u8; 256]);
    let n = i.write_message(&[], &mut m).expect("m1");
    r.read_message(&m[..n], &mut p).expect("m1");
    let n = r.write_message(&[], &mut m).expect("m2");
    i.read_message(&m[..n], &mut p).expect("m2");
    let t = i.into_stateless_transport_mode().expect("transport");
    let plain = vec![5u8; secure::MAX_PLAIN];
    let mut out = vec![0u8; secure::MAX_RECORD];
    let t0 = Instant::now();
    let mut nonce = 0;
    let mut done = 0;
    while done < total {
        t.write_message(nonce, &plain, &mut out).expect("seal");
        nonce += 1;
        done += plain.len();
    }
    t0.elapsed()
}

fn mib_s(total: usize, d: Duration) -> f64 {
    total as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let repeats: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let total = mib << 20;
    let key_path = std::env::temp_dir().join(format!("ferry-secure-bench-{}.key", std::process::id()));
    std::fs::write(&key_path, auth::new_key_hex().expect("random key")).expect("write key");
    let key = Key::load(&key_path).expect("load key");
    let _ = std::fs::remove_file(&key_path);

    let suites = [
        ("AESGCM ring", Suite { cipher: Cipher::AesGcm, backend: Backend::Ring, records: Records::Sealed }),
        ("ChaChaPoly ring", Suite { cipher: Cipher::ChaChaPoly, backend: Backend::Ring, records: Records::Sealed }),
        ("AESGCM RustCrypto", Suite { cipher: Cipher::AesGcm, backend: Backend::RustCrypto, records: Records::Sealed }),
        (
            "ChaChaPoly RustCrypto",
            Suite { cipher: Cipher::ChaChaPoly, backend: Backend::RustCrypto, records: Records::Sealed },
        ),
    ];
    for (sname, suite) in suites {
        let d = (0..repeats).map(|_| seal_only(total, suite)).min().unwrap_or_default();
        println!("{:16} {sname:22} {:8.0} MiB/s", "seal only", mib_s(total, d));
    }
    let transports: [(&str, Pair); 2] = [("unix socketpair", unix_pair), ("loopback tcp", tcp_pair)];
    println!("{mib} MiB in 1 MiB writes, best of {repeats}");
    for (tname, pair) in transports {
        let best = |f: &dyn Fn() -> Duration| (0..repeats).map(|_| f()).min().unwrap_or_default();
        let p = mib_s(total, best(&|| plain(pair, total)));
        println!("{tname:16} {:22} {p:8.0} MiB/s", "plain");
        for (sname, suite) in suites {
            let e = mib_s(total, best(&|| encrypted(pair, total, &key, suite)));
            println!("{tname:16} {sname:22} {e:8.0} MiB/s  ratio {:.2}", e / p);
        }
    }
}
