//! Group commit: many beacons, one write.
//!
//! Per worker and write URI there is at most one *open* batch collecting lines. The first
//! beacon of a batch is its *leader*: it owns the write subrequest(s). A batch is closed and
//! written
//! - at once when no earlier write to the same URI is in flight (so a lone beacon is written
//!   without delay, and under load batches form while the previous write is on its way),
//! - when it reaches `lines=` or `bytes=` of `analytics_batch`,
//! - when the previous write finishes (the lines that gathered meanwhile go next),
//! - when its leader's timer fires `delay=` after it opened (a slow write does not hold lines
//!   back longer than that; at most [`MAX_WRITES_IN_FLIGHT`] writes run in parallel).
//!
//! When all write slots are busy and the open batch is full, a beacon *waits for room*: its
//! request parks with its line (not yet in any batch) until a write finishes, then submits
//! again. Nothing is refused or dropped; an overloaded sink slows the answers down instead, and
//! memory stays bounded by the batch limits plus one line per waiting connection.
//!
//! In `wait` mode every beacon of the batch (leader and members) stays parked until the write
//! that holds its line was answered: 204 when the sink stored it, 502 when not. In
//! `background` mode a beacon is answered 204 at once (the leader's request then stays open,
//! answered, until its batch is written). A 413 from the sink splits the failed chunk in halves
//! ([`WritePlan`]).
//!
//! Everything runs on the worker's single thread, in nginx event handlers: members and the
//! leader are woken through their own posted events and finalize themselves, each in its own
//! request context. A pool cleanup on every parked request keeps the batch from ever touching a
//! freed request: a member that goes away is forgotten, a leader that goes away fails its batch
//! (its members get 502).

use std::cell::RefCell;
use std::ffi::c_void;
use std::ops::Range;
use std::ptr;

use ngx::ffi::{
    ngx_add_timer, ngx_del_timer, ngx_delete_posted_event, ngx_event_t, ngx_http_finalize_request,
    ngx_http_request_t, ngx_http_run_posted_requests, ngx_int_t, ngx_pool_cleanup_add,
    ngx_post_event, ngx_posted_events, NGX_LOG_ERR,
};
use ngx::http::Request;
use ngx::ngx_log_error;

use crate::conf::WriteMode;
use crate::core::batch::{BatchLimits, ChunkOutcome, LineBatch, WritePlan};
use crate::handler::{
    answer_write_outcome, no_panic, request_ctx_ptr, resubmit, send_response, RequestCtx, NGX_DONE,
};
use crate::subrequest::{response_body, start_write};

/// Most writes to one URI a worker runs at the same time; while this many are in flight and
/// the open batch is full, further beacons wait for room instead of growing the batch.
pub const MAX_WRITES_IN_FLIGHT: usize = 4;

/// Where a batch is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Collecting lines; it is its URI's open batch.
    Open,
    /// Closed; its leader's wake-up event will start the write.
    Closed,
    /// A chunk is being written.
    Writing,
}

/// How a write subrequest ended: (no nginx-level error, the sink's HTTP status).
type SinkAnswer = (bool, usize);

/// A beacon parked on a batch, waiting for its answer.
struct Member {
    /// The parked request's state; NULL once the request went away.
    ctx: *mut RequestCtx,
    /// Index of its line in the batch.
    line: usize,
}

/// One batch of lines and the requests waiting on it.
pub struct Batch {
    uri: String,
    limits: BatchLimits,
    leader: *mut RequestCtx,
    lines: LineBatch,
    members: Vec<Member>,
    stage: Stage,
    plan: WritePlan,
    /// The chunk being written and, once its subrequest finished, the answer.
    writing: Option<(Range<usize>, Option<SinkAnswer>)>,
    /// The sink's error message for the chunk just written (sanitized, shortened).
    sink_message: String,
}

/// Per-URI state of this worker.
struct Sink {
    uri: String,
    open: *mut Batch,
    in_flight: usize,
    /// Requests waiting for room (all write slots busy, open batch full), oldest first.
    waiting: Vec<*mut RequestCtx>,
}

thread_local! {
    /// The worker's sinks (nginx runs the module on one thread per worker).
    static SINKS: RefCell<Vec<Sink>> = const { RefCell::new(Vec::new()) };
}

fn with_sink<T>(uri: &str, f: impl FnOnce(&mut Sink) -> T) -> T {
    SINKS.with(|sinks| {
        let mut sinks = sinks.borrow_mut();
        let index = match sinks.iter().position(|sink| sink.uri == uri) {
            Some(index) => index,
            None => {
                sinks.push(Sink {
                    uri: uri.to_string(),
                    open: ptr::null_mut(),
                    in_flight: 0,
                    waiting: Vec::new(),
                });
                sinks.len() - 1
            }
        };
        f(&mut sinks[index])
    })
}

/// What [`submit`] did with a beacon.
pub enum Submitted {
    /// Parked: the request will be finalized when its batch is written.
    Parked,
    /// Queued and answered at once (`background` mode): finalize with 204 now.
    Queued,
    /// nginx refused an allocation.
    Error,
}

/// Adds an accepted beacon's line to the open batch for `uri`.
pub fn submit(
    request: &mut Request,
    uri: &str,
    line: &[u8],
    mode: WriteMode,
    limits: BatchLimits,
) -> Submitted {
    let ctx = request_ctx_ptr(request);
    // SAFETY: the content handler created the ctx; it lives in the request pool.
    let Some(ctx_ref) = (unsafe { ctx.as_mut() }) else {
        return Submitted::Error;
    };
    let r: *mut ngx_http_request_t = request.into();

    let open = with_sink(uri, |sink| {
        // SAFETY: `sink.open` is NULL or a live batch (freed only after being unlinked).
        match unsafe { sink.open.as_mut() } {
            Some(batch) if batch.lines.is_full(&batch.limits) => Err(()),
            Some(batch) => Ok(Some(ptr::from_mut(batch))),
            None => Ok(None),
        }
    });
    let batch: *mut Batch = match open {
        Err(()) => {
            if !park(r, ctx_ref, ptr::null_mut()) {
                return Submitted::Error;
            }
            ctx_ref.waiting_line = line.to_vec();
            with_sink(uri, |sink| sink.waiting.push(ctx));
            return Submitted::Parked;
        }
        Ok(Some(batch)) => batch,
        Ok(None) => {
            let batch = Box::into_raw(Box::new(Batch {
                uri: uri.to_string(),
                limits,
                leader: ctx,
                lines: LineBatch::new(),
                members: Vec::new(),
                stage: Stage::Open,
                plan: WritePlan::new(0),
                writing: None,
                sink_message: String::new(),
            }));
            with_sink(uri, |sink| sink.open = batch);
            batch
        }
    };
    // SAFETY: `batch` is live: it is the URI's open batch.
    let batch_ref = unsafe { &mut *batch };
    let is_leader = batch_ref.leader == ctx;

    if (is_leader || mode == WriteMode::Wait) && !park(r, ctx_ref, batch) {
        if is_leader {
            // Nobody else can have joined yet: undo the batch.
            with_sink(uri, |sink| sink.open = ptr::null_mut());
            // SAFETY: created above by `Box::into_raw`, unlinked just now, never shared.
            drop(unsafe { Box::from_raw(batch) });
        }
        return Submitted::Error;
    }
    let index = batch_ref.lines.push(line);
    if is_leader || mode == WriteMode::Wait {
        batch_ref.members.push(Member { ctx, line: index });
    }
    if is_leader && mode == WriteMode::Background {
        // Answer now, before a subrequest exists (its output would hold ours back); the
        // request stays open, answered, until its batch is written.
        ctx_ref.early_answer = Some(send_response(request, 204, ""));
    }

    let in_flight = with_sink(uri, |sink| sink.in_flight);
    let must_write = in_flight == 0 || batch_ref.lines.is_full(&batch_ref.limits);
    let may_write = batch_ref.limits.is_off() || in_flight < MAX_WRITES_IN_FLIGHT;
    if (must_write || batch_ref.limits.delay_ms == 0) && may_write {
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

/// Prepares a request to wait on `batch`: its wake-up event, and the pool cleanup that
/// detaches it from the batch if the request goes away first.
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
    ctx.batch = batch;
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

/// Closes `batch` and starts its write: directly when running in the leader's own request
/// (`current` is the leader's ctx), otherwise by posting the leader's wake-up event.
fn close_and_flush(batch: *mut Batch, current: Option<*mut RequestCtx>) {
    // SAFETY: callers pass a live batch.
    let batch_ref = unsafe { &mut *batch };
    if batch_ref.stage != Stage::Open {
        return;
    }
    batch_ref.stage = Stage::Closed;
    with_sink(&batch_ref.uri, |sink| {
        if sink.open == batch {
            sink.open = ptr::null_mut();
        }
        sink.in_flight += 1;
    });
    let leader = batch_ref.leader;
    // SAFETY: a batch's leader ctx is live while the batch is (its cleanup fails the batch).
    let leader_ref = unsafe { &mut *leader };
    if leader_ref.wake.timer_set() != 0 {
        // SAFETY: the timer was armed by `submit` on this event.
        unsafe { ngx_del_timer(&mut leader_ref.wake) };
    }
    if current == Some(leader) {
        write_next_chunk(batch);
    } else {
        // SAFETY: the event lives in the leader's ctx; its cleanup removes it from the queue.
        unsafe { ngx_post_event(&mut leader_ref.wake, ptr::addr_of_mut!(ngx_posted_events)) };
    }
}

/// Closes the URI's open batch if it has lines and a write slot is free.
fn flush_open_batch(uri: &str) {
    let open = with_sink(uri, |sink| {
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
    match unsafe { ctx_ref.batch.as_mut() } {
        Some(batch) if batch.leader == ctx => match batch.stage {
            Stage::Open if timed_out => {
                let fits = with_sink(&batch.uri, |sink| sink.in_flight < MAX_WRITES_IN_FLIGHT);
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
            let rc = resubmit(request, &line);
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

/// Starts the write of the batch's next chunk in the leader's request, or finishes the batch.
fn write_next_chunk(batch: *mut Batch) {
    // SAFETY: callers pass a live batch.
    let batch_ref = unsafe { &mut *batch };
    if batch_ref.stage == Stage::Closed {
        batch_ref.plan = WritePlan::new(batch_ref.lines.len());
    }
    // SAFETY: the leader's ctx is live while its batch is.
    let r = unsafe { (*batch_ref.leader).request };
    while let Some(chunk) = batch_ref.plan.next_chunk() {
        // SAFETY: the leader's request is live while its batch is.
        let request = unsafe { Request::from_ngx_http_request(r) };
        let body = batch_ref.lines.chunk(&chunk);
        match start_write(
            request,
            &batch_ref.uri,
            body,
            Some(chunk_written),
            batch.cast(),
        ) {
            Ok(()) => {
                batch_ref.stage = Stage::Writing;
                batch_ref.writing = Some((chunk, None));
                // SAFETY: `r` is valid; nginx runs the parent's write handler once the waited
                // subrequest is done.
                unsafe { (*r).write_event_handler = Some(chunk_done) };
                return;
            }
            Err(_) => {
                log_failed_chunk(request, batch_ref, chunk.len(), "could not start the write");
                batch_ref.plan.record(chunk, ChunkOutcome::Failed);
            }
        }
    }
    finish(batch);
}

/// Post-subrequest handler of a chunk write: records the sink's answer (may run twice for one
/// subrequest; a failure is never overwritten).
unsafe extern "C" fn chunk_written(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    no_panic(rc, || {
        // SAFETY: `data` is the live batch whose leader owns this subrequest.
        let Some(batch) = (unsafe { data.cast::<Batch>().as_mut() }) else {
            return rc;
        };
        // SAFETY: nginx passes the finished, valid subrequest.
        let status = unsafe { (*sr).headers_out.status };
        if let Some((_, result)) = &mut batch.writing {
            let failed_before = matches!(result, Some((ok, s)) if !(*ok && (200..300).contains(s)));
            if !failed_before {
                *result = Some((rc == 0, status));
                if !(200..300).contains(&status) {
                    // SAFETY: `sr` is the finished subrequest started by `start_write`.
                    let body = unsafe { response_body(sr) };
                    batch.sink_message = sink_message(body);
                }
            }
        }
        rc
    })
}

/// The leader's write handler while a chunk is written: runs when the subrequest is done.
unsafe extern "C" fn chunk_done(r: *mut ngx_http_request_t) {
    no_panic((), || {
        // SAFETY: nginx calls the write handler with the valid leader request.
        let request = unsafe { Request::from_ngx_http_request(r) };
        // SAFETY: the leader's ctx, live with its request.
        let Some(ctx) = (unsafe { request_ctx_ptr(request).as_mut() }) else {
            return;
        };
        // SAFETY: NULL or the live batch this request leads.
        let Some(batch) = (unsafe { ctx.batch.as_mut() }) else {
            return;
        };
        let Some((chunk, Some((ok, status)))) = batch.writing.take() else {
            return; // not finished yet
        };
        let outcome = ChunkOutcome::from_status(ok, status);
        // A 413 on a single line cannot be split further: that line fails.
        let single_too_large = outcome == ChunkOutcome::TooLarge && chunk.len() == 1;
        if outcome == ChunkOutcome::Failed || single_too_large {
            let message = std::mem::take(&mut batch.sink_message);
            let detail = match (status, message.as_str()) {
                (0, _) => "no answer from the sink".to_string(),
                (400, m) if m.contains("partial write") => {
                    format!("sink answered 400, a partial write (some lines stored): {m}")
                }
                (status, "") => format!("sink answered {status}"),
                (status, m) => format!("sink answered {status}: {m}"),
            };
            log_failed_chunk(request, batch, chunk.len(), &detail);
        }
        batch.plan.record(chunk, outcome);
        write_next_chunk(batch);
    });
}

/// The sink's answer body as a short, single-line, printable message for the error log.
fn sink_message(body: &[u8]) -> String {
    const MAX_CHARS: usize = 300;
    let text = String::from_utf8_lossy(body);
    let mut message: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_CHARS)
        .collect();
    if text.trim().chars().count() > MAX_CHARS {
        message.push_str("...");
    }
    message
}

fn log_failed_chunk(request: &Request, batch: &Batch, points: usize, detail: &str) {
    let uri = &batch.uri;
    ngx_log_error!(
        NGX_LOG_ERR,
        request.log(),
        "analytics: write to \"{uri}\" failed: {detail}, {points} point(s) not stored"
    );
}

/// All chunks are written: answers every member, frees the batch, and lets the lines that
/// gathered meanwhile go next. Runs in the leader's request, which it finalizes last.
fn finish(batch: *mut Batch) {
    // SAFETY: callers pass a live batch, which is freed here.
    let batch = unsafe { Box::from_raw(batch) };
    with_sink(&batch.uri, |sink| {
        sink.in_flight = sink.in_flight.saturating_sub(1)
    });
    let mut leader_request = ptr::null_mut();
    for member in &batch.members {
        // SAFETY: NULL (gone) or the live ctx of a parked request.
        let Some(ctx) = (unsafe { member.ctx.as_mut() }) else {
            continue;
        };
        ctx.batch = ptr::null_mut();
        ctx.write_finished = true;
        ctx.write_failed = !batch.plan.is_stored(member.line);
        if member.ctx == batch.leader {
            leader_request = ctx.request;
        } else {
            // SAFETY: the member's live wake-up event; its cleanup unlinks it if needed.
            unsafe { ngx_post_event(&mut ctx.wake, ptr::addr_of_mut!(ngx_posted_events)) };
        }
    }
    flush_open_batch(&batch.uri);
    wake_waiting(&batch.uri);
    drop(batch);
    if !leader_request.is_null() {
        // SAFETY: the leader request is live (this runs in its write handler).
        let request = unsafe { Request::from_ngx_http_request(leader_request) };
        let rc = answer_write_outcome(request);
        // SAFETY: the leader's write finished; this finalizes its request once.
        unsafe { ngx_http_finalize_request(leader_request, rc) };
    }
}

/// Pool cleanup of a parked request: detaches it from its batch. A leader that goes away
/// before its batch is written takes the batch with it: its members are answered 502.
unsafe extern "C" fn request_gone(data: *mut c_void) {
    no_panic((), || {
        // SAFETY: `data` is the request's ctx, still allocated while its pool is destroyed.
        let Some(ctx) = (unsafe { data.cast::<RequestCtx>().as_mut() }) else {
            return;
        };
        if ctx.wake.timer_set() != 0 {
            // SAFETY: the event's timer was armed by `submit`.
            unsafe { ngx_del_timer(&mut ctx.wake) };
        }
        if ctx.wake.posted() != 0 {
            // SAFETY: the event is in the posted queue.
            unsafe { ngx_delete_posted_event(&mut ctx.wake) };
        }
        let me = ptr::from_mut(ctx);
        SINKS.with(|sinks| {
            for sink in sinks.borrow_mut().iter_mut() {
                sink.waiting.retain(|waiting| *waiting != me);
            }
        });
        let batch = ctx.batch;
        ctx.batch = ptr::null_mut();
        // SAFETY: NULL or a live batch.
        let Some(batch_ref) = (unsafe { batch.as_mut() }) else {
            return;
        };
        if batch_ref.leader != me {
            for member in batch_ref.members.iter_mut().filter(|m| m.ctx == me) {
                member.ctx = ptr::null_mut();
            }
            return;
        }
        leader_gone(batch);
    });
}

/// The leader went away before its batch was written: fail every other member.
fn leader_gone(batch: *mut Batch) {
    // SAFETY: a live batch, freed here.
    let batch = unsafe { Box::from_raw(batch) };
    with_sink(&batch.uri, |sink| {
        if sink.open == ptr::from_ref(batch.as_ref()).cast_mut() {
            sink.open = ptr::null_mut();
        } else {
            sink.in_flight = sink.in_flight.saturating_sub(1);
        }
    });
    // SAFETY: the leader ctx is still allocated (its pool is being destroyed).
    if let Some(log) = unsafe { (*batch.leader).wake.log.as_mut() } {
        let (uri, points) = (&batch.uri, batch.lines.len());
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "analytics: write to \"{uri}\" failed: its request ended first, {points} point(s) \
             not stored"
        );
    }
    for member in &batch.members {
        // SAFETY: NULL or the live ctx of another parked request.
        let Some(ctx) = (unsafe { member.ctx.as_mut() }) else {
            continue;
        };
        if member.ctx == batch.leader {
            continue;
        }
        ctx.batch = ptr::null_mut();
        ctx.write_finished = true;
        ctx.write_failed = true;
        // SAFETY: the member's live wake-up event.
        unsafe { ngx_post_event(&mut ctx.wake, ptr::addr_of_mut!(ngx_posted_events)) };
    }
    flush_open_batch(&batch.uri);
    wake_waiting(&batch.uri);
}

/// A write slot came free: lets every request waiting for room submit its line again (each in
/// its own context, oldest first; those that still find no room wait again).
fn wake_waiting(uri: &str) {
    for ctx in with_sink(uri, |sink| std::mem::take(&mut sink.waiting)) {
        // SAFETY: waiting requests are live: their cleanup removes them from the list.
        if let Some(ctx) = unsafe { ctx.as_mut() } {
            // SAFETY: the waiting request's live wake-up event.
            unsafe { ngx_post_event(&mut ctx.wake, ptr::addr_of_mut!(ngx_posted_events)) };
        }
    }
}
