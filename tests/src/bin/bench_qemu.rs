//! `make bench-qemu`: Ferry against QEMU 7.2 (Debian's qemu-system-x86,
//! `-M microvm`) in one run, moving the same test guest between the same
//! lab hosts, measured by the same code (tests/src/live_cell.rs), written
//! to target/bench/qemu.json.
//!
//! One lab (`bq`), tap vm0 on hosts a and b. Per memory size the guest boots
//! once per VMM on host a (working set half its memory) and is moved
//! a -> b -> a ... three times per dirty rate (counted runs; a run whose
//! pinger stopped before the migration ended is repeated). Both VMMs:
//! 20 ms downtime target, one TCP stream, no bandwidth cap. Ferry: `ferry
//! migrate --mode live` (encrypted, as bench-live runs it) to `ferry
//! receive`. QEMU: `-incoming defer` on the destination, driven over QMP
//! (`downtime-limit 20`, `max-bandwidth` lifted, multifd off unless
//! BENCH_QEMU_MULTIFD=N), its figures from `query-migrate`.
//!
//! Per run: total_ms and downtime_ms as each VMM reports them, pings
//! lost and the largest reply gap (`ferry ping` every 10 ms from the
//! client), and guest_stall_ms, the guest's own `max_stall_us` in its first
//! heartbeat on the destination (the ruler both VMMs are judged by).
//!
//! Environment: FERRY_QEMU (qemu-system-x86_64; `make bench-qemu` sets it
//! from scripts/install-qemu.sh), BENCH_QEMU_CELLS (e.g. "1024:0,1024:50,
//! 4096:0", the default), BENCH_QEMU_RUNS (3), BENCH_QEMU_VMMS
//! ("qemu,ferry"), BENCH_QEMU_MULTIFD (0: plain precopy on one stream),
//! BENCH_QEMU_IDLE_US (the guest's idle_us, 0 unless "default": see
//! guest_cmdline), BENCH_QEMU_MACHINE and BENCH_QEMU_CPU (the -M and -cpu
//! values, for trying other settings).

#[path = "../live_cell.rs"]
mod live_cell;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::stats::round3;
use ferry_e2e::{cluster_key, ferry_bin, guest_elf, heartbeat_number, kvm_available, process_running, root_available};
use ferry_e2e::{run_bounded, Lab, Vm};
use live_cell::{cell_row, expected_ms, guest_cmdline, measure, Console, MoveOutcome, GUEST_MAC, TAP};
use serde_json::{json, Value};

const LAB: &str = "bq";
const DOWNTIME_TARGET_MS: u64 = 20;
/// QEMU's max-bandwidth, bytes/s: far above what loopback carries.
const MAX_BANDWIDTH: u64 = 100 << 30;
const RUNS: usize = 3;
const EXTRA_ATTEMPTS: usize = 2;
const PORT_BASE: u16 = 7900;
const T: Duration = Duration::from_secs(30);
/// Boot plus the first fill of the working set (2 GiB for 4 GiB guests).
const BOOT_T: Duration = Duration::from_secs(300);
const MIGRATE_T: Duration = Duration::from_secs(180);
const SETTLE: Duration = Duration::from_millis(1000);
/// The targets: Ferry at least this many times faster in total ...
const TARGET_TOTAL_RATIO: f64 = 4.0;
/// ... with at most this fraction of QEMU's guest stall.
const TARGET_STALL_RATIO: f64 = 0.5;

type R<T> = Result<T, String>;

// ---------------------------------------------------------------------------
// QEMU

/// Where QEMU and its data files are.
struct QemuBin {
    exe: PathBuf,
    /// `-L` directory when QEMU was unpacked outside dpkg (install-qemu.sh).
    data: Option<PathBuf>,
    modules: Option<PathBuf>,
    version: String,
}

impl QemuBin {
    fn find() -> R<QemuBin> {
        let exe = std::env::var_os("FERRY_QEMU").map(PathBuf::from).unwrap_or_else(|| "qemu-system-x86_64".into());
        let out = Command::new(&exe)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e} (run `make bench-qemu`, or set FERRY_QEMU)", exe.display()))?;
        let version = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_owned();
        if !version.contains("version 7.2") {
            return Err(format!("{} is {version:?}, not QEMU 7.2", exe.display()));
        }
        // <prefix>/usr/bin/qemu-system-x86_64 -> <prefix>/usr/share/qemu
        let prefix = exe.parent().and_then(Path::parent).filter(|p| *p != Path::new("/usr"));
        let data = prefix.map(|p| p.join("share/qemu")).filter(|d| d.join("bios-microvm.bin").exists());
        let modules = prefix.map(|p| p.join("lib/x86_64-linux-gnu/qemu")).filter(|d| d.exists());
        Ok(QemuBin { exe, data, modules, version })
    }
}

/// A QMP connection: one JSON object per line each way.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying while QEMU starts), reads the greeting and
    /// leaves capabilities negotiation.
    fn connect(path: &Path, timeout: Duration, alive: &dyn Fn() -> R<()>) -> R<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    alive()?;
                    if Instant::now() >= deadline {
                        return Err(format!("QMP {}: {e}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP greeting expected, got {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> R<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP: QEMU closed the socket".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP sent {line:?}: {e}")),
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Runs a command; its `return` value, or its `error` as the error.
    fn execute(&mut self, command: &str, arguments: Value) -> R<Value> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP write {command}: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {}", e["desc"].as_str().unwrap_or(&e.to_string())));
            }
            // An asynchronous event: not the answer.
        }
    }
}

/// A QEMU process on a lab host; killed on drop.
struct QemuGuest {
    child: Child,
    console: Console,
    qmp: Qmp,
    console_sock: PathBuf,
    stderr: PathBuf,
}

impl QemuGuest {
    /// Starts QEMU in host `host`'s namespace with the guest (or waiting
    /// for a migration: `incoming`); returns once QMP answers.
    fn launch(ctx: &Ctx, host: &'static str, mem_mib: u64, dirty: u64, incoming: bool, tag: &str) -> R<QemuGuest> {
        let q = ctx.qemu()?;
        let dir = &ctx.dir;
        let (qmp_sock, console_sock) = (dir.join(format!("qmp-{tag}.sock")), dir.join(format!("con-{tag}.sock")));
        let (serial, stderr) = (dir.join(format!("serial-{tag}.log")), dir.join(format!("qemu-{tag}.stderr")));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ctx.lab.netns(host)]).arg(&q.exe);
        if let Some(d) = &q.data {
            cmd.arg("-L").arg(d);
        }
        if let Some(m) = &q.modules {
            cmd.env("QEMU_MODULE_DIR", m);
        }
        // acpi=off: only then does microvm append virtio_mmio.device= words to
        // the kernel command line, which is how the test guest finds its NIC.
        let machine = std::env::var("BENCH_QEMU_MACHINE").unwrap_or_else(|_| "microvm,acpi=off".into());
        // QEMU 7.2 aborts on this host writing IA32_ARCH_CAPABILITIES.
        let cpu = std::env::var("BENCH_QEMU_CPU").unwrap_or_else(|_| "host,-arch-capabilities".into());
        cmd.args(["-name", &format!("ferry-bench-{tag}"), "-M", &machine, "-accel", "kvm"])
            .args(["-cpu", &cpu, "-smp", "1", "-m", &format!("{mem_mib}M")])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            // The guest drives virtio-mmio version 2 only; QEMU 7.2 offers 1.
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .arg("-kernel")
            .arg(guest_elf())
            .args(["-append", &guest_cmdline(mem_mib, dirty, ctx.idle_us)])
            .args(["-netdev", &format!("tap,id=net0,ifname={TAP},script=no,downscript=no")])
            .args(["-device", &format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}")])
            .arg("-chardev")
            .arg(format!(
                "socket,id=con0,path={},server=on,wait=off,logfile={}",
                console_sock.display(),
                serial.display()
            ))
            .args(["-serial", "chardev:con0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()));
        if incoming {
            // `defer`: capabilities are set over QMP before it listens.
            cmd.args(["-incoming", "defer"]);
        }
        let err = std::fs::File::create(&stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", q.exe.display()))?;
        let pid = child.id();
        let stderr_text = stderr.clone();
        let alive = move || -> R<()> {
            if process_running(pid) {
                Ok(())
            } else {
                Err(format!("QEMU exited: {}", std::fs::read_to_string(&stderr_text).unwrap_or_default().trim()))
            }
        };
        let qmp = match Qmp::connect(&qmp_sock, T, &alive) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(&stderr).unwrap_or_default();
                return Err(format!("{e}; QEMU stderr: {}", text.trim()));
            }
        };
        Ok(QemuGuest { child, console: Console { path: serial, host }, qmp, console_sock, stderr })
    }

    fn alive_fn(&self) -> Box<dyn Fn() -> R<()>> {
        let (pid, stderr) = (self.child.id(), self.stderr.clone());
        Box::new(move || {
            if process_running(pid) {
                Ok(())
            } else {
                Err(format!("QEMU exited: {}", std::fs::read_to_string(&stderr).unwrap_or_default().trim()))
            }
        })
    }

    /// Types `cmd` on the serial console (its socket).
    fn type_line(&self, cmd: &str) -> R<()> {
        let mut s = UnixStream::connect(&self.console_sock).map_err(|e| format!("console socket: {e}"))?;
        s.write_all(format!("{cmd}\n").as_bytes()).map_err(|e| format!("console write: {e}"))?;
        // Give QEMU time to take the bytes before the connection closes.
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    /// Asks QEMU to quit and waits for it (killed on drop if it does not).
    fn quit(mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Ferry

struct FerryGuest {
    vm: Vm,
    console: Console,
}

impl FerryGuest {
    fn boot(ctx: &Ctx, mem_mib: u64, dirty: u64) -> FerryGuest {
        let serial = ctx.dir.join(format!("ferry-boot-{mem_mib}.log"));
        let args: Vec<String> = vec![
            "--kernel".into(),
            guest_elf().display().to_string(),
            "--mem-mib".into(),
            mem_mib.to_string(),
            "--cmdline".into(),
            guest_cmdline(mem_mib, dirty, ctx.idle_us),
            "--net".into(),
            format!("tap={TAP},mac={GUEST_MAC}"),
            "--serial".into(),
            format!("file:{}", serial.display()),
        ];
        FerryGuest {
            vm: Vm::launch(Some(&ctx.lab.netns("a")), "run", &args),
            console: Console { path: serial, host: "a" },
        }
    }

    fn receiver(ctx: &Ctx, host: &'static str, port: u16, seq: usize) -> R<FerryGuest> {
        let serial = ctx.dir.join(format!("ferry-receive-{seq}.log"));
        let args: Vec<String> = vec![
            "--listen".into(),
            format!("tcp:{}:{port}", Lab::host_ip(host)),
            "--key-file".into(),
            cluster_key().display().to_string(),
            "--net".into(),
            format!("tap={TAP}"),
            "--serial".into(),
            format!("file:{}", serial.display()),
        ];
        let g = FerryGuest {
            vm: Vm::launch(Some(&ctx.lab.netns(host)), "receive", &args),
            console: Console { path: serial, host },
        };
        let deadline = Instant::now() + T;
        while !g.vm.stderr().contains("waiting for a migration") {
            if !process_running(g.vm.pid()) || Instant::now() >= deadline {
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!("ferry receive on host {host} did not start listening: {}", g.vm.stderr().trim()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(g)
    }

    fn alive_fn(&self) -> Box<dyn Fn() -> R<()>> {
        let pid = self.vm.pid();
        Box::new(move || if process_running(pid) { Ok(()) } else { Err("ferry exited".into()) })
    }

    fn answers(&self) -> bool {
        process_running(self.vm.pid()) && self.vm.ferry(&["info"]).0
    }

    /// Waits (briefly) for the process to exit by itself, then drops it.
    fn retire(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while process_running(self.vm.pid()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        !process_running(self.vm.pid())
    }
}

// ---------------------------------------------------------------------------
// Either VMM

enum Guest {
    Ferry(FerryGuest),
    Qemu(QemuGuest),
}

impl Guest {
    fn console(&self) -> &Console {
        match self {
            Guest::Ferry(g) => &g.console,
            Guest::Qemu(g) => &g.console,
        }
    }

    fn alive_fn(&self) -> Box<dyn Fn() -> R<()>> {
        match self {
            Guest::Ferry(g) => g.alive_fn(),
            Guest::Qemu(g) => g.alive_fn(),
        }
    }

    /// Types `cmd` on the console and waits for the line starting with `prefix`.
    fn command(&self, cmd: &str, prefix: &str, timeout: Duration) -> R<String> {
        let from = self.console().lines().len();
        match self {
            Guest::Ferry(g) => {
                let (ok, _, err) = g.vm.ferry(&["console", cmd]);
                if !ok {
                    return Err(format!("ferry console {cmd:?}: {}", err.trim()));
                }
            }
            Guest::Qemu(g) => g.type_line(cmd)?,
        }
        self.console().wait_line_from(from, timeout, self.alive_fn(), |l| l.starts_with(prefix)).map(|(_, l)| l)
    }

    /// Waits for the workload and a first heartbeat; the boot's figures.
    fn wait_ready(&self, started: Instant) -> R<Value> {
        let c = self.console();
        let (i, ready) = c.wait_line_from(0, BOOT_T, self.alive_fn(), |l| l.starts_with("workload ready"))?;
        let ready_ms = round3(started.elapsed().as_secs_f64() * 1000.0);
        c.wait_line_from(i + 1, T, self.alive_fn(), |l| heartbeat_number(l).is_some())?;
        let banner = c.lines().into_iter().find(|l| l.starts_with("ferry-guest"));
        Ok(json!({ "workload_ready_ms": ready_ms, "line": ready, "banner": banner }))
    }
}

struct Ctx {
    lab: Lab,
    dir: PathBuf,
    qemu: Option<QemuBin>,
    /// The guest's `idle_us=` (None: the guest's default).
    idle_us: Option<u64>,
}

impl Ctx {
    fn qemu(&self) -> R<&QemuBin> {
        self.qemu.as_ref().ok_or_else(|| "no QEMU 7.2".to_string())
    }
}

fn multifd_channels() -> u64 {
    std::env::var("BENCH_QEMU_MULTIFD").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// QEMU's migration settings, the same on both ends: 20 ms target, no cap,
/// multifd only when asked for.
fn qemu_setup(qmp: &mut Qmp) -> R<()> {
    let channels = multifd_channels();
    if channels > 0 {
        qmp.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
        )?;
        qmp.execute("migrate-set-parameters", json!({ "multifd-channels": channels }))?;
    }
    qmp.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": DOWNTIME_TARGET_MS, "max-bandwidth": MAX_BANDWIDTH }),
    )?;
    Ok(())
}

/// Runs the migration the QMP way and waits for the destination to run.
fn qemu_migrate(src: &mut QemuGuest, dst: &mut QemuGuest, uri: &str) -> R<Value> {
    let t0 = Instant::now();
    src.qmp.execute("migrate", json!({ "uri": uri }))?;
    let deadline = t0 + MIGRATE_T;
    let info = loop {
        let info = src.qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => {
                return Err(format!("QEMU migration {}: {}", info["status"], info["error-desc"]));
            }
            _ if Instant::now() >= deadline => {
                let _ = src.qmp.execute("migrate_cancel", json!({}));
                return Err(format!("QEMU migration did not complete within {MIGRATE_T:?}: {info}"));
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let completed_ms = round3(t0.elapsed().as_secs_f64() * 1000.0);
    let resume_deadline = Instant::now() + T;
    loop {
        let st = dst.qmp.execute("query-status", json!({}))?;
        if st["status"] == "running" {
            break;
        }
        if Instant::now() >= resume_deadline {
            return Err(format!("the destination QEMU did not resume: {st}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ram = &info["ram"];
    let total = info["total-time"].as_f64();
    let bytes = ram["transferred"].as_f64();
    Ok(json!({
        "total_ms": total,
        "downtime_ms": info["downtime"],
        "setup_ms": info["setup-time"],
        "rounds": ram["dirty-sync-count"],
        "bytes_sent": ram["transferred"],
        "mib_s": match (bytes, total) { (Some(b), Some(t)) if t > 0.0 => Some(round3(b / 1048576.0 / (t / 1000.0))), _ => None },
        "completed_seen_ms": completed_ms,
        "dst_running_ms": round3(t0.elapsed().as_secs_f64() * 1000.0),
        "query_migrate": info,
    }))
}

/// One move of a QEMU guest; the record and where the guest runs after it.
fn qemu_move(ctx: &Ctx, mut src: QemuGuest, seq: usize, expect: u64, mem_mib: u64) -> (Value, Option<Guest>) {
    let to = Lab::other_host(src.console.host);
    let port = PORT_BASE + seq as u16;
    let mut base = json!({ "seq": seq, "from": src.console.host, "to": to });
    let dst = QemuGuest::launch(ctx, to, mem_mib, 0, true, &format!("in-{seq}")).and_then(|mut d| {
        qemu_setup(&mut d.qmp)?;
        d.qmp.execute("migrate-incoming", json!({ "uri": format!("tcp:{}:{port}", Lab::host_ip(to)) }))?;
        Ok(d)
    });
    let mut dst = match dst.and_then(|d| qemu_setup(&mut src.qmp).map(|_| d)) {
        Ok(d) => d,
        Err(e) => {
            base["ok"] = json!(false);
            base["error"] = json!(e);
            return (base, Some(Guest::Qemu(src)));
        }
    };
    let src_console = src.console.clone();
    let uri = format!("tcp:{}:{port}", Lab::host_ip(to));
    let record = measure(&ctx.lab, &src_console, expect, || {
        let figures = qemu_migrate(&mut src, &mut dst, &uri);
        MoveOutcome { figures, dst_console: Some(dst.console.clone()), dst_alive: dst.alive_fn() }
    });
    let mut record = merge(base, record);
    if record["ok"] == true {
        src.quit();
        (record, Some(Guest::Qemu(dst)))
    } else {
        record["destination_stderr"] = json!(std::fs::read_to_string(&dst.stderr).unwrap_or_default());
        let src_ok = src.qmp.execute("query-status", json!({})).is_ok_and(|s| s["status"] == "running");
        if src_ok {
            drop(dst);
            (record, Some(Guest::Qemu(src)))
        } else {
            // The source did not resume; QEMU may have finished anyway.
            let dst_ok = dst.qmp.execute("query-status", json!({})).is_ok_and(|s| s["status"] == "running");
            (record, dst_ok.then_some(Guest::Qemu(dst)))
        }
    }
}

/// One move of a Ferry guest: `ferry receive` on the other host, `ferry
/// migrate --mode live` (bench-live's move).
fn ferry_move(ctx: &Ctx, src: FerryGuest, seq: usize, expect: u64) -> (Value, Option<Guest>) {
    let to = Lab::other_host(src.console.host);
    let port = PORT_BASE + seq as u16;
    let mut base = json!({ "seq": seq, "from": src.console.host, "to": to });
    let dst = match FerryGuest::receiver(ctx, to, port, seq) {
        Ok(d) => d,
        Err(e) => {
            base["ok"] = json!(false);
            base["error"] = json!(e);
            return (base, Some(Guest::Ferry(src)));
        }
    };
    let key = cluster_key().display().to_string();
    let endpoint = format!("tcp:{}:{port}", Lab::host_ip(to));
    let record = measure(&ctx.lab, &src.console, expect, || {
        let mut migrate = Command::new(ferry_bin());
        migrate.args(["migrate", "--mode", "live", "--json", "--key-file", &key, "--to", &endpoint, "--api-sock"]);
        migrate.arg(&src.vm.api_sock);
        let figures = run_bounded(&mut migrate, MIGRATE_T).and_then(|o| {
            if !o.status.success() {
                return Err(format!("ferry migrate failed: {}", String::from_utf8_lossy(&o.stderr).trim()));
            }
            let f: Value =
                serde_json::from_slice(&o.stdout).map_err(|e| format!("ferry migrate printed no JSON: {e}"))?;
            let (bytes, total) = (f["bytes_sent"].as_f64(), f["total_ms"].as_f64());
            Ok(json!({
                "total_ms": f["total_ms"],
                "downtime_ms": f["downtime_ms"],
                "setup_ms": null,
                "rounds": f["rounds"],
                "bytes_sent": f["bytes_sent"],
                "mib_s": match (bytes, total) { (Some(b), Some(t)) if t > 0.0 => Some(round3(b / 1048576.0 / (t / 1000.0))), _ => None },
                "round0_mib_s": f["round0_mib_s"],
                "figures": f,
            }))
        });
        MoveOutcome { figures, dst_console: Some(dst.console.clone()), dst_alive: dst.alive_fn() }
    });
    let mut record = merge(base, record);
    if record["ok"] == true {
        record["source_exited"] = json!(src.retire(Duration::from_secs(5)));
        (record, Some(Guest::Ferry(dst)))
    } else {
        record["receiver_stderr"] = json!(dst.vm.stderr());
        if src.answers() {
            drop(dst);
            (record, Some(Guest::Ferry(src)))
        } else if dst.answers() {
            record["vm_moved_anyway"] = json!(true);
            (record, Some(Guest::Ferry(dst)))
        } else {
            (record, None)
        }
    }
}

fn merge(mut a: Value, b: Value) -> Value {
    for (k, v) in b.as_object().into_iter().flatten() {
        a[k] = v.clone();
    }
    a
}

/// Boots `vmm`'s guest of `mem_mib` and runs the cells `rates` on it;
/// returns the rows, the boot record and the final verify.
fn run_size(
    ctx: &Ctx,
    vmm: &str,
    mem_mib: u64,
    rates: &[u64],
    seq: &mut usize,
    runs_per_cell: usize,
) -> (Vec<Value>, Value) {
    let started = Instant::now();
    let booted: R<Guest> = match vmm {
        "qemu" => ctx
            .qemu()
            .and_then(|_| QemuGuest::launch(ctx, "a", mem_mib, rates[0], false, &format!("boot-{mem_mib}")))
            .map(Guest::Qemu),
        _ => Ok(Guest::Ferry(FerryGuest::boot(ctx, mem_mib, rates[0]))),
    };
    let boot = booted.and_then(|g| g.wait_ready(started).map(|b| (g, b)));
    let (guest, boot) = match boot {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{vmm} {mem_mib} MiB: boot failed: {e}");
            let rows = rates
                .iter()
                .map(|&r| {
                    let mut row = cell_row(vmm, mem_mib, r, Vec::new());
                    row["errors"] = json!([format!("boot failed: {e}")]);
                    row
                })
                .collect();
            return (rows, json!({ "vmm": vmm, "mem_mib": mem_mib, "ok": false, "error": e }));
        }
    };
    eprintln!("{vmm} {mem_mib} MiB: workload ready: {boot}");
    let mut rows = Vec::new();
    let mut history: Vec<(u64, u64, f64)> = Vec::new();
    let mut current = Some(guest);
    let mut lost: Option<String> = None;
    for (i, &rate) in rates.iter().enumerate() {
        let Some(g) = current.take() else {
            let mut row = cell_row(vmm, mem_mib, rate, Vec::new());
            row["errors"] = json!([format!("skipped: the VM was lost earlier: {}", lost.clone().unwrap_or_default())]);
            rows.push(row);
            continue;
        };
        if i > 0 {
            if let Err(e) = g.command(&format!("dirty {rate}"), "dirty rate set", T) {
                eprintln!("{vmm} {mem_mib} MiB: dirty {rate}: {e}");
            }
        }
        std::thread::sleep(SETTLE);
        current = Some(g);
        let mut runs = Vec::new();
        let mut counted = 0;
        for run in 0..runs_per_cell + EXTRA_ATTEMPTS {
            if counted == runs_per_cell {
                break;
            }
            let Some(g) = current.take() else { break };
            // QEMU took 25 s for 4 GiB on a busy day here.
            let expect = expected_ms(&history, mem_mib, rate, 2000.0 + mem_mib as f64 * 6.0);
            let (mut record, next) = match g {
                Guest::Qemu(q) => qemu_move(ctx, q, *seq, expect, mem_mib),
                Guest::Ferry(f) => ferry_move(ctx, f, *seq, expect),
            };
            *seq += 1;
            let counts = record["ok"] != true || record["ping_covered"] == true;
            record["counted"] = json!(counts);
            counted += usize::from(counts);
            eprintln!(
                "{vmm} {mem_mib} MiB, {rate} MiB/s, run {run} ({}->{}): ok={} total={} downtime={} setup={} rounds={} \
                 lost={}/{} gap={} stall={} (source {}) tail={}{}",
                record["from"].as_str().unwrap_or("?"),
                record["to"].as_str().unwrap_or("?"),
                record["ok"],
                record["total_ms"],
                record["downtime_ms"],
                record["setup_ms"],
                record["rounds"],
                record["pings_lost"],
                record["pings_sent"],
                record["max_gap_ms"],
                record["guest_stall_ms"],
                record["guest_stall_source_ms"],
                record["ping_tail_ms"],
                record.get("error").map(|e| format!(" error: {e}")).unwrap_or_default(),
            );
            if let Some(t) = record["total_ms"].as_f64() {
                history.push((mem_mib, rate, t));
            }
            if next.is_none() {
                lost = Some(record["error"].as_str().unwrap_or("the VM runs nowhere").to_owned());
            }
            runs.push(record);
            current = next;
            std::thread::sleep(Duration::from_millis(300));
        }
        rows.push(cell_row(vmm, mem_mib, rate, runs));
    }
    let verify = match current.take() {
        Some(g) => {
            let v = g.command("verify", "verify", Duration::from_secs(120));
            eprintln!("{vmm} {mem_mib} MiB: {v:?}");
            let host = g.console().host;
            let r = match v {
                Ok(line) => json!({ "ok": line.starts_with("verify ok"), "line": line, "host": host }),
                Err(e) => json!({ "ok": false, "error": e, "host": host }),
            };
            if let Guest::Qemu(q) = g {
                q.quit();
            }
            r
        }
        None => json!({ "ok": false, "error": lost }),
    };
    (rows, json!({ "vmm": vmm, "mem_mib": mem_mib, "ok": true, "boot": boot, "verify": verify }))
}

/// QEMU total / Ferry total and Ferry stall / QEMU stall per cell, against
/// the targets.
fn comparisons(rows: &[Value], cells: &[(u64, u64)]) -> Vec<Value> {
    let find = |vmm: &str, m: u64, d: u64| {
        rows.iter().find(|r| r["vmm"] == vmm && r["mem_mib"] == m && r["dirty_mib_s"] == d).cloned().unwrap_or_default()
    };
    cells
        .iter()
        .map(|&(m, d)| {
            let (q, f) = (find("qemu", m, d), find("ferry", m, d));
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(round3(a / b)),
                _ => None,
            };
            let total_ratio = ratio(q["total_ms"].as_f64(), f["total_ms"].as_f64());
            let stall_ratio = ratio(f["guest_stall_ms"].as_f64(), q["guest_stall_ms"].as_f64());
            let total_met = total_ratio.is_some_and(|r| r >= TARGET_TOTAL_RATIO);
            let stall_met = stall_ratio.is_some_and(|r| r <= TARGET_STALL_RATIO);
            json!({
                "mem_mib": m,
                "dirty_mib_s": d,
                "qemu": { "total_ms": q["total_ms"], "migrate_wall_ms": q["migrate_wall_ms"], "downtime_ms": q["downtime_ms"], "guest_stall_ms": q["guest_stall_ms"],
                          "pings_lost": q["pings_lost"], "max_gap_ms": q["max_gap_ms"] },
                "ferry": { "total_ms": f["total_ms"], "migrate_wall_ms": f["migrate_wall_ms"], "downtime_ms": f["downtime_ms"], "guest_stall_ms": f["guest_stall_ms"],
                           "pings_lost": f["pings_lost"], "max_gap_ms": f["max_gap_ms"] },
                "qemu_total_over_ferry_total": total_ratio,
                "ferry_stall_over_qemu_stall": stall_ratio,
                // The bench's own clock on both (migrate command to the
                // destination running), a check on the VMMs' own totals.
                "qemu_wall_over_ferry_wall": ratio(q["migrate_wall_ms"].as_f64(), f["migrate_wall_ms"].as_f64()),
                "downtime_ratio_ferry_over_qemu": ratio(f["downtime_ms"].as_f64(), q["downtime_ms"].as_f64()),
                "total_target": format!(">= {TARGET_TOTAL_RATIO}"),
                "total_met": total_met,
                "stall_target": format!("<= {TARGET_STALL_RATIO}"),
                "stall_met": stall_met,
                "met": total_met && stall_met,
            })
        })
        .collect()
}

/// `ferry lab up` and the taps (the lab's guard exists already).
fn lab_up() -> R<()> {
    for args in [&["up"][..], &["tap", "add", "a", TAP], &["tap", "add", "b", TAP]] {
        let mut all = vec!["lab"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--name", LAB]);
        let o = run_bounded(Command::new(ferry_bin()).args(&all), Duration::from_secs(60))?;
        if !o.status.success() {
            return Err(format!("ferry {all:?}: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
    }
    Ok(())
}

fn parse_cells() -> Vec<(u64, u64)> {
    let spec = std::env::var("BENCH_QEMU_CELLS").unwrap_or_else(|_| "1024:0,1024:50,4096:0".into());
    spec.split(',')
        .filter_map(|c| {
            let (m, d) = c.trim().split_once(':')?;
            Some((m.parse().ok()?, d.parse().ok()?))
        })
        .collect()
}

fn main() {
    ferry_e2e::clean_up_on_panic();
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/qemu.json".into());
    if !kvm_available("bench-qemu") || !root_available("bench-qemu") {
        return;
    }
    let started = Instant::now();
    let cells = parse_cells();
    let runs_per_cell = std::env::var("BENCH_QEMU_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(RUNS);
    let vmms: Vec<String> = std::env::var("BENCH_QEMU_VMMS")
        .unwrap_or_else(|_| "qemu,ferry".into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    let qemu = QemuBin::find();
    let qemu_problem = qemu.as_ref().err().cloned();
    if let Some(e) = &qemu_problem {
        eprintln!("bench-qemu: QEMU cannot run: {e}; QEMU cells are reported as not measured");
    }
    let qemu_version = qemu.as_ref().map(|q| q.version.clone()).ok();
    let qemu_exe = qemu.as_ref().map(|q| q.exe.display().to_string()).ok();
    // One copy of the ferry binary for the whole run (declared before the
    // lab so it outlives `ferry lab down`).
    let dir = ferry_e2e::TempDir::new("bench-qemu");
    let ferry = dir.path().join("ferry");
    if let Err(e) = std::fs::copy(ferry_bin(), &ferry) {
        eprintln!("bench-qemu: cannot copy the ferry binary: {e}");
        std::process::exit(1);
    }
    std::env::set_var("FERRY_BIN", &ferry);
    let lab = Lab { name: LAB.into() };
    // Spinning by default: the guest's idle port sleeps only on Ferry.
    let idle_us = match std::env::var("BENCH_QEMU_IDLE_US").as_deref() {
        Ok("default") => None,
        Ok(v) => v.parse().ok(),
        Err(_) => Some(0),
    };
    let ctx = Ctx { lab, dir: dir.path().to_owned(), qemu: qemu.ok(), idle_us };
    if let Err(e) = lab_up() {
        eprintln!("bench-qemu: {e}");
        drop(ctx); // `ferry lab down`: exit skips destructors
        std::process::exit(1);
    }

    let mut rows = Vec::new();
    let mut boots = Vec::new();
    let mut seq = 0;
    let mut sizes: Vec<u64> = cells.iter().map(|c| c.0).collect();
    sizes.dedup();
    for mem_mib in sizes {
        let rates: Vec<u64> = cells.iter().filter(|c| c.0 == mem_mib).map(|c| c.1).collect();
        for vmm in &vmms {
            let (r, b) = run_size(&ctx, vmm, mem_mib, &rates, &mut seq, runs_per_cell);
            rows.extend(r);
            boots.push(b);
        }
    }
    let Ctx { lab, .. } = ctx;
    drop(lab);

    let comparisons = comparisons(&rows, &cells);
    let all_met = !comparisons.is_empty() && comparisons.iter().all(|c| c["met"] == true);
    let qemu_measured = rows.iter().any(|r| r["vmm"] == "qemu" && r["migrations_ok"].as_u64().unwrap_or(0) > 0);
    if !qemu_measured {
        eprintln!("bench-qemu: no QEMU migration was measured: see qemu_problem and the QEMU rows' errors");
    }
    let pvm = ferry_e2e::is_pvm_host();
    let channels = multifd_channels();
    let report = json!({
        "bench": "qemu",
        "pvm_host": pvm,
        "qemu_version": qemu_version,
        "qemu_exe": qemu_exe,
        "qemu_problem": qemu_problem,
        "qemu_measured": qemu_measured,
        "qemu_command": format!(
            "ip netns exec {LAB}-<host> qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host,-arch-capabilities \
             -smp 1 -m <mem>M -nodefaults -no-user-config -display none -kernel ferry-guest.elf -append '<cmdline>' \
             -netdev tap,ifname={TAP},script=no,downscript=no -device virtio-net-device,mac={GUEST_MAC} \
             -chardev socket,...,logfile=<serial> -serial chardev:con0 -qmp unix:... [-incoming defer]"
        ),
        "qemu_migration": if channels > 0 {
            format!("multifd, {channels} channel(s)")
        } else {
            "plain precopy on one TCP stream (multifd off), as Ferry's one stream".to_string()
        },
        "qemu_settings": { "downtime-limit_ms": DOWNTIME_TARGET_MS, "max-bandwidth_bytes_s": MAX_BANDWIDTH,
                           "multifd_channels": channels, "auto-converge": false },
        "ferry_migration": "ferry migrate --mode live (encrypted, downtime target 20 ms, auto-converge on), one stream",
        "guest": "ferry-guest (PVH ELF), 1 vCPU, heartbeat_ms=200, wss_mib = half of memory, ip=10.200.77.10, tap vm0",
        "guest_idle_us": idle_us,
        "guest_idle_note": "the guest idles by writing its idle_us to port 0x510, which Ferry answers by sleeping; on QEMU \
                            0x510 is fw_cfg and does nothing, so the guest spins there. idle_us=0 (the default here, \
                            BENCH_QEMU_IDLE_US=default for the guest's 200) makes it spin on both, the same load for both",
        "runs_per_cell": runs_per_cell,
        "cells": rows,
        "comparison": comparisons,
        "targets": {
            "text": "every cell at least 4x faster in total time than QEMU with at most half its guest stall",
            "met": all_met,
        },
        "boots": boots,
        "anchor_2026_12_01": {
            "source": "DESIGN.md: QEMU 7.2 and Ferry on these machines, same guest and lab, 20 ms target, medians",
            "qemu": { "1g_idle": { "total_ms": 1900, "guest_stall_ms": 5.3, "pings_lost": 1, "max_gap_ms": 24 },
                      "1g_50": { "total_ms": 2100, "guest_stall_ms": 8.5, "pings_lost": 1 },
                      "4g_idle": { "total_ms": 7200, "guest_stall_ms": 5.8, "pings_lost": 0, "max_gap_ms": 20 } },
            "ferry": { "1g_idle": { "total_ms": 720, "guest_stall_ms": 4.4 },
                       "1g_50": { "total_ms": 770, "guest_stall_ms": 6.6 },
                       "4g_idle": { "total_ms": 6200, "guest_stall_ms": 45, "pings_lost": 4, "max_gap_ms": 99 } },
        },
        "bench_s": round3(started.elapsed().as_secs_f64()),
        "notes": "Both VMMs in one run, one lab, the same guest, pinger and console reader (tests/src/live_cell.rs). \
                  total_ms and downtime_ms are each VMM's own figures (QEMU: query-migrate total-time and downtime; \
                  Ferry: ferry migrate --json), so they are defined by each VMM; guest_stall_ms (max_stall_us of the \
                  first heartbeat on the destination, by the guest's TSC) and the ping figures are measured the same \
                  way for both and are the fair comparison. Medians of the counted runs (a run whose pinger stopped \
                  < 200 ms after the migration is repeated, at most 2 extra). This machine has 2 cores shared with \
                  other work: figures are indicative.",
    });
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    if let Some(d) = Path::new(&out).parent() {
        let _ = std::fs::create_dir_all(d);
    }
    if let Err(e) = std::fs::write(&out, &text) {
        eprintln!("bench-qemu: writing {out}: {e}");
    }
    // The ratios beside Ferry's own figures too, in live.json next to it
    // (if bench-live has written one there).
    let live = Path::new(&out).with_file_name("live.json");
    if let Ok(mut l) = std::fs::read(&live)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
    {
        l["qemu_comparison"] = json!({ "from": out, "cells": comparisons });
        if let Err(e) = std::fs::write(&live, serde_json::to_string_pretty(&l).unwrap_or_default()) {
            eprintln!("bench-qemu: writing {}: {e}", live.display());
        }
    }
    println!("{text}");
    for c in &comparisons {
        eprintln!(
            "{} MiB, {} MiB/s: QEMU total {} ms stall {} ms | Ferry total {} ms stall {} ms | total ratio {} (>= 4: {}), stall ratio {} (<= 0.5: {})",
            c["mem_mib"], c["dirty_mib_s"], c["qemu"]["total_ms"], c["qemu"]["guest_stall_ms"], c["ferry"]["total_ms"],
            c["ferry"]["guest_stall_ms"], c["qemu_total_over_ferry_total"], c["total_met"],
            c["ferry_stall_over_qemu_stall"], c["stall_met"]
        );
    }
}
