//! Running iproute2's `ip`, every call bounded in time.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::LabError;

/// No single `ip` call may take longer than this.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Ip {
    bin: PathBuf,
}

impl Ip {
    /// Finds `ip` in PATH (and the usual sbin directories, which a non-login
    /// root shell may lack).
    pub fn find() -> Result<Ip, LabError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
        for dir in dirs {
            let bin = dir.join("ip");
            if is_executable(&bin) {
                return Ok(Ip { bin });
            }
        }
        Err(LabError::IpMissing)
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Runs `ip ARGS`; returns its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String, LabError> {
        tracing::debug!("ip {}", args.join(" "));
        let child = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LabError::Spawn { bin: self.bin.clone(), source })?;
        let (ok, stdout, stderr) = wait_bounded(child, IP_TIMEOUT).map_err(|e| match e {
            WaitError::Timeout => LabError::IpTimeout { args: args.join(" "), secs: IP_TIMEOUT.as_secs() },
            WaitError::Io(source) => LabError::Spawn { bin: self.bin.clone(), source },
        })?;
        if !ok {
            return Err(LabError::IpFailed { args: args.join(" "), stderr: stderr.trim().to_owned() });
        }
        Ok(stdout)
    }

    /// Runs `ip -n NETNS ARGS`.
    pub fn run_in(&self, netns: &str, args: &[&str]) -> Result<String, LabError> {
        let mut all = vec!["-n", netns];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Runs `ip -j ARGS` (in NETNS if given) and parses its JSON.
    pub fn json(&self, netns: Option<&str>, args: &[&str]) -> Result<serde_json::Value, LabError> {
        let mut all = vec!["-j"];
        if let Some(ns) = netns {
            all.extend_from_slice(&["-n", ns]);
        }
        all.extend_from_slice(args);
        let out = self.run(&all)?;
        if out.trim().is_empty() {
            return Ok(serde_json::Value::Array(vec![]));
        }
        serde_json::from_str(&out).map_err(|source| LabError::IpJson { args: all.join(" "), source })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

enum WaitError {
    Timeout,
    Io(std::io::Error),
}

/// Waits for `child` at most `timeout`, collecting its output; kills it (by
/// its own handle, so never a recycled PID) if it overruns.
fn wait_bounded(mut child: Child, timeout: Duration) -> Result<(bool, String, String), WaitError> {
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_micros(200);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(WaitError::Io(e)),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(WaitError::Timeout);
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok((status.success(), stdout, stderr))
}
