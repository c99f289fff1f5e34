//! Commands the cluster asks this node's agent to run (`ferry cluster
//! update`'s update command; see `cluster::commands`).
//!
//! The agent runs each run id at most once. It does not run the command
//! itself but through a runner (`ferry node command-runner`, this binary)
//! in its own process group with its files in `STATE/commands/RUN/`: the
//! command text, the runner's PID, the output (bounded), and at the end
//! `status.json`. So the command outlives an agent restart (an update
//! that restarts the agent, a crash): the next agent finds the run's
//! directory and follows it (or records its end) instead of running it
//! again; a run whose runner vanished without a status is recorded as
//! lost, never run again. The runner enforces the timeout, killing the
//! command's process group.
//!
//! Output is streamed to etcd as the file grows (pieces of at most
//! [`CHUNK_MAX`], ending at line ends where they can), up to
//! [`OUTPUT_FILE_MAX`] per run; the result keeps the last [`OUTPUT_TAIL`]
//! bytes whatever the command wrote.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use cluster::{Cluster, CommandOutput, CommandRequest, CommandResult, CommandState, FORMAT_VERSION};
use serde::{Deserialize, Serialize};

/// The result keeps this much of a command's output: its end.
pub const OUTPUT_TAIL: usize = 64 * 1024;
/// A run's output file (and what is streamed of it) stops here.
pub const OUTPUT_FILE_MAX: u64 = 4 << 20;
/// Largest piece of output in one etcd value.
pub const CHUNK_MAX: usize = 64 * 1024;
/// How often the agent looks at a running command's files.
const FOLLOW_PERIOD: Duration = Duration::from_millis(200);
/// How long the output may stay open once the command has exited (a
/// daemon it started may hold it forever).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// Finished runs' directories kept in STATE/commands.
const KEEP_RUNS: usize = 8;

/// What the agent needs to serve command requests.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    pub cluster: String,
    pub state_dir: PathBuf,
}

fn runs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("commands")
}

/// Serves this node's command requests for the agent's life, one run at a
/// time (a request that comes while one runs waits for it).
pub async fn serve(c: Cluster, s: Settings) {
    loop {
        if let Err(e) = serve_requests(&c, &s).await {
            tracing::warn!("node commands: {e:#}; watching again in 5 s");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn serve_requests(c: &Cluster, s: &Settings) -> anyhow::Result<()> {
    // Watched from before the first read: no request is missed.
    let mut watch = c.store().watch_prefix(&c.keys().command_request(&s.node), 0).await?;
    let mut last: Option<String> = None;
    loop {
        let req = match c.command_request(&s.node).await {
            Ok(r) => r,
            // Written by a newer Ferry, or garbage: not for this agent; the
            // next request replaces it.
            Err(e @ (cluster::Error::Decode { .. } | cluster::Error::FormatVersion { .. })) => {
                tracing::warn!("node commands: ignoring a request this agent cannot read: {e}");
                None
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(req) = req {
            if last.as_ref() != Some(&req.value.run) {
                last = Some(req.value.run.clone());
                handle(c, s, &req.value).await?;
                continue;
            }
        }
        match watch.next().await {
            Some(Ok(_)) => {}
            Some(Err(e @ cluster::Error::Compacted { .. })) => return Err(e.into()),
            // No member for a while: the watch keeps trying.
            Some(Err(e)) => tracing::warn!("node commands: {e}"),
            None => anyhow::bail!("the watch ended"),
        }
    }
}

/// The run's result as it starts (and, changed, as it ends).
fn result(run: &str, state: CommandState, started_unix_ms: u64, detail: &str) -> CommandResult {
    CommandResult {
        v: FORMAT_VERSION,
        run: run.to_owned(),
        state,
        exit_code: None,
        signal: None,
        started_unix_ms,
        ended_unix_ms: state.is_final().then(cluster::records::unix_ms),
        output_tail: String::new(),
        output_bytes: 0,
        detail: detail.to_owned(),
    }
}

/// Runs (or goes on following, or records the end of) one request.
async fn handle(c: &Cluster, s: &Settings, req: &CommandRequest) -> anyhow::Result<()> {
    let node = &s.node;
    let previous = c.command_result(node).await?.map(|r| r.value).filter(|r| r.run == req.run);
    if previous.as_ref().is_some_and(|r| r.state.is_final()) {
        return Ok(()); // ran already: never twice
    }
    if cluster::keys::validate_name("run id", &req.run).is_err() {
        let r = result(&req.run, CommandState::Refused, cluster::records::unix_ms(), "not a valid run id");
        c.put_command_result(node, &r).await?;
        return Ok(());
    }
    let dir = runs_dir(&s.state_dir).join(&req.run);
    let started = previous.as_ref().map_or_else(cluster::records::unix_ms, |r| r.started_unix_ms);
    if dir.exists() {
        eprintln!("ferry node: command run {} was started by an earlier agent; following it", req.run);
        return follow(c, node, &req.run, &dir, started).await;
    }
    if previous.is_some() {
        // Recorded as running, yet its directory is gone (the state dir
        // was replaced): how it went cannot be known.
        let r = result(&req.run, CommandState::Lost, started, "its run directory is gone from this node");
        c.put_command_result(node, &r).await?;
        return Ok(());
    }
    forget_old_runs(&runs_dir(&s.state_dir));
    // The directory is the mark that the run started: made once, by the
    // one agent holding the state dir's lock.
    let made = std::fs::create_dir_all(runs_dir(&s.state_dir))
        .and_then(|_| std::fs::create_dir(&dir))
        .and_then(|_| std::fs::write(dir.join("command"), &req.command));
    if let Err(e) = made {
        let r = result(&req.run, CommandState::Refused, started, &format!("cannot make {}: {e}", dir.display()));
        c.put_command_result(node, &r).await?;
        return Ok(());
    }
    c.delete_command_output(node).await?;
    c.put_command_result(node, &result(&req.run, CommandState::Running, started, "")).await?;
    eprintln!(
        "ferry node: running command run {} for {} (timeout {} s): {}",
        req.run, req.requested_by, req.timeout_secs, req.command
    );
    if let Err(e) = spawn_runner(s, &req.run, &dir, req.timeout_secs) {
        let r = result(&req.run, CommandState::Refused, started, &format!("{e:#}"));
        c.put_command_result(node, &r).await?;
        return Ok(());
    }
    follow(c, node, &req.run, &dir, started).await
}

/// Starts `ferry node command-runner` for the run in `dir`, in its own
/// process group, with FERRY_NODE, FERRY_CLUSTER and FERRY_UPDATE_RUN.
fn spawn_runner(s: &Settings, run: &str, dir: &Path, timeout_secs: u64) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(dir.join("runner.log"))?;
    // This very binary, even if the update has replaced the file.
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(["node", "command-runner", "--timeout-secs", &timeout_secs.to_string(), "--dir"])
        .arg(dir)
        .env("FERRY_NODE", &s.node)
        .env("FERRY_CLUSTER", &s.cluster)
        .env("FERRY_UPDATE_RUN", run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn().context("cannot start the command runner")?;
    write_atomic(&dir.join("runner.pid"), format!("{}\n", child.id()).as_bytes())?;
    // Reaped by this agent if it lives that long (an agent restarted by
    // exec keeps it as a child nobody waits for: a zombie until then).
    std::thread::Builder::new().name("command-runner".into()).spawn(move || child.wait())?;
    Ok(())
}

/// Where streaming got to: the next chunk's sequence number and offset.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Streamed {
    seq: u64,
    offset: u64,
}

/// Streams the run's output until its status appears, then records the
/// result; records it lost if its runner is gone without one.
async fn follow(c: &Cluster, node: &str, run: &str, dir: &Path, started: u64) -> anyhow::Result<()> {
    let streamed_file = dir.join("streamed");
    let mut at: Streamed =
        std::fs::read(&streamed_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut seen_dead = 0;
    loop {
        // The status first: a runner that wrote it and exited is done.
        let mut status = read_status(dir);
        if status.is_none() && !runner_alive(dir) {
            // Its status may have come just after the look above.
            status = read_status(dir);
            seen_dead += 1;
        } else {
            seen_dead = 0;
        }
        // Gone without a status at two looks in a row (not one odd read).
        let over = status.is_some() || seen_dead >= 2;
        loop {
            let Some((text, bytes)) = next_chunk(&dir.join("output"), at.offset, over)? else { break };
            let o = CommandOutput { v: FORMAT_VERSION, run: run.to_owned(), offset: at.offset, text };
            c.put_command_output(node, at.seq, &o).await?;
            at = Streamed { seq: at.seq + 1, offset: at.offset + bytes };
            let _ = write_atomic(&streamed_file, &serde_json::to_vec(&at)?);
        }
        if over {
            let r = match status {
                Some(st) => CommandResult {
                    v: FORMAT_VERSION,
                    run: run.to_owned(),
                    state: if st.timed_out {
                        CommandState::TimedOut
                    } else if st.error.is_some() {
                        CommandState::Refused
                    } else {
                        CommandState::Exited
                    },
                    exit_code: st.exit_code,
                    signal: st.signal,
                    started_unix_ms: started,
                    ended_unix_ms: Some(st.ended_unix_ms),
                    output_tail: st.output_tail,
                    output_bytes: st.output_bytes,
                    detail: st.error.unwrap_or_default(),
                },
                None => result(
                    run,
                    CommandState::Lost,
                    started,
                    "its runner ended without a status (killed, or the node restarted); not run again",
                ),
            };
            eprintln!("ferry node: command run {run}: {:?} (exit {:?})", r.state, r.exit_code);
            c.put_command_result(node, &r).await?;
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_PERIOD).await;
    }
}

/// The next piece of `file` from `offset`: at most [`CHUNK_MAX`] bytes,
/// ending at its last line end unless `all` (the command is over) or it
/// has none. Returns the text and how many bytes it covers.
fn next_chunk(file: &Path, offset: u64, all: bool) -> anyhow::Result<Option<(String, u64)>> {
    let mut f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", file.display())),
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; CHUNK_MAX];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    buf.truncate(n);
    if buf.is_empty() {
        return Ok(None);
    }
    if !all && buf.len() < CHUNK_MAX {
        match buf.iter().rposition(|&b| b == b'\n') {
            Some(nl) => buf.truncate(nl + 1),
            None => return Ok(None), // a line still being written
        }
    }
    Ok(Some((String::from_utf8_lossy(&buf).into_owned(), buf.len() as u64)))
}

/// What the runner leaves in `status.json`.
#[derive(Debug, Serialize, Deserialize)]
struct RunnerStatus {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    output_bytes: u64,
    output_tail: String,
    ended_unix_ms: u64,
    /// The command could not be run at all.
    error: Option<String>,
}

fn read_status(dir: &Path) -> Option<RunnerStatus> {
    serde_json::from_slice(&std::fs::read(dir.join("status.json")).ok()?).ok()
}

/// The run's runner still runs: its PID names a live process (not a
/// zombie) whose command line names the run's directory.
fn runner_alive(dir: &Path) -> bool {
    let Some(pid) = std::fs::read_to_string(dir.join("runner.pid")).ok().and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true);
    !zombie && String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(&*dir.to_string_lossy())
}

/// Writes `path` whole or not at all (the agent and the runner both write
/// runner.pid: each through its own temporary file).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Removes all but the newest [`KEEP_RUNS`] finished runs' directories.
fn forget_old_runs(runs: &Path) {
    let mut done: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(runs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| Some((std::fs::metadata(p.join("status.json")).ok()?.modified().ok()?, p)))
        .collect();
    done.sort();
    let excess = done.len().saturating_sub(KEEP_RUNS);
    for (_, p) in done.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// `ferry node command-runner --dir DIR --timeout-secs N`: runs DIR/command
/// by `sh -c` (killing its process group past the timeout), its output in
/// DIR/output (the first [`OUTPUT_FILE_MAX`] bytes), then DIR/status.json.
pub fn runner_main(dir: &Path, timeout: Duration) -> anyhow::Result<i32> {
    write_atomic(&dir.join("runner.pid"), format!("{}\n", std::process::id()).as_bytes())?;
    let command = std::fs::read_to_string(dir.join("command")).context("the run's command file")?;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("output"))?;
    let mut kept = 0u64;
    let sink = move |b: &[u8]| {
        use std::io::Write;
        let room = OUTPUT_FILE_MAX.saturating_sub(kept) as usize;
        let part = &b[..b.len().min(room)];
        if !part.is_empty() && file.write_all(part).is_ok() {
            kept += part.len() as u64;
            if kept == OUTPUT_FILE_MAX {
                let _ = file.write_all(
                    format!(
                        "\n[ferry: the output goes on past {} MiB; only its last {} KiB is kept, in the result]\n",
                        OUTPUT_FILE_MAX >> 20,
                        OUTPUT_TAIL >> 10
                    )
                    .as_bytes(),
                );
            }
        }
    };
    let mut sh = Command::new("sh");
    sh.args(["-c", &command]);
    let status = match run_bounded(sh, timeout, sink) {
        Ok(o) => RunnerStatus {
            exit_code: o.status.and_then(|s| s.code()),
            signal: o.status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
            timed_out: o.status.is_none(),
            output_bytes: o.bytes,
            output_tail: o.tail,
            ended_unix_ms: cluster::records::unix_ms(),
            error: None,
        },
        Err(e) => RunnerStatus {
            exit_code: None,
            signal: None,
            timed_out: false,
            output_bytes: 0,
            output_tail: String::new(),
            ended_unix_ms: cluster::records::unix_ms(),
            error: Some(e),
        },
    };
    write_atomic(&dir.join("status.json"), &serde_json::to_vec(&status)?)?;
    Ok(0)
}

/// What a command left.
#[derive(Debug)]
pub struct Finished {
    /// None when it was killed for running past its time.
    pub status: Option<std::process::ExitStatus>,
    /// The end of its output (stdout and stderr as written).
    pub tail: String,
    /// How many bytes it wrote in all.
    pub bytes: u64,
}

/// A line longer than this at the tail's cut is dropped whole rather than
/// searched for its end.
const LINE_MAX: usize = 4096;

/// The last `cap` bytes written to it.
pub struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
    bytes: u64,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail { buf: Default::default(), cap, bytes: 0 }
    }

    pub fn push(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        let b = &b[b.len().saturating_sub(self.cap)..];
        let excess = (self.buf.len() + b.len()).saturating_sub(self.cap);
        self.buf.drain(..excess);
        self.buf.extend(b);
    }

    /// As text; once cut, from its first whole line on.
    pub fn text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut v = [a, b].concat();
        if self.bytes > v.len() as u64 {
            if let Some(nl) = v.iter().take(LINE_MAX).position(|&c| c == b'\n') {
                v.drain(..=nl);
            }
        }
        String::from_utf8_lossy(&v).into_owned()
    }
}

/// Runs `cmd` to its end (killing it, and what it started, past `limit`),
/// its stdout and stderr in one pipe read as it runs: a command that
/// prints more than a pipe holds never stalls. Every piece read goes to
/// `sink`; the last [`OUTPUT_TAIL`] bytes are kept.
pub fn run_bounded(
    mut cmd: Command,
    limit: Duration,
    mut sink: impl FnMut(&[u8]) + Send + 'static,
) -> Result<Finished, String> {
    use std::os::unix::process::CommandExt;
    let (mut reader, writer) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let writer2 = writer.try_clone().map_err(|e| format!("cannot make a pipe: {e}"))?;
    // Its own process group: killed as one past the limit.
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2).process_group(0);
    let spawned = cmd.spawn();
    // Our copies of the write end go now, or the reader never sees the end.
    drop(cmd);
    let mut child = spawned.map_err(|e| format!("cannot run the command: {e}"))?;
    let tail = Arc::new(Mutex::new(Tail::new(OUTPUT_TAIL)));
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let t = tail.clone();
    std::thread::Builder::new()
        .name("command-output".into())
        .spawn(move || {
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        t.lock().unwrap_or_else(|e| e.into_inner()).push(&chunk[..n]);
                        sink(&chunk[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!("reading the command's output: {e}");
                        break;
                    }
                }
            }
            let _ = done_tx.send(());
        })
        .map_err(|e| format!("cannot start the output reader: {e}"))?;
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if std::time::Instant::now() >= deadline => {
                // SAFETY: SIGKILL to the process group this child leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    };
    if done.recv_timeout(OUTPUT_GRACE).is_err() {
        tracing::warn!("the command's output is still open after it ended (a process it started holds it)");
    }
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Finished { status, tail: t.text(), bytes: t.bytes })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_command_printing_a_mebibyte_on_both_pipes_completes_with_its_tail() {
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        // 1 MiB on stdout and 1 MiB on stderr, each far past a pipe buffer.
        let script = "yes 0123456789abcde | head -c 1048576; yes fedcba987654321 | head -c 1048576 >&2; echo last";
        let t = Instant::now();
        let o = run_bounded(sh(script), Duration::from_secs(60), move |b| {
            s.fetch_add(b.len() as u64, Ordering::Relaxed);
        })
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        assert!(o.status.unwrap().success());
        assert_eq!(o.bytes, 2 * 1048576 + 5);
        assert!(o.tail.len() <= OUTPUT_TAIL && o.tail.len() > OUTPUT_TAIL - 100, "{}", o.tail.len());
        assert!(o.tail.starts_with("fedcba987654321\n") && o.tail.ends_with("fedcba987654321\nlast\n"));
        // Every byte went to the sink as it came.
        assert_eq!(seen.load(Ordering::Relaxed), o.bytes);
    }

    #[test]
    fn a_command_past_its_time_is_killed_with_what_it_started() {
        let t = Instant::now();
        let o = run_bounded(sh("echo started; sleep 30 & sleep 30"), Duration::from_millis(500), |_| {}).unwrap();
        assert!(o.status.is_none());
        assert_eq!(o.tail, "started\n");
        // The background sleep held the pipe too: it was killed with its group.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_daemon_holding_the_output_does_not_hold_the_run() {
        let t = Instant::now();
        let o = run_bounded(sh("echo hi; sleep 5 &"), Duration::from_secs(60), |_| {}).unwrap();
        assert!(o.status.unwrap().success());
        assert_eq!(o.tail, "hi\n");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_from_a_line_start() {
        let mut t = Tail::new(10);
        t.push(b"aaaa\nbbbb\n");
        assert_eq!(t.text(), "aaaa\nbbbb\n");
        t.push(b"cc\ndd\n");
        assert_eq!((t.text().as_str(), t.bytes), ("cc\ndd\n", 16));
        t.push(&[b'x'; 25]);
        assert_eq!(t.text(), "xxxxxxxxxx");
    }

    #[test]
    fn chunks_end_at_line_ends_while_the_command_runs() {
        let dir = std::env::temp_dir().join(format!("ferry-chunks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("output");
        assert_eq!(next_chunk(&f, 0, false).unwrap(), None, "no file yet");
        std::fs::write(&f, "one\ntwo\nthr").unwrap();
        assert_eq!(next_chunk(&f, 0, false).unwrap(), Some(("one\ntwo\n".into(), 8)));
        assert_eq!(next_chunk(&f, 8, false).unwrap(), None, "half a line waits");
        assert_eq!(next_chunk(&f, 8, true).unwrap(), Some(("thr".into(), 3)), "unless it is over");
        std::fs::write(&f, vec![b'x'; CHUNK_MAX + 10]).unwrap();
        let (text, n) = next_chunk(&f, 0, false).unwrap().unwrap();
        assert_eq!((text.len(), n), (CHUNK_MAX, CHUNK_MAX as u64), "a long line goes in pieces");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_runner_runs_the_command_once_and_leaves_its_status() {
        let dir = std::env::temp_dir().join(format!("ferry-runner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("command"), "echo out; echo err >&2; exit 7").unwrap();
        assert_eq!(runner_main(&dir, Duration::from_secs(30)).unwrap(), 0);
        let st = read_status(&dir).unwrap();
        assert_eq!((st.exit_code, st.timed_out, st.error), (Some(7), false, None));
        assert_eq!(std::fs::read_to_string(dir.join("output")).unwrap(), "out\nerr\n");
        assert_eq!((st.output_tail.as_str(), st.output_bytes), ("out\nerr\n", 8));
        // Its PID file names this process, which is alive but not a runner.
        assert!(!runner_alive(&dir));
        std::fs::write(dir.join("command"), "sleep 30").unwrap();
        std::fs::remove_file(dir.join("output")).unwrap();
        runner_main(&dir, Duration::from_millis(300)).unwrap();
        assert!(read_status(&dir).unwrap().timed_out);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
