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
                .args(["record", "-e", "cpu-clock", "-g"])
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
