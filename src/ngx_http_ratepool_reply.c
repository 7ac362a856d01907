
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_reply.h"


/*
 * Every answer the gateway makes itself: its refusals, the error pages
 * of nginx it replaces, and the retry-after of a pool's 429, each in the
 * error format of the API its client speaks (the client's dialect), with
 * the headers the SDKs obey (retry-after, x-should-retry).
 */


typedef struct {
    ngx_uint_t                      status;
    const char                     *type;
    const char                     *message;
} ngx_http_ratepool_error_t;


static ngx_int_t ngx_http_ratepool_reply_until(ngx_http_request_t *r,
    u_char *buf, u_char *p, size_t size, time_t reset);
static ngx_int_t ngx_http_ratepool_reply_limited(ngx_http_request_t *r,
    ngx_str_t *message, uint64_t wait_ms);
static u_char *ngx_http_ratepool_no_key(u_char *buf, size_t size,
    ngx_http_ratepool_pool_t *pool);
static ngx_buf_t *ngx_http_ratepool_error_body(ngx_http_request_t *r,
    const char *type, ngx_str_t *message, const char *error_code);
static ngx_buf_t *ngx_http_ratepool_openai_error_body(ngx_http_request_t *r,
    const char *type, ngx_str_t *message, uintptr_t escape,
    const char *error_code);
static ngx_int_t ngx_http_ratepool_error_headers(ngx_http_request_t *r,
    ngx_uint_t retry_after_sec, ngx_int_t should_retry);
static void ngx_http_ratepool_json_headers(ngx_http_request_t *r,
    ngx_uint_t status, off_t length);
static ngx_int_t ngx_http_ratepool_set_header(ngx_http_request_t *r,
    ngx_str_t *name, u_char *value, size_t len);


/* what nginx's own error pages become, in the provider's format */

static ngx_http_ratepool_error_t  ngx_http_ratepool_errors[] = {

    { NGX_HTTP_BAD_REQUEST, "invalid_request_error",
      "the gateway could not read the request" },
    { NGX_HTTP_NOT_FOUND, "not_found_error",
      "not found" },
    { NGX_HTTP_NOT_ALLOWED, "invalid_request_error",
      "method not allowed" },
    { NGX_HTTP_REQUEST_TIME_OUT, "invalid_request_error",
      "the request did not arrive in time" },
    { NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, "request_too_large",
      "the request is larger than this gateway accepts "
      "(client_max_body_size)" },
    { NGX_HTTP_TOO_MANY_REQUESTS, "rate_limit_error",
      "no key of the pool could take the request" },
    { NGX_HTTP_BAD_GATEWAY, "api_error",
      "the provider could not be reached, or did not answer properly" },
    { NGX_HTTP_GATEWAY_TIME_OUT, "timeout_error",
      "the provider did not answer in time; the request was not sent "
      "again, since the provider may have processed it" },

    { 0, NULL, NULL }
};


/*
 * The API the client speaks, from the URI it sent (an error page's
 * location has another): decided once per request, in its context.
 */

ngx_uint_t
ngx_http_ratepool_dialect(ngx_http_request_t *r)
{
    ngx_http_ratepool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_ratepool_module);

    if (ctx) {
        return ctx->dialect;
    }

    return ratepool_openai_path(r->main->unparsed_uri.data,
                                r->main->unparsed_uri.len)
           ? RATEPOOL_DIALECT_OPENAI : RATEPOOL_DIALECT_ANTHROPIC;
}


ngx_int_t
ngx_http_ratepool_reply_bad_token(ngx_http_request_t *r)
{
    ngx_str_t  msg;

    ngx_str_set(&msg, "invalid gateway token: send the token this "
                      "gateway issued as x-api-key or as "
                      "Authorization: Bearer");

    return ngx_http_ratepool_reply_error(r, NGX_HTTP_UNAUTHORIZED,
                                         "authentication_error", &msg, NULL,
                                         0, 0);
}


ngx_int_t
ngx_http_ratepool_reply_store_down(ngx_http_request_t *r)
{
    ngx_str_t  msg;

    ngx_str_set(&msg, "the gateway cannot reach the rate-limit store it "
                      "shares with other gateways; try again shortly");

    return ngx_http_ratepool_reply_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                         "api_error", &msg, NULL, 5, 1);
}


/* a request larger than its workspace may ever send in a minute */

ngx_int_t
ngx_http_ratepool_reply_too_big(ngx_http_request_t *r,
    ngx_http_ratepool_workspace_t *ws, uint64_t input_cost, ngx_uint_t limit)
{
    ngx_str_t  msg;
    u_char     buf[320];

    msg.data = buf;
    msg.len = ngx_snprintf(buf, sizeof(buf),
                           "this request is estimated at %uL input "
                           "tokens, more than the %ui per minute that "
                           "workspace \"%V\" may use: shorten it, or "
                           "raise the workspace's itpm",
                           input_cost, limit, &ws->name)
              - buf;

    return ngx_http_ratepool_reply_error(r, NGX_HTTP_BAD_REQUEST,
                                         "invalid_request_error", &msg, NULL,
                                         0, 0);
}


/*
 * Spend caps and budgets are told of the way a provider tells of its
 * spend cap: no retry-after, x-should-retry: false and
 * enforced_spend_limit_reached, so that clients stop rather than retry,
 * and when the cap resets.
 */

ngx_int_t
ngx_http_ratepool_reply_spent(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool, time_t until)
{
    u_char  *p, buf[320];

    p = ngx_snprintf(buf, sizeof(buf),
                     "every org of pool \"%V\" has reached its spend limit "
                     "or quota; the first resets at ", &pool->upstream->host);

    return ngx_http_ratepool_reply_until(r, buf, p, sizeof(buf), until);
}


ngx_int_t
ngx_http_ratepool_reply_over_budget(ngx_http_request_t *r,
    ngx_http_ratepool_workspace_t *ws, const char *period, uint64_t budget,
    ngx_uint_t money, time_t reset)
{
    u_char  *p, buf[320];

    p = ngx_snprintf(buf, sizeof(buf),
                     "workspace \"%V\" has used its %s budget of ",
                     &ws->name, period);
    p = ngx_http_ratepool_amount(p, buf + sizeof(buf), budget, money);
    p = ngx_slprintf(p, buf + sizeof(buf), "; it resets at ");

    return ngx_http_ratepool_reply_until(r, buf, p, sizeof(buf), reset);
}


/* a budget: tokens, or dollars and cents of its nano-dollars */

u_char *
ngx_http_ratepool_amount(u_char *p, u_char *last, uint64_t amount,
    ngx_uint_t money)
{
    if (money && amount % 10000000 == 0) {
        return ngx_slprintf(p, last, "$%uL.%02uL",
                            amount / RATEPOOL_NANO_PER_USD,
                            amount % RATEPOOL_NANO_PER_USD / 10000000);
    }

    if (money) {
        /* less than a cent in it: to the millionth of a dollar */
        return ngx_slprintf(p, last, "$%uL.%06uL",
                            amount / RATEPOOL_NANO_PER_USD,
                            amount % RATEPOOL_NANO_PER_USD / 1000);
    }

    return ngx_slprintf(p, last, "%uL tokens", amount);
}


/* the message in buf, up to p, ends with when the money is back */

static ngx_int_t
ngx_http_ratepool_reply_until(ngx_http_request_t *r, u_char *buf, u_char *p,
    size_t size, time_t reset)
{
    ngx_tm_t   tm;
    ngx_str_t  msg;

    ngx_gmtime(reset, &tm);

    msg.data = buf;
    msg.len = ngx_snprintf(p, size - (p - buf),
                           "%4d-%02d-%02dT%02d:%02d:%02dZ", tm.ngx_tm_year,
                           tm.ngx_tm_mon, tm.ngx_tm_mday, tm.ngx_tm_hour,
                           tm.ngx_tm_min, tm.ngx_tm_sec)
              - buf;

    return ngx_http_ratepool_reply_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                         "rate_limit_error", &msg,
                                         "enforced_spend_limit_reached", 0,
                                         0);
}


/* every key of the pool was refused (401) by the provider */

ngx_int_t
ngx_http_ratepool_reply_no_key(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool)
{
    ngx_str_t  msg;
    u_char     buf[320];

    msg.data = buf;
    msg.len = ngx_http_ratepool_no_key(buf, sizeof(buf), pool) - buf;

    return ngx_http_ratepool_reply_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                         "api_error", &msg, NULL, 0, 0);
}


static u_char *
ngx_http_ratepool_no_key(u_char *buf, size_t size,
    ngx_http_ratepool_pool_t *pool)
{
    return ngx_snprintf(buf, size,
                        "no key of pool \"%V\" is accepted by the provider "
                        "any more; see the gateway's error log",
                        &pool->upstream->host);
}


/* a 429 whose retry-after is when the wait is over, never earlier */

ngx_int_t
ngx_http_ratepool_reply_pool_full(ngx_http_request_t *r,
    ngx_http_ratepool_pool_t *pool, uint64_t wait_ms)
{
    ngx_str_t  msg;
    u_char     buf[320];

    msg.data = buf;
    msg.len = ngx_snprintf(buf, sizeof(buf),
                           "every key of pool \"%V\" is at its rate "
                           "limit; the first frees up in %uL ms",
                           &pool->upstream->host, wait_ms)
              - buf;

    return ngx_http_ratepool_reply_limited(r, &msg, wait_ms);
}


ngx_int_t
ngx_http_ratepool_reply_workspace_full(ngx_http_request_t *r,
    ngx_http_ratepool_workspace_t *ws, const char *what, ngx_uint_t limit,
    uint64_t wait_ms)
{
    ngx_str_t  msg;
    u_char     buf[320];

    msg.data = buf;
    msg.len = ngx_snprintf(buf, sizeof(buf),
                           "workspace \"%V\" is over its budget of %ui "
                           "%s per minute", &ws->name, limit, what)
              - buf;

    return ngx_http_ratepool_reply_limited(r, &msg, wait_ms);
}


ngx_int_t
ngx_http_ratepool_reply_budget_busy(ngx_http_request_t *r,
    ngx_http_ratepool_workspace_t *ws, const char *kind, uint64_t budget,
    ngx_uint_t money, uint64_t wait_ms)
{
    u_char     *p, buf[320];
    ngx_str_t   msg;

    p = ngx_snprintf(buf, sizeof(buf),
                     "workspace \"%V\" is near its %s budget of ",
                     &ws->name, kind);
    p = ngx_http_ratepool_amount(p, buf + sizeof(buf), budget, money);
    p = ngx_slprintf(p, buf + sizeof(buf),
                     ": its requests in flight may use the rest");

    msg.data = buf;
    msg.len = p - buf;

    return ngx_http_ratepool_reply_limited(r, &msg, wait_ms);
}


static ngx_int_t
ngx_http_ratepool_reply_limited(ngx_http_request_t *r, ngx_str_t *message,
    uint64_t wait_ms)
{
    return ngx_http_ratepool_reply_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                         "rate_limit_error", message, NULL,
                                         ratepool_retry_after_sec(wait_ms,
                                                     (uint32_t) ngx_random()),
                                         1);
}


/*
 * An answer of the gateway's own in place of sending the request: the
 * request is finalized here, and NGX_DONE returned.
 */

ngx_int_t
ngx_http_ratepool_reply_error(ngx_http_request_t *r, ngx_uint_t status,
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


/*
 * nginx's own error pages (a timeout, a TLS failure, a body too large)
 * and a provider's 401 that no key could beat, answered in the client's
 * format: the headers are set here, the body filter sends ctx->own_error
 * in place of the page's.
 */

ngx_int_t
ngx_http_ratepool_reply_replace(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    ngx_str_t                   msg;
    ngx_uint_t                  status, refused;
    const char                 *type;
    ngx_http_ratepool_error_t  *e;
    u_char                      buf[320];

    status = r->headers_out.status;
    refused = (ctx && ctx->refused);

    if (refused) {
        status = NGX_HTTP_SERVICE_UNAVAILABLE;
        type = "api_error";
        msg.data = buf;
        msg.len = ngx_http_ratepool_no_key(buf, sizeof(buf), ctx->pool)
                  - buf;

    } else {
        type = status < NGX_HTTP_INTERNAL_SERVER_ERROR
               ? "invalid_request_error" : "api_error";
        ngx_str_set(&msg, "the gateway could not complete the request");

        for (e = ngx_http_ratepool_errors; e->status; e++) {
            if (e->status == status) {
                type = e->type;
                msg.data = (u_char *) e->message;
                msg.len = ngx_strlen(e->message);
                break;
            }
        }
    }

    if (ctx == NULL) {
        /* refused before the access phase, e.g. a body too large */
        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_ratepool_ctx_t));
        if (ctx == NULL) {
            return NGX_ERROR;
        }

        ctx->request = r;
        ctx->dialect = ngx_http_ratepool_dialect(r);
        ngx_http_set_ctx(r, ctx, ngx_http_ratepool_module);
    }

    ctx->own_error = ngx_http_ratepool_error_body(r, type, &msg, NULL);
    if (ctx->own_error == NULL) {
        return NGX_ERROR;
    }

    ctx->own_error->last_buf = 1;
    ctx->own_error->last_in_chain = 1;

    ngx_http_clear_content_length(r);
    ngx_http_clear_accept_ranges(r);

    r->headers_out.status_line.len = 0;

    ngx_http_ratepool_json_headers(r, status,
                                   ctx->own_error->last - ctx->own_error->pos);

    return ngx_http_ratepool_error_headers(r, 0,
                                     status >= NGX_HTTP_INTERNAL_SERVER_ERROR
                                     && !refused);
}


/*
 * A cloud's error answer (Bedrock's), in Anthropic's shape for the
 * client: its status, the type that status has at Anthropic, and the
 * cloud's own text where it came with the headers.
 */

ngx_int_t
ngx_http_ratepool_reply_cloud_error(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    ngx_str_t   msg;
    ngx_uint_t  status;

    status = r->headers_out.status;

    msg = ctx->cloud_message;

    if (msg.len == 0) {
        ngx_str_set(&msg, "the provider refused the request");
    }

    ctx->own_error = ngx_http_ratepool_error_body(r,
                                           ratepool_error_type((int) status),
                                           &msg, NULL);
    if (ctx->own_error == NULL) {
        return NGX_ERROR;
    }

    ctx->own_error->last_buf = 1;
    ctx->own_error->last_in_chain = 1;

    ngx_http_clear_content_length(r);
    ngx_http_clear_accept_ranges(r);

    ngx_http_ratepool_json_headers(r, status,
                                   ctx->own_error->last - ctx->own_error->pos);

    return ngx_http_ratepool_error_headers(r, 0,
                                     status >= NGX_HTTP_INTERNAL_SERVER_ERROR
                                     || status == NGX_HTTP_TOO_MANY_REQUESTS);
}


/*
 * A provider's 429 that reaches the client (no other key could take the
 * request) carries that one key's retry-after; the client is told
 * instead when the first key of the whole pool frees up.
 */

ngx_int_t
ngx_http_ratepool_reply_retry_after(ngx_http_request_t *r, uint64_t wait_ms)
{
    return ngx_http_ratepool_error_headers(r,
                              ratepool_retry_after_sec(wait_ms,
                                                    (uint32_t) ngx_random()),
                              1);
}


/*
 * An error in the provider's format, with nginx's $request_id, and
 * details.error_code where the provider would give one.
 */

static ngx_buf_t *
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

    if (ngx_http_ratepool_dialect(r) == RATEPOOL_DIALECT_OPENAI) {
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


/* retry-after (if any) and x-should-retry, which the SDKs obey */

static ngx_int_t
ngx_http_ratepool_error_headers(ngx_http_request_t *r,
    ngx_uint_t retry_after_sec, ngx_int_t should_retry)
{
    u_char  *p, *ra;

    static ngx_str_t  retry_after = ngx_string("retry-after");
    static ngx_str_t  retry_after_ms = ngx_string("retry-after-ms");
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

        /* the SDKs prefer retry-after-ms: one org's must not contradict */
        ngx_http_ratepool_hide_headers(r, &retry_after_ms, 0);
    }

    return ngx_http_ratepool_set_header(r, &x_should_retry,
                                        (u_char *) (should_retry ? "true"
                                                                 : "false"),
                                        should_retry ? 4 : 5);
}


/*
 * Sets a response header, in place of every one of the same name (a
 * provider may have sent several): one value reaches the client.
 */

static ngx_int_t
ngx_http_ratepool_set_header(ngx_http_request_t *r, ngx_str_t *name,
    u_char *value, size_t len)
{
    ngx_table_elt_t  *h;

    ngx_http_ratepool_hide_headers(r, name, 0);

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = *name;
    h->value.data = value;
    h->value.len = len;

    return NGX_OK;
}


/* leaves out every response header so named, or so beginning (prefix) */

void
ngx_http_ratepool_hide_headers(ngx_http_request_t *r, ngx_str_t *name,
    ngx_uint_t prefix)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_out.headers.part;
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

        if (h[i].hash != 0
            && (h[i].key.len == name->len
                || (prefix && h[i].key.len > name->len))
            && ngx_strncasecmp(h[i].key.data, name->data, name->len) == 0)
        {
            h[i].hash = 0;
        }
    }
}


static void
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
