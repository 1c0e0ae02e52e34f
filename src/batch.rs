//! Group commit: many beacons, one write.
//!
//! Lines are grouped per *sink*: everything that decides where and how a line is written, that
//! is the server block the beacon arrived in (the write URI is resolved there), the write URI,
//! the write mode and the batch limits. Two server blocks with the same write URI pointing at
//! different databases never share a batch.
//!
//! Per worker and sink there is at most one *open* batch collecting lines. Its *leader* is the
//! request that owns the write subrequest(s); at first the beacon that opened it. A batch is
//! closed and written
//! - at once when no earlier write to the same sink is in flight (so a lone beacon is written
//!   without delay, and under load batches form while the previous write is on its way),
//! - when it reaches `lines=` or `bytes=` of `analytics_batch`,
//! - when the previous write finishes (the lines that gathered meanwhile go next),
//! - when its leader's timer fires `delay=` after it opened (a slow write does not hold lines
//!   back longer than that; at most [`MAX_WRITES_IN_FLIGHT`] writes run in parallel).
//!
//! When all write slots are busy and the open batch is full, a beacon *waits for room*: its
//! request parks with its line (not yet in any batch) in its sink's [`WaitQueue`]. When a write
//! finishes, as many waiting requests as fit in the next batch submit again, oldest first.
//! Nothing is refused or dropped; an overloaded sink slows the answers down instead, and
//! memory stays bounded by the batch limits plus one line per waiting connection.
//!
//! In `wait` mode every beacon of the batch (leader and members) stays parked until the write
//! that holds its line was answered: 204 when the sink stored it, 502 when not. In
//! `background` mode a beacon is answered 204 at once (the leader's request then stays open,
//! answered, until its batch is written). A 413 from the sink splits the failed chunk in halves
//! ([`WritePlan`]).
//!
//! No batch dies with its leader. A request whose client is gone (`c->error`: a closed
//! connection, an HTTP/2 stream reset) never starts a batch and hands the next write to a member
//! whose client is still there. When the leader's request ends anyway (nginx terminates a
//! request whose connection has an error once its subrequest finishes), its pool cleanup takes
//! the answer of the write it carried if the sink gave one, puts the chunk back to be written
//! again if not (a line written twice is one point: every line has its own timestamp), and
//! hands the rest of the batch to another parked member. With no member left, the lines that
//! are not written yet go with the sink's next write.
//!
//! Everything runs on the worker's single thread, in nginx event handlers: members and the
//! leader are woken through their own posted events and finalize themselves, each in its own
//! request context. A pool cleanup on every parked request keeps the batch from ever touching a
//! freed request.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::c_void;
use std::ops::Range;
use std::ptr;
use std::time::Instant;

use ngx::ffi::{
    ngx_add_timer, ngx_cycle, ngx_cycle_t, ngx_del_timer, ngx_delete_posted_event, ngx_event_t,
    ngx_http_finalize_request, ngx_http_request_t, ngx_http_run_posted_requests, ngx_int_t,
    ngx_log_t, ngx_pool_cleanup_add, ngx_post_event, ngx_posted_events,
    NGX_HTTP_CLIENT_CLOSED_REQUEST, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_LOG_ERR, NGX_LOG_INFO,
};
use ngx::http::{HttpModuleLocationConf, Request};
use ngx::ngx_log_error;

use crate::conf::AnalyticsLocConf;
use crate::conf::WriteMode;
use crate::core::batch::{BatchLimits, ChunkOutcome, LineBatch, WaitQueue, WritePlan};
use crate::request::{
    answer_write_outcome, metrics, no_panic, outcome, record, request_ctx_ptr, send_response,
    status, RequestCtx, NGX_DONE,
};
use crate::spool::{self, Append};
use crate::subrequest::{start_write, WriteCapture};
use crate::HttpAnalyticsModule;

const INTERNAL_ERROR: ngx_int_t = NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;

/// Most writes to one sink a worker runs at the same time; while this many are in flight and
/// the open batch is full, further beacons wait for room instead of growing the batch.
pub const MAX_WRITES_IN_FLIGHT: usize = 4;

/// Most batches' worth of lines a sink holds for its next write when nobody waits on them
/// (their requests went away); beyond that they are logged and dropped, so memory stays bounded.
const MAX_CARRIED_BATCHES: usize = MAX_WRITES_IN_FLIGHT + 1;

/// Where a batch is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Collecting lines; it is its sink's open batch.
    Open,
    /// Closed, its write plan made; its leader starts the next chunk when woken.
    Closed,
    /// A chunk is being written.
    Writing,
}

/// A request parked on a batch, waiting for its answer.
struct Member {
    /// The parked request's state; NULL once the request went away.
    ctx: *mut RequestCtx,
    /// Index of its line in the batch.
    line: usize,
}

/// One batch of lines and the requests waiting on it.
pub struct Batch {
    /// Index of its sink in this worker's table.
    sink: usize,
    leader: *mut RequestCtx,
    lines: LineBatch,
    members: Vec<Member>,
    stage: Stage,
    plan: WritePlan,
    /// The chunk being written and where its subrequest records the sink's answer.
    writing: Option<(Range<usize>, *mut WriteCapture)>,
    /// Writes whose outcome was unknown and were written again.
    retries: u32,
    /// When the chunk being written was started (for the write-duration metric).
    write_started: Option<Instant>,
}

/// Most times a batch writes a chunk again whose outcome was unknown, before it fails it.
const MAX_RETRIES: u32 = 3;

/// Everything that decides where and how a line is written, and this worker's state for it.
struct Sink {
    /// The configuration cycle (a single-process nginx keeps running across reloads, and a
    /// freed cycle's addresses may be reused).
    cycle: usize,
    /// The server block the beacons came through (its `srv_conf` array, which is also what a
    /// subrequest created from such a request resolves its URI in).
    server: usize,
    uri: String,
    mode: WriteMode,
    limits: BatchLimits,
    open: *mut Batch,
    in_flight: usize,
    /// Requests waiting for room (all write slots busy, open batch full), oldest first.
    waiting: WaitQueue<*mut RequestCtx>,
    /// Lines nobody waits on any more (their requests went away before they were written);
    /// they go with the next batch.
    carried: LineBatch,
    /// This worker's disk spool for the sink, if it has one (`analytics_spool`).
    spool: Option<usize>,
    /// Every batch of the sink not freed yet (open, closed or being written), so that a worker
    /// that exits can still keep their lines.
    live: Vec<*mut Batch>,
    /// The spool directory (part of the key: a location may turn the spool off).
    spool_dir: Option<String>,
}

thread_local! {
    /// The worker's sinks (nginx runs the module on one thread per worker). Sinks are only ever
    /// added, never changed in their key or removed, so a sink's index and its URI's bytes
    /// stay valid for the worker's life.
    static SINKS: RefCell<Vec<Sink>> = const { RefCell::new(Vec::new()) };
}

fn with_sink<T>(index: usize, f: impl FnOnce(&mut Sink) -> T) -> T {
    SINKS.with(|sinks| f(&mut sinks.borrow_mut()[index]))
}

/// The index of the sink for this key, added on first use.
fn sink_index(
    server: usize,
    uri: &str,
    mode: WriteMode,
    limits: BatchLimits,
    spool_dir: Option<&str>,
) -> usize {
    // SAFETY: nginx sets `ngx_cycle` before any request runs; it is only read here.
    let cycle = unsafe { ngx_cycle } as usize;
    SINKS.with(|sinks| {
        let mut sinks = sinks.borrow_mut();
        let found = sinks.iter().position(|sink| {
            sink.cycle == cycle
                && sink.server == server
                && sink.mode == mode
                && sink.limits == limits
                && sink.uri == uri
                && sink.spool_dir.as_deref() == spool_dir
        });
        found.unwrap_or_else(|| {
            sinks.push(Sink {
                cycle,
                server,
                uri: uri.to_string(),
                mode,
                limits,
                open: ptr::null_mut(),
                in_flight: 0,
                waiting: WaitQueue::new(),
                carried: LineBatch::new(),
                spool: spool_dir.and_then(|dir| spool::spool_for(server, uri, dir)),
                live: Vec::new(),
                spool_dir: spool_dir.map(str::to_string),
            });
            sinks.len() - 1
        })
    })
}

/// The write URI of a sink, for the subrequest (nginx keeps pointing at it while it runs).
fn sink_uri(index: usize) -> &'static str {
    let uri = with_sink(index, |sink| ptr::from_ref::<str>(sink.uri.as_str()));
    // SAFETY: a sink's URI string is never changed or dropped while the worker runs (see
    // `SINKS`), so its bytes stay where they are even when the table grows.
    unsafe { &*uri }
}

/// What [`submit`] did with a beacon.
pub enum Submitted {
    /// Parked: the request will be finalized when its batch is written.
    Parked,
    /// Queued and answered at once (`background` mode): finalize with 204 now.
    Queued,
    /// Queued, but the client is gone (its connection has an error): nobody to answer.
    ClientGone,
    /// Put straight into the disk spool (`background` mode): finalize with 204 now.
    Spooled,
    /// nginx refused an allocation.
    Error,
}

/// Whether the client of `r` is gone: its connection had an error (closed, reset stream).
fn client_gone(r: *const ngx_http_request_t) -> bool {
    // SAFETY: callers pass a live request, which always has a connection.
    unsafe { (*(*r).connection).error() != 0 }
}

/// Adds an accepted beacon's line to the open batch of its sink (`uri` in the request's server
/// block, with this mode and these limits).
pub fn submit(
    request: &mut Request,
    uri: &str,
    line: Cow<[u8]>,
    mode: WriteMode,
    limits: BatchLimits,
    spool_dir: Option<&str>,
) -> Submitted {
    let ctx = request_ctx_ptr(request);
    // SAFETY: the content handler created the ctx; it lives in the request pool.
    let Some(ctx_ref) = (unsafe { ctx.as_mut() }) else {
        return Submitted::Error;
    };
    let r: *mut ngx_http_request_t = request.into();
    // SAFETY: `r` is the valid request being processed.
    let server = unsafe { (*r).srv_conf } as usize;
    let sink = sink_index(server, uri, mode, limits, spool_dir);
    let spool = with_sink(sink, |sink| sink.spool);

    // `background` mode while the sink is failing (a write failed, none succeeded since): the
    // line goes straight to the spool, where it is safe from a killed worker, and is written
    // when the spool is replayed.
    if let (WriteMode::Background, Some(spool)) = (mode, spool) {
        if spool::is_failing(spool) && spool::append(spool, &[&line], Append::Diverted).is_ok() {
            return Submitted::Spooled;
        }
    }

    let gone = client_gone(r);
    if gone {
        // Nobody to answer. The line joins the open batch without waiting on it; with no open
        // batch, the request writes its line on its own at once (a batch nobody can join, so
        // no beacon's answer depends on a request that nginx ends as soon as its subrequest is
        // done); with every write slot busy, the line goes with the sink's next write.
        let (has_open, slot_free) = with_sink(sink, |sink| {
            (!sink.open.is_null(), sink.in_flight < MAX_WRITES_IN_FLIGHT)
        });
        if has_open || !slot_free {
            carry(sink, &[&line], request.log());
            return Submitted::ClientGone;
        }
    }

    let open = with_sink(sink, |sink| {
        // SAFETY: `sink.open` is NULL or a live batch (freed only after being unlinked).
        match unsafe { sink.open.as_mut() } {
            Some(batch) if batch.lines.is_full(&limits) => Err(()),
            Some(batch) => Ok(Some(ptr::from_mut(batch))),
            None => Ok(None),
        }
    });
    let batch: *mut Batch = match open {
        Err(()) => {
            // `background` mode: rather than holding the answer back until there is room, the
            // line goes to the spool.
            if let (WriteMode::Background, Some(spool)) = (mode, spool) {
                if spool::append(spool, &[&line], Append::Diverted).is_ok() {
                    return Submitted::Spooled;
                }
            }
            // A request woken to submit again keeps its place at the front of the queue.
            let returning = !ctx_ref.request.is_null();
            if !park(r, ctx_ref, ptr::null_mut()) {
                return Submitted::Error;
            }
            ctx_ref.waiting_line = line.into_owned();
            let ticket = with_sink(sink, |sink| match returning {
                true => sink.waiting.push_front(ctx),
                false => sink.waiting.push_back(ctx),
            });
            if let Some(counters) = metrics() {
                counters.add_waiting(1);
            }
            ctx_ref.waiting_in = Some((sink, ticket));
            return Submitted::Parked;
        }
        Ok(Some(batch)) => batch,
        Ok(None) => {
            let carried = with_sink(sink, |sink| std::mem::take(&mut sink.carried));
            let batch = Box::into_raw(Box::new(Batch {
                sink,
                leader: ctx,
                lines: carried,
                members: Vec::new(),
                stage: Stage::Open,
                plan: WritePlan::new(0),
                writing: None,
                retries: 0,
                write_started: None,
            }));
            with_sink(sink, |sink| {
                sink.open = batch;
                sink.live.push(batch);
            });
            batch
        }
    };
    // SAFETY: `batch` is live: it is the sink's open batch.
    let batch_ref = unsafe { &mut *batch };
    let is_leader = batch_ref.leader == ctx;

    if (is_leader || mode == WriteMode::Wait) && !park(r, ctx_ref, batch) {
        if is_leader {
            // Nobody else can have joined yet: undo the batch, keeping any carried lines.
            with_sink(sink, |sink| {
                sink.open = ptr::null_mut();
                sink.carried = std::mem::take(&mut batch_ref.lines);
                sink.live.retain(|b| *b != batch);
            });
            // SAFETY: created above by `Box::into_raw`, unlinked just now, never shared.
            drop(unsafe { Box::from_raw(batch) });
        }
        return Submitted::Error;
    }
    let index = batch_ref.lines.push(&line);
    if is_leader || mode == WriteMode::Wait {
        ctx_ref.member = batch_ref.members.len();
        batch_ref.members.push(Member { ctx, line: index });
    }
    if is_leader && mode == WriteMode::Background {
        // Answer now, before a subrequest exists; the request stays open, answered, until its
        // batch is written.
        // It counts as accepted, like every beacon answered before its write (members below);
        // a failed write shows in `writes_total{result="failed"}`.
        record(request, outcome::ACCEPTED, "");
        ctx_ref.early_answer = Some(send_response(request, 204, ""));
    }

    let in_flight = with_sink(sink, |sink| sink.in_flight);
    let must_write = gone || in_flight == 0 || batch_ref.lines.is_full(&limits);
    let may_write = limits.is_off() || in_flight < MAX_WRITES_IN_FLIGHT;
    if (must_write || limits.delay_ms == 0) && may_write {
        close_and_flush(batch, Some(ctx));
    } else if is_leader {
        // SAFETY: the leader's wake event lives in its ctx, valid while the request lives; the
        // pool cleanup registered by `park` removes the timer first.
        unsafe { ngx_add_timer(&mut ctx_ref.wake, limits.delay_ms as _) };
    }

    match (is_leader, mode) {
        (true, _) | (false, WriteMode::Wait) => Submitted::Parked,
        (false, WriteMode::Background) => Submitted::Queued,
    }
}

/// Hands an encoded line to the batch for `uri`; returns the code to finalize the request with,
/// or `NGX_DONE` when its batch (or a wait for room) will finish it.
pub fn queue_line(
    request: &mut Request,
    lcf: &AnalyticsLocConf,
    uri: &str,
    line: Cow<[u8]>,
) -> ngx_int_t {
    let spool_dir = lcf.spool().map(|spool| spool.dir.as_str());
    match submit(
        request,
        uri,
        line,
        lcf.write_mode(),
        lcf.batch_limits(),
        spool_dir,
    ) {
        Submitted::Parked => NGX_DONE,
        Submitted::Spooled => {
            record(request, outcome::SPOOLED, "");
            send_response(request, status::NO_CONTENT, "")
        }
        Submitted::Queued => {
            record(request, outcome::ACCEPTED, "");
            send_response(request, status::NO_CONTENT, "")
        }
        Submitted::Error => {
            record(request, outcome::ERROR, "");
            INTERNAL_ERROR
        }
        Submitted::ClientGone => {
            // Queued, with nobody left to answer.
            record(request, outcome::ACCEPTED, "");
            NGX_HTTP_CLIENT_CLOSED_REQUEST as ngx_int_t
        }
    }
}

/// Submits the line of a request that waited for room in a batch, again (the line moves; it is
/// not copied unless it has to wait once more).
pub fn resubmit(request: &mut Request, line: Vec<u8>) -> ngx_int_t {
    match HttpAnalyticsModule::location_conf(request) {
        Some(lcf) => match lcf.write_uri() {
            Some(uri) => queue_line(request, lcf, uri, Cow::Owned(line)),
            None => INTERNAL_ERROR,
        },
        None => INTERNAL_ERROR,
    }
}

/// Keeps `lines` for the sink's next write: in its open batch if there is one, else carried
/// until the next batch opens (bounded; beyond the bound they are logged and dropped).
fn carry(sink: usize, lines: &[&[u8]], log: *mut ngx_log_t) {
    let dropped = with_sink(sink, |sink| {
        // SAFETY: `sink.open` is NULL or a live batch.
        let target = match unsafe { sink.open.as_mut() } {
            Some(open) => &mut open.lines,
            None => &mut sink.carried,
        };
        let max_bytes = sink.limits.max_bytes.saturating_mul(MAX_CARRIED_BATCHES);
        let max_lines = sink.limits.max_lines.saturating_mul(MAX_CARRIED_BATCHES);
        let mut dropped = 0;
        for line in lines {
            if target.byte_len() + line.len() > max_bytes || target.len() >= max_lines {
                dropped += 1;
            } else {
                target.push(line);
            }
        }
        dropped
    });
    // SAFETY: NULL or the log of a live request or connection.
    if let (true, Some(log)) = (dropped > 0, unsafe { log.as_mut() }) {
        let uri = sink_uri(sink);
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "analytics: write to \"{uri}\" failed: too many lines whose requests went away are \
             waiting for a write, {dropped} point(s) not stored"
        );
    }
}

/// Prepares a request to wait on `batch` (NULL: to wait for room): its wake-up event, and the
/// pool cleanup that detaches it if the request goes away first.
fn park(r: *mut ngx_http_request_t, ctx: &mut RequestCtx, batch: *mut Batch) -> bool {
    if ctx.request.is_null() {
        // First time this request parks (a waiting request parks again when it resubmits).
        // SAFETY: `r` is the valid request; the cleanup entry comes from its pool (NULL checked).
        let Some(cleanup) = (unsafe { ngx_pool_cleanup_add((*r).pool, 0).as_mut() }) else {
            return false;
        };
        cleanup.handler = Some(request_gone);
        cleanup.data = ptr::from_mut(ctx).cast::<c_void>();
    }
    ctx.request = r;
    ctx.batch = batch.cast();
    ctx.wake.handler = Some(wake_up);
    ctx.wake.data = r.cast::<c_void>();
    // SAFETY: a live request always has a connection with a log.
    ctx.wake.log = unsafe { (*(*r).connection).log };
    // SAFETY: `r` is valid; parked requests ignore write events until they are woken.
    unsafe { (*r).write_event_handler = Some(parked) };
    true
}

/// Write handler of a parked request: nothing to do until its wake-up event.
unsafe extern "C" fn parked(_r: *mut ngx_http_request_t) {}

/// Posts the wake-up event of a parked request.
fn post_wake(ctx: &mut RequestCtx) {
    if ctx.wake.posted() == 0 {
        // SAFETY: the event lives in the ctx of a live parked request, whose pool cleanup
        // removes it from the queue if the request goes away first.
        unsafe { ngx_post_event(&mut ctx.wake, ptr::addr_of_mut!(ngx_posted_events)) };
    }
}

/// Closes `batch` and starts its write: directly when running in the leader's own request
/// (`current` is the leader's ctx), otherwise by posting the leader's wake-up event.
fn close_and_flush(batch: *mut Batch, current: Option<*mut RequestCtx>) {
    // SAFETY: callers pass a live batch.
    let batch_ref = unsafe { &mut *batch };
    if batch_ref.stage != Stage::Open {
        return;
    }
    batch_ref.stage = Stage::Closed;
    batch_ref.plan = WritePlan::new(batch_ref.lines.len());
    with_sink(batch_ref.sink, |sink| {
        if sink.open == batch {
            sink.open = ptr::null_mut();
        }
        sink.in_flight += 1;
    });
    let leader = batch_ref.leader;
    // SAFETY: a batch's leader ctx is live while the batch is (its cleanup hands the batch on).
    let leader_ref = unsafe { &mut *leader };
    if leader_ref.wake.timer_set() != 0 {
        // SAFETY: the timer was armed by `submit` or `hand_over` on this event.
        unsafe { ngx_del_timer(&mut leader_ref.wake) };
    }
    if current == Some(leader) {
        write_next_chunk(batch);
    } else {
        post_wake(leader_ref);
    }
}

/// Closes the sink's open batch if it has lines and a write slot is free.
fn flush_open_batch(sink: usize) {
    let open = with_sink(sink, |sink| {
        // SAFETY: `sink.open` is NULL or a live batch.
        let has_lines = unsafe { sink.open.as_ref() }.is_some_and(|b| !b.lines.is_empty());
        (has_lines && sink.in_flight < MAX_WRITES_IN_FLIGHT).then_some(sink.open)
    });
    if let Some(batch) = open {
        close_and_flush(batch, None);
    }
}

/// Event handler of a parked request's wake-up event (posted or timer): runs in that
/// request's context, then lets nginx run the subrequests it created.
unsafe extern "C" fn wake_up(ev: *mut ngx_event_t) {
    // SAFETY: `data` was set to the parked request by `park`; the request is live, or its
    // cleanup would have removed this event from the timer tree and the posted queue.
    let r = unsafe { (*ev).data.cast::<ngx_http_request_t>() };
    // SAFETY: as above.
    let (connection, timed_out) = unsafe { ((*r).connection, (*ev).timedout() != 0) };
    // SAFETY: as above.
    unsafe { (*ev).set_timedout(0) };
    no_panic((), || woken(r, timed_out));
    // SAFETY: the connection of a live request.
    unsafe { ngx_http_run_posted_requests(connection) };
}

fn woken(r: *mut ngx_http_request_t, timed_out: bool) {
    // SAFETY: `r` is a live request (see `wake_up`).
    let request = unsafe { Request::from_ngx_http_request(r) };
    let ctx = request_ctx_ptr(request);
    // SAFETY: the ctx of a live request.
    let Some(ctx_ref) = (unsafe { ctx.as_mut() }) else {
        return;
    };
    // SAFETY: `ctx.batch` is NULL or live (a batch clears it before it is freed).
    match unsafe { ctx_ref.batch.cast::<Batch>().as_mut() } {
        Some(batch) if batch.leader == ctx => match batch.stage {
            Stage::Open if timed_out => {
                let fits = with_sink(batch.sink, |sink| sink.in_flight < MAX_WRITES_IN_FLIGHT);
                if fits {
                    close_and_flush(batch, Some(ctx));
                }
            }
            Stage::Closed => write_next_chunk(batch),
            Stage::Open | Stage::Writing => {}
        },
        Some(_) => {}
        None if !ctx_ref.waiting_line.is_empty() => {
            let line = std::mem::take(&mut ctx_ref.waiting_line);
            let rc = resubmit(request, line);
            if rc != NGX_DONE {
                // SAFETY: the waiting request is answered here, once.
                unsafe { ngx_http_finalize_request(r, rc) };
            }
        }
        None if ctx_ref.write_finished => {
            let rc = answer_write_outcome(request);
            // SAFETY: the member's write finished; this finalizes its request once.
            unsafe { ngx_http_finalize_request(r, rc) };
        }
        None => {}
    }
}

/// Makes another live member the batch's leader, preferring one whose client is still there
/// (`any_client`: also one whose client is gone). Returns the new leader.
fn hand_over(batch: &mut Batch, any_client: bool) -> Option<&mut RequestCtx> {
    let leader = batch.leader;
    let live = || {
        batch
            .members
            .iter()
            .map(|member| member.ctx)
            .filter(move |ctx| !ctx.is_null() && *ctx != leader)
    };
    // SAFETY: non-NULL member ctxs are live parked requests.
    let healthy = live().find(|ctx| !client_gone(unsafe { (**ctx).request }));
    let next = healthy.or_else(|| live().find(|_| any_client))?;
    // SAFETY: the old leader's ctx is live unless its request is being freed (then NULL'd in
    // the members, and its request pointer is not touched here).
    if let Some(old) = batch.members.iter().find(|m| m.ctx == leader) {
        // SAFETY: as above: a live parked request; it waits like any member from now on.
        unsafe { (*(*old.ctx).request).write_event_handler = Some(parked) };
    }
    batch.leader = next;
    // SAFETY: as above.
    Some(unsafe { &mut *next })
}

/// Starts the write of the batch's next chunk in the leader's request, or finishes the batch.
fn write_next_chunk(batch: *mut Batch) {
    // SAFETY: callers pass a live batch.
    let batch_ref = unsafe { &mut *batch };
    // SAFETY: the leader's ctx is live while its batch is.
    let r = unsafe { (*batch_ref.leader).request };
    if client_gone(r) && !batch_ref.plan.is_done() {
        // nginx ends a request whose connection has an error as soon as its subrequest is done:
        // let a member whose client is still there write instead, if there is one.
        if let Some(next) = hand_over(batch_ref, false) {
            post_wake(next);
            return;
        }
    }
    let uri = sink_uri(batch_ref.sink);
    while let Some(chunk) = batch_ref.plan.next_chunk() {
        // SAFETY: the leader's request is live while its batch is.
        let request = unsafe { Request::from_ngx_http_request(r) };
        let body = batch_ref.lines.chunk(&chunk);
        match start_write(request, uri, body) {
            Ok(capture) => {
                if let Some(counters) = metrics() {
                    counters.count_batch(chunk.len());
                }
                batch_ref.write_started = Some(Instant::now());
                batch_ref.stage = Stage::Writing;
                batch_ref.writing = Some((chunk, capture));
                // SAFETY: `r` is valid; nginx runs the parent's write handler once the waited
                // subrequest is done.
                unsafe { (*r).write_event_handler = Some(chunk_done) };
                return;
            }
            Err(_) => {
                let log = request.log();
                log_failed_chunk(log, uri, chunk.len(), "could not start the write");
                batch_ref.plan.record(chunk, ChunkOutcome::Failed);
            }
        }
    }
    finish(batch, true);
}

/// The leader's write handler while a chunk is written: runs when the subrequest is done (and
/// possibly at other times, when nginx wakes the request: then there is nothing to do yet).
unsafe extern "C" fn chunk_done(r: *mut ngx_http_request_t) {
    no_panic((), || {
        // SAFETY: nginx calls the write handler with the valid leader request.
        let request = unsafe { Request::from_ngx_http_request(r) };
        // SAFETY: the leader's ctx, live with its request.
        let Some(ctx) = (unsafe { request_ctx_ptr(request).as_mut() }) else {
            return;
        };
        // SAFETY: NULL or the live batch this request belongs to.
        let Some(batch) = (unsafe { ctx.batch.cast::<Batch>().as_mut() }) else {
            return;
        };
        if batch.leader != ptr::from_mut(ctx) {
            return; // it handed the batch on
        }
        match batch.writing {
            // SAFETY: the capture lives in this request's pool, next to the subrequest.
            Some((_, capture)) if unsafe { (*capture).done } => {}
            _ => return, // not finished yet
        }
        let Some((chunk, capture)) = batch.writing.take() else {
            return;
        };
        // SAFETY: as above.
        take_answer(batch, chunk, unsafe { &*capture }, request.log());
        batch.stage = Stage::Closed;
        write_next_chunk(batch);
    });
}

/// Takes the outcome of a finished chunk write: what the sink answered, or, when the write
/// ended without saying what the sink did, the chunk again (a few times at most).
fn take_answer(
    batch: &mut Batch,
    chunk: Range<usize>,
    capture: &WriteCapture,
    log: *mut ngx_log_t,
) {
    if capture.outcome_unknown() && batch.retries < MAX_RETRIES {
        batch.retries += 1;
        batch.plan.retry(chunk);
    } else {
        record_answer(batch, chunk, capture, log);
    }
}

/// Records what the sink answered for `chunk`, logging a failure once.
fn record_answer(
    batch: &mut Batch,
    chunk: Range<usize>,
    capture: &WriteCapture,
    log: *mut ngx_log_t,
) {
    let status = capture.status;
    let outcome = ChunkOutcome::from_status(status);
    // A 413 on a single line cannot be split further: that line fails.
    let single_too_large = outcome == ChunkOutcome::TooLarge && chunk.len() == 1;
    let spool = with_sink(batch.sink, |sink| sink.spool);
    let mut spooled = false;
    let mut not_spooled = String::new();
    if let (ChunkOutcome::Failed, Some(spool)) = (outcome, spool) {
        if capture.outcome_unknown() || spool::worth_retrying(status) {
            // `wait` mode answers 204 for these lines: they must be on disk first.
            let durable = with_sink(batch.sink, |sink| sink.mode == WriteMode::Wait);
            let lines: Vec<&[u8]> = chunk.clone().map(|i| batch.lines.line(i)).collect();
            match spool::append(spool, &lines, Append::Failed { durable }) {
                Ok(()) => spooled = true,
                Err(refused) => not_spooled = format!(", and the spool {}", refused.reason),
            }
        }
    }
    if spooled {
        // SAFETY: NULL or the log of a live request.
        if let Some(log) = unsafe { log.as_mut() } {
            let (uri, points) = (sink_uri(batch.sink), chunk.len());
            let detail = match status {
                0 => "no answer".to_string(),
                status => format!("sink answered {status}"),
            };
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "analytics: write to \"{uri}\" failed: {detail}, {points} point(s) spooled"
            );
        }
    } else if outcome == ChunkOutcome::Failed || single_too_large {
        let message = capture.message();
        let detail = match (status, message.as_str()) {
            (0, _) => "no answer from the sink".to_string(),
            (400, m) if m.contains("partial write") => {
                format!("sink answered 400, a partial write (some lines stored): {m}")
            }
            (status, "") => format!("sink answered {status}"),
            (status, m) => format!("sink answered {status}: {m}"),
        };
        let detail = detail + &not_spooled;
        log_failed_chunk(log, sink_uri(batch.sink), chunk.len(), &detail);
    }
    if let Some(counters) = metrics() {
        let seconds = batch
            .write_started
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        counters.count_write(outcome == ChunkOutcome::Stored, chunk.len(), seconds);
    }
    if let (ChunkOutcome::Stored, Some(spool)) = (outcome, spool) {
        spool::write_succeeded(spool);
    }
    if spooled {
        // A failed write whose lines are on disk, to be written again.
        batch.plan.record_spooled(chunk.clone());
    }
    batch.plan.record(chunk, outcome);
}

fn log_failed_chunk(log: *mut ngx_log_t, uri: &str, points: usize, detail: &str) {
    // SAFETY: NULL or the log of a live request.
    if let Some(log) = unsafe { log.as_mut() } {
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "analytics: write to \"{uri}\" failed: {detail}, {points} point(s) not stored"
        );
    }
}

/// All chunks are written: answers every member, frees the batch, and lets the lines that
/// gathered meanwhile go next. With `in_leader`, this runs in the leader's request, which it
/// finalizes last; otherwise the leader is gone.
fn finish(batch: *mut Batch, in_leader: bool) {
    // SAFETY: callers pass a live batch, which is freed here.
    let batch = unsafe { Box::from_raw(batch) };
    let sink = batch.sink;
    let freed = ptr::from_ref(batch.as_ref()).cast_mut();
    with_sink(sink, |sink| {
        sink.in_flight = sink.in_flight.saturating_sub(1);
        sink.live.retain(|b| *b != freed);
    });
    let mut leader_request = ptr::null_mut();
    for member in &batch.members {
        // SAFETY: NULL (gone) or the live ctx of a parked request.
        let Some(ctx) = (unsafe { member.ctx.as_mut() }) else {
            continue;
        };
        ctx.batch = ptr::null_mut();
        ctx.write_finished = true;
        ctx.spooled = batch.plan.is_spooled(member.line);
        ctx.write_failed = !batch.plan.is_stored(member.line) && !ctx.spooled;
        if member.ctx == batch.leader && in_leader {
            leader_request = ctx.request;
        } else {
            post_wake(ctx);
        }
    }
    drop(batch);
    flush_open_batch(sink);
    wake_waiting(sink);
    if !leader_request.is_null() {
        // SAFETY: the leader request is live (this runs in its write handler).
        let request = unsafe { Request::from_ngx_http_request(leader_request) };
        let rc = answer_write_outcome(request);
        // SAFETY: the leader's write finished; this finalizes its request once.
        unsafe { ngx_http_finalize_request(leader_request, rc) };
    }
}

/// Pool cleanup of a parked request: detaches it from its batch or its wait queue. A leader
/// that goes away hands its batch on (see [`leader_gone`]).
unsafe extern "C" fn request_gone(data: *mut c_void) {
    no_panic((), || {
        // SAFETY: `data` is the request's ctx, still allocated while its pool is destroyed.
        let Some(ctx) = (unsafe { data.cast::<RequestCtx>().as_mut() }) else {
            return;
        };
        if ctx.wake.timer_set() != 0 {
            // SAFETY: the event's timer was armed by `submit` or `hand_over`.
            unsafe { ngx_del_timer(&mut ctx.wake) };
        }
        if ctx.wake.posted() != 0 {
            // SAFETY: the event is in the posted queue.
            unsafe { ngx_delete_posted_event(&mut ctx.wake) };
        }
        if let Some((sink, ticket)) = ctx.waiting_in.take() {
            let removed = with_sink(sink, |sink| sink.waiting.remove(ticket));
            if let (Some(_), Some(counters)) = (removed, metrics()) {
                counters.add_waiting(-1);
            }
        }
        let me = ptr::from_mut(ctx);
        let batch = std::mem::replace(&mut ctx.batch, ptr::null_mut()).cast::<Batch>();
        // SAFETY: NULL or a live batch.
        let Some(batch_ref) = (unsafe { batch.as_mut() }) else {
            return;
        };
        if let Some(member) = batch_ref.members.get_mut(ctx.member) {
            if member.ctx == me {
                member.ctx = ptr::null_mut();
            }
        }
        if batch_ref.leader == me {
            leader_gone(batch, ctx.wake.log);
        }
    });
}

/// The leader's request ended before its batch was done. The answer of the chunk it was
/// writing counts if the sink gave one (else the chunk is written again); the rest of the batch
/// goes to another member, or, with nobody left waiting on it, to the sink's next write.
fn leader_gone(batch: *mut Batch, log: *mut ngx_log_t) {
    // SAFETY: a live batch.
    let batch_ref = unsafe { &mut *batch };
    if let Some((chunk, capture)) = batch_ref.writing.take() {
        // SAFETY: the capture is in the leader's pool, whose cleanups are running: its memory
        // is freed only after them.
        let capture = unsafe { &*capture };
        if capture.done {
            take_answer(batch_ref, chunk, capture, log);
        } else {
            batch_ref.plan.retry(chunk);
        }
        batch_ref.stage = Stage::Closed;
    }
    if batch_ref.stage == Stage::Closed && batch_ref.plan.is_done() {
        finish(batch, false);
        return;
    }
    let stage = batch_ref.stage;
    let delay = with_sink(batch_ref.sink, |sink| sink.limits.delay_ms);
    if let Some(next) = hand_over(batch_ref, true) {
        match stage {
            // SAFETY: the new leader's wake event lives in its ctx; its cleanup removes the
            // timer if it goes away first.
            Stage::Open => unsafe { ngx_add_timer(&mut next.wake, delay as _) },
            Stage::Closed | Stage::Writing => post_wake(next),
        }
        return;
    }

    // Nobody waits on this batch any more: what is not written yet goes with the next write.
    // SAFETY: created by `Box::into_raw` in `submit`; unlinked below before anything else runs.
    let batch = unsafe { Box::from_raw(batch) };
    let sink = batch.sink;
    let freed = ptr::from_ref(batch.as_ref()).cast_mut();
    with_sink(sink, |sink| {
        if sink.open == freed {
            sink.open = ptr::null_mut();
        } else {
            sink.in_flight = sink.in_flight.saturating_sub(1);
        }
        sink.live.retain(|b| *b != freed);
    });
    let unwritten: Vec<&[u8]> = match stage {
        Stage::Open => (0..batch.lines.len())
            .map(|i| batch.lines.line(i))
            .collect(),
        Stage::Closed | Stage::Writing => batch
            .plan
            .pending_lines()
            .map(|i| batch.lines.line(i))
            .collect(),
    };
    // SAFETY: NULL or the log of the request being freed (its connection's log).
    if let (false, Some(log_ref)) = (unwritten.is_empty(), unsafe { log.as_mut() }) {
        let (uri, points) = (sink_uri(sink), unwritten.len());
        ngx_log_error!(
            NGX_LOG_INFO,
            log_ref,
            "analytics: every request of a batch for \"{uri}\" ended before it was written, \
             {points} point(s) go with the next write (or to the spool)"
        );
    }
    // With a spool, they wait there (safe from a killed worker, written by its replay).
    let spooled = match with_sink(sink, |sink| sink.spool) {
        Some(spool) if !unwritten.is_empty() => {
            spool::append(spool, &unwritten, Append::Held { durable: false }).is_ok()
        }
        _ => false,
    };
    if !spooled {
        carry(sink, &unwritten, log);
    }
    drop(unwritten);
    drop(batch);
    flush_open_batch(sink);
    wake_waiting(sink);
}

/// A write slot came free: lets as many requests waiting for room as fit in the sink's next
/// batch submit their lines again (each in its own context, oldest first).
fn wake_waiting(sink: usize) {
    with_sink(sink, |sink| {
        // SAFETY: `sink.open` is NULL or a live batch.
        let filled = match unsafe { sink.open.as_ref() } {
            Some(open) => &open.lines,
            None => &sink.carried,
        };
        let mut lines_room = sink.limits.max_lines.saturating_sub(filled.len());
        let mut bytes_room = sink.limits.max_bytes.saturating_sub(filled.byte_len());
        while lines_room > 0 && bytes_room > 0 {
            let Some(ctx) = sink.waiting.pop_front() else {
                break;
            };
            // SAFETY: waiting requests are live: their cleanup removes them from the queue.
            let Some(ctx) = (unsafe { ctx.as_mut() }) else {
                continue;
            };
            ctx.waiting_in = None;
            if let Some(counters) = metrics() {
                counters.add_waiting(-1);
            }
            lines_room -= 1;
            bytes_room = bytes_room.saturating_sub(ctx.waiting_line.len());
            post_wake(ctx);
        }
    });
}

/// Worker exit (`exit_process`): logs the lines that were still waiting for a write with nobody
/// waiting on them (their requests went away and no later beacon's write took them).
///
/// # Safety
/// Called by nginx with the exiting cycle.
pub unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    no_panic((), || {
        // `background` lines were answered 204 before their write: those of batches not written
        // yet (open, or with a write on its way that this exit cuts short) are kept with the
        // carried ones.
        SINKS.with(|sinks| {
            for sink in sinks.borrow_mut().iter_mut() {
                if sink.mode != WriteMode::Background {
                    continue;
                }
                for batch in std::mem::take(&mut sink.live) {
                    // SAFETY: live batches are freed only by `finish` and `leader_gone`, which
                    // take them out of this list first; nginx frees nothing before
                    // `exit_process`.
                    let batch = unsafe { &*batch };
                    let unwritten: Vec<usize> = match batch.stage {
                        Stage::Open => (0..batch.lines.len()).collect(),
                        Stage::Closed | Stage::Writing => {
                            let writing = batch.writing.iter().flat_map(|(chunk, _)| chunk.clone());
                            writing.chain(batch.plan.pending_lines()).collect()
                        }
                    };
                    for i in unwritten {
                        sink.carried.push(batch.lines.line(i));
                    }
                }
            }
        });
        // Lines for a sink with a spool go there, to be written by the next worker.
        let to_spool: Vec<(usize, LineBatch)> = SINKS.with(|sinks| {
            sinks
                .borrow_mut()
                .iter_mut()
                .filter(|sink| sink.spool.is_some() && !sink.carried.is_empty())
                .filter_map(|sink| Some((sink.spool?, std::mem::take(&mut sink.carried))))
                .collect()
        });
        for (spool, carried) in &to_spool {
            let lines: Vec<&[u8]> = (0..carried.len()).map(|i| carried.line(i)).collect();
            // Refused lines are logged by the spool.
            let _ = spool::append(*spool, &lines, Append::Held { durable: true });
        }
        let lost: Vec<(String, usize)> = SINKS.with(|sinks| {
            sinks
                .borrow()
                .iter()
                .filter(|sink| !sink.carried.is_empty())
                .map(|sink| (sink.uri.clone(), sink.carried.len()))
                .collect()
        });
        // SAFETY: the exiting cycle and its log are valid during the call.
        let Some(log) = (unsafe { cycle.as_ref() })
            .map(|c| c.log)
            .filter(|l| !l.is_null())
        else {
            return;
        };
        for (uri, points) in lost {
            ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "analytics: write to \"{uri}\" failed: the worker exited first, {points} \
                 point(s) not stored"
            );
        }
    });
}
