//! The one runner for every run of the `pdgate` binary in the tests.
//!
//! Each run gets a scrubbed environment (no `PDGATE_*`, `OTEL_*` or `RUST_LOG` of the
//! machine's leaks in; no colour, so lines parse), a time limit after which the child is
//! killed and the test fails instead of hanging CI, kill-on-drop for a child the test is done
//! with, and panic detection: a run whose stderr shows a panic (or that exits 101) fails the
//! test whatever it was asserting.

use std::ffi::OsStr;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a run may take unless the test says otherwise: generous for a loaded 2-core
/// machine, short enough that a hang fails CI instead of stalling it.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(60);

/// How long a test waits for a readiness line or another event of a running child.
pub const EVENT_LIMIT: Duration = Duration::from_secs(30);

/// A `pdgate` invocation, not started yet.
pub struct Pdgate {
    cmd: Command,
    shown: String,
    limit: Duration,
    stdin: Option<Vec<u8>>,
    /// False when the test gave the child's stdout somewhere else ([`Pdgate::stdout`]).
    stdout_captured: bool,
}

impl Pdgate {
    /// `pdgate args…` in the repository's directory, with a scrubbed environment.
    pub fn new<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::program(env!("CARGO_BIN_EXE_pdgate"), args)
    }

    /// Another program run the same way (a script that runs `pdgate`, a browser): the same
    /// scrubbed environment, time limit, kill-on-drop and panic detection.
    pub fn program<I, S>(program: impl AsRef<OsStr>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let mut cmd = Command::new(program);
        let mut shown = match Path::new(program).file_name() {
            Some(name) => name.to_string_lossy().into_owned(),
            None => program.to_string_lossy().into_owned(),
        };
        for arg in args {
            shown.push(' ');
            shown.push_str(&arg.as_ref().to_string_lossy());
            cmd.arg(arg);
        }
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("PDGATE_")
                || key_text.starts_with("OTEL_")
                || key_text == "RUST_LOG"
            {
                cmd.env_remove(&key);
            }
        }
        cmd.env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self {
            cmd,
            shown,
            limit: DEFAULT_LIMIT,
            stdin: None,
            stdout_captured: true,
        }
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Runs without `key` in the environment (e.g. `NO_COLOR`, which the runner sets).
    pub fn env_remove(mut self, key: &str) -> Self {
        self.cmd.env_remove(key);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cmd.current_dir(dir);
        self
    }

    /// The run fails the test if it has not exited after `limit`.
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// Bytes written to the child's stdin (then closed).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self.cmd.stdin(Stdio::piped());
        self
    }

    /// The child's stdout goes to `to` (another process's stdin, a closed pipe) instead of
    /// being captured: [`Output::stdout`] is then empty.
    pub fn stdout(mut self, to: impl Into<Stdio>) -> Self {
        self.cmd.stdout(to);
        self.stdout_captured = false;
        self
    }

    /// Runs to the end and returns the output. Blocks the calling thread: from a test that
    /// runs servers on its runtime, use [`output_async`](Self::output_async).
    pub fn output(self) -> Output {
        let limit = self.limit;
        self.spawn().wait_within(limit)
    }

    /// [`output`](Self::output) off the runtime's threads.
    pub async fn output_async(self) -> Output {
        tokio::task::spawn_blocking(move || self.output())
            .await
            .unwrap()
    }

    /// Starts the child; it is killed when the returned [`Running`] is dropped.
    pub fn spawn(mut self) -> Running {
        let started = Instant::now();
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("`{}` does not start: {e}", self.shown));
        if let Some(bytes) = self.stdin.take() {
            let mut stdin = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                use std::io::Write;
                // The child may exit without reading it all; that is its answer to judge.
                let _ = stdin.write_all(&bytes);
            });
        }
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = vec![drain(child.stderr.take().unwrap(), stderr.clone())];
        if self.stdout_captured {
            readers.push(drain(child.stdout.take().unwrap(), stdout.clone()));
        }
        Running {
            child,
            shown: self.shown,
            started,
            stdout,
            stderr,
            readers,
            status: None,
        }
    }
}

/// Copies `from` into `into` until end of file, on a thread of its own.
fn drain(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// A `listening` line of `pdgate serve`: which listener, its bound address, the identity mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    pub listener: String,
    pub addr: SocketAddr,
    pub identity: String,
}

impl Listening {
    /// From a text line (`listening listener="api" addr=… identity="mtls"`) or a JSON line.
    pub fn parse(line: &str) -> Option<Self> {
        if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            if v["message"] != "listening" {
                return None;
            }
            return Some(Self {
                listener: v["listener"].as_str()?.to_owned(),
                addr: v["addr"].as_str()?.parse().ok()?,
                identity: v["identity"].as_str()?.to_owned(),
            });
        }
        let (_, fields) = line.split_once(": listening ")?;
        let field = |name: &str| {
            fields
                .split_whitespace()
                .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_owned())
        };
        Some(Self {
            listener: field("listener")?,
            addr: field("addr")?.parse().ok()?,
            identity: field("identity")?,
        })
    }
}

/// A running `pdgate`. Dropping it kills the child (ours, by its pid) and reaps it.
pub struct Running {
    child: Child,
    shown: String,
    started: Instant,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            // Already failing or done with it: nothing to report if it is gone by now.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// What the child has written to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) to the child.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {} failed", self.pid());
    }

    /// The child's exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Waits up to [`EVENT_LIMIT`] for a line of stdout or stderr that `matches`, and returns
    /// it. Fails the test if the child exits first or the limit passes.
    pub async fn line(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + EVENT_LIMIT;
        loop {
            let found = [self.stdout(), self.stderr()]
                .iter()
                .flat_map(|text| text.lines().map(str::to_owned).collect::<Vec<_>>())
                .find(|l| matches(l));
            if let Some(line) = found {
                return line;
            }
            if let Some(status) = self.try_status() {
                self.check_no_panic();
                panic!(
                    "`{}` exited ({status}) before {what}\nstdout:\n{}\nstderr:\n{}",
                    self.shown,
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "`{}`: no {what} within {EVENT_LIMIT:?}\nstderr:\n{}",
                self.shown,
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// For `pdgate serve`: waits for the lines it logs once both ports are bound, and returns
    /// the bound (data, api) addresses. The child must log at info (see [`serve`]).
    pub async fn serving(&mut self) -> (SocketAddr, SocketAddr) {
        let data = self.listening("data").await.addr;
        let api = self.listening("api").await.addr;
        (data, api)
    }

    /// For `pdgate serve`: waits for the `listening` line of `listener` (`data`, `api`), in
    /// either log format.
    pub async fn listening(&mut self, listener: &str) -> Listening {
        let line = self
            .line(&format!("the `listening` line of `{listener}`"), |l| {
                Listening::parse(l).is_some_and(|found| found.listener == listener)
            })
            .await;
        Listening::parse(&line).unwrap()
    }

    /// Waits up to `limit` for the child to exit, off the runtime's threads; fails the test
    /// (killing the child) if it does not.
    pub async fn exit_within(mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        while self.try_status().is_none() {
            if Instant::now() >= deadline {
                self.fail_after(limit);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.finish()
    }

    /// [`exit_within`](Self::exit_within), blocking the calling thread.
    pub fn wait_within(mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        while self.try_status().is_none() {
            if Instant::now() >= deadline {
                self.fail_after(limit);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.finish()
    }

    /// How long the child has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn fail_after(&mut self, limit: Duration) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "`{}` still running after {limit:?}: killed\nstdout:\n{}\nstderr:\n{}",
            self.shown,
            self.stdout(),
            self.stderr()
        );
    }

    fn finish(mut self) -> Output {
        for reader in std::mem::take(&mut self.readers) {
            reader.join().unwrap();
        }
        self.check_no_panic();
        Output {
            status: self.status.unwrap(),
            stdout: std::mem::take(&mut *self.stdout.lock().unwrap()),
            stderr: std::mem::take(&mut *self.stderr.lock().unwrap()),
        }
    }

    fn check_no_panic(&self) {
        let stderr = self.stderr();
        assert!(
            !stderr.contains("panicked at") && self.status.and_then(|s| s.code()) != Some(101),
            "`{}` panicked:\n{stderr}",
            self.shown
        );
    }
}

/// `pdgate serve` on ports the kernel picks (`127.0.0.1:0`: no port is chosen by the test,
/// freed and hoped for), logging at info so that [`Running::serving`] reads the bound
/// addresses, with `extra` arguments after these.
pub fn serve(policy: &Path, state: &Path, extra: &[&str]) -> Pdgate {
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--policy",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(policy.display().to_string());
    args.push("--audit".into());
    args.push(state.join("audit").display().to_string());
    args.push("--subjects-store".into());
    args.push(state.join("subjects.db").display().to_string());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Pdgate::new(args).env("PDGATE_LOG", "warn,pdgate=info")
}
