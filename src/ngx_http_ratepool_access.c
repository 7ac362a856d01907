
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/crypto.h>

#include "ngx_http_ratepool_module.h"


static ngx_int_t ngx_http_ratepool_token_matches(
    ngx_http_ratepool_main_conf_t *rmcf, u_char *token, size_t len,
    ngx_uint_t *workspace);
static ngx_http_ratepool_workspace_t *ngx_http_ratepool_identify(
    ngx_http_request_t *r, ngx_http_ratepool_main_conf_t *rmcf);
static void ngx_http_ratepool_body_read(ngx_http_request_t *r);
static ngx_int_t ngx_http_ratepool_read_body(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static ngx_int_t ngx_http_ratepool_decide(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static ngx_int_t ngx_http_ratepool_wait_or_refuse(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc, uint64_t wait_ms);
static void ngx_http_ratepool_find_object(ngx_http_ratepool_ctx_t *ctx,
    u_char *data, size_t len);
static ngx_chain_t *ngx_http_ratepool_chain_link(ngx_pool_t *pool,
    ngx_buf_t *b, ngx_chain_t *next);
static ngx_int_t ngx_http_ratepool_add_usage(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static ngx_int_t ngx_http_ratepool_unshared(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static ngx_int_t ngx_http_ratepool_admit(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static uint64_t ngx_http_ratepool_workspace_wait(
    ngx_http_ratepool_ctx_t *ctx, uint64_t now_ms);
static ngx_int_t ngx_http_ratepool_admit_workspace(
    ngx_http_ratepool_ctx_t *ctx, uint64_t *wait_ms);
static ngx_int_t ngx_http_ratepool_check_budgets(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool, ngx_http_ratepool_workspace_t *ws);
static ngx_int_t ngx_http_ratepool_reject(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, ngx_str_t *message,
    const char *error_code, ngx_uint_t retry_after_sec,
    ngx_int_t should_retry);
static ngx_int_t ngx_http_ratepool_reject_limited(ngx_http_request_t *r,
    ngx_str_t *message, uint64_t wait_ms);
static ngx_int_t ngx_http_ratepool_first_key(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_cleanup(void *data);
static ngx_buf_t *ngx_http_ratepool_openai_error_body(ngx_http_request_t *r,
    const char *type, ngx_str_t *message, uintptr_t escape,
    const char *error_code);


ngx_int_t
ngx_http_ratepool_access_handler(ngx_http_request_t *r)
{
    ngx_int_t                       rc;
    ngx_str_t                       msg;
    ngx_pool_cleanup_t             *cln;
    ngx_http_ratepool_ctx_t        *ctx;
    ngx_http_ratepool_pool_t       *pool;
    ngx_http_ratepool_loc_conf_t   *rlcf;
    ngx_http_ratepool_main_conf_t  *rmcf;
    ngx_http_ratepool_workspace_t  *ws;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);

    if (rlcf->pool == NULL || r != r->main) {
        return NGX_DECLINED;
    }

    pool = rlcf->pool;
    ctx = ngx_http_ratepool_get_ctx(r);

    if (ctx) {
        /*
         * The phase runs again once the body is read, and after an
         * internal redirect, when the workspace was charged already.  A
         * redirect to another pool gives back what the first one held
         * and starts afresh in the new one.
         */

        if (ctx->phase_rc != NGX_DECLINED) {
            /*
             * An error page of a request that was never admitted (its
             * body could not be read, say): no key is chosen for it.
             */
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "ratepool: a request that was not admitted was "
                          "redirected to a pool");
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (ctx->pool == pool) {
            return NGX_DECLINED;
        }

        ngx_http_ratepool_release(ctx, &ctx->held, 0);
        ngx_http_ratepool_release(ctx, &ctx->next, 0);

        ctx->pool = pool;
        ctx->key = NULL;
        ctx->tried = 0;
        ctx->tries = 0;
        ctx->retry_same = 0;
        ctx->answered = 0;
        ctx->exhausted = 0;
        ctx->refused = 0;
        ctx->spent = 0;
        ctx->overloaded = 0;
        ctx->too_large = 0;
        ctx->soonest_ms = 0;

        if (ngx_http_ratepool_resolve_classes(ctx) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_ratepool_first_key(r, ctx);
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);

    (void) ngx_atomic_fetch_add(&pool->zone->sh->requests, 1);

    ws = ngx_http_ratepool_identify(r, rmcf);

    if (ws == NULL) {
        (void) ngx_atomic_fetch_add(&pool->zone->sh->rejected_auth, 1);
        ngx_str_set(&msg, "invalid gateway token: send the token this "
                          "gateway issued as x-api-key or as "
                          "Authorization: Bearer");
        return ngx_http_ratepool_reject(r, NGX_HTTP_UNAUTHORIZED,
                                        "authentication_error", &msg, NULL,
                                        0, 0);
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_ratepool_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->pool = pool;
    ctx->workspace = ws;
    ctx->phase_rc = NGX_DONE;

    /* whatever this request holds is given back however it ends */
    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_ratepool_cleanup;
    cln->data = ctx;

    ngx_http_set_ctx(r, ctx, ngx_http_ratepool_module);

    if (ws->daily_tokens || ws->monthly_tokens) {
        rc = ngx_http_ratepool_check_budgets(r, pool, ws);

        if (rc != NGX_OK) {
            /* NGX_DONE: answered; else the body could not be discarded */
            return rc;
        }
    }

    /*
     * The cost of a request is in its body: read it first, as the mirror
     * module does, and go on with the phases once it is in.
     */

    rc = ngx_http_read_client_request_body(r, ngx_http_ratepool_body_read);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    ngx_http_finalize_request(r, NGX_DONE);

    return NGX_DONE;
}


static void
ngx_http_ratepool_body_read(ngx_http_request_t *r)
{
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_ratepool_get_ctx(r);

    ngx_http_ratepool_proceed(r, ctx, ngx_http_ratepool_admit(r, ctx));
}


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


/* the model and the output cap, from a body in memory or in a file */

static ngx_int_t
ngx_http_ratepool_read_body(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    off_t                          offset;
    size_t                         size;
    ssize_t                        n;
    u_char                        *chunk;
    ngx_buf_t                     *b;
    ngx_chain_t                   *cl;
    ratepool_request_t             rq;
    ngx_http_ratepool_loc_conf_t  *rlcf;

    ratepool_request_init(&rq);
    chunk = NULL;
    ctx->body_object_at = -1;

    for (cl = r->request_body ? r->request_body->bufs : NULL;
         cl;
         cl = cl->next)
    {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            ngx_http_ratepool_find_object(ctx, b->pos, b->last - b->pos);
            ratepool_request_feed(&rq, b->pos, b->last - b->pos);
            ctx->body_bytes += b->last - b->pos;
            continue;
        }

        if (!b->in_file) {
            continue;
        }

        /* a large body was written to a temporary file a moment ago */

        if (chunk == NULL) {
            chunk = ngx_palloc(r->pool, 65536);
            if (chunk == NULL) {
                return NGX_ERROR;
            }
        }

        for (offset = b->file_pos; offset < b->file_last; offset += n) {
            size = (size_t) ngx_min(b->file_last - offset, 65536);

            n = ngx_read_file(b->file, chunk, size, offset);

            if (n <= 0) {
                ngx_pfree(r->pool, chunk);
                return NGX_ERROR;
            }

            ngx_http_ratepool_find_object(ctx, chunk, n);
            ratepool_request_feed(&rq, chunk, n);
            ctx->body_bytes += n;
        }
    }

    if (chunk) {
        ngx_pfree(r->pool, chunk);
    }

    ctx->stream = rq.stream;
    ctx->stream_options = rq.stream_options;
    ctx->body_whole = ratepool_request_whole(&rq);

    if (rq.model_len) {
        ctx->model.data = ngx_pnalloc(r->pool, rq.model_len);
        if (ctx->model.data == NULL) {
            return NGX_ERROR;
        }

        ctx->model.len = rq.model_len;
        ngx_memcpy(ctx->model.data, rq.model, rq.model_len);
    }

    /*
     * Output is reserved up to the request's own cap, or the configured
     * one; a request that asks for no model (a listing, say) asks for
     * no output.
     */

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);

    if (rq.has_max_tokens) {
        ctx->output_cost = ngx_min(rq.max_tokens,
                                   (uint64_t) rlcf->output_reserve);

    } else if (rq.model_len) {
        ctx->output_cost = rlcf->output_reserve;
    }

    return NGX_OK;
}


/*
 * With the body in: admitted, waiting for room (ratepool_wait), or
 * answered.
 */

static ngx_int_t
ngx_http_ratepool_admit(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx)
{
    if (ngx_http_ratepool_read_body(r, ctx) != NGX_OK
        || ngx_http_ratepool_resolve_classes(ctx) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_ratepool_decide(r, ctx);
}


/* admitted here (and by Redis), waiting, or answered */

static ngx_int_t
ngx_http_ratepool_decide(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t                       wait_ms;
    ngx_int_t                      rc;

    rc = ngx_http_ratepool_try_admit(ctx, &wait_ms);

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
        return NGX_DONE;
    }

    return ngx_http_ratepool_refuse(r, ctx, rc, wait_ms);
}


/*
 * Admitted by this gateway: with a Redis store, by every gateway too.
 * NGX_DECLINED: on with the phases; NGX_DONE: Redis is asked.
 */

ngx_int_t
ngx_http_ratepool_go(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx)
{
    ngx_int_t                       rc;
    ngx_http_ratepool_main_conf_t  *rmcf;

    if (!ctx->usage_added && ngx_http_ratepool_add_usage(r, ctx) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);

    if (rmcf->redis == NULL) {
        return NGX_DECLINED;
    }

    rc = ngx_http_ratepool_shared_take(ctx);

    if (rc == NGX_OK) {
        /* on the copy of Redis's buckets */
        return NGX_DECLINED;
    }

    if (rc == NGX_AGAIN) {
        /* a client that leaves meanwhile ends the request */
        r->read_event_handler = ngx_http_test_reading;
        r->write_event_handler = ngx_http_request_empty_handler;

        if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return NGX_DONE;
    }

    return ngx_http_ratepool_unshared(r, ctx);
}


/* where the body's object begins: its first "{", as the body is whole */

static void
ngx_http_ratepool_find_object(ngx_http_ratepool_ctx_t *ctx, u_char *data,
    size_t len)
{
    u_char  *p;

    if (ctx->body_object_at >= 0) {
        return;
    }

    p = ngx_strlchr(data, data + len, '{');

    if (p) {
        ctx->body_object_at = (off_t) (ctx->body_bytes + (p - data));
    }
}


/*
 * OpenAI streams report usage only when asked (stream_options.include_
 * usage): the gateway asks for a client that did not, so that it can
 * count what the stream used, and keeps the extra chunk from that client
 * (ngx_http_ratepool_body_filter).  '"stream_options":{"include_usage":
 * true},' goes in after the body's first "{"; the rest is untouched.
 */

static ngx_int_t
ngx_http_ratepool_add_usage(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    off_t         at;
    ngx_buf_t    *b, *head, *option, *rest;
    ngx_chain_t  *cl;

    static u_char  text[] = "\"stream_options\":{\"include_usage\":true},";

    if (ctx->key == NULL || ctx->key->dialect != RATEPOOL_DIALECT_OPENAI
        || !ctx->stream || ctx->stream_options || !ctx->body_whole
        || ctx->body_object_at < 0
        || r->headers_in.content_length_n < 0
        || r->request_body == NULL || r->request_body->bufs == NULL
        || !ratepool_openai_path(r->uri.data, r->uri.len))
    {
        return NGX_OK;
    }

    b = r->request_body->bufs->buf;
    at = ctx->body_object_at;

    /*
     * The body's first buffer, in memory or in a temporary file (a large
     * body is written there whole), is cut after the "{" it holds.  A
     * re-send rewinds a memory buffer to its start, and file buffers to
     * where the one before ended, so each part is a buffer of its own.
     */

    if (b->in_file ? (ngx_buf_in_memory(b) || b->file_pos != 0
                      || at >= b->file_last)
                   : (!ngx_buf_in_memory(b) || at >= b->last - b->pos))
    {
        return NGX_OK;
    }

    head = ngx_calloc_buf(r->pool);
    option = ngx_calloc_buf(r->pool);
    rest = ngx_calloc_buf(r->pool);

    if (head == NULL || option == NULL || rest == NULL) {
        return NGX_ERROR;
    }

    *head = *b;
    *rest = *b;

    head->last_buf = 0;
    head->last_in_chain = 0;

    if (b->in_file) {
        head->file_last = at + 1;
        rest->file_pos = at + 1;

    } else {
        /* the buffer may begin before the body, in the client's header */
        head->start = b->pos;
        head->last = b->pos + at + 1;
        head->end = head->last;
        rest->start = head->last;
        rest->pos = head->last;
    }

    option->memory = 1;
    option->start = text;
    option->pos = text;
    option->last = text + sizeof(text) - 1;
    option->end = option->last;

    cl = ngx_http_ratepool_chain_link(r->pool, rest,
                                      r->request_body->bufs->next);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl = ngx_http_ratepool_chain_link(r->pool, option, cl);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl = ngx_http_ratepool_chain_link(r->pool, head, cl);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    r->request_body->bufs = cl;
    r->headers_in.content_length_n += sizeof(text) - 1;

    ctx->usage_added = 1;

    return NGX_OK;
}


static ngx_chain_t *
ngx_http_ratepool_chain_link(ngx_pool_t *pool, ngx_buf_t *b,
    ngx_chain_t *next)
{
    ngx_chain_t  *cl;

    cl = ngx_alloc_chain_link(pool);
    if (cl == NULL) {
        return NULL;
    }

    cl->buf = b;
    cl->next = next;

    return cl;
}


/* Redis did not answer for this request: redis_fail= says what follows */

static ngx_int_t
ngx_http_ratepool_unshared(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    ngx_str_t                       msg;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);

    (void) ngx_atomic_fetch_add(&ctx->pool->zone->sh->redis_fallbacks, 1);

    if (rmcf->redis->fail != RATEPOOL_REDIS_FAIL_CLOSED) {
        return NGX_DECLINED;
    }

    ngx_http_ratepool_release(ctx, &ctx->held, 0);
    ctx->key = NULL;
    ngx_http_ratepool_refund_workspace(ctx, 1);

    ngx_str_set(&msg, "the gateway cannot reach the rate-limit store it "
                      "shares with other gateways; try again shortly");

    return ngx_http_ratepool_reject(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                    "api_error", &msg, NULL, 5, 1);
}


/* Redis answered the request's take (ngx_http_ratepool_shared.c) */

void
ngx_http_ratepool_shared_done(ngx_http_ratepool_ctx_t *ctx, ngx_int_t rc,
    uint64_t wait_ms, ngx_uint_t mask)
{
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;
    c = r->connection;

    if (rc == NGX_OK) {
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

        rc = NGX_OK;

        if (mask & RATEPOOL_DENY_BUDGET) {
            rc = ngx_http_ratepool_check_budgets(r, ctx->pool,
                                                 ctx->workspace);
        }

        if (rc == NGX_OK) {
            rc = (ctx->shared_asks < RATEPOOL_SHARED_ASKS_MAX)
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

ngx_int_t
ngx_http_ratepool_try_admit(ngx_http_ratepool_ctx_t *ctx, uint64_t *wait_ms)
{
    uint64_t                  soonest_ms, now_ms;
    ngx_int_t                 rc;
    ngx_http_ratepool_key_t  *key;

    ctx->limited_pool = 0;

    rc = ngx_http_ratepool_admit_workspace(ctx, wait_ms);

    if (rc != NGX_OK) {
        return rc;
    }

    key = ngx_http_ratepool_acquire(ctx, &soonest_ms);

    if (key) {
        ctx->key = key;
        ctx->held = key;
        return NGX_OK;
    }

    /* the pool has nothing now: the workspace did not use its request */
    ngx_http_ratepool_refund_workspace(ctx, 1);

    ctx->limited_pool = 1;

    if (soonest_ms == 0) {
        return NGX_DECLINED;
    }

    now_ms = ngx_http_ratepool_now_ms();
    *wait_ms = soonest_ms > now_ms ? soonest_ms - now_ms : 0;

    return NGX_AGAIN;
}


/* when try_admit() might succeed, found without taking anything */

uint64_t
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

static ngx_int_t
ngx_http_ratepool_first_key(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t                  soonest_ms, now_ms;
    ngx_http_ratepool_key_t  *key;

    key = ngx_http_ratepool_acquire(ctx, &soonest_ms);

    if (key) {
        ctx->key = key;
        ctx->held = key;
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


/* answers a request that cannot go, the way try_admit() said */

ngx_int_t
ngx_http_ratepool_refuse(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx,
    ngx_int_t rc, uint64_t wait_ms)
{
    time_t                          until;
    ngx_tm_t                        tm;
    ngx_str_t                       msg;
    ngx_slab_pool_t                *shpool;
    ngx_http_ratepool_pool_t       *pool;
    ngx_http_ratepool_workspace_t  *ws;
    u_char                          buf[320];

    pool = ctx->pool;
    ws = ctx->workspace;
    shpool = pool->zone->shpool;
    msg.data = buf;

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
        msg.len = ngx_snprintf(buf, sizeof(buf),
                               "this request is estimated at %uL input "
                               "tokens, more than the %ui per minute that "
                               "workspace \"%V\" may use: shorten it, or "
                               "raise the workspace's itpm",
                               ctx->input_cost, ctx->limited_limit, &ws->name)
                  - buf;

        return ngx_http_ratepool_reject(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_request_error", &msg, NULL,
                                        0, 0);
    }

    if (rc == NGX_DECLINED && ngx_http_ratepool_pool_spent(pool, &until)) {
        /* as a provider tells of its spend cap, so that clients stop */
        ngx_gmtime(until, &tm);
        msg.len = ngx_snprintf(buf, sizeof(buf),
                               "every org of pool \"%V\" has reached its "
                               "spend limit or quota; the first resets at "
                               "%4d-%02d-%02dT%02d:%02d:%02dZ",
                               &pool->upstream->host, tm.ngx_tm_year,
                               tm.ngx_tm_mon, tm.ngx_tm_mday, tm.ngx_tm_hour,
                               tm.ngx_tm_min, tm.ngx_tm_sec)
                  - buf;

        return ngx_http_ratepool_reject(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                        "rate_limit_error", &msg,
                                        "enforced_spend_limit_reached", 0, 0);
    }

    if (rc == NGX_DECLINED) {
        msg.len = ngx_snprintf(buf, sizeof(buf),
                               "no key of pool \"%V\" is accepted by the "
                               "provider any more; see the gateway's error "
                               "log", &pool->upstream->host)
                  - buf;

        return ngx_http_ratepool_reject(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "api_error", &msg, NULL, 0, 0);
    }

    if (ctx->limited_pool) {
        msg.len = ngx_snprintf(buf, sizeof(buf),
                               "every key of pool \"%V\" is at its rate "
                               "limit; the first frees up in %uL ms",
                               &pool->upstream->host, wait_ms)
                  - buf;

    } else {
        msg.len = ngx_snprintf(buf, sizeof(buf),
                               "workspace \"%V\" is over its budget of %ui "
                               "%s per minute", &ws->name, ctx->limited_limit,
                               ctx->limited_what)
                  - buf;
    }

    return ngx_http_ratepool_reject_limited(r, &msg, wait_ms);
}


/*
 * An internal redirect (error_page, a named location) wipes the module
 * contexts; the request's context is found again through the cleanup
 * that owns it, as the realip module does.
 */

ngx_http_ratepool_ctx_t *
ngx_http_ratepool_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t       *cln;
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_ratepool_module);

    if (ctx || !(r->internal || r->filter_finalize)) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_ratepool_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_ratepool_module);
            break;
        }
    }

    return ctx;
}


static ngx_int_t
ngx_http_ratepool_token_matches(ngx_http_ratepool_main_conf_t *rmcf,
    u_char *token, size_t len, ngx_uint_t *workspace)
{
    u_char                       digest[32];
    ngx_uint_t                   i, found;
    unsigned int                 n;
    ngx_http_ratepool_client_t  *client;

    if (len == 0) {
        return 0;
    }

    if (EVP_DigestInit_ex(rmcf->sha256_ctx, rmcf->sha256, NULL) != 1
        || EVP_DigestUpdate(rmcf->sha256_ctx, token, len) != 1
        || EVP_DigestFinal_ex(rmcf->sha256_ctx, digest, &n) != 1)
    {
        return 0;
    }

    found = 0;
    client = rmcf->clients.elts;

    /* every entry is compared, in constant time, whatever matches */
    for (i = 0; i < rmcf->clients.nelts; i++) {
        if (CRYPTO_memcmp(digest, client[i].digest, 32) == 0 && !found) {
            *workspace = client[i].workspace;
            found = 1;
        }
    }

    return found;
}


static ngx_http_ratepool_workspace_t *
ngx_http_ratepool_identify(ngx_http_request_t *r,
    ngx_http_ratepool_main_conf_t *rmcf)
{
    ngx_str_t                       *auth;
    ngx_uint_t                       i, index;
    ngx_list_part_t                 *part;
    ngx_table_elt_t                 *h;
    ngx_http_ratepool_workspace_t   *ws;

    ws = rmcf->workspaces.elts;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        /* x-api-key, or api-key as Azure OpenAI's clients send it */

        if (((h[i].key.len == sizeof("x-api-key") - 1
              && ngx_strncasecmp(h[i].key.data, (u_char *) "x-api-key",
                                 sizeof("x-api-key") - 1) == 0)
             || (h[i].key.len == sizeof("api-key") - 1
                 && ngx_strncasecmp(h[i].key.data, (u_char *) "api-key",
                                    sizeof("api-key") - 1) == 0))
            && ngx_http_ratepool_token_matches(rmcf, h[i].value.data,
                                               h[i].value.len, &index))
        {
            return &ws[index];
        }
    }

    if (r->headers_in.authorization == NULL) {
        return NULL;
    }

    auth = &r->headers_in.authorization->value;

    if (auth->len > sizeof("Bearer ") - 1
        && ngx_strncasecmp(auth->data, (u_char *) "Bearer ",
                           sizeof("Bearer ") - 1) == 0
        && ngx_http_ratepool_token_matches(rmcf,
                                           auth->data + sizeof("Bearer ") - 1,
                                           auth->len - (sizeof("Bearer ") - 1),
                                           &index))
    {
        return &ws[index];
    }

    return NULL;
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

    wait_in = ratepool_bucket_fit_ms(&sh->itpm_bucket,
                                     ngx_http_ratepool_share(zone, ws->itpm),
                                     ctx->input_cost, sh->reserved_input,
                                     now_ms);
    wait_out = ratepool_bucket_fit_ms(&sh->otpm_bucket,
                                      ngx_http_ratepool_share(zone, ws->otpm),
                                      ctx->output_cost, sh->reserved_output,
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

    wait_rpm = ratepool_bucket_wait_ms(&sh->rpm_bucket,
                                       ngx_http_ratepool_share(zone, ws->rpm),
                                       1, now_ms);

    /* other gateways used the workspace's room, as Redis said */
    if (ngx_http_ratepool_busy(sh, now_ms)
        && sh->busy_until_ms > now_ms + wait_rpm)
    {
        wait_rpm = sh->busy_until_ms - now_ms;
    }

    return wait_rpm;
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

    if (ctx->body_bytes) {
        ctx->input_cost = ratepool_estimate_input(ctx->body_bytes,
                                                  sh->input_rate);
    }

    *wait_ms = 0;
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
    (void) ratepool_bucket_take(&sh->rpm_bucket,
                                ngx_http_ratepool_share(ctx->pool->zone,
                                                        ws->rpm),
                                1, now_ms, &taken_ms);

    rc = NGX_OK;
    sh->admitted++;
    sh->reserved_input += ctx->input_cost;
    sh->reserved_output += ctx->output_cost;
    ctx->ws_reserved = 1;

done:

    ngx_shmtx_unlock(&shpool->mutex);

    return rc;
}


/*
 * A workspace over its daily or monthly token budget is told so the way
 * a provider tells of a spend cap: no retry-after, x-should-retry: false
 * and enforced_spend_limit_reached, so that clients stop rather than
 * retry, and when the budget resets.
 */

static ngx_int_t
ngx_http_ratepool_check_budgets(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool, ngx_http_ratepool_workspace_t *ws)
{
    int          kind;
    time_t       now, reset;
    uint64_t     day, month, budget;
    ngx_tm_t     tm;
    ngx_str_t    msg;
    ngx_uint_t   over;
    u_char       buf[256];

    now = ngx_time();

    ngx_shmtx_lock(&pool->zone->shpool->mutex);

    day = ratepool_budget_used(&ws->sh->today, RATEPOOL_BUDGET_DAY, now);
    month = ratepool_budget_used(&ws->sh->this_month, RATEPOOL_BUDGET_MONTH,
                                 now);

    over = (ws->daily_tokens && day >= ws->daily_tokens)
           || (ws->monthly_tokens && month >= ws->monthly_tokens);

    if (over) {
        ws->sh->rejected++;
    }

    ngx_shmtx_unlock(&pool->zone->shpool->mutex);

    if (!over) {
        return NGX_OK;
    }

    (void) ngx_atomic_fetch_add(&pool->zone->sh->rejected_workspace, 1);

    if (ws->monthly_tokens && month >= ws->monthly_tokens) {
        kind = RATEPOOL_BUDGET_MONTH;
        budget = ws->monthly_tokens;

    } else {
        kind = RATEPOOL_BUDGET_DAY;
        budget = ws->daily_tokens;
    }

    reset = ratepool_budget_reset(kind, now);
    ngx_gmtime(reset, &tm);

    msg.data = buf;
    msg.len = ngx_snprintf(buf, sizeof(buf),
                           "workspace \"%V\" has used its %s budget of %uL "
                           "tokens; it resets at "
                           "%4d-%02d-%02dT%02d:%02d:%02dZ",
                           &ws->name,
                           kind == RATEPOOL_BUDGET_DAY ? "daily" : "monthly",
                           budget, tm.ngx_tm_year, tm.ngx_tm_mon,
                           tm.ngx_tm_mday, tm.ngx_tm_hour, tm.ngx_tm_min,
                           tm.ngx_tm_sec)
              - buf;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "ratepool: workspace \"%V\" is over its %s token budget",
                  &ws->name, kind == RATEPOOL_BUDGET_DAY ? "daily" : "monthly");

    return ngx_http_ratepool_reject(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                    "rate_limit_error", &msg,
                                    "enforced_spend_limit_reached", 0, 0);
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
        sh->reserved_input -= ngx_min(ctx->input_cost, sh->reserved_input);
        sh->reserved_output -= ngx_min(ctx->output_cost,
                                       sh->reserved_output);
    }

    if (request) {
        if (ws->rpm) {
            ratepool_bucket_put(&sh->rpm_bucket, ws->rpm, 1);
        }

        sh->admitted--;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ctx->ws_reserved = 0;

    if (!request) {
        ngx_http_ratepool_wake(ctx->pool);
    }
}


static void
ngx_http_ratepool_cleanup(void *data)
{
    ngx_http_ratepool_ctx_t  *ctx = data;

    ngx_http_ratepool_unwait(ctx);
    ngx_http_ratepool_shared_end(ctx);
    ngx_http_ratepool_release(ctx, &ctx->held, 0);
    ngx_http_ratepool_release(ctx, &ctx->next, 0);
    ngx_http_ratepool_refund_workspace(ctx, 0);
}


/* the gateway's own answers, in the provider's error format */

static ngx_int_t
ngx_http_ratepool_reject(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, ngx_str_t *message, const char *error_code,
    ngx_uint_t retry_after_sec, ngx_int_t should_retry)
{
    ngx_int_t   rc;
    ngx_buf_t  *b;

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    b = ngx_http_ratepool_error_body(r, type, message, error_code);

    if (b == NULL
        || ngx_http_ratepool_error_headers(r, retry_after_sec, should_retry)
           != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_finalize_request(r, ngx_http_ratepool_send_json(r, status, b));

    return NGX_DONE;
}


/* a 429 whose retry-after is when the wait is over, never earlier */

static ngx_int_t
ngx_http_ratepool_reject_limited(ngx_http_request_t *r, ngx_str_t *message,
    uint64_t wait_ms)
{
    return ngx_http_ratepool_reject(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                    "rate_limit_error", message, NULL,
                                    ratepool_retry_after_sec(wait_ms,
                                                     (uint32_t) ngx_random()),
                                    1);
}


/*
 * An error in the provider's format, with nginx's $request_id, and
 * details.error_code where the provider would give one.
 */

ngx_buf_t *
ngx_http_ratepool_error_body(ngx_http_request_t *r, const char *type,
    ngx_str_t *message, const char *error_code)
{
    size_t                          len;
    uintptr_t                       escape;
    ngx_buf_t                      *b;
    ngx_http_variable_value_t      *id;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);

    id = ngx_http_get_indexed_variable(r, rmcf->request_id_index);

    if (id == NULL || id->not_found) {
        return NULL;
    }

    escape = ngx_escape_json(NULL, message->data, message->len);

    if (ratepool_openai_path(r->main->unparsed_uri.data,
                             r->main->unparsed_uri.len))
    {
        return ngx_http_ratepool_openai_error_body(r, type, message, escape,
                                                   error_code);
    }

    len = sizeof("{\"type\":\"error\",\"error\":{\"type\":\"\",\"message\":\"\""
                 ",\"details\":{\"error_code\":\"\"}"
                 "},\"request_id\":\"req_gw_\"}\n") - 1
          + ngx_strlen(type) + message->len + escape + id->len
          + (error_code ? ngx_strlen(error_code) : 0);

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NULL;
    }

    b->last = ngx_sprintf(b->last,
                          "{\"type\":\"error\",\"error\":{\"type\":\"%s\","
                          "\"message\":\"", type);
    b->last = (u_char *) ngx_escape_json(b->last, message->data,
                                         message->len);
    *b->last++ = '"';

    if (error_code) {
        b->last = ngx_sprintf(b->last, ",\"details\":{\"error_code\":\"%s\"}",
                              error_code);
    }

    b->last = ngx_sprintf(b->last, "},\"request_id\":\"req_gw_%v\"}\n", id);

    return b;
}


/* retry-after (if any) and x-should-retry, which the SDKs obey */

/* the same, for a client of OpenAI's API, in its error object */

static ngx_buf_t *
ngx_http_ratepool_openai_error_body(ngx_http_request_t *r, const char *type,
    ngx_str_t *message, uintptr_t escape, const char *error_code)
{
    size_t        len;
    ngx_buf_t    *b;
    const char   *openai_type, *openai_code;

    ratepool_openai_error(type, error_code, &openai_type, &openai_code);

    len = sizeof("{\"error\":{\"message\":\"\",\"type\":\"\","
                 "\"param\":null,\"code\":\"\"}}\n") - 1
          + message->len + escape + ngx_strlen(openai_type)
          + (openai_code ? ngx_strlen(openai_code) : 4);

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NULL;
    }

    b->last = ngx_cpymem(b->last, "{\"error\":{\"message\":\"",
                         sizeof("{\"error\":{\"message\":\"") - 1);
    b->last = (u_char *) ngx_escape_json(b->last, message->data,
                                         message->len);
    b->last = ngx_sprintf(b->last, "\",\"type\":\"%s\",\"param\":null,"
                          "\"code\":", openai_type);

    if (openai_code) {
        b->last = ngx_sprintf(b->last, "\"%s\"}}\n", openai_code);

    } else {
        b->last = ngx_cpymem(b->last, "null}}\n", sizeof("null}}\n") - 1);
    }

    return b;
}


ngx_int_t
ngx_http_ratepool_error_headers(ngx_http_request_t *r,
    ngx_uint_t retry_after_sec, ngx_int_t should_retry)
{
    u_char  *p, *ra;

    static ngx_str_t  retry_after = ngx_string("retry-after");
    static ngx_str_t  x_should_retry = ngx_string("x-should-retry");

    if (retry_after_sec) {
        ra = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
        if (ra == NULL) {
            return NGX_ERROR;
        }

        p = ngx_sprintf(ra, "%ui", retry_after_sec);

        if (ngx_http_ratepool_set_header(r, &retry_after, ra, p - ra)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return ngx_http_ratepool_set_header(r, &x_should_retry,
                                        (u_char *) (should_retry ? "true"
                                                                 : "false"),
                                        should_retry ? 4 : 5);
}


void
ngx_http_ratepool_json_headers(ngx_http_request_t *r, ngx_uint_t status,
    off_t length)
{
    r->headers_out.status = status;
    r->headers_out.content_length_n = length;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;
}


ngx_int_t
ngx_http_ratepool_send_json(ngx_http_request_t *r, ngx_uint_t status,
    ngx_buf_t *b)
{
    ngx_http_ratepool_json_headers(r, status, b->last - b->pos);

    return ngx_http_ratepool_send_buf(r, b);
}


/* sends a whole answer from one buffer, its headers set */

ngx_int_t
ngx_http_ratepool_send_buf(ngx_http_request_t *r, ngx_buf_t *b)
{
    ngx_int_t    rc;
    ngx_chain_t  out;

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.content_length_n = b->last - b->pos;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}
