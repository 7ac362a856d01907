
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_admission.h"
#include "ngx_http_ratepool_body.h"
#include "ngx_http_ratepool_home.h"
#include "ngx_http_ratepool_pool.h"
#include "ngx_http_ratepool_reply.h"
#include "ngx_http_ratepool_store.h"
#include "ngx_http_ratepool_wait.h"


/*
 * Admission: with the body in, a request takes from its workspace's
 * buckets and budgets, then a key of the pool; with a shared store, the
 * store takes it for every gateway too.  What cannot go now waits
 * (ratepool_wait) or is refused.
 */


static void ngx_http_ratepool_home_known(void *data, ngx_int_t rc,
    uint64_t wait_ms, ngx_uint_t mask);
static ngx_int_t ngx_http_ratepool_suspend(ngx_http_request_t *r);
static ngx_int_t ngx_http_ratepool_decide(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static ngx_int_t ngx_http_ratepool_wait_or_refuse(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc, uint64_t wait_ms);
static ngx_int_t ngx_http_ratepool_go(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_resume(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static ngx_int_t ngx_http_ratepool_unshared(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_taken(void *data, ngx_int_t rc,
    uint64_t wait_ms, ngx_uint_t mask);
static ngx_int_t ngx_http_ratepool_try_admit(ngx_http_ratepool_ctx_t *ctx,
    uint64_t *wait_ms);
static uint64_t ngx_http_ratepool_peek(ngx_http_ratepool_ctx_t *ctx);
static ngx_int_t ngx_http_ratepool_refuse(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc, uint64_t wait_ms);
static uint64_t ngx_http_ratepool_workspace_wait(
    ngx_http_ratepool_ctx_t *ctx, uint64_t now_ms);
static ngx_int_t ngx_http_ratepool_budget_room(ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_limited_budget(ngx_http_ratepool_ctx_t *ctx,
    ngx_uint_t i, uint64_t budget);
static ngx_int_t ngx_http_ratepool_admit_workspace(
    ngx_http_ratepool_ctx_t *ctx, uint64_t *wait_ms);
static void ngx_http_ratepool_conversation_cost(ngx_http_ratepool_ctx_t *ctx,
    uint64_t now_ms);


/* what the wait queue calls back, set on each pool when it is configured */

const ngx_http_ratepool_wait_hooks_t  ngx_http_ratepool_admission_hooks = {
    ngx_http_ratepool_try_admit,
    ngx_http_ratepool_peek,
    ngx_http_ratepool_resume,
    ngx_http_ratepool_refuse
};


/*
 * On from a stop (the body read, a wait, Redis's answer): NGX_DECLINED
 * runs the phases on, NGX_DONE leaves the request to what it waits for,
 * anything else finalizes it.
 */

void
ngx_http_ratepool_proceed(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx,
    ngx_int_t rc)
{
    if (rc == NGX_DECLINED) {
        ctx->phase_rc = NGX_DECLINED;
        r->read_event_handler = ngx_http_block_reading;
        r->write_event_handler = ngx_http_core_run_phases;
        ngx_http_core_run_phases(r);
        return;
    }

    if (rc != NGX_DONE) {
        ngx_http_finalize_request(r, rc);
    }
}


/*
 * With the body in: admitted, waiting for room (ratepool_wait), or
 * answered.
 */

ngx_int_t
ngx_http_ratepool_admit(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx)
{
    if (ngx_http_ratepool_read_body(r, ctx) != NGX_OK
        || ngx_http_ratepool_resolve_classes(ctx) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* a fleet knows where a conversation's cache is: asked first */

    if (ctx->conversation
        && ctx->pool->zone->store->home(ctx, ngx_http_ratepool_home_known,
                                        ctx)
           == NGX_AGAIN)
    {
        return ngx_http_ratepool_suspend(r);
    }

    return ngx_http_ratepool_decide(r, ctx);
}


static void
ngx_http_ratepool_home_known(void *data, ngx_int_t rc, uint64_t wait_ms,
    ngx_uint_t mask)
{
    ngx_http_ratepool_ctx_t *ctx = data;

    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;
    c = r->connection;

    ngx_http_ratepool_proceed(r, ctx, ngx_http_ratepool_decide(r, ctx));
    ngx_http_run_posted_requests(c);
}


/* the request waits for the store's answer; a client that leaves ends it */

static ngx_int_t
ngx_http_ratepool_suspend(ngx_http_request_t *r)
{
    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return NGX_DONE;
}


/* admitted here (and by Redis), waiting, or answered */

static ngx_int_t
ngx_http_ratepool_decide(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t                       wait_ms;
    ngx_int_t                      rc;

    rc = ngx_http_ratepool_try_admit(ctx, &wait_ms);

    ngx_log_debug5(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "ratepool: admission %i for %uL input, %uL output "
                   "tokens; limited by %s, may fit in %uL ms", rc,
                   ctx->input_cost, ctx->output_cost,
                   rc == NGX_OK ? "nothing"
                   : ctx->limited_pool ? "the pool" : ctx->limited_what,
                   rc == NGX_OK ? 0 : wait_ms);

    if (rc == NGX_OK) {
        return ngx_http_ratepool_go(r, ctx);
    }

    return ngx_http_ratepool_wait_or_refuse(r, ctx, rc, wait_ms);
}


static ngx_int_t
ngx_http_ratepool_wait_or_refuse(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc, uint64_t wait_ms)
{
    uint64_t                       now_ms, left_ms;
    ngx_http_ratepool_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);

    /* a request that waited before has what is left of its wait */

    left_ms = rlcf->wait;

    if (ctx->wait_until_ms) {
        now_ms = ngx_http_ratepool_now_ms();
        left_ms = ctx->wait_until_ms > now_ms ? ctx->wait_until_ms - now_ms
                                              : 0;
    }

    if (rc == NGX_AGAIN && wait_ms <= left_ms
        && ngx_http_ratepool_wait(r, ctx, wait_ms) == NGX_OK)
    {
        ctx->shared.asks = 0;   /* the store may be asked again, after */

        if (ctx->limited_pool && !ctx->count_only) {
            /* what it waits for is held for it, unless held already */
            ngx_http_ratepool_claim(ctx, ctx->wait_until_ms, 0);
        }

        return NGX_DONE;
    }

    return ngx_http_ratepool_refuse(r, ctx, rc, wait_ms);
}


/*
 * Admitted by this gateway: with a Redis store, by every gateway too.
 * NGX_DECLINED: on with the phases; NGX_DONE: Redis is asked.
 */

static ngx_int_t
ngx_http_ratepool_go(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx)
{
    ngx_int_t  rc;

    if (!ctx->usage_added && ngx_http_ratepool_add_usage(r, ctx) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx->count_only) {
        /* nothing of the fleet's is taken: nothing to ask Redis */
        return NGX_DECLINED;
    }

    rc = ctx->pool->zone->store->take(ctx, ngx_http_ratepool_taken, ctx);

    if (rc == NGX_OK || rc == NGX_DECLINED) {
        /* taken, or the store is down and this gateway decides alone */
        return NGX_DECLINED;
    }

    if (rc == NGX_AGAIN) {
        return ngx_http_ratepool_suspend(r);
    }

    return ngx_http_ratepool_unshared(r, ctx);
}


/* admitted after a wait: on with the phases, from where it stopped */

static void
ngx_http_ratepool_resume(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx)
{
    ngx_http_ratepool_proceed(r, ctx, ngx_http_ratepool_go(r, ctx));
}


/* the shared store cannot be asked, and redis_fail=closed says: refuse */

static ngx_int_t
ngx_http_ratepool_unshared(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    ngx_http_ratepool_release(ctx, &ctx->held, 0);
    ctx->key = NULL;
    ngx_http_ratepool_refund_workspace(ctx, 1);

    return ngx_http_ratepool_reply_store_down(r);
}


/*
 * The shared store answered the request's take: NGX_OK taken,
 * NGX_DECLINED decided here alone, NGX_ERROR refused (the store is down),
 * NGX_AGAIN other gateways used the room (mask: whose).
 */

static void
ngx_http_ratepool_taken(void *data, ngx_int_t rc, uint64_t wait_ms,
    ngx_uint_t mask)
{
    ngx_http_ratepool_ctx_t *ctx = data;

    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;
    c = r->connection;

    if (rc == NGX_OK || rc == NGX_DECLINED) {
        rc = NGX_DECLINED;

    } else if (rc == NGX_ERROR) {
        rc = ngx_http_ratepool_unshared(r, ctx);

    } else {
        /*
         * Other gateways used the room: given back here, and decided
         * again, now that the zone knows what Redis said.
         */

        ngx_http_ratepool_release(ctx, &ctx->held, 0);
        ctx->key = NULL;
        ngx_http_ratepool_refund_workspace(ctx, 1);

        /* a refusal that says "no wait" would have it asked at once */
        wait_ms = ngx_max(wait_ms, RATEPOOL_SHARED_DENY_MS);

        rc = NGX_OK;

        if (mask & RATEPOOL_DENY_BUDGET) {
            rc = ngx_http_ratepool_check_budgets(r, ctx->pool,
                                                 ctx->workspace);
        }

        if (rc == NGX_OK && ctx->shared.takes >= RATEPOOL_SHARED_TAKES_MAX) {
            /*
             * Redis refuses, time and again, what this gateway finds room
             * for: the request is answered rather than asked for again.
             */
            ngx_log_error(NGX_LOG_WARN, c->log, 0,
                          "ratepool: redis refused a request %ui times "
                          "while the zone had room for it, it is answered "
                          "429", ctx->shared.takes);

            ctx->limited_pool = 1;
            rc = ngx_http_ratepool_refuse(r, ctx, NGX_AGAIN,
                                          ngx_max(wait_ms, 1000));

        } else if (rc == NGX_OK) {
            rc = (ctx->shared.asks < RATEPOOL_SHARED_ASKS_MAX)
                 ? ngx_http_ratepool_decide(r, ctx)
                 : ngx_http_ratepool_wait_or_refuse(r, ctx, NGX_AGAIN,
                                                    wait_ms);
        }
    }

    ngx_http_ratepool_proceed(r, ctx, rc);
    ngx_http_run_posted_requests(c);
}


/*
 * The workspace's buckets, then a key.  NGX_OK: a key is held.
 * NGX_AGAIN: the request may fit in *wait_ms.  NGX_ABORT: its input never
 * fits its workspace.  NGX_DECLINED: no key of the pool will take it.
 */

static ngx_int_t
ngx_http_ratepool_try_admit(ngx_http_ratepool_ctx_t *ctx, uint64_t *wait_ms)
{
    uint64_t                  soonest_ms, now_ms;
    ngx_int_t                 rc;
    ngx_http_ratepool_key_t  *key;

    ctx->limited_pool = 0;

    if (!ctx->count_only) {
        rc = ngx_http_ratepool_admit_workspace(ctx, wait_ms);

        if (rc != NGX_OK) {
            return rc;
        }
    }

    key = ngx_http_ratepool_acquire(ctx, &soonest_ms);

    if (key) {
        ctx->key = key;
        ctx->held = key;
        ctx->held_input = ctx->acquired_input;
        return NGX_OK;
    }

    /* the pool has nothing now: the workspace did not use its request */
    if (!ctx->count_only) {
        ngx_http_ratepool_refund_workspace(ctx, 1);
    }

    ctx->limited_pool = 1;

    if (soonest_ms == 0) {
        return NGX_DECLINED;
    }

    now_ms = ngx_http_ratepool_now_ms();

    if (ctx->waiting && !ctx->count_only) {
        /* its turn: what it needs is held for it */
        ngx_http_ratepool_claim(ctx, ctx->wait_until_ms, 1);

        if (ctx->claimed) {
            soonest_ms = ngx_http_ratepool_soonest(ctx);
        }
    }

    *wait_ms = soonest_ms > now_ms ? soonest_ms - now_ms : 0;

    return NGX_AGAIN;
}


/* when try_admit() might succeed, found without taking anything */

static uint64_t
ngx_http_ratepool_peek(ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t          now_ms, wait_ms, soonest_ms;
    ngx_slab_pool_t  *shpool;

    shpool = ctx->pool->zone->shpool;
    now_ms = ngx_http_ratepool_now_ms();

    ngx_shmtx_lock(&shpool->mutex);
    wait_ms = ngx_http_ratepool_workspace_wait(ctx, now_ms);
    ngx_shmtx_unlock(&shpool->mutex);

    soonest_ms = ngx_http_ratepool_soonest(ctx);

    return ngx_max(now_ms + wait_ms, soonest_ms);
}


/*
 * After an internal redirect to another pool: the workspace admitted the
 * request already, the new pool's keys have yet to.
 */

ngx_int_t
ngx_http_ratepool_admit_redirected(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t                  soonest_ms, now_ms;
    ngx_http_ratepool_key_t  *key;

    key = ngx_http_ratepool_acquire(ctx, &soonest_ms);

    if (key) {
        ctx->key = key;
        ctx->held = key;
        ctx->held_input = ctx->acquired_input;
        return NGX_DECLINED;
    }

    ctx->limited_pool = 1;

    if (soonest_ms == 0) {
        return ngx_http_ratepool_refuse(r, ctx, NGX_DECLINED, 0);
    }

    now_ms = ngx_http_ratepool_now_ms();

    return ngx_http_ratepool_refuse(r, ctx, NGX_AGAIN,
                                    soonest_ms > now_ms ? soonest_ms - now_ms
                                                        : 0);
}


/*
 * Whether a request every key refused after it was sent may wait for
 * one again: with ratepool_wait, and if a key frees up before the
 * request's first deadline, the one it had when it arrived.  A request
 * sent to another pool by an error page cannot wait, and one that an
 * error page would send there does not.
 */

ngx_uint_t
ngx_http_ratepool_may_requeue(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t                       until_ms;
    ngx_uint_t                     i;
    ngx_http_err_page_t           *page;
    ngx_http_core_loc_conf_t      *clcf;
    ngx_http_ratepool_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);

    if (rlcf->wait == 0 || ctx->redirected || ctx->soonest_ms == 0
        || ctx->count_only || r != ctx->request || r->connection->error)
    {
        return 0;
    }

    /* an error page for it (proxy_intercept_errors) is the user's way on */

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (r->upstream->conf->intercept_errors && clcf->error_pages) {
        page = clcf->error_pages->elts;

        for (i = 0; i < clcf->error_pages->nelts; i++) {
            if (page[i].status == NGX_HTTP_TOO_MANY_REQUESTS) {
                return 0;
            }
        }
    }

    until_ms = ctx->wait_until_ms ? ctx->wait_until_ms
                                  : ctx->arrived_ms + rlcf->wait;

    return ctx->soonest_ms <= until_ms;
}


/*
 * Back into the queue, as if it had not been admitted: the workspace
 * gives back what it held for the request and charges it again when a
 * key has room.
 */

ngx_int_t
ngx_http_ratepool_requeue(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t                       now_ms;
    ngx_http_ratepool_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);

    ctx->pool->zone->store->requeue(ctx);
    ngx_http_ratepool_refund_workspace(ctx, 1);

    ngx_shmtx_lock(&ctx->pool->zone->shpool->mutex);
    ctx->pool->sh->requeued++;
    ngx_shmtx_unlock(&ctx->pool->zone->shpool->mutex);

    ctx->requeued++;
    ctx->key = NULL;
    ctx->tried = 0;
    ctx->round_tries = 0;
    ctx->answered = 0;
    ctx->exhausted = 0;
    ctx->limited_pool = 1;
    ctx->phase_rc = NGX_DONE;

    if (ctx->wait_until_ms == 0) {
        ctx->wait_until_ms = ctx->arrived_ms + rlcf->wait;
    }

    now_ms = ngx_http_ratepool_now_ms();

    return ngx_http_ratepool_wait_or_refuse(r, ctx, NGX_AGAIN,
                                            ctx->soonest_ms > now_ms
                                            ? ctx->soonest_ms - now_ms : 0);
}


/* answers a request that cannot go, the way try_admit() said */

static ngx_int_t
ngx_http_ratepool_refuse(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx,
    ngx_int_t rc, uint64_t wait_ms)
{
    u_char                         *amount, buf[64];
    time_t                          until;
    ngx_slab_pool_t                *shpool;
    ngx_http_ratepool_pool_t       *pool;
    ngx_http_ratepool_workspace_t  *ws;

    pool = ctx->pool;
    ws = ctx->workspace;
    shpool = pool->zone->shpool;

    ngx_http_ratepool_unclaim(ctx);

    if (rc == NGX_DONE) {
        /* its budget was spent, by requests in flight while it waited */
        rc = ngx_http_ratepool_check_budgets(r, pool, ws);

        if (rc != NGX_OK) {
            return rc;
        }

        /* a new period began a moment ago */
        rc = NGX_AGAIN;
    }

    if (ctx->limited_budget) {
        (void) ngx_atomic_fetch_add(&pool->zone->sh->rejected_workspace, 1);

        ngx_shmtx_lock(&shpool->mutex);
        ws->sh->rejected++;
        ngx_shmtx_unlock(&shpool->mutex);

        amount = ngx_http_ratepool_amount(buf, buf + sizeof(buf),
                                          ctx->budget_limit,
                                          ctx->limited_money);

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "ratepool: workspace \"%V\" is too near its %s "
                      "budget of %*s for a request while others are in "
                      "flight", &ws->name, ctx->limited_what,
                      (size_t) (amount - buf), buf);

        return ngx_http_ratepool_reply_budget_busy(r, ws, ctx->limited_what,
                                                   ctx->budget_limit,
                                                   ctx->limited_money,
                                                   wait_ms);
    }

    if (ctx->limited_pool) {
        (void) ngx_atomic_fetch_add(&pool->zone->sh->rejected_pool, 1);

    } else {
        (void) ngx_atomic_fetch_add(&pool->zone->sh->rejected_workspace, 1);

        ngx_shmtx_lock(&shpool->mutex);
        ws->sh->rejected++;
        ngx_shmtx_unlock(&shpool->mutex);

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "ratepool: workspace \"%V\" is over %ui %s per minute",
                      &ws->name, ctx->limited_limit, ctx->limited_what);
    }

    if (rc == NGX_ABORT) {
        return ngx_http_ratepool_reply_too_big(r, ws, ctx->input_cost,
                                               ctx->limited_limit);
    }

    if (rc == NGX_DECLINED && ngx_http_ratepool_pool_spent(pool, &until)) {
        return ngx_http_ratepool_reply_spent(r, pool, until);
    }

    if (rc == NGX_DECLINED) {
        return ngx_http_ratepool_reply_no_key(r, pool);
    }

    if (ctx->limited_pool) {
        return ngx_http_ratepool_reply_pool_full(r, pool, wait_ms);
    }

    return ngx_http_ratepool_reply_workspace_full(r, ws, ctx->limited_what,
                                                  ctx->limited_limit,
                                                  wait_ms);
}


/*
 * With the zone locked: how long until the request's tokens fit beside
 * the workspace's reservations and it has a request in its bucket, and
 * which bucket it waits for.
 */

static uint64_t
ngx_http_ratepool_workspace_wait(ngx_http_ratepool_ctx_t *ctx,
    uint64_t now_ms)
{
    uint64_t                           wait_in, wait_out, wait_rpm;
    ngx_http_ratepool_zone_t          *zone;
    ngx_http_ratepool_workspace_t     *ws;
    ngx_http_ratepool_workspace_sh_t  *sh;

    ws = ctx->workspace;
    sh = ws->sh;
    zone = ctx->pool->zone;

    wait_in = ratepool_bucket_fit_ms(&sh->lim.bucket[RATEPOOL_ITPM],
                                     ngx_http_ratepool_share(zone, ws->itpm),
                                     ctx->input_cost, sh->lim.reserved_input,
                                     now_ms);
    wait_out = ratepool_bucket_fit_ms(&sh->lim.bucket[RATEPOOL_OTPM],
                                      ngx_http_ratepool_share(zone, ws->otpm),
                                      ctx->output_cost, sh->lim.reserved_output,
                                      now_ms);

    if (wait_in || wait_out) {
        if (wait_in >= wait_out) {
            ctx->limited_what = "input tokens";
            ctx->limited_limit = ws->itpm;
            return wait_in;
        }

        ctx->limited_what = "output tokens";
        ctx->limited_limit = ws->otpm;
        return wait_out;
    }

    ctx->limited_what = "requests";
    ctx->limited_limit = ws->rpm;

    wait_rpm = ratepool_bucket_wait_ms(&sh->lim.bucket[RATEPOOL_RPM],
                                       ngx_http_ratepool_share(zone, ws->rpm),
                                       1, now_ms);

    /* other gateways used the workspace's room, as Redis said */
    if (ngx_http_ratepool_busy(sh, now_ms)
        && sh->lim.busy_until_ms > now_ms + wait_rpm)
    {
        wait_rpm = sh->lim.busy_until_ms - now_ms;
    }

    return wait_rpm;
}


/*
 * With the zone locked: whether a request fits in its workspace's day's
 * and month's budgets beside the requests in flight, each reserving all
 * it may use (its whole prompt and its output cap), so that requests at
 * once cannot overrun a budget by more than one of them uses.  Past a
 * budget: NGX_DONE; too near it for this request while others are in
 * flight: NGX_AGAIN, until one of them ends.  Near a budget, a workspace's
 * requests go one at a time.
 */

static ngx_int_t
ngx_http_ratepool_budget_room(ngx_http_ratepool_ctx_t *ctx)
{
    time_t                             now;
    uint64_t                           used[4], budget[4], reserved[4],
                                       cost[4], output;
    ngx_uint_t                         i;
    ngx_http_ratepool_price_t         *price;
    ngx_http_ratepool_workspace_t     *ws;
    ngx_http_ratepool_workspace_sh_t  *sh;

    ws = ctx->workspace;
    sh = ws->sh;
    now = ngx_time();

    output = ctx->output_cap ? ctx->output_cap : ctx->output_cost;
    ctx->budget_cost = ctx->input_full + output;

    /* in money, at the model's prices, all its input as if uncached */
    price = ngx_http_ratepool_price_of(ctx);
    ctx->money_cost = price ? ratepool_price_cost(&price->price,
                                                  ctx->input_full, output,
                                                  0, 0)
                            : 0;

    /* tokens a day and a month, then dollars */
    budget[0] = ws->daily_tokens;
    budget[1] = ws->monthly_tokens;
    budget[2] = ws->daily_cost;
    budget[3] = ws->monthly_cost;
    used[0] = ratepool_budget_used(&sh->today, RATEPOOL_BUDGET_DAY, now);
    used[1] = ratepool_budget_used(&sh->this_month, RATEPOOL_BUDGET_MONTH,
                                   now);
    used[2] = ratepool_budget_used(&sh->cost_today, RATEPOOL_BUDGET_DAY, now);
    used[3] = ratepool_budget_used(&sh->cost_this_month,
                                   RATEPOOL_BUDGET_MONTH, now);
    reserved[0] = reserved[1] = sh->budget_reserved;
    reserved[2] = reserved[3] = sh->cost_reserved;
    cost[0] = cost[1] = ctx->budget_cost;
    cost[2] = cost[3] = ctx->money_cost;

    for (i = 0; i < 4; i++) {
        if (budget[i] && used[i] >= budget[i]) {
            ngx_http_ratepool_limited_budget(ctx, i, budget[i]);
            return NGX_DONE;
        }
    }

    for (i = 0; i < 4; i++) {
        if (budget[i] && reserved[i]
            && used[i] + reserved[i] + cost[i] > budget[i])
        {
            ctx->limited_budget = 1;
            ngx_http_ratepool_limited_budget(ctx, i, budget[i]);
            return NGX_AGAIN;
        }
    }

    return NGX_OK;
}


/* budget i of ngx_http_ratepool_budget_room(): which, and how much */

static void
ngx_http_ratepool_limited_budget(ngx_http_ratepool_ctx_t *ctx, ngx_uint_t i,
    uint64_t budget)
{
    ctx->limited_what = (i & 1) ? "monthly" : "daily";
    ctx->limited_money = (i >= 2);
    ctx->budget_limit = budget;
}


/*
 * A request takes one from the workspace's requests and reserves its
 * estimated tokens until it ends, when what it really used is charged:
 * it is admitted if its cost fits beside the reservations of the
 * workspace's requests in flight.  NGX_AGAIN: not now, NGX_ABORT: its
 * input never fits.
 */

static ngx_int_t
ngx_http_ratepool_admit_workspace(ngx_http_ratepool_ctx_t *ctx,
    uint64_t *wait_ms)
{
    uint64_t                           now_ms, taken_ms;
    ngx_int_t                          rc;
    ngx_slab_pool_t                   *shpool;
    ngx_http_ratepool_workspace_t     *ws;
    ngx_http_ratepool_workspace_sh_t  *sh;

    ws = ctx->workspace;
    shpool = ctx->pool->zone->shpool;
    sh = ws->sh;
    now_ms = ngx_http_ratepool_now_ms();

    ngx_shmtx_lock(&shpool->mutex);

    /*
     * A conversation's turn is estimated at its whole prompt (what it
     * costs where nothing of it is cached); other requests at what the
     * workspace's requests were counted.
     */

    if (ctx->body_bytes) {
        ctx->input_cost = ratepool_estimate_input(ctx->body_bytes,
                                                  ctx->conversation
                                                  ? sh->prompt_rate
                                                  : sh->input_rate);
    }

    /*
     * Providers count output as it is produced, and let a request that
     * started go on into debt: what the workspace's answers produce is
     * reserved, not all a request may, which would leave most of the
     * output limit reserved and unused.
     */

    ctx->output_cost = ratepool_estimate_output(sh->output_avg,
                                                ctx->output_cap);

    ngx_http_ratepool_conversation_cost(ctx, now_ms);

    *wait_ms = 0;
    ctx->limited_budget = 0;

    if (ngx_http_ratepool_has_budget(ws)) {
        rc = ngx_http_ratepool_budget_room(ctx);

        if (rc != NGX_OK) {
            *wait_ms = RATEPOOL_BUDGET_WAIT_MS;
            goto done;
        }
    }

    ctx->limited_what = "input tokens";
    ctx->limited_limit = ws->itpm;

    if (ws->itpm && ctx->input_cost > ws->itpm) {
        rc = NGX_ABORT;
        goto done;
    }

    *wait_ms = ngx_http_ratepool_workspace_wait(ctx, now_ms);

    if (*wait_ms) {
        rc = NGX_AGAIN;
        goto done;
    }

    /* there is a request in the bucket: the wait above says so */
    (void) ratepool_bucket_take(&sh->lim.bucket[RATEPOOL_RPM],
                                ngx_http_ratepool_share(ctx->pool->zone,
                                                        ws->rpm),
                                1, now_ms, &taken_ms);

    rc = NGX_OK;
    sh->admitted++;
    sh->lim.reserved_input += ctx->input_cost;
    sh->lim.reserved_output += ctx->output_cost;
    sh->budget_reserved += ctx->budget_cost;
    sh->cost_reserved += ctx->money_cost;
    ctx->ws_reserved = 1;

done:

    ngx_shmtx_unlock(&shpool->mutex);

    return rc;
}


/*
 * With the zone locked: what the request's input costs where its cache
 * is, and anywhere else (ngx_http_ratepool_input_at()).  A turn of a
 * conversation with a home costs that org only what is new since its
 * last turn, and the workspace is charged that, as it will most likely
 * go there; a first turn costs its whole prompt, less its tools and
 * system where another conversation keeps them warm.
 */

static void
ngx_http_ratepool_conversation_cost(ngx_http_ratepool_ctx_t *ctx,
    uint64_t now_ms)
{
    uint64_t                   full, cost;
    ngx_http_ratepool_home_t  *home;

    ctx->home = NULL;
    ctx->input_full = ctx->input_cost;
    ctx->input_prefix = 0;

    if (ctx->conversation == 0 || ctx->body_bytes == 0) {
        return;
    }

    ctx->input_prefix = ngx_min(ratepool_estimate_input(ctx->prefix_bytes,
                                         ctx->workspace->sh->prompt_rate),
                                ctx->input_full);

    home = ngx_http_ratepool_home_find(ctx->pool->zone, ctx->conversation,
                                       now_ms);

    if (home && ratepool_home_cost(&home->last, ctx->body_bytes, 0, &full,
                                   &cost))
    {
        ctx->home = home->org;
        ctx->input_full = full;
        ctx->input_cost = cost;
        ctx->input_prefix = ngx_min(ctx->input_prefix, full);
    }

    ngx_log_debug5(NGX_LOG_DEBUG_HTTP, ctx->request->connection->log, 0,
                   "ratepool: a turn of %uL bytes, %uL of them its prefix: "
                   "%uL input tokens at home, %uL elsewhere, %uL of them "
                   "the prefix", ctx->body_bytes, ctx->prefix_bytes,
                   ctx->input_cost, ctx->input_full, ctx->input_prefix);
}


/*
 * A workspace over its daily or monthly token budget is told so the way
 * a provider tells of a spend cap: no retry-after, x-should-retry: false
 * and enforced_spend_limit_reached, so that clients stop rather than
 * retry, and when the budget resets.
 */

ngx_int_t
ngx_http_ratepool_check_budgets(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool, ngx_http_ratepool_workspace_t *ws)
{
    int          kind;
    time_t       now;
    uint64_t     used[4], budget[4];
    ngx_uint_t   i, over;

    now = ngx_time();

    /* a month's budget first: it is the one that lasts */
    budget[0] = ws->monthly_tokens;
    budget[1] = ws->daily_tokens;
    budget[2] = ws->monthly_cost;
    budget[3] = ws->daily_cost;

    ngx_shmtx_lock(&pool->zone->shpool->mutex);

    used[0] = ratepool_budget_used(&ws->sh->this_month, RATEPOOL_BUDGET_MONTH,
                                   now);
    used[1] = ratepool_budget_used(&ws->sh->today, RATEPOOL_BUDGET_DAY, now);
    used[2] = ratepool_budget_used(&ws->sh->cost_this_month,
                                   RATEPOOL_BUDGET_MONTH, now);
    used[3] = ratepool_budget_used(&ws->sh->cost_today, RATEPOOL_BUDGET_DAY,
                                   now);

    for (i = 0; i < 4; i++) {
        if (budget[i] && used[i] >= budget[i]) {
            break;
        }
    }

    over = (i < 4);

    if (over) {
        ws->sh->rejected++;
    }

    ngx_shmtx_unlock(&pool->zone->shpool->mutex);

    if (!over) {
        return NGX_OK;
    }

    (void) ngx_atomic_fetch_add(&pool->zone->sh->rejected_workspace, 1);

    kind = (i & 1) ? RATEPOOL_BUDGET_DAY : RATEPOOL_BUDGET_MONTH;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "ratepool: workspace \"%V\" is over its %s %s budget",
                  &ws->name, kind == RATEPOOL_BUDGET_DAY ? "daily" : "monthly",
                  i >= 2 ? "spending" : "token");

    return ngx_http_ratepool_reply_over_budget(r, ws,
                                 kind == RATEPOOL_BUDGET_DAY ? "daily"
                                                             : "monthly",
                                 budget[i], i >= 2,
                                 ratepool_budget_reset(kind, now));
}


/*
 * Gives back the workspace's reservation, once the request's usage is
 * charged or it has ended, and its request if it was not used.
 */

void
ngx_http_ratepool_refund_workspace(ngx_http_ratepool_ctx_t *ctx,
    ngx_uint_t request)
{
    ngx_slab_pool_t                   *shpool;
    ngx_http_ratepool_workspace_t     *ws;
    ngx_http_ratepool_workspace_sh_t  *sh;

    if (!ctx->ws_reserved && !request) {
        return;
    }

    ws = ctx->workspace;
    sh = ws->sh;
    shpool = ctx->pool->zone->shpool;

    ngx_shmtx_lock(&shpool->mutex);

    if (ctx->ws_reserved) {
        sh->lim.reserved_input -= ngx_min(ctx->input_cost,
                                          sh->lim.reserved_input);
        sh->lim.reserved_output -= ngx_min(ctx->output_cost,
                                           sh->lim.reserved_output);
        sh->budget_reserved -= ngx_min(ctx->budget_cost,
                                       sh->budget_reserved);
        sh->cost_reserved -= ngx_min(ctx->money_cost, sh->cost_reserved);
    }

    if (request) {
        if (ws->rpm) {
            ratepool_bucket_put(&sh->lim.bucket[RATEPOOL_RPM], ws->rpm, 1);
        }

        sh->admitted--;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ctx->ws_reserved = 0;

    if (!request) {
        ngx_http_ratepool_wake(ctx->pool);
    }
}

