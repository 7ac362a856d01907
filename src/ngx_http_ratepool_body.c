
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_body.h"


/*
 * The request body, once read: what admission needs of it (the model,
 * the output cap, its size, whether it streams), and the one change the
 * gateway makes to it (OpenAI's stream_options.include_usage).
 */


static void ngx_http_ratepool_find_object(ngx_http_ratepool_ctx_t *ctx,
    u_char *data, size_t len);
static void ngx_http_ratepool_conversation(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ratepool_request_t *rq);
static ngx_str_t *ngx_http_ratepool_header_in(ngx_http_request_t *r,
    ngx_str_t *name);
static ngx_chain_t *ngx_http_ratepool_chain_link(ngx_pool_t *pool,
    ngx_buf_t *b, ngx_chain_t *next);


/* the model and the output cap, from a body in memory or in a file */

ngx_int_t
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
     * one (less once its workspace's answers say what they produce); a
     * request that asks for no model (a listing, say) asks for no output.
     */

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_ratepool_module);

    /*
     * Counting a prompt's tokens is free, and its requests are limited
     * apart from messages: it takes nothing of an org's or a workspace's
     * buckets, and is no turn of a conversation.
     */

    ctx->count_only = (r->uri.len >= sizeof("/count_tokens") - 1
                       && ngx_strncmp(r->uri.data + r->uri.len
                                      - (sizeof("/count_tokens") - 1),
                                      "/count_tokens",
                                      sizeof("/count_tokens") - 1) == 0);

    if (ctx->count_only) {
        return NGX_OK;
    }

    if (rq.has_max_tokens) {
        ctx->output_cap = ngx_min(rq.max_tokens,
                                  (uint64_t) rlcf->output_reserve);

    } else if (rq.model_len) {
        ctx->output_cap = rlcf->output_reserve;
    }

    ctx->output_cost = ctx->output_cap;

    ngx_http_ratepool_conversation(r, ctx, &rq);

    return NGX_OK;
}


/*
 * The conversation a request is a turn of, for one model (each model
 * has a cache of its own): the session Claude Code names in its headers
 * (and the subagent, whose prompts are its own), or else the hash of
 * the body's tools, system and first user message.  Its tools and system
 * alone are a prefix other conversations may share.
 */

static void
ngx_http_ratepool_conversation(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ratepool_request_t *rq)
{
    uint64_t    id;
    ngx_str_t  *session, *agent;

    static ngx_str_t  session_id = ngx_string("x-claude-code-session-id");
    static ngx_str_t  agent_id = ngx_string("x-claude-code-agent-id");

    /*
     * Only a prompt the provider caches has a home worth keeping: not a
     * body with no conversation in it, one too small, one of Anthropic's
     * API that marks nothing for caching.
     */

    if (!rq->conv.valid
        || ctx->body_bytes < RATEPOOL_HOME_MIN_BYTES
        || (!rq->conv.cache_control
            && ctx->dialect != RATEPOOL_DIALECT_OPENAI))
    {
        return;
    }

    id = rq->conv.conversation_hash;
    session = ngx_http_ratepool_header_in(r, &session_id);

    if (session) {
        id = ratepool_hash_fnv(RATEPOOL_HASH_BASIS, session->data,
                               session->len);

        agent = ngx_http_ratepool_header_in(r, &agent_id);

        if (agent) {
            id = ratepool_hash_fnv(id, (u_char *) "/", 1);
            id = ratepool_hash_fnv(id, agent->data, agent->len);
        }

        id = ratepool_hash_mix(id);
    }

    ctx->conversation = ratepool_home_key(id, ctx->model.data,
                                          ctx->model.len);

    if (rq->conv.has_prefix) {
        ctx->prefix = ratepool_home_key(rq->conv.prefix_hash,
                                        ctx->model.data, ctx->model.len);
        ctx->prefix_bytes = rq->conv.prefix_bytes;
    }

    ctx->cache_long = rq->conv.ttl_1h;
}


/* a request header's value, NULL if absent or empty */

static ngx_str_t *
ngx_http_ratepool_header_in(ngx_http_request_t *r, ngx_str_t *name)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == name->len && h[i].value.len
            && ngx_strncasecmp(h[i].key.data, name->data, name->len) == 0)
        {
            return &h[i].value;
        }
    }
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

ngx_int_t
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
        || ctx->dialect != RATEPOOL_DIALECT_OPENAI)
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

