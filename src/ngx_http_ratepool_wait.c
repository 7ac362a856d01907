
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_wait.h"


/*
 * Requests waiting for room in a pool (ratepool_wait): a FIFO queue a
 * workspace in each worker, served in fair turns across workspaces and
 * first come, first served across workers.  What admits or refuses a
 * request is admission's, through the hooks the pool was given.
 */


/* a wait whose end is this close is not worth a timer of its own */
#define RATEPOOL_WAKE_MIN_MS   5

/*
 * A workspace whose waiting request found the pool full this recently
 * is owed its turn; a worker that holds none of its requests lets the
 * room go to the worker that does, and looks again this much later.
 */
#define RATEPOOL_WANTS_MS      1500
#define RATEPOOL_DEFER_MS      20

/*
 * A worker with requests waiting looks at least this often, for places
 * in the queue another worker took from them (and for room other
 * gateways gave back).
 */
#define RATEPOOL_LOOK_MS       250

#define RATEPOOL_TURN          100800     /* divides by 1 to 10, 12, ... */

/* how a request left the queue */
#define RATEPOOL_LEFT_REFUSED  0
#define RATEPOOL_LEFT_SERVED   1
#define RATEPOOL_LEFT_GONE     2
#define RATEPOOL_LEFT_EVICTED  3


static void ngx_http_ratepool_wake_handler(ngx_event_t *ev);
static void ngx_http_ratepool_wait_timeout(ngx_event_t *ev);
static void ngx_http_ratepool_answer(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc, uint64_t wait_ms);
static void ngx_http_ratepool_leave(ngx_http_ratepool_ctx_t *ctx,
    ngx_uint_t served);
static ngx_http_ratepool_queue_sh_t *ngx_http_ratepool_take_place(
    ngx_http_ratepool_pool_t *pool, ngx_http_ratepool_main_conf_t *rmcf,
    ngx_uint_t index);
static void ngx_http_ratepool_give_up_places(ngx_http_ratepool_pool_t *pool);

/* places a workspace holds in a pool's queue, less those it owes */
#define ngx_http_ratepool_places(qsh)                                        \
    ((qsh)->waiting - ngx_min((qsh)->owed, (qsh)->waiting))

static void ngx_http_ratepool_schedule(ngx_http_ratepool_pool_t *pool,
    uint64_t at_ms);
static void ngx_http_ratepool_note_oldest(ngx_http_ratepool_pool_t *pool);
static void ngx_http_ratepool_catch_up(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_workspace_t *ws, uint64_t now_ms);
static ngx_int_t ngx_http_ratepool_my_turn(ngx_http_ratepool_ctx_t *ctx,
    uint64_t now_ms);
static void ngx_http_ratepool_took_turn(ngx_http_ratepool_ctx_t *ctx,
    ngx_int_t rc, uint64_t now_ms);


/*
 * Each worker keeps its own waiting requests, a FIFO queue a workspace,
 * and serves the queues in turn; the pool's state they wait on is the
 * zone's, shared by all workers.
 */

ngx_int_t
ngx_http_ratepool_init_waiting(ngx_conf_t *cf, ngx_http_ratepool_pool_t *pool,
    ngx_uint_t nworkspaces, const ngx_http_ratepool_wait_hooks_t *hooks)
{
    ngx_uint_t  i;

    pool->hooks = hooks;

    pool->waiting = ngx_palloc(cf->pool,
                               ngx_max(nworkspaces, 1) * sizeof(ngx_queue_t));
    if (pool->waiting == NULL) {
        return NGX_ERROR;
    }

    /* set when the zone is, see ngx_http_ratepool_attach() */
    pool->queues = ngx_pcalloc(cf->pool,
                               ngx_max(nworkspaces, 1)
                               * sizeof(ngx_http_ratepool_queue_sh_t *));
    if (pool->queues == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < ngx_max(nworkspaces, 1); i++) {
        ngx_queue_init(&pool->waiting[i]);
    }

    pool->wake.handler = ngx_http_ratepool_wake_handler;
    pool->wake.data = pool;
    /* cycle->log is still the previous cycle's while it is configured */
    pool->wake.log = &cf->cycle->new_log;
    pool->wake.cancelable = 1;

    return NGX_OK;
}


/*
 * Queues a request that may fit in wait_ms, which is within its
 * ratepool_wait.  NGX_DECLINED: the pool's queue is full.
 */

ngx_int_t
ngx_http_ratepool_wait(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx,
    uint64_t wait_ms)
{
    uint64_t                       now_ms;
    ngx_uint_t                     full, index;
    ngx_slab_pool_t               *shpool;
    ngx_http_ratepool_pool_t      *pool;
    ngx_http_ratepool_loc_conf_t  *rlcf;
    ngx_http_ratepool_main_conf_t *rmcf;

    pool = ctx->pool;
    shpool = pool->zone->shpool;
    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);
    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);

    /* a client that leaves while it waits must be seen to leave */
    if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
        return NGX_DECLINED;
    }

    index = ctx->workspace - (ngx_http_ratepool_workspace_t *)
                             rmcf->workspaces.elts;

    ngx_shmtx_lock(&shpool->mutex);

    full = (pool->sh->waiting >= pool->queue_max
            && ngx_http_ratepool_take_place(pool, rmcf, index) == NULL);

    if (!full) {
        pool->sh->waiting++;
        pool->sh->waited++;
        pool->queues[index]->waiting++;
        ctx->workspace->sh->waiting++;
        ctx->workspace->sh->waited++;

        if (ctx->limited_pool) {
            ngx_http_ratepool_catch_up(rmcf, ctx->workspace,
                                       ngx_http_ratepool_now_ms());
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (full) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "ratepool: the queue of pool \"%V\" is full "
                      "(queue=%ui)", &pool->upstream->host, pool->queue_max);
        return NGX_DECLINED;
    }

    now_ms = ngx_http_ratepool_now_ms();

    ctx->waiting = 1;
    ctx->wait_start_ms = now_ms;

    /* a request Redis sent back to wait keeps its first deadline */
    if (ctx->wait_until_ms == 0) {
        ctx->wait_until_ms = now_ms + rlcf->wait;
    }

    ngx_queue_insert_tail(&pool->waiting[index], &ctx->queue);
    pool->nwaiting++;

    ctx->wait_timer.handler = ngx_http_ratepool_wait_timeout;
    ctx->wait_timer.data = ctx;
    ctx->wait_timer.log = r->connection->log;
    ngx_add_timer(&ctx->wait_timer, ctx->wait_until_ms > now_ms
                                    ? ctx->wait_until_ms - now_ms : 1);

    /* a client that leaves while it waits ends the request */
    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    ngx_http_ratepool_schedule(pool, now_ms + wait_ms);
    ngx_http_ratepool_note_oldest(pool);

    /*
     * The place it took may be this worker's to give up: after this
     * request is settled, it may even be this request's own.
     */
    if (!pool->wake.posted) {
        ngx_post_event(&pool->wake, &ngx_posted_events);
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "ratepool: waits, may fit in %uL ms of %M",
                   wait_ms, rlcf->wait);

    return NGX_OK;
}


/* out of the queue: served, refused, or gone (request cleanup) */

static void
ngx_http_ratepool_leave(ngx_http_ratepool_ctx_t *ctx, ngx_uint_t served)
{
    ngx_slab_pool_t                *shpool;
    ngx_http_ratepool_pool_t       *pool;
    ngx_http_ratepool_queue_sh_t   *qsh;
    ngx_http_ratepool_main_conf_t  *rmcf;

    pool = ctx->pool;
    shpool = pool->zone->shpool;
    rmcf = pool->zone->conf;
    qsh = pool->queues[ctx->workspace - (ngx_http_ratepool_workspace_t *)
                                        rmcf->workspaces.elts];

    ngx_queue_remove(&ctx->queue);
    pool->nwaiting--;
    ctx->waiting = 0;
    ctx->waited_ms += ngx_http_ratepool_now_ms() - ctx->wait_start_ms;

    if (ctx->wait_timer.timer_set) {
        ngx_del_timer(&ctx->wait_timer);
    }

    ngx_shmtx_lock(&shpool->mutex);

    pool->sh->waiting--;
    qsh->waiting -= ngx_min(qsh->waiting, 1);
    ctx->workspace->sh->waiting--;

    /* any of the workspace's requests that leaves frees a place it owed */
    if (served != RATEPOOL_LEFT_EVICTED && qsh->owed) {
        qsh->owed--;
    }

    if (served == RATEPOOL_LEFT_SERVED) {
        pool->sh->served++;

    } else if (served == RATEPOOL_LEFT_REFUSED) {
        pool->sh->timed_out++;

    } else if (served == RATEPOOL_LEFT_EVICTED) {
        pool->sh->evicted++;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_http_ratepool_note_oldest(pool);
}


void
ngx_http_ratepool_unwait(ngx_http_ratepool_ctx_t *ctx)
{
    if (ctx->waiting) {
        ngx_http_ratepool_leave(ctx, RATEPOOL_LEFT_GONE);
    }
}


/*
 * With the zone locked, the pool's queue full: a workspace with fewer
 * places than its share (for its weight) takes one from the workspace
 * that holds the most beyond its own, which owes it.  The queue holds
 * one more request until one of that workspace's leaves or gives up its
 * place.  NULL: no workspace holds more than its share.
 */

static ngx_http_ratepool_queue_sh_t *
ngx_http_ratepool_take_place(ngx_http_ratepool_pool_t *pool,
    ngx_http_ratepool_main_conf_t *rmcf, ngx_uint_t index)
{
    ngx_uint_t                      i, most, mine, held, most_held;
    ngx_http_ratepool_workspace_t  *ws;

    ws = rmcf->workspaces.elts;
    mine = ngx_http_ratepool_places(pool->queues[index]);
    most = index;
    most_held = 0;

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        held = ngx_http_ratepool_places(pool->queues[i]);

        /*
         * Shares are compared for the workspaces' weights, as products:
         * one that would still hold more than this one after giving up a
         * place owes it, the one that holds the most first.
         */

        if (i == index || held == 0
            || (held - 1) * ws[index].weight < (mine + 1) * ws[i].weight
            || (most_held && held * ws[most].weight
                             <= most_held * ws[i].weight))
        {
            continue;
        }

        most = i;
        most_held = held;
    }

    if (most_held == 0) {
        return NULL;
    }

    pool->queues[most]->owed++;

    return pool->queues[most];
}


/*
 * Places this worker's requests owe other workspaces are given up, the
 * newest request first: it is answered as if the queue had been full.
 */

static void
ngx_http_ratepool_give_up_places(ngx_http_ratepool_pool_t *pool)
{
    uint64_t                        wait_ms, now_ms;
    ngx_uint_t                      i, n, owed;
    ngx_queue_t                    *q;
    ngx_connection_t               *c;
    ngx_slab_pool_t                *shpool;
    ngx_http_request_t             *r;
    ngx_http_ratepool_ctx_t        *ctx;
    ngx_http_ratepool_main_conf_t  *rmcf;

    shpool = pool->zone->shpool;
    rmcf = pool->zone->conf;
    n = ngx_max(rmcf->workspaces.nelts, 1);

    for (i = 0; i < n; i++) {
        q = &pool->waiting[i];

        /* read without the lock: a word another worker writes whole */
        while (!ngx_queue_empty(q) && pool->queues[i]->owed) {

            ngx_shmtx_lock(&shpool->mutex);

            owed = pool->queues[i]->owed;

            if (owed) {
                pool->queues[i]->owed--;
            }

            ngx_shmtx_unlock(&shpool->mutex);

            if (owed == 0) {
                break;
            }

            ctx = ngx_queue_data(ngx_queue_last(q), ngx_http_ratepool_ctx_t,
                                 queue);
            r = ctx->request;
            c = r->connection;

            ngx_log_error(NGX_LOG_WARN, c->log, 0,
                          "ratepool: a request of workspace \"%V\" gave up "
                          "its place in the full queue of pool \"%V\" to "
                          "another workspace's", &ctx->workspace->name,
                          &pool->upstream->host);

            now_ms = ngx_http_ratepool_now_ms();
            wait_ms = pool->hooks->peek(ctx);
            wait_ms = wait_ms > now_ms ? wait_ms - now_ms : 0;

            ngx_http_ratepool_leave(ctx, RATEPOOL_LEFT_EVICTED);
            ngx_http_ratepool_answer(r, ctx, NGX_AGAIN, wait_ms);
            ngx_http_run_posted_requests(c);
        }
    }
}


/*
 * Something was given back in this worker: what waits may fit now, in
 * any pool, since pools may share orgs.
 */

void
ngx_http_ratepool_wake(ngx_http_ratepool_pool_t *pool)
{
    ngx_uint_t                      i;
    ngx_http_ratepool_pool_t      **pools;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = pool->zone->conf;
    pools = rmcf->pools.elts;

    for (i = 0; i < rmcf->pools.nelts; i++) {
        if (pools[i]->nwaiting && !pools[i]->wake.posted) {
            ngx_post_event(&pools[i]->wake, &ngx_posted_events);
        }
    }
}


static void
ngx_http_ratepool_schedule(ngx_http_ratepool_pool_t *pool, uint64_t at_ms)
{
    uint64_t    now_ms;
    ngx_msec_t  delay;

    now_ms = ngx_http_ratepool_now_ms();
    delay = (ngx_msec_t) (at_ms > now_ms ? at_ms - now_ms : 0);

    if (delay < RATEPOOL_WAKE_MIN_MS) {
        delay = RATEPOOL_WAKE_MIN_MS;
    }

    if (delay > RATEPOOL_LOOK_MS) {
        delay = RATEPOOL_LOOK_MS;
    }

    /* the sooner of the two */
    if (pool->wake.timer_set
        && (ngx_msec_int_t) (pool->wake.timer.key
                             - (ngx_current_msec + delay)) <= 0)
    {
        return;
    }

    /* ngx_add_timer() would keep a timer that is up to 300 ms later */
    if (pool->wake.timer_set) {
        ngx_del_timer(&pool->wake);
    }

    ngx_add_timer(&pool->wake, delay);
}


/*
 * The queues' heads, in turn from where the last round stopped: each
 * that fits now goes, one a workspace a turn; the others say when they
 * may, and the soonest of those is the next wake-up.  A request that
 * cannot fit before its wait is over is answered now.
 */

static void
ngx_http_ratepool_wake_handler(ngx_event_t *ev)
{
    ngx_http_ratepool_pool_t *pool = ev->data;

    uint64_t                        now_ms, wait_ms, next_ms;
    ngx_int_t                       rc;
    ngx_uint_t                      n, k, i, moved;
    ngx_queue_t                    *q;
    ngx_connection_t               *c;
    ngx_http_request_t             *r;
    ngx_http_ratepool_ctx_t        *ctx;
    ngx_http_ratepool_main_conf_t  *rmcf;

    if (pool->wake.timer_set) {
        ngx_del_timer(&pool->wake);
    }

    ngx_http_ratepool_give_up_places(pool);

    if (pool->nwaiting == 0) {
        return;
    }

    rmcf = pool->zone->conf;
    n = ngx_max(rmcf->workspaces.nelts, 1);

    /* until a round in which no request goes or is answered */

    do {
        moved = 0;
        next_ms = 0;
        now_ms = ngx_http_ratepool_now_ms();

        for (k = 0; k < n && pool->nwaiting; k++) {
            i = (pool->next_workspace + k) % n;
            q = &pool->waiting[i];

            if (ngx_queue_empty(q)) {
                continue;
            }

            ctx = ngx_queue_data(ngx_queue_head(q), ngx_http_ratepool_ctx_t,
                                 queue);
            r = ctx->request;
            c = r->connection;

            if (!ngx_http_ratepool_my_turn(ctx, now_ms)) {
                /*
                 * Another worker's request is owed the room: look again
                 * once it had the time to take it, or once there is room
                 * for this one too.
                 */
                wait_ms = ngx_max(pool->hooks->peek(ctx),
                                  now_ms + RATEPOOL_DEFER_MS);

                if (next_ms == 0 || wait_ms < next_ms) {
                    next_ms = wait_ms;
                }

                continue;
            }

            rc = pool->hooks->try_admit(ctx, &wait_ms);
            ngx_http_ratepool_took_turn(ctx, rc, now_ms);

            if (rc == NGX_AGAIN && now_ms + wait_ms <= ctx->wait_until_ms) {
                if (next_ms == 0 || now_ms + wait_ms < next_ms) {
                    next_ms = now_ms + wait_ms;
                }

                continue;
            }

            ngx_http_ratepool_leave(ctx, rc == NGX_OK);

            if (rc == NGX_OK) {
                pool->hooks->resume(r, ctx);

                pool->next_workspace = (i + 1) % n;

            } else {
                ngx_http_ratepool_answer(r, ctx, rc, wait_ms);
            }

            ngx_http_run_posted_requests(c);

            moved = 1;
            break;
        }

    } while (moved && pool->nwaiting);

    if (pool->nwaiting) {
        ngx_http_ratepool_schedule(pool, next_ms ? next_ms
                                                 : now_ms + RATEPOOL_LOOK_MS);
    }
}


/*
 * A waiting request that cannot go is answered; the answer finalizes
 * it, unless it could not be made.
 */

static void
ngx_http_ratepool_answer(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx,
    ngx_int_t rc, uint64_t wait_ms)
{
    rc = ctx->pool->hooks->refuse(r, ctx, rc, wait_ms);

    if (rc != NGX_DONE) {
        ngx_http_finalize_request(r, rc);
    }
}


/* the request waited as long as it may */

static void
ngx_http_ratepool_wait_timeout(ngx_event_t *ev)
{
    ngx_http_ratepool_ctx_t *ctx = ev->data;

    uint64_t             wait_ms;
    ngx_int_t            rc;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;
    c = r->connection;

    /* one last look: it may just fit */
    rc = ctx->pool->hooks->try_admit(ctx, &wait_ms);

    ngx_http_ratepool_leave(ctx, rc == NGX_OK);

    if (rc == NGX_OK) {
        ctx->pool->hooks->resume(r, ctx);

    } else {
        ngx_http_ratepool_answer(r, ctx, rc, wait_ms);
    }

    ngx_http_run_posted_requests(c);
}


/*
 * Fair turns across workers: workspaces whose requests wait for the
 * pool are served in turn, the one served fewest times (for its weight)
 * first.  With the
 * zone locked: a workspace that starts to want the pool starts level
 * with those that want it already, so it cannot have saved up turns.
 */

static void
ngx_http_ratepool_catch_up(ngx_http_ratepool_main_conf_t *rmcf,
    ngx_http_ratepool_workspace_t *ws, uint64_t now_ms)
{
    uint64_t                        least;
    ngx_uint_t                      i, found;
    ngx_http_ratepool_workspace_t  *all;

    if (ws->sh->wants_ms + RATEPOOL_WANTS_MS > now_ms
        && ws->sh->wants_ms)
    {
        ws->sh->wants_ms = now_ms;
        return;
    }

    all = rmcf->workspaces.elts;
    least = 0;
    found = 0;

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        if (&all[i] == ws || all[i].sh->waiting == 0
            || all[i].sh->wants_ms + RATEPOOL_WANTS_MS <= now_ms)
        {
            continue;
        }

        if (!found || all[i].sh->turns < least) {
            least = all[i].sh->turns;
            found = 1;
        }
    }

    if (found && ws->sh->turns < least) {
        ws->sh->turns = least;
    }

    ws->sh->wants_ms = now_ms;
}


/* may this request's workspace take the room now, or is another owed it */

static ngx_int_t
ngx_http_ratepool_my_turn(ngx_http_ratepool_ctx_t *ctx, uint64_t now_ms)
{
    uint64_t                        turns, stale_ms, *oldest;
    ngx_uint_t                      i, mine, slot;
    ngx_slab_pool_t                *shpool;
    ngx_http_ratepool_workspace_t  *all;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ctx->pool->zone->conf;
    all = rmcf->workspaces.elts;
    shpool = ctx->pool->zone->shpool;
    mine = 1;

    /*
     * First come, first served within a workspace: another worker's
     * request of the same workspace that has waited longer goes first.
     * One that began longer ago than this request may wait is the trace
     * of a worker that is gone, and is not waited for.
     */

    oldest = ctx->pool->queues[ctx->workspace - all]->oldest_ms;
    slot = ngx_worker % RATEPOOL_WORKER_SLOTS;
    stale_ms = ctx->wait_until_ms - ctx->wait_start_ms + 1000;

    for (i = 0; i < RATEPOOL_WORKER_SLOTS; i++) {
        if (i != slot && oldest[i] && oldest[i] < ctx->wait_start_ms
            && oldest[i] + stale_ms > now_ms)
        {
            return 0;
        }
    }

    ngx_shmtx_lock(&shpool->mutex);

    turns = ctx->workspace->sh->turns;

    for (i = 0; i < rmcf->workspaces.nelts; i++) {
        if (&all[i] != ctx->workspace && all[i].sh->waiting
            && all[i].sh->wants_ms + RATEPOOL_WANTS_MS > now_ms
            && all[i].sh->turns < turns)
        {
            mine = 0;
            break;
        }
    }

    if (!mine) {
        /* it still wants the pool, after the one owed a turn */
        ctx->workspace->sh->wants_ms = now_ms;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    return mine;
}


static void
ngx_http_ratepool_took_turn(ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc,
    uint64_t now_ms)
{
    ngx_slab_pool_t                *shpool;
    ngx_http_ratepool_main_conf_t  *rmcf;

    if (rc != NGX_OK && !(rc == NGX_AGAIN && ctx->limited_pool)) {
        return;
    }

    rmcf = ctx->pool->zone->conf;
    shpool = ctx->pool->zone->shpool;

    ngx_shmtx_lock(&shpool->mutex);

    if (rc == NGX_OK) {
        /* a workspace of weight 2 is served twice as often */
        ctx->workspace->sh->turns += RATEPOOL_TURN / ctx->workspace->weight;
        ctx->workspace->sh->wants_ms = now_ms;

    } else {
        ngx_http_ratepool_catch_up(rmcf, ctx->workspace, now_ms);
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


/*
 * When this worker's longest wait began, in all and per workspace: for
 * the status, and for first come, first served across workers.
 */

static void
ngx_http_ratepool_note_oldest(ngx_http_ratepool_pool_t *pool)
{
    uint64_t                        oldest_ms, head_ms;
    ngx_uint_t                      i, n, slot;
    ngx_http_ratepool_ctx_t        *ctx;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = pool->zone->conf;
    n = rmcf->workspaces.nelts;
    slot = ngx_worker % RATEPOOL_WORKER_SLOTS;
    oldest_ms = 0;

    for (i = 0; i < n; i++) {
        head_ms = 0;

        if (!ngx_queue_empty(&pool->waiting[i])) {
            ctx = ngx_queue_data(ngx_queue_head(&pool->waiting[i]),
                                 ngx_http_ratepool_ctx_t, queue);
            head_ms = ctx->wait_start_ms;
        }

        /* aligned words, read by other workers without the lock */
        pool->queues[i]->oldest_ms[slot] = head_ms;

        if (head_ms && (oldest_ms == 0 || head_ms < oldest_ms)) {
            oldest_ms = head_ms;
        }
    }

    pool->sh->oldest_ms[slot] = oldest_ms;
}
