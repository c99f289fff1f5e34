//! What a fenced agent leaves for the next one. When it fences it cannot
//! tell the cluster (etcd is out of reach, or its own loop hung), so it
//! writes a note in its state directory; the next agent started there
//! records it as a `node-fenced` event (`ferry cluster events`) once it
//! has registered, with the fence's own time.

use std::path::{Path, PathBuf};

use cluster::{Cluster, EventRecord, FORMAT_VERSION};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceNote {
    pub at_unix_ms: u64,
    pub why: String,
    /// What it killed: VM names (or VMM PIDs, from the watchdog).
    pub killed: Vec<String>,
    /// The agent's exit status (3: lease lost, 4: its watchdog).
    pub exit_code: i32,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("fenced.json")
}

/// Writes the note (aside, then renamed: whole or not at all).
pub fn write(state_dir: &Path, note: &FenceNote) -> std::io::Result<()> {
    let tmp = state_dir.join(".fenced.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(note).expect("a note serialises"))?;
    std::fs::rename(&tmp, path(state_dir))
}

/// The note a fenced agent left here, if any.
pub fn read(state_dir: &Path) -> Option<FenceNote> {
    let bytes = std::fs::read(path(state_dir)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!("{}: not a fence note ({e}); ignored", path(state_dir).display());
            None
        }
    }
}

/// The event for `note` about node `node`, recorded at `now_unix_ms`.
pub fn event(node: &str, note: &FenceNote, now_unix_ms: u64) -> EventRecord {
    EventRecord {
        v: FORMAT_VERSION,
        at_unix_ms: note.at_unix_ms,
        kind: "node-fenced".into(),
        node: node.to_owned(),
        vm: None,
        detail: format!(
            "its agent fenced itself: {}; killed {} VMM(s); exit status {} (recorded when it registered again)",
            note.why,
            note.killed.len(),
            note.exit_code
        ),
        figures: serde_json::json!({
            "killed": note.killed,
            "exit_code": note.exit_code,
            "recorded_unix_ms": now_unix_ms,
        }),
    }
}

/// Records a note left in `state_dir` as an event and removes it. A note
/// that cannot be recorded now stays for the next agent (after an unknown
/// outcome the event may then be there twice, which says nothing false).
pub async fn record(c: &Cluster, node: &str, state_dir: &Path) {
    let Some(note) = read(state_dir) else { return };
    let e = event(node, &note, cluster::records::unix_ms());
    match c.append_event(&e).await {
        Ok(_) => {
            eprintln!("ferry node: event node-fenced {node}: {}", e.detail);
            if let Err(err) = std::fs::remove_file(path(state_dir)) {
                tracing::warn!("cannot remove {}: {err}", path(state_dir).display());
            }
        }
        Err(err) => tracing::warn!("cannot record this node's fence at {} yet: {err}; kept for later", note.at_unix_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_round_trips_and_becomes_an_event_with_its_own_time() {
        let dir = std::env::temp_dir().join(format!("ferry-fence-note-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir), None);
        let note = FenceNote { at_unix_ms: 1000, why: "lease lost".into(), killed: vec!["db".into()], exit_code: 3 };
        write(&dir, &note).unwrap();
        assert_eq!(read(&dir), Some(note.clone()));
        let e = event("a", &note, 5000);
        assert_eq!((e.kind.as_str(), e.node.as_str(), e.at_unix_ms), ("node-fenced", "a", 1000));
        assert_eq!(e.figures["recorded_unix_ms"], 5000);
        assert!(e.detail.contains("lease lost; killed 1 VMM(s); exit status 3"), "{}", e.detail);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
