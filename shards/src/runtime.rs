//! runtime: starts one glommio executor per shard, pinned to a CPU, each with its own
//! SO_REUSEPORT listener on the same address so the kernel spreads connections.
//!
//! Before any executor starts, [`preflight`] checks that io_uring can start at all and
//! turns the usual failures (no io_uring, disabled by sysctl or seccomp, too little
//! locked memory) into one sentence saying what to change, instead of a panic.

use crate::metrics::ShardMetrics;
use crate::receive::{serve, ReceiveConfig, ShardContext};
use crate::sink::Sink;
use anyhow::{anyhow, bail, Context};
use glommio::{LocalExecutorBuilder, Placement};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// glommio refuses to start below this locked-memory limit.
pub const MEMLOCK_BYTES_MIN: u64 = 512 * 1024;
/// How long shards get to bind and report in.
const SHARD_START_TIMEOUT_MS: u64 = 10_000;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub listen: SocketAddr,
    pub shards: usize,
    /// Memory each executor registers with io_uring for direct storage I/O (the WAL
    /// writes through the page cache and does not use it). Registered buffers count
    /// against the locked-memory limit (three rings per executor).
    pub io_memory_bytes: usize,
    pub receive: ReceiveConfig,
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed cpu_set_t we own; CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

/// Checks that io_uring can start here, and says how to fix it if not.
pub fn preflight() -> anyhow::Result<()> {
    // SAFETY: getrlimit writes into the struct we own.
    let memlock = unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r);
        r.rlim_cur
    };
    if memlock != libc::RLIM_INFINITY && memlock < MEMLOCK_BYTES_MIN {
        bail!(
            "io_uring cannot start: the locked-memory limit is {} KiB and glommio needs at least {} KiB; \
             raise it with `ulimit -l unlimited` (shell) or `LimitMEMLOCK=infinity` (systemd unit)",
            memlock / 1024,
            MEMLOCK_BYTES_MIN / 1024
        );
    }
    // Set up and tear down one small ring to learn whether the kernel allows it.
    let mut params = [0u32; 30]; // struct io_uring_params is 120 bytes
                                 // SAFETY: io_uring_setup reads and writes the 120-byte params block we own and
                                 // returns a new file descriptor, which we close.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: fd is a descriptor we just received and own.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let fix = match err.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring (Linux 5.8 or newer is needed)",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "io_uring is forbidden here: set sysctl kernel.io_uring_disabled=0, and allow the io_uring_setup, \
             io_uring_enter and io_uring_register system calls in any seccomp profile (container runtimes and \
             systemd SystemCallFilter= may block them)"
        }
        Some(libc::ENOMEM) => "not enough locked memory for the ring: raise memlock (`ulimit -l unlimited` or LimitMEMLOCK=infinity)",
        _ => "check the kernel version, sysctl kernel.io_uring_disabled and seccomp filters",
    };
    bail!("io_uring cannot start ({err}): {fix}")
}

/// Starts the shards and serves until the process ends.
pub fn run<S, F>(opts: AgentOptions, make_sink: F) -> anyhow::Result<()>
where
    S: Sink + 'static,
    F: Fn(usize, &Arc<Vec<ShardMetrics>>) -> anyhow::Result<S> + Send + Sync + 'static,
{
    let handles = start(opts, make_sink)?;
    for h in handles.handles {
        h.join().map_err(|e| anyhow!("shard failed: {e}"))?;
    }
    Ok(())
}

/// Running shards.
pub struct Started {
    pub addr: SocketAddr,
    pub metrics: Arc<Vec<ShardMetrics>>,
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
}

/// Starts the shards and returns once every one is listening. `make_sink` runs once
/// per shard, on that shard's thread (the WAL recovers there); its error stops start-up.
pub fn start<S, F>(opts: AgentOptions, make_sink: F) -> anyhow::Result<Started>
where
    S: Sink + 'static,
    F: Fn(usize, &Arc<Vec<ShardMetrics>>) -> anyhow::Result<S> + Send + Sync + 'static,
{
    assert!(
        opts.shards > 0,
        "shards must be positive (checked at config load)"
    );
    preflight()?;
    // Probe the address without SO_REUSEPORT: this fails if anything else holds it
    // (so two agents never silently split one port), and resolves port 0.
    let addr = probe_bind(opts.listen)?;
    let cpus = allowed_cpus();
    let metrics: Arc<Vec<ShardMetrics>> =
        Arc::new((0..opts.shards).map(|_| ShardMetrics::default()).collect());
    let ready = Arc::new(AtomicBool::new(false));
    let make_sink = Arc::new(make_sink);
    let mut handles = Vec::with_capacity(opts.shards);
    let mut reports = Vec::with_capacity(opts.shards);
    for id in 0..opts.shards {
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let cpu = cpus[id % cpus.len()];
        let config = opts.receive.clone();
        let metrics = metrics.clone();
        let ready = ready.clone();
        let make_sink = make_sink.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard{id}"))
            .io_memory(opts.io_memory_bytes)
            .spawn(move || async move {
                let listener = match listen(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(format!("shard {id} cannot listen on {addr}: {e}")));
                        return;
                    }
                };
                let sink = match make_sink(id, &metrics) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(format!("shard {id}: {e:#}")));
                        return;
                    }
                };
                let _ = tx.send(Ok(()));
                serve(
                    listener,
                    Rc::new(ShardContext::new(id, config, metrics, ready, sink)),
                )
                .await;
            })
            .map_err(|e| anyhow!("cannot start shard {id}: {e}; {}", hint()))?;
        handles.push(handle);
        reports.push(rx);
    }
    for (id, rx) in reports.into_iter().enumerate() {
        match rx.recv_timeout(Duration::from_millis(SHARD_START_TIMEOUT_MS)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!(e),
            Err(_) => {
                // The executor ended before its task ran: glommio's reactor failed.
                let h = handles.remove(id.min(handles.len() - 1));
                let reason = match h.join() {
                    Err(e) => e.to_string(),
                    Ok(()) => "it stopped before listening".to_string(),
                };
                bail!("shard {id} could not start: {reason}; {}", hint());
            }
        }
    }
    ready.store(true, Relaxed);
    tracing::info!(%addr, shards = opts.shards, "agent listening");
    Ok(Started {
        addr,
        metrics,
        handles,
    })
}

/// Binds `addr` once without SO_REUSEPORT and returns the bound address. A process
/// that just died can hold its port for a moment (io_uring finishes its in-flight
/// requests, such as a pending accept, after the process is gone), so an address in
/// use is retried for a few seconds before giving up.
fn probe_bind(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let deadline = std::time::Instant::now() + Duration::from_millis(BIND_RETRY_MS);
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(probe) => return Ok(probe.local_addr()?),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
        }
    }
}

/// How long an address in use is retried at start-up.
const BIND_RETRY_MS: u64 = 5_000;

/// A listening socket with SO_REUSEPORT (one per shard on the same address) and
/// SO_REUSEADDR, which accepted connections inherit: after a crash, their leftover
/// sockets (FIN_WAIT2, TIME_WAIT) then do not stop the restarted agent from binding.
/// Must run on the shard's executor.
fn listen(addr: SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    // SAFETY: the descriptor is a bound, listening TCP socket whose ownership moves
    // into the glommio listener here and nowhere else.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Pending connections per shard listener.
const LISTEN_BACKLOG: i32 = 1024;

fn hint() -> &'static str {
    "io_uring needs locked memory (`ulimit -l unlimited`, LimitMEMLOCK=infinity) and must not be blocked by \
     seccomp or sysctl kernel.io_uring_disabled"
}
