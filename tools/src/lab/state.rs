//! The lab's record of what it created: /run/ferry-lab/NAME.json. A
//! namespace counts as the lab's only if this file lists it with the same
//! identity it has now; anything else is someone else's and is left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::netns::NsId;
use super::topology::Role;
use super::LabError;

/// Where lab state files live (tmpfs: a reboot forgets labs, as it does
/// their namespaces).
pub const STATE_DIR: &str = "/run/ferry-lab";

const STATE_VERSION: u32 = 1;

/// How long a command waits for another one working on any lab.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub name: String,
    /// Namespaces the lab created, by role.
    pub namespaces: BTreeMap<Role, NsRecord>,
    /// VM taps the lab created, by host role.
    pub taps: BTreeMap<Role, BTreeSet<String>>,
    /// Processes the lab started (its etcd members), each with the start
    /// time that tells it apart from a later process given the same PID.
    pub pids_started: Vec<Started>,
    /// The VM hosts (a lab made before `--hosts` existed has a and b).
    #[serde(default = "default_hosts")]
    pub hosts: Vec<Role>,
    /// Whether the hosts run etcd members.
    #[serde(default)]
    pub etcd: bool,
    /// Hosts whose link to the fabric is cut (`ferry lab cut`).
    #[serde(default)]
    pub cut: BTreeSet<Role>,
}

fn default_hosts() -> Vec<Role> {
    Role::DEFAULT_HOSTS.to_vec()
}

/// A process the lab started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat (clock ticks since boot).
    pub start_ticks: u64,
    /// The host it runs in.
    pub role: Role,
    /// What it is ("etcd").
    pub what: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NsRecord {
    pub netns: String,
    pub dev: u64,
    pub ino: u64,
    /// A random tag the lab set as the namespace's loopback alias: the
    /// kernel reuses nsfs inode numbers, so a namespace deleted and made
    /// again under this name by someone else could match (dev, ino) alone.
    /// Absent in labs made before it existed (then the inode decides).
    #[serde(default)]
    pub tag: Option<String>,
}

impl NsRecord {
    pub fn id(&self) -> NsId {
        NsId { dev: self.dev, ino: self.ino }
    }
}

pub fn path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

/// The lab's own directory (etcd data and logs): /run/ferry-lab/NAME/.
pub fn dir(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name)
}

impl State {
    pub fn new(name: &str) -> State {
        State { version: STATE_VERSION, name: name.to_owned(), hosts: default_hosts(), ..State::default() }
    }

    /// Reads lab `name`'s state; None if it has none.
    pub fn load(name: &str) -> Result<Option<State>, LabError> {
        let p = path(name);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LabError::StateIo { path: p, source }),
        };
        let state: State =
            serde_json::from_str(&text).map_err(|source| LabError::StateCorrupt { path: p.clone(), source })?;
        if state.name != name {
            return Err(LabError::StateMismatch { path: p, found: state.name });
        }
        Ok(Some(state))
    }

    /// Writes the state atomically (temporary file, fsync, rename).
    pub fn save(&self) -> Result<(), LabError> {
        let p = path(&self.name);
        let tmp = p.with_extension("json.tmp");
        let io = |source| LabError::StateIo { path: p.clone(), source };
        let text = serde_json::to_string_pretty(self).expect("lab state serialises");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &p).map_err(io)
    }

    pub fn remove(&self) -> Result<(), LabError> {
        let p = path(&self.name);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LabError::StateIo { path: p, source }),
        }
    }
}

/// An exclusive lock on the state directory, held while a command changes
/// any lab (commands are short; labs of different names just take turns).
pub struct Lock {
    _dir: File,
}

impl Lock {
    pub fn acquire() -> Result<Lock, LabError> {
        let dir = Path::new(STATE_DIR);
        std::fs::create_dir_all(dir).map_err(|source| LabError::StateIo { path: dir.to_owned(), source })?;
        let f = File::open(dir).map_err(|source| LabError::StateIo { path: dir.to_owned(), source })?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            // SAFETY: flock on a descriptor we own; non-blocking.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Lock { _dir: f });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(LabError::StateIo { path: dir.to_owned(), source: err });
            }
            if Instant::now() >= deadline {
                return Err(LabError::Busy { path: dir.to_owned(), secs: LOCK_TIMEOUT.as_secs() });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
