//! The disk spool (`analytics_spool`): lines whose write failed for a reason worth retrying are
//! appended to a file, and written again once the sink answers.
//!
//! A *spool* belongs to a sink: a server block's write URI, as batches are keyed. Each worker
//! appends to a file of its own per spool (`<sink id>.<pid>.<ms>.spool`, format in
//! [`crate::core::spool`]) and holds an exclusive `flock` on it for its life. Files whose lock
//! is free belong to no live worker (it exited, was killed, or the nginx before a restart left
//! them): any worker *adopts* them at its next look at the directory (at worker start and every
//! `retry=`), replays them, and removes them once drained. A lock is held by one process at a
//! time, so no file is ever replayed by two workers at once.
//!
//! Replay needs no beacon: every `retry=` while anything is spooled (and at once after a
//! beacon's write to the same URI succeeded) the worker writes the oldest spooled lines, in
//! chunks no larger than `analytics_batch` allows, through a POST subrequest to the write URI,
//! like a beacon's batch. The subrequest's parent is a request of the module's own, on a
//! connection without a socket, made the way nginx makes the requests of HTTP/2 streams
//! (`ngx_http_create_request` on a fake connection). A line written twice is one point (every
//! line keeps its own timestamp), so a replay that is cut short (a killed worker, a lost answer)
//! is simply done again.
//!
//! Everything runs on the worker's thread, from nginx event handlers. The worker's spools live
//! in a thread-local table that is never borrowed while nginx runs a request (which may call
//! back into this module).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_void};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::ptr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ngx::ffi::{
    ngx_add_path, ngx_add_timer, ngx_conf_t, ngx_connection_t, ngx_create_pool, ngx_cycle,
    ngx_cycle_t, ngx_del_timer, ngx_delete_posted_event, ngx_destroy_pool, ngx_event_t,
    ngx_exiting, ngx_http_conf_ctx_t, ngx_http_connection_t, ngx_http_core_main_conf_t,
    ngx_http_core_module, ngx_http_core_srv_conf_t, ngx_http_create_request, ngx_http_free_request,
    ngx_http_log_ctx_t, ngx_http_request_t, ngx_http_run_posted_requests, ngx_list_init, ngx_log_t,
    ngx_path_t, ngx_pid, ngx_pnalloc, ngx_pool_cleanup_add, ngx_post_event, ngx_posted_events,
    ngx_quit, ngx_str_t, ngx_table_elt_t, ngx_terminate, ngx_uint_t, u_char, NGX_HTTP_POST,
    NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_LOG_WARN,
};
use ngx::http::{HttpModuleMainConf, NgxHttpCoreModule, Request};
use ngx::ngx_log_error;

use crate::core::batch::{BatchLimits, ChunkOutcome};
use crate::core::spool::{
    encode_entry, file_name, human_size, parse_file_name, read_chunk, sink_id, SpoolSettings,
    ENTRY_OVERHEAD, MAX_ENTRY,
};
use crate::request::{no_panic, NGX_OK};
use crate::subrequest::{start_write, WriteCapture};
use crate::HttpAnalyticsModule;

/// `analytics_spool` of a location: the directory (absolute) and its limits.
#[derive(Debug)]
pub struct SpoolConf {
    /// The spool directory, absolute.
    pub dir: String,
    /// Most bytes a sink's spool files may hold together (`max_size=`).
    pub max_size: u64,
    /// How often a spool that is not empty is replayed, in ms (`retry=`).
    pub retry_ms: u64,
}

/// A sink with a spool, found at configuration time (every location with `analytics;` and a
/// spool), so that a worker can replay what is spooled for it without waiting for a beacon.
#[derive(Debug)]
pub struct SpoolSink {
    /// The server block (its `srv_conf` array), as batches key it.
    pub server: usize,
    /// The server block's core configuration.
    cscf: *mut ngx_http_core_srv_conf_t,
    /// The server block's configuration context, for the replay's own requests.
    conf_ctx: *mut ngx_http_conf_ctx_t,
    /// The write URI.
    pub uri: String,
    /// The spool's settings.
    pub conf: Arc<SpoolConf>,
    /// Batch limits of the location: the largest replay write.
    pub limits: BatchLimits,
    /// What identifies the sink across restarts (server names, listen addresses, write URI).
    pub identity: String,
}

/// Resolves the directory of `analytics_spool` against nginx's prefix and has nginx create it
/// at start, like its temp paths (mode 0700, owned by the worker user).
///
/// # Safety
/// `cf` must be the configuration context of the directive being parsed.
pub unsafe fn conf_from_settings(
    cf: *mut ngx_conf_t,
    settings: &SpoolSettings,
) -> Result<SpoolConf, String> {
    // SAFETY: the caller passes a live configuration context; its cycle is the one being
    // configured.
    let (cycle, pool, conf_file) = unsafe { ((*cf).cycle, (*cf).pool, (*cf).conf_file) };
    let dir = if settings.path.starts_with('/') {
        settings.path.clone()
    } else {
        // SAFETY: a cycle's prefix is set before the configuration is parsed.
        let prefix = unsafe { (*cycle).prefix.as_bytes() };
        let prefix = String::from_utf8_lossy(prefix);
        format!("{}/{}", prefix.trim_end_matches('/'), settings.path)
    };
    // SAFETY: the pool of the configuration being parsed; NULL is checked.
    let name = unsafe { ngx_pnalloc(pool, dir.len() + 1) }.cast::<u8>();
    // SAFETY: as above.
    let path = unsafe { ngx::ffi::ngx_pcalloc(pool, size_of::<ngx_path_t>()) }.cast::<ngx_path_t>();
    if name.is_null() || path.is_null() {
        return Err("could not allocate memory".to_string());
    }
    // SAFETY: `name` has room for the path and its terminating NUL (nginx's paths are C
    // strings); `path` is a zeroed path (no levels, no manager or loader), filled in as
    // `ngx_conf_set_path_slot` does; `conf_file` is the file being parsed.
    unsafe {
        ptr::copy_nonoverlapping(dir.as_ptr(), name, dir.len());
        *name.add(dir.len()) = 0;
        (*path).name = ngx_str_t {
            len: dir.len(),
            data: name,
        };
        if let Some(file) = conf_file.as_ref() {
            (*path).conf_file = file.file.name.data;
            (*path).line = file.line;
        }
        let mut slot = path;
        if ngx_add_path(cf, &mut slot) != NGX_OK {
            return Err(format!("could not add the path \"{dir}\""));
        }
    }
    Ok(SpoolConf {
        dir,
        max_size: settings.max_size,
        retry_ms: settings.retry_ms,
    })
}

/// Registers the sink of an `analytics;` location with a spool (from `merge_loc_conf`, where
/// `cf->ctx` holds the server block being merged).
///
/// # Safety
/// `cf` must be the configuration context nginx passed to `merge_loc_conf`.
pub unsafe fn register(
    cf: *mut ngx_conf_t,
    uri: &str,
    conf: &Arc<SpoolConf>,
    limits: BatchLimits,
) -> Result<(), String> {
    // SAFETY: while nginx merges a server block's locations, `cf->ctx` is an
    // `ngx_http_conf_ctx_t` whose `srv_conf` is that server block's.
    let srv_conf = unsafe { (*(*cf).ctx.cast::<ngx_http_conf_ctx_t>()).srv_conf };
    // SAFETY: the core module's index into a valid `srv_conf` array.
    let cscf = unsafe {
        (*srv_conf.add(ngx_http_core_module.ctx_index)).cast::<ngx_http_core_srv_conf_t>()
    };
    // SAFETY: as above.
    let Some(cscf_ref) = (unsafe { cscf.as_ref() }) else {
        return Err("has no server configuration".to_string());
    };
    // SAFETY: `cf` is valid (see above).
    let mcf =
        HttpAnalyticsModule::main_conf_mut(unsafe { &*cf }).ok_or("has no main configuration")?;
    let server = srv_conf as usize;
    let known = mcf
        .spool_sinks
        .iter()
        .any(|s| s.server == server && s.uri == uri && s.conf.dir == conf.dir);
    if known {
        return Ok(());
    }
    // SAFETY: `cf` is valid; the server block's identity is read from its configuration.
    let identity = unsafe { server_identity(cf, cscf_ref, uri, false) };
    mcf.spool_sinks.push(SpoolSink {
        server,
        cscf,
        conf_ctx: cscf_ref.ctx,
        uri: uri.to_string(),
        conf: Arc::clone(conf),
        limits,
        identity,
    });
    Ok(())
}

/// What identifies a server block's sink across reloads and restarts: its server names and the
/// write URI; for a server block without a name, the addresses it listens on instead of the
/// names. Two server blocks that differ in these never replay each other's lines, and a spool
/// survives the usual edits of a site's configuration (another `listen`, a changed location).
///
/// # Safety
/// `cf` must be a valid configuration context of the `http` block, `cscf` one of its servers.
unsafe fn server_identity(
    cf: *mut ngx_conf_t,
    cscf: &ngx_http_core_srv_conf_t,
    uri: &str,
    with_listen: bool,
) -> String {
    let text = |s: &ngx_str_t| String::from_utf8_lossy(s.as_bytes()).into_owned();
    // SAFETY: `server_names` is an array of `ngx_http_server_name_t` in the configuration pool.
    let names: Vec<String> = unsafe {
        cscf.server_names
            .as_slice::<ngx::ffi::ngx_http_server_name_t>()
    }
    .iter()
    .map(|n| text(&n.name))
    .collect();
    let named = names.iter().any(|n| !n.is_empty() && n != "_");
    if named && !with_listen {
        return format!("server_name={} uri={uri}", names.join(","));
    }
    let mut listens = Vec::new();
    let cmcf = NgxHttpCoreModule::main_conf(
        // SAFETY: `cf` is valid (see the caller).
        unsafe { &*cf },
    )
    .map(ptr::from_ref::<ngx_http_core_main_conf_t>);
    // SAFETY: `ports` is NULL or an array of `ngx_http_conf_port_t`, each with an array of
    // `ngx_http_conf_addr_t` whose `servers` arrays hold server configuration pointers; all
    // live in the configuration pool while the configuration is parsed.
    if let Some(ports) = cmcf.and_then(|c| unsafe { (*c).ports.as_ref() }) {
        // SAFETY: as above.
        for port in unsafe { ports.as_slice::<ngx::ffi::ngx_http_conf_port_t>() } {
            // SAFETY: as above.
            for addr in unsafe { port.addrs.as_slice::<ngx::ffi::ngx_http_conf_addr_t>() } {
                // SAFETY: as above.
                let servers = unsafe { addr.servers.as_slice::<*mut ngx_http_core_srv_conf_t>() };
                if servers.iter().any(|s| ptr::eq(*s, cscf)) {
                    listens.push(text(&addr.opt.addr_text));
                }
            }
        }
    }
    listens.sort();
    listens.dedup();
    match named {
        true => format!(
            "server_name={} listen={} uri={uri}",
            names.join(","),
            listens.join(",")
        ),
        false => format!("listen={} uri={uri}", listens.join(",")),
    }
}

/// Makes the identities of the configuration's spooled sinks unique (`postconfiguration`): server
/// blocks that share their names and write URI (an HTTP and an HTTPS block of one site, several
/// development sites all called `localhost`) are told apart by their listen addresses too, so
/// that none replays into another's write location. Blocks that share even those are refused.
///
/// # Safety
/// `cf` must be the configuration context nginx passes to `postconfiguration`.
pub unsafe fn settle_identities(
    cf: *mut ngx_conf_t,
    sinks: &mut [SpoolSink],
) -> Result<(), String> {
    let clashing = |sinks: &[SpoolSink]| -> Vec<usize> {
        (0..sinks.len())
            .filter(|&i| {
                sinks.iter().enumerate().any(|(j, other)| {
                    j != i
                        && other.server != sinks[i].server
                        && other.conf.dir == sinks[i].conf.dir
                        && other.identity == sinks[i].identity
                })
            })
            .collect()
    };
    // Every block of a clash changes, whatever the order of the configuration: none keeps the
    // plain identity, so files spooled under it are left alone (logged as belonging to no
    // block) rather than replayed into one of them.
    for i in clashing(sinks) {
        // SAFETY: the server configuration of a registered sink lives in the configuration
        // pool; `cf` is valid (see the caller).
        let cscf = unsafe { &*sinks[i].cscf };
        // SAFETY: as above.
        sinks[i].identity = unsafe { server_identity(cf, cscf, &sinks[i].uri, true) };
    }
    match clashing(sinks).first() {
        Some(&i) => Err(format!(
            "cannot tell the spools of two server blocks apart: both are \"{}\" (give them \
             different server names or listen addresses, or different spool directories)",
            sinks[i].identity
        )),
        None => Ok(()),
    }
}

/// The spool directories of `sinks`, each once.
fn spool_dirs(sinks: &[SpoolSink]) -> Vec<&str> {
    let mut dirs: Vec<&str> = sinks.iter().map(|s| s.conf.dir.as_str()).collect();
    dirs.sort_unstable();
    dirs.dedup();
    dirs
}

/// Configuration check (`postconfiguration`): every spool directory exists (it is created
/// here when missing and, when nginx runs as root, given to the worker user as nginx does with
/// its temp paths) and the worker user can create files in it (checked as that user), so that
/// `nginx -t` and a reload refuse a directory the workers cannot use; a failed reload keeps the
/// running configuration.
///
/// # Safety
/// `cf` must be the configuration context nginx passes to `postconfiguration`.
pub unsafe fn check_directories(cf: *mut ngx_conf_t, sinks: &[SpoolSink]) -> Result<(), String> {
    let dirs = spool_dirs(sinks);
    if dirs.is_empty() {
        return Ok(());
    }
    // SAFETY: the caller passes a valid configuration context.
    let worker = unsafe { worker_user(cf) };
    for dir in dirs {
        let not_writable = |why: String| {
            format!("analytics_spool directory \"{dir}\" is not writable by the worker user: {why}")
        };
        if fs::metadata(dir).is_err() {
            fs::create_dir_all(dir).map_err(|e| not_writable(e.to_string()))?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        match worker {
            Some((uid, gid)) => {
                // As nginx's `ngx_create_paths` does: owned by the worker user, u+rwx.
                let meta = fs::metadata(dir).map_err(|e| not_writable(e.to_string()))?;
                if meta.uid() != uid {
                    std::os::unix::fs::chown(dir, Some(uid), None)
                        .map_err(|e| not_writable(e.to_string()))?;
                }
                if meta.mode() & 0o700 != 0o700 {
                    fs::set_permissions(dir, fs::Permissions::from_mode(meta.mode() | 0o700))
                        .map_err(|e| not_writable(e.to_string()))?;
                }
                // The check itself runs as the worker user: a parent directory it cannot
                // enter, or a read-only file system, fail here.
                let ok = std::process::Command::new("/bin/sh")
                    .args([
                        "-c",
                        "test -d \"$1\" && test -w \"$1\" && test -x \"$1\"",
                        "sh",
                        dir,
                    ])
                    .uid(uid)
                    .gid(gid)
                    .stdin(std::process::Stdio::null())
                    .status()
                    .map_err(|e| not_writable(format!("could not check: {e}")))?;
                if !ok.success() {
                    return Err(not_writable(format!("uid {uid} cannot create files in it")));
                }
            }
            None => {
                let probe = format!("{dir}/.analytics-probe.{}", std::process::id());
                let created = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&probe);
                match created {
                    Ok(_) => {
                        let _ = fs::remove_file(&probe);
                    }
                    Err(e) => return Err(not_writable(e.to_string())),
                }
            }
        }
    }
    Ok(())
}

/// The worker processes' user and group when nginx runs as root with worker processes (the
/// `user` directive, else nginx's default user), or `None` when they run as the current user
/// (not root, or `master_process off`).
///
/// # Safety
/// `cf` must be a valid configuration context.
unsafe fn worker_user(cf: *mut ngx_conf_t) -> Option<(u32, u32)> {
    // SAFETY: a libc call without arguments.
    if unsafe { ngx::ffi::geteuid() } != 0 {
        return None;
    }
    // SAFETY: the cycle's configuration array holds the core module's configuration, an
    // `ngx_core_conf_t`, created before any other directive was parsed.
    let ccf = unsafe {
        let ctx = (*(*cf).cycle).conf_ctx;
        (*ctx.add(ngx::ffi::ngx_core_module.index))
            .cast::<ngx::ffi::ngx_core_conf_t>()
            .as_ref()
    }?;
    // `master_process off`: nginx runs as one process and never changes its user.
    if ccf.master == 0 {
        return None;
    }
    const UNSET: u32 = u32::MAX;
    if ccf.user != UNSET {
        let group = if ccf.group != UNSET {
            ccf.group
        } else {
            ccf.user
        };
        return Some((ccf.user, group));
    }
    // No `user` directive (yet): nginx will use its default user and group.
    // SAFETY: libc lookups with constant C strings; the results are read at once.
    unsafe {
        let pwd = ngx::ffi::getpwnam(ngx::ffi::NGX_USER.as_ptr()).as_ref()?;
        let group = ngx::ffi::getgrnam(ngx::ffi::NGX_GROUP.as_ptr())
            .as_ref()
            .map_or(pwd.pw_gid, |g| g.gr_gid);
        Some((pwd.pw_uid, group))
    }
}

/// One spool file this worker holds (its own, or one it adopted).
struct SpoolFile {
    path: String,
    file: File,
    /// Bytes in the file (where the next append goes, for the worker's own file).
    size: u64,
    /// Where replay reads next (an entry boundary).
    read_at: u64,
    /// Torn or corrupt entries found in it so far (logged once per file).
    skipped: usize,
}

impl SpoolFile {
    fn unread(&self) -> u64 {
        self.size.saturating_sub(self.read_at)
    }
}

/// Which file a replay write reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Own,
    Adopted,
}

/// The write a spool has in flight.
struct Replay {
    request: *mut ngx_http_request_t,
    capture: *mut WriteCapture,
    source: Source,
    /// Where the file's read position goes once the sink stored the chunk.
    end: u64,
    lines: usize,
}

/// The request-less connection a spool's replay requests run on (built like the fake
/// connections of HTTP/2 streams: no socket, events that never fire, a log of its own).
struct FakeConnection {
    c: ngx_connection_t,
    read: ngx_event_t,
    write: ngx_event_t,
    log: ngx_log_t,
    log_ctx: ngx_http_log_ctx_t,
    hc: ngx_http_connection_t,
    sockaddr: ngx::ffi::sockaddr_in,
}

/// This worker's state of one spool.
struct Spool {
    cycle: usize,
    server: usize,
    uri: String,
    conf: Arc<SpoolConf>,
    limits: BatchLimits,
    identity: String,
    id: u64,
    /// The worker's own file, created when the first line is spooled.
    own: Option<SpoolFile>,
    /// Files of workers that are gone, oldest first.
    adopted: VecDeque<SpoolFile>,
    /// Bytes in other live workers' files for this sink, at the last look at the directory.
    others_bytes: u64,
    /// Lines appended to the worker's own file and not yet flushed to disk (background mode).
    dirty: bool,
    /// Whether the spool holds lines (for the "started filling" / "drained" log lines).
    filling: bool,
    /// A write failed and none succeeded since (`background` lines then go to the spool).
    failing: bool,
    /// The configuration of this spool was replaced by a reload (single-process nginx): it
    /// takes no new lines and has handed its files to the new one.
    retired: bool,
    /// Points refused since the last refusal was logged, the last reason, and when that was
    /// (ms).
    refused_points: u64,
    refusal_reason: String,
    refusal_logged_at: u64,
    /// Lines replayed since the spool started filling.
    replayed_lines: u64,
    /// Most lines a replay write carries (halved on a 413, back to the limit after a success).
    max_lines: usize,
    replay: Option<Replay>,
    /// The retry timer and the "replay now" posted event.
    event: Box<ngx_event_t>,
    fake: Box<FakeConnection>,
}

thread_local! {
    /// The worker's spools. Only ever added to; an index stays valid for the worker's life.
    static SPOOLS: RefCell<Vec<Spool>> = const { RefCell::new(Vec::new()) };
}

fn with_spool<T>(index: usize, f: impl FnOnce(&mut Spool) -> T) -> T {
    SPOOLS.with(|spools| f(&mut spools.borrow_mut()[index]))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn exiting() -> bool {
    // SAFETY: process-wide flags nginx sets from its signal handling, only read here.
    unsafe { ngx_exiting != 0 || ngx_terminate != 0 || ngx_quit != 0 }
}

fn cycle_log() -> *mut ngx_log_t {
    // SAFETY: `ngx_cycle` is valid in a worker; its log too.
    unsafe { (*ngx_cycle).log }
}

/// Logs a line in the cycle's error log: a spool's work belongs to no request.
macro_rules! cycle_log_error {
    ($level:expr, $($arg:tt)+) => {
        // SAFETY: in a worker, the cycle's log is valid (or NULL, then nothing is logged).
        if let Some(log) = unsafe { cycle_log().as_mut() } {
            ngx_log_error!($level, log, $($arg)+);
        }
    };
}

/// The index of this worker's spool for a sink (`server`, `uri`, spooling into `dir`), created
/// on first use from the configuration's registry; `None` when the sink has no spool.
pub fn spool_for(server: usize, uri: &str, dir: &str) -> Option<usize> {
    // SAFETY: nginx sets `ngx_cycle` before any request runs; only read here.
    let cycle = unsafe { ngx_cycle } as usize;
    let found = SPOOLS.with(|spools| {
        spools.borrow().iter().position(|s| {
            s.cycle == cycle && s.server == server && s.uri == uri && s.conf.dir == dir
        })
    });
    if found.is_some() {
        return found;
    }
    // SAFETY: as above.
    let mcf = HttpAnalyticsModule::main_conf(unsafe { &*ngx_cycle })?;
    let sink = mcf
        .spool_sinks
        .iter()
        .find(|s| s.server == server && s.uri == uri && s.conf.dir == dir)?;
    Some(add_spool(cycle, sink))
}

fn add_spool(cycle: usize, sink: &SpoolSink) -> usize {
    // SAFETY: all zeroes is the valid unused state of these C structs (nginx allocates them
    // zeroed too); they are filled in by `FakeConnection::init` and `add_spool`.
    let fake: Box<FakeConnection> = Box::new(unsafe { std::mem::zeroed() });
    // SAFETY: as above.
    let event: Box<ngx_event_t> = Box::new(unsafe { std::mem::zeroed() });
    let index = SPOOLS.with(|spools| {
        let mut spools = spools.borrow_mut();
        spools.push(Spool {
            cycle,
            server: sink.server,
            uri: sink.uri.clone(),
            conf: Arc::clone(&sink.conf),
            limits: sink.limits,
            identity: sink.identity.clone(),
            id: sink_id(&sink.identity),
            own: None,
            adopted: VecDeque::new(),
            others_bytes: 0,
            dirty: false,
            filling: false,
            failing: false,
            retired: false,
            refused_points: 0,
            refusal_reason: String::new(),
            refusal_logged_at: 0,
            replayed_lines: 0,
            max_lines: sink.limits.max_lines.max(1),
            replay: None,
            event,
            fake,
        });
        spools.len() - 1
    });
    with_spool(index, |spool| {
        let event = &mut *spool.event;
        event.handler = Some(spool_event);
        event.data = index as *mut c_void;
        event.log = cycle_log();
        // The retry timer must not hold up a worker's graceful exit.
        event.set_cancelable(1);
        spool.fake.init(sink.conf_ctx);
    });
    index
}

impl FakeConnection {
    /// Wires the connection's parts together once; it stays at this address (boxed) for the
    /// worker's life.
    fn init(&mut self, conf_ctx: *mut ngx_http_conf_ctx_t) {
        let c: *mut ngx_connection_t = &mut self.c;
        // SAFETY: a copy of the cycle's log, so that error lines go where the worker's go;
        // `ngx_http_create_request` then points it at the server block's `error_log`.
        self.log = unsafe { *cycle_log() };
        self.log.data = ptr::addr_of_mut!(self.log_ctx).cast();
        self.log.handler = Some(replay_log_handler);
        self.log.action = ptr::null_mut();
        self.log_ctx.connection = c;
        for (event, write) in [(&mut self.read, 0), (&mut self.write, 1)] {
            event.data = c.cast();
            event.log = &mut self.log;
            event.handler = Some(match write {
                1 => fake_write_event,
                _ => ignore_event,
            });
            event.set_write(write);
            // Always ready, and "active" so that nginx never adds this socketless connection
            // to the event loop (ngx_http_upstream_init does, for a client connection not yet
            // there) nor arms a send timer on it.
            event.set_ready(1);
            event.set_active(1);
        }
        self.sockaddr.sin_family = ngx::ffi::AF_INET as _;
        self.sockaddr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        static ADDR_TEXT: &[u8] = b"127.0.0.1";
        self.hc.conf_ctx = conf_ctx;
        self.c.fd = -1;
        self.c.read = &mut self.read;
        self.c.write = &mut self.write;
        self.c.log = &mut self.log;
        self.c.sockaddr = ptr::addr_of_mut!(self.sockaddr).cast();
        self.c.local_sockaddr = ptr::addr_of_mut!(self.sockaddr).cast();
        self.c.socklen = size_of::<ngx::ffi::sockaddr_in>() as _;
        self.c.local_socklen = size_of::<ngx::ffi::sockaddr_in>() as _;
        self.c.addr_text = ngx_str_t {
            len: ADDR_TEXT.len(),
            data: ADDR_TEXT.as_ptr().cast_mut(),
        };
        self.c.set_sndlowat(1);
        self.c
            .set_tcp_nodelay(ngx::ffi::ngx_connection_tcp_nodelay_e_NGX_TCP_NODELAY_DISABLED);
    }
}

/// Handler of the fake connection's read event: there is no client to read from. (nginx posts a
/// ready read event when an upstream starts; a client connection would look for an early close
/// there.)
unsafe extern "C" fn ignore_event(_ev: *mut ngx_event_t) {}

/// Handler of the fake connection's write event, as nginx's own `ngx_http_request_handler`: a
/// module that delays the write (`limit_req` with a delay) sets a timer on it and resumes the
/// request in its write handler.
unsafe extern "C" fn fake_write_event(ev: *mut ngx_event_t) {
    // SAFETY: the event belongs to a spool's fake connection (`data`), which lives for the
    // worker's life; `c->data` is the request running on it, unless the connection is between
    // requests (`destroyed`), whose timers `replay_request_gone` removed.
    unsafe {
        let c = (*ev).data.cast::<ngx_connection_t>();
        if c.is_null() || (*c).destroyed() != 0 || (*c).data.is_null() {
            return;
        }
        let r = (*c).data.cast::<ngx_http_request_t>();
        if (*ev).delayed() != 0 && (*ev).timedout() != 0 {
            (*ev).set_delayed(0);
            (*ev).set_timedout(0);
        }
        if let Some(handler) = (*r).write_event_handler {
            handler(r);
        }
        ngx_http_run_posted_requests(c);
    }
}

/// Removes the timers and posted events a request left on a fake connection's events.
///
/// # Safety
/// `c` must be a spool's fake connection.
unsafe fn clear_fake_events(c: *mut ngx_connection_t) {
    // SAFETY: the fake connection's events live with it; nginx's timer and posted-event
    // helpers take them out of the tree and the queue.
    unsafe {
        for ev in [(*c).read, (*c).write] {
            if (*ev).timer_set() != 0 {
                ngx_del_timer(ev);
            }
            if (*ev).posted() != 0 {
                ngx_delete_posted_event(ev);
            }
            (*ev).set_delayed(0);
            (*ev).set_timedout(0);
        }
    }
}

/// Adds the spool replay to error lines logged on its requests (nginx's own HTTP log handler
/// would print the client's address and request line, which a replay has not).
unsafe extern "C" fn replay_log_handler(
    log: *mut ngx_log_t,
    buf: *mut u_char,
    len: usize,
) -> *mut u_char {
    let mut text = String::new();
    // SAFETY: nginx passes the log it is writing a line for; `action` is NULL or a C string.
    let log = unsafe { log.as_ref() };
    if let Some(action) = log.and_then(|l| (!l.action.is_null()).then_some(l.action)) {
        // SAFETY: as above.
        let action = unsafe { std::ffi::CStr::from_ptr(action.cast::<c_char>()) };
        text.push_str(" while ");
        text.push_str(&action.to_string_lossy());
        text.push(',');
    }
    text.push_str(" replaying the analytics spool");
    let n = text.len().min(len);
    // SAFETY: nginx gives `len` bytes of room at `buf`.
    unsafe {
        ptr::copy_nonoverlapping(text.as_ptr(), buf, n);
        buf.add(n)
    }
}

/// `init_process`: sets up this worker's spools of the configuration and looks for files left
/// by earlier workers soon after start (staggered by worker, so that two workers do not scan
/// at the same moment).
pub fn init_process(cycle: &ngx_cycle_t) {
    let Some(mcf) = HttpAnalyticsModule::main_conf(cycle) else {
        return;
    };
    // SAFETY: only read.
    let worker = unsafe { ngx::ffi::ngx_worker };
    if worker == 0 {
        log_orphans(&mcf.spool_sinks);
    }
    for sink in &mcf.spool_sinks {
        let Some(index) = spool_for(sink.server, &sink.uri, &sink.conf.dir) else {
            continue;
        };
        with_spool(index, |spool| {
            // SAFETY: the spool's event lives in its box for the worker's life.
            unsafe { ngx_add_timer(&mut *spool.event, (10 + 50 * worker.min(40)) as _) };
        });
    }
}

/// Logs spool files that belong to no sink of this configuration (its server block's name or
/// the write URI changed while lines were spooled): they are left alone, and the admin told.
fn log_orphans(sinks: &[SpoolSink]) {
    let dirs = spool_dirs(sinks);
    for dir in dirs {
        let ids: Vec<u64> = sinks
            .iter()
            .filter(|s| s.conf.dir == dir)
            .map(|s| sink_id(&s.identity))
            .collect();
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let orphan = parse_file_name(name).is_some_and(|(id, ..)| !ids.contains(&id));
            let size = entry.metadata().map_or(0, |m| m.len());
            if !orphan || size == 0 {
                continue;
            }
            cycle_log_error!(
                NGX_LOG_WARN,
                "analytics: spool file \"{dir}/{name}\" ({}) belongs to no server block of \
                 this configuration (its server_name, or listen when it has no name, or its \
                 write URI changed); it is left in place",
                human_size(size)
            );
        }
    }
}

/// Why lines could not be spooled. The spool logged it already, except for
/// [`Append::Failed`] lines, whose failed write's own error line names it.
#[derive(Debug)]
pub struct NotSpooled {
    /// What the spool said, such as `is full (max_size=256.0 MiB)`.
    pub reason: String,
}

/// Why lines are appended to a spool, which decides how durable the append must be and what
/// a refusal means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Append {
    /// A write failed (the sink is failing); with `durable`, flushed to disk (`fdatasync`)
    /// before returning, because the beacons are answered 204 on the strength of it.
    Failed { durable: bool },
    /// Lines nobody waits on any more (a cancelled write, a worker exiting): kept, not
    /// answered on.
    Held { durable: bool },
    /// `background` lines diverted to the spool (the sink is failing, or no write slot is
    /// free); a refusal is not a loss: the caller writes them the usual way.
    Diverted,
}

/// Appends `lines` to this worker's file of spool `index`. A refusal (full, unwritable, disk
/// full) of [`Append::Held`] lines is logged, at most once a second per spool, with the number
/// of points not stored; the caller logs those of [`Append::Failed`] lines with its write's
/// failure (so that each point not stored is counted once), and [`Append::Diverted`] lines go
/// the usual way instead.
pub fn append(index: usize, lines: &[&[u8]], why: Append) -> Result<(), NotSpooled> {
    let result = with_spool(index, |spool| spool.append(lines, why));
    if result.is_ok() {
        // A first line makes sure the retry timer runs.
        arm_timer(index);
    }
    result
}

/// Whether the sink of spool `index` is failing: a write failed and no write (of a beacon or
/// of the replay) succeeded since.
pub fn is_failing(index: usize) -> bool {
    with_spool(index, |spool| spool.failing)
}

/// A beacon's write to the spool's sink succeeded: replay at once if anything is spooled.
pub fn write_succeeded(index: usize) {
    with_spool(index, |spool| {
        spool.failing = false;
        if spool.backlog() > 0 && spool.replay.is_none() && spool.event.posted() == 0 {
            // SAFETY: the event lives in the spool's box for the worker's life.
            unsafe { ngx_post_event(&mut *spool.event, ptr::addr_of_mut!(ngx_posted_events)) };
        }
    });
}

fn arm_timer(index: usize) {
    with_spool(index, |spool| {
        if spool.event.timer_set() == 0 && !exiting() {
            // SAFETY: as above.
            unsafe { ngx_add_timer(&mut *spool.event, spool.conf.retry_ms as _) };
        }
    });
}

impl Spool {
    /// Bytes not yet replayed, in the worker's own and adopted files.
    fn backlog(&self) -> u64 {
        self.own.as_ref().map_or(0, SpoolFile::unread)
            + self.adopted.iter().map(SpoolFile::unread).sum::<u64>()
    }

    /// Bytes the sink's spool files take on disk, as far as this worker knows.
    fn disk_bytes(&self) -> u64 {
        self.own.as_ref().map_or(0, |f| f.size)
            + self.adopted.iter().map(|f| f.size).sum::<u64>()
            + self.others_bytes
    }

    fn append(&mut self, lines: &[&[u8]], why: Append) -> Result<(), NotSpooled> {
        let mut entries = Vec::with_capacity(lines.iter().map(|l| l.len() + ENTRY_OVERHEAD).sum());
        let mut unspoolable = false;
        for line in lines {
            unspoolable |= encode_entry(line, &mut entries).is_err();
        }
        let refused = if self.retired {
            Some("belongs to a configuration that was reloaded".to_string())
        } else if unspoolable {
            Some("cannot keep a line holding the byte 0x1E".to_string())
        } else if self.disk_bytes() + entries.len() as u64 > self.conf.max_size {
            Some(format!(
                "is full (max_size={})",
                human_size(self.conf.max_size)
            ))
        } else {
            None
        };
        if let Some(reason) = refused {
            return Err(self.refuse(lines.len(), why, &reason));
        }
        self.rotate_own_file();
        if self.own.is_none() {
            match self.create_own_file() {
                Ok(file) => self.own = Some(file),
                Err(e) => {
                    let reason = format!("could not create a file: {e}");
                    return Err(self.refuse(lines.len(), why, &reason));
                }
            }
        }
        let Some(own) = self.own.as_mut() else {
            return Err(NotSpooled {
                reason: "has no file".to_string(),
            });
        };
        let durable = matches!(
            why,
            Append::Failed { durable: true } | Append::Held { durable: true }
        );
        let written = own.file.write_all(&entries).and_then(|()| match durable {
            true => own.file.sync_data(),
            false => Ok(()),
        });
        if let Err(e) = written {
            // Cut off whatever part of the entries reached the file (a full disk).
            let _ = own.file.set_len(own.size);
            let reason = format!("could not write to \"{}\": {e}", own.path);
            return Err(self.refuse(lines.len(), why, &reason));
        }
        own.size += entries.len() as u64;
        self.dirty |= !durable;
        if let Append::Failed { .. } = why {
            self.failing = true;
        }
        if !self.filling {
            self.filling = true;
            self.replayed_lines = 0;
            cycle_log_error!(
                NGX_LOG_WARN,
                "analytics: spool for \"{}\" started filling in \"{}\": lines are kept on \
                 disk and written again every {} ms ({})",
                self.uri,
                self.conf.dir,
                self.conf.retry_ms,
                self.identity
            );
        }
        Ok(())
    }

    /// Logs a refusal, at most once a second (with the points refused since the last line), and
    /// returns the error.
    fn refuse(&mut self, points: usize, why: Append, reason: &str) -> NotSpooled {
        let refused = NotSpooled {
            reason: reason.to_string(),
        };
        if !matches!(why, Append::Held { .. }) {
            // Diverted: written the usual way instead, nothing is lost. Failed: the failed
            // write's error line counts the points, with this reason.
            return refused;
        }
        self.refused_points += points as u64;
        self.refusal_reason = reason.to_string();
        if now_ms().saturating_sub(self.refusal_logged_at) >= 1000 {
            self.log_refusals();
        }
        refused
    }

    /// Logs the points refused since the last such line (at a refusal, at most once a second,
    /// and at the retry timer and worker exit, so that every refused point is counted once).
    fn log_refusals(&mut self) {
        if self.refused_points == 0 {
            return;
        }
        self.refusal_logged_at = now_ms();
        let points = std::mem::take(&mut self.refused_points);
        let reason = std::mem::take(&mut self.refusal_reason);
        cycle_log_error!(
            NGX_LOG_ERR,
            "analytics: spool for \"{}\" in \"{}\" {reason}, {points} point(s) not stored",
            self.uri,
            self.conf.dir
        );
    }

    /// Under steady traffic the worker's own file may never be drained to the last byte; once
    /// most of it is written again it is set aside (replayed from where it is, then removed) and
    /// a new file started, so the spool's disk use follows what is really waiting.
    fn rotate_own_file(&mut self) {
        const ROTATE_AT: u64 = 4 * 1024 * 1024;
        let replaying_own = self
            .replay
            .as_ref()
            .is_some_and(|r| r.source == Source::Own);
        let rotate = self
            .own
            .as_ref()
            .is_some_and(|own| own.read_at >= ROTATE_AT);
        if rotate && !replaying_own {
            // Background lines not flushed yet go to disk before the flag moves on to the new
            // file.
            self.flush();
            if let Some(own) = self.own.take() {
                self.adopted.push_back(own);
            }
        }
    }

    fn create_own_file(&self) -> std::io::Result<SpoolFile> {
        // SAFETY: the worker's pid, set at its start; only read.
        let pid = unsafe { ngx_pid } as u32;
        let name = file_name(self.id, pid, now_ms());
        let path = format!("{}/{name}", self.conf.dir);
        // Created under a name no scan looks at, locked, then renamed: a file under a spool
        // name is always locked by a live worker or left by one that is gone, never caught
        // between its creation and its lock.
        let creating = format!("{}/.{name}.new", self.conf.dir);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&creating)?;
        let renamed = file
            .try_lock()
            .map_err(std::io::Error::other)
            .and_then(|()| fs::rename(&creating, &path));
        if let Err(e) = renamed {
            let _ = fs::remove_file(&creating);
            return Err(e);
        }
        // The new name must survive a crash as well as the lines in it.
        File::open(&self.conf.dir)?.sync_all()?;
        Ok(SpoolFile {
            path,
            file,
            size: 0,
            read_at: 0,
            skipped: 0,
        })
    }

    /// Looks at the directory: adopts the sink's files no live worker holds, and notes how much
    /// the others hold.
    fn scan(&mut self) {
        let Ok(entries) = fs::read_dir(&self.conf.dir) else {
            return;
        };
        let own_path = self.own.as_ref().map(|f| f.path.clone());
        let mut others = 0;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(creating) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".new")) {
                // A file a worker was killed while creating (before its rename): unlocked, it is
                // nobody's and empty.
                if parse_file_name(creating).is_some_and(|(id, ..)| id == self.id) {
                    let path = format!("{}/{name}", self.conf.dir);
                    let unlocked = File::open(&path).is_ok_and(|f| f.try_lock().is_ok());
                    if unlocked {
                        let _ = fs::remove_file(&path);
                    }
                }
                continue;
            }
            let Some((id, _, millis)) = parse_file_name(name) else {
                continue;
            };
            if id != self.id {
                continue;
            }
            let path = format!("{}/{name}", self.conf.dir);
            if Some(&path) == own_path.as_ref() || self.adopted.iter().any(|f| f.path == path) {
                continue;
            }
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
                continue;
            };
            match file.try_lock() {
                // What the file is once locked: its owner may have appended until it went
                // away, or unlinked it (drained) between our open and our lock.
                Ok(()) => match file.metadata() {
                    Ok(meta) if meta.nlink() > 0 => found.push((millis, path, file, meta.len())),
                    _ => {}
                },
                Err(_) => others += file.metadata().map_or(0, |m| m.len()),
            }
        }
        self.others_bytes = others;
        found.sort_by_key(|(millis, ..)| *millis);
        for (_, path, file, size) in found {
            if size == 0 {
                // An empty file of a worker that is gone.
                let _ = fs::remove_file(&path);
                continue;
            }
            cycle_log_error!(
                NGX_LOG_NOTICE,
                "analytics: spool for \"{}\" adopted \"{path}\" ({}) left by a worker that \
                 is gone",
                self.uri,
                human_size(size)
            );
            if !self.filling {
                self.filling = true;
                self.replayed_lines = 0;
            }
            self.adopted.push_back(SpoolFile {
                path,
                file,
                size,
                read_at: 0,
                skipped: 0,
            });
        }
    }

    /// Reads the next replay chunk: from the oldest adopted file with lines left, else from the
    /// worker's own file. Drained adopted files are removed on the way.
    fn next_chunk(&mut self) -> Option<(Source, u64, Vec<u8>, usize)> {
        let max_lines = self.max_lines;
        let max_bytes = self.limits.max_bytes;
        loop {
            while self.adopted.front().is_some_and(|f| f.unread() == 0) {
                if let Some(done) = self.adopted.pop_front() {
                    let _ = fs::remove_file(&done.path);
                }
            }
            let (source, file) = match self.adopted.front_mut() {
                Some(file) => (Source::Adopted, file),
                None => match self.own.as_mut() {
                    Some(file) if file.unread() > 0 => (Source::Own, file),
                    _ => return None,
                },
            };
            let unread = file.unread() as usize;
            let mut window = unread.min(max_bytes.saturating_add(64 * 1024));
            let chunk;
            loop {
                let mut buf = vec![0; window];
                if let Err(e) = file.file.read_exact_at(&mut buf, file.read_at) {
                    log_file_error(&file.path, &e);
                    // Unreadable from here: give up on the rest of this file.
                    file.read_at = file.size;
                    chunk = None;
                    break;
                }
                let c = read_chunk(&buf, window == unread, max_lines, max_bytes);
                if c.consumed == 0 && window < unread {
                    window = unread.min(max_bytes.saturating_add(MAX_ENTRY + 1));
                    continue;
                }
                chunk = Some(c);
                break;
            }
            let Some(chunk) = chunk else { continue };
            if !chunk.skipped_at.is_empty() {
                if file.skipped == 0 {
                    let at = file.read_at + chunk.skipped_at[0] as u64;
                    cycle_log_error!(
                        NGX_LOG_ERR,
                        "analytics: spool file \"{}\" has a torn or corrupt entry at byte \
                         {at}, skipped (further ones in this file are skipped silently)",
                        file.path
                    );
                }
                file.skipped += chunk.skipped_at.len();
            }
            let end = file.read_at + chunk.consumed as u64;
            if chunk.lines == 0 {
                file.read_at = end;
                continue;
            }
            return Some((source, end, chunk.body, chunk.lines));
        }
    }

    /// Flushes background lines appended since the last flush to disk.
    fn flush(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let Some(own) = self.own.as_mut() else { return };
        if let Err(e) = own.file.sync_data() {
            cycle_log_error!(
                NGX_LOG_ERR,
                "analytics: spool file \"{}\" could not be flushed to disk: {e}",
                own.path
            );
        }
    }

    /// A reload replaced this spool's configuration (nginx running as one process): once no
    /// write is on its way, it closes its files, so that the new configuration's spool adopts
    /// them (a lock belongs to an open file, not to the process), and takes no more lines.
    fn retire(&mut self) {
        if self.retired || self.replay.is_some() {
            return;
        }
        self.flush();
        self.own = None;
        self.adopted.clear();
        self.retired = true;
    }

    /// The spool is empty again: logs it and gives the worker's own file back its space.
    fn drained(&mut self) {
        if let Some(own) = self.own.as_mut() {
            if own.size > 0 && own.unread() == 0 && own.file.set_len(0).is_ok() {
                own.size = 0;
                own.read_at = 0;
            }
        }
        if self.filling && self.backlog() == 0 {
            self.filling = false;
            cycle_log_error!(
                NGX_LOG_NOTICE,
                "analytics: spool for \"{}\" drained: {} line(s) written again",
                self.uri,
                self.replayed_lines
            );
        }
    }
}

fn log_file_error(path: &str, e: &std::io::Error) {
    cycle_log_error!(
        NGX_LOG_ERR,
        "analytics: spool file \"{path}\" could not be read: {e}; the rest of it is skipped"
    );
}

/// The spool's event: the retry timer (looks at the directory, logs the backlog, flushes
/// background lines to disk, replays) or a posted "replay now".
unsafe extern "C" fn spool_event(ev: *mut ngx_event_t) {
    // SAFETY: `data` holds the spool's index, set by `add_spool`.
    let (index, timed_out) = unsafe { ((*ev).data as usize, (*ev).timedout() != 0) };
    // SAFETY: as above.
    unsafe { (*ev).set_timedout(0) };
    no_panic((), || {
        if timed_out {
            retry_tick(index);
        }
        if !with_spool(index, |spool| spool.retired) {
            replay_next(index);
        }
    });
}

fn retry_tick(index: usize) {
    with_spool(index, |spool| {
        spool.flush();
        spool.log_refusals();
        // SAFETY: nginx sets `ngx_cycle` before any event runs; only read.
        if spool.cycle != unsafe { ngx_cycle } as usize {
            spool.retire();
        }
        if exiting() || spool.retired {
            return;
        }
        spool.scan();
        let backlog = spool.backlog();
        if backlog > 0 {
            let files = spool.adopted.len() + usize::from(spool.own.is_some());
            let doing = match spool.replay.is_some() {
                true => "a write is on its way",
                false => "writing again",
            };
            cycle_log_error!(
                NGX_LOG_WARN,
                "analytics: spool for \"{}\" in \"{}\": {} waiting in {files} file(s), \
                 {doing}",
                spool.uri,
                spool.conf.dir,
                human_size(backlog)
            );
        }
        // Always again: a worker that is going away (a reload, a crash) may leave lines at any
        // time. The timer is cancelable, so it never holds up a graceful exit.
        // SAFETY: the event lives in the spool's box for the worker's life.
        unsafe { ngx_add_timer(&mut *spool.event, spool.conf.retry_ms as _) };
    });
}

/// Starts the next replay write of spool `index`, if it has lines, none is in flight and the
/// worker is not exiting.
fn replay_next(index: usize) {
    let next = with_spool(index, |spool| {
        if spool.replay.is_some() || exiting() {
            return None;
        }
        match spool.next_chunk() {
            Some(chunk) => Some(chunk),
            None => {
                spool.drained();
                None
            }
        }
    });
    let Some((source, end, body, lines)) = next else {
        return;
    };
    let (fake, uri) = with_spool(index, |spool| {
        (
            ptr::from_mut::<FakeConnection>(&mut spool.fake),
            ptr::from_ref::<str>(spool.uri.as_str()),
        )
    });
    // SAFETY: the fake connection is boxed and the URI's bytes never change: both stay where
    // they are for the worker's life, even when the spool table grows. No borrow of the table
    // is held while nginx runs (a freed request's cleanup looks into it). The request made
    // here is freed by `replay_finished`, or by nginx (then `replay_request_gone` runs).
    let started = unsafe { start_replay(&mut *fake, &*uri, index, &body) };
    match started {
        Ok((request, capture)) => {
            with_spool(index, |spool| {
                spool.replay = Some(Replay {
                    request,
                    capture,
                    source,
                    end,
                    lines,
                })
            });
            let c = with_spool(index, |spool| ptr::addr_of_mut!(spool.fake.c));
            // SAFETY: the fake connection lives in the spool's box; nginx runs the
            // subrequest just posted (no borrow of the spool table is held here).
            unsafe { ngx_http_run_posted_requests(c) };
        }
        Err(why) => {
            cycle_log_error!(NGX_LOG_ERR, "analytics: spool replay not started: {why}");
            arm_timer(index);
        }
    }
}

/// Makes a request of the module's own on the spool's fake connection and starts the write of
/// `body` to `uri` from it.
///
/// # Safety
/// `fake` must have been set up by [`FakeConnection::init`] and stay in place, like `uri`,
/// for as long as the request lives.
unsafe fn start_replay(
    fake: &mut FakeConnection,
    uri: &'static str,
    index: usize,
    body: &[u8],
) -> Result<(*mut ngx_http_request_t, *mut WriteCapture), &'static str> {
    let c: *mut ngx_connection_t = &mut fake.c;
    // SAFETY: the fake connection is set up; every replay request gets a fresh connection pool
    // (nginx destroys it if it ever closes this connection itself).
    unsafe {
        (*c).pool = ngx_create_pool(1024, (*c).log);
        if (*c).pool.is_null() {
            return Err("could not allocate memory");
        }
        // Whatever an earlier request left on the connection is forgotten, as a new HTTP/2
        // stream starts from a fresh copy of its connection.
        (*c).set_destroyed(0);
        (*c).set_error(0);
        (*c).set_timedout(0);
        (*c).set_close(0);
        (*c).set_buffered(0);
        (*c).sent = 0;
        (*c).data = ptr::addr_of_mut!(fake.hc).cast();
    }
    // SAFETY: `c->data` is an HTTP connection whose `conf_ctx` is the server block's
    // configuration; nginx creates the request (pool, variables, headers out) as for a client.
    let r = unsafe { ngx_http_create_request(c) };
    if r.is_null() {
        // SAFETY: the pool created above, not used by anything else.
        unsafe { ngx_destroy_pool((*c).pool) };
        return Err("could not create a request");
    }
    // SAFETY: `r` is the new, valid request; it is this connection's request from now on.
    unsafe {
        (*c).data = r.cast();
        // Not a client's request: nothing of it goes to the access log.
        (*r).set_logged(1);
        (*r).method = NGX_HTTP_POST as ngx_uint_t;
        let uri_str = ngx_str_t {
            len: uri.len(),
            data: uri.as_ptr().cast_mut(),
        };
        (*r).uri = uri_str;
        (*r).unparsed_uri = uri_str;
        (*r).write_event_handler = Some(replay_finished);
        if ngx_list_init(
            &mut (*r).headers_in.headers,
            (*r).pool,
            2,
            size_of::<ngx_table_elt_t>(),
        ) != NGX_OK
        {
            free_replay_request(r);
            return Err("could not allocate memory");
        }
        let Some(cleanup) = ngx_pool_cleanup_add((*r).pool, 0).as_mut() else {
            free_replay_request(r);
            return Err("could not allocate memory");
        };
        cleanup.handler = Some(replay_request_gone);
        cleanup.data = index as *mut c_void;
    }
    // SAFETY: `r` is valid; the write subrequest is created from it like from a beacon.
    let request = unsafe { Request::from_ngx_http_request(r) };
    match start_write(request, uri, body) {
        Ok(capture) => Ok((r, capture)),
        Err(_) => {
            // SAFETY: no subrequest exists; the request is ours to free.
            unsafe { free_replay_request(r) };
            Err("could not create the write subrequest")
        }
    }
}

/// Frees a replay request and its connection pool (the fake connection itself stays).
///
/// # Safety
/// `r` must be a replay request that no subrequest of is running any more.
unsafe fn free_replay_request(r: *mut ngx_http_request_t) {
    // SAFETY: the caller guarantees `r`; its connection is the spool's fake connection, whose
    // pool was created for this request alone.
    unsafe {
        let c = (*r).connection;
        ngx_http_free_request(r, 0);
        clear_fake_events(c);
        ngx_destroy_pool((*c).pool);
        (*c).pool = ptr::null_mut();
        (*c).data = ptr::null_mut();
    }
}

/// Write handler of a replay request: runs when its subrequest is done (and possibly earlier:
/// then there is nothing to do yet).
unsafe extern "C" fn replay_finished(r: *mut ngx_http_request_t) {
    no_panic((), || {
        let Some(index) = SPOOLS.with(|spools| {
            spools
                .borrow()
                .iter()
                .position(|s| s.replay.as_ref().is_some_and(|p| p.request == r))
        }) else {
            return;
        };
        let done = with_spool(index, |spool| {
            let Some(replay) = spool.replay.as_ref() else {
                return false;
            };
            // SAFETY: the capture lives in the replay request's pool, alive while the request
            // is; `r` is that request, and only its own reference is left once the subrequest
            // finished and handed control back.
            unsafe { (*replay.capture).done && (*r).count() == 1 && (*r).postponed.is_null() }
        });
        if !done {
            return;
        }
        let Some(replay) = with_spool(index, |spool| spool.replay.take()) else {
            return;
        };
        // SAFETY: as above: the capture is alive until the request is freed below.
        let capture = unsafe { &*replay.capture };
        let status = capture.status;
        let message = capture.message();
        let unknown = capture.outcome_unknown();
        // SAFETY: the subrequest is finished; the request is freed once, here (its pool
        // cleanup then finds no replay in flight).
        unsafe { free_replay_request(r) };
        take_outcome(index, &replay, status, unknown, &message);
    });
}

/// Pool cleanup of a replay request: nginx freed it before the write finished (it terminated
/// the request). The chunk is written again later.
unsafe extern "C" fn replay_request_gone(data: *mut c_void) {
    no_panic((), || {
        let index = data as usize;
        let gone = SPOOLS.with(|spools| {
            let mut spools = spools.borrow_mut();
            let spool = spools.get_mut(index)?;
            let c = ptr::addr_of_mut!(spool.fake.c);
            // SAFETY: the spool's fake connection; nginx is closing it after this request
            // (or freeing the request): nothing may fire on its events any more.
            unsafe { clear_fake_events(c) };
            spool.replay.take()
        });
        if gone.is_some() {
            arm_timer(index);
        }
    });
}

/// What the sink said to a replay write: on success the read position moves on and the next
/// chunk follows at once; a 413 halves the chunks; a failure worth retrying waits for the next
/// retry; any other answer drops the chunk (logged), as a beacon's batch would.
fn take_outcome(index: usize, replay: &Replay, status: usize, unknown: bool, message: &str) {
    let outcome = match unknown {
        true => ChunkOutcome::Failed,
        false => ChunkOutcome::from_status(status),
    };
    let advance = |spool: &mut Spool| {
        let file = match replay.source {
            Source::Own => spool.own.as_mut(),
            Source::Adopted => spool.adopted.front_mut(),
        };
        if let Some(file) = file {
            file.read_at = file.read_at.max(replay.end);
        }
    };
    let go_on = with_spool(index, |spool| match outcome {
        ChunkOutcome::Stored => {
            spool.failing = false;
            advance(spool);
            spool.replayed_lines += replay.lines as u64;
            spool.max_lines = spool.limits.max_lines.max(1);
            true
        }
        ChunkOutcome::TooLarge if replay.lines > 1 => {
            spool.max_lines = (replay.lines / 2).max(1);
            true
        }
        _ if !unknown && !worth_retrying(status) => {
            advance(spool);
            cycle_log_error!(
                NGX_LOG_ERR,
                "analytics: spool replay to \"{}\" failed: sink answered {status}: {message}, \
                 {} point(s) not stored",
                spool.uri,
                replay.lines
            );
            true
        }
        _ => false,
    });
    if go_on {
        with_spool(index, |spool| {
            if spool.event.posted() == 0 {
                // SAFETY: the event lives in the spool's box for the worker's life.
                unsafe { ngx_post_event(&mut *spool.event, ptr::addr_of_mut!(ngx_posted_events)) };
            }
        });
    } else {
        arm_timer(index);
    }
}

/// Whether a failed write is worth retrying: no answer (refused, timed out), 5xx or 429. Other
/// 4xx (a bad line, a missing database, bad credentials) would fail again the same way.
pub fn worth_retrying(status: usize) -> bool {
    status == 0 || status == 429 || (500..=599).contains(&status)
}

/// `exit_process`: flushes the worker's own spool files; a drained one is removed, one with
/// lines left stays for the next worker to adopt.
pub fn exit_process() {
    SPOOLS.with(|spools| {
        for spool in spools.borrow_mut().iter_mut() {
            spool.log_refusals();
            for done in spool.adopted.iter().filter(|f| f.unread() == 0) {
                let _ = fs::remove_file(&done.path);
            }
            let Some(own) = spool.own.as_mut() else {
                continue;
            };
            if own.unread() == 0 {
                let _ = fs::remove_file(&own.path);
                continue;
            }
            spool.dirty = true;
            spool.flush();
            let Some(own) = spool.own.as_ref() else {
                continue;
            };
            cycle_log_error!(
                NGX_LOG_NOTICE,
                "analytics: spool for \"{}\": {} left in \"{}\" for the next worker",
                spool.uri,
                human_size(own.unread()),
                own.path
            );
        }
    });
}
