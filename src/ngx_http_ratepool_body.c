
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
static ngx_http_ratepool_model_t *ngx_http_ratepool_find_model(
    ngx_http_request_t *r, u_char *name, size_t len);
static void ngx_http_ratepool_usage_edit(ngx_http_ratepool_ctx_t *ctx,
    ratepool_request_t *rq);
static ngx_int_t ngx_http_ratepool_body_splice(ngx_http_request_t *r,
    off_t at, size_t skip, ngx_str_t *text);
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
    ngx_http_ratepool_usage_edit(ctx, &rq);
    ctx->body_whole = ratepool_request_whole(&rq);

    ctx->model_at = (off_t) rq.model_at;
    ctx->model_end = (off_t) rq.model_end;
    ctx->body_length = -1;

    if (rq.model_len) {
        ctx->cloud_model = ngx_http_ratepool_find_model(r, rq.model,
                                                        rq.model_len);

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

ngx_str_t *
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


/* what the clouds call the model a client named: ratepool_model */

static ngx_http_ratepool_model_t *
ngx_http_ratepool_find_model(ngx_http_request_t *r, u_char *name, size_t len)
{
    ngx_uint_t                      i;
    ngx_http_ratepool_model_t      *models;
    ngx_http_ratepool_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);
    models = rmcf->models.elts;

    for (i = 0; i < rmcf->models.nelts; i++) {
        if (models[i].name.len == len
            && ngx_strncmp(models[i].name.data, name, len) == 0)
        {
            return &models[i];
        }
    }

    return NULL;
}


/*
 * OpenAI streams report usage only when asked (stream_options.include_
 * usage): the gateway asks for a client that did not, or said no, so that
 * it can count what the stream used, and keeps the extra chunk from that
 * client (ngx_http_ratepool_body_filter).  The smallest change that asks
 * is chosen here: an include_usage of false or null becomes true, a null
 * stream_options or one without include_usage gets it, a body without
 * stream_options gets one after its first "{".
 */

static void
ngx_http_ratepool_usage_edit(ngx_http_ratepool_ctx_t *ctx,
    ratepool_request_t *rq)
{
    static ngx_str_t  options = ngx_string("\"stream_options\":"
                                           "{\"include_usage\":true},");
    static ngx_str_t  object = ngx_string("{\"include_usage\":true}");
    static ngx_str_t  member = ngx_string("\"include_usage\":true,");
    static ngx_str_t  value = ngx_string("true");

    ctx->usage_edit_at = -1;
    ctx->usage_edit_skip = 0;
    ctx->usage_edit = value;
    ctx->usage_asked = 0;

    if (rq->options_at < 0) {
        ctx->usage_edit_at = ctx->body_object_at < 0
                             ? -1 : ctx->body_object_at + 1;
        ctx->usage_edit = options;

    } else if (rq->options_null) {
        ctx->usage_edit_at = (off_t) rq->options_at;
        ctx->usage_edit_skip = sizeof("null") - 1;
        ctx->usage_edit = object;

    } else if (!rq->options_object) {
        /* not OpenAI's: it will say so */

    } else if (rq->usage_at < 0) {
        ctx->usage_edit_at = (off_t) rq->options_at + 1;
        ctx->usage_edit = member;

        if (rq->options_members == 0) {
            ctx->usage_edit.len--;          /* no "," before the "}" */
        }

    } else if (rq->usage_value == 't') {
        ctx->usage_asked = 1;

    } else if (rq->usage_value == 'f' || rq->usage_value == 'n') {
        ctx->usage_edit_at = (off_t) rq->usage_at;
        ctx->usage_edit_skip = (rq->usage_value == 'f') ? sizeof("false") - 1
                                                        : sizeof("null") - 1;
    }
}


ngx_int_t
ngx_http_ratepool_add_usage(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    ngx_int_t  rc;

    /* Responses streams report usage unasked, and take no include_usage */
    static ngx_str_t  completions = ngx_string("/completions");

    if (ctx->key == NULL || ctx->key->dialect != RATEPOOL_DIALECT_OPENAI
        || !ctx->stream || ctx->usage_asked || !ctx->body_whole
        || ctx->usage_edit_at < 0 || ctx->usage_declined
        || r->uri.len < completions.len
        || ngx_strncmp(r->uri.data + r->uri.len - completions.len,
                       completions.data, completions.len) != 0
        || r->headers_in.content_length_n < 0
        || r->request_body == NULL || r->request_body->bufs == NULL
        || ctx->dialect != RATEPOOL_DIALECT_OPENAI)
    {
        return NGX_OK;
    }

    rc = ngx_http_ratepool_body_splice(r, ctx->usage_edit_at,
                                       ctx->usage_edit_skip,
                                       &ctx->usage_edit);

    if (rc == NGX_DECLINED) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "ratepool: cannot ask for the usage of a stream where "
                      "its body lies (a file, or across buffers): what it "
                      "uses is estimated");
        ctx->usage_declined = 1;
        return NGX_OK;
    }

    if (rc == NGX_OK) {
        ctx->usage_added = 1;
    }

    return rc;
}


/*
 * Replaces "skip" bytes of the body at offset "at" with "text": the
 * buffer they are in is cut in two around the text.  A re-send rewinds
 * a memory buffer to its start and a file buffer to where the one before
 * it ended, so each part is a buffer of its own, and in a file (a large
 * body is written there whole) bytes can be added but not left out.
 */

static ngx_int_t
ngx_http_ratepool_body_splice(ngx_http_request_t *r, off_t at, size_t skip,
    ngx_str_t *text)
{
    off_t         size;
    ngx_buf_t    *b, *head, *middle, *rest;
    ngx_chain_t  *cl, **ll, *next;

    ll = &r->request_body->bufs;

    for (cl = *ll; cl; ll = &cl->next, cl = cl->next) {
        b = cl->buf;
        size = ngx_buf_in_memory(b) ? b->last - b->pos
                                    : b->file_last - b->file_pos;

        if (at < size || (at == size && cl->next == NULL)) {
            break;
        }

        at -= size;
    }

    if (cl == NULL || at + (off_t) skip > size
        || (b->in_file && (ngx_buf_in_memory(b) || skip || b->file_pos != 0)))
    {
        return NGX_DECLINED;
    }

    head = ngx_calloc_buf(r->pool);
    middle = ngx_calloc_buf(r->pool);
    rest = ngx_calloc_buf(r->pool);

    if (head == NULL || middle == NULL || rest == NULL) {
        return NGX_ERROR;
    }

    *head = *b;
    *rest = *b;

    head->last_buf = 0;
    head->last_in_chain = 0;

    if (b->in_file) {
        head->file_last = at;
        rest->file_pos = at;

    } else {
        /* the buffer may begin before the body, in the client's header */
        head->start = b->pos;
        head->last = b->pos + at;
        head->end = head->last;
        rest->start = head->last + skip;
        rest->pos = rest->start;
    }

    middle->memory = 1;
    middle->start = text->data;
    middle->pos = text->data;
    middle->last = text->data + text->len;
    middle->end = middle->last;

    /* no empty buffer goes out: nginx takes one for a bug */

    next = cl->next;

    if (at + (off_t) skip < size) {
        next = ngx_http_ratepool_chain_link(r->pool, rest, next);
        if (next == NULL) {
            return NGX_ERROR;
        }

    } else {
        middle->last_buf = b->last_buf;
        middle->last_in_chain = b->last_in_chain;
    }

    next = ngx_http_ratepool_chain_link(r->pool, middle, next);
    if (next == NULL) {
        return NGX_ERROR;
    }

    if (at > 0) {
        next = ngx_http_ratepool_chain_link(r->pool, head, next);
        if (next == NULL) {
            return NGX_ERROR;
        }
    }

    *ll = next;
    r->headers_in.content_length_n += (off_t) text->len - (off_t) skip;

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

