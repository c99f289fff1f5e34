//! The witness: each agent also beats a heartbeat file on a directory of
//! the shared volume every node mounts (as Hyper-V's disk witness or
//! sanlock's delta leases do). It answers one question etcd cannot when
//! an agent loses its node lease: is anyone else alive to act on it?
//!
//! - Others alive (their heartbeats are fresh): they may hold the etcd
//!   quorum and restart this node's VMs once its lease expires, so the
//!   agent fences itself (kills its VMMs) first.
//! - Nobody else alive: no quorum exists anywhere (the others crashed),
//!   nobody can restart anything, and killing the VMs would only lose
//!   them: the agent keeps them running and waits for etcd to come back.
//!   Should another node appear meanwhile, it fences after all.
//!
//! A VMM cut off from the volume cannot renew its disk leases and fences
//! itself regardless, so an agent that cannot read the witness fences too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Beat {
    node: String,
    unix_ms: u64,
}

pub struct Witness {
    dir: PathBuf,
    me: String,
}

impl Witness {
    /// Heartbeats of cluster `cluster` under `root/.ferry-witness/`.
    pub fn new(root: &Path, cluster: &str, me: &str) -> std::io::Result<Witness> {
        let dir = root.join(".ferry-witness").join(cluster);
        std::fs::create_dir_all(&dir)?;
        Ok(Witness { dir, me: me.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes this node's heartbeat (aside, then renamed: whole or old).
    pub fn beat(&self) -> std::io::Result<()> {
        let b = Beat { node: self.me.clone(), unix_ms: cluster::records::unix_ms() };
        let tmp = self.dir.join(format!(".{}.tmp", self.me));
        std::fs::write(&tmp, serde_json::to_vec(&b).expect("serialises"))?;
        std::fs::rename(&tmp, self.dir.join(format!("{}.json", self.me)))
    }

    /// Other nodes that beat after `since_unix_ms`.
    pub fn alive_since(&self, since_unix_ms: u64) -> std::io::Result<Vec<String>> {
        let mut out = vec![];
        for e in std::fs::read_dir(&self.dir)? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let Ok(b) =
                std::fs::read(&p).map_err(|_| ()).and_then(|b| serde_json::from_slice::<Beat>(&b).map_err(|_| ()))
            else {
                continue;
            };
            if b.node != self.me && b.unix_ms > since_unix_ms {
                out.push(b.node);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Beats every `period` on a thread of its own until the returned flag
    /// is set.
    pub fn start(self: &Arc<Witness>, period: Duration) -> Arc<AtomicBool> {
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (self.clone(), stop.clone());
        std::thread::Builder::new()
            .name("witness".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Err(e) = w.beat() {
                        tracing::warn!("witness heartbeat in {}: {e}", w.dir.display());
                    }
                    std::thread::sleep(period);
                }
            })
            .expect("spawn the witness thread");
        stop
    }
}
