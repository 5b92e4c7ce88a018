//! Processes tied to the test process: spawned from one long-lived thread with
//! `PR_SET_PDEATHSIG`, so they get SIGKILL when the test process goes away (the control plane,
//! the real node's kubelet and containerd), whichever test started them.
#![allow(dead_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread;

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// A thread that spawns every control plane process and lives as long as the test process:
/// `PR_SET_PDEATHSIG` fires when the thread that forked the child exits, so forking from a
/// test's thread would kill the control plane when that test ends.
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("e2e-process-parent".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
                // The sender lives in a static, so this is not reached; never exit regardless.
                loop {
                    thread::park();
                }
            })
            .expect("spawn the e2e process-parent thread");
        Mutex::new(requests)
    })
}

/// Spawns a process that gets SIGKILL when the test process goes away.
pub fn spawn_tied(mut command: Command) -> io::Result<Child> {
    // SAFETY: the hook only calls prctl, which is async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply, response) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| io::Error::other("the process-parent lock is poisoned"))?
        .send((command, reply))
        .map_err(|_| io::Error::other("the process-parent thread is gone"))?;
    response.recv().map_err(|_| io::Error::other("the process-parent thread did not answer"))?
}
