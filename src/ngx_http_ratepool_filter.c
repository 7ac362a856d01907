
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_access.h"
#include "ngx_http_ratepool_admission.h"
#include "ngx_http_ratepool_cloud.h"
#include "ngx_http_ratepool_filter.h"
#include "ngx_http_ratepool_pool.h"
#include "ngx_http_ratepool_reply.h"
#include "ngx_http_ratepool_shm.h"


/*
 * Header and body filters: the pool's retry-after on a 429 that reaches
 * the client, the gateway's answer in place of nginx's error pages, and
 * the answer's usage read as it passes (SSE event by event, never held,
 * but for OpenAI's usage chunk the gateway asked for itself).
 */


static ngx_int_t ngx_http_ratepool_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_ratepool_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_ratepool_event_stream(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t *in);
static ngx_int_t ngx_http_ratepool_drop_usage(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t *in);
static ngx_int_t ngx_http_ratepool_send_event(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t ***ll, ngx_uint_t whole);
static ngx_int_t ngx_http_ratepool_read_usage(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_commit_usage(ngx_http_ratepool_ctx_t *ctx);
static void ngx_http_ratepool_count_answer(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


static ngx_int_t
ngx_http_ratepool_header_filter(ngx_http_request_t *r)
{
    uint64_t                       now_ms;
    ngx_http_ratepool_ctx_t       *ctx;
    ngx_http_ratepool_loc_conf_t  *rlcf;

    static ngx_str_t  unified = ngx_string("anthropic-ratelimit-unified-");

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_ratepool_get_ctx(r);

    if (ctx == NULL) {
        rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);

        if (rlcf->pool == NULL) {
            return ngx_http_next_header_filter(r);
        }
    }

    /*
     * Anthropic's "unified" rate-limit headers, a family proxy_hide_header
     * cannot name, speak of the org that answered, not of the pool.
     */

    if (ctx && ctx->answered) {
        ngx_http_ratepool_hide_headers(r, &unified, 1);
    }

    /* a cloud's error, in the shape the client reads */

    if (ctx && ctx->answered && ctx->key
        && ctx->key->provider->service != RATEPOOL_SERVICE_DIRECT
        && r->headers_out.status >= NGX_HTTP_BAD_REQUEST
        && ngx_http_ratepool_reply_cloud_error(r, ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ctx && ctx->exhausted
        && r->headers_out.status == NGX_HTTP_TOO_MANY_REQUESTS)
    {
        now_ms = ngx_http_ratepool_now_ms();

        /* when the first key of the pool frees up, not this key's */
        if (ngx_http_ratepool_reply_retry_after(r,
                                   ctx->soonest_ms > now_ms
                                   ? ctx->soonest_ms - now_ms : 0)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        return ngx_http_next_header_filter(r);
    }

    /*
     * nginx's own error pages (a timeout, a TLS failure, a body too
     * large) and a provider's 401 that no key could beat are answered
     * by the gateway, in the provider's format.
     */

    if ((ctx && ctx->refused
         && r->headers_out.status == NGX_HTTP_UNAUTHORIZED)
        || (r->err_status >= NGX_HTTP_BAD_REQUEST
            && r->err_status != NGX_HTTP_CLIENT_CLOSED_REQUEST
            && !(ctx && ctx->answered)))
    {
        if (ngx_http_ratepool_reply_replace(r, ctx) != NGX_OK) {
            return NGX_ERROR;
        }

        return ngx_http_next_header_filter(r);
    }

    /* Bedrock's event stream goes to the client as SSE */

    if (ctx && ctx->answered && ctx->key
        && r->headers_out.status == NGX_HTTP_OK
        && ngx_http_ratepool_cloud_stream(r, ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* a count of tokens is no use of them */

    if (ctx && ctx->answered && !ctx->count_only
        && r->headers_out.status >= NGX_HTTP_OK
        && r->headers_out.status < NGX_HTTP_SPECIAL_RESPONSE
        && ngx_http_ratepool_read_usage(r, ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


/*
 * A provider's answer is read for its usage as it passes: SSE streams
 * event by event, JSON bodies as one document.  Answers are asked for
 * uncompressed; anything else is let through unread.
 */

static ngx_int_t
ngx_http_ratepool_read_usage(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    ngx_int_t   sse;
    ngx_str_t  *type;

    type = &r->headers_out.content_type;

    if (type->len >= sizeof("text/event-stream") - 1
        && ngx_strncasecmp(type->data, (u_char *) "text/event-stream",
                           sizeof("text/event-stream") - 1) == 0)
    {
        sse = 1;

    } else if (type->len >= sizeof("application/json") - 1
               && ngx_strncasecmp(type->data, (u_char *) "application/json",
                                  sizeof("application/json") - 1) == 0)
    {
        sse = 0;

    } else {
        ctx->usage_unread = 1;
        return NGX_OK;
    }

    if (r->headers_out.content_encoding
        && r->headers_out.content_encoding->value.len
        && ngx_strncasecmp(r->headers_out.content_encoding->value.data,
                           (u_char *) "identity", 8) != 0)
    {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "ratepool: cannot read the usage of an answer with "
                      "content-encoding \"%V\", it is estimated",
                      &r->headers_out.content_encoding->value);
        ctx->usage_unread = 1;
        return NGX_OK;
    }

    ctx->usage = ngx_palloc(r->pool, sizeof(ratepool_usage_scanner_t));
    if (ctx->usage == NULL) {
        return NGX_ERROR;
    }

    ratepool_usage_init(ctx->usage, sse);

    /* file buffers (proxy_buffering on) are read into memory for us */
    r->filter_need_in_memory = 1;

    if (sse && ctx->usage_added) {
        /* a chunk the client did not ask for will be left out */
        ngx_http_clear_content_length(r);
    }

    return NGX_OK;
}


/* the gateway's own answer replaces the body nginx or the provider sent */

static ngx_int_t
ngx_http_ratepool_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_chain_t               out, *cl;
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_ratepool_module);

    if (ctx == NULL || r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->eventstream) {
        return ngx_http_ratepool_event_stream(r, ctx, in);
    }

    if (ctx->usage && ctx->usage_added && ctx->usage->sse) {
        return ngx_http_ratepool_drop_usage(r, ctx, in);
    }

    if (ctx->usage) {
        /* read, never held or changed: the bytes go on as they came */
        for (cl = in; cl; cl = cl->next) {
            if (ngx_buf_in_memory(cl->buf)) {
                ratepool_usage_feed(ctx->usage, cl->buf->pos,
                                    cl->buf->last - cl->buf->pos);
            }

            /* counted before the client has the last byte */
            if (cl->buf->last_buf) {
                ctx->answer_whole = 1;
                ngx_http_ratepool_commit_usage(ctx);
            }
        }

        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->own_error == NULL) {
        /* an answer without usage: the reservation ends with it */
        for (cl = in; cl; cl = cl->next) {
            if (cl->buf->last_buf && ctx->usage_unread) {
                ctx->answer_whole = 1;
                ngx_http_ratepool_commit_usage(ctx);

            } else if (cl->buf->last_buf) {
                ngx_http_ratepool_refund_workspace(ctx, 0);
            }
        }

        return ngx_http_next_body_filter(r, in);
    }

    for (cl = in; cl; cl = cl->next) {
        cl->buf->pos = cl->buf->last;
        cl->buf->file_pos = cl->buf->file_last;
    }

    if (ctx->own_error_sent) {
        return NGX_OK;
    }

    ctx->own_error_sent = 1;
    ngx_http_ratepool_refund_workspace(ctx, 0);

    out.buf = ctx->own_error;
    out.next = NULL;

    return ngx_http_next_body_filter(r, &out);
}


/*
 * Bedrock's event stream, as SSE: converted, read for usage as any
 * stream is, and sent on, its buffers used again once the client has
 * them.
 */

static ngx_int_t
ngx_http_ratepool_event_stream(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t *in)
{
    ngx_int_t     rc;
    ngx_chain_t  *out, *cl;

    if (ngx_http_ratepool_cloud_sse(r, ctx, in, &out) != NGX_OK) {
        return NGX_ERROR;
    }

    for (cl = out; cl; cl = cl->next) {
        if (ctx->usage && ngx_buf_in_memory(cl->buf)) {
            ratepool_usage_feed(ctx->usage, cl->buf->pos,
                                cl->buf->last - cl->buf->pos);
        }

        if (cl->buf->last_buf && ctx->usage) {
            ctx->answer_whole = 1;
            ngx_http_ratepool_commit_usage(ctx);
        }
    }

    /* an empty call too: the writer's way to send what it holds */
    rc = ngx_http_next_body_filter(r, out);

    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &out,
                            (ngx_buf_tag_t) &ngx_http_ratepool_module);

    return rc;
}


/*
 * A stream whose usage chunk the gateway asked for, for a client that did
 * not: each event is held until its blank line, then sent on, unless it
 * is that chunk.  An event larger than the buffer goes on as it comes.
 */

#define RATEPOOL_EVENT_MAX  16384

static ngx_int_t
ngx_http_ratepool_drop_usage(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t *in)
{
    u_char        c, *p;
    ngx_int_t     rc;
    ngx_buf_t    *b, *ev;
    ngx_chain_t  *cl, *out, **ll;

    if (ctx->event == NULL) {
        ctx->event = ngx_create_temp_buf(r->pool, RATEPOOL_EVENT_MAX);
        if (ctx->event == NULL) {
            return NGX_ERROR;
        }
    }

    ev = ctx->event;
    out = NULL;
    ll = &out;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            ratepool_usage_feed(ctx->usage, b->pos, b->last - b->pos);

            for (p = b->pos; p < b->last; p++) {
                c = *p;

                if (ev->last == ev->end) {
                    /* too big to hold: on with it as it is */
                    if (ngx_http_ratepool_send_event(r, ctx, &ll, 0)
                        != NGX_OK)
                    {
                        return NGX_ERROR;
                    }

                    ctx->event_whole = 1;
                }

                *ev->last++ = c;

                if (c == '\r') {
                    continue;
                }

                ctx->event_nl = (c == '\n') ? ctx->event_nl + 1 : 0;

                if (ctx->event_nl == 2) {
                    /* the blank line: the event is whole */
                    ctx->event_nl = 0;

                    if (ngx_http_ratepool_send_event(r, ctx, &ll,
                                                     !ctx->event_whole)
                        != NGX_OK)
                    {
                        return NGX_ERROR;
                    }

                    ctx->event_whole = 0;
                }
            }

            b->pos = b->last;
        }

        if (b->last_buf || b->flush) {
            if (b->last_buf
                && ngx_http_ratepool_send_event(r, ctx, &ll, 0) != NGX_OK)
            {
                return NGX_ERROR;
            }

            *ll = ngx_chain_get_free_buf(r->pool, &ctx->free);
            if (*ll == NULL) {
                return NGX_ERROR;
            }

            (*ll)->buf->pos = NULL;
            (*ll)->buf->last = NULL;
            (*ll)->buf->memory = 0;
            (*ll)->buf->temporary = 0;
            (*ll)->buf->last_buf = b->last_buf;
            (*ll)->buf->flush = 1;
            (*ll)->buf->tag = (ngx_buf_tag_t) &ngx_http_ratepool_module;
            ll = &(*ll)->next;

            if (b->last_buf) {
                ctx->answer_whole = 1;
                ngx_http_ratepool_commit_usage(ctx);
            }
        }
    }

    /* an empty call too: the writer's way to send what it holds */
    rc = ngx_http_next_body_filter(r, out);

    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &out,
                            (ngx_buf_tag_t) &ngx_http_ratepool_module);

    return rc;
}


/* the held bytes go on, copied, unless they are a usage chunk */

static ngx_int_t
ngx_http_ratepool_send_event(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t ***ll, ngx_uint_t whole)
{
    size_t        len;
    ngx_buf_t    *b, *ev;
    ngx_chain_t  *cl;

    ev = ctx->event;
    len = ev->last - ev->pos;

    if (len == 0) {
        return NGX_OK;
    }

    if (whole && ratepool_usage_only_event(ev->pos, len)) {
        ev->last = ev->pos;
        return NGX_OK;
    }

    cl = ngx_http_ratepool_out_buf(r, ctx, len);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    b = cl->buf;
    b->last = ngx_cpymem(b->start, ev->pos, len);

    **ll = cl;
    *ll = &cl->next;

    ev->last = ev->pos;

    return NGX_OK;
}


/*
 * A buffer of the module's own for what goes to the client, from those
 * the client has had (ctx->free) where one is big enough: empty, with
 * room for size bytes; of size 0, for a flush or the last buffer alone.
 */

ngx_chain_t *
ngx_http_ratepool_out_buf(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, size_t size)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    cl = ngx_chain_get_free_buf(r->pool, &ctx->free);
    if (cl == NULL) {
        return NULL;
    }

    b = cl->buf;

    if (size && (b->start == NULL || (size_t) (b->end - b->start) < size)) {
        b->start = ngx_palloc(r->pool, ngx_max(size, 1024));
        if (b->start == NULL) {
            return NULL;
        }

        b->end = b->start + ngx_max(size, 1024);
    }

    b->pos = b->start;
    b->last = b->start;
    b->temporary = (size != 0);
    b->memory = 0;
    b->last_buf = 0;
    b->flush = 0;
    b->tag = (ngx_buf_tag_t) &ngx_http_ratepool_module;

    return cl;
}


/*
 * Usage is counted when the answer's last byte passes, or else once the
 * request is over, however it ended: a client that left mid-stream is
 * charged for what the provider reported so far.
 */

ngx_int_t
ngx_http_ratepool_log_handler(ngx_http_request_t *r)
{
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_ratepool_module);

    if (ctx == NULL) {
        return NGX_OK;
    }

    if (ctx->usage || ctx->usage_unread) {
        ngx_http_ratepool_commit_usage(ctx);
    }

    /* not of a pool: an error page's context only */
    if (ctx->pool) {
        ngx_http_ratepool_count_answer(r, ctx);
    }

    return NGX_OK;
}


/*
 * What the client was answered, and the time the gateway added: all of
 * the request's time from its body's last byte, but its waits and its
 * tries' time with the provider.
 */

static void
ngx_http_ratepool_count_answer(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    uint64_t                      spent_ms, upstream_ms;
    ngx_uint_t                    i, status, answer;
    ngx_http_ratepool_shctx_t    *sh;
    ngx_http_upstream_state_t    *state;
    ngx_http_ratepool_pool_sh_t  *psh;

    sh = ctx->pool->zone->sh;
    psh = ctx->pool->sh;
    status = r->headers_out.status;

    if (status == NGX_HTTP_TOO_MANY_REQUESTS) {
        answer = RATEPOOL_ANSWER_429;
        ngx_http_ratepool_history_count(sh, RATEPOOL_HISTORY_GIVEN_429);

        if (ctx->client) {
            (void) ngx_atomic_fetch_add(&ctx->client->sh->given_429, 1);
        }

    } else if (status >= NGX_HTTP_INTERNAL_SERVER_ERROR || status == 0) {
        /* 0: nothing was sent, as nginx closed the connection */
        answer = RATEPOOL_ANSWER_5XX;
        ngx_http_ratepool_history_count(sh, RATEPOOL_HISTORY_ERRORS);

    } else if (status >= NGX_HTTP_BAD_REQUEST) {
        answer = RATEPOOL_ANSWER_4XX;

    } else {
        answer = RATEPOOL_ANSWER_2XX;
    }

    (void) ngx_atomic_fetch_add(&psh->answers[answer], 1);

    if (ctx->waited_ms) {
        ngx_http_ratepool_observe(&psh->wait_time,
                                  ngx_http_ratepool_wait_bounds,
                                  (ngx_msec_t) ctx->waited_ms);
    }

    if (ctx->body_read_ms == 0) {
        return;
    }

    upstream_ms = 0;

    if (r->upstream_states) {
        state = r->upstream_states->elts;

        for (i = 0; i < r->upstream_states->nelts; i++) {
            if (state[i].peer && state[i].response_time != (ngx_msec_t) -1) {
                upstream_ms += state[i].response_time;
            }
        }
    }

    spent_ms = ngx_http_ratepool_now_ms() - ctx->body_read_ms;
    spent_ms -= ngx_min(spent_ms, ctx->waited_ms + upstream_ms);

    ngx_http_ratepool_observe(&psh->added_time,
                              ngx_http_ratepool_added_bounds,
                              (ngx_msec_t) spent_ms);
}


/* once per request: at the answer's last byte, or when it ends otherwise */

static void
ngx_http_ratepool_commit_usage(ngx_http_ratepool_ctx_t *ctx)
{
    ratepool_usage_t  unread;

    if (ctx->usage_counted || ctx->key == NULL) {
        return;
    }

    ctx->usage_counted = 1;

    if (ctx->usage) {
        ratepool_usage_finish(ctx->usage);
        ngx_http_ratepool_charge(ctx, &ctx->usage->usage,
                                 RATEPOOL_USAGE_READ, ctx->usage->sse);

    } else {
        ngx_memzero(&unread, sizeof(ratepool_usage_t));
        ngx_http_ratepool_charge(ctx, &unread, RATEPOOL_USAGE_UNREAD, 0);
    }

    /* charged what it used, it no longer holds what it might have */
    ngx_http_ratepool_refund_workspace(ctx, 0);
}


ngx_int_t
ngx_http_ratepool_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_ratepool_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_ratepool_body_filter;

    return NGX_OK;
}
