//! One contender in the lease race of tests/tests/csv_fs.rs: waits until a
//! common start time so that every contender calls acquire at once, then
//! tries to acquire the disk's lease on the volume. Prints `won EPOCH` and
//! exits 0, or prints why it lost and exits 1.
//!
//! Usage: lease-race VOLUME DISK HOST START_UNIX_MS

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use csv_fs::{LeaseStore, Volume};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: lease-race VOLUME DISK HOST START_UNIX_MS");
        std::process::exit(2);
    }
    let start: u64 = args[4].parse().expect("START_UNIX_MS");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    std::thread::sleep(Duration::from_millis(start.saturating_sub(now)));
    let volume = Volume::open(args[1].as_ref()).unwrap_or_else(|e| {
        eprintln!("lease-race: {e}");
        std::process::exit(2)
    });
    match volume.lease_store(Duration::from_secs(30)).acquire(&args[2], &args[3]) {
        Ok(lease) => println!("won {}", lease.epoch),
        Err(e) => {
            println!("lost: {e}");
            std::process::exit(1);
        }
    }
}
