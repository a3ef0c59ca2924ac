//! An optional `perf record` of one process while a bench section runs:
//! on when the environment variable names an output file.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `perf record`, or nothing when the variable is unset.
pub struct Recording(Option<Child>);

impl Recording {
    /// Records `pid` at `hz` samples per second (CPU clock, call graphs)
    /// into the file `$var` names, if it is set.
    pub fn start(var: &str, pid: u32, hz: u32) -> Recording {
        Recording(std::env::var(var).ok().map(|out| {
            let child = Command::new("perf")
                .args([
                    "record",
                    "-e",
                    "cpu-clock",
                    "--call-graph",
                    &std::env::var("SIGIL_PERF_CALLGRAPH").unwrap_or("fp".into()),
                ])
                .args(["-F", &hz.to_string(), "-o", &out, "-p", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("perf record");
            // Give it time to attach before the measured work starts.
            std::thread::sleep(Duration::from_millis(500));
            child
        }))
    }

    /// Stops the recording (SIGINT, so perf writes its file) and waits.
    pub fn stop(self) {
        if let Some(mut child) = self.0 {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// CPU time a process has used so far, all its threads together, to the
/// nanosecond (the scheduler's own accounting in `/proc/<pid>/task/*/schedstat`;
/// the clock-tick figures in `/proc/<pid>/stat` move in 10 ms steps). Threads
/// that already exited are not counted, so read it across a section in which
/// the process keeps its threads.
#[allow(dead_code)]
pub fn threads_cpu_time(pid: u32) -> Duration {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}
